"""Datasets by name and protocol: the manifests of `data_manifests/` and the prepared data under a root.

Notebooks ask for real data this way:

    >>> from zsadkit.data.catalog import available_datasets, load_dataset
    >>> "mvtec" in available_datasets()
    True
    >>> samples = load_dataset("mvtec", "anomalyclip", root="~/data")  # doctest: +SKIP

`load_dataset` reads `DATA_ROOT/<name>/manifest_<protocol>.csv` written by `zsadkit data prepare`. The
manifests folder is the repository's `data_manifests/`; the environment variable
`ZSADKIT_DATA_MANIFESTS` points elsewhere.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from zsadkit.data.dataset_spec import DatasetSpec, count_by_class, count_table, load_dataset_spec
from zsadkit.data.errors import DataError
from zsadkit.data.records import SPLITS, Sample, read_manifest

__all__ = [
    "available_datasets",
    "dataset_status",
    "get_dataset_spec",
    "load_dataset",
    "manifest_path",
    "manifests_dir",
    "MANIFESTS_ENV",
    "protocol_status",
    "ProtocolStatus",
    "provenance_path",
    "REPOSITORY_MANIFESTS",
]

MANIFESTS_ENV = "ZSADKIT_DATA_MANIFESTS"
REPOSITORY_MANIFESTS = Path(__file__).resolve().parents[2] / "data_manifests"


def manifests_dir() -> Path:
    """The folder of dataset manifests (`$ZSADKIT_DATA_MANIFESTS` or the repository's `data_manifests/`)."""
    folder = Path(os.environ.get(MANIFESTS_ENV, REPOSITORY_MANIFESTS))
    if not folder.is_dir():
        raise DataError(
            f"{folder}: dataset manifests folder is missing; set {MANIFESTS_ENV} to the "
            "data_manifests/ folder of a zsadkit checkout"
        )
    return folder


def available_datasets() -> list[str]:
    """Names of every dataset with a manifest, sorted."""
    return sorted(p.stem for p in manifests_dir().glob("*.yaml"))


@cache
def _load_cached(path: str, mtime: float) -> DatasetSpec:
    return load_dataset_spec(path)


def get_dataset_spec(name: str) -> DatasetSpec:
    """The parsed manifest of a dataset.

    Raises:
        DataError: no manifest has that name (the message lists the available ones).
    """
    path = manifests_dir() / f"{name}.yaml"
    if not path.is_file():
        raise DataError(f"unknown dataset {name!r}: no {path}; available: {available_datasets()}")
    return _load_cached(str(path), path.stat().st_mtime)


def manifest_path(root: str | Path, name: str, protocol: str) -> Path:
    """`root/<name>/manifest_<protocol>.csv`."""
    return Path(root).expanduser() / name / f"manifest_{protocol}.csv"


def provenance_path(root: str | Path, name: str, protocol: str) -> Path:
    """`root/<name>/provenance_<protocol>.json` (what a manifest was built from, and its counts)."""
    return Path(root).expanduser() / name / f"provenance_{protocol}.json"


def load_dataset(name: str, protocol: str, root: str | Path, split: str = "test") -> list[Sample]:
    """The records of a prepared dataset for one protocol and split, with absolute paths.

    Args:
        name: dataset name ("mvtec", "visa", "sdd", ...; see `available_datasets()`).
        protocol: the paper's protocol ("anomalyclip", "inctrl", "aaclip", ...).
        root: the data root given to `zsadkit data prepare --root`.
        split: "test" or "train".

    Raises:
        DataError: unknown dataset, protocol or split, or the dataset is not prepared (the message gives
            the command that prepares it).
    """
    spec = get_dataset_spec(name)
    spec.protocol(protocol)
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root).expanduser().resolve()
    path = manifest_path(root, name, protocol)
    if not path.is_file():
        raise DataError(
            f"{path}: {name} is not prepared for protocol {protocol!r}; run "
            f"`zsadkit data prepare {name} --raw <download folder> --root {root} --protocol {protocol}`"
        )
    samples = [s for s in read_manifest(path, root) if s.split == split]
    if not samples:
        raise DataError(f"{path}: no {split!r} records")
    return samples


@dataclass(frozen=True)
class ProtocolStatus:
    """Readiness of one dataset protocol under a data root.

    Attributes:
        dataset / protocol: names.
        ready: manifest present and every file it lists exists.
        test_counts: class -> (normal, anomalous) of the test split (empty if not prepared).
        matches_published: True/False against the manifest's expected test counts, None if none published.
        detail: what is missing, or where the counts differ.
    """

    dataset: str
    protocol: str
    ready: bool
    test_counts: dict[str, tuple[int, int]]
    matches_published: bool | None
    detail: str


def protocol_status(root: str | Path, spec: DatasetSpec, protocol: str) -> ProtocolStatus:
    """Check one prepared protocol: manifest, files and counts."""
    root = Path(root).expanduser().resolve()
    path = manifest_path(root, spec.name, protocol)
    if not path.is_file():
        layout = spec.layout(spec.protocol(protocol).layout)
        source = ", ".join(layout.archives) or "the data"
        return ProtocolStatus(
            spec.name, protocol, False, {}, None, f"not prepared: get {source} from {spec.homepage}"
        )
    samples = read_manifest(path)
    missing = [p for s in samples for p in (s.image, s.mask) if p is not None and not (root / p).is_file()]
    counts = count_by_class(samples, "test")
    expected = spec.protocol(protocol).test
    matches = None if expected is None else count_table(expected, counts)[1]
    if missing:
        detail = f"{len(missing)} listed file(s) missing, e.g. {root / missing[0]}"
    elif matches is False:
        overridden = ""
        provenance = provenance_path(root, spec.name, protocol)
        if provenance.is_file() and json.loads(provenance.read_text()).get("expected_counts_overridden"):
            overridden = " (prepared with overridden expected counts)"
        detail = "test counts differ from the published ones" + overridden
    else:
        detail = ""
    return ProtocolStatus(spec.name, protocol, not missing, counts, matches, detail)


def dataset_status(root: str | Path, names: list[str] | None = None) -> list[ProtocolStatus]:
    """Status of every protocol of every dataset (or of `names`) under `root`."""
    return [
        protocol_status(root, spec, protocol)
        for spec in (get_dataset_spec(n) for n in (names or available_datasets()))
        for protocol in spec.protocols
    ]
