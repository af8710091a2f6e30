"""Image and mask transforms against the AnomalyCLIP reference outputs and hand-computed values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from zsadkit.data.images import read_image
from zsadkit.data.transforms import OPENAI_MEAN, OPENAI_STD, image_transform, mask_transform

FIXTURES = Path(__file__).parent / "fixtures" / "anomalyclip"
BTAD = FIXTURES / "e2e_btad_synth"


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "e2e_transform_samples.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.mark.parametrize(
    ("key", "path"), [("img_normal", "01/test/ok/000.png"), ("img_anomalous", "01/test/ko/000.png")]
)
def test_image_transform_reproduces_anomalyclip_reference(reference, key: str, path: str) -> None:
    output = image_transform(112)(read_image(BTAD / path))
    assert output.dtype == torch.float32 and output.shape == (3, 112, 112)
    np.testing.assert_allclose(output.numpy(), reference[key], rtol=0, atol=1e-6)


def test_soft_mask_transform_reproduces_anomalyclip_reference(reference) -> None:
    soft = mask_transform(112, threshold=None)(read_image(BTAD / "01/ground_truth/ko/000.png"))
    np.testing.assert_array_equal(soft.numpy(), reference["mask_anomalous"][0])


def test_binary_mask_is_reference_mask_above_one_half(reference) -> None:
    binary = mask_transform(112)(read_image(BTAD / "01/ground_truth/ko/000.png"))
    expected = (reference["mask_anomalous"][0] > 0.5).astype(np.float32)
    np.testing.assert_array_equal(binary.numpy(), expected)
    assert 0 < expected.sum() < expected.size


def test_uniform_image_is_normalised_with_openai_mean_and_std() -> None:
    value = (200, 100, 50)
    output = image_transform(16)(Image.new("RGB", (40, 30), value))
    expected = [(v / 255 - m) / s for v, m, s in zip(value, OPENAI_MEAN, OPENAI_STD, strict=True)]
    np.testing.assert_allclose(output.mean(dim=(1, 2)).numpy(), expected, rtol=0, atol=1e-6)
    assert output.std(dim=(1, 2)).max() < 1e-6


def test_image_is_squashed_not_cropped() -> None:
    """A 2:1 image with a left half black and a right half white keeps both halves after the square resize."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 20:] = 255
    output = image_transform(10, mean=(0, 0, 0), std=(1, 1, 1))(Image.fromarray(pixels))
    assert torch.all(output[:, :, :4] < 0.05) and torch.all(output[:, :, 6:] > 0.95)


def test_conversion_to_rgb_happens_after_the_resize() -> None:
    """Pillow resizes palette images with nearest, so converting afterwards gives nearest-like values."""
    rng = np.random.default_rng(0)
    palette_image = Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8), mode="L").convert("P")
    output = image_transform(17, mean=(0, 0, 0), std=(1, 1, 1))(palette_image)
    expected = palette_image.resize((17, 17), Image.Resampling.NEAREST).convert("RGB")
    np.testing.assert_allclose(output.permute(1, 2, 0).numpy(), np.asarray(expected) / 255, atol=1e-7)
    bicubic_first = palette_image.convert("RGB").resize((17, 17), Image.Resampling.BICUBIC)
    assert not np.allclose(np.asarray(bicubic_first) / 255, output.permute(1, 2, 0).numpy(), atol=1e-3)


def test_shorter_side_crop_matches_torchvision_resize_and_center_crop() -> None:
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (30, 52, 3), dtype=np.uint8))
    reference = T.Compose(
        [
            T.Resize(24, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(24),
            T.ToTensor(),
            T.Normalize(OPENAI_MEAN, OPENAI_STD),
        ]
    )(image)
    output = image_transform(24, resize="shorter_side_crop")(image)
    np.testing.assert_allclose(output.numpy(), reference.numpy(), rtol=0, atol=1e-6)


def test_label_valued_mask_becomes_binary_before_resizing() -> None:
    """VisA-style masks hold small labels (1, 2): every non-zero pixel counts as anomalous."""
    labels = np.zeros((8, 8), dtype=np.uint8)
    labels[:4, :4] = 1
    labels[4:, 4:] = 2
    mask = mask_transform(8)(Image.fromarray(labels))
    expected = (labels > 0).astype(np.float32)
    np.testing.assert_array_equal(mask.numpy(), expected)
    kept_levels = mask_transform(8, threshold=None, nonzero_is_anomalous=False)(Image.fromarray(labels))
    np.testing.assert_allclose(kept_levels.numpy(), labels / 255, atol=1e-7)


def test_mask_threshold_is_strictly_greater_than() -> None:
    """A half-white 2x2 mask averages to about 0.5 at 1x1; a threshold equal to that value gives 0."""
    mask = Image.fromarray(np.array([[255, 0]], dtype=np.uint8)).resize((2, 2))
    soft = mask_transform(1, threshold=None)(mask)
    assert soft.item() == pytest.approx(0.5, abs=1 / 255)
    assert mask_transform(1, threshold=soft.item())(mask).item() == 0.0
    assert mask_transform(1, threshold=soft.item() - 1e-3)(mask).item() == 1.0


def test_nearest_mask_interpolation_keeps_only_original_values() -> None:
    rng = np.random.default_rng(2)
    mask = Image.fromarray((rng.random((23, 23)) > 0.5).astype(np.uint8) * 255)
    soft = mask_transform(10, threshold=None, interpolation="nearest")(mask)
    assert set(torch.unique(soft).tolist()) <= {0.0, 1.0}
    bilinear = mask_transform(10, threshold=None)(mask)
    assert len(torch.unique(bilinear)) > 2


def test_unknown_resize_and_interpolation_are_rejected() -> None:
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="resize must be"):
        image_transform(4, resize="crop")(image)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        mask_transform(4, interpolation="lanczos3")(image)
