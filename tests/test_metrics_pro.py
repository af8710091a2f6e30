"""AU-PRO: hand-computed curves, the official MVTec AD algorithm, and AnomalyCLIP's reference fixture."""

from __future__ import annotations

import json
from bisect import bisect
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import auc

from zsadkit.metrics import UndefinedMetricError, aupro, aupro_cflow200

FIXTURES = Path(__file__).parent / "fixtures" / "anomalyclip"
EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


# ---------------------------------------------------------------- independent oracles (slow, straightforward)
def official_mvtec_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """The MVTec AD evaluation script's algorithm: one argsort, cumulative sums, `trapezoid` with x_max."""
    fp_changes = np.zeros(masks.shape, dtype=np.uint32)
    pro_changes = np.zeros(masks.shape, dtype=np.float64)
    n_regions = 0
    for index, mask in enumerate(masks):
        labels, n_components = ndimage.label(mask, structure=EIGHT_CONNECTED)
        n_regions += n_components
        fp_changes[index][labels == 0] = 1
        for component in range(1, n_components + 1):
            region = labels == component
            pro_changes[index][region] = 1.0 / region.sum()
    order = np.argsort(maps.ravel(), kind="stable")[::-1]
    scores, fp_changes, pro_changes = (
        maps.ravel()[order],
        fp_changes.ravel()[order],
        pro_changes.ravel()[order],
    )
    fprs = np.cumsum(fp_changes) / fp_changes.sum()
    pros = np.cumsum(pro_changes) / n_regions
    last_of_tie_run = np.r_[np.diff(scores) != 0, True]
    fprs = np.r_[0.0, np.clip(fprs[last_of_tie_run], None, 1.0), 1.0]
    pros = np.r_[0.0, np.clip(pros[last_of_tie_run], None, 1.0), 1.0]
    correction = 0.0
    if fpr_limit not in fprs:
        ins = bisect(fprs, fpr_limit)
        pro_at_limit = pros[ins - 1] + (pros[ins] - pros[ins - 1]) * (fpr_limit - fprs[ins - 1]) / (
            fprs[ins] - fprs[ins - 1]
        )
        correction = 0.5 * (pro_at_limit + pros[ins - 1]) * (fpr_limit - fprs[ins - 1])
    inside = fprs <= fpr_limit
    fprs, pros = fprs[inside], pros[inside]
    return (np.sum(0.5 * (pros[1:] + pros[:-1]) * np.diff(fprs)) + correction) / fpr_limit


def reference_cflow200(masks: np.ndarray, amaps: np.ndarray) -> float:
    """AnomalyCLIP's `cal_pro_score`: relabel every mask at every one of ~200 thresholds (float32 masks)."""
    masks = masks.astype(np.float32)
    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    pros, fprs = [], []
    for th in np.arange(min_th, max_th, (max_th - min_th) / 200):
        binary_amaps[amaps <= th], binary_amaps[amaps > th] = 0, 1
        overlaps = []
        for binary_amap, mask in zip(binary_amaps, masks, strict=True):
            labels, n_components = ndimage.label(mask, structure=EIGHT_CONNECTED)
            for component in range(1, n_components + 1):
                region = labels == component
                overlaps.append(binary_amap[region].sum() / region.sum())
        inverse_masks = 1 - masks
        fprs.append(np.logical_and(inverse_masks, binary_amaps).sum() / inverse_masks.sum())
        pros.append(np.array(overlaps).mean())
    pros, fprs = np.array(pros), np.array(fprs)
    kept = fprs < 0.3
    fprs = fprs[kept]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return auc(fprs, pros[kept])


