"""Run a detector over a dataset and score it with the shared metrics, batch by batch.

Maps are handed to the `Evaluator` as they are produced, so a dataset's maps are never all held at once
(the `Evaluator` keeps only what the metrics need).

* `evaluate`: any `Detector` on images.
* `evaluate_cached`: a `FeatureModel` on its cached frozen features (ablations that change only what follows the
  frozen part share one cache per test set, so each variant costs the scoring only).
* `evaluate_few_shot`: a detector with a per-class memory of K normal references (`fit_references`: WinCLIP+,
  VAND few-shot, InCTRL), drawn by `sample_references` or given explicitly.
* `draw_reference_sets`, `write_reference_sets`, `read_reference_sets`: the few-shot reference sets of a protocol
  (per K, seed and class), written beside the results so that every method compared uses the same images.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from zsadkit.data.dataset import batches
from zsadkit.data.records import Sample
from zsadkit.data.transforms import ResizeMode
from zsadkit.feature_cache import cached_rows
from zsadkit.methods.base import Detector, FeatureModel, Prediction
from zsadkit.metrics import Evaluator
from zsadkit.models.runtime import check_precision, inference, run_settings

__all__ = ["ReferenceSets", "compile_tower", "draw_reference_sets", "evaluate", "evaluate_cached", "evaluate_few_shot", "predict",
           "read_reference_sets", "sample_references", "score_predictions", "write_reference_sets"]

#: (shots, seed) → class name → the K normal reference samples of that class.
ReferenceSets = dict[tuple[int, int], dict[str, list[Sample]]]
REFERENCE_SETS_FORMAT = "zsadkit-reference-sets/1"


def predict(
    detector: Detector,
    samples: Sequence[Sample],
    *,
    image_size: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = False,
    resize: ResizeMode = "squash",
    precision: str = "fp32",
    num_workers: int = 0,
    compile: bool = False,
    keep_on_device: bool = False,
) -> Iterator[tuple[dict, Prediction]]:
    """Yield (batch, prediction) pairs of `detector` on `samples`, batch by batch.

    Args:
        detector: the method (its `predict` is called under `zsadkit.models.runtime.inference(precision)`:
            `torch.inference_mode`, the image tower in `precision`, everything after it in float32).
        samples: the images, brought to S × S by `resize` (`zsadkit.data.transforms.image_transform`;
            "shorter_side_crop" in InCTRL's protocol).
        image_size: S.
        batch_size: images per forward pass.
        device: where the detector runs.
        progress: show a progress bar.
        precision: "fp32" (default), "bf16" or "fp16" (`zsadkit.models.runtime.PRECISIONS`).
        num_workers: loader processes decoding images while the detector computes (0 = in this process); on CUDA
            the batches are pinned and copied without blocking.
        compile: run the detector's image tower through `torch.compile` (`compile_tower`).
        keep_on_device: leave the prediction's tensors on `device` (for the `Evaluator`'s device path); by default
            they are moved to the CPU.
    """
    check_precision(precision)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    device = torch.device(device)
    if compile:
        compile_tower(detector)
    pinned = device.type == "cuda"
    loader = batches(samples, image_size, batch_size, num_workers=num_workers, resize=resize, pin_memory=pinned)
    with tqdm(total=len(loader), desc="predict", disable=not progress) as bar:  # not tqdm(loader): see training
        for batch in loader:
            with inference(precision):
                prediction = detector.predict(batch["image"].to(device, non_blocking=pinned),
                                              list(batch["class_name"]))
            bar.update()
            # clone outside inference mode: ordinary tensors that callers may modify in place.
            scores, maps = prediction.image_scores.float(), prediction.anomaly_maps.float()
            if not keep_on_device:
                scores, maps = scores.cpu(), maps.cpu()
            yield batch, Prediction(scores.clone(), maps.clone())


def compile_tower(detector: Detector) -> Detector:
    """Wrap the detector's `VisualEncoder` blocks in `torch.compile` (once; the first batch pays the compilation).

    Every method keeps its image tower as ``detector.visual`` (a `zsadkit.models.VisualEncoder`); each of its
    residual blocks' MLP is compiled, the part that dominates the tower's time besides attention (which SDPA
    already fuses). A detector without ``visual`` is returned unchanged.
    """
    visual = getattr(detector, "visual", None)
    if visual is None or getattr(visual, "_zsadkit_compiled", False):
        return detector
    for block in visual.blocks:
        block.mlp = torch.compile(block.mlp, dynamic=True)
    visual._zsadkit_compiled = True
    return detector


def score_predictions(
    pairs: Iterable[tuple[dict, Prediction]],
    *,
    dataset: str,
    has_masks: bool,
    pro: str | None = "cflow200",
    metrics_device: str | torch.device | None = None,
    evaluator_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Metric rows of (batch, prediction) pairs, fed to the `Evaluator` one batch at a time.

    `batch` holds "class_name", "label", "mask" and, when known, "image_path" (named in metric errors).
    `metrics_device`: compute the pixel ranking metrics where the maps are (`Evaluator(device=...)`); None: CPU.
    `evaluator_options`: further `Evaluator` arguments, e.g. `class_hook` (a bootstrap in the same pass, as
    `zsadkit.comparison` does) or `aupimo=True`.
    """
    evaluator = Evaluator(dataset=dataset, pro=pro if has_masks else None, device=metrics_device,
                          **dict(evaluator_options or {}))
    for batch, prediction in pairs:
        maps = prediction.anomaly_maps if metrics_device is not None else prediction.anomaly_maps.cpu()
        evaluator.update(
            list(batch["class_name"]),
            batch["label"],
            prediction.image_scores.cpu(),
            masks=batch["mask"] if has_masks else None,
            maps=maps if has_masks else None,
            sample_ids=list(batch["image_path"]) if "image_path" in batch else None,
        )
    return evaluator.compute()


