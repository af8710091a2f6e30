"""What a run needs before any notebook starts: the data root, each dataset prepared for its protocol, the weights
(on disk, in the open_clip / Hugging Face cache, or downloadable now) and free disk for the feature caches.

`check` returns one `Problem` per missing item, each with the command that fixes it, in seconds: the network is
probed once (a TCP connection with a short timeout), never by a download that retries for a minute.

Example:
    >>> [problem.what for problem in check(Needs(weights=(("zsad-tiny", ""),)))]
    []
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import open_clip

from zsadkit.data.catalog import available_datasets, get_dataset_spec, manifest_path
from zsadkit.models.loader import WEIGHT_FILE_SUFFIXES
from zsadkit.paths import default_cache_root
from zsadkit.protocols import subset

__all__ = ["Needs", "Problem", "check", "network_reachable", "report", "weights_cached"]

HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class Problem:
    """One missing requirement and how to fix it."""

    what: str
    fix: str


@dataclass
class Needs:
    """What the selected notebooks need (the union over notebooks).

    Attributes:
        data_root: the datasets' root ("" = the synthetic smoke data, nothing to check).
        datasets: (dataset or named subset, data protocol) pairs.
        weights: (backbone, pretrained) pairs; pretrained "" means random weights.
        cache_gb: free disk the feature caches need under `cache_root`.
        cache_root: where the feature caches go.
        weight_parameters: for each (backbone, pretrained), the notebook parameter that sets it (for the advice).
    """

    data_root: str = ""
    datasets: tuple[tuple[str, str], ...] = ()
    weights: tuple[tuple[str, str], ...] = ()
    cache_gb: float = 0.0
    cache_root: Path = field(default_factory=default_cache_root)
    weight_parameters: dict[tuple[str, str], str] = field(default_factory=dict)


@cache
def network_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    """One TCP connection attempt (no retries)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def weights_cached(backbone: str, tag: str, cache_dir: str | None = None) -> bool:
    """True when open_clip would load `backbone`/`tag` without downloading (its URL cache or the HF hub cache)."""
    config = open_clip.get_pretrained_cfg(backbone, tag)
    if not config:
        return False
    if config.get("file"):
        return Path(config["file"]).is_file()
    url = config.get("url", "")
    if url and (Path(cache_dir or Path.home() / ".cache" / "clip") / Path(url).name).is_file():
        return True
    hub = config.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = hub.rstrip("/").rsplit("/", 1) if not hub.endswith("/") else (hub.rstrip("/"), "")
        for name in ([filename] if filename else HF_WEIGHT_FILES):
            if isinstance(try_to_load_from_cache(repo, name, cache_dir=cache_dir), str):
                return True
    return False


def _weights_problem(backbone: str, pretrained: str, parameter: str) -> Problem | None:
    if not pretrained:
        return None
    path = Path(pretrained).expanduser()
    if path.is_file():
        return None
    if path.suffix in WEIGHT_FILE_SUFFIXES or "/" in pretrained:
        return Problem(f"weights file {pretrained} (parameter `{parameter}`) does not exist",
                       f"point it at an existing file: --set {parameter}=/path/to/weights.pt")
    if not open_clip.get_pretrained_cfg(backbone, pretrained):
        return Problem(f"{backbone!r} has no pretrained tag {pretrained!r} (parameter `{parameter}`)",
                       f"use one of {open_clip.list_pretrained_tags_by_model(backbone)} or a weights file")
    if weights_cached(backbone, pretrained) or network_reachable():
        return None
    return Problem(
        f"weights {backbone}/{pretrained} are not in the local cache and the network is unreachable",
        f"download them once where there is network (python -c \"import open_clip; open_clip.create_model("
        f"'{backbone}', pretrained='{pretrained}')\") or pass a local file: --set {parameter}=/path/to/weights.pt"
        + (" (or --pretrained FILE)" if parameter == "pretrained" else ""),
    )


def _dataset_problems(data_root: str, datasets: Iterable[tuple[str, str]]) -> list[Problem]:
    root = Path(data_root).expanduser()
    if not root.is_dir():
        pairs = sorted({(subset(name)[0] if subset(name) else name, protocol) for name, protocol in datasets})
        commands = "\n".join(_prepare_command(name, protocol, root) for name, protocol in pairs)
        return [Problem(f"data root {root} does not exist", f"prepare the datasets into it:\n{commands}" if pairs
                        else f"create it: mkdir -p {root}")]
    problems = []
    known = set(available_datasets())
    for name, protocol in sorted(set(datasets)):
        dataset = subset(name)[0] if subset(name) else name
        if dataset not in known:
            problems.append(Problem(f"dataset {name!r} has no manifest in data_manifests/", "see README, "
                                    "'Adding a dataset'"))
            continue
        if not manifest_path(root, dataset, protocol).is_file():
            problems.append(Problem(f"{dataset} is not prepared for protocol {protocol!r} under {root}",
                                    _prepare_command(dataset, protocol, root)))
    return problems


def _prepare_command(dataset: str, protocol: str, root: Path) -> str:
    if dataset not in available_datasets():
        return f"{dataset}: no manifest in data_manifests/ (see README, 'Adding a dataset')"
    spec = get_dataset_spec(dataset)
    download = " --download" if any(archive.url for archive in spec.archives) else ""
    return (f"zsadkit data prepare {dataset} --raw <downloads> --root {root} --protocol {protocol}{download}"
            f"   # from {spec.homepage}")


def check(needs: Needs) -> list[Problem]:
    """Every problem of `needs` (empty when the run can start)."""
    problems = _dataset_problems(needs.data_root, needs.datasets) if needs.data_root else []
    for backbone, pretrained in dict.fromkeys(needs.weights):
        parameter = needs.weight_parameters.get((backbone, pretrained), "pretrained")
        problem = _weights_problem(backbone, pretrained, parameter)
        if problem is not None:
            problems.append(problem)
    if needs.cache_gb > 0:
        probe = next((p for p in (needs.cache_root, *needs.cache_root.parents) if p.exists()), Path("/"))
        free_gb = shutil.disk_usage(probe).free / 2**30
        if free_gb < needs.cache_gb:
            problems.append(Problem(
                f"{free_gb:.1f} GB free under {probe}, the feature caches need about {needs.cache_gb:.0f} GB",
                "free disk there, or point ZSADKIT_CACHE at a larger disk (--set cache_dtype=float16 halves it)"))
    return problems


def report(problems: Sequence[Problem]) -> str:
    """The pre-flight report: each problem and the command that fixes it."""
    lines = [f"pre-flight: {len(problems)} problem(s); nothing was run."]
    for number, problem in enumerate(problems, 1):
        fix = problem.fix.replace("\n", "\n          ")
        lines += [f"  {number}. {problem.what}", f"     fix: {fix}"]
    lines.append("(--skip-preflight runs the notebooks anyway)")
    return "\n".join(lines)
