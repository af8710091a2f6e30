"""Run a detector over a dataset and score it with the shared metrics, batch by batch.

Maps are handed to the `Evaluator` as they are produced, so a dataset's maps are never all held at once
(the `Evaluator` keeps only what the metrics need).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from zsadkit.data.dataset import AnomalyDataset
from zsadkit.data.records import Sample
from zsadkit.methods.base import Detector, Prediction
from zsadkit.metrics import Evaluator


def batches(
    samples: Sequence[Sample], image_size: int, batch_size: int = 8, num_workers: int = 0
) -> DataLoader:
    """A deterministic (unshuffled) loader of `AnomalyDataset` batches."""
    return DataLoader(
        AnomalyDataset(list(samples), image_size=image_size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )


@torch.no_grad()
def predict(
    detector: Detector,
    samples: Sequence[Sample],
    *,
    image_size: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Iterator[tuple[dict, Prediction]]:
    """Yield (batch, prediction) pairs; the prediction's tensors are on the CPU."""
    loader = batches(samples, image_size, batch_size)
    for batch in tqdm(loader, desc="predict", disable=not progress):
        prediction = detector.predict(batch["image"].to(device), list(batch["class_name"]))
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


def evaluate(
    detector: Detector,
    samples: Sequence[Sample],
    *,
    dataset: str,
    image_size: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    pro: str | None = "cflow200",
    progress: bool = True,
) -> pd.DataFrame:
    """Per-class and mean metric rows (dataset, class_name, level, metric, value, note) of `detector`.

    Pixel metrics are computed only when the dataset has masks; image-level-only datasets give image rows.
    """
    pairs = predict(detector, samples, image_size=image_size, batch_size=batch_size, device=device, progress=progress)
    return score_predictions(pairs, dataset=dataset, has_masks=any(s.mask is not None for s in samples), pro=pro)