def _has_masks(samples: Sequence[Sample]) -> bool:
    return any(sample.mask is not None for sample in samples)


def evaluate(
    detector: Detector,
    samples: Sequence[Sample],
    *,
    dataset: str,
    image_size: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    pro: str | None = "cflow200",
    progress: bool = False,
    precision: str = "fp32",
    metrics_on_device: bool = False,
    evaluator_options: Mapping[str, Any] | None = None,
    resize: str = "squash",
) -> pd.DataFrame:
    """Per-class and mean metric rows (dataset, class_name, level, metric, value, note) of `detector`.

    Pixel metrics are computed only when the dataset has masks; image-level-only datasets give image rows.
    `precision`: the image tower's, as in `predict`. `metrics_on_device`: keep the maps on `device` and sort the
    pixels there (`Evaluator(device=...)`, identical values). `evaluator_options`: as `score_predictions`.
    `resize`: how images are brought to S × S, as in `predict`.
    """
    pairs = predict(detector, samples, image_size=image_size, batch_size=batch_size, device=device, progress=progress,
                    precision=precision, keep_on_device=metrics_on_device, resize=resize)
    return score_predictions(pairs, dataset=dataset, has_masks=_has_masks(samples), pro=pro,
                             metrics_device=device if metrics_on_device else None,
                             evaluator_options=evaluator_options)


@torch.no_grad()
def evaluate_cached(
    model: FeatureModel,
    samples: Sequence[Sample],
    *,
    name: str,
    dataset: str,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    pro: str | None = "cflow200",
    cache_root: str | Path | None = None,
    cache_dtype: str = "float32",
    progress: bool = False,
) -> pd.DataFrame:
    """`evaluate` for a `FeatureModel`, reading its frozen features from the feature cache (same rows).

    Disk: what `model.encode_rows` returns per image (AnomalyCLIP, ViT-L at 518: 1370 × 768 values per variant,
    4.2 MB in float32, 2.1 MB with `cache_dtype="float16"`).

    Args:
        model: the model (set to eval mode).
        samples: test records with absolute paths.
        name: the method's name (cache directory prefix).
        dataset: dataset name of the metric rows.
        batch_size: rows per scoring call.
        device: where the model runs.
        pro: AU-PRO variant (see `zsadkit.metrics.Evaluator`).
        cache_root: parent folder of feature caches.
        cache_dtype: storage dtype of the cache.
        progress: progress bar of the cache build.
    """
    model.eval()
    rows = cached_rows(model, samples, name=name, cache_root=cache_root, dtype=cache_dtype, batch_size=batch_size,
                       device=device, progress=progress)

    def pairs() -> Iterator[tuple[dict, Prediction]]:
        for batch in DataLoader(rows, batch_size=batch_size, shuffle=False):
            yield batch, model.predict_from_rows(batch)

    return score_predictions(pairs(), dataset=dataset, has_masks=_has_masks(samples), pro=pro)


def sample_references(train_samples: Sequence[Sample], class_name: str, shots: int, seed: int = 0) -> list[Sample]:
    """K normal training images of one class, drawn without replacement with a seeded generator.

    (mala-lab draws with replacement from `RandomState(10)`, anomalib takes the first K of a shuffled loader; the
    draw here is reproducible and never repeats an image.)
    """
    normals = sorted((s for s in train_samples if s.class_name == class_name and s.label == 0), key=lambda s: s.image)
    if len(normals) < shots:
        raise ValueError(f"class {class_name!r} has {len(normals)} normal training images, {shots} shots asked")
    order = torch.randperm(len(normals), generator=torch.Generator().manual_seed(seed))[:shots]
    return [normals[int(i)] for i in order]


def draw_reference_sets(
    train_samples: Sequence[Sample], classes: Iterable[str], shots: Sequence[int], seeds: Sequence[int]
) -> ReferenceSets:
    """`sample_references` for every (K, seed) and class: the few-shot protocol's reference (prompt) sets."""
    return {(int(k), int(seed)): {name: sample_references(train_samples, name, int(k), int(seed))
                                  for name in sorted(set(classes))}
            for k in shots for seed in seeds}


