"""AUPIMO: hand-computed curves, ties, the flat part below the FPR resolution, a brute-force curve, the Evaluator."""

from __future__ import annotations

import numpy as np
import pytest

from zsadkit.metrics import Evaluator, UndefinedMetricError, aupimo, per_image_aupimo

TEN_NORMAL_SCORES = np.arange(10).reshape(2, 5) / 10  # one normal image: FPR(>= v) = (10 - 10 v) / 10


def one_normal_one_anomalous(region_scores: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Image 0: normal, pixels 0.0, 0.1, ..., 0.9. Image 1: its first pixels are the mask, scored as given."""
    masks = np.zeros((2, 2, 5), dtype=bool)
    maps = np.zeros((2, 2, 5))
    maps[0] = TEN_NORMAL_SCORES
    for index, score in enumerate(region_scores):
        masks[1, 0, index] = True
        maps[1, 0, index] = score
    return masks, maps


def brute_force_aupimo(masks: np.ndarray, maps: np.ndarray, fpr_bounds: tuple[float, float]) -> np.ndarray:
    """The definition written out: one curve point per distinct score, straight lines in log10 FPR."""
    normal = maps[~masks.any(axis=(1, 2))].ravel()
    lower, upper = np.log10(fpr_bounds[0]), np.log10(fpr_bounds[1])
    values = []
    for index in np.flatnonzero(masks.any(axis=(1, 2))):
        region = maps[index][masks[index]]
        points = [(0.0, 0.0)] + [
            (float(np.mean(normal >= t)), float(np.mean(region >= t)))
            for t in np.unique(np.r_[normal, region])[::-1]
        ]
        area = 0.0
        for (fpr0, tpr0), (fpr1, tpr1) in zip(points[:-1], points[1:], strict=True):
            if fpr1 == fpr0:
                continue  # a vertical step: thresholds between two normal scores
            if fpr0 == 0:  # below the first normal score the curve stays at the FPR-0 overlap
                area += tpr0 * max(min(upper, np.log10(fpr1)) - lower, 0.0)
                continue
            x0, x1 = np.log10(fpr0), np.log10(fpr1)
            low, high = max(lower, x0), min(upper, x1)
            if high > low:
                slope = (tpr1 - tpr0) / (x1 - x0)
                area += (high - low) * (2 * tpr0 + slope * (low - x0) + slope * (high - x0)) / 2
        values.append(area / (upper - lower))
    return np.array(values)


def test_staircase_curve_integrates_to_the_hand_computed_area() -> None:
    # TPR(z) = TPR at the lowest threshold with FPR <= z. Pixel 0.85 is found once the threshold falls below
    # 0.9 (FPR 0.1), pixel 0.45 once it falls below 0.5 (FPR 0.5): TPR = 1/2 on [0.1, 0.5), 1 on [0.5, 1].
    masks, maps = one_normal_one_anomalous([0.85, 0.45])
    expected = 0.5 * np.log10(0.5 / 0.1) + 1.0 * np.log10(1 / 0.5)  # / log10(1 / 0.1) = 1
    assert aupimo(masks, maps, fpr_bounds=(0.1, 1.0)) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.650515, abs=1e-6)


def test_region_pixel_tied_with_a_normal_pixel_counts_half_along_its_segment() -> None:
    # Pixel 0.5 ties the normal 0.5: the segment from (log 0.4, TPR(> 0.5) = 1/2) to (log 0.5, TPR(>= 0.5) = 1)
    # is a straight line, area (log 0.5 - log 0.4) * 3/4. Pixel 0.95 is found at every FPR.
    masks, maps = one_normal_one_anomalous([0.95, 0.5])
    expected = 0.5 * np.log10(0.4 / 0.1) + 0.75 * np.log10(0.5 / 0.4) + 1.0 * np.log10(1 / 0.5)
    assert aupimo(masks, maps, fpr_bounds=(0.1, 1.0)) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.674743, abs=1e-6)


def test_range_below_the_fpr_resolution_takes_the_overlap_at_fpr_zero() -> None:
    # 10 normal pixels: the smallest positive FPR is 0.1, above the whole range [0.01, 0.05]. The lowest
    # threshold with FPR <= z is then just above 0.9 for every z: TPR(> 0.9) = 1/2 (0.95 yes, 0.9 is a tie: no).
    masks, maps = one_normal_one_anomalous([0.95, 0.9])
    assert aupimo(masks, maps, fpr_bounds=(0.01, 0.05)) == pytest.approx(0.5, abs=1e-12)


def test_fpr_is_measured_on_the_normal_images_only() -> None:
    # Two normal images give the 20 normal scores 0.00, 0.05, ..., 0.95. Pixel 0.72 is found at FPR
    # #(> 0.70) / 20 = 0.25, pixel 0.33 only at 0.65: TPR = 0 on [0.05, 0.25), 1/2 on [0.25, 0.5].
    masks = np.zeros((3, 2, 5), dtype=bool)
    maps = np.zeros((3, 2, 5))
    maps[0], maps[1] = TEN_NORMAL_SCORES, TEN_NORMAL_SCORES + 0.05
    masks[2, 0, :2] = True
    maps[2, 0, :2] = [0.72, 0.33]
    maps[2, 1, :] = 100.0  # normal pixels of an anomalous image: not part of the FPR
    expected = 0.5 * np.log10(0.5 / 0.25) / np.log10(0.5 / 0.05)
    assert aupimo(masks, maps, fpr_bounds=(0.05, 0.5)) == pytest.approx(expected, abs=1e-12)


def test_perfect_and_inverted_maps_reach_one_and_zero() -> None:
    masks, maps = one_normal_one_anomalous([2.0, 3.0])
    assert aupimo(masks, maps, fpr_bounds=(0.1, 0.5)) == 1.0
    masks, maps = one_normal_one_anomalous([-2.0, -3.0])
    assert aupimo(masks, maps, fpr_bounds=(0.1, 0.5)) == 0.0


@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("fpr_bounds", [(1e-3, 1e-1), (1e-2, 0.3), (1e-4, 2e-3)])
def test_per_image_values_equal_the_brute_force_curve(decimals: int | None, fpr_bounds: tuple) -> None:
    rng = np.random.default_rng(7)
    masks = np.zeros((9, 20, 24), dtype=bool)
    for index in range(4, 9):
        top, left = rng.integers(0, 14, size=2)
        masks[index, top : top + rng.integers(2, 7), left : left + rng.integers(2, 9)] = True
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    if decimals is not None:
        maps = np.round(maps, decimals)  # ties between normal and anomalous pixels
    values = per_image_aupimo(masks, maps, fpr_bounds)
    assert np.isnan(values[:4]).all()
    np.testing.assert_allclose(values[4:], brute_force_aupimo(masks, maps, fpr_bounds), rtol=0, atol=1e-12)
    assert aupimo(masks, maps, fpr_bounds) == pytest.approx(values[4:].mean(), abs=1e-15)


def test_aupimo_is_invariant_to_monotone_transforms() -> None:
    rng = np.random.default_rng(3)
    masks = np.zeros((6, 16, 16), dtype=bool)
    masks[3:, 4:9, 5:11] = True
    maps = rng.normal(size=masks.shape) + masks
    assert aupimo(masks, np.exp(3 * maps), (1e-3, 1e-1)) == pytest.approx(
        aupimo(masks, maps, (1e-3, 1e-1)), abs=1e-12
    )


def test_class_without_normal_or_anomalous_images_is_undefined_with_a_reason() -> None:
    masks, maps = one_normal_one_anomalous([0.5])
    with pytest.raises(UndefinedMetricError, match="no normal images"):
        aupimo(masks[1:], maps[1:])
    with pytest.raises(UndefinedMetricError, match="no anomalous images"):
        aupimo(masks[:1], maps[:1])


@pytest.mark.parametrize("bounds", [(1e-4, 1e-5), (0.0, 0.1), (0.1, 1.5), (0.1,)])
def test_bad_fpr_bounds_are_rejected_naming_the_parameter(bounds: tuple) -> None:
    masks, maps = one_normal_one_anomalous([0.5])
    with pytest.raises(ValueError, match="fpr_bounds"):
        aupimo(masks, maps, bounds)


def test_evaluator_adds_an_aupimo_row_only_when_asked() -> None:
    rng = np.random.default_rng(1)
    masks = np.zeros((10, 16, 16), dtype=bool)
    masks[5:, 3:8, 4:10] = True
    masks[5:, 12, 12] = True
    maps = (rng.normal(size=masks.shape) + 1.2 * masks).astype(np.float32)
    labels = masks.any(axis=(1, 2)).astype(int)
    scores = maps.max(axis=(1, 2))
    classes = ["a"] * 7 + ["b"] * 3  # class b: only anomalous images

    def rows(**options: object):
        evaluator = Evaluator(dataset="toy", pro=None, storage="memory", **options)
        evaluator.update(classes, labels, scores, masks=masks, maps=maps)
        return evaluator.compute()

    plain, with_aupimo = rows(), rows(aupimo=True, aupimo_fpr_bounds=(1e-3, 1e-1))
    assert "aupimo" not in set(plain.metric)
    aupimo_rows = with_aupimo[with_aupimo.metric == "aupimo"].set_index("class_name")
    in_a = np.array(classes) == "a"
    assert aupimo_rows.loc["a", "value"] == aupimo(masks[in_a], maps[in_a], (1e-3, 1e-1))
    assert np.isnan(aupimo_rows.loc["b", "value"]) and "no normal images" in aupimo_rows.loc["b", "note"]
    assert aupimo_rows.loc["mean", "value"] == aupimo_rows.loc["a", "value"]
    assert aupimo_rows.loc["mean", "n_classes"] == 1
    assert with_aupimo[with_aupimo.metric != "aupimo"].reset_index(drop=True).equals(plain)
