"""Converters from a dataset's raw layout to records, named in the `converter:` field of a manifest.

Each converter is a function `(root, params, dataset) -> Conversion` where `params` is a dataclass built
from the manifest's `params:` mapping (an unknown key is an error). Records point into the raw tree; the
canonical copy is written by `zsadkit.data.prepare`. Masks are always paired with their image **by name**
(a pattern such as `{stem}_mask.png`), never by position in a sorted listing; a missing mask is an error
naming the image. Folders are read in sorted order, tables in file order, so the record order (and hence
any seeded sub-sampling) is the same on every machine.

| converter | raw layout | datasets |
|---|---|---|
| `mvtec_like` | `<cls>/{train,test}/<defect>/*`, `<cls>/ground_truth/<defect>/<stem><suffix>.*` | MVTec AD, MPDD, BTAD, DTD-Synthetic |
| `visa_csv` | a split CSV (object, split, label, image, mask) | VisA |
| `images_and_masks` | `images/*`, `masks/<stem>...` | ISIC, polyp sets, TN3K, Endo |
| `class_folders` | one folder per label (`no/`, `yes/`) | BrainMRI, Br35H, COVID-19 |
| `labels_table` | images + a CSV/text table of labels | HeadCT, ELPV |
| `sdd_kos` | `kosNN/PartK.jpg` + `PartK_label.bmp`, optional crops | KolektorSDD |
| `dagm` | `ClassN/{Train,Test}/*.PNG` + `Label/*_label.PNG` (or `Labels.txt`) | DAGM 2007 |
| `aitex` | 4096x256 fabric images tiled into 256x256 | AITEX |
| `labelled_folders` | `<split>/<class>/*` (semantic classes) | MNIST, CIFAR-10 |
| `bmad` | `<split>/{good,Ungood}/{img,label}` | BMAD Brain, Liver, RESC |
"""

from __future__ import annotations

import csv
import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from zsadkit.data.errors import LayoutError, MaskError
from zsadkit.data.images import is_image_file, read_image, visible_entries
from zsadkit.data.mvtec import read_mvtec

__all__ = [
    "AitexParams",
    "BmadParams",
    "check_no_orphan_masks",
    "ClassFoldersParams",
    "Conversion",
    "convert_aitex",
    "convert_bmad",
    "convert_class_folders",
    "convert_dagm",
    "convert_images_and_masks",
    "convert_labelled_folders",
    "convert_labels_table",
    "convert_mvtec_like",
    "convert_sdd_kos",
    "convert_visa_csv",
    "CONVERTERS",
    "DagmParams",
    "find_mask",
    "image_size",
    "images_in",
    "ImagesAndMasksParams",
    "LabelledFoldersParams",
    "LabelsTableParams",
    "mask_is_empty",
    "MvtecLikeParams",
    "parse_cell",
    "RawSample",
    "register_converter",
    "run_converter",
    "SddKosParams",
    "VisaCsvParams",
]

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class RawSample:
    """One record of a raw layout, before the canonical copy.

    Attributes:
        image: the raw image file.
        mask: the raw mask file (anomalous pixels > the layout's mask threshold), or None.
        label: 0 normal, 1 anomalous.
        class_name: class of the sample.
        defect: defect type, "good" for normal images.
        split: "train" or "test" as the raw layout defines it.
        key: file stem of the canonical copy, unique within (group, split, defect).
        crop: `(left, top, right, bottom)` box cut from image and mask, or None for the whole image.
        group: folder of the canonical copy (defaults to `class_name`).
    """

    image: Path
    mask: Path | None
    label: int
    class_name: str
    defect: str
    split: str
    key: str
    crop: Box | None = None
    group: str | None = None


@dataclass
class Conversion:
    """Records of a raw layout plus notes on what was deliberately left out (printed by `prepare`)."""

    samples: list[RawSample]
    notes: list[str] = field(default_factory=list)


Converter = Callable[[Path, Any, str], Conversion]
CONVERTERS: dict[str, tuple[type, Converter]] = {}


