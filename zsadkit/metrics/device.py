"""AUROC, AP and F1-max of pixel scores where the maps are (a GPU): one sort per class on the device.

The same counts as `zsadkit.metrics.ranking` (which sorts on the CPU with numpy): the normal and anomalous
scores are sorted on the device, the anomalous ones are searched into the normal ones there
(`torch.searchsorted`), and only integer counts come back: AUROC's two sums of ranks, and for AP and F1-max the
(T,) true/false positives at the T distinct anomalous scores, which then go through the very formulas of
`ranking` (`average_precision_from_counts`, `max_f1_from_counts`). The values are therefore identical to the CPU
path's for the same float maps (tests/test_metrics_device.py).

Example:
    >>> import torch
    >>> ranked = DeviceRanked.from_labels(torch.tensor([False, False, True, True]), torch.tensor([.1, .4, .35, .8]))
    >>> device_auroc(ranked)
    0.75
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from zsadkit.metrics.ranking import average_precision_from_counts, max_f1_from_counts
from zsadkit.metrics.validation import UndefinedMetricError

__all__ = ["DeviceRanked", "device_auroc", "device_average_precision", "device_max_f1", "device_pixel_inputs"]


@dataclass(frozen=True)
class DeviceRanked:
    """Normal and anomalous scores, each sorted ascending, as tensors on one device (`RankedScores`' twin)."""

    normal: torch.Tensor
    anomalous: torch.Tensor
    unit: str = "pixels"

    @classmethod
    def from_labels(cls, labels: torch.Tensor, scores: torch.Tensor, unit: str = "pixels") -> DeviceRanked:
        """Split `scores` by the bool `labels` of the same shape and sort each part on their device."""
        return cls(scores[~labels].sort().values, scores[labels].sort().values, unit)

    def require_both_classes(self) -> None:
        """Raise `UndefinedMetricError` unless both normal and anomalous scores exist."""
        if self.anomalous.numel() == 0:
            raise UndefinedMetricError(f"no anomalous {self.unit} (only {self.normal.numel()} normal)")
        if self.normal.numel() == 0:
            raise UndefinedMetricError(f"no normal {self.unit} (only {self.anomalous.numel()} anomalous)")


def device_auroc(ranked: DeviceRanked) -> float:
    """P(anomalous > normal) + P(tie) / 2, counted exactly in int64 on the device."""
    ranked.require_both_classes()
    below = torch.searchsorted(ranked.normal, ranked.anomalous, side="left").sum(dtype=torch.int64)
    below_or_tied = torch.searchsorted(ranked.normal, ranked.anomalous, side="right").sum(dtype=torch.int64)
    return (int(below) + int(below_or_tied)) / (2 * ranked.anomalous.numel() * ranked.normal.numel())


def _threshold_counts(ranked: DeviceRanked) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T,) true positives, false positives and tie counts at the distinct anomalous scores, as int64 numpy."""
    ranked.require_both_classes()
    anomalous = ranked.anomalous
    first = torch.ones(1, dtype=torch.bool, device=anomalous.device)
    starts = torch.nonzero(torch.cat([first, anomalous[1:] != anomalous[:-1]])).squeeze(1)
    true_positives = anomalous.numel() - starts
    false_positives = ranked.normal.numel() - torch.searchsorted(ranked.normal, anomalous[starts], side="left")
    end = torch.tensor([anomalous.numel()], device=anomalous.device)
    tied = torch.diff(torch.cat([starts, end]))
    return tuple(counts.to(torch.int64).cpu().numpy() for counts in (true_positives, false_positives, tied))


def device_average_precision(ranked: DeviceRanked) -> float:
    """Average precision (`zsadkit.metrics.ranking.average_precision`) from counts made on the device."""
    return average_precision_from_counts(*_threshold_counts(ranked))


def device_max_f1(ranked: DeviceRanked) -> float:
    """F1-max (`zsadkit.metrics.ranking.max_f1`) from counts made on the device."""
    return max_f1_from_counts(*_threshold_counts(ranked))


def device_pixel_inputs(masks: torch.Tensor, maps: torch.Tensor, sample_ids: list[str]) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """Validated (N, H, W) bool masks and float maps on the maps' device (`validation.pixel_inputs`' checks)."""
    if not torch.is_tensor(maps) or not maps.is_floating_point():
        raise TypeError(f"maps must be a floating-point tensor on the device path, got {type(maps).__name__}"
                        f"{'' if not torch.is_tensor(maps) else ' ' + str(maps.dtype)}")
    masks = torch.as_tensor(masks).to(maps.device)
    frames = []
    for values, name in ((masks, "masks"), (maps, "maps")):
        if values.ndim == 4 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 3:
            raise ValueError(f"{name} must be (N, H, W) or (N, 1, H, W), got {tuple(values.shape)}")
        frames.append(values)
    masks, maps = frames
    if masks.shape != maps.shape:
        raise ValueError(f"masks {tuple(masks.shape)} and maps {tuple(maps.shape)} must have the same shape "
                         f"(batch of {sample_ids[0]!r}, ...)")
    if maps.dtype == torch.bfloat16:
        maps = maps.float()
    finite = torch.isfinite(maps).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = int(torch.nonzero(~finite)[0])
        raise ValueError(f"{sample_ids[bad]}: anomaly map has non-finite values (NaN or inf)")
    if masks.dtype != torch.bool:
        if not bool(((masks == 0) | (masks == 1)).all()):
            raise ValueError(f"masks must be 0/1 or bool (batch of {sample_ids[0]!r}, ...)")
        masks = masks.bool()
    return masks, maps
