"""Per-image overlap (PIMO) curves and the area under them, AUPIMO (Bertoldo et al., BMVC 2024, arXiv 2401.01984).

Definition, as the paper's metric section and the authors' code state it. A threshold t predicts a pixel
anomalous when `score >= t`.

* The shared false-positive rate FPR(t) is measured on the **normal images only** (images whose mask has no
  anomalous pixel): the fraction of their pixels scored >= t. All maps of a class share one size, so this is
  the mean of the normal images' per-image FPRs, as the paper defines it. Normal pixels of anomalous images
  play no part.
* Each anomalous image i has its own curve: its overlap TPR_i(t), the fraction of its mask scored >= t, plotted
  against log10 FPR(t).
* AUPIMO_i is the area under that curve for FPR in [L, U] (default [1e-5, 1e-4]), divided by
  log10(U) - log10(L), so a perfect map scores 1. A class's AUPIMO is the mean over its anomalous images.

The curve is exact: its points are (FPR(t), TPR_i(t)) for every distinct normal-image score t (thresholds
between two of them change TPR_i but not FPR, a vertical step), joined by straight lines in log10 FPR and
integrated with the trapezoid rule. Between two consecutive normal scores v' > v the curve runs from
(FPR(> v), TPR_i(> v)) to (FPR(>= v), TPR_i(>= v)): flat unless some of the image's pixels tie with v, in which
case the line counts them half, as AUROC counts ties. Where [L, U] cuts a segment, the segment is interpolated
linearly in log10 FPR. Below the smallest positive FPR (fewer than 1 / L normal pixels, so FPR = L cannot be
reached) the curve stays at TPR_i(> highest normal score): the most permissive threshold that flags no
normal pixel. Values are clipped to [0, 1] against rounding.

Deviations from the reference (anomalib `metrics/pimo/functional.py: aupimo_scores`, from the authors'
`aupimo` package): it samples 300 000 thresholds evenly between the lowest and highest normal-image score
and integrates between the sampled FPRs closest to L and U (a warning when they miss by more than 1 %); here
every distinct score is a threshold and the bounds are met exactly. The reference refuses a range with 30 or
fewer sampled points; here a coarse range is integrated as it is.

Only the normal-image pixels scored at or above the c-th highest (c = floor(U n) + 1, n normal pixels) can
move FPR inside [L, U], so each normal image contributes only its c highest scores (with ties): the cost is one
partition of the normal images' pixels and one sort of each anomalous image's mask pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from zsadkit.metrics.validation import UndefinedMetricError, pixel_inputs

__all__ = ["AUPIMO_FPR_BOUNDS", "PimoCurves", "aupimo", "check_fpr_bounds", "per_image_aupimo"]

AUPIMO_FPR_BOUNDS = (1e-5, 1e-4)


def check_fpr_bounds(fpr_bounds: tuple[float, float]) -> tuple[float, float]:
    """`fpr_bounds` as two floats 0 < L < U <= 1, or a ValueError naming the parameter."""
    try:
        lower, upper = (float(bound) for bound in fpr_bounds)
    except (TypeError, ValueError) as error:
        raise ValueError(f"fpr_bounds must be two numbers (L, U), got {fpr_bounds!r}") from error
    if not 0 < lower < upper <= 1:
        raise ValueError(f"fpr_bounds must satisfy 0 < L < U <= 1, got {fpr_bounds!r}")
    return lower, upper


@dataclass(frozen=True)
class PimoCurves:
    """A class's PIMO curves at the candidate thresholds, ready to integrate for any image multiplicities.

    The bootstrap (`zsadkit.stats`) resamples images; a resample is a vector of multiplicities over the images
    of the stack, and the shared FPR becomes a weighted count over the normal images. `per_image` evaluates any
    number of such vectors at once; unit multiplicities give the plain AUPIMO.

    Attributes:
        fpr_bounds: the integration range (L, U).
        thresholds: (K,) candidate thresholds, the highest normal-image scores, distinct and descending.
        normal_images: (M,) stack indices of the normal images (masks without anomalous pixels).
        anomalous_images: (A,) stack indices of the anomalous images.
        normal_counts: (M, K) pixels of each normal image equal to each threshold.
        tpr_above: (A, K) TPR of each anomalous image with `score > threshold`.
        tpr_at_or_above: (A, K) TPR with `score >= threshold`.
        pixels_per_image: H x W.
        n_images: N, the images of the stack.
        max_normal_weight: the largest total multiplicity of the normal images `per_image` accepts.
    """

    fpr_bounds: tuple[float, float]
    thresholds: np.ndarray
    normal_images: np.ndarray
    anomalous_images: np.ndarray
    normal_counts: np.ndarray
    tpr_above: np.ndarray
    tpr_at_or_above: np.ndarray
    pixels_per_image: int
    n_images: int
    max_normal_weight: int

    @classmethod
    def from_maps(
        cls,
        masks: np.ndarray,
        maps: np.ndarray,
        fpr_bounds: tuple[float, float] = AUPIMO_FPR_BOUNDS,
        max_normal_weight: int | None = None,
    ) -> PimoCurves:
        """Prepare validated `masks` (N, H, W) bool and `maps` (N, H, W).

        Args:
            masks: ground truth; an image is normal when its mask is empty.
            maps: anomaly maps.
            fpr_bounds: integration range (L, U) of the shared FPR.
            max_normal_weight: the largest total multiplicity of the normal images that `per_image` will be
                given (default: the number of normal images, i.e. unit multiplicities); it sets how many of
                each normal image's highest scores are kept.

        Raises:
            UndefinedMetricError: no normal or no anomalous image.
        """
        lower, upper = check_fpr_bounds(fpr_bounds)
        is_anomalous = masks.reshape(masks.shape[0], -1).any(axis=1)
        normal_images, anomalous_images = np.flatnonzero(~is_anomalous), np.flatnonzero(is_anomalous)
        if anomalous_images.size == 0:
            raise UndefinedMetricError(f"no anomalous images (all {masks.shape[0]} masks are empty)")
        if normal_images.size == 0:
            raise UndefinedMetricError(
                f"no normal images (only {anomalous_images.size} anomalous): AUPIMO measures FPR on the images "
                "without anomalous pixels"
            )
        pixels_per_image = int(masks[0].size)
        weight = normal_images.size if max_normal_weight is None else int(max_normal_weight)
        # Pixels at or above the c-th highest normal score decide FPR up to U (module docstring).
        keep = min(int(np.floor(upper * weight * pixels_per_image)) + 1, pixels_per_image)
        tops = []
        for index in normal_images:
            frame = maps[index].ravel()
            kth = np.partition(frame, pixels_per_image - keep)[pixels_per_image - keep]
            tops.append(frame[frame >= kth])
        thresholds = np.unique(np.concatenate(tops))[::-1]
        ascending = thresholds[::-1]
        normal_counts = np.zeros((normal_images.size, thresholds.size), dtype=np.int64)
        for row, top in enumerate(tops):
            values, counts = np.unique(top, return_counts=True)
            normal_counts[row, thresholds.size - 1 - np.searchsorted(ascending, values)] = counts

        tpr_above = np.empty((anomalous_images.size, thresholds.size))
        tpr_at_or_above = np.empty_like(tpr_above)
        for row, index in enumerate(anomalous_images):
            region = np.sort(maps[index][masks[index]])
            tpr_above[row] = 1 - np.searchsorted(region, thresholds, side="right") / region.size
            tpr_at_or_above[row] = 1 - np.searchsorted(region, thresholds, side="left") / region.size
        return cls(
            fpr_bounds=(lower, upper),
            thresholds=thresholds,
            normal_images=normal_images,
            anomalous_images=anomalous_images,
            normal_counts=normal_counts,
            tpr_above=tpr_above,
            tpr_at_or_above=tpr_at_or_above,
            pixels_per_image=pixels_per_image,
            n_images=int(masks.shape[0]),
            max_normal_weight=weight,
        )

    def per_image(self, multiplicities: np.ndarray | None = None) -> np.ndarray:
        """AUPIMO of every anomalous image, for each row of image multiplicities.

        Args:
            multiplicities: (B, N) how often each image of the stack counts (a bootstrap resample), or None
                for unit multiplicities (B = 1).

        Returns:
            (B, A) AUPIMO of the anomalous images (`anomalous_images` order); a row whose normal images all
            have multiplicity 0 is NaN.
        """
        if multiplicities is None:
            multiplicities = np.ones((1, self.n_images), dtype=np.int64)
        normal_weights = np.asarray(multiplicities, dtype=np.float64)[:, self.normal_images]
        if normal_weights.sum(axis=1).max() > self.max_normal_weight:
            raise ValueError(
                f"multiplicities give the normal images a total weight of {normal_weights.sum(axis=1).max():g}, "
                f"more than the max_normal_weight={self.max_normal_weight} the curves were prepared for"
            )
        n_normal_pixels = normal_weights.sum(axis=1, keepdims=True) * self.pixels_per_image
        counts = np.cumsum(
            normal_weights @ self.normal_counts, axis=1
        )  # (B, K): weighted pixels >= threshold
        with np.errstate(divide="ignore", invalid="ignore"):
            log_fpr = np.log10(counts / n_normal_pixels)
        start = np.concatenate([np.full((log_fpr.shape[0], 1), -np.inf), log_fpr[:, :-1]], axis=1)
        end = log_fpr
        lower, upper = np.log10(self.fpr_bounds[0]), np.log10(self.fpr_bounds[1])
        low, high = np.maximum(start, lower), np.minimum(end, upper)
        width = np.maximum(high - low, 0.0)
        # Segment k runs from (start, TPR(> t_k)) to (end, TPR(>= t_k)); its clipped trapezoid is
        # width * TPR(> t_k) + slope part; a segment starting at FPR 0 (log -inf) is flat.
        sloped = (width > 0) & np.isfinite(start)
        with np.errstate(divide="ignore", invalid="ignore"):
            slope_weight = np.where(
                sloped, ((high - start) ** 2 - (low - start) ** 2) / (2 * (end - start)), 0.0
            )
        area = width @ self.tpr_above.T + slope_weight @ (self.tpr_at_or_above - self.tpr_above).T
        values = np.clip(area / (upper - lower), 0.0, 1.0)
        values[n_normal_pixels[:, 0] == 0] = np.nan
        return values


def per_image_aupimo(
    masks: Any, maps: Any, fpr_bounds: tuple[float, float] = AUPIMO_FPR_BOUNDS
) -> np.ndarray:
    """AUPIMO of each image of `maps` (N, H, W) against `masks` (N, H, W) 0/1; NaN for normal images.

    Raises:
        UndefinedMetricError: no normal image (empty mask) or no anomalous image in the stack.
    """
    mask_array, map_array = pixel_inputs(masks, maps)
    curves = PimoCurves.from_maps(mask_array, map_array, fpr_bounds)
    values = np.full(curves.n_images, np.nan)
    values[curves.anomalous_images] = curves.per_image()[0]
    return values


def aupimo(masks: Any, maps: Any, fpr_bounds: tuple[float, float] = AUPIMO_FPR_BOUNDS) -> float:
    """Mean AUPIMO over the anomalous images of `maps` (N, H, W) against `masks` (N, H, W) 0/1."""
    return float(PimoCurves.from_maps(*pixel_inputs(masks, maps), fpr_bounds).per_image()[0].mean())