def register_converter(name: str, params_type: type) -> Callable[[Converter], Converter]:
    """Register a converter under `name` with the dataclass of its parameters."""

    def wrap(function: Converter) -> Converter:
        CONVERTERS[name] = (params_type, function)
        return function

    return wrap


def run_converter(name: str, root: str | Path, params: dict[str, Any], dataset: str) -> Conversion:
    """Build the converter's parameter dataclass from `params` and convert the layout at `root`.

    Raises:
        LayoutError: unknown converter or parameter, or the raw layout does not match.
    """
    if name not in CONVERTERS:
        raise LayoutError(f"unknown converter {name!r}; available: {sorted(CONVERTERS)}")
    params_type, function = CONVERTERS[name]
    allowed = {f.name for f in fields(params_type)}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise LayoutError(f"converter {name!r}: unknown parameter(s) {unknown}; allowed: {sorted(allowed)}")
    try:
        typed = params_type(**params)
    except TypeError as err:
        raise LayoutError(f"converter {name!r}: bad parameters {params} ({err})") from err
    return function(Path(root), typed, dataset)


# ---------------------------------------------------------------------------------------------- helpers


def images_in(folder: Path, what: str) -> list[Path]:
    """The image files of a folder (sorted); a visible non-image entry or an empty folder is an error."""
    if not folder.is_dir():
        raise LayoutError(f"{folder}: {what} folder is missing")
    images = []
    for entry in visible_entries(folder):
        if entry.is_dir() or not is_image_file(entry):
            kind = "folder" if entry.is_dir() else "non-image file"
            raise LayoutError(f"{entry}: unexpected {kind} in the {what} folder {folder}")
        images.append(entry)
    if not images:
        raise LayoutError(f"{folder}: the {what} folder contains no images")
    return images


def find_mask(
    image: Path, mask_dir: Path, patterns: tuple[str, ...] | list[str], stem: str | None = None
) -> Path:
    """The mask of `image` in `mask_dir`: the first pattern (`{stem}` = image stem, globs allowed) that matches.

    Raises:
        MaskError: no pattern matches (the message names the image and the paths tried), or a glob
            matches several files.
    """
    stem = image.stem if stem is None else stem
    tried = []
    for pattern in patterns:
        name = pattern.format(stem=stem)
        if any(ch in name for ch in "*?["):
            matches = sorted(p for p in mask_dir.glob(name) if p.is_file()) if mask_dir.is_dir() else []
            if len(matches) > 1:
                raise MaskError(
                    f"{image}: mask pattern {mask_dir / name} is ambiguous, it matches "
                    f"{[m.name for m in matches]}"
                )
            if matches:
                return matches[0]
        elif (mask_dir / name).is_file():
            return mask_dir / name
        tried.append(str(mask_dir / name))
    raise MaskError(f"{image}: anomalous image has no mask; expected one of {tried}")


def check_no_orphan_masks(mask_dir: Path, used: set[Path]) -> None:
    """Every image file in `mask_dir` must have been paired with an image."""
    orphans = [p for p in images_in(mask_dir, "mask") if p not in used]
    if orphans:
        raise MaskError(f"{orphans[0]}: mask has no image ({len(orphans)} unmatched mask(s) in {mask_dir})")


def mask_is_empty(mask: Path, box: Box | None = None) -> bool:
    """True when no pixel of the mask (inside `box`) is non-zero.

    Raises:
        ImageReadError: the mask is unreadable or truncated.
    """
    grey = read_image(mask, "mask").convert("L")
    region = grey if box is None else grey.crop(box)
    return not np.asarray(region).any()


def image_size(path: Path, what: str = "image") -> tuple[int, int]:
    """(width, height) of a fully decoded image file.

    Raises:
        ImageReadError: the file is unreadable or truncated (the header alone would not tell).
    """
    return read_image(path, what).size


def parse_cell(value: str) -> int | float | str:
    """A table cell as int, float or (stripped) string."""
    value = value.strip()
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


# ------------------------------------------------------------------------------------------- converters


