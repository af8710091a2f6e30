"""Anomaly-map utilities: Gaussian smoothing equals scipy, the softmax/upsampling/fusion steps of test.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from zsadkit.maps import (
    anomaly_map_from_probabilities,
    fuse_layer_maps,
    gaussian_kernel1d,
    gaussian_smooth,
    patch_text_probabilities,
    state_maps,
    upsample_token_probabilities,
)


@pytest.mark.parametrize("shape", [(3, 112, 112), (2, 40, 33), (4, 7, 5)])
@pytest.mark.parametrize("sigma", [1.0, 2.5, 4.0])
def test_gaussian_smooth_equals_scipy_gaussian_filter_per_map(shape: tuple[int, ...], sigma: float) -> None:
    maps = np.random.default_rng(0).random(shape).astype(np.float32)
    expected = np.stack([gaussian_filter(m, sigma=sigma) for m in maps])
    ours = gaussian_smooth(torch.from_numpy(maps), sigma=sigma).numpy()
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_gaussian_smooth_float64_matches_scipy_to_rounding() -> None:
    maps = np.random.default_rng(1).random((2, 30, 30))
    expected = np.stack([gaussian_filter(m, sigma=4) for m in maps])
    np.testing.assert_allclose(gaussian_smooth(torch.from_numpy(maps), 4).numpy(), expected, atol=1e-12)


def test_gaussian_kernel_has_scipy_radius_and_sums_to_one() -> None:
    kernel = gaussian_kernel1d(4.0)
    assert kernel.numel() == 33  # radius int(4 * 4 + 0.5) = 16
    assert float(kernel.sum()) == pytest.approx(1.0)
    assert float(kernel[16] / kernel[15]) == pytest.approx(np.exp(1 / 32))


def test_gaussian_smooth_sigma_zero_returns_the_input() -> None:
    maps = torch.rand(2, 8, 8)
    assert gaussian_smooth(maps, 0) is maps


def test_patch_text_probabilities_is_softmax_of_cosine_over_temperature() -> None:
    tokens = F.normalize(torch.randn(2, 5, 8), dim=-1)
    text = F.normalize(torch.randn(2, 8), dim=-1)
    probs = patch_text_probabilities(tokens, text, temperature=0.07)
    logits = torch.stack([(tokens * text[k]).sum(-1) for k in range(2)], dim=-1) / 0.07
    assert torch.allclose(probs, logits.softmax(-1), atol=1e-6)
    per_image = patch_text_probabilities(tokens, text.expand(2, 2, 8), temperature=0.07)
    assert torch.allclose(per_image, probs, atol=1e-6)


def test_upsampling_drops_cls_and_reads_the_grid_row_major() -> None:
    grid = torch.arange(9.0).view(1, 9, 1)
    probs = torch.cat([torch.full((1, 1, 1), -100.0), grid], dim=1)  # CLS first
    upsampled = upsample_token_probabilities(probs, image_size=3)
    assert upsampled.shape == (1, 3, 3, 1)
    assert torch.equal(upsampled[0, :, :, 0], torch.arange(9.0).view(3, 3))
    with pytest.raises(ValueError, match="not a square grid"):
        upsample_token_probabilities(torch.rand(1, 9, 2), 4)


def test_layer_map_equals_abnormal_probability_and_layers_are_summed() -> None:
    abnormal = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    state_maps = torch.stack([1 - abnormal, abnormal], dim=-1)
    layer_maps = anomaly_map_from_probabilities(state_maps)
    # (a + 1 − (1 − a)) / 2 loses up to ~6e-8 in float32
    assert torch.allclose(layer_maps, abnormal, atol=1e-6)
    assert torch.allclose(fuse_layer_maps(layer_maps), abnormal.sum(0), atol=1e-6)
    assert torch.allclose(fuse_layer_maps(layer_maps, "mean"), abnormal.mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="'sum' or 'mean'"):
        fuse_layer_maps(layer_maps, "max")


def test_state_maps_in_both_orders_equal_their_explicit_computation() -> None:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.nn.functional.normalize(torch.randn(2, 17, 8, generator=generator), dim=-1)  # CLS + 4x4
    text = torch.nn.functional.normalize(torch.randn(2, 2, 8, generator=generator), dim=-1)
    logits = tokens[:, 1:] @ text.transpose(1, 2) / 0.07
    grid = logits.transpose(1, 2).reshape(2, 2, 4, 4)
    anomalyclip = torch.nn.functional.interpolate(grid.softmax(dim=1), size=16, mode="bilinear", align_corners=False)
    vand = torch.nn.functional.interpolate(grid, size=16, mode="bilinear", align_corners=True).softmax(dim=1)
    assert torch.allclose(state_maps(tokens, text, 0.07, 16).permute(0, 3, 1, 2), anomalyclip, atol=1e-6)
    ours = state_maps(tokens, text, 0.07, 16, order="upsample_then_softmax", align_corners=True)
    assert torch.allclose(ours.permute(0, 3, 1, 2), vand, atol=1e-6)
    assert not torch.allclose(ours.permute(0, 3, 1, 2), anomalyclip, atol=1e-3)  # the two orders differ
    with pytest.raises(ValueError, match="order must be"):
        state_maps(tokens, text, 0.07, 16, order="softmax")
