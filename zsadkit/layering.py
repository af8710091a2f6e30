"""The import layers of the package, lowest first: a module may import its own layer and the layers below it,
never a higher one (not even lazily inside a function). `tests/test_layering.py` reads every import and checks.

    >>> layer_of("zsadkit.methods.anomalyclip"), layer_of("zsadkit.recipes.vand")
    ('methods', 'engine')
"""

from __future__ import annotations

__all__ = ["LAYERS", "layer_of"]

#: (layer name, module prefixes), lowest first.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("zsadkit", "zsadkit.paths", "zsadkit.layering")),
    ("data and models", ("zsadkit.data", "zsadkit.models")),
    ("shared pieces", ("zsadkit.prompts", "zsadkit.prompt_learning", "zsadkit.maps", "zsadkit.losses",
                       "zsadkit.metrics", "zsadkit.stats")),
    ("methods", ("zsadkit.methods",)),
    ("engine", ("zsadkit.feature_cache", "zsadkit.engine", "zsadkit.training", "zsadkit.recipes", "zsadkit.results",
                "zsadkit.protocols", "zsadkit.grid")),
    ("experiment", ("zsadkit.experiment", "zsadkit.predict", "zsadkit.preflight", "zsadkit.reproduce",
                    "zsadkit.verify", "zsadkit.cli", "zsadkit.book", "zsadkit.cluster", "zsadkit.comparison")),
)


def layer_of(module: str) -> str:
    """The layer of a `zsadkit` module (the longest matching prefix); an unlisted module is an error."""
    best, best_length = None, -1
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = name, len(prefix)
    if best is None:
        raise KeyError(f"module {module!r} is in no layer of zsadkit.layering.LAYERS")
    return best
