"""The synthetic MVTec-layout generator: layout, determinism, exact masks, idempotence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from zsadkit.data.dataset import AnomalyDataset
from zsadkit.data.errors import LayoutError
from zsadkit.data.images import read_image
from zsadkit.data.mvtec import read_mvtec
from zsadkit.data.synthetic import (
    DEFECTS,
    STAMP_NAME,
    SYNTHETIC_CLASSES,
    SyntheticConfig,
    add_defect,
    make_synthetic,
)

SMALL = SyntheticConfig(
    image_size=48,
    n_train_normal=2,
    n_test_normal=2,
    n_test_anomalous=5,
    aux_classes=("fabric", "washer"),
    target_classes=("planks", "bolt"),
)


@pytest.fixture(scope="module")
def default_roots(tmp_path_factory) -> dict[str, Path]:
    return make_synthetic(tmp_path_factory.mktemp("synthetic"))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_default_config_writes_two_mvtec_datasets_with_every_defect(default_roots) -> None:
    config = SyntheticConfig()
    assert {name: path.name for name, path in default_roots.items()} == {
        "synth-aux": "synth-aux",
        "synth-target": "synth-target",
    }
    for name, classes in (("synth-aux", config.aux_classes), ("synth-target", config.target_classes)):
        samples = read_mvtec(default_roots[name], dataset=name, splits=("train", "test"))
        assert list(dict.fromkeys(s.class_name for s in samples)) == sorted(classes)
        for name in classes:
            own = [s for s in samples if s.class_name == name]
            assert sum(s.split == "train" and s.label == 0 for s in own) == config.n_train_normal
            assert sum(s.split == "test" and s.label == 0 for s in own) == config.n_test_normal
            anomalous = [s for s in own if s.label == 1]
            assert len(anomalous) == config.n_test_anomalous and all(s.split == "test" for s in anomalous)
            assert {s.defect for s in anomalous} == set(DEFECTS)
            assert all(Path(s.mask).name == Path(s.image).stem + "_mask.png" for s in anomalous)
        image = read_image(samples[0].image)
        assert image.mode == "RGB" and image.size == (config.image_size, config.image_size)


def test_aux_and_target_classes_are_disjoint_and_hold_textures_and_objects() -> None:
    config = SyntheticConfig()
    assert not set(config.aux_classes) & set(config.target_classes)
    for classes in (config.aux_classes, config.target_classes):
        assert {SYNTHETIC_CLASSES[name][0] for name in classes} == {"texture", "object"}


def test_masks_are_non_empty_exactly_for_anomalous_images(default_roots) -> None:
    for root in default_roots.values():
        for sample in read_mvtec(root, splits=("train", "test")):
            if sample.label == 0:
                assert sample.mask is None and sample.defect == "good"
                continue
            mask = np.asarray(read_image(sample.mask))
            assert mask.shape == read_image(sample.image).size[::-1]
            assert set(np.unique(mask).tolist()) == {0, 255}


def test_mask_is_exactly_the_set_of_changed_pixels() -> None:
    for name in SYNTHETIC_CLASSES:
        for defect in DEFECTS:
            rng = np.random.default_rng([3, len(name), DEFECTS.index(defect)])
            image, object_mask, background = SYNTHETIC_CLASSES[name][1](rng, 64)
            normal = np.clip(np.rint(image), 0, 255).astype(np.uint8)
            anomalous, mask = add_defect(rng, defect, normal, object_mask, background)
            np.testing.assert_array_equal(mask, (anomalous != normal).any(axis=-1))
            assert mask.sum() >= 12
            if object_mask is not None:  # defects stay on the object
                assert not (mask & ~object_mask).any()


def test_missing_piece_of_an_object_shows_the_background() -> None:
    rng = np.random.default_rng(5)
    image, object_mask, background = SYNTHETIC_CLASSES["coin"][1](rng, 64)
    normal = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    anomalous, mask = add_defect(rng, "missing_piece", normal, object_mask, background)
    expected = np.clip(np.rint(background), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(anomalous[mask], expected[mask])


def test_same_seed_gives_byte_identical_pngs(tmp_path: Path) -> None:
    first = make_synthetic(tmp_path / "a", SMALL)
    second = make_synthetic(tmp_path / "b", SMALL)
    for group in ("synth-aux", "synth-target"):
        assert _files(first[group]) == _files(second[group])
        assert len(_files(first[group])) == 2 * (2 + 2 + 2 * 5)


def test_other_seed_gives_other_images(tmp_path: Path) -> None:
    first = _files(make_synthetic(tmp_path / "a", SMALL)["synth-target"])
    other = _files(
        make_synthetic(tmp_path / "b", SyntheticConfig(**{**SMALL.__dict__, "seed": 1}))["synth-target"]
    )
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first if not name.endswith("_mask.png"))


def test_images_do_not_depend_on_the_order_of_classes(tmp_path: Path) -> None:
    swapped = SyntheticConfig(**{**SMALL.__dict__, "target_classes": ("bolt", "planks")})
    assert _files(make_synthetic(tmp_path / "a", SMALL)["synth-target"]) == _files(
        make_synthetic(tmp_path / "b", swapped)["synth-target"]
    )


def test_normal_images_of_a_class_differ_from_each_other(default_roots) -> None:
    images = [
        np.asarray(read_image(p), dtype=np.int16)
        for p in sorted((default_roots["synth-target"] / "coin" / "train" / "good").glob("*.png"))
    ]
    assert all(np.abs(images[0] - other).mean() > 1 for other in images[1:])


def test_existing_complete_dataset_is_kept(tmp_path: Path) -> None:
    roots = make_synthetic(tmp_path, SMALL)
    image = roots["synth-aux"] / "fabric" / "train" / "good" / "000.png"
    image.write_bytes(b"marker")  # a rewrite would replace this
    make_synthetic(tmp_path, SMALL)
    assert image.read_bytes() == b"marker"


def test_other_config_or_incomplete_dataset_is_regenerated(tmp_path: Path) -> None:
    roots = make_synthetic(tmp_path, SMALL)
    (roots["synth-target"] / "bolt" / "test" / "good" / "000.png").unlink()
    make_synthetic(tmp_path, SMALL)
    assert (roots["synth-target"] / "bolt" / "test" / "good" / "000.png").is_file()
    bigger = SyntheticConfig(**{**SMALL.__dict__, "n_test_normal": 3})
    make_synthetic(tmp_path, bigger)
    assert len(list((roots["synth-aux"] / "washer" / "test" / "good").glob("*.png"))) == 3
    assert json.loads((roots["synth-aux"] / STAMP_NAME).read_text())["config"]["n_test_normal"] == 3
    assert [p.name for p in tmp_path.iterdir()] and all(
        not p.name.startswith(".") for p in tmp_path.iterdir()
    )


def test_refuses_to_overwrite_a_folder_that_is_not_synthetic(tmp_path: Path) -> None:
    (tmp_path / "synth-aux").mkdir()
    (tmp_path / "synth-aux" / "precious.txt").write_text("user data")
    with pytest.raises(LayoutError, match="synth-aux: folder exists and is not a zsadkit synthetic dataset"):
        make_synthetic(tmp_path, SMALL)
    assert (tmp_path / "synth-aux" / "precious.txt").read_text() == "user data"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target_classes": ("fabric",)}, "must be disjoint"),
        ({"aux_classes": ("dragon",)}, "unknown classes"),
        ({"defects": ("dent",)}, "unknown defects"),
        ({"n_test_anomalous": 0}, "n_test_anomalous must be >= 1"),
        ({"image_size": 16}, "image_size must be >= 32"),
    ],
)
def test_invalid_config_is_rejected(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**{**SMALL.__dict__, **change})


def test_synthetic_dataset_loads_with_non_empty_binary_masks_for_anomalies(tmp_path: Path) -> None:
    roots = make_synthetic(tmp_path, SMALL)
    dataset = AnomalyDataset(read_mvtec(roots["synth-target"], dataset="synth-target"), image_size=32)
    for index in range(len(dataset)):
        item = dataset[index]
        assert (item["mask"].sum() > 0) == bool(item["label"])
