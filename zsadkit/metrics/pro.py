"""Per-region overlap (PRO) metrics: the exact MVTec AD AU-PRO and the 200-threshold variant of the papers.

A region is an 8-connected component of a ground-truth mask. At a threshold t, its overlap is the fraction of
its pixels scored above t; PRO(t) is the mean overlap over all regions of all images, plotted against the
false-positive rate FPR(t) over all normal pixels of all images (images without defects add only normal
pixels). Two integrals of this curve are in use:

* `aupro`: the official MVTec AD definition (Bergmann et al., `mvtec_ad_evaluation`): the exact curve over
  every distinct score (`score >= t`), integrated with the trapezoid rule up to FPR = `fpr_limit`
  (interpolating the last segment) and divided by `fpr_limit`. Invariant to monotone transforms of the maps.
* `aupro_cflow200`: cflow-ad's `cal_pro_score`, copied into VAND/April-GAN and AnomalyCLIP's `metrics.py`:
  ~200 thresholds spaced evenly in score value (`score > t`), points with FPR < 0.3 kept, their FPRs min-max
  rescaled to [0, 1] before `sklearn.metrics.auc`. It depends on the spread of the score values, so a
  monotone transform of the maps changes it.

Both are computed from one sort of the normal pixels and one labelling of the masks, never relabelling the
masks per threshold as the reference does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import auc

from zsadkit.metrics.scores import PixelScores
from zsadkit.metrics.validation import UndefinedMetricError, pixel_inputs

__all__ = [
    "aupro",
    "aupro_cflow200",
    "cflow200_aupro",
    "CFLOW_MAX_FPR",
    "CFLOW_STEPS",
    "exact_aupro",
]

CFLOW_STEPS = 200
CFLOW_MAX_FPR = 0.3


def _require_regions_and_normals(pixels: PixelScores) -> None:
    if pixels.n_regions == 0:
        raise UndefinedMetricError("no anomalous regions in the ground-truth masks")
    if pixels.ranked.normal.size == 0:
        raise UndefinedMetricError("no normal pixels in the ground-truth masks")


def _largest_count_within(fpr_limit: float, n_normal: int) -> int:
    """The largest n in [0, n_normal] whose FPR n / n_normal (float64, as the reference) is <= fpr_limit."""
    count = min(int(np.floor(fpr_limit * n_normal)), n_normal)
    while count < n_normal and (count + 1) / n_normal <= fpr_limit:
        count += 1
    while count > 0 and count / n_normal > fpr_limit:
        count -= 1
    return count


def exact_aupro(pixels: PixelScores, fpr_limit: float = 0.3) -> float:
    """Normalised area under the exact PRO curve up to `fpr_limit` (official MVTec AD AU-PRO).

    The exact curve has one point per distinct score t (taking the last point of every run of tied scores):
    (FPR(>= t), PRO(>= t)), starting at (0, 0). Between two distinct normal scores v' > v the curve rises
    vertically (anomalous scores in between add overlap at a fixed FPR) and then runs from
    (FPR(> v), PRO(> v)) to (FPR(>= v), PRO(>= v)). The trapezoids therefore sum to
    sum over kept normal pixels of [PRO(> v) + PRO(>= v)] / (2 N_neg), which, swapping the sums, is
    sum over anomalous pixels of w_i (#kept normals below s_i + #kept normals tied with s_i / 2) / N_neg,
    with w_i = 1 / (area of the pixel's region x number of regions). "Kept" normals are those scored at or
    above the lowest threshold whose FPR is <= fpr_limit; the segment that crosses fpr_limit is added up to
    fpr_limit by linear interpolation, as `mvtec_ad_evaluation`'s `trapezoid` does.

    Args:
        pixels: the class's pixel scores and regions.
        fpr_limit: integration limit in (0, 1].

    Returns:
        The area divided by `fpr_limit`, in [0, 1].
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    _require_regions_and_normals(pixels)
    normal = pixels.ranked.normal
    n_normal = normal.size
    weights = 1.0 / (pixels.region_areas[pixels.region_ids] * pixels.n_regions)

    # Number of normals at or above the lowest threshold with FPR <= limit: never split a run of ties.
    n_kept = _largest_count_within(fpr_limit, n_normal)
    if 0 < n_kept < n_normal and normal[n_normal - n_kept] == normal[n_normal - n_kept - 1]:
        n_kept = n_normal - int(np.searchsorted(normal, normal[n_normal - n_kept], side="right"))
    first_kept = n_normal - n_kept

    scores = pixels.ranked.anomalous
    below = np.maximum(np.searchsorted(normal, scores, side="left") - first_kept, 0)
    below_or_tied = np.maximum(np.searchsorted(normal, scores, side="right") - first_kept, 0)
    area = float(np.dot(weights, below + below_or_tied)) / (2 * n_normal)

    fpr_kept = n_kept / n_normal
    if n_kept < n_normal and fpr_kept < fpr_limit:
        # Partial trapezoid towards the next point, (FPR(>= v), PRO(>= v)) for the next normal score v.
        next_normal = normal[first_kept - 1]
        fpr_next = (n_normal - int(np.searchsorted(normal, next_normal, side="left"))) / n_normal
        pro_before = min(float(weights[scores > next_normal].sum()), 1.0)
        pro_next = min(float(weights[scores >= next_normal].sum()), 1.0)
        pro_at_limit = pro_before + (pro_next - pro_before) * (fpr_limit - fpr_kept) / (fpr_next - fpr_kept)
        area += 0.5 * (pro_at_limit + pro_before) * (fpr_limit - fpr_kept)
    return area / fpr_limit


def cflow200_aupro(pixels: PixelScores) -> float:
    """AnomalyCLIP / VAND / cflow-ad `cal_pro_score(masks, amaps, max_step=200, expect_fpr=0.3)`.

    Same thresholds (`np.arange(min, max, (max - min) / 200)` in the maps' precision), same `amap > t`, same
    pooled FPR and mean overlap over regions, same rescaling and `sklearn.metrics.auc`; the per-threshold
    region counts come from one histogram of the anomalous pixels over the thresholds.
    """
    _require_regions_and_normals(pixels)
    normal, anomalous = pixels.ranked.normal, pixels.ranked.anomalous
    lowest, highest = min(normal[0], anomalous[0]), max(normal[-1], anomalous[-1])
    if lowest == highest:
        raise UndefinedMetricError(f"every anomaly-map value equals {lowest}, so there are no thresholds")
    thresholds = np.arange(lowest, highest, (highest - lowest) / CFLOW_STEPS)
    n_thresholds = thresholds.size

    false_positives = normal.size - np.searchsorted(normal, thresholds, side="right")
    fprs = false_positives / normal.size

    # Pixel i is predicted anomalous at thresholds j < k_i, where k_i = number of thresholds below its score.
    k = np.searchsorted(thresholds, anomalous, side="left")
    histogram = np.bincount(
        pixels.region_ids.astype(np.int64) * (n_thresholds + 1) + k,
        minlength=pixels.n_regions * (n_thresholds + 1),
    ).reshape(pixels.n_regions, n_thresholds + 1)
    true_positives = np.cumsum(histogram[:, ::-1], axis=1)[:, ::-1][:, 1:]  # (R, T): pixels with k_i > j
    overlaps = np.ascontiguousarray(true_positives.T) / pixels.region_areas  # (T, R)
    pros = overlaps.mean(axis=1)

    kept = fprs < CFLOW_MAX_FPR
    kept_fprs = fprs[kept]
    if kept_fprs.size < 2 or kept_fprs.max() == kept_fprs.min():
        raise UndefinedMetricError(
            f"{kept_fprs.size} threshold(s) with FPR < {CFLOW_MAX_FPR}, at {np.unique(kept_fprs).size} distinct "
            "FPR value(s): the rescaled curve has no width (the reference code fails or returns NaN here)"
        )
    rescaled_fprs = (kept_fprs - kept_fprs.min()) / (kept_fprs.max() - kept_fprs.min())
    return float(auc(rescaled_fprs, pros[kept]))


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
    """Official MVTec AD AU-PRO of `maps` (N, H, W) against `masks` (N, H, W) 0/1, normalised by `fpr_limit`."""
    return exact_aupro(PixelScores.from_maps(*pixel_inputs(masks, maps)), fpr_limit)


def aupro_cflow200(masks: Any, maps: Any) -> float:
    """AU-PRO as AnomalyCLIP and VAND/April-GAN report it (200 score-spaced thresholds, FPR < 0.3 rescaled)."""
    return cflow200_aupro(PixelScores.from_maps(*pixel_inputs(masks, maps)))