@dataclass(frozen=True)
class MvtecLikeParams:
    """`mvtec_like`: the MVTec AD layout, read by `zsadkit.data.mvtec.read_mvtec`.

    Attributes:
        normal_dir: folder of normal images ("good"; "ok" for BTAD).
        mask_suffix: mask stem = image stem + suffix ("_mask"; "" for BTAD).
        splits: raw splits to read.
        classes: class folders to read (None: every folder with train/ or test/).
    """

    normal_dir: str = "good"
    mask_suffix: str = "_mask"
    splits: tuple[str, ...] = ("train", "test")
    classes: tuple[str, ...] | None = None


@register_converter("mvtec_like", MvtecLikeParams)
def convert_mvtec_like(root: Path, params: MvtecLikeParams, dataset: str) -> Conversion:
    records = read_mvtec(
        root,
        dataset=dataset,
        classes=None if params.classes is None else list(params.classes),
        splits=tuple(params.splits),
        normal_defect=params.normal_dir,
        mask_suffix=params.mask_suffix,
    )
    samples = [
        RawSample(
            Path(r.image),
            None if r.mask is None else Path(r.mask),
            r.label,
            r.class_name,
            "good" if r.label == 0 else r.defect,
            r.split,
            Path(r.image).stem,
        )
        for r in records
    ]
    return Conversion(samples)


@dataclass(frozen=True)
class VisaCsvParams:
    """`visa_csv`: images listed in a split CSV with columns object, split, label, image, mask.

    Attributes:
        split_csv: the CSV relative to the root (VisA: "split_csv/1cls.csv").
        normal_label / anomaly_label: values of the `label` column.
    """

    split_csv: str = "split_csv/1cls.csv"
    normal_label: str = "normal"
    anomaly_label: str = "anomaly"


