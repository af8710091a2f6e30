"""Scores split by ground truth and sorted once: the shared input of every metric.

Sorting the normal scores is the only O(n log n) step of an evaluation. AUROC, AP and F1-max then need only
binary searches of the anomalous scores into the sorted normal scores; both AU-PRO variants add the
ground-truth regions (8-connected components of each mask), labelled once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from zsadkit.metrics.validation import UndefinedMetricError

__all__ = [
    "label_regions",
    "PixelScores",
    "RankedScores",
]

# 8-connectivity inside each (H, W) frame of an (N, H, W) stack, no connection between frames.
_IN_FRAME_8_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
_IN_FRAME_8_CONNECTED[1] = True


@dataclass(frozen=True)
class RankedScores:
    """Normal and anomalous scores, each sorted ascending.

    Attributes:
        normal: (N_neg,) scores of the normal samples or pixels, ascending.
        anomalous: (N_pos,) scores of the anomalous samples or pixels, ascending.
        unit: what a score belongs to ("images" or "pixels"), used in messages.
    """

    normal: np.ndarray
    anomalous: np.ndarray
    unit: str

    @classmethod
    def from_labels(cls, labels: np.ndarray, scores: np.ndarray, unit: str) -> RankedScores:
        """Split `scores` (any shape) by the bool `labels` of the same shape and sort each part."""
        normal, anomalous = scores[~labels], scores[labels]
        normal.sort()
        anomalous.sort()
        return cls(normal=normal, anomalous=anomalous, unit=unit)

    def require_both_classes(self) -> None:
        """Raise `UndefinedMetricError` unless both normal and anomalous scores exist."""
        if self.anomalous.size == 0:
            raise UndefinedMetricError(f"no anomalous {self.unit} (only {self.normal.size} normal)")
        if self.normal.size == 0:
            raise UndefinedMetricError(f"no normal {self.unit} (only {self.anomalous.size} anomalous)")


@dataclass(frozen=True)
class PixelScores:
    """Pixel scores of a stack of maps, with the ground-truth region of every anomalous pixel.

    Attributes:
        ranked: the normal and anomalous pixel scores, sorted.
        region_ids: (N_pos,) index in 0..R-1 of the region of each pixel of `ranked.anomalous` (same order).
        region_areas: (R,) number of pixels of each region.
    """

    ranked: RankedScores
    region_ids: np.ndarray
    region_areas: np.ndarray

    @classmethod
    def from_maps(cls, masks: np.ndarray, maps: np.ndarray) -> PixelScores:
        """Label the regions of `masks` (N, H, W) bool and split `maps` (N, H, W) by them.

        Regions are the 8-connected components of each mask (the MVTec AD definition, also skimage's default
        for 2-D labels); they are numbered across the stack in raster order, frame after frame.
        """
        labels = label_regions(masks)
        region_ids = labels[masks] - 1
        del labels
        anomalous = maps[masks]
        order = np.argsort(anomalous, kind="stable")
        normal = maps[~masks]
        normal.sort()
        return cls(
            ranked=RankedScores(normal=normal, anomalous=anomalous[order], unit="pixels"),
            region_ids=region_ids[order],
            region_areas=np.bincount(region_ids).astype(np.int64),
        )

    @property
    def n_regions(self) -> int:
        return int(self.region_areas.size)


def label_regions(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) region number of each pixel of `masks` (N, H, W) bool, 0 outside the masks.

    Regions are the 8-connected components of each frame, numbered 1, 2, ... across the stack in raster
    order, frame after frame.
    """
    labels, _ = ndimage.label(masks, structure=_IN_FRAME_8_CONNECTED)
    return labels
