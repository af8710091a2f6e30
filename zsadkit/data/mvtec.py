"""Reader for the MVTec AD folder layout, which MPDD, BTAD, DTD-Synthetic and converted VisA copies share.

    <root>/<class>/train/<normal>/*.png
    <root>/<class>/test/<normal>/*.png
    <root>/<class>/test/<defect>/*.png
    <root>/<class>/ground_truth/<defect>/<stem><mask_suffix>.png

Masks are paired with images **by name** (image stem + `mask_suffix`, any image extension), never by
position in a sorted listing as the reference generator scripts do. BTAD uses `normal_defect="ok"` and
`mask_suffix=""`; its images may be `.bmp` while the masks are `.png`.

Nothing is skipped: a stray file, an empty folder, a missing or unmatched mask raises an error naming it
(hidden files, whose names start with ".", are ignored).

Example:
    >>> samples = read_mvtec("/data/mvtec", classes=["bottle"])  # doctest: +SKIP
    >>> samples[0].defect, samples[0].label  # doctest: +SKIP
    ('good', 0)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from zsadkit.data.errors import LayoutError, MaskError
from zsadkit.data.images import is_image_file, visible_entries
from zsadkit.data.records import SPLITS, Sample

__all__ = [
    "CLASS_MARKERS",
    "read_mvtec",
]

CLASS_MARKERS = ("train", "test", "ground_truth")


def _expected_layout(root: Path, normal_defect: str, mask_suffix: str) -> str:
    return (
        f"expected the MVTec layout {root}/<class>/test/<defect>/*.png ({normal_defect!r} = normal) with "
        f"masks {root}/<class>/ground_truth/<defect>/<stem>{mask_suffix}.png"
    )


def _class_dirs(root: Path, classes: Sequence[str] | None, layout: str) -> list[Path]:
    if classes is not None:
        if isinstance(classes, str):
            raise TypeError(f"classes must be a sequence of class names, got the string {classes!r}")
        missing = [name for name in classes if not (root / name).is_dir()]
        if missing:
            available = [p.name for p in visible_entries(root) if p.is_dir()]
            raise LayoutError(f"{root}: class folder(s) {missing} missing; available: {available}; {layout}")
        return [root / name for name in classes]
    folders = [p for p in visible_entries(root) if p.is_dir()]
    class_dirs = [p for p in folders if any((p / marker).is_dir() for marker in CLASS_MARKERS)]
    if class_dirs and len(class_dirs) < len(folders):
        strays = [p.name for p in folders if p not in class_dirs]
        raise LayoutError(
            f"{root}: folder(s) {strays} hold no train/, test/ or ground_truth/ (an empty class, or not a "
            f"class folder: move it out of the dataset root); {layout}"
        )
    if not class_dirs:
        hint = ""
        if any((root / marker).is_dir() for marker in CLASS_MARKERS):
            hint = f" ({root} looks like a single class folder: pass its parent as root)"
        entries = [p.name for p in visible_entries(root)][:10]
        raise LayoutError(
            f"{root}: unknown layout, no class folder containing train/ or test/ found "
            f"(entries: {entries}){hint}; {layout}"
        )
    return class_dirs


def _images_in(folder: Path, layout: str, allow_empty: bool = False) -> list[Path]:
    """Image files of a defect or mask folder; anything else that is visible is an error."""
    images = []
    for entry in visible_entries(folder):
        if entry.is_dir() or not is_image_file(entry):
            kind = "folder" if entry.is_dir() else "non-image file"
            raise LayoutError(f"{entry}: unexpected {kind} in {folder}; {layout}")
        images.append(entry)
    if not images and not allow_empty:
        raise LayoutError(f"{folder}: folder contains no images; {layout}")
    stems: dict[str, Path] = {}
    for image in images:
        if image.stem in stems:
            raise LayoutError(
                f"{image} and {stems[image.stem]}: two images with the same name; "
                "pairing with masks by name would be ambiguous"
            )
        stems[image.stem] = image
    return images


def _masks_by_stem(mask_dir: Path, layout: str) -> dict[str, Path]:
    if not mask_dir.is_dir():
        return {}
    masks: dict[str, Path] = {}
    for mask in _images_in(mask_dir, layout, allow_empty=True):  # an empty folder: the missing mask is named
        masks[mask.stem] = mask
    return masks


def _read_class(
    class_dir: Path,
    *,
    dataset: str,
    splits: Sequence[str],
    normal_defect: str,
    mask_suffix: str,
    require_masks: bool,
    layout: str,
) -> list[Sample]:
    ground_truth = class_dir / "ground_truth"
    samples: list[Sample] = []
    anomalous_defects: set[str] = set()
    for split in splits:
        split_dir = class_dir / split
        if not split_dir.is_dir():
            raise LayoutError(f"{split_dir} is missing; {layout}")
        defect_dirs = visible_entries(split_dir)
        for entry in defect_dirs:
            if not entry.is_dir():
                raise LayoutError(
                    f"{entry}: file directly in {split_dir}, expected {split_dir}/<defect>/*; {layout}"
                )
        if not defect_dirs:
            raise LayoutError(f"{split_dir}: empty, class {class_dir.name!r} has no {split} images; {layout}")
        # normal images first, then the defect types in alphabetical order
        defect_dirs.sort(key=lambda d: (d.name != normal_defect, d.name))
        for defect_dir in defect_dirs:
            defect = defect_dir.name
            label = int(defect != normal_defect)
            images = _images_in(defect_dir, layout)
            if not label:
                samples += [Sample(str(p), None, 0, class_dir.name, defect, dataset, split) for p in images]
                continue
            anomalous_defects.add(defect)
            if not ground_truth.is_dir() and not require_masks:
                samples += [Sample(str(p), None, 1, class_dir.name, defect, dataset, split) for p in images]
                continue
            masks = _masks_by_stem(ground_truth / defect, layout)
            hint = (
                ""
                if ground_truth.is_dir()
                else "; pass require_masks=False for a dataset without pixel masks"
            )
            for image in images:
                mask = masks.pop(image.stem + mask_suffix, None)
                if mask is None:
                    raise MaskError(
                        f"{image}: anomalous image has no mask; expected "
                        f"{ground_truth / defect}/{image.stem}{mask_suffix}.png (any image extension){hint}"
                    )
                samples.append(Sample(str(image), str(mask), 1, class_dir.name, defect, dataset, split))
            if masks:
                orphan = sorted(masks.values())[0]
                raise MaskError(
                    f"{orphan}: mask has no image {defect_dir}/{orphan.stem.removesuffix(mask_suffix)}.*"
                    f" ({len(masks)} unmatched mask(s) in {ground_truth / defect}; mask_suffix={mask_suffix!r})"
                )
    if "test" in splits and ground_truth.is_dir():
        for mask_dir in visible_entries(ground_truth):
            if mask_dir.name not in anomalous_defects and mask_dir.name != normal_defect:
                raise MaskError(
                    f"{mask_dir}: mask folder has no matching image folder "
                    f"{class_dir}/test/{mask_dir.name}; {layout}"
                )
    return samples


def read_mvtec(
    root: str | Path,
    *,
    dataset: str = "mvtec",
    classes: Sequence[str] | None = None,
    splits: Sequence[str] = ("test",),
    normal_defect: str = "good",
    mask_suffix: str = "_mask",
    require_masks: bool = True,
) -> list[Sample]:
    """Read an MVTec-layout dataset into records with absolute paths.

    Args:
        root: the folder holding one sub-folder per class.
        dataset: name written into every record.
        classes: class folders to read, in this order; None reads every folder of `root` that contains
            train/, test/ or ground_truth/, alphabetically.
        splits: "train" and/or "test".
        normal_defect: name of the folder of normal images ("good"; "ok" for BTAD).
        mask_suffix: mask file name = image stem + suffix ("_mask" for MVTec, "" for BTAD).
        require_masks: when False, a class without a ground_truth/ folder is read image-level only
            (mask None for its anomalous images). A class that has ground_truth/ must always have every mask.

    Returns:
        Records ordered by class, split, defect (normal first, then alphabetical), file name.

    Raises:
        LayoutError: root not MVTec-like, missing split folder, empty class or folder, stray files.
        MaskError: missing mask for an anomalous image, or a mask without an image.
    """
    root = Path(root).expanduser().resolve()
    layout = _expected_layout(root, normal_defect, mask_suffix)
    if not root.is_dir():
        raise LayoutError(f"{root}: dataset root folder is missing; {layout}")
    if isinstance(splits, str) or not splits or any(split not in SPLITS for split in splits):
        raise ValueError(f"splits must be a non-empty sequence drawn from {SPLITS}, got {splits!r}")
    samples: list[Sample] = []
    for class_dir in _class_dirs(root, classes, layout):
        samples += _read_class(
            class_dir,
            dataset=dataset,
            splits=splits,
            normal_defect=normal_defect,
            mask_suffix=mask_suffix,
            require_masks=require_masks,
            layout=layout,
        )
    return samples
