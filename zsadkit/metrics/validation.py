"""Input checks shared by every metric: arrays or tensors in, validated numpy arrays out.

Bad input (wrong shape, labels that are not 0/1, non-finite scores) is an error that names the offending
sample. Input on which a metric has no value (one class only, no anomalous region) raises
`UndefinedMetricError`, which the `Evaluator` turns into a NaN row with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "as_numpy",
    "image_inputs",
    "pixel_inputs",
    "UndefinedMetricError",
]


class UndefinedMetricError(ValueError):
    """The metric has no value on this input (for example, only normal images); the message says why."""


def as_numpy(values: Any) -> np.ndarray:
    """A numpy view or copy of an array-like or torch tensor (bfloat16 tensors become float32)."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # torch.Tensor, without importing torch
        tensor = values.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(values)


def _sample_name(index: int, sample_ids: Sequence[str] | None) -> str:
    return f"sample {index} ({sample_ids[index]!r})" if sample_ids is not None else f"sample {index}"


def _as_scores(values: Any, name: str) -> np.ndarray:
    """Real-valued scores; integers and booleans become float64, floats keep their precision."""
    array = as_numpy(values)
    if array.dtype.kind in "biu":
        return array.astype(np.float64)
    if array.dtype.kind != "f":
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    return array


def _binary(values: np.ndarray, name: str, sample_ids: Sequence[str] | None) -> np.ndarray:
    """A bool copy of a 0/1 array; any other value is an error naming the first sample that holds one."""
    if values.dtype == bool:
        return values
    is_binary = (values == 0) | (values == 1)
    if not is_binary.all():
        bad = np.argwhere(~is_binary)[0]
        raise ValueError(
            f"{name} must be 0/1 (or bool), but {_sample_name(int(bad[0]), sample_ids)} holds "
            f"{values[tuple(bad)].item()!r}; binarise soft masks first (AnomalyCLIP uses mask > 0.5)"
        )
    return values != 0


def _check_finite(values: np.ndarray, name: str, sample_ids: Sequence[str] | None) -> None:
    finite = np.isfinite(values)
    if not finite.all():
        per_sample = (~finite).reshape(len(values), -1).sum(axis=1)
        first = int(np.flatnonzero(per_sample)[0])
        raise ValueError(
            f"{name} of {_sample_name(first, sample_ids)} has {int(per_sample[first])} non-finite value(s) "
            f"(NaN or inf); {int((per_sample > 0).sum())} sample(s) are affected"
        )


def image_inputs(
    labels: Any, scores: Any, sample_ids: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validated image-level inputs.

    Args:
        labels: (N,) 0/1 ground truth, 1 = anomalous.
        scores: (N,) real anomaly scores, higher = more anomalous.
        sample_ids: optional (N,) names used in error messages.

    Returns:
        labels as (N,) bool and scores as (N,) float.
    """
    label_array, score_array = as_numpy(labels), _as_scores(scores, "scores")
    if label_array.ndim != 1 or score_array.shape != label_array.shape:
        raise ValueError(
            f"labels and scores must both have shape (N,), got {label_array.shape} and {score_array.shape}"
        )
    _check_finite(score_array, "score", sample_ids)
    return _binary(label_array, "labels", sample_ids), score_array


def _frames(values: Any, name: str, sample_ids: Sequence[str] | None) -> np.ndarray:
    """(N, H, W) from (N, H, W) or (N, 1, H, W), or from a list of (H, W) / (1, H, W) frames."""
    if isinstance(values, (list, tuple)):
        frames = [as_numpy(frame) for frame in values]
        for index, frame in enumerate(frames):
            if frame.shape != frames[0].shape:
                raise ValueError(
                    f"{name}: {_sample_name(index, sample_ids)} has shape {frame.shape}, "
                    f"but sample 0 has {frames[0].shape}"
                )
        values = np.stack(frames) if frames else np.zeros((0, 0, 0))
    array = as_numpy(values)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W) or (N, 1, H, W), got {array.shape}")
    return array


def pixel_inputs(
    masks: Any, maps: Any, sample_ids: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validated pixel-level inputs.

    Args:
        masks: (N, H, W) or (N, 1, H, W) ground-truth masks, bool or 0/1.
        maps: anomaly maps of the same shape, any real range.
        sample_ids: optional (N,) names used in error messages.

    Returns:
        masks as (N, H, W) bool and maps as (N, H, W) float (the input precision is kept).
    """
    mask_array, map_array = _frames(masks, "masks", sample_ids), _frames(maps, "maps", sample_ids)
    if map_array.dtype.kind in "biu":
        map_array = map_array.astype(np.float64)
    elif map_array.dtype.kind != "f":
        raise TypeError(f"maps must hold real numbers, got dtype {map_array.dtype}")
    if mask_array.shape != map_array.shape:
        first = f" (batch of {sample_ids[0]!r}, ...)" if sample_ids is not None and len(sample_ids) else ""
        raise ValueError(f"masks {mask_array.shape} and maps {map_array.shape} must have the same shape{first}")
    _check_finite(map_array, "anomaly map", sample_ids)
    return _binary(mask_array, "masks", sample_ids), map_array
