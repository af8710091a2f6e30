"""Run a detector over a dataset and score it with the shared metrics, batch by batch.

Maps are handed to the `Evaluator` as they are produced, so a dataset's maps are never all held at once
(the `Evaluator` keeps only what the metrics need).

* `evaluate`: any `Detector` on images.
* `evaluate_cached`: a `FeatureModel` on its cached frozen features (ablations that change only what follows the
  frozen part share one cache per test set, so each variant costs the scoring only).
* `evaluate_few_shot`: a detector with a per-class memory of K normal references (`fit_references`: WinCLIP+,
  VAND few-shot), drawn by `sample_references`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from zsadkit.data.dataset import AnomalyDataset, batches
from zsadkit.data.records import Sample
from zsadkit.feature_cache import cached_rows
from zsadkit.methods.base import Detector, FeatureModel, Prediction
from zsadkit.metrics import Evaluator

__all__ = ["evaluate", "evaluate_cached", "evaluate_few_shot", "predict", "sample_references", "score_predictions"]


@torch.no_grad()
def predict(
    detector: Detector,
    samples: Sequence[Sample],
    *,
    image_size: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Iterator[tuple[dict, Prediction]]:
    """Yield (batch, prediction) pairs; the prediction's tensors are on the CPU."""
    loader = batches(samples, image_size, batch_size)
    with tqdm(total=len(loader), desc="predict", disable=not progress) as bar:  # not tqdm(loader): see training
        for batch in loader:
            prediction = detector.predict(batch["image"].to(device), list(batch["class_name"]))
            bar.update()
            yield batch, Prediction(prediction.image_scores.float().cpu(), prediction.anomaly_maps.float().cpu())


def score_predictions(
    pairs: Iterable[tuple[dict, Prediction]], *, dataset: str, has_masks: bool, pro: str | None = "cflow200"
) -> pd.DataFrame:
    """Metric rows of (batch, prediction) pairs, fed to the `Evaluator` one batch at a time.

    `batch` holds "class_name", "label", "mask" and, when known, "image_path" (named in metric errors).
    """
    evaluator = Evaluator(dataset=dataset, pro=pro if has_masks else None)
    for batch, prediction in pairs:
        evaluator.update(
            list(batch["class_name"]),
            batch["label"],
            prediction.image_scores.cpu(),
            masks=batch["mask"] if has_masks else None,
            maps=prediction.anomaly_maps.cpu() if has_masks else None,
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
) -> pd.DataFrame:
    """Per-class and mean metric rows (dataset, class_name, level, metric, value, note) of `detector`.

    Pixel metrics are computed only when the dataset has masks; image-level-only datasets give image rows.
    """
    pairs = predict(detector, samples, image_size=image_size, batch_size=batch_size, device=device, progress=progress)
    return score_predictions(pairs, dataset=dataset, has_masks=_has_masks(samples), pro=pro)


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
) -> pd.DataFrame:
    """Metric rows of a detector with a per-class reference memory (WinCLIP+, VAND few-shot).

    For each test class, `detector.fit_references` receives K normal training images of that class
    (`sample_references` with `seed`), then the class's test images are scored. Rows as `evaluate`.
    """

    def pairs() -> Iterator[tuple[dict, Prediction]]:
        for class_name in sorted({s.class_name for s in test_samples}):
            references = AnomalyDataset(sample_references(train_samples, class_name, shots, seed), image_size)
            detector.fit_references(torch.stack([references[i]["image"] for i in range(len(references))]).to(device))
            class_samples = [s for s in test_samples if s.class_name == class_name]
            yield from predict(detector, class_samples, image_size=image_size, batch_size=batch_size, device=device,
                               progress=progress)

    return score_predictions(pairs(), dataset=dataset, has_masks=_has_masks(test_samples), pro=pro)
