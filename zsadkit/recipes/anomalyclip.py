"""How AnomalyCLIP's prompts are trained (zqhang/AnomalyCLIP @ 45ed4dd, `train.py` and `train.sh`).

* Data: the auxiliary dataset's **test** split with masks (Sec. 4.1: VisA for MVTec AD, MVTec AD for the rest).
* Optimiser: Adam(lr 1e-3, betas (0.5, 0.999)), batch 8, 15 epochs, `setup_seed(111)` (`TrainConfig` defaults).
* Objective: `AnomalyCLIP.losses` (Eq. 4).

Deviation: the reference recomputes the frozen image encoder on every batch of every epoch on identical,
unaugmented images; `fit` reads those features from the feature cache (same values; `use_cache=False` runs the
encoder every step as the reference).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from zsadkit.data.records import Sample
from zsadkit.engine import evaluate_cached
from zsadkit.methods.anomalyclip import AnomalyCLIP
from zsadkit.training import TrainConfig, TrainResult
from zsadkit.training import fit as fit_feature_model

__all__ = ["evaluate", "fit"]

NAME = "anomalyclip"


def fit(
    model: AnomalyCLIP,
    samples: Sequence[Sample],
    config: TrainConfig | None = None,
    *,
    use_cache: bool = True,
    cache_root: str | Path | None = None,
    cache_dtype: str = "float32",
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> TrainResult:
    """Train the prompts on auxiliary samples (`zsadkit.training.fit`; `TrainConfig()` is the reference's
    schedule). Returns the per-epoch log: loss = objective, image = global CE, local = λ·Σ local terms."""
    return fit_feature_model(model, samples, config or TrainConfig(), name=NAME, code=(__name__,), use_cache=use_cache,
                             cache_root=cache_root, cache_dtype=cache_dtype, device=device, progress=progress)


def evaluate(
    model: AnomalyCLIP,
    samples: Sequence[Sample],
    *,
    dataset: str,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    pro: str | None = "cflow200",
    cache_root: str | Path | None = None,
    cache_dtype: str = "float32",
    progress: bool = False,
) -> pd.DataFrame:
    """`zsadkit.engine.evaluate_cached` for AnomalyCLIP (same rows as `zsadkit.engine.evaluate`)."""
    return evaluate_cached(model, samples, name=NAME, dataset=dataset, batch_size=batch_size, device=device,
                           pro=pro, cache_root=cache_root, cache_dtype=cache_dtype, progress=progress)
