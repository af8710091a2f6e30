"""Uncertainty and comparison of metric rows: bootstrap intervals, paired differences, ranks, seeds.

* **Bootstrap intervals** (Efron & Tibshirani 1993, ch. 13, percentile interval). A resample draws, within a
  class, the normal and the anomalous images separately with replacement (stratified: every resample keeps the
  class's counts), and recomputes the metric on the resampled images; pixel metrics take whole images with
  their masks and maps. The interval is the (1 - confidence) / 2 and (1 + confidence) / 2 percentiles of the
  resampled values (numpy's linear interpolation). The mean row's interval comes from the per-resample means
  over the classes, each class resampled independently.
* **Paired differences**: two methods on the same images, resampled with the same indices; the interval of the
  per-resample difference.
* **Ranks across datasets** (Demšar 2006, "Statistical comparisons of classifiers over multiple data sets",
  JMLR 7, Sec. 3.2.2): average ranks (ties averaged, higher metric = better), the Friedman chi², the
  Iman-Davenport F, the Nemenyi critical difference and its diagram.
* **Seeds**: mean ± std (ddof = 1) over seeds (few-shot prompt sets, training seeds), reported beside the
  bootstrap interval: the spread of the method over seeds and the sampling uncertainty of the test images are
  two different things.

Speed. A resample is a vector of multiplicities over the class's images. Image metrics sort the scores once
and compute every resample at once from per-resample counts at each distinct score (B x N integer matrices):
1000 resamples of AUROC, AP and F1-max over an MVTec AD-sized run take well under a second
(benchmarks/bench_stats.py). Pixel metrics sort the class's pixels once; a resample repeats each sorted pixel
by its image's multiplicity (which keeps the order), so each resample costs one pass over the pixels plus the
metric itself, exact and computed by the same functions as the Evaluator. AUPIMO resamples from its prepared
curves (`PimoCurves.per_image`), all resamples at once.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats as scipy_stats

from zsadkit.metrics.aupimo import AUPIMO_FPR_BOUNDS, PimoCurves, aupimo, check_fpr_bounds
from zsadkit.metrics.evaluator import MEAN_CLASS_NAME, PRO_METRICS, ClassSamples, ProVariant
from zsadkit.metrics.pro import cflow200_aupro, exact_aupro
from zsadkit.metrics.ranking import auroc, average_precision, max_f1
from zsadkit.metrics.scores import PixelScores, RankedScores, label_regions
from zsadkit.metrics.validation import UndefinedMetricError, image_inputs, pixel_inputs

__all__ = [
    "BOOTSTRAP_COLUMNS",
    "METRIC_NAMES",
    "PAIRED_COLUMNS",
    "BootstrapConfig",
    "ClassBootstrap",
    "FriedmanResult",
    "IMAGE_METRICS",
    "bootstrap",
    "bootstrap_class",
    "bootstrap_rows",
    "critical_difference_diagram",
    "friedman_test",
    "paired_difference",
    "resample_indices",
    "seed_summary",
    "uncertainty_table",
]

BOOTSTRAP_COLUMNS = [
    "dataset",
    "class_name",
    "level",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "confidence",
    "n_resamples",
    "bootstrap_seed",
    "note",
    "n_classes",
    "n_images",
    "n_anomalous",
]
IMAGE_METRICS = ("auroc", "ap", "f1_max")
METRIC_NAMES = (*IMAGE_METRICS, "aupro_cflow200", "aupro", "aupimo")
MetricKey = tuple[str, str]  # (level, metric)


# ---------------------------------------------------------------------------------------------- resampling
def resample_indices(
    labels: Any,
    n_resamples: int,
    seed: int,
    class_name: str = "",
    sample_ids: Sequence[str] | np.ndarray | None = None,
) -> np.ndarray:
    """Indices of stratified bootstrap resamples of one class's images.

    Row b holds, at the positions of the normal images, normal images drawn with replacement, and at the
    positions of the anomalous images, anomalous images drawn with replacement: `labels[indices[b]] == labels`.
    The generator is `np.random.default_rng([seed, crc32(class_name)])`, so every class has its own stream,
    independent of the other classes and of their order. With `sample_ids`, the draws are made over the images
    sorted by id, so the resampled images do not depend on the order in which they arrived: two runs over the
    same images get the same resamples (the paired comparison relies on it).

    Args:
        labels: (N,) 0/1 image labels.
        n_resamples: B, the number of resamples (>= 1).
        seed: a non-negative integer.
        class_name: names the class's random stream.
        sample_ids: optional (N,) unique image names.

    Returns:
        (B, N) int64 indices into the class's images.
    """
    label_array = np.asarray(labels).astype(bool)
    if label_array.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got {label_array.shape}")
    _check_resampling(n_resamples, seed)
    canonical = np.arange(label_array.size)
    if sample_ids is not None:
        ids = np.asarray(sample_ids, dtype=str)
        if ids.shape != label_array.shape:
            raise ValueError(f"sample_ids has shape {ids.shape}, labels {label_array.shape}")
        canonical = np.argsort(ids, kind="stable")
        repeated = ids[canonical][1:][ids[canonical][1:] == ids[canonical][:-1]]
        if repeated.size:
            raise ValueError(
                f"class {class_name!r}: sample_ids must be unique, {str(repeated[0])!r} appears more than once"
            )
    rng = np.random.default_rng([seed, zlib.crc32(class_name.encode())])
    indices = np.empty((n_resamples, label_array.size), dtype=np.int64)
    for stratum in (False, True):
        members = canonical[label_array[canonical] == stratum]  # this stratum's images, in canonical order
        positions = np.flatnonzero(label_array == stratum)
        indices[:, positions] = members[rng.integers(0, members.size, size=(n_resamples, members.size))]
    return indices


def _check_resampling(n_resamples: int, seed: int) -> None:
    if not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _multiplicities(indices: np.ndarray, n_images: int) -> np.ndarray:
    """(B, N) how often each image appears in each resample of `indices` (B, N)."""
    n_resamples = indices.shape[0]
    offsets = (indices + n_images * np.arange(n_resamples)[:, None]).ravel()
    return np.bincount(offsets, minlength=n_resamples * n_images).reshape(n_resamples, n_images)


# ---------------------------------------------------------------------------------------------- image metrics
def _image_draws(
    labels: np.ndarray, scores: np.ndarray, counts: np.ndarray, names: Sequence[str] = IMAGE_METRICS
) -> dict[str, np.ndarray]:
    """Image AUROC, AP and F1-max (those in `names`) of every resample at once.

    The scores are sorted once; a resample is its multiplicities `counts` (B, N). At each distinct score g
    (ascending), pos[b, g] and neg[b, g] count the resample's anomalous and normal images with that score; then
    AUROC = sum_g pos (2 neg_below + neg) / (2 N_pos N_neg), and with TP, FP the images at or above g,
    AP = sum_g pos TP / (TP + FP) / N_pos and F1-max = max_g 2 TP / (TP + FP + N_pos): the definitions of
    `zsadkit.metrics.ranking` on the resampled images, with the same integer counts.

    Returns:
        metric name -> (B,) values.
    """
    order = np.argsort(scores, kind="stable")
    sorted_scores, anomalous = scores[order], labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    counts = counts[:, order].astype(np.int64)
    pos = np.add.reduceat(counts * anomalous, starts, axis=1)  # (B, G)
    neg = np.add.reduceat(counts * ~anomalous, starts, axis=1)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    draws = {}
    if "auroc" in names:
        neg_below = np.cumsum(neg, axis=1) - neg
        draws["auroc"] = (pos * (2 * neg_below + neg)).sum(axis=1) / (2 * n_pos * n_neg)
    if "ap" in names or "f1_max" in names:
        true_positives = np.cumsum(pos[:, ::-1], axis=1)[:, ::-1]
        flagged = true_positives + np.cumsum(neg[:, ::-1], axis=1)[:, ::-1]
        if "ap" in names:
            precision = np.divide(true_positives, flagged, out=np.zeros(flagged.shape), where=flagged > 0)
            draws["ap"] = (pos * precision).sum(axis=1) / n_pos
        if "f1_max" in names:
            draws["f1_max"] = (2 * true_positives / (flagged + n_pos[:, None])).max(axis=1)
    return draws


# ---------------------------------------------------------------------------------------------- pixel metrics
class _PixelResampler:
    """A class's pixels sorted once; `scores(counts)` gives the `PixelScores` of a resample without sorting.

    Repeating each sorted pixel by the multiplicity of its image keeps the order, so the resample's sorted
    normal and anomalous pixels are `np.repeat` of the class's. Copy c of region r (of an image drawn w times)
    becomes region offset[r] + c, with the region's area.
    """

    def __init__(self, masks: np.ndarray, maps: np.ndarray) -> None:
        n_images = masks.shape[0]
        anomalous_per_image = masks.reshape(n_images, -1).sum(axis=1)
        pixels_per_image = masks[0].size
        frames = np.arange(n_images, dtype=np.int32)

        normal = maps[~masks]
        order = np.argsort(normal, kind="stable")
        self.normal = normal[order]
        self.normal_frames = np.repeat(frames, pixels_per_image - anomalous_per_image)[order]
        del normal, order

        region_ids = label_regions(masks)[masks] - 1
        anomalous_frames = np.repeat(frames, anomalous_per_image)
        anomalous = maps[masks]
        order = np.argsort(anomalous, kind="stable")  # the order of `PixelScores.from_maps`
        self.anomalous = anomalous[order]
        self.anomalous_frames = anomalous_frames[order]
        self.region_ids = region_ids[order]
        self.region_areas = np.bincount(region_ids).astype(np.int64)
        self.region_frames = np.zeros(self.region_areas.size, dtype=np.int32)
        self.region_frames[region_ids] = anomalous_frames

    def scores(self, counts: np.ndarray) -> PixelScores:
        """The pixel scores and regions of the resample with image multiplicities `counts` (N,)."""
        normal_weights = counts[self.normal_frames]
        anomalous_weights = counts[self.anomalous_frames]
        region_weights = counts[self.region_frames]
        region_offsets = np.cumsum(region_weights) - region_weights
        copy_starts = np.cumsum(anomalous_weights) - anomalous_weights
        n_copies = int(anomalous_weights.sum())
        copy_index = np.arange(n_copies) - np.repeat(copy_starts, anomalous_weights)
        return PixelScores(
            ranked=RankedScores(
                normal=np.repeat(self.normal, normal_weights),
                anomalous=np.repeat(self.anomalous, anomalous_weights),
                unit="pixels",
            ),
            region_ids=np.repeat(region_offsets[self.region_ids], anomalous_weights) + copy_index,
            region_areas=np.repeat(self.region_areas, region_weights),
        )


# ---------------------------------------------------------------------------------------------- one class
@dataclass(frozen=True)
class BootstrapConfig:
    """What to resample and which metrics to recompute; the metric options mirror the `Evaluator`'s.

    Attributes:
        n_resamples: B, resamples per class.
        seed: seeds each class's stream (`resample_indices`).
        levels: "image" and/or "pixel" (pixel metrics need masks and maps, and cost more: module docstring).
        pro: AU-PRO variants, as `Evaluator(pro=...)`.
        fpr_limit: integration limit of the exact AU-PRO.
        aupimo: also resample AUPIMO (as `Evaluator(aupimo=True)`).
        aupimo_fpr_bounds: its FPR range.
        metrics: only these metric names (of `METRIC_NAMES`, at every level in `levels`); None = all.
    """

    n_resamples: int = 1000
    seed: int = 0
    levels: tuple[str, ...] = ("image", "pixel")
    pro: ProVariant | None = "cflow200"
    fpr_limit: float = 0.3
    aupimo: bool = False
    aupimo_fpr_bounds: tuple[float, float] = AUPIMO_FPR_BOUNDS
    metrics: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _check_resampling(self.n_resamples, self.seed)
        unknown = set(self.levels) - {"image", "pixel"}
        if unknown or not self.levels:
            raise ValueError(f"levels must be a non-empty subset of ('image', 'pixel'), got {self.levels!r}")
        if self.pro not in PRO_METRICS:
            raise ValueError(f"pro must be one of {list(PRO_METRICS)}, got {self.pro!r}")
        if not 0 < self.fpr_limit <= 1:
            raise ValueError(f"fpr_limit must be in (0, 1], got {self.fpr_limit}")
        check_fpr_bounds(self.aupimo_fpr_bounds)
        if self.metrics is not None and (not self.metrics or set(self.metrics) - set(METRIC_NAMES)):
            raise ValueError(f"metrics must be None or names of {METRIC_NAMES}, got {self.metrics!r}")

    def wants(self, metric: str) -> bool:
        """Whether `metric` is to be resampled (the level and the metric's own option aside)."""
        return self.metrics is None or metric in self.metrics


@dataclass(frozen=True, eq=False)
class ClassBootstrap:
    """The bootstrap distribution of every metric of one class.

    Attributes:
        dataset: dataset name.
        class_name: class name.
        n_resamples: B.
        seed: the seed of `resample_indices`.
        sample_ids: (N,) the class's image ids, sorted (the order the resamples were drawn in).
        labels: (N,) bool labels in the order of `sample_ids`.
        values: (level, metric) -> the metric on the class's images (equal to the Evaluator's value).
        notes: (level, metric) -> why the value is NaN ("" when defined).
        draws: (level, metric) -> (B,) the metric on each resample (NaN where undefined).
    """

    dataset: str
    class_name: str
    n_resamples: int
    seed: int
    sample_ids: np.ndarray
    labels: np.ndarray
    values: dict[MetricKey, float] = field(default_factory=dict)
    notes: dict[MetricKey, str] = field(default_factory=dict)
    draws: dict[MetricKey, np.ndarray] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return int(self.labels.size)

    @property
    def n_anomalous(self) -> int:
        return int(self.labels.sum())


def _point(metric: Callable[..., float], *args: Any) -> tuple[float, str]:
    try:
        return metric(*args), ""
    except UndefinedMetricError as undefined:
        return float("nan"), str(undefined)


def bootstrap_class(samples: ClassSamples, config: BootstrapConfig = BootstrapConfig()) -> ClassBootstrap:
    """Bootstrap distributions of one class's metrics (the Evaluator's rows, resampled).

    Usable as `Evaluator(class_hook=...)` collector: `class_hook=lambda s: kept.append(bootstrap_class(s))`.

    Args:
        samples: the class's ids, labels, scores and, for pixel metrics, masks and maps.
        config: resamples, seed, levels and metric options.

    Returns:
        Point values, notes and (B,) draws of every metric of the requested levels that the data allow (pixel
        metrics only when `samples` holds maps).
    """
    labels, scores = image_inputs(samples.labels, samples.scores, list(samples.sample_ids))
    sample_ids = np.asarray(samples.sample_ids, dtype=str)
    if sample_ids.shape != labels.shape:
        raise ValueError(
            f"class {samples.class_name!r}: {sample_ids.size} sample_ids for {labels.size} labels"
        )
    indices = resample_indices(labels, config.n_resamples, config.seed, samples.class_name, sample_ids)
    counts = _multiplicities(indices, labels.size)
    canonical = np.argsort(sample_ids, kind="stable")
    result = ClassBootstrap(
        samples.dataset, samples.class_name, config.n_resamples, config.seed, sample_ids[canonical],
        labels[canonical],
    )  # fmt: skip

    if "image" in config.levels:
        ranked = RankedScores.from_labels(labels, scores, unit="images")
        outcomes = {
            name: _point(metric, ranked)
            for name, metric in zip(IMAGE_METRICS, (auroc, average_precision, max_f1), strict=True)
            if config.wants(name)
        }
        defined = all(np.isfinite(value) for value, _ in outcomes.values())  # all three need both labels
        draws = _image_draws(labels, scores, counts, list(outcomes)) if defined and outcomes else {}
        for name, outcome in outcomes.items():
            _record(result, ("image", name), outcome, draws.get(name))
    if "pixel" in config.levels and samples.maps is not None and samples.masks is not None:
        masks, maps = pixel_inputs(samples.masks, samples.maps, list(sample_ids))
        if masks.shape[0] != labels.size:
            raise ValueError(f"class {samples.class_name!r}: {masks.shape[0]} maps for {labels.size} labels")
        _pixel_draws(result, masks, maps, counts, config)
    return result


def _record(
    result: ClassBootstrap, key: MetricKey, outcome: tuple[float, str], draws: np.ndarray | None
) -> None:
    """Store a metric's value, note and draws (all NaN when the value itself is undefined)."""
    result.values[key], result.notes[key] = outcome
    result.draws[key] = draws if draws is not None else np.full(result.n_resamples, np.nan)


def _pixel_draws(
    result: ClassBootstrap, masks: np.ndarray, maps: np.ndarray, counts: np.ndarray, config: BootstrapConfig
) -> None:
    """Record the pixel metrics in the Evaluator's row order: AUROC, AP, F1-max, AU-PRO variants, AUPIMO."""
    metrics: dict[str, Callable[[PixelScores], float]] = {
        "auroc": lambda pixels: auroc(pixels.ranked),
        "ap": lambda pixels: average_precision(pixels.ranked),
        "f1_max": lambda pixels: max_f1(pixels.ranked),
    }
    for name in PRO_METRICS[config.pro]:
        metrics[name] = (
            (lambda pixels: exact_aupro(pixels, config.fpr_limit)) if name == "aupro" else cflow200_aupro
        )
    metrics = {name: metric for name, metric in metrics.items() if config.wants(name)}
    if metrics:
        resampler = _PixelResampler(masks, maps)
        point = resampler.scores(np.ones(masks.shape[0], dtype=np.int64))
        outcomes = {name: _point(metric, point) for name, metric in metrics.items()}
        defined = [name for name, (value, _) in outcomes.items() if np.isfinite(value)]
        draws = np.full((len(metrics), config.n_resamples), np.nan)
        if defined:
            for resample in range(config.n_resamples):
                pixels = resampler.scores(counts[resample])
                for row, name in enumerate(metrics):
                    if name in defined:
                        draws[row, resample] = _point(metrics[name], pixels)[0]
        for row, name in enumerate(metrics):
            _record(result, ("pixel", name), outcomes[name], draws[row])
    if config.aupimo and config.wants("aupimo"):
        outcome = _point(aupimo, masks, maps, config.aupimo_fpr_bounds)
        aupimo_draws = None
        if np.isfinite(outcome[0]):
            aupimo_draws = _aupimo_draws(masks, maps, counts, config.aupimo_fpr_bounds)
        _record(result, ("pixel", "aupimo"), outcome, aupimo_draws)


def _aupimo_draws(
    masks: np.ndarray, maps: np.ndarray, counts: np.ndarray, fpr_bounds: tuple[float, float]
) -> np.ndarray:
    """(B,) class AUPIMO of each resample: the multiplicity-weighted mean of the per-image AUPIMO."""
    is_normal = ~masks.reshape(masks.shape[0], -1).any(axis=1)
    curves = PimoCurves.from_maps(
        masks, maps, fpr_bounds, max_normal_weight=int(counts[:, is_normal].sum(axis=1).max())
    )
    draws = np.empty(counts.shape[0])
    chunk = 256  # resamples per matrix product: (chunk, K) matrices
    for start in range(0, counts.shape[0], chunk):
        block = counts[start : start + chunk]
        weights = block[:, curves.anomalous_images]
        with np.errstate(invalid="ignore"):  # no anomalous image drawn (labels without masks): NaN
            draws[start : start + chunk] = (curves.per_image(block) * weights).sum(axis=1) / weights.sum(
                axis=1
            )
    return draws


# ---------------------------------------------------------------------------------------------- rows
def _interval(draws: np.ndarray, confidence: float) -> tuple[float, float, int]:
    """Percentile interval of the finite draws, and how many draws were undefined."""
    finite = draws[np.isfinite(draws)]
    if finite.size == 0:
        return float("nan"), float("nan"), int(draws.size)
    low, high = np.percentile(finite, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(low), float(high), int(draws.size - finite.size)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _undefined_note(n_undefined: int, n_resamples: int) -> str:
    return (
        f"undefined in {n_undefined} of {n_resamples} resamples; interval over the rest"
        if n_undefined
        else ""
    )


def bootstrap_rows(classes: Sequence[ClassBootstrap], confidence: float = 0.95) -> pd.DataFrame:
    """Tidy interval rows of per-class bootstraps, then one mean row per (dataset, level, metric).

    Args:
        classes: `bootstrap_class` results (several datasets may be mixed).
        confidence: coverage of the percentile interval.

    Returns:
        `BOOTSTRAP_COLUMNS`: the Evaluator's keys and value, with ci_low, ci_high, confidence, n_resamples,
        seed and note. A mean row's value is the unweighted mean over the classes where the metric is defined
        (as the Evaluator's), its interval the percentiles of the per-resample means over those classes.
    """
    _check_confidence(confidence)
    rows = []
    by_dataset: dict[str, list[ClassBootstrap]] = {}
    for result in classes:
        by_dataset.setdefault(result.dataset, []).append(result)
        for key, value in result.values.items():
            low, high, n_undefined = _interval(result.draws[key], confidence)
            rows.append(
                dict(
                    _row_key(result.dataset, result.class_name, key), value=value, ci_low=low, ci_high=high,
                    confidence=confidence, n_resamples=result.n_resamples, bootstrap_seed=result.seed,
                    note=result.notes[key] or _undefined_note(n_undefined, result.n_resamples), n_classes=1,
                    n_images=result.n_images, n_anomalous=result.n_anomalous,
                )
            )  # fmt: skip
    for dataset, results in by_dataset.items():
        rows += _mean_rows(dataset, results, confidence)
    return pd.DataFrame(rows, columns=BOOTSTRAP_COLUMNS)


def _row_key(dataset: str, class_name: str, key: MetricKey) -> dict:
    return {"dataset": dataset, "class_name": class_name, "level": key[0], "metric": key[1]}


def _same_resampling(results: Sequence[ClassBootstrap], what: str) -> tuple[int, int]:
    settings = {(result.n_resamples, result.seed) for result in results}
    if len(settings) != 1:
        raise ValueError(f"{what}: the classes were resampled with different (n_resamples, seed): {settings}")
    return settings.pop()


def _mean_rows(dataset: str, results: Sequence[ClassBootstrap], confidence: float) -> list[dict]:
    n_resamples, seed = _same_resampling(results, f"dataset {dataset!r}")
    keys = list(dict.fromkeys(key for result in results for key in result.values))
    rows = []
    for key in keys:
        having = [result for result in results if key in result.values]
        defined = [result for result in having if np.isfinite(result.values[key])]
        skipped = [result.class_name for result in having if not np.isfinite(result.values[key])]
        value, low, high, n_undefined = float("nan"), float("nan"), float("nan"), 0
        if defined:
            value = float(np.mean([result.values[key] for result in defined]))
            with np.errstate(all="ignore"):
                means = np.nanmean(np.stack([result.draws[key] for result in defined]), axis=0)
            low, high, n_undefined = _interval(means, confidence)
        note = _undefined_note(n_undefined, n_resamples)
        if skipped:
            note = f"mean over {len(defined)} of {len(having)} classes; undefined for {', '.join(skipped)}"
        rows.append(
            dict(
                _row_key(dataset, MEAN_CLASS_NAME, key), value=value, ci_low=low, ci_high=high,
                confidence=confidence, n_resamples=n_resamples, bootstrap_seed=seed, note=note, n_classes=len(defined),
                n_images=sum(result.n_images for result in having),
                n_anomalous=sum(result.n_anomalous for result in having),
            )
        )  # fmt: skip
    return rows


def bootstrap(
    class_names: Sequence[str],
    labels: Any,
    scores: Any,
    masks: Any = None,
    maps: Any = None,
    *,
    dataset: str,
    sample_ids: Sequence[str] | None = None,
    config: BootstrapConfig = BootstrapConfig(),
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Bootstrap interval rows of a whole run given as arrays (e.g. `Evaluator(keep_samples=True).samples()`).

    Args:
        class_names: (N,) class of each image.
        labels: (N,) 0/1 labels.
        scores: (N,) image scores.
        masks: (N, H, W) 0/1 ground truth, or None (image metrics only).
        maps: (N, H, W) anomaly maps, or None.
        dataset: dataset name of the rows.
        sample_ids: optional (N,) image ids (unique within a class; needed to pair two runs).
        config: resamples, seed, levels and metric options.
        confidence: coverage of the intervals.

    Returns:
        `bootstrap_rows` of the classes, in order of first appearance.
    """
    names = np.asarray(list(class_names), dtype=str)
    label_array, score_array = image_inputs(labels, scores)
    if names.shape != label_array.shape:
        raise ValueError(f"class_names has {names.size} entries, labels {label_array.size}")
    ids = (
        np.array([f"#{index}" for index in range(names.size)])
        if sample_ids is None
        else np.asarray(sample_ids)
    )
    if ids.shape != names.shape:
        raise ValueError(f"sample_ids has {ids.size} entries, class_names {names.size}")
    if (masks is None) != (maps is None):
        raise ValueError("masks and maps must be given together (both None for image-level-only data)")
    mask_array = map_array = None
    if maps is not None:
        mask_array, map_array = pixel_inputs(masks, maps)
        if mask_array.shape[0] != names.size:
            raise ValueError(f"masks and maps have {mask_array.shape[0]} frames for {names.size} class names")
    results = []
    for class_name in dict.fromkeys(names):
        members = np.flatnonzero(names == class_name)
        samples = ClassSamples(
            dataset, str(class_name), ids[members], label_array[members], score_array[members],
            None if mask_array is None else mask_array[members], None if map_array is None else map_array[members],
        )  # fmt: skip
        results.append(bootstrap_class(samples, config))
    return bootstrap_rows(results, confidence)


# ---------------------------------------------------------------------------------------------- paired
PAIRED_COLUMNS = [
    "dataset",
    "class_name",
    "level",
    "metric",
    "value_a",
    "value_b",
    "difference",
    "ci_low",
    "ci_high",
    "confidence",
    "n_resamples",
    "bootstrap_seed",
    "note",
    "n_classes",
    "n_images",
    "n_anomalous",
]


def _check_same_images(a: ClassBootstrap, b: ClassBootstrap) -> None:
    where = f"{a.dataset}/{a.class_name}"
    if (a.n_resamples, a.seed) != (b.n_resamples, b.seed):
        raise ValueError(
            f"{where}: method a was resampled with (n_resamples, seed) = {(a.n_resamples, a.seed)}, method b "
            f"with {(b.n_resamples, b.seed)}; bootstrap both with the same config"
        )
    if not np.array_equal(a.sample_ids, b.sample_ids):
        only_a = np.setdiff1d(a.sample_ids, b.sample_ids)
        only_b = np.setdiff1d(b.sample_ids, a.sample_ids)
        raise ValueError(
            f"{where}: the two methods were not scored on the same images: {only_a.size} id(s) only in a "
            f"(e.g. {only_a[:3].tolist()}), {only_b.size} only in b (e.g. {only_b[:3].tolist()}); a paired comparison "
            "needs the same images, named by the same sample ids"
        )
    if not np.array_equal(a.labels, b.labels):
        differing = a.sample_ids[a.labels != b.labels]
        raise ValueError(
            f"{where}: {differing.size} image(s) have different labels, e.g. {differing[:3].tolist()}"
        )
    if set(a.values) != set(b.values):
        raise ValueError(
            f"{where}: different metrics: only in a {sorted(set(a.values) - set(b.values))}, only in b "
            f"{sorted(set(b.values) - set(a.values))}"
        )


def paired_difference(
    a: Sequence[ClassBootstrap], b: Sequence[ClassBootstrap], confidence: float = 0.95
) -> pd.DataFrame:
    """Bootstrap interval of the difference a - b of two methods scored on the same images.

    Both bootstraps must come from the same images (ids and labels) and the same `BootstrapConfig` seed and
    n_resamples: their resamples are then the same images (`resample_indices`), so each resample's difference
    is paired. A method compared with itself gives exactly 0, interval [0, 0].

    Args:
        a: `bootstrap_class` results of method a.
        b: those of method b, for the same (dataset, class) pairs.
        confidence: coverage of the intervals.

    Returns:
        `PAIRED_COLUMNS`: value_a, value_b, difference = value_a - value_b and its interval, per class and for
        the mean over the classes where both are defined (per-resample mean of the differences).
    """
    _check_confidence(confidence)
    by_class_b = {(result.dataset, result.class_name): result for result in b}
    keys_a = [(result.dataset, result.class_name) for result in a]
    if set(keys_a) != set(by_class_b):
        raise ValueError(
            f"the two methods cover different classes: only in a {sorted(set(keys_a) - set(by_class_b))}, "
            f"only in b {sorted(set(by_class_b) - set(keys_a))}"
        )
    rows, by_dataset = [], {}
    for result_a in a:
        result_b = by_class_b[(result_a.dataset, result_a.class_name)]
        _check_same_images(result_a, result_b)
        by_dataset.setdefault(result_a.dataset, []).append((result_a, result_b))
        for key in result_a.values:
            difference = result_a.draws[key] - result_b.draws[key]
            low, high, n_undefined = _interval(difference, confidence)
            note = (
                result_a.notes[key]
                or result_b.notes[key]
                or _undefined_note(n_undefined, result_a.n_resamples)
            )
            rows.append(
                dict(
                    _row_key(result_a.dataset, result_a.class_name, key), value_a=result_a.values[key],
                    value_b=result_b.values[key], difference=result_a.values[key] - result_b.values[key],
                    ci_low=low, ci_high=high, confidence=confidence, n_resamples=result_a.n_resamples,
                    bootstrap_seed=result_a.seed, note=note, n_classes=1, n_images=result_a.n_images,
                    n_anomalous=result_a.n_anomalous,
                )
            )  # fmt: skip
    for dataset, pairs in by_dataset.items():
        for key in dict.fromkeys(key for result_a, _ in pairs for key in result_a.values):
            having = [(x, y) for x, y in pairs if key in x.values]
            both = [(x, y) for x, y in having if np.isfinite(x.values[key]) and np.isfinite(y.values[key])]
            skipped = [
                x.class_name
                for x, y in having
                if not (np.isfinite(x.values[key]) and np.isfinite(y.values[key]))
            ]
            value_a = value_b = low = high = float("nan")
            n_undefined = 0
            if both:
                value_a = float(np.mean([x.values[key] for x, _ in both]))
                value_b = float(np.mean([y.values[key] for _, y in both]))
                with np.errstate(all="ignore"):
                    means = np.nanmean(np.stack([x.draws[key] - y.draws[key] for x, y in both]), axis=0)
                low, high, n_undefined = _interval(means, confidence)
            note = _undefined_note(n_undefined, having[0][0].n_resamples)
            if skipped:
                note = f"mean over {len(both)} of {len(having)} classes; undefined for {', '.join(skipped)}"
            rows.append(
                dict(
                    _row_key(dataset, MEAN_CLASS_NAME, key), value_a=value_a, value_b=value_b,
                    difference=value_a - value_b, ci_low=low, ci_high=high, confidence=confidence,
                    n_resamples=having[0][0].n_resamples, bootstrap_seed=having[0][0].seed, note=note,
                    n_classes=len(both), n_images=sum(x.n_images for x, _ in having),
                    n_anomalous=sum(x.n_anomalous for x, _ in having),
                )
            )  # fmt: skip
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


# ---------------------------------------------------------------------------------------------- ranks
@dataclass(frozen=True, eq=False)
class FriedmanResult:
    """Average ranks, the Friedman test and the Nemenyi critical difference (Demšar 2006, Sec. 3.2.2).

    Attributes:
        ranks: (N blocks, k methods) rank of each method on each block, 1 = best, ties averaged.
        average_ranks: (k,) mean rank of each method, best first.
        chi2: Friedman statistic chi²_F = 12 N / (k (k + 1)) [sum_j R_j² - k (k + 1)² / 4] (Demšar Eq. in
            Sec. 3.2.2, without a correction for ties), chi² with k - 1 degrees of freedom.
        chi2_pvalue: its p-value.
        iman_davenport: F_F = (N - 1) chi²_F / (N (k - 1) - chi²_F), F with k - 1 and (k - 1)(N - 1) degrees of
            freedom (inf when every block ranks the methods alike).
        iman_davenport_pvalue: its p-value.
        q_alpha: Nemenyi's q_alpha = studentized range quantile (1 - alpha, k, inf) / sqrt(2) (Demšar Table 5).
        critical_difference: CD = q_alpha sqrt(k (k + 1) / (6 N)): two average ranks further apart than CD
            differ significantly at level alpha.
        alpha: the significance level.
    """

    ranks: pd.DataFrame
    average_ranks: pd.Series
    chi2: float
    chi2_pvalue: float
    iman_davenport: float
    iman_davenport_pvalue: float
    q_alpha: float
    critical_difference: float
    alpha: float

    @property
    def n_blocks(self) -> int:
        return int(self.ranks.shape[0])

    @property
    def n_methods(self) -> int:
        return int(self.ranks.shape[1])


def friedman_test(scores: pd.DataFrame, alpha: float = 0.05) -> FriedmanResult:
    """Rank k methods over N blocks (datasets) by a metric where higher is better.

    Args:
        scores: (N, k) table, one row per block (e.g. a dataset's mean value), one column per method; from
            tidy rows: `rows.pivot(index="dataset", columns="method", values="value")`. No missing values.
        alpha: significance level of the critical difference.

    Returns:
        Ranks, Friedman and Iman-Davenport statistics with p-values, and the Nemenyi critical difference.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    values = scores.to_numpy(dtype=float)
    n_blocks, n_methods = values.shape
    if n_blocks < 2 or n_methods < 2:
        raise ValueError(f"scores needs at least 2 blocks (rows) and 2 methods (columns), got {values.shape}")
    missing = np.argwhere(~np.isfinite(values))
    if missing.size:
        block, method = missing[0]
        raise ValueError(
            f"scores has {len(missing)} missing or non-finite value(s), e.g. block {scores.index[block]!r}, "
            f"method {scores.columns[method]!r}: the Friedman test needs every method on every block"
        )
    ranks = scipy_stats.rankdata(-values, method="average", axis=1)
    mean_ranks = ranks.mean(axis=0)
    k, n = n_methods, n_blocks
    chi2 = 12 * n / (k * (k + 1)) * (np.sum(mean_ranks**2) - k * (k + 1) ** 2 / 4)
    denominator = n * (k - 1) - chi2
    f_statistic = (n - 1) * chi2 / denominator if denominator > 0 else float("inf")
    q_alpha = scipy_stats.studentized_range.ppf(1 - alpha, k, np.inf) / np.sqrt(2)
    return FriedmanResult(
        ranks=pd.DataFrame(ranks, index=scores.index, columns=scores.columns),
        average_ranks=pd.Series(mean_ranks, index=scores.columns, name="average_rank").sort_values(
            kind="stable"
        ),
        chi2=float(chi2),
        chi2_pvalue=float(scipy_stats.chi2.sf(chi2, k - 1)),
        iman_davenport=float(f_statistic),
        iman_davenport_pvalue=float(scipy_stats.f.sf(f_statistic, k - 1, (k - 1) * (n - 1))),
        q_alpha=float(q_alpha),
        critical_difference=float(q_alpha * np.sqrt(k * (k + 1) / (6 * n))),
        alpha=alpha,
    )


def _cliques(ranks: np.ndarray, critical_difference: float) -> list[tuple[int, int]]:
    """Maximal runs [i, j] of the sorted ranks whose spread is below the critical difference."""
    runs = []
    for first in range(ranks.size):
        last = first
        while last + 1 < ranks.size and ranks[last + 1] - ranks[first] < critical_difference:
            last += 1
        if last > first and not any(start <= first and last <= end for start, end in runs):
            runs.append((first, last))
    return runs


def critical_difference_diagram(result: FriedmanResult, title: str | None = None) -> Figure:
    """Demšar's critical-difference diagram (Fig. 1 of the paper): average ranks on an axis, best on the left.

    Methods joined by a thick bar are not significantly different (their average ranks differ by less than
    the Nemenyi critical difference, drawn above the axis).

    Returns:
        The matplotlib figure (not attached to pyplot; a notebook displays it, `fig.savefig` writes it).
    """
    ranks = result.average_ranks.to_numpy()
    names = [str(name) for name in result.average_ranks.index]
    k = len(names)
    half = (k + 1) // 2
    rows_per_side = max(half, k - half)
    figure = Figure(figsize=(max(6.0, 1.1 * k), 1.6 + 0.3 * rows_per_side + 0.15 * k))
    axes = figure.add_subplot()
    axes.set_xlim(0.5 - 0.8, k + 0.5 + 0.8)
    label_depth = 0.6 + 0.3 * rows_per_side
    axes.set_ylim(-label_depth - 0.3 - 0.2 * k, 1.2)
    axes.axis("off")
    axes.hlines(0, 1, k, color="black", linewidth=1)
    for tick in range(1, k + 1):
        axes.vlines(tick, 0, 0.1, color="black", linewidth=1)
        axes.text(tick, 0.15, str(tick), ha="center", va="bottom", fontsize=9)
    cd = result.critical_difference
    axes.hlines(0.75, 1, 1 + cd, color="black", linewidth=1.5)
    axes.vlines([1, 1 + cd], 0.68, 0.82, color="black", linewidth=1.5)
    axes.text(1 + cd / 2, 0.85, f"CD = {cd:.2f} (α = {result.alpha:g})", ha="center", va="bottom", fontsize=9)
    for position, (name, rank) in enumerate(zip(names, ranks, strict=True)):
        left = position < half
        depth = 0.6 + 0.3 * (position if left else k - 1 - position)
        end = 0.5 if left else k + 0.5
        axes.plot([rank, rank, end], [0, -depth, -depth], color="black", linewidth=0.8)
        axes.text(
            end - 0.05 if left else end + 0.05, -depth, f"{name} ({rank:.2f})",
            ha="right" if left else "left", va="center", fontsize=9,
        )  # fmt: skip
    for level, (first, last) in enumerate(_cliques(ranks, cd)):
        height = -0.25 - 0.12 * level
        axes.hlines(height, ranks[first] - 0.05, ranks[last] + 0.05, color="black", linewidth=3)
    if title:
        axes.set_title(title)
    figure.tight_layout()
    return figure


# ---------------------------------------------------------------------------------------------- seeds
PER_RUN_COLUMNS = ("value", "note", "ci_low", "ci_high")


SEED_COLUMNS = ("train_seed", "reference_seed")  # the provenance columns of `zsadkit.results`


def _seed_columns(rows: pd.DataFrame, seed_columns: Sequence[str] | None) -> list[str]:
    """The given seed columns, or the provenance seed columns present in `rows`."""
    if seed_columns is not None:
        return list(seed_columns)
    present = [column for column in SEED_COLUMNS if column in rows.columns]
    if not present:
        raise ValueError(f"rows have none of the seed columns {list(SEED_COLUMNS)}; pass seed_columns; columns: "
                         f"{list(rows.columns)}")
    return present


def _group_keys(rows: pd.DataFrame, seed_columns: Sequence[str], keys: Sequence[str] | None) -> list[str]:
    missing = [column for column in seed_columns if column not in rows.columns]
    if missing:
        raise ValueError(f"rows have no seed column(s) {missing}; columns: {list(rows.columns)}")
    if "value" not in rows.columns:
        raise ValueError(f"rows have no 'value' column; columns: {list(rows.columns)}")
    if keys is not None:
        return list(keys)
    return [column for column in rows.columns if column not in (*seed_columns, *PER_RUN_COLUMNS)]


def seed_summary(
    rows: pd.DataFrame, seed_columns: Sequence[str] | None = None, keys: Sequence[str] | None = None
) -> pd.DataFrame:
    """Mean and standard deviation of `value` over seeds (few-shot prompt sets, training seeds).

    The std is the sample standard deviation (ddof = 1), as the papers report "mean ± std" over their runs; it
    is NaN for a single seed. Undefined (NaN) values are left out and not counted in n_seeds.

    Args:
        rows: tidy metric rows with a `value` column and the seed column(s).
        seed_columns: the columns that tell the runs apart (default: those of `train_seed`, `reference_seed`
            present in `rows`).
        keys: the columns that identify a number (default: every column but the seed columns and the per-run
            results value, note, ci_low, ci_high); rows equal in `keys` are the seeds of one number.

    Returns:
        `keys`, then mean, std, n_seeds and seeds (the defined seeds, comma-separated).
    """
    seed_columns = _seed_columns(rows, seed_columns)
    group_keys = _group_keys(rows, seed_columns, keys)
    duplicated = rows.duplicated([*group_keys, *seed_columns], keep=False)
    if duplicated.any():
        example = rows.loc[duplicated, [*group_keys, *seed_columns]].iloc[0].to_dict()
        raise ValueError(
            f"{int(duplicated.sum())} rows repeat a seed within a group, e.g. {example}; pass the column that "
            "tells them apart in keys or drop the duplicates"
        )
    summaries = []
    for group, members in rows.groupby(group_keys, sort=False, dropna=False):
        defined = members[np.isfinite(members["value"].to_numpy(dtype=float))]
        values = defined["value"].to_numpy(dtype=float)
        seeds = defined[list(seed_columns)].astype(str).agg("/".join, axis=1)
        summaries.append(
            {
                **dict(zip(group_keys, group if isinstance(group, tuple) else (group,), strict=True)),
                "mean": float(values.mean()) if values.size else float("nan"),
                "std": float(values.std(ddof=1)) if values.size > 1 else float("nan"),
                "n_seeds": int(values.size),
                "seeds": ",".join(seeds),
            }
        )
    return pd.DataFrame(summaries, columns=[*group_keys, "mean", "std", "n_seeds", "seeds"])


def uncertainty_table(
    rows: pd.DataFrame, seed_columns: Sequence[str] | None = None, keys: Sequence[str] | None = None
) -> pd.DataFrame:
    """Both uncertainties side by side: mean ± std over seeds, and the bootstrap interval over test images.

    Args:
        rows: `bootstrap_rows` output of several runs, with the runs' seed column(s) added.
        seed_columns: the columns that tell the runs apart.
        keys: as in `seed_summary`.

    Returns:
        `seed_summary`'s columns, then ci_low and ci_high (the mean over seeds of each run's bootstrap interval:
        the image-sampling uncertainty of one run) and `summary`, e.g. "0.912 ± 0.004 (3 seeds), 95 % CI
        [0.890, 0.930]".
    """
    for column in ("ci_low", "ci_high", "confidence"):
        if column not in rows.columns:
            raise ValueError(f"rows have no {column!r} column: pass bootstrap_rows output")
    summary = seed_summary(rows, seed_columns, keys)
    group_keys = [column for column in summary.columns if column not in ("mean", "std", "n_seeds", "seeds")]
    intervals = (
        rows[np.isfinite(rows["value"].to_numpy(dtype=float))]
        .groupby(group_keys, sort=False, dropna=False)[["ci_low", "ci_high"]]
        .mean()
        .reset_index()
    )
    table = summary.merge(intervals, on=group_keys, how="left")
    confidence = table["confidence"] if "confidence" in table.columns else rows["confidence"].iloc[0]
    table["summary"] = [
        f"{mean:.3f} ± {std:.3f} ({n} seed{'s' if n != 1 else ''}), {100 * level:g} % CI [{low:.3f}, {high:.3f}]"
        for mean, std, n, level, low, high in zip(
            table["mean"], table["std"], table["n_seeds"], np.broadcast_to(confidence, len(table)),
            table["ci_low"], table["ci_high"], strict=True,
        )
    ]  # fmt: skip
    return table