def write_reference_sets(
    sets: ReferenceSets, path: str | Path, dataset: str = "",
    official_files: Mapping[tuple[int, int], Mapping[str, str]] | None = None,
) -> Path:
    """Write reference sets as JSON (image paths per K, seed and class), beside the results they produced.

    Args:
        sets: (K, seed) → class → the reference records, or a preprocessed prompt tensor loaded from a file.
        path: the JSON file.
        dataset: dataset name recorded in the file.
        official_files: (K, seed) → class → the file a tensor of `sets` was loaded from (InCTRL's official
            `<category>.pt`); its row records `official_file` instead of `images`.

    Raises:
        ValueError: a set that is not a list of records has no entry in `official_files`.
    """
    path = Path(path)
    official_files = official_files or {}
    rows = []
    for (k, seed), by_class in sorted(sets.items()):
        for name, references in sorted(by_class.items()):
            row = {"shots": k, "seed": seed, "class_name": name}
            if name in official_files.get((k, seed), {}):
                rows.append({**row, "official_file": str(official_files[(k, seed)][name])})
            elif isinstance(references, (list, tuple)):
                rows.append({**row, "images": [sample.image for sample in references]})
            else:
                raise ValueError(f"write_reference_sets: the set of class {name!r} at (K, seed) = {(k, seed)} is "
                                 f"a {type(references).__name__}, not records; name its file in official_files")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": REFERENCE_SETS_FORMAT, "dataset": dataset, "sets": rows}, indent=1))
    return path


def read_reference_sets(path: str | Path, train_samples: Sequence[Sample]) -> ReferenceSets:
    """Reference sets written by `write_reference_sets`, as the records of `train_samples` with those images."""
    path = Path(path)
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != REFERENCE_SETS_FORMAT:
        raise ValueError(f"{path}: not a reference-set file (format {REFERENCE_SETS_FORMAT!r} expected)")
    by_image = {(sample.class_name, sample.image): sample for sample in train_samples}
    sets: ReferenceSets = {}
    for row in data["sets"]:
        if "official_file" in row:
            raise ValueError(f"{path}: the set of class {row['class_name']!r} at (K, seed) = "
                             f"{(row['shots'], row['seed'])} is the official prompt file {row['official_file']}, "
                             "not records (zsadkit.methods.inctrl.load_official_prompt_set reads it)")
        missing = [image for image in row["images"] if (row["class_name"], image) not in by_image]
        if missing:
            raise ValueError(f"{path}: reference images of class {row['class_name']!r} are not among the training "
                             f"samples given: {missing[:3]}")
        sets.setdefault((int(row["shots"]), int(row["seed"])), {})[row["class_name"]] = [
            by_image[(row["class_name"], image)] for image in row["images"]]
    return sets


def evaluate_few_shot(
    detector: Detector,
    test_samples: Sequence[Sample],
    train_samples: Sequence[Sample],
    shots: int,
    *,
    dataset: str,
    image_size: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    seed: int = 0,
    pro: str | None = "cflow200",
    progress: bool = False,
    references: Mapping[str, Sequence[Sample] | torch.Tensor] | None = None,
    resize: ResizeMode = "squash",
    precision: str = "fp32",
    evaluator_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Metric rows of a detector with a per-class reference memory (WinCLIP+, VAND few-shot, InCTRL).

    For each test class, `detector.fit_references` receives K normal training images of that class
    (`sample_references` with `seed`, or `references[class]`: samples, e.g. from `draw_reference_sets`, or an
    already preprocessed (K, 3, S, S) tensor such as an official prompt file), then the class's test images are
    scored (references and test images brought to S × S by `resize`, the tower in `precision`). Rows as `evaluate`;
    `evaluator_options` as `score_predictions`.
    """

    def reference_images(class_name: str) -> torch.Tensor:
        if references is None:
            chosen = sample_references(train_samples, class_name, shots, seed)
        elif class_name not in references:
            raise KeyError(f"evaluate_few_shot: no references for class {class_name!r} (have {sorted(references)})")
        else:
            chosen = references[class_name]
        if torch.is_tensor(chosen):
            return chosen
        return torch.cat([batch["image"] for batch in batches(list(chosen), image_size, len(chosen), resize=resize)])

    def pairs() -> Iterator[tuple[dict, Prediction]]:
        for class_name in sorted({s.class_name for s in test_samples}):
            with torch.no_grad(), run_settings(precision=precision):  # the references' tower in the same precision
                detector.fit_references(reference_images(class_name).to(device))
            class_samples = [s for s in test_samples if s.class_name == class_name]
            yield from predict(detector, class_samples, image_size=image_size, batch_size=batch_size, device=device,
                               progress=progress, resize=resize, precision=precision)

    return score_predictions(pairs(), dataset=dataset, has_masks=_has_masks(test_samples), pro=pro,
                             evaluator_options=evaluator_options)
