"""Accumulate scores and maps per class, batch by batch, and compute tidy metric rows.

A class's maps are kept (in memory or in a temporary file) only until the class is computed, so a dataset's
maps never sit in memory at once: exact pixel AUROC/AP and both AU-PRO variants need the class's full-precision
maps, and nothing else is kept once its rows exist.

With ``device=`` (e.g. "cuda") the maps stay where the detector made them: a class's pixel AUROC, AP and F1-max
are computed there (`zsadkit.metrics.device`: one sort on the device, the same counts and formulas, identical
values); the maps come to the CPU only for what needs connected components or per-image curves (AU-PRO, AUPIMO)
or for `class_hook`. Without it (the default) everything runs on the CPU with numpy, as before.

Example:
    >>> ev = Evaluator(dataset="toy", pro=None)
    >>> ev.update(["a"] * 4, [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    >>> rows = ev.compute()
    >>> float(rows.query("class_name == 'a' and metric == 'auroc'").value.iloc[0])
    0.75
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from zsadkit.metrics.aupimo import AUPIMO_FPR_BOUNDS, aupimo, check_fpr_bounds
from zsadkit.metrics.device import (
    DeviceRanked,
    device_auroc,
    device_average_precision,
    device_max_f1,
    device_pixel_inputs,
)
from zsadkit.metrics.pro import cflow200_aupro, exact_aupro
from zsadkit.metrics.ranking import auroc, average_precision, max_f1
from zsadkit.metrics.scores import PixelScores, RankedScores
from zsadkit.metrics.validation import UndefinedMetricError, image_inputs, pixel_inputs

__all__ = [
    "ClassSamples",
    "Evaluator",
    "mad",
    "MEAN_CLASS_NAME",
    "PRO_METRICS",
    "ROW_COLUMNS",
]

ProVariant = Literal["cflow200", "exact", "both"]
PRO_METRICS: dict[str | None, tuple[str, ...]] = {
    "cflow200": ("aupro_cflow200",),
    "exact": ("aupro",),
    "both": ("aupro_cflow200", "aupro"),
    None: (),
}
ROW_COLUMNS = [
    "dataset",
    "class_name",
    "level",
    "metric",
    "value",
    "note",
    "n_classes",
    "n_images",
    "n_anomalous",
]
MEAN_CLASS_NAME = "mean"


class _FrameStore:
    """(H, W) frames of one class, appended in chunks, in memory or in a file; read back once as (N, H, W)."""

    def __init__(self, path: Path | None, frame_shape: tuple[int, int], dtype: np.dtype) -> None:
        self.path, self.frame_shape, self.dtype = path, frame_shape, dtype
        self.chunks: list[np.ndarray] = []

    def append(self, frames: np.ndarray) -> None:
        if self.path is None:
            self.chunks.append(np.array(frames, dtype=self.dtype))  # a copy: callers may reuse their buffers
        else:
            with open(self.path, "ab") as file:
                np.ascontiguousarray(frames, dtype=self.dtype).tofile(file)

    def read_and_release(self) -> np.ndarray:
        if self.path is None:
            stack = np.concatenate(self.chunks)
            self.chunks.clear()
        else:
            stack = np.fromfile(self.path, dtype=self.dtype).reshape(-1, *self.frame_shape)
            self.path.unlink()
        return stack


@dataclass(frozen=True)
class ClassSamples:
    """One class's per-image data as the Evaluator received it: the input of `zsadkit.stats`' bootstrap.

    Attributes:
        dataset: dataset name.
        class_name: class name.
        sample_ids: (N,) names of the images (the `sample_ids` given to `update`, else "#<running index>").
        labels: (N,) bool, True = anomalous.
        scores: (N,) image scores.
        masks: (N, H, W) bool ground truth, or None (image-level data, or samples kept after the class).
        maps: (N, H, W) anomaly maps, or None.
    """

    dataset: str
    class_name: str
    sample_ids: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    masks: np.ndarray | None = None
    maps: np.ndarray | None = None


@dataclass
class _ClassBuffer:
    """Everything received for one class that its metrics still need."""

    labels: list[np.ndarray] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    sample_ids: list[str] = field(default_factory=list)
    masks: _FrameStore | None = None
    maps: _FrameStore | None = None
    device_masks: list[torch.Tensor] = field(default_factory=list)  # the device path's (B, H, W) chunks
    device_maps: list[torch.Tensor] = field(default_factory=list)
    has_pixels: bool | None = None  # set by the first batch; every batch of a class must agree


def _evaluate(metric: Callable[..., float], *args: Any) -> tuple[float, str]:
    """(value, "") or (NaN, reason) when the metric is undefined on this input."""
    try:
        return metric(*args), ""
    except UndefinedMetricError as undefined:
        return float("nan"), str(undefined)


class Evaluator:
    """Per-class metrics over a dataset, fed batch by batch.

    Args:
        dataset: dataset name written into every row.
        pro: AU-PRO variants to compute when maps are given: "cflow200" (AnomalyCLIP/VAND tables),
            "exact" (official MVTec AD), "both", or None.
        fpr_limit: integration limit of the exact AU-PRO (the cflow200 variant is fixed at FPR < 0.3).
        storage: where a class's maps and masks wait until the class is computed: "disk" (a temporary file
            per class, so memory holds one class at a time) or "memory".
        streaming: compute a class as soon as a batch brings a different class (classes must then arrive
            grouped; a class that comes back after that is an error).
        workdir: folder for the temporary files of storage="disk" (default: the system temporary folder).
        aupimo: add the pixel metric "aupimo" (`zsadkit.metrics.aupimo`, mean over the anomalous images).
        aupimo_fpr_bounds: its FPR integration range (L, U).
        keep_samples: keep every class's image labels, scores and sample ids after its rows are computed, for
            `samples()` (a bootstrap of the image metrics then needs no second pass).
        class_hook: called with each class's `ClassSamples`, masks and maps included, once its rows are
            computed and before its maps are freed (e.g. to bootstrap the pixel metrics in the same pass); the
            class's maps then stay in memory next to its sorted pixels, about twice the memory of one class.
        device: keep maps (tensors) on this device and compute the pixel ranking metrics there (see the module
            docstring); `storage` then does not apply to the maps. None (default): the CPU path.
    """

    def __init__(
        self,
        dataset: str,
        pro: ProVariant | None = "cflow200",
        fpr_limit: float = 0.3,
        storage: Literal["disk", "memory"] = "disk",
        streaming: bool = False,
        workdir: str | Path | None = None,
        aupimo: bool = False,
        aupimo_fpr_bounds: tuple[float, float] = AUPIMO_FPR_BOUNDS,
        keep_samples: bool = False,
        class_hook: Callable[[ClassSamples], None] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if pro not in PRO_METRICS:
            raise ValueError(f"pro must be one of {list(PRO_METRICS)}, got {pro!r}")
        if storage not in ("disk", "memory"):
            raise ValueError(f"storage must be 'disk' or 'memory', got {storage!r}")
        if not 0 < fpr_limit <= 1:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        self.dataset, self.pro, self.fpr_limit = dataset, pro, fpr_limit
        self.storage, self.streaming = storage, streaming
        self.aupimo, self.aupimo_fpr_bounds = aupimo, check_fpr_bounds(aupimo_fpr_bounds)
        self.keep_samples, self.class_hook = keep_samples, class_hook
        self.device = None if device is None else torch.device(device)
        self._kept: list[ClassSamples] = []
        self._tempdir = (
            tempfile.TemporaryDirectory(prefix="zsadkit-eval-", dir=workdir) if storage == "disk" else None
        )
        self._pending: dict[str, _ClassBuffer] = {}
        self._finished: dict[str, list[dict]] = {}
        self._n_samples = 0
        self._n_stores = 0
        self._current_class: str | None = None

    # ------------------------------------------------------------------ accumulation
    def update(
        self,
        class_names: Sequence[str],
        labels: Any,
        scores: Any,
        masks: Any = None,
        maps: Any = None,
        sample_ids: Sequence[str] | None = None,
    ) -> None:
        """Add one batch.

        Args:
            class_names: (B,) class of each sample.
            labels: (B,) 0/1 image labels, 1 = anomalous.
            scores: (B,) image anomaly scores.
            masks: (B, H, W) or (B, 1, H, W) 0/1 ground truth, or None for image-level-only data.
            maps: anomaly maps shaped like `masks`, or None.
            sample_ids: optional (B,) names (e.g. image paths) used in error messages.
        """
        class_names = list(class_names)
        batch_size = len(class_names)
        first = self._n_samples
        names = list(sample_ids) if sample_ids is not None else [f"#{first + i}" for i in range(batch_size)]
        if len(names) != batch_size:
            raise ValueError(f"sample_ids has {len(names)} entries for a batch of {batch_size} class names")
        if self.device is not None:  # image scores are few: they join the CPU path
            labels, scores = (value.cpu() if torch.is_tensor(value) else value for value in (labels, scores))
        label_array, score_array = image_inputs(labels, scores, names)
        if label_array.shape[0] != batch_size:
            raise ValueError(
                f"labels and scores have {label_array.shape[0]} entries, class_names {batch_size}"
            )
        if (masks is None) != (maps is None):
            raise ValueError("masks and maps must be given together (both None for image-level-only data)")
        mask_array = map_array = None
        if maps is not None and self.device is not None:
            mask_array, map_array = device_pixel_inputs(masks, torch.as_tensor(maps).to(self.device), names)
        elif maps is not None:
            mask_array, map_array = pixel_inputs(masks, maps, names)
            if mask_array.shape[0] != batch_size:
                raise ValueError(
                    f"masks and maps have {mask_array.shape[0]} frames for {batch_size} class names"
                )

        for class_name, rows in _runs(class_names):
            if class_name == MEAN_CLASS_NAME:
                raise ValueError(f"{MEAN_CLASS_NAME!r} is reserved for the mean rows; rename that class")
            if self.streaming and self._current_class not in (None, class_name):
                if self._current_class in self._pending:
                    self.finish_class(self._current_class)
            self._current_class = class_name
            if class_name in self._finished:
                raise ValueError(
                    f"{names[rows.start]}: class {class_name!r} was already computed; with streaming=True the "
                    "classes must arrive grouped (or call finish_class only after a class's last batch)"
                )
            buffer = self._pending.setdefault(class_name, _ClassBuffer())
            buffer.labels.append(label_array[rows].copy())
            buffer.scores.append(score_array[rows].copy())
            buffer.sample_ids.extend(names[rows])
            self._add_frames(class_name, buffer, mask_array, map_array, rows, names)
        self._n_samples += batch_size

    def _add_frames(
        self,
        class_name: str,
        buffer: _ClassBuffer,
        masks: np.ndarray | None,
        maps: np.ndarray | None,
        rows: slice,
        names: list[str],
    ) -> None:
        has_pixels = maps is not None
        if buffer.has_pixels is None:
            buffer.has_pixels = has_pixels
        if buffer.has_pixels != has_pixels:
            raise ValueError(
                f"{names[rows.start]}: class {class_name!r} got batches with and without masks/maps; "
                "give maps for every batch of a class or for none"
            )
        if maps is None or masks is None:
            return
        if self.device is not None:
            self._add_device_frames(class_name, buffer, masks, maps, rows, names)
            return
        if buffer.maps is None or buffer.masks is None:
            frame_shape = maps.shape[1:]
            buffer.maps = _FrameStore(self._file("maps"), frame_shape, maps.dtype)
            buffer.masks = _FrameStore(self._file("masks"), frame_shape, np.dtype(bool))
        if maps.shape[1:] != buffer.maps.frame_shape:
            raise ValueError(
                f"{names[rows.start]}: maps of class {class_name!r} are {maps.shape[1:]}, earlier ones "
                f"{buffer.maps.frame_shape}; resize every map of a class to one size"
            )
        if maps.dtype != buffer.maps.dtype:
            raise ValueError(
                f"{names[rows.start]}: maps of class {class_name!r} are {maps.dtype}, earlier ones "
                f"{buffer.maps.dtype}; keep one precision per class"
            )
        buffer.maps.append(maps[rows])
        buffer.masks.append(masks[rows])

    @staticmethod
    def _add_device_frames(
        class_name: str, buffer: _ClassBuffer, masks: torch.Tensor, maps: torch.Tensor, rows: slice, names: list[str]
    ) -> None:
        if buffer.device_maps and (maps.shape[1:] != buffer.device_maps[0].shape[1:]
                                   or maps.dtype != buffer.device_maps[0].dtype):
            first = buffer.device_maps[0]
            raise ValueError(
                f"{names[rows.start]}: maps of class {class_name!r} are {maps.dtype} {tuple(maps.shape[1:])}, "
                f"earlier ones {first.dtype} {tuple(first.shape[1:])}; keep one size and precision per class"
            )
        buffer.device_maps.append(maps[rows].clone())  # a copy: callers may reuse their buffers
        buffer.device_masks.append(masks[rows].clone())

    def _file(self, kind: str) -> Path | None:
        if self._tempdir is None:
            return None
        self._n_stores += 1
        return Path(self._tempdir.name) / f"{self._n_stores:05d}_{kind}.bin"

    # ------------------------------------------------------------------ computation
    def finish_class(self, class_name: str) -> pd.DataFrame:
        """Compute one class's rows now and free its stored maps; later batches of it are an error."""
        if class_name not in self._pending:
            known = sorted(set(self._pending) | set(self._finished))
            raise KeyError(f"class {class_name!r} has no pending samples; classes seen: {known}")
        self._finished[class_name] = self._class_rows(class_name, self._pending.pop(class_name))
        return pd.DataFrame(self._finished[class_name], columns=ROW_COLUMNS)

    def compute(self) -> pd.DataFrame:
        """Rows of every class (computing those still pending), then one mean row per (level, metric).

        Returns:
            Columns dataset, class_name, level ("image" | "pixel"), metric, value (a fraction), note (why the
            value is NaN, or what a mean skipped), n_classes (classes the value averages), n_images,
            n_anomalous. Means are unweighted over classes and skip NaN.
        """
        for class_name in list(self._pending):
            self.finish_class(class_name)
        class_rows = pd.DataFrame(
            [row for rows in self._finished.values() for row in rows], columns=ROW_COLUMNS
        ).astype({"value": float})
        return pd.concat([class_rows, self._mean_rows(class_rows)], ignore_index=True)

    def samples(self) -> pd.DataFrame:
        """Image scores of the computed classes (needs keep_samples=True).

        Returns:
            Columns dataset, class_name, sample_id, label (0/1), score; one row per image, classes in the order
            they were computed.
        """
        if not self.keep_samples:
            raise ValueError("samples() needs Evaluator(keep_samples=True)")
        return pd.DataFrame(
            {
                "dataset": self.dataset,
                "class_name": np.concatenate([[kept.class_name] * kept.labels.size for kept in self._kept]),
                "sample_id": np.concatenate([kept.sample_ids for kept in self._kept]),
                "label": np.concatenate([kept.labels for kept in self._kept]).astype(int),
                "score": np.concatenate([kept.scores for kept in self._kept]),
            }
            if self._kept
            else {column: [] for column in ["dataset", "class_name", "sample_id", "label", "score"]}
        )

    def close(self) -> None:
        """Delete the temporary files of classes not computed yet."""
        if self._tempdir is not None:
            self._tempdir.cleanup()

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _class_rows(self, class_name: str, buffer: _ClassBuffer) -> list[dict]:
        labels, scores = np.concatenate(buffer.labels), np.concatenate(buffer.scores)
        counts = {"n_images": int(labels.size), "n_anomalous": int(labels.sum())}

        def row(level: str, metric: str, outcome: tuple[float, str]) -> dict:
            value, note = outcome
            return dict(
                self._row_key(class_name, level, metric), value=value, note=note, n_classes=1, **counts
            )

        images = RankedScores.from_labels(labels, scores, unit="images")
        rows = [
            row("image", "auroc", _evaluate(auroc, images)),
            row("image", "ap", _evaluate(average_precision, images)),
            row("image", "f1_max", _evaluate(max_f1, images)),
        ]
        samples = ClassSamples(
            self.dataset, class_name, np.array(buffer.sample_ids, dtype=str), labels, scores
        )
        if buffer.device_maps:
            rows += self._device_pixel_rows(buffer, row)
            needs_cpu = bool(PRO_METRICS[self.pro]) or self.aupimo or self.class_hook is not None
            if needs_cpu:
                masks, maps = (torch.cat(chunks).cpu().numpy() for chunks in (buffer.device_masks, buffer.device_maps))
            buffer.device_masks.clear()
            buffer.device_maps.clear()
            if needs_cpu:
                if PRO_METRICS[self.pro]:
                    rows += self._pro_rows(PixelScores.from_maps(masks, maps), row)
                if self.aupimo:
                    rows.append(row("pixel", "aupimo", _evaluate(aupimo, masks, maps, self.aupimo_fpr_bounds)))
                if self.class_hook is not None:
                    samples = replace(samples, masks=masks, maps=maps)
                del masks, maps
        elif buffer.maps is not None and buffer.masks is not None:
            masks, maps = buffer.masks.read_and_release(), buffer.maps.read_and_release()
            aupimo_rows = (
                [row("pixel", "aupimo", _evaluate(aupimo, masks, maps, self.aupimo_fpr_bounds))]
                if self.aupimo
                else []
            )
            pixels = PixelScores.from_maps(masks, maps)
            if self.class_hook is not None:
                samples = replace(samples, masks=masks, maps=maps)
            del masks, maps
            rows += [
                row("pixel", "auroc", _evaluate(auroc, pixels.ranked)),
                row("pixel", "ap", _evaluate(average_precision, pixels.ranked)),
                row("pixel", "f1_max", _evaluate(max_f1, pixels.ranked)),
            ]
            rows += self._pro_rows(pixels, row)
            rows += aupimo_rows
        if self.class_hook is not None:
            self.class_hook(samples)
        if self.keep_samples:
            self._kept.append(ClassSamples(self.dataset, class_name, samples.sample_ids, labels, scores))
        return rows

    def _pro_rows(self, pixels: PixelScores, row: Callable[[str, str, tuple[float, str]], dict]) -> list[dict]:
        """The AU-PRO rows of `self.pro` (connected components: on the CPU)."""
        return [row("pixel", metric, _evaluate(exact_aupro, pixels, self.fpr_limit) if metric == "aupro"
                    else _evaluate(cflow200_aupro, pixels)) for metric in PRO_METRICS[self.pro]]

    @staticmethod
    def _device_pixel_rows(buffer: _ClassBuffer, row: Callable[[str, str, tuple[float, str]], dict]) -> list[dict]:
        """Pixel AUROC, AP and F1-max of a class's maps, sorted on their device."""
        ranked = DeviceRanked.from_labels(torch.cat(buffer.device_masks), torch.cat(buffer.device_maps))
        return [
            row("pixel", "auroc", _evaluate(device_auroc, ranked)),
            row("pixel", "ap", _evaluate(device_average_precision, ranked)),
            row("pixel", "f1_max", _evaluate(device_max_f1, ranked)),
        ]

    def _row_key(self, class_name: str, level: str, metric: str) -> dict:
        return {"dataset": self.dataset, "class_name": class_name, "level": level, "metric": metric}

    def _mean_rows(self, class_rows: pd.DataFrame) -> pd.DataFrame:
        means = []
        for (level, metric), group in class_rows.groupby(["level", "metric"], sort=False):
            defined = group[np.isfinite(group["value"])]
            skipped = group.loc[~np.isfinite(group["value"]), "class_name"].tolist()
            note = ""
            if skipped:
                note = (
                    f"mean over {len(defined)} of {len(group)} classes; undefined for {', '.join(skipped)}"
                    f" ({group.loc[~np.isfinite(group['value']), 'note'].iloc[0]})"
                )
            value = float(defined["value"].mean()) if len(defined) else float("nan")
            means.append(
                dict(
                    self._row_key(MEAN_CLASS_NAME, level, metric),
                    value=value,
                    note=note,
                    n_classes=len(defined),
                    n_images=int(group["n_images"].sum()),
                    n_anomalous=int(group["n_anomalous"].sum()),
                )
            )
        return pd.DataFrame(means, columns=ROW_COLUMNS)


