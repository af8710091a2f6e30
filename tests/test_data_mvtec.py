"""The MVTec-layout reader: discovery, order, labels and pairing of masks by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from zsadkit.data.errors import MaskError
from zsadkit.data.mvtec import read_mvtec

BTAD = Path(__file__).parent / "fixtures" / "anomalyclip" / "e2e_btad_synth"


def _png(path: Path, value: int = 128, size: tuple[int, int] = (8, 8), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value,) * 3).save(path)
    return path


def _mvtec_class(root: Path, name: str = "bottle", defects: dict[str, list[str]] | None = None) -> Path:
    """<root>/<name>/train/good/000.png, test/good/000.png, test/<defect>/<stem>.png + masks."""
    _png(root / name / "train" / "good" / "000.png")
    _png(root / name / "test" / "good" / "000.png")
    for defect, stems in (defects or {"crack": ["000", "001"]}).items():
        for stem in stems:
            _png(root / name / "test" / defect / f"{stem}.png")
            _png(root / name / "ground_truth" / defect / f"{stem}_mask.png", 255, mode="L")
    return root / name


def test_btad_fixture_matches_the_reference_meta_json() -> None:
    samples = read_mvtec(BTAD, dataset="btad", normal_defect="ok", mask_suffix="")
    meta = json.loads((BTAD / "meta.json").read_text())["test"]
    expected = [
        (
            str(BTAD.resolve() / item["img_path"]),
            str(BTAD.resolve() / item["mask_path"]) if item["mask_path"] else None,
            item["anomaly"],
            item["cls_name"],
            item["specie_name"],
        )
        for name in sorted(meta)
        for item in meta[name]
    ]
    assert [(s.image, s.mask, s.label, s.class_name, s.defect) for s in samples] == expected
    assert {s.dataset for s in samples} == {"btad"} and {s.split for s in samples} == {"test"}


def test_masks_are_paired_by_name_not_by_sorted_position(tmp_path: Path) -> None:
    # sorted images: a.png, a_b.png; sorted masks: a_b_mask.png, a_mask.png (positional pairing would swap)
    _mvtec_class(tmp_path, defects={"hole": ["a", "a_b"]})
    pairs = {Path(s.image).name: Path(s.mask).name for s in read_mvtec(tmp_path) if s.label}
    assert pairs == {"a.png": "a_mask.png", "a_b.png": "a_b_mask.png"}


def test_mask_may_have_another_image_extension(tmp_path: Path) -> None:
    _png(tmp_path / "01" / "test" / "ok" / "0000.bmp")
    _png(tmp_path / "01" / "test" / "ko" / "0001.bmp")
    _png(tmp_path / "01" / "ground_truth" / "ko" / "0001.png", 255, mode="L")
    samples = read_mvtec(tmp_path, normal_defect="ok", mask_suffix="")
    assert [(Path(s.image).name, s.mask and Path(s.mask).name, s.label) for s in samples] == [
        ("0000.bmp", None, 0),
        ("0001.bmp", "0001.png", 1),
    ]


def test_order_is_class_then_split_then_normal_first_then_defects(tmp_path: Path) -> None:
    _mvtec_class(tmp_path, "zipper", {"broken": ["000"], "aaa_first_alphabetically": ["000"]})
    _mvtec_class(tmp_path, "bottle", {"crack": ["000"]})
    samples = read_mvtec(tmp_path, splits=("train", "test"))
    assert [(s.class_name, s.split, s.defect) for s in samples] == [
        ("bottle", "train", "good"),
        ("bottle", "test", "good"),
        ("bottle", "test", "crack"),
        ("zipper", "train", "good"),
        ("zipper", "test", "good"),
        ("zipper", "test", "aaa_first_alphabetically"),
        ("zipper", "test", "broken"),
    ]
    assert [s.label for s in samples] == [0, 0, 1, 0, 0, 1, 1]


def test_classes_argument_selects_and_orders_classes(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        _mvtec_class(tmp_path, name)
    samples = read_mvtec(tmp_path, classes=["c", "a"])
    assert list(dict.fromkeys(s.class_name for s in samples)) == ["c", "a"]


def test_files_and_hidden_folders_at_the_root_are_not_classes(tmp_path: Path) -> None:
    _mvtec_class(tmp_path)
    (tmp_path / "license.txt").write_text("CC BY-NC-SA 4.0")
    (tmp_path / ".cache").mkdir()
    assert {s.class_name for s in read_mvtec(tmp_path)} == {"bottle"}


def test_records_hold_absolute_paths_and_the_dataset_name(tmp_path: Path) -> None:
    _mvtec_class(tmp_path)
    samples = read_mvtec(tmp_path, dataset="mpdd")
    assert all(Path(s.image).is_absolute() and Path(s.image).is_file() for s in samples)
    assert all(Path(s.mask).is_file() for s in samples if s.mask)
    assert {s.dataset for s in samples} == {"mpdd"}


def test_image_level_only_class_needs_require_masks_false(tmp_path: Path) -> None:
    _png(tmp_path / "brain" / "test" / "good" / "0.png")
    _png(tmp_path / "brain" / "test" / "tumor" / "1.png")
    with pytest.raises(MaskError, match=r"1\.png: anomalous image has no mask.*require_masks=False"):
        read_mvtec(tmp_path)
    samples = read_mvtec(tmp_path, require_masks=False)
    assert [(s.label, s.mask) for s in samples] == [(0, None), (1, None)]


def test_require_masks_false_still_demands_every_mask_when_ground_truth_exists(tmp_path: Path) -> None:
    _mvtec_class(tmp_path)
    (tmp_path / "bottle" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(MaskError, match=r"001\.png: anomalous image has no mask"):
        read_mvtec(tmp_path, require_masks=False)


def test_unknown_split_is_rejected(tmp_path: Path) -> None:
    _mvtec_class(tmp_path)
    with pytest.raises(ValueError, match="splits must be"):
        read_mvtec(tmp_path, splits=("validation",))
    with pytest.raises(ValueError, match="splits must be"):
        read_mvtec(tmp_path, splits="test")
