"""Tidy result tables: one row per (method, dataset, class, level, metric), with provenance.

Every CSV under `results/` has the columns of `RESULT_COLUMNS`, so results of different methods, seeds and
profiles concatenate into one frame. Published numbers (from the papers, in `results/published/`) are joined
beside them by `compare_with_published`.

Example:
    >>> import pandas as pd
    >>> metrics = pd.DataFrame([dict(dataset="d", class_name="a", level="image", metric="auroc", value=0.9, note="")])
    >>> tidy(metrics, Provenance(method="clip", backbone="zsad-tiny", weights="random", image_size=64,
    ...                          train_set="none", profile="smoke")).shape[0]
    1
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import pandas as pd

import zsadkit
from zsadkit.paths import PACKAGE_ROOT, PUBLISHED_DIR

__all__ = [
    "code_commit",
    "source_digest",
    "compare_with_published",
    "KEY_COLUMNS",
    "load_published",
    "Provenance",
    "PROVENANCE_COLUMNS",
    "PUBLISHED_METRIC_NAMES",
    "published_rows",
    "read_results",
    "RESULT_COLUMNS",
    "tidy",
    "wide_table",
    "write_results",
]

KEY_COLUMNS = ("method", "dataset", "class_name", "level", "metric")
PROVENANCE_COLUMNS = (
    "backbone", "weights", "image_size", "train_set", "shots", "backbone_seed", "train_seed", "reference_seed",
    "checkpoint",
    "profile", "zsadkit_version", "commit",
)
RESULT_COLUMNS = (*KEY_COLUMNS, "value", "note", *PROVENANCE_COLUMNS)


@cache
def code_commit() -> str:
    """The git commit of the checkout (with `+dirty` when modified), or "unknown" outside git."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(
                ["git", *args], cwd=PACKAGE_ROOT, capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()

        commit = git("rev-parse", "--short=12", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@cache
def source_digest() -> str:
    """sha256 of the package's source and data files (`zsadkit/**/*.py|yaml`): changes with any edit of the code,
    committed or not, and not with commits that leave the package alone."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(p for p in package.rglob("*") if p.suffix in (".py", ".yaml") and p.is_file()):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Provenance:
    """What produced a result. `weights` is e.g. "openai" or "random" (never blank: say when weights are random).

    `train_set` is the auxiliary dataset a zero-shot method was trained on ("none" for training-free methods);
    `shots` the number of normal reference images per class (0 = zero-shot); `backbone_seed` the seed of random
    backbone weights; `train_seed` the seed of what the method learned (initialisation, training data order), None
    (an empty cell) for methods that learn nothing; `reference_seed` the seed of the draw of a few-shot method's
    normal reference images (prompt set), None for zero-shot rows.
    """

    method: str
    backbone: str
    weights: str
    image_size: int
    train_set: str
    profile: str
    shots: int = 0
    backbone_seed: int = 0
    train_seed: int | None = None
    reference_seed: int | None = None
    checkpoint: str = ""
    zsadkit_version: str = zsadkit.__version__
    commit: str = field(default_factory=code_commit)


def tidy(metrics: pd.DataFrame, provenance: Provenance) -> pd.DataFrame:
    """Attach provenance to metric rows (columns dataset, class_name, level, metric, value[, note])."""
    missing = {"dataset", "class_name", "level", "metric", "value"} - set(metrics.columns)
    if missing:
        raise ValueError(f"metric rows lack columns {sorted(missing)}")
    frame = metrics.copy()
    if "note" not in frame:
        frame["note"] = ""
    for name, value in asdict(provenance).items():
        frame[name] = value
    extra = [c for c in frame.columns if c not in RESULT_COLUMNS]  # e.g. n_classes of the mean rows
    return frame[[*RESULT_COLUMNS[: RESULT_COLUMNS.index("note") + 1], *extra, *PROVENANCE_COLUMNS]].reset_index(
        drop=True
    )


def wide_table(
    frame: pd.DataFrame, index: str | list[str], columns: str | list[str], values: str = "value", scale: float = 100.0,
    decimals: int = 1,
) -> pd.DataFrame:
    """A tidy frame as a readable table (values × `scale`, rounded), classes in order with the "mean" row last."""
    table = frame.pivot_table(index=index, columns=columns, values=values, sort=False) * scale
    table = table.sort_index(axis=1)
    index_names = [index] if isinstance(index, str) else list(index)
    if "class_name" in index_names:
        level = index_names.index("class_name")
        keys = [(key if isinstance(key, tuple) else (key,)) for key in table.index]
        order = sorted(range(len(keys)), key=lambda i: (*keys[i][:level], keys[i][level] == "mean", keys[i][level]))
        table = table.iloc[order]
    return table.round(decimals)


def write_results(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a tidy frame to CSV, checking the schema first."""
    missing = set(RESULT_COLUMNS) - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: result rows lack columns {sorted(missing)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def read_results(path: str | Path) -> pd.DataFrame:
    frame = pd.read_csv(path, keep_default_na=True, dtype={"note": str, "checkpoint": str})
    missing = set(RESULT_COLUMNS) - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: not a zsadkit results file, columns {sorted(missing)} are missing")
    return frame.fillna({"note": "", "checkpoint": ""})


def load_published(name: str) -> pd.DataFrame:
    """A published table copied from the papers, e.g. `load_published("anomalyclip_table1_table2")`."""
    path = PUBLISHED_DIR / f"{name}.csv"
    if not path.exists():
        known = sorted(p.stem for p in PUBLISHED_DIR.glob("*.csv"))
        raise FileNotFoundError(f"{path} does not exist; published tables: {known}")
    return pd.read_csv(path)


def compare_with_published(
    ours: pd.DataFrame, published: pd.DataFrame, on: list[str], scale: float = 100.0
) -> pd.DataFrame:
    """Put our values (fractions, shown ×`scale`) beside the published ones, with the difference.

    Args:
        ours: tidy rows with `value`.
        published: rows with the columns `on` and `published`.
        on: join columns (e.g. ["method", "dataset", "class_name", "level", "metric"]).
    Returns:
        An outer join with columns `on + ["ours", "published", "diff"]`; a row present on one side only keeps NaN
        on the other, so nothing is dropped silently.
    """
    left = ours[[*on, "value"]].rename(columns={"value": "ours"}).assign(ours=lambda f: f["ours"] * scale)
    right = published[[*on, "published"]]
    joined = left.merge(right, on=on, how="outer")
    joined["diff"] = joined["ours"] - joined["published"]
    return joined


# The published tables name metrics as the papers print them; these are the zsadkit metric names.
PUBLISHED_METRIC_NAMES = {
    "AUROC": "auroc",
    "AP": "ap",
    "AUPRC": "ap",
    "F1-max": "f1_max",
    "PRO": "aupro_cflow200",  # AnomalyCLIP's "PRO"/"AUPRO" column is the cflow-style 200-threshold variant
    "AUPRO": "aupro_cflow200",
}


def _split_dataset_and_class(value: str, whole_names: Sequence[str]) -> tuple[str, str | None]:
    """("<dataset>", "<class>") of a published "<dataset> / <class>" cell; a dataset name that itself holds " / "
    (one of `whole_names`, e.g. "Retina OCT / RESC (BMAD)") is kept whole."""
    for name in whole_names:
        if value == name:
            return name, None
        if value.startswith(name + " / "):
            return name, value[len(name) + 3 :]
    dataset, _, class_name = value.partition(" / ")
    return dataset, class_name or None


def published_rows(name: str, *, whole_names: Sequence[str] = (), **filters: str) -> pd.DataFrame:
    """A published long-format table as rows comparable with ours.

    Returns columns method (or variant), dataset, class_name ("mean" for dataset rows; per-class rows are
    written "<dataset> / <class>" in the source), level, metric (zsadkit names), published (percent), table,
    setting, shots (K of a "K-shot" or "K=K" setting, else NaN). `whole_names` are dataset names that contain " / "
    themselves. `filters` select on the source columns, e.g. `published_rows("anomalyclip_table1_table2",
    table="Table 1")`.
    """
    frame = load_published(name)
    for column, wanted in filters.items():
        frame = frame[frame[column] == wanted]
    split = [_split_dataset_and_class(str(value), whole_names) for value in frame["dataset"]]
    dataset = pd.Series([pair[0] for pair in split], index=frame.index, dtype=object)
    class_name = pd.Series([pair[1] for pair in split], index=frame.index, dtype=object)
    return pd.DataFrame(
        {
            "method": frame["method"] if "method" in frame else frame["variant"],
            "dataset": dataset,
            "class_name": class_name.fillna("mean"),
            "level": frame["level"],
            "metric": frame["metric"].map(PUBLISHED_METRIC_NAMES).fillna(frame["metric"]),
            "published": pd.to_numeric(frame["value"], errors="coerce"),
            "table": frame["table"],
            "setting": frame["setting"],
            "shots": frame["setting"].str.extract(r"(\d+)-shot", expand=False).astype(float).fillna(
                frame["setting"].str.extract(r"\bK=(\d+)", expand=False).astype(float)),
        }
    ).reset_index(drop=True)