def blob_case(seed: int, n_images: int = 6, size: int = 40, decimals: int | None = None):
    """Masks with 0-3 rectangles (some images all normal) and smooth maps that partly follow them."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_images, size, size), dtype=bool)
    for index in range(n_images):
        for _ in range(rng.integers(0, 4) if index else 2):
            top, left = rng.integers(0, size - 6, size=2)
            height, width = rng.integers(2, 10, size=2)
            masks[index, top : top + height, left : left + width] = True
    noise = ndimage.gaussian_filter(rng.normal(size=masks.shape), sigma=(0, 2, 2))
    maps = (noise + 0.6 * ndimage.gaussian_filter(masks.astype(float), sigma=(0, 2, 2))).astype(np.float32)
    if decimals is not None:
        maps = np.round(maps, decimals)
    return masks, maps


# ---------------------------------------------------------------- hand-computed cases
def test_one_region_follows_the_hand_computed_curve() -> None:
    masks = np.array([[[1, 1, 0, 0], [0, 0, 0, 0]]])
    maps = np.array([[[0.9, 0.5, 0.8, 0.4], [0.3, 0.2, 0.1, 0.0]]])
    # (0, 1/2) -> (1/6, 1/2) -> (1/6, 1) -> limit 0.3 at PRO 1: area 1/12 + (0.3 - 1/6).
    assert aupro(masks, maps) == pytest.approx((1 / 12 + 0.3 - 1 / 6) / 0.3, abs=1e-12)


def test_two_regions_of_different_size_are_averaged_per_region_not_per_pixel() -> None:
    masks = np.zeros((1, 3, 5), dtype=bool)
    masks[0, 0, 0] = True  # region A, 1 pixel
    masks[0, 0, 3:5] = masks[0, 1, 4] = True  # region B, 3 pixels (8-connected)
    maps = np.zeros((1, 3, 5))
    maps[0, 0, 0] = 0.95
    maps[0, 0, 3], maps[0, 0, 4], maps[0, 1, 4] = 0.9, 0.65, 0.1
    normal_scores = [0.85, 0.8, 0.7, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25]
    maps[~masks] = normal_scores
    # PRO = (1 + 1/3) / 2 up to FPR 3/11, then (1 + 2/3) / 2 until the limit.
    expected = (2 / 3 * 3 / 11 + 5 / 6 * (0.3 - 3 / 11)) / 0.3
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_all_normal_image_only_adds_normal_pixels() -> None:
    masks = np.zeros((2, 2, 4), dtype=bool)
    masks[0, 0, :2] = True
    maps = np.full((2, 2, 4), 0.05)
    maps[0] = [[0.9, 0.5, 0.8, 0.4], [0.3, 0.2, 0.1, 0.0]]
    # The 8 extra normal pixels rank last: FPRs become k/14, PRO rises to 1 at FPR 1/14.
    assert aupro(masks, maps) == pytest.approx((0.5 / 14 + 0.3 - 1 / 14) / 0.3, abs=1e-12)


def test_tie_between_region_and_normal_pixel_keeps_the_last_point_of_the_run() -> None:
    masks = np.array([[[1, 1, 0, 0], [0, 0, 0, 0]]])
    maps = np.array([[[0.9, 0.5, 0.5, 0.4], [0.3, 0.2, 0.1, 0.0]]])
    # The tie at 0.5 jumps diagonally from (0, 1/2) to (1/6, 1).
    assert aupro(masks, maps) == pytest.approx((0.75 / 6 + 0.3 - 1 / 6) / 0.3, abs=1e-12)


def test_tied_normal_scores_across_the_fpr_limit_are_interpolated_as_one_step() -> None:
    masks = np.zeros((1, 2, 6), dtype=bool)
    masks[0, 0, :2] = True
    maps = np.zeros((1, 2, 6))
    maps[0, 0, :2] = [0.9, 0.3]
    maps[~masks] = [0.5, 0.3, 0.3, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]
    # (0, .5) -> (0.1, .5) -> (0.4, 1): PRO at 0.3 interpolates to 5/6.
    assert aupro(masks, maps) == pytest.approx((0.05 + 0.5 * (5 / 6 + 0.5) * 0.2) / 0.3, abs=1e-12)


def test_fpr_limit_one_integrates_the_whole_curve() -> None:
    masks = np.array([[[1, 1, 0, 0], [0, 0, 0, 0]]])
    maps = np.array([[[0.9, 0.5, 0.8, 0.4], [0.3, 0.2, 0.1, 0.0]]])
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.5 / 6 + 5 / 6, abs=1e-12)


def test_perfect_and_inverted_maps_reach_the_extremes() -> None:
    masks, _ = blob_case(0)
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, -masks.astype(float)) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- against the oracles and the fixture
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_equals_the_official_mvtec_algorithm(seed: int, decimals: int | None, fpr_limit: float) -> None:
    masks, maps = blob_case(seed, decimals=decimals)
    assert aupro(masks, maps, fpr_limit) == pytest.approx(
        official_mvtec_aupro(masks, maps, fpr_limit), abs=1e-12
    )


@pytest.mark.parametrize("class_name", ["clsA", "clsB"])
def test_aupro_cflow200_equals_anomalyclip_reference_fixture(class_name: str) -> None:
    inputs = np.load(FIXTURES / "metrics_inputs.npz")
    expected = json.loads((FIXTURES / "metrics_outputs.json").read_text())[f"{class_name}__pixel-aupro"]
    masks, maps = inputs[f"{class_name}__masks"], inputs[f"{class_name}__amaps"]
    assert aupro_cflow200(masks, maps) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aupro_cflow200_equals_the_relabelling_reference(seed: int, dtype: type) -> None:
    masks, maps = blob_case(seed, n_images=4, size=32)
    maps = maps.astype(dtype)
    assert aupro_cflow200(masks, maps) == pytest.approx(reference_cflow200(masks, maps), abs=1e-12)


def test_aupro_is_invariant_to_monotone_transforms_but_cflow200_is_not() -> None:
    masks, maps = blob_case(5, n_images=8)
    transformed = np.exp(8 * maps.astype(np.float64))
    assert aupro(masks, transformed) == pytest.approx(aupro(masks, maps), abs=1e-12)
    assert abs(aupro_cflow200(masks, transformed) - aupro_cflow200(masks, maps)) > 0.01


def test_no_region_or_constant_maps_are_undefined() -> None:
    with pytest.raises(UndefinedMetricError, match="no anomalous regions"):
        aupro(np.zeros((2, 5, 5)), np.random.default_rng(0).random((2, 5, 5)))
    with pytest.raises(UndefinedMetricError, match="no anomalous regions"):
        aupro_cflow200(np.zeros((2, 5, 5)), np.random.default_rng(0).random((2, 5, 5)))
    masks = np.zeros((1, 5, 5))
    masks[0, 1, 1] = 1
    with pytest.raises(UndefinedMetricError, match="every anomaly-map value equals"):
        aupro_cflow200(masks, np.ones((1, 5, 5)))


def test_fpr_limit_outside_unit_interval_is_rejected() -> None:
    masks, maps = blob_case(0)
    with pytest.raises(ValueError, match="fpr_limit must be in"):
        aupro(masks, maps, fpr_limit=0.0)
