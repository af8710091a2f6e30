"""Image and pixel AUROC / AP / F1-max against scikit-learn and brute force, and input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from zsadkit.metrics import (
    UndefinedMetricError,
    f1_max,
    image_ap,
    image_auroc,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
)


def _image_case(seed: int, tie_decimals: int | None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(60) < 0.4
    labels[:2] = [False, True]
    scores = rng.normal(size=60) + labels * rng.uniform(0, 2)
    if tie_decimals is not None:
        scores = np.round(scores, tie_decimals)
    return labels.astype(int), scores


def _pixel_case(seed: int, tie_decimals: int | None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((5, 24, 20), dtype=bool)
    masks[1, 3:9, 4:11] = True
    masks[3, 10:20, 12:18] = True
    masks[3, 2, 2] = True
    maps = (rng.normal(size=masks.shape) + 1.2 * masks).astype(np.float32)
    if tie_decimals is not None:
        maps = np.round(maps, tie_decimals)
    return masks, maps


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tie_decimals", [None, 1])
def test_image_auroc_and_ap_equal_sklearn(seed: int, tie_decimals: int | None) -> None:
    labels, scores = _image_case(seed, tie_decimals)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_ap(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("tie_decimals", [None, 1])
def test_pixel_auroc_and_ap_equal_sklearn_on_pooled_pixels(seed: int, tie_decimals: int | None) -> None:
    masks, maps = _pixel_case(seed, tie_decimals)
    expected_auroc = roc_auc_score(masks.ravel(), maps.ravel())
    expected_ap = average_precision_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected_auroc, abs=1e-12)
    assert pixel_ap(masks, maps) == pytest.approx(expected_ap, abs=1e-12)


def _brute_force_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    return max(f1_score(labels, scores >= threshold) for threshold in np.unique(scores))


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("tie_decimals", [None, 1])
def test_f1_max_equals_brute_force_maximum_over_thresholds(seed: int, tie_decimals: int | None) -> None:
    labels, scores = _image_case(seed, tie_decimals)
    assert f1_max(labels, scores) == pytest.approx(_brute_force_f1_max(labels, scores), abs=1e-12)
    masks, maps = _pixel_case(seed, 1 if tie_decimals else 2)
    assert pixel_f1_max(masks, maps) == pytest.approx(
        _brute_force_f1_max(masks.ravel().astype(int), maps.ravel()), abs=1e-12
    )


def test_hand_computed_image_metrics() -> None:
    labels, scores = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert image_auroc(labels, scores) == 0.75  # 3 of 4 (anomalous, normal) pairs ordered correctly
    assert image_ap(labels, scores) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert f1_max(labels, scores) == pytest.approx(0.8)  # threshold 0.35: TP 2, FP 1 -> 4 / 5


def test_tied_scores_count_half_in_auroc() -> None:
    assert image_auroc([0, 1], [0.5, 0.5]) == 0.5
    assert image_auroc([0, 0, 1], [0.2, 0.5, 0.5]) == 0.75


def test_torch_tensors_give_the_same_values_as_numpy() -> None:
    masks, maps = _pixel_case(4, None)
    labels, scores = _image_case(4, None)
    assert pixel_auroc(torch.from_numpy(masks), torch.from_numpy(maps)) == pixel_auroc(masks, maps)
    assert image_ap(torch.from_numpy(labels), torch.from_numpy(scores)) == image_ap(labels, scores)
    assert pixel_ap(torch.from_numpy(masks[:, None]).float(), torch.from_numpy(maps[:, None])) == pixel_ap(
        masks, maps
    )


def test_single_class_input_is_undefined_with_a_reason() -> None:
    with pytest.raises(UndefinedMetricError, match="no normal images"):
        image_auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(UndefinedMetricError, match="no anomalous pixels"):
        pixel_auroc(np.zeros((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4)))


def test_non_finite_score_is_an_error_naming_the_sample() -> None:
    maps = np.zeros((3, 4, 4), dtype=np.float32)
    maps[2, 1, 1] = np.nan
    masks = np.zeros((3, 4, 4))
    masks[0, 0, 0] = 1
    with pytest.raises(ValueError, match="sample 2 has 1 non-finite"):
        pixel_auroc(masks, maps)
    with pytest.raises(ValueError, match="sample 1 has 1 non-finite"):
        image_auroc([0, 1, 0], [0.1, np.inf, 0.3])


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"masks \(2, 4, 4\) and maps \(2, 4, 5\)"):
        pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match=r"sample 1 has shape \(4, 5\)"):
        pixel_auroc([np.zeros((4, 4)), np.zeros((4, 5))], [np.zeros((4, 4)), np.zeros((4, 4))])
    with pytest.raises(ValueError, match="labels and scores must both have shape"):
        image_auroc([0, 1, 1], [0.1, 0.2])


def test_soft_masks_are_rejected_naming_the_sample() -> None:
    masks = np.zeros((2, 4, 4))
    masks[1, 2, 2] = 0.7
    with pytest.raises(ValueError, match="sample 1 holds 0.7"):
        pixel_auroc(masks, np.zeros((2, 4, 4)))
