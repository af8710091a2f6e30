"""Bad input gets an error naming the file or folder and what was expected; nothing is skipped."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from zsadkit.data.dataset import AnomalyDataset
from zsadkit.data.errors import DataError, ImageReadError, LayoutError, MaskError
from zsadkit.data.images import read_image
from zsadkit.data.mvtec import read_mvtec
from zsadkit.data.records import Sample


def _png(path: Path, value: int = 128, size: tuple[int, int] = (8, 8), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value,) * 3).save(path)
    return path


def _noisy_png(path: Path, size: int = 64) -> Path:
    """An incompressible PNG, so that cutting the file removes image rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _mvtec(root: Path) -> Path:
    _png(root / "bottle" / "test" / "good" / "000.png")
    _png(root / "bottle" / "test" / "crack" / "000.png")
    _png(root / "bottle" / "ground_truth" / "crack" / "000_mask.png", 255, mode="L")
    return root


def _named(path: Path) -> str:
    return re.escape(str(path))


# --- unreadable or truncated images ----------------------------------------------------------------------


def test_truncated_png_raises_naming_the_file(tmp_path: Path) -> None:
    path = _noisy_png(tmp_path / "cut.png")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageReadError, match=_named(path) + ".*cannot read image.*expected a complete"):
        read_image(path)


def test_truncated_png_raises_even_when_pillow_is_told_to_accept_truncation(
    tmp_path: Path, monkeypatch
) -> None:
    path = _noisy_png(tmp_path / "cut.png")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with Image.open(path) as padded:  # Pillow alone pads the missing rows silently
        padded.load()
    with pytest.raises(ImageReadError, match=_named(path)):
        read_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_file_that_is_not_an_image_raises_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "000.png"
    path.write_text("not a png")
    with pytest.raises(ImageReadError, match=_named(path) + ".*cannot read image"):
        read_image(path)


def test_missing_image_file_raises_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match=_named(tmp_path / "gone.png") + ": image file is missing"):
        read_image(tmp_path / "gone.png")


def test_dataset_raises_on_a_truncated_image_instead_of_padding_it(tmp_path: Path) -> None:
    path = _noisy_png(tmp_path / "x.png")
    path.write_bytes(path.read_bytes()[:-200])
    dataset = AnomalyDataset([Sample(str(path), None, 0, "c", "good", "d", "test")], image_size=16)
    with pytest.raises(ImageReadError, match=_named(path)):
        dataset[0]


def test_dataset_raises_on_an_unreadable_mask_naming_it(tmp_path: Path) -> None:
    image = _png(tmp_path / "x.png")
    mask = tmp_path / "x_mask.png"
    mask.write_bytes(b"\x89PNG garbage")
    dataset = AnomalyDataset([Sample(str(image), str(mask), 1, "c", "hole", "d", "test")], image_size=16)
    with pytest.raises(ImageReadError, match=_named(mask) + ".*cannot read mask"):
        dataset[0]


# --- masks -----------------------------------------------------------------------------------------------


