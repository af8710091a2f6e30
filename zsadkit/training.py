"""The one trainer of the kit: epochs of optimiser steps on a few parameters, per-epoch checkpoints, resume.

Every method that learns parameters on an auxiliary dataset (AnomalyCLIP, CoOp, VAND, AA-CLIP, InCTRL, HeadCLIP)
trains through `train`; each supplies its trainable parameters and a `step(batch) -> {"loss": ..., ...}`
function. `fit` is `train` for a `FeatureModel` (`zsadkit.methods.base`), with its frozen image features read
from the feature cache.

* Optimiser: `TrainConfig.optimizer` names it ("adam" default: AnomalyCLIP's lr 1e-3, betas (0.5, 0.999), 15
  epochs, batch 8, seed 111; "adamw"; "sgd" with momentum), with weight decay. The learning rate follows
  `TrainConfig.schedule` ("constant", "cosine" with an optional constant warm-up as CoOp's Dassl scheduler,
  "multistep" as `MultiStepLR`), stepped per epoch or per iteration; it is a pure function of the step count, so
  resuming needs no scheduler state.
* Order: by default epoch e shuffles with a generator seeded by `seed + e`, so a run resumed after epoch k visits
  the same batches as an uninterrupted run and ends with the same parameters (on CPU, bit for bit).
  `shuffle_stream="continuous"` draws every epoch from one generator seeded once (the references' global RNG);
  a resumed run replays the earlier epochs' draws (indices only) to reach the same state.
* Checkpoints: `epoch_{e:03d}.safetensors` after every epoch, holding the parameters (`param/<name>`), the
  optimiser state (`optim/<name>/<key>`, e.g. Adam's `exp_avg`, `exp_avg_sq`, `step`), the buffers the caller
  names (`buffer/<name>`, e.g. BatchNorm statistics) and, in the metadata, the
  epoch, the configuration, the run's fingerprint and the loss log. Files are written to a temporary name and renamed, so a checkpoint that
  exists is complete.
* Fingerprint: what determines the trained parameters: the `TrainConfig` fields except those that do not
  (`RESULT_INDEPENDENT_FIELDS`: epochs, where checkpoints go, resume, workers) plus what the caller passes
  (the method's configuration, a fingerprint of the training samples, `code_digest` of the modules that define
  the model and its training, with the zsadkit version): after editing a method, its old checkpoints are not
  resumed.
* Resume: the latest readable checkpoint of `checkpoint_dir` up to `epochs` is loaded (parameters, optimiser,
  log) and training continues with the next epoch; an unreadable (e.g. truncated) file is reported and the
  previous one used. A checkpoint of another fingerprint (other lr, seed, data, method settings) raises
  `CheckpointMismatchError` naming the differing fields instead of silently returning its parameters; more
  epochs than the checkpoint's is allowed (training continues). Without `resume` the folder's old checkpoints
  are deleted first, so none of another run survives beside the new ones.
* Log: per epoch the mean of every scalar the step returns, also written to `loss_log.csv`.
* Hook: `on_epoch_start(epoch)` runs before each epoch's batches (e.g. VAND's per-epoch mosaic draws).

Example:
    >>> weight = torch.nn.Parameter(torch.zeros(1))
    >>> data = [{"x": torch.tensor(1.0)}] * 4
    >>> result = train({"w": weight}, data, lambda b: {"loss": ((weight - b["x"]) ** 2).mean()},
    ...                TrainConfig(epochs=2, batch_size=2, lr=0.1))
    >>> [round(row["loss"], 3) for row in result.log]
    [0.905, 0.571]
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import inspect
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import zsadkit
from zsadkit.data.dataset import AnomalyDataset
from zsadkit.data.records import Sample, samples_fingerprint
from zsadkit.feature_cache import cached_rows
from zsadkit.methods.base import FeatureModel

__all__ = [
    "CheckpointMismatchError",
    "TrainConfig",
    "TrainResult",
    "code_digest",
    "fit",
    "latest_checkpoint",
    "learning_rate",
    "load_checkpoint",
    "method_code_digest",
    "seed_everything",
    "train",
]

StepFunction = Callable[[dict], Mapping[str, torch.Tensor]]
CHECKPOINT_PATTERN = "epoch_{epoch:03d}.safetensors"
LOG_FILE = "loss_log.csv"
#: Modules whose code takes part in every training run (with the method's own modules in `code_digest`).
SHARED_TRAINING_MODULES = ("zsadkit.training", "zsadkit.losses", "zsadkit.maps", "zsadkit.prompt_learning",
                           "zsadkit.models.visual", "zsadkit.models.text", "zsadkit.models.attention",
                           "zsadkit.feature_cache")
#: `TrainConfig` fields that do not change the parameters after a given epoch (left out of the fingerprint).
RESULT_INDEPENDENT_FIELDS = ("epochs", "checkpoint_dir", "resume", "num_workers")


class CheckpointMismatchError(ValueError):
    """A checkpoint folder holds a run of another configuration than the one asked to resume."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (defaults: AnomalyCLIP's `train.sh`).

    Attributes:
        epochs: number of passes over the data.
        batch_size: samples per step.
        lr: base learning rate.
        optimizer: "adam", "adamw" or "sgd".
        betas: Adam/AdamW betas.
        weight_decay: L2 penalty (Adam, SGD) or decoupled decay (AdamW).
        momentum: SGD momentum.
        schedule: "constant", "cosine" (cosine annealing to 0 over the epochs after the warm-up) or "multistep"
            (lr × gamma^(number of milestones passed)).
        schedule_unit: what the schedule counts: "epoch" or "iteration" (optimiser steps).
        milestones: "multistep" milestones in `schedule_unit`s.
        gamma: "multistep" decay factor.
        warmup_epochs: epochs at the constant `warmup_lr` before the schedule starts (CoOp: 1 at 1e-5).
        warmup_lr: learning rate of the warm-up epochs.
        seed: seeds torch, numpy and random at the start, and the shuffling.
        shuffle: shuffle the samples every epoch (the references do).
        shuffle_stream: "per_epoch" (generator seeded with seed + epoch) or "continuous" (one generator).
        checkpoint_dir: where `epoch_XXX.safetensors` and `loss_log.csv` go; "" = no checkpoints.
        resume: continue from the last complete checkpoint in `checkpoint_dir`.
        num_workers: DataLoader workers.
    """

    epochs: int = 15
    batch_size: int = 8
    lr: float = 1e-3
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: Literal["constant", "cosine", "multistep"] = "constant"
    schedule_unit: Literal["epoch", "iteration"] = "epoch"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    seed: int = 111
    shuffle: bool = True
    shuffle_stream: Literal["per_epoch", "continuous"] = "per_epoch"
    checkpoint_dir: str = ""
    resume: bool = True
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"TrainConfig: epochs >= 0, batch_size >= 1 and lr > 0 are required, got {self}")
        choices = {"optimizer": ("adam", "adamw", "sgd"), "schedule": ("constant", "cosine", "multistep"),
                   "schedule_unit": ("epoch", "iteration"), "shuffle_stream": ("per_epoch", "continuous")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        if self.warmup_epochs < 0 or self.weight_decay < 0:
            raise ValueError(f"TrainConfig: warmup_epochs and weight_decay must be >= 0, got {self}")


def learning_rate(config: TrainConfig, epoch: int, iteration: int) -> float:
    """The learning rate of an optimiser step in 0-indexed `epoch`, after `iteration` earlier steps of the run.

    Equals what the torch schedulers give when stepped once per `schedule_unit`: "cosine" is
    `CosineAnnealingLR(T_max=epochs)` shifted by the warm-up (Dassl's `ConstantWarmupScheduler`), "multistep" is
    `MultiStepLR(milestones, gamma)`.
    """
    if epoch < config.warmup_epochs:
        return config.warmup_lr
    count = (epoch - config.warmup_epochs) if config.schedule_unit == "epoch" else iteration
    if config.schedule == "cosine":
        return 0.5 * config.lr * (1.0 + math.cos(math.pi * count / max(config.epochs, 1)))
    if config.schedule == "multistep":
        return config.lr * config.gamma ** sum(count >= milestone for milestone in config.milestones)
    return config.lr


def make_optimizer(config: TrainConfig, parameters: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimiser `config.optimizer` names, over `parameters`."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(parameters, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)


@dataclass
class TrainResult:
    """What `train` did.

    Attributes:
        log: one dict per epoch (all epochs, including those restored from a checkpoint): "epoch", "seconds",
            and the mean of every scalar the step returned.
        resumed_from: the epoch of the checkpoint training resumed from (0 = started fresh).
        checkpoints: checkpoint files written by this call.
    """

    log: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    checkpoints: list[Path] = field(default_factory=list)

    def describe(self) -> str:
        """What this call did, e.g. "trained 3 epochs" or "resumed after epoch 2 of 3, trained 1"."""
        epochs = len(self.log)
        if not self.resumed_from:
            return f"trained {epochs} epoch{'s' * (epochs != 1)}"
        if self.resumed_from >= epochs:
            return f"all {epochs} epochs restored from checkpoints (nothing trained)"
        return f"resumed after epoch {self.resumed_from} of {epochs}, trained {epochs - self.resumed_from}"


def code_digest(*modules: str) -> str:
    """sha256 of the source of `modules` and `SHARED_TRAINING_MODULES`, with the zsadkit version: what training
    code produced a checkpoint (part of the fingerprint, so a checkpoint of edited code is not resumed)."""
    digest = hashlib.sha256(zsadkit.__version__.encode())
    for name in sorted({*modules, *SHARED_TRAINING_MODULES}):
        digest.update(name.encode())
        digest.update(inspect.getsource(importlib.import_module(name)).encode())
    return digest.hexdigest()


def method_code_digest(model: object, *modules: str) -> str:
    """`code_digest` of the modules defining `model`'s class and its zsadkit base classes, plus `modules` (e.g.
    the recipe that trains it)."""
    model_modules = {cls.__module__ for cls in type(model).__mro__ if cls.__module__.startswith("zsadkit")}
    return code_digest(*model_modules, *modules)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and random (the reference's `setup_seed`)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the reference seeds the legacy global RNG too
    random.seed(seed)


def checkpoint_path(directory: str | Path, epoch: int) -> Path:
    return Path(directory) / CHECKPOINT_PATTERN.format(epoch=epoch)


def run_fingerprint(config: TrainConfig, extra: Mapping[str, object] | None = None) -> dict[str, object]:
    """What determines the trained parameters: {"train": TrainConfig fields but `RESULT_INDEPENDENT_FIELDS`,
    **extra}, normalised through JSON (tuples become lists) so that it compares equal to a stored copy."""
    train_fields = {key: value for key, value in asdict(config).items() if key not in RESULT_INDEPENDENT_FIELDS}
    return json.loads(json.dumps({"train": train_fields, **dict(extra or {})}, sort_keys=True))


def fingerprint_differences(stored: object, current: object, prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two fingerprints, as "name: stored → current"."""
    if isinstance(stored, dict) and isinstance(current, dict):
        differences = []
        for key in sorted(set(stored) | set(current)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in stored or key not in current:
                shown = [repr(side[key]) if key in side else "<absent>" for side in (stored, current)]
                differences.append(f"{name}: {shown[0]} → {shown[1]}")
            else:
                differences.extend(fingerprint_differences(stored[key], current[key], name))
        return differences
    return [] if stored == current else [f"{prefix or 'value'}: {stored!r} → {current!r}"]


def check_fingerprint(path: str | Path, fingerprint: Mapping[str, object]) -> None:
    """Raise `CheckpointMismatchError` when the checkpoint at `path` was trained with another fingerprint."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        stored_text = (handle.metadata() or {}).get("fingerprint")
    advice = f"use another checkpoint_dir for this configuration, or delete {path.parent} to start over"
    if stored_text is None:
        raise CheckpointMismatchError(f"{path}: no training fingerprint in the checkpoint (written by an older "
                                      f"zsadkit), so resuming could return another run's parameters; {advice}")
    differences = fingerprint_differences(json.loads(stored_text), dict(fingerprint))
    if differences:
        raise CheckpointMismatchError(f"checkpoint folder {path.parent} holds a run of another configuration "
                                      f"({path.name} differs in {'; '.join(differences)}); {advice}")


def latest_checkpoint(directory: str | Path, max_epoch: int | None = None) -> Path | None:
    """The highest-epoch checkpoint of `directory` (at most `max_epoch`) whose header can be read, or None."""
    directory = Path(directory)
    for path in sorted(directory.glob("epoch_*.safetensors"), reverse=True):
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if "epoch" in metadata and (max_epoch is None or int(metadata["epoch"]) <= max_epoch):
                    return path
        except (SafetensorError, OSError, ValueError) as error:
            warnings.warn(f"{path}: unreadable checkpoint ({error}); trying an earlier epoch", stacklevel=2)
    return None


def save_checkpoint(
    path: str | Path,
    parameters: Mapping[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    epoch: int,
    log: Sequence[Mapping[str, float]],
    config: TrainConfig,
    fingerprint: Mapping[str, object] | None = None,
    buffers: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write parameters, optimiser state, `buffers`, the log and the run's fingerprint (default:
    `run_fingerprint(config)`) atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"param/{name}": value.detach().cpu().contiguous() for name, value in parameters.items()}
    tensors.update({f"buffer/{name}": value.detach().cpu().contiguous() for name, value in (buffers or {}).items()})
    for name, value in parameters.items():
        for key, state in optimizer.state.get(value, {}).items():
            if state is not None:  # SGD's momentum buffer is None before the first step
                tensors[f"optim/{name}/{key}"] = torch.as_tensor(state).detach().cpu().contiguous()
    metadata = {"epoch": str(epoch), "log": json.dumps(list(log)), "config": json.dumps(asdict(config)),
                "fingerprint": json.dumps(fingerprint if fingerprint is not None else run_fingerprint(config),
                                          sort_keys=True)}
    temporary = path.with_suffix(".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    os.replace(temporary, path)
    return path


def load_checkpoint(
    path: str | Path,
    parameters: Mapping[str, nn.Parameter],
    optimizer: torch.optim.Optimizer | None = None,
    buffers: Mapping[str, torch.Tensor] | None = None,
) -> tuple[int, list[dict[str, float]]]:
    """Restore parameters (and the optimiser state, and `buffers` in place) from `path`; returns (epoch, log).

    Raises:
        ValueError: the checkpoint's parameter names or shapes differ from `parameters`, or a buffer is absent.
    """
    tensors = load_file(str(path), device="cpu")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    saved = {key[len("param/"):]: value for key, value in tensors.items() if key.startswith("param/")}
    if set(saved) != set(parameters):
        raise ValueError(f"{path}: checkpoint parameters {sorted(saved)} differ from the model's {sorted(parameters)}")
    wrong = [name for name, value in parameters.items() if saved[name].shape != value.shape]
    if wrong:
        raise ValueError(f"{path}: shapes of {wrong} differ from the model's")
    absent = sorted(name for name in (buffers or {}) if f"buffer/{name}" not in tensors)
    if absent:
        raise ValueError(f"{path}: checkpoint lacks the buffers {absent}")
    with torch.no_grad():
        for name, value in parameters.items():
            value.copy_(saved[name].to(value.device, value.dtype))
        for name, value in (buffers or {}).items():
            value.copy_(tensors[f"buffer/{name}"].to(value.device, value.dtype))
    if optimizer is not None:
        for name, value in parameters.items():
            state = {key.rsplit("/", 1)[1]: tensor for key, tensor in tensors.items() if key.startswith(f"optim/{name}/")}
            if state:
                optimizer.state[value] = {
                    key: tensor if key == "step" else tensor.to(value.device, value.dtype) for key, tensor in state.items()
                }
    return int(metadata["epoch"]), json.loads(metadata.get("log", "[]"))


def write_log(directory: str | Path, log: Sequence[Mapping[str, float]]) -> Path:
    """Write the per-epoch log as CSV (columns: epoch, seconds, then the step's scalars)."""
    path = Path(directory) / LOG_FILE
    columns = list(dict.fromkeys(key for row in log for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(log)
    return path


def _loader(dataset: Dataset, config: TrainConfig, generator: torch.Generator) -> DataLoader:
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=config.shuffle, generator=generator,
                      num_workers=config.num_workers)


def train(
    parameters: Mapping[str, nn.Parameter],
    dataset: Dataset,
    step: StepFunction,
    config: TrainConfig | None = None,
    *,
    fingerprint: Mapping[str, object] | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
    progress: bool = False,
    buffers: Mapping[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Run `config.epochs` epochs of the configured optimiser on `parameters`, minimising `step(batch)["loss"]`.

    Args:
        parameters: the trainable tensors by (checkpoint) name; nothing else is optimised.
        dataset: map-style dataset; batches are collated with torch's default collate.
        step: computes the objective of one batch; returns "loss" and optionally other scalars to log
            (tensors with more than one element are not logged).
        config: `TrainConfig`.
        fingerprint: what else determines the result (e.g. {"config": method settings, "samples":
            `samples_fingerprint(samples)`}); stored in the checkpoints and compared on resume.
        on_epoch_start: called with the 1-indexed epoch before its batches are drawn.
        progress: show a progress bar per epoch.
        buffers: tensors the step updates in place without the optimiser (BatchNorm statistics), by name: saved
            in every checkpoint and restored on resume.

    Returns:
        `TrainResult`.

    Raises:
        CheckpointMismatchError: `checkpoint_dir` holds checkpoints of another fingerprint (resume only).
    """
    config = config or TrainConfig()
    seed_everything(config.seed)
    named = dict(parameters)
    if not named:
        raise ValueError("train: no parameters to optimise")
    optimizer = make_optimizer(config, list(named.values()))
    result = TrainResult()
    start_epoch = 0
    run = run_fingerprint(config, fingerprint)
    if config.checkpoint_dir and config.resume:
        last = latest_checkpoint(config.checkpoint_dir, max_epoch=config.epochs)
        if last is not None:
            check_fingerprint(last, run)
            start_epoch, result.log = load_checkpoint(last, named, optimizer, buffers)
            result.resumed_from = start_epoch
    elif config.checkpoint_dir:
        for stale in Path(config.checkpoint_dir).glob("epoch_*.safetensors"):
            stale.unlink()
    stream = torch.Generator().manual_seed(config.seed)
    batches_per_epoch = len(_loader(dataset, config, stream))
    for _ in range(start_epoch if config.shuffle_stream == "continuous" else 0):
        for _ in _loader(range(len(dataset)), config, stream):  # replay the draws of the epochs resumed past
            pass
    iteration = start_epoch * batches_per_epoch
    for epoch in range(start_epoch + 1, config.epochs + 1):
        started = time.perf_counter()
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        generator = stream if config.shuffle_stream == "continuous" else torch.Generator().manual_seed(config.seed + epoch)
        sums: dict[str, float] = {}
        batches = 0
        loader = _loader(dataset, config, generator)
        # The bar is updated by hand: wrapping the loader in tqdm.auto would create an extra iterator, which draws
        # from the shuffling generator and so would make the batch order depend on `progress`.
        bar = tqdm(total=len(loader), desc=f"epoch {epoch}/{config.epochs}", disable=not progress, leave=False)
        for batch in loader:
            outputs = step(batch)
            if "loss" not in outputs:
                raise KeyError("train: the step function must return a dict with a 'loss' entry")
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, epoch - 1, iteration)
            optimizer.zero_grad(set_to_none=True)
            outputs["loss"].backward()
            optimizer.step()
            batches += 1
            iteration += 1
            bar.update()
            for key, value in outputs.items():
                if torch.is_tensor(value) and value.numel() == 1:
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
        bar.close()
        row = {"epoch": epoch, "seconds": time.perf_counter() - started}
        row.update({key: total / max(batches, 1) for key, total in sums.items()})
        result.log.append(row)
        if config.checkpoint_dir:
            result.checkpoints.append(
                save_checkpoint(checkpoint_path(config.checkpoint_dir, epoch), named, optimizer, epoch, result.log,
                                config, run, buffers)
            )
            write_log(config.checkpoint_dir, result.log)
    return result


def fit(
    model: FeatureModel,
    samples: Sequence[Sample],
    config: TrainConfig | None = None,
    *,
    name: str,
    code: Sequence[str] = (),
    use_cache: bool = True,
    cache_root: str | Path | None = None,
    cache_dtype: str = "float32",
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> TrainResult:
    """Train a `FeatureModel`'s parameters on auxiliary samples with `train`.

    With `use_cache` the frozen part of the forward pass (`model.encode_rows`) is computed once into a
    memory-mapped `FeatureCache`, so an epoch costs only what follows it; without it every step runs the image
    encoder, as the references do.

    Args:
        model: the model to train (on `device`); set to train mode, then back to eval mode.
        samples: training records with masks (normal images get zero masks).
        config: `TrainConfig`.
        name: the method's name (cache directory prefix, fingerprint).
        code: modules besides the model's own (and its base classes') that define the training, e.g. the recipe.
        use_cache: read the frozen features from the cache instead of recomputing them.
        cache_root: parent folder of feature caches (default `zsadkit.paths.default_cache_root()`).
        cache_dtype: storage dtype of cached features ("float32" exact, "float16" half the disk).
        device: where the model runs.
        progress: progress bars.

    Raises:
        CheckpointMismatchError: `config.checkpoint_dir` holds a run of another method configuration, training
            setting, sample list or backbone (the checkpoints' fingerprint).
    """
    config = config or TrainConfig()
    model.train()
    if use_cache:
        dataset = cached_rows(model, samples, name=name, cache_root=cache_root, dtype=cache_dtype,
                              batch_size=config.batch_size, device=device, progress=progress)
    else:
        dataset = AnomalyDataset(list(samples), image_size=model.image_size)

    def step(batch: dict) -> Mapping[str, torch.Tensor]:
        if "image" in batch:
            batch = {**batch, **model.encode_rows(batch["image"].to(device))}
        return model.losses_from_rows(batch)

    fingerprint = {"method": name, **model.fingerprint(), "samples": samples_fingerprint(samples),
                   "code": method_code_digest(model, *code),
                   "image_features": f"cache {cache_dtype}" if use_cache and cache_dtype != "float32" else "float32"}
    result = train(model.trainable_parameters(), dataset, step, config, fingerprint=fingerprint, progress=progress)
    model.eval()
    return result