@register_converter("visa_csv", VisaCsvParams)
def convert_visa_csv(root: Path, params: VisaCsvParams, dataset: str) -> Conversion:
    table = root / params.split_csv
    if not table.is_file():
        raise LayoutError(f"{table}: split CSV is missing (expected columns object,split,label,image,mask)")
    samples = []
    with table.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"object", "split", "label", "image", "mask"} - set(reader.fieldnames or ())
        if missing:
            raise LayoutError(f"{table}: missing columns {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            where = f"{table}:{line}"
            split = row["split"].strip()
            if split not in ("train", "test"):
                raise LayoutError(f"{where}: split must be 'train' or 'test', got {split!r}")
            label_value = row["label"].strip()
            if label_value not in (params.normal_label, params.anomaly_label):
                raise LayoutError(
                    f"{where}: label must be {params.normal_label!r} or {params.anomaly_label!r}, "
                    f"got {label_value!r}"
                )
            label = int(label_value == params.anomaly_label)
            image = root / row["image"].strip()
            if not image.is_file():
                raise LayoutError(f"{where}: image {image} is missing")
            mask_name = (row["mask"] or "").strip()
            mask = root / mask_name if mask_name else None
            if label and mask is None:
                raise MaskError(f"{image}: anomalous image has no mask in {where}")
            if mask is not None and not mask.is_file():
                raise MaskError(f"{image}: its mask {mask} (named in {where}) is missing")
            samples.append(
                RawSample(
                    image,
                    mask if label else None,
                    label,
                    row["object"].strip(),
                    "anomaly" if label else "good",
                    split,
                    image.stem,
                )
            )
    return Conversion(samples)


@dataclass(frozen=True)
class ImagesAndMasksParams:
    """`images_and_masks`: image folders with a mask folder beside them.

    Attributes:
        class_name: class written into every record ("colon", "skin", "thyroid").
        image_dirs: image folders relative to the root (globs allowed: "*" = every folder).
        exclude_dirs: folders matched by `image_dirs` that are not image folders (the mask folder).
        normal_dirs: image folders of normal images (no mask); every other image folder is anomalous.
        mask_dir: the mask folder relative to the root.
        mask_patterns: mask file name patterns tried in order; `{stem}` is the image stem.
        defect: defect name of anomalous images; None = the image folder's name.
        split: split of every record.
    """

    class_name: str
    image_dirs: tuple[str, ...] = ("images",)
    exclude_dirs: tuple[str, ...] = ("masks",)
    normal_dirs: tuple[str, ...] = ()
    mask_dir: str = "masks"
    mask_patterns: tuple[str, ...] = ("{stem}.*",)
    defect: str | None = "anomaly"
    split: str = "test"


@register_converter("images_and_masks", ImagesAndMasksParams)
def convert_images_and_masks(root: Path, params: ImagesAndMasksParams, dataset: str) -> Conversion:
    folders: list[Path] = []
    for pattern in params.image_dirs:
        matched = sorted(p for p in root.glob(pattern) if p.is_dir() and not p.name.startswith("."))
        matched = [p for p in matched if not any(fnmatch.fnmatch(p.name, x) for x in params.exclude_dirs)]
        if not matched:
            raise LayoutError(f"{root}: no image folder matches {pattern!r}")
        folders += [p for p in matched if p not in folders]
    mask_dir = root / params.mask_dir
    used: set[Path] = set()
    samples = []
    for folder in folders:
        normal = folder.name in params.normal_dirs
        for image in images_in(folder, "image"):
            if normal:
                samples.append(RawSample(image, None, 0, params.class_name, "good", params.split, image.stem))
                continue
            mask = find_mask(image, mask_dir, params.mask_patterns)
            used.add(mask)
            defect = params.defect if params.defect is not None else folder.name
            samples.append(RawSample(image, mask, 1, params.class_name, defect, params.split, image.stem))
    check_no_orphan_masks(mask_dir, used)
    return Conversion(samples)


@dataclass(frozen=True)
class ClassFoldersParams:
    """`class_folders`: one folder of images per label; every folder must be listed.

    Attributes:
        class_name: class written into every record ("brain", "chest").
        normal_dirs: folders of normal images.
        anomalous_dirs: folders of anomalous images (defect = folder name).
        ignore_dirs: folders deliberately left out (reported, never counted).
        image_subdir: images lie in `<folder>/<image_subdir>/` ("images" in the current COVID-19 release).
        split: split of every record.
    """

    class_name: str
    normal_dirs: tuple[str, ...]
    anomalous_dirs: tuple[str, ...]
    ignore_dirs: tuple[str, ...] = ()
    image_subdir: str = ""
    split: str = "test"


@register_converter("class_folders", ClassFoldersParams)
def convert_class_folders(root: Path, params: ClassFoldersParams, dataset: str) -> Conversion:
    listed = (*params.normal_dirs, *params.anomalous_dirs, *params.ignore_dirs)
    entries = visible_entries(root)
    unknown = [p.name for p in entries if p.is_dir() and p.name not in listed]
    stray = [p.name for p in entries if p.is_file() and is_image_file(p)]
    if unknown or stray:
        raise LayoutError(
            f"{root}: folder(s) {unknown} / image file(s) {stray[:5]} are not listed in the "
            f"manifest (normal {list(params.normal_dirs)}, anomalous {list(params.anomalous_dirs)}, "
            f"ignored {list(params.ignore_dirs)})"
        )
    samples, notes = [], []
    for name in params.ignore_dirs:
        if (root / name).is_dir():
            count = sum(1 for p in (root / name).rglob("*") if p.is_file())
            notes.append(f"ignored folder {root / name} ({count} files), as the manifest says")
    for name in (*params.normal_dirs, *params.anomalous_dirs):
        label = int(name in params.anomalous_dirs)
        folder = root / name / params.image_subdir if params.image_subdir else root / name
        for image in images_in(folder, "image"):
            samples.append(
                RawSample(
                    image, None, label, params.class_name, name if label else "good", params.split, image.stem
                )
            )
    return Conversion(samples, notes)


@dataclass(frozen=True)
class LabelsTableParams:
    """`labels_table`: images named by a table of labels (HeadCT `labels.csv`, ELPV `labels.csv`).

    Attributes:
        table: the table file relative to the root.
        class_name: class written into every record.
        image_template: image path relative to the root, formatted with the row (`head_ct/{id:03d}.png`).
        normal_when / anomalous_when: column -> value a row must have to be normal / anomalous; rows
            matching neither are left out and reported.
        delimiter: "," or "whitespace".
        columns: column names when the table has no header row (None: the first row is the header).
        defect_column: column giving the defect name of anomalous rows; None uses `defect`.
        defect: defect name of anomalous rows when `defect_column` is None.
        split: split of every record.
    """

    table: str
    class_name: str
    image_template: str
    normal_when: dict[str, Any]
    anomalous_when: dict[str, Any]
    delimiter: str = ","
    columns: tuple[str, ...] | None = None
    defect_column: str | None = None
    defect: str = "anomaly"
    split: str = "test"


@register_converter("labels_table", LabelsTableParams)
def convert_labels_table(root: Path, params: LabelsTableParams, dataset: str) -> Conversion:
    table = root / params.table
    if not table.is_file():
        raise LayoutError(f"{table}: label table is missing")
    lines = [line for line in table.read_text().splitlines() if line.strip()]
    split_line = (
        (lambda s: s.split())
        if params.delimiter == "whitespace"
        else (lambda s: next(csv.reader([s], delimiter=params.delimiter)))
    )
    if params.columns is None:
        columns, body, first = [c.strip() for c in split_line(lines[0])], lines[1:], 2
    else:
        columns, body, first = list(params.columns), lines, 1
    for rule in (params.normal_when, params.anomalous_when):
        if set(rule) - set(columns):
            raise LayoutError(
                f"{table}: columns {sorted(set(rule) - set(columns))} not in the table {columns}"
            )
    samples, dropped = [], 0
    for line_number, line in enumerate(body, start=first):
        cells = split_line(line)
        if len(cells) != len(columns):
            raise LayoutError(
                f"{table}:{line_number}: {len(cells)} cells, expected {len(columns)} ({columns})"
            )
        row = {c: parse_cell(v) for c, v in zip(columns, cells, strict=True)}
        normal = all(row[k] == v for k, v in params.normal_when.items())
        anomalous = all(row[k] == v for k, v in params.anomalous_when.items())
        if normal == anomalous:
            if normal:
                raise LayoutError(f"{table}:{line_number}: row matches both normal_when and anomalous_when")
            dropped += 1
            continue
        image = root / params.image_template.format(**row)
        if not image.is_file():
            raise LayoutError(f"{table}:{line_number}: image {image} is missing")
        defect = (
            "good" if normal else str(row[params.defect_column]) if params.defect_column else params.defect
        )
        samples.append(
            RawSample(image, None, int(anomalous), params.class_name, defect, params.split, image.stem)
        )
    notes = (
        [
            f"{table}: left out {dropped} row(s) matching neither normal_when {params.normal_when} nor "
            f"anomalous_when {params.anomalous_when}"
        ]
        if dropped
        else []
    )
    return Conversion(samples, notes)


@dataclass(frozen=True)
class SddKosParams:
    """`sdd_kos`: KolektorSDD, `kosNN/PartK.jpg` with the defect mask `kosNN/PartK_label.bmp`.

    An image (or crop) is anomalous when its mask has a non-zero pixel. With `crops=3` every image is cut
    into three vertical thirds at rows `h//3` and `2*h//3`, as DRA's/InCTRL's `convert_SDD.py` does.

    Attributes:
        class_name: class written into every record.
        crops: 1 (whole images) or the number of vertical parts.
        image_suffix / label_suffix: image extension and mask suffix.
        split: split of every record.
    """

    class_name: str = "electrical commutators"
    crops: int = 1
    image_suffix: str = ".jpg"
    label_suffix: str = "_label.bmp"
    split: str = "test"


@register_converter("sdd_kos", SddKosParams)
def convert_sdd_kos(root: Path, params: SddKosParams, dataset: str) -> Conversion:
    folders = [p for p in visible_entries(root) if p.is_dir()]
    if not folders:
        raise LayoutError(f"{root}: no kosNN folders (expected kosNN/PartK{params.image_suffix})")
    samples = []
    for folder in folders:
        entries = visible_entries(folder)
        images = [p for p in entries if p.name.lower().endswith(params.image_suffix)]
        stray = [p for p in entries if p not in images and not p.name.endswith(params.label_suffix)]
        if stray:
            raise LayoutError(
                f"{stray[0]}: unexpected entry in {folder}; expected only "
                f"PartK{params.image_suffix} images and PartK{params.label_suffix} masks"
            )
        if not images:
            raise LayoutError(f"{folder}: no *{params.image_suffix} images")
        for image in images:
            label_file = folder / (image.stem + params.label_suffix)
            if not label_file.is_file():
                raise MaskError(f"{image}: image has no label mask; expected {label_file}")
            width, height = image_size(image)
            label_size = image_size(label_file, "mask")
            if label_size != (width, height):
                raise MaskError(
                    f"{label_file}: size {label_size} differs from its image {image} ({width}, {height})"
                )
            bounds = [height * i // params.crops for i in range(params.crops + 1)]
            for i in range(params.crops):
                box = None if params.crops == 1 else (0, bounds[i], width, bounds[i + 1])
                key = f"{folder.name}_{image.stem}" + ("" if params.crops == 1 else f"_{i}")
                anomalous = not mask_is_empty(label_file, box)
                samples.append(
                    RawSample(
                        image,
                        label_file if anomalous else None,
                        int(anomalous),
                        params.class_name,
                        "defect" if anomalous else "good",
                        params.split,
                        key,
                        crop=box,
                    )
                )
    return Conversion(samples)


@dataclass(frozen=True)
class DagmParams:
    """`dagm`: DAGM 2007 (Kaggle upload), `ClassN/{Train,Test}/*.PNG` with `Label/<stem>_label.PNG`.

    With `anomalous_by="label_files"` (AnomalyCLIP's `DAGM.py`) an image is anomalous when a weak
    (ellipse) mask `Label/<stem><label_suffix>.PNG` exists. With `"labels_txt"` the flag column of
    `Label/Labels.txt` decides; each of its lines after the first reads `<id> <flag> <image> 0 [<mask>]`
    and every image of the folder must be listed.

    Attributes:
        split_dirs: raw split folder -> split.
        label_dir: folder of the masks (and of Labels.txt) inside a split folder.
        label_suffix: mask stem = image stem + suffix.
        anomalous_by: "label_files" or "labels_txt".
        defect: defect name of anomalous images.
    """

    split_dirs: dict[str, str] = field(default_factory=lambda: {"Train": "train", "Test": "test"})
    label_dir: str = "Label"
    label_suffix: str = "_label"
    anomalous_by: str = "label_files"
    defect: str = "defect"


def _dagm_from_label_files(split_dir: Path, images: dict[str, Path], params: DagmParams) -> dict[str, Path]:
    """image name -> mask, from the mask files of `Label/`."""
    label_dir = split_dir / params.label_dir
    if not label_dir.is_dir():
        return {}
    by_stem = {path.stem: name for name, path in images.items()}
    masks = {}
    for mask in [p for p in visible_entries(label_dir) if is_image_file(p)]:
        stem = mask.stem.removesuffix(params.label_suffix)
        if stem == mask.stem or stem not in by_stem:
            raise MaskError(
                f"{mask}: mask matches no image {split_dir}/{stem}.* "
                f"(expected <image stem>{params.label_suffix}.*)"
            )
        masks[by_stem[stem]] = mask
    return masks


def _dagm_from_labels_txt(split_dir: Path, images: dict[str, Path], params: DagmParams) -> dict[str, Path]:
    """image name -> mask, from the flag column of `Label/Labels.txt`."""
    labels = split_dir / params.label_dir / "Labels.txt"
    if not labels.is_file():
        raise LayoutError(f"{labels}: DAGM label list is missing")
    masks, listed = {}, set()
    for line_number, line in enumerate(labels.read_text().splitlines(), start=1):
        cells = line.split()
        if line_number == 1 or not cells:
            continue
        if len(cells) < 4 or cells[1] not in ("0", "1"):
            raise LayoutError(
                f"{labels}:{line_number}: expected '<id> <0|1> <image> 0 [<mask>]', got {line!r}"
            )
        if cells[2] not in images:
            raise LayoutError(f"{labels}:{line_number}: image {split_dir / cells[2]} is missing")
        listed.add(cells[2])
        if cells[1] == "1":
            mask = labels.parent / cells[4] if len(cells) > 4 else None
            if mask is None or not mask.is_file():
                raise MaskError(
                    f"{images[cells[2]]}: anomalous image has no mask; expected the file named in "
                    f"{labels}:{line_number}"
                )
            masks[cells[2]] = mask
    unlisted = sorted(set(images) - listed)
    if unlisted:
        raise LayoutError(
            f"{split_dir / unlisted[0]}: image not listed in {labels} ({len(unlisted)} unlisted)"
        )
    return masks


@register_converter("dagm", DagmParams)
def convert_dagm(root: Path, params: DagmParams, dataset: str) -> Conversion:
    readers = {"label_files": _dagm_from_label_files, "labels_txt": _dagm_from_labels_txt}
    if params.anomalous_by not in readers:
        raise LayoutError(f"dagm: anomalous_by must be one of {sorted(readers)}, got {params.anomalous_by!r}")
    classes = [p for p in visible_entries(root) if p.is_dir()]
    samples = []
    for class_dir in classes:
        for raw_split, split in params.split_dirs.items():
            split_dir = class_dir / raw_split
            if not split_dir.is_dir():
                raise LayoutError(f"{split_dir}: DAGM split folder is missing")
            images = {p.name: p for p in visible_entries(split_dir) if p.is_file() and is_image_file(p)}
            if not images:
                raise LayoutError(f"{split_dir}: no images")
            masks = readers[params.anomalous_by](split_dir, images, params)
            for name, image in images.items():
                mask = masks.get(name)
                samples.append(
                    RawSample(
                        image,
                        mask,
                        int(mask is not None),
                        class_dir.name,
                        "good" if mask is None else params.defect,
                        split,
                        image.stem,
                    )
                )
    if not samples:
        raise LayoutError(f"{root}: no DAGM class folders (expected ClassN/Train and ClassN/Test)")
    return Conversion(samples)


@dataclass(frozen=True)
class AitexParams:
    """`aitex`: AITEX fabric images (4096x256) tiled into squares, as InCTRL's `convert_AITEX.py` does.

    Normal images are cut into `ceil(width / tile)` tiles; a defective image's tiles are anomalous when
    their part of the mask is non-empty and are left out (reported) otherwise. The defect type is the
    second `_`-field of the file name (`0001_002_00.png` -> code "002").

    Attributes:
        class_name: class written into every record.
        tile: tile width in pixels.
        normal_dir / defect_dir / mask_dir: folders relative to the root.
        mask_suffix: mask stem = image stem + suffix.
        defect_codes: code -> defect name.
    """

    defect_codes: dict[str, str]
    class_name: str = "fabric"
    tile: int = 256
    normal_dir: str = "NODefect_images"
    defect_dir: str = "Defect_images"
    mask_dir: str = "Mask_images"
    mask_suffix: str = "_mask"


def _tiles(width: int, height: int, tile: int) -> list[Box]:
    return [(i * tile, 0, min((i + 1) * tile, width), height) for i in range(math.ceil(width / tile))]


@register_converter("aitex", AitexParams)
def convert_aitex(root: Path, params: AitexParams, dataset: str) -> Conversion:
    samples = []
    normal_root = root / params.normal_dir
    fabrics = [p for p in visible_entries(normal_root) if p.is_dir()] if normal_root.is_dir() else []
    if not fabrics:
        raise LayoutError(f"{normal_root}: expected one folder of defect-free images per fabric")
    for fabric in fabrics:
        for image in images_in(fabric, "normal image"):
            for i, box in enumerate(_tiles(*image_size(image), params.tile)):
                samples.append(
                    RawSample(
                        image,
                        None,
                        0,
                        params.class_name,
                        "good",
                        "test",
                        f"{fabric.name}_{image.stem}_{i}",
                        crop=box,
                    )
                )
    dropped = 0
    mask_dir = root / params.mask_dir
    for image in images_in(root / params.defect_dir, "defect image"):
        parts = image.stem.split("_")
        if len(parts) < 2 or parts[1] not in params.defect_codes:
            raise LayoutError(
                f"{image}: defect code {parts[1] if len(parts) > 1 else '?'!r} is not one of "
                f"{sorted(params.defect_codes)}"
            )
        mask = find_mask(image, mask_dir, (f"{image.stem}{params.mask_suffix}.png",))
        for i, box in enumerate(_tiles(*image_size(image), params.tile)):
            if mask_is_empty(mask, box):
                dropped += 1
                continue
            samples.append(
                RawSample(
                    image,
                    mask,
                    1,
                    params.class_name,
                    params.defect_codes[parts[1]],
                    "test",
                    f"{image.stem}_{i}",
                    crop=box,
                )
            )
    notes = [f"left out {dropped} tile(s) of defective images whose mask part is empty"] if dropped else []
    return Conversion(samples, notes)


@dataclass(frozen=True)
class LabelledFoldersParams:
    """`labelled_folders`: `<split folder>/<class>/*` images of semantic classes (all label 0).

    A protocol with `select: {one_vs_all: true}` turns them into one-vs-all anomaly detection tasks.

    Attributes:
        split_dirs: raw split folder -> split ("testing" -> "test").
    """

    split_dirs: dict[str, str] = field(default_factory=lambda: {"train": "train", "test": "test"})


@register_converter("labelled_folders", LabelledFoldersParams)
def convert_labelled_folders(root: Path, params: LabelledFoldersParams, dataset: str) -> Conversion:
    samples = []
    for raw_split, split in params.split_dirs.items():
        split_dir = root / raw_split
        classes = [p for p in visible_entries(split_dir) if p.is_dir()] if split_dir.is_dir() else []
        if not classes:
            raise LayoutError(f"{split_dir}: expected one folder of images per class")
        for class_dir in classes:
            for image in images_in(class_dir, "class"):
                samples.append(RawSample(image, None, 0, class_dir.name, "good", split, image.stem))
    return Conversion(samples)


@dataclass(frozen=True)
class BmadParams:
    """`bmad`: BMAD, `<split>/{good,Ungood}/img/*` with masks `<split>/Ungood/label/<stem>.*`.

    The masks of normal images (all zero) are not used.

    Attributes:
        class_name: class written into every record ("brain", "liver", "retina").
        splits: raw split folder -> split.
        normal_dir / anomalous_dir / image_dir / mask_dir: folder names.
    """

    class_name: str
    splits: dict[str, str] = field(default_factory=lambda: {"test": "test"})
    normal_dir: str = "good"
    anomalous_dir: str = "Ungood"
    image_dir: str = "img"
    mask_dir: str = "label"


@register_converter("bmad", BmadParams)
def convert_bmad(root: Path, params: BmadParams, dataset: str) -> Conversion:
    samples = []
    for raw_split, split in params.splits.items():
        for folder, label in ((params.normal_dir, 0), (params.anomalous_dir, 1)):
            base = root / raw_split / folder
            mask_dir = base / params.mask_dir
            used: set[Path] = set()
            for image in images_in(base / params.image_dir, "image"):
                mask = find_mask(image, mask_dir, ("{stem}.*",)) if label else None
                if mask is not None:
                    used.add(mask)
                samples.append(
                    RawSample(
                        image,
                        mask,
                        label,
                        params.class_name,
                        "anomaly" if label else "good",
                        split,
                        image.stem,
                    )
                )
            if label:
                check_no_orphan_masks(mask_dir, used)
    return Conversion(samples)
