"""How CoOp's contexts are trained for zero-shot anomaly detection (AnomalyCLIP App. A.2: "all parameters are kept
the same as in their paper"; CoOp's paper and its Dassl configuration `configs/trainers/CoOp/*.yaml`).

* Data and objective: as AnomalyCLIP (the auxiliary test split; global CE + local focal + dice).
* Optimiser (default, `optimizer="coop"`): SGD lr 0.002, momentum 0.9, weight decay 5e-4; cosine annealing over
  the epochs after one constant warm-up epoch at lr 1e-5; batch 32. The number of epochs for the anomaly task is
  not stated [unverified]: 15, AnomalyCLIP's.
* `optimizer="anomalyclip"`: AnomalyCLIP's Adam(lr 1e-3, betas (0.5, 0.999)), batch 8, constant lr.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch

from zsadkit.data.records import Sample
from zsadkit.methods.anomalyclip import AnomalyCLIP
from zsadkit.training import TrainConfig, TrainResult
from zsadkit.training import fit as fit_feature_model

__all__ = ["OPTIMIZERS", "fit", "train_config"]

#: The named optimiser settings of CoOp's training.
OPTIMIZERS: dict[str, TrainConfig] = {
    "coop": TrainConfig(epochs=15, batch_size=32, lr=0.002, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
                        schedule="cosine", warmup_epochs=1, warmup_lr=1e-5, seed=111),
    "anomalyclip": TrainConfig(epochs=15, batch_size=8, lr=1e-3, optimizer="adam", betas=(0.5, 0.999), seed=111),
}


def train_config(optimizer: Literal["coop", "anomalyclip"] = "coop", **overrides: Any) -> TrainConfig:
    """The `TrainConfig` of a named optimiser setting (`OPTIMIZERS`), with `TrainConfig` field overrides."""
    if optimizer not in OPTIMIZERS:
        raise KeyError(f"CoOp optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    return replace(OPTIMIZERS[optimizer], **overrides)


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
    """Train CoOp's contexts (default schedule: `train_config("coop")`) through `zsadkit.training.fit`."""
    return fit_feature_model(model, samples, config or train_config(), name="coop", code=(__name__,), use_cache=use_cache,
                             cache_root=cache_root, cache_dtype=cache_dtype, device=device, progress=progress)
