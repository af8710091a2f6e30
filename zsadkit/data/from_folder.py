"""A user's own images as a manifest: `zsadkit data from-folder DIR --out manifest.csv`.

    DIR/good/*.png            normal images
    DIR/bad/*.png             anomalous images (defect "bad"), or DIR/bad/<defect>/*.png
    DIR/masks/<stem>.png      optional pixel masks, matched to anomalous images by stem
                              (`<stem>.*` or `<stem>_mask.*`)

A folder with good/ only is a reference set (normal images for few-shot methods, or the normals that a
target false-positive rate is calibrated on): its records are normal and of split "train".

The class name of every record (the word that fills "[cls]" in the prompts, "a photo of a normal [cls]") is
the folder's name unless `class_name` (`--class-name`) sets it; underscores are read as spaces by most
methods ("metal_nut" → "metal nut"). Every image (and mask) is fully decoded: a truncated file, or one that is
not an image behind an image extension, is an error naming it, so it cannot abort a run later.

Without masks/ the manifest is image-level only (`mask` empty). With masks/ every anomalous image needs
a mask, as `AnomalyDataset` expects (a dataset has masks for all its anomalous images or for none), unless
`image_level_only` writes no masks at all. A mask whose stem matches no anomalous image, two masks for
one image, or a sub-folder of DIR other than good/, bad/ and masks/ is an error. Paths are written
relative to `root` (default: DIR itself), so `read_manifest(out, root=DIR)` gives absolute paths back.

Example:
    >>> samples = manifest_from_folder("my_parts", "my_parts/manifest.csv")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from zsadkit.data.errors import ImageReadError, LayoutError, MaskError
from zsadkit.data.images import read_image, visible_entries
from zsadkit.data.layouts import images_in
from zsadkit.data.records import Sample, write_manifest

__all__ = [
    "ANOMALOUS_DIR",
    "KNOWN_DIRS",
    "MASK_DIR",
    "NORMAL_DIR",
    "manifest_from_folder",
]

NORMAL_DIR, ANOMALOUS_DIR, MASK_DIR = "good", "bad", "masks"
KNOWN_DIRS = (NORMAL_DIR, ANOMALOUS_DIR, MASK_DIR)


def _anomalous_images(bad: Path) -> list[tuple[Path, str]]:
    entries = visible_entries(bad)
    if any(p.is_dir() for p in entries):
        if any(p.is_file() for p in entries):
            raise LayoutError(f"{bad}: mixes image files and defect folders; use one or the other")
        return [(image, folder.name) for folder in entries for image in images_in(folder, "anomalous image")]
    return [(image, "bad") for image in images_in(bad, "anomalous image")]


def _masks_by_stem(mask_dir: Path) -> dict[str, Path]:
    masks: dict[str, Path] = {}
    for mask in images_in(mask_dir, "mask"):
        stem = mask.stem.removesuffix("_mask")
        if stem in masks:
            raise MaskError(f"{mask} and {masks[stem]}: two masks for the image stem {stem!r}")
        masks[stem] = mask
    return masks


def _check_decodable(paths: list[Path]) -> None:
    """Decode every file; raise one `ImageReadError` naming each one that cannot be read."""
    failures = []
    for path in paths:
        try:
            read_image(path)
        except ImageReadError as err:
            failures.append(str(err))
    if failures:
        raise ImageReadError(f"{len(failures)} unreadable file(s); fix or remove them: " + " | ".join(failures))


def manifest_from_folder(
    folder: str | Path,
    out: str | Path | None = None,
    *,
    root: str | Path | None = None,
    class_name: str | None = None,
    dataset: str | None = None,
    image_level_only: bool = False,
) -> list[Sample]:
    """Build (and with `out`, write) a test manifest from good/, bad/ and optional masks/ folders, or a
    reference set (split "train", normal images only) from a folder with good/ alone.

    Args:
        folder: the folder holding good/ and bad/ (or good/ only).
        out: CSV or JSONL file to write; None only returns the records.
        root: paths are written relative to it (default: `folder`).
        class_name: the class word of every record, used in the prompts (default: the folder's name).
        dataset: dataset name of every record (default: the folder's name).
        image_level_only: ignore masks/ and write no masks (`--image-level-only`).

    Raises:
        LayoutError: good/ missing, good/ or bad/ empty, an unknown sub-folder, stray files, duplicate
            image stems, masks/ without bad/.
        MaskError: masks/ exists but an anomalous image has no mask, a mask matches no anomalous image,
            or two masks match one image.
        ImageReadError: an image or mask that cannot be decoded (truncated, not an image); every such file
            is named.
    """
    folder = Path(folder).expanduser().resolve()
    root = folder if root is None else Path(root).expanduser().resolve()
    class_name = class_name or folder.name
    dataset = dataset or folder.name
    if not (folder / NORMAL_DIR).is_dir():
        raise LayoutError(
            f"{folder / NORMAL_DIR}: folder is missing; expected {folder}/good/ (normal images) and "
            f"{folder}/bad/ (anomalous images), optional {folder}/masks/; good/ alone is a reference set"
        )
    unknown = [p.name for p in visible_entries(folder) if p.is_dir() and p.name not in KNOWN_DIRS]
    if unknown:
        raise LayoutError(
            f"{folder}: unknown sub-folder(s) {unknown}; expected only {list(KNOWN_DIRS)} (move the others out)"
        )
    reference_set = not (folder / ANOMALOUS_DIR).is_dir()
    if reference_set and (folder / MASK_DIR).is_dir() and not image_level_only:
        raise LayoutError(f"{folder / MASK_DIR}: masks without {folder / ANOMALOUS_DIR}; masks belong to bad/ images")
    anomalous = [] if reference_set else _anomalous_images(folder / ANOMALOUS_DIR)
    stems: dict[str, Path] = {}
    for image, _ in anomalous:
        if image.stem in stems:
            raise LayoutError(
                f"{image} and {stems[image.stem]}: two anomalous images with the same stem; masks "
                "are matched by stem"
            )
        stems[image.stem] = image
    has_masks = (folder / MASK_DIR).is_dir() and not image_level_only
    masks = _masks_by_stem(folder / MASK_DIR) if has_masks else {}
    orphans = sorted(set(masks) - set(stems))
    if orphans:
        raise MaskError(
            f"{masks[orphans[0]]}: mask matches no anomalous image in {folder / ANOMALOUS_DIR} "
            f"({len(orphans)} unmatched mask(s))"
        )
    unmasked = [str(image) for image, _ in anomalous if has_masks and image.stem not in masks]
    if unmasked:
        raise MaskError(
            f"{len(unmasked)} anomalous image(s) have no mask in {folder / MASK_DIR}, e.g. {unmasked[:3]}; "
            "every anomalous image needs <stem>.png or <stem>_mask.png there, or pass --image-level-only "
            "(image_level_only=True) to write no masks at all"
        )
    split = "train" if reference_set else "test"
    normal = images_in(folder / NORMAL_DIR, "normal image")
    _check_decodable([*normal, *(image for image, _ in anomalous), *masks.values()])
    samples = [Sample(str(image), None, 0, class_name, "good", dataset, split) for image in normal]
    samples += [
        Sample(
            str(image),
            None if image.stem not in masks else str(masks[image.stem]),
            1,
            class_name,
            defect,
            dataset,
            "test",
        )
        for image, defect in anomalous
    ]
    samples = [s.relative_to(root) for s in samples]
    if out is not None:
        write_manifest(samples, out)
    return samples
