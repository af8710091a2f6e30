"""AnomalyDataset: items, masks, labels and the reference transforms end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from zsadkit.data.dataset import AnomalyDataset
from zsadkit.data.images import read_image
from zsadkit.data.mvtec import read_mvtec
from zsadkit.data.records import Sample
from zsadkit.data.transforms import image_transform, mask_transform

FIXTURES = Path(__file__).parent / "fixtures" / "anomalyclip"
BTAD = FIXTURES / "e2e_btad_synth"


@pytest.fixture(scope="module")
def btad() -> AnomalyDataset:
    return AnomalyDataset(
        read_mvtec(BTAD, dataset="btad", normal_defect="ok", mask_suffix=""), image_size=112
    )


def test_items_reproduce_the_reference_dataset_outputs(btad: AnomalyDataset) -> None:
    with np.load(FIXTURES / "e2e_transform_samples.npz") as reference:
        normal, anomalous = btad[0], btad[3]
        assert Path(normal["image_path"]).parts[-3:] == ("test", "ok", "000.png")
        assert Path(anomalous["image_path"]).parts[-3:] == ("test", "ko", "000.png")
        np.testing.assert_allclose(normal["image"].numpy(), reference["img_normal"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(anomalous["image"].numpy(), reference["img_anomalous"], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(normal["mask"].numpy(), reference["mask_normal"][0])
        np.testing.assert_array_equal(anomalous["mask"].numpy(), reference["mask_anomalous"][0] > 0.5)


def test_item_fields_types_and_shapes(btad: AnomalyDataset) -> None:
    item = btad[4]
    assert item["image"].shape == (3, 112, 112) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (112, 112) and item["mask"].dtype == torch.float32
    assert set(torch.unique(item["mask"]).tolist()) == {0.0, 1.0}
    assert (item["label"], item["class_name"], item["has_mask"], item["index"]) == (1, "01", True, 4)
    assert item["image_path"] == btad.samples[4].image


def test_classes_in_first_appearance_order(tmp_path: Path) -> None:
    image = Image.new("RGB", (4, 4))
    image.save(tmp_path / "x.png")
    samples = [
        Sample(str(tmp_path / "x.png"), None, 0, name, "good", "d", "test") for name in ("b", "a", "b", "c")
    ]
    assert AnomalyDataset(samples, image_size=4).classes == ["b", "a", "c"]


def test_normal_images_of_a_masked_dataset_have_ground_truth_zero_masks(btad: AnomalyDataset) -> None:
    item = btad[0]
    assert item["label"] == 0 and item["has_mask"] is True and item["mask"].sum() == 0


def test_image_level_only_dataset_is_allowed_without_masks(tmp_path: Path) -> None:
    Image.new("RGB", (6, 6), (10, 20, 30)).save(tmp_path / "a.png")
    samples = [
        Sample(str(tmp_path / "a.png"), None, label, "brain", "", "headct", "test") for label in (0, 1)
    ]
    items = [AnomalyDataset(samples, image_size=4)[i] for i in range(2)]
    assert [(i["label"], i["has_mask"], float(i["mask"].sum())) for i in items] == [
        (0, False, 0.0),
        (1, False, 0.0),
    ]


def test_has_mask_is_decided_per_dataset_name(tmp_path: Path) -> None:
    Image.new("RGB", (6, 6)).save(tmp_path / "a.png")
    Image.new("L", (6, 6), 255).save(tmp_path / "a_mask.png")
    samples = [
        Sample(str(tmp_path / "a.png"), str(tmp_path / "a_mask.png"), 1, "c", "hole", "with_masks", "test"),
        Sample(str(tmp_path / "a.png"), None, 1, "brain", "", "image_level", "test"),
    ]
    dataset = AnomalyDataset(samples, image_size=6)
    assert dataset[0]["has_mask"] and dataset[0]["mask"].sum() == 36
    assert not dataset[1]["has_mask"]


def test_soft_masks_when_threshold_is_none(btad: AnomalyDataset) -> None:
    soft = AnomalyDataset(btad.samples, image_size=112, mask_threshold=None)[3]["mask"]
    assert ((soft > 0) & (soft < 1)).any()
    np.testing.assert_array_equal((soft > 0.5).float().numpy(), btad[3]["mask"].numpy())


def test_transform_overrides_are_used_and_size_checked(btad: AnomalyDataset) -> None:
    cropped = AnomalyDataset(
        btad.samples,
        64,
        image_transform_override=image_transform(64, resize="shorter_side_crop"),
        mask_transform_override=mask_transform(64, interpolation="nearest"),
    )
    item = cropped[3]
    expected = image_transform(64, resize="shorter_side_crop")(read_image(btad.samples[3].image))
    assert torch.equal(item["image"], expected)
    with pytest.raises(ValueError, match="transform override has size 32, expected image_size=64"):
        AnomalyDataset(btad.samples, 64, image_transform_override=image_transform(32))


def test_default_collate_batches_items(btad: AnomalyDataset) -> None:
    batch = next(iter(DataLoader(btad, batch_size=6, shuffle=False)))
    assert batch["image"].shape == (6, 3, 112, 112) and batch["mask"].shape == (6, 112, 112)
    assert batch["label"].tolist() == [0, 0, 0, 1, 1, 1]
    assert batch["has_mask"].tolist() == [True] * 6 and batch["class_name"] == ["01"] * 6