def _runs(class_names: list[str]) -> list[tuple[str, slice]]:
    """Maximal runs of equal consecutive names, as (name, slice of the batch)."""
    runs: list[tuple[str, slice]] = []
    start = 0
    for index in range(1, len(class_names) + 1):
        if index == len(class_names) or class_names[index] != class_names[start]:
            runs.append((class_names[start], slice(start, index)))
            start = index
    return runs


def mad(rows: pd.DataFrame, metrics: Sequence[tuple[str, str]], name: str = "mad") -> pd.DataFrame:
    """mAD: the unweighted mean of an explicit list of (level, metric) values, per dataset and class.

    HeadCLIP reports "mAD" without listing its metrics, so the list is always explicit and recorded: every
    returned row's `metrics` column reads e.g. "image/auroc+image/ap". The mean rows' mAD is the mean of the
    dataset means, as a paper computes it from its table.

    Args:
        rows: `Evaluator.compute()` output (several datasets may be concatenated).
        metrics: (level, metric) pairs to average, e.g. [("pixel", "auroc"), ("pixel", "aupro_cflow200")].
        name: metric name of the new rows.

    Returns:
        One row per (dataset, class_name) with level = the common level (or "mixed"), metric = `name`, value,
        note (why it is NaN, if it is), n_classes (for mean rows, the fewest classes behind any component),
        and `metrics`.
    """
    wanted = list(dict.fromkeys((str(level), str(metric)) for level, metric in metrics))
    if not wanted:
        raise ValueError("mad needs at least one (level, metric) pair")
    available = set(zip(rows["level"], rows["metric"], strict=True))
    missing = [pair for pair in wanted if pair not in available]
    if missing:
        raise ValueError(f"mad: no rows for {missing}; available (level, metric) pairs: {sorted(available)}")
    levels = {level for level, _ in wanted}
    level = levels.pop() if len(levels) == 1 else "mixed"
    label = "+".join(f"{level}/{metric}" for level, metric in wanted)
    index = pd.MultiIndex.from_tuples(wanted, names=["level", "metric"])
    result = []
    for (dataset, class_name), group in rows.groupby(["dataset", "class_name"], sort=False):
        components = group.set_index(["level", "metric"]).reindex(index)
        values = components["value"].to_numpy(dtype=float)
        undefined = [
            f"{component_level}/{metric}"
            for (component_level, metric), value in zip(wanted, values, strict=True)
            if not np.isfinite(value)
        ]
        n_classes = components["n_classes"].min() if "n_classes" in components else np.nan
        result.append(
            {
                "dataset": dataset,
                "class_name": class_name,
                "level": level,
                "metric": name,
                "value": float("nan") if undefined else float(values.mean()),
                "note": f"undefined: {', '.join(undefined)}" if undefined else "",
                "n_classes": n_classes,
                "metrics": label,
            }
        )
    return pd.DataFrame(result)