def test_missing_mask_for_an_anomalous_image_raises_naming_image_and_expected_mask(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    (root / "bottle" / "ground_truth" / "crack" / "000_mask.png").unlink()
    image = (root / "bottle" / "test" / "crack" / "000.png").resolve()
    expected = (root / "bottle" / "ground_truth" / "crack").resolve() / "000_mask.png"
    with pytest.raises(
        MaskError, match=_named(image) + ": anomalous image has no mask; expected " + _named(expected)
    ):
        read_mvtec(root)


def test_missing_ground_truth_folder_of_one_defect_is_an_error(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    _png(root / "bottle" / "test" / "hole" / "000.png")
    with pytest.raises(MaskError, match=r"hole/000\.png: anomalous image has no mask"):
        read_mvtec(root)


def test_mask_without_an_image_is_an_error(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    orphan = _png(root / "bottle" / "ground_truth" / "crack" / "007_mask.png", 255, mode="L").resolve()
    with pytest.raises(MaskError, match=_named(orphan) + ": mask has no image"):
        read_mvtec(root)


def test_mask_folder_without_an_image_folder_is_an_error(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    folder = _png(root / "bottle" / "ground_truth" / "cut" / "000_mask.png", 255, mode="L").parent.resolve()
    with pytest.raises(MaskError, match=_named(folder) + ": mask folder has no matching image folder"):
        read_mvtec(root)


def test_anomalous_record_without_mask_in_a_dataset_with_masks_is_rejected(tmp_path: Path) -> None:
    image = _png(tmp_path / "a.png")
    mask = _png(tmp_path / "a_mask.png", 255, mode="L")
    samples = [
        Sample(str(image), str(mask), 1, "c", "hole", "d", "test"),
        Sample(str(tmp_path / "b.png"), None, 1, "c", "hole", "d", "test"),
    ]
    with pytest.raises(
        MaskError, match=_named(tmp_path / "b.png") + ": anomalous image of dataset 'd' has no mask"
    ):
        AnomalyDataset(samples, image_size=8)


def test_mask_of_another_size_than_its_image_raises_naming_both(tmp_path: Path) -> None:
    image = _png(tmp_path / "a.png", size=(10, 8))
    mask = _png(tmp_path / "a_mask.png", 255, size=(8, 10), mode="L")
    dataset = AnomalyDataset([Sample(str(image), str(mask), 1, "c", "hole", "d", "test")], image_size=8)
    with pytest.raises(
        MaskError,
        match=_named(mask)
        + r": mask is 8x10 \(WxH\) but its image "
        + _named(image)
        + " is 10x8; expected the same size",
    ):
        dataset[0]


# --- layouts ---------------------------------------------------------------------------------------------


def test_root_that_is_not_mvtec_like_says_what_was_expected(tmp_path: Path) -> None:
    _png(tmp_path / "images" / "0.png")
    with pytest.raises(
        LayoutError,
        match=_named(tmp_path.resolve())
        + r": unknown layout.*"
        + r"expected the MVTec layout .*/<class>/test/<defect>/\*\.png",
    ):
        read_mvtec(tmp_path)


def test_class_folder_given_as_root_gets_a_hint(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    with pytest.raises(LayoutError, match="looks like a single class folder"):
        read_mvtec(root / "bottle")


def test_missing_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match=_named(tmp_path / "nowhere") + ": dataset root folder is missing"):
        read_mvtec(tmp_path / "nowhere")


def test_empty_class_folder_is_an_error(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    (root / "screw" / "test").mkdir(parents=True)
    with pytest.raises(
        LayoutError,
        match=_named((root / "screw" / "test").resolve()) + ": empty, class 'screw' has no test images",
    ):
        read_mvtec(root)


def test_class_folder_without_train_or_test_is_an_error_not_skipped(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    (root / "empty_class").mkdir()
    (root / "loose_images").mkdir()
    (root / "loose_images" / "000.png").write_bytes(b"")
    with pytest.raises(LayoutError, match=r"folder\(s\) \['empty_class', 'loose_images'\] hold no train/"):
        read_mvtec(root)


def test_empty_defect_folder_is_an_error(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    (root / "bottle" / "test" / "hole").mkdir()
    with pytest.raises(
        LayoutError,
        match=_named((root / "bottle" / "test" / "hole").resolve()) + ": folder contains no images",
    ):
        read_mvtec(root)


def test_missing_split_folder_is_an_error(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    with pytest.raises(LayoutError, match=_named((root / "bottle" / "train").resolve()) + " is missing"):
        read_mvtec(root, splits=("train", "test"))


def test_requested_class_that_does_not_exist_lists_the_available_ones(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    with pytest.raises(LayoutError, match=r"class folder\(s\) \['cable'\] missing; available: \['bottle'\]"):
        read_mvtec(root, classes=["cable"])


@pytest.mark.parametrize(
    ("stray", "kind"),
    [
        ("test/crack/notes.txt", "non-image file"),
        ("test/000.png", "file directly in"),
        ("test/crack/sub/0.png", "folder"),
    ],
)
def test_stray_entries_are_errors_not_skipped(tmp_path: Path, stray: str, kind: str) -> None:
    root = _mvtec(tmp_path)
    path = root / "bottle" / stray
    if path.suffix == ".png":
        _png(path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    with pytest.raises(LayoutError, match=kind):
        read_mvtec(root)


def test_two_images_with_the_same_stem_are_ambiguous(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    _png(root / "bottle" / "test" / "crack" / "000.jpg")
    with pytest.raises(LayoutError, match="two images with the same name"):
        read_mvtec(root)


def test_dataset_rejects_relative_paths_and_empty_sample_lists(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="relative path in a record"):
        AnomalyDataset([Sample("a.png", None, 0, "c", "good", "d", "test")], image_size=8)
    with pytest.raises(ValueError, match="list of samples is empty"):
        AnomalyDataset([], image_size=8)


def test_every_error_is_a_data_error_and_a_value_error() -> None:
    for error in (ImageReadError, MaskError, LayoutError):
        assert issubclass(error, DataError) and issubclass(error, ValueError)
