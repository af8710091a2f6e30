"""The one sample record every reader produces, and the portable manifest format (CSV or JSONL).

A manifest lists records with paths relative to a data root, so the same file works on every machine:

    image,mask,label,class_name,defect,dataset,split
    bottle/test/broken_large/000.png,bottle/ground_truth/broken_large/000_mask.png,1,bottle,broken_large,mvtec,test

Example:
    >>> s = Sample(image="a/x.png", mask=None, label=0, class_name="a", defect="good", dataset="synth", split="test")
    >>> s.has_mask
    False
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

__all__ = [
    "MANIFEST_COLUMNS",
    "read_manifest",
    "Sample",
    "samples_fingerprint",
    "SPLITS",
    "write_manifest",
]

SPLITS = ("train", "test")
MANIFEST_COLUMNS = ("image", "mask", "label", "class_name", "defect", "dataset", "split")


@dataclass(frozen=True)
class Sample:
    """One image of a benchmark.

    Attributes:
        image: path of the image (relative to a data root in a manifest, absolute once resolved).
        mask: path of the pixel mask, or None (normal image, or an image-level-only dataset).
        label: 0 = normal, 1 = anomalous.
        class_name: the object or texture class ("bottle", "carpet", "brain").
        defect: defect type ("good" for normal images, "" where a dataset has none).
        dataset: dataset name ("mvtec", "visa", "synthetic").
        split: "train" or "test".
    """

    image: str
    mask: str | None
    label: int
    class_name: str
    defect: str
    dataset: str
    split: str

    def __post_init__(self) -> None:
        if self.label not in (0, 1):
            raise ValueError(f"Sample {self.image}: label must be 0 or 1, got {self.label!r}")
        if self.split not in SPLITS:
            raise ValueError(f"Sample {self.image}: split must be one of {SPLITS}, got {self.split!r}")
        if not self.class_name:
            raise ValueError(f"Sample {self.image}: class_name is empty")

    @property
    def has_mask(self) -> bool:
        return self.mask is not None

    def resolve(self, root: str | Path) -> Sample:
        """The same record with `image` and `mask` joined to `root` (absolute paths are kept)."""
        root = Path(root)
        return replace(
            self,
            image=str(root / self.image),
            mask=None if self.mask is None else str(root / self.mask),
        )

    def relative_to(self, root: str | Path) -> Sample:
        """The same record with paths made relative to `root` (for a portable manifest)."""
        root = Path(root).resolve()

        def rel(path: str) -> str:
            try:
                return Path(path).resolve().relative_to(root).as_posix()
            except ValueError as err:
                raise ValueError(f"{path} is not inside the data root {root}") from err

        return replace(self, image=rel(self.image), mask=None if self.mask is None else rel(self.mask))


def _row_to_sample(row: object, where: str) -> Sample:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a record with the fields {list(MANIFEST_COLUMNS)}, got {row!r}")
    missing = [c for c in MANIFEST_COLUMNS if c not in row]
    if missing:
        raise ValueError(f"{where}: missing columns {missing}; expected {list(MANIFEST_COLUMNS)}")
    short = [c for c in MANIFEST_COLUMNS if row[c] is None and c != "mask"]
    if short or None in row:  # csv.DictReader fills a short row with None and collects a long row's extras under None
        fields_found = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
        raise ValueError(f"{where}: the row has {fields_found} fields, expected {len(MANIFEST_COLUMNS)}")
    try:
        label = int(row["label"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: label must be 0 or 1, got {row['label']!r}") from err
    mask = row["mask"] or None
    try:
        return Sample(
            image=str(row["image"]),
            mask=None if mask is None else str(mask),
            label=label,
            class_name=str(row["class_name"]),
            defect=str(row["defect"] or ""),
            dataset=str(row["dataset"]),
            split=str(row["split"]),
        )
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def read_manifest(path: str | Path, root: str | Path | None = None) -> list[Sample]:
    """Read a CSV or JSONL manifest; with `root`, paths are resolved against it.

    Raises:
        ValueError: unknown extension, missing column or bad value; the message names the file and line.
    """
    path = Path(path)
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            rows = [(f"{path}:{i + 2}", row) for i, row in enumerate(csv.DictReader(handle))]
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                try:
                    rows.append((f"{path}:{i + 1}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{i + 1}: not a JSON object ({err})") from err
    else:
        raise ValueError(f"{path}: manifest must be .csv or .jsonl")
    samples = [_row_to_sample(row, where) for where, row in rows]
    if not samples:
        raise ValueError(f"{path}: the manifest lists no samples")
    return [s.resolve(root) for s in samples] if root is not None else samples


def write_manifest(samples: list[Sample], path: str | Path) -> Path:
    """Write records as CSV or JSONL (chosen by the extension); `mask=None` is written as empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [asdict(s) for s in samples]
    if path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(Sample)])
            writer.writeheader()
            for record in records:
                writer.writerow({**record, "mask": record["mask"] or ""})
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        raise ValueError(f"{path}: manifest must be .csv or .jsonl")
    return path


def samples_fingerprint(samples: Sequence[Sample]) -> str:
    """Identity of a list of samples: paths, labels, classes, and each file's size and modification time."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(f"{sample.image}|{sample.mask}|{sample.label}|{sample.class_name}|".encode())
        for path in (sample.image, sample.mask):
            if path is not None:
                status = Path(path).stat()
                digest.update(f"{status.st_size}:{status.st_mtime_ns}|".encode())
    return digest.hexdigest()
