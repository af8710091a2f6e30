"""A small generic trainer for prompt/adapter learning: epochs of Adam steps, per-epoch checkpoints, resume.

The methods that learn a few parameters on an auxiliary dataset (AnomalyCLIP, VAND, AA-CLIP, HeadCLIP, CoOp)
share this loop; each supplies its trainable parameters and a `step(batch) -> {"loss": ..., ...}` function.

* Optimiser: `torch.optim.Adam(lr, betas)` without weight decay or scheduler (AnomalyCLIP: lr 1e-3,
  betas (0.5, 0.999), 15 epochs, batch 8, seed 111).
* Order: epoch e shuffles with a generator seeded by `seed + e`, so a run resumed after epoch k visits the same
  batches as an uninterrupted run and ends with the same parameters (on CPU, bit for bit).
* Checkpoints: `epoch_{e:03d}.safetensors` after every epoch, holding the parameters (`param/<name>`), the Adam
  state (`adam/<name>/{exp_avg,exp_avg_sq,step}`) and, in the metadata, the epoch, the configuration, the
  run's fingerprint and the loss log. Files are written to a temporary name and renamed, so a checkpoint that
  exists is complete.
* Fingerprint: what determines the trained parameters: the `TrainConfig` fields except those that do not
  (`RESULT_INDEPENDENT_FIELDS`: epochs, where checkpoints go, resume, workers) plus what the caller passes
  (the method's configuration, a fingerprint of the training samples).
* Resume: the latest readable checkpoint of `checkpoint_dir` up to `epochs` is loaded (parameters, optimiser,
  log) and training continues with the next epoch; an unreadable (e.g. truncated) file is reported and the
  previous one used. A checkpoint of another fingerprint (other lr, seed, data, method settings) raises
  `CheckpointMismatchError` naming the differing fields instead of silently returning its parameters; more
  epochs than the checkpoint's is allowed (training continues).
* Log: per epoch the mean of every scalar the step returns, also written to `loss_log.csv`.

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
import json
import os
import random
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

StepFunction = Callable[[dict], Mapping[str, torch.Tensor]]
CHECKPOINT_PATTERN = "epoch_{epoch:03d}.safetensors"
LOG_FILE = "loss_log.csv"
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
        lr: Adam learning rate.
        betas: Adam betas.
        seed: seeds torch, numpy and random at the start, and the per-epoch shuffling.
        shuffle: shuffle the samples every epoch (the references do).
        checkpoint_dir: where `epoch_XXX.safetensors` and `loss_log.csv` go; "" = no checkpoints.
        resume: continue from the last complete checkpoint in `checkpoint_dir`.
        num_workers: DataLoader workers.
    """

    epochs: int = 15
    batch_size: int = 8
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 111
    shuffle: bool = True
    checkpoint_dir: str = ""
    resume: bool = True
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"TrainConfig: epochs >= 0, batch_size >= 1 and lr > 0 are required, got {self}")


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
) -> Path:
    """Write parameters, Adam state, the log and the run's fingerprint (default: `run_fingerprint(config)`)
    atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"param/{name}": value.detach().cpu().contiguous() for name, value in parameters.items()}
    for name, value in parameters.items():
        for key, state in optimizer.state.get(value, {}).items():
            tensors[f"adam/{name}/{key}"] = torch.as_tensor(state).detach().cpu().contiguous()
    metadata = {"epoch": str(epoch), "log": json.dumps(list(log)), "config": json.dumps(asdict(config)),
                "fingerprint": json.dumps(fingerprint if fingerprint is not None else run_fingerprint(config),
                                          sort_keys=True)}
    temporary = path.with_suffix(".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    os.replace(temporary, path)
    return path


def load_checkpoint(
    path: str | Path, parameters: Mapping[str, nn.Parameter], optimizer: torch.optim.Optimizer | None = None
) -> tuple[int, list[dict[str, float]]]:
    """Restore parameters (and the Adam state) from `path`; returns (epoch, log).

    Raises:
        ValueError: the checkpoint's parameter names or shapes differ from `parameters`.
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
    with torch.no_grad():
        for name, value in parameters.items():
            value.copy_(saved[name].to(value.device, value.dtype))
    if optimizer is not None:
        for name, value in parameters.items():
            state = {key.rsplit("/", 1)[1]: tensor for key, tensor in tensors.items() if key.startswith(f"adam/{name}/")}
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


def train(
    parameters: Mapping[str, nn.Parameter],
    dataset: Dataset,
    step: StepFunction,
    config: TrainConfig | None = None,
    *,
    fingerprint: Mapping[str, object] | None = None,
    progress: bool = False,
) -> TrainResult:
    """Run `config.epochs` epochs of Adam on `parameters`, minimising `step(batch)["loss"]`.

    Args:
        parameters: the trainable tensors by (checkpoint) name; nothing else is optimised.
        dataset: map-style dataset; batches are collated with torch's default collate.
        step: computes the objective of one batch; returns "loss" and optionally other scalars to log
            (tensors with more than one element are not logged).
        config: `TrainConfig`.
        fingerprint: what else determines the result (e.g. {"config": method settings, "samples":
            `samples_fingerprint(samples)`}); stored in the checkpoints and compared on resume.
        progress: show a progress bar per epoch.

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
    optimizer = torch.optim.Adam(list(named.values()), lr=config.lr, betas=config.betas)
    result = TrainResult()
    start_epoch = 0
    run = run_fingerprint(config, fingerprint)
    if config.checkpoint_dir and config.resume:
        last = latest_checkpoint(config.checkpoint_dir, max_epoch=config.epochs)
        if last is not None:
            check_fingerprint(last, run)
            start_epoch, result.log = load_checkpoint(last, named, optimizer)
            result.resumed_from = start_epoch
    for epoch in range(start_epoch + 1, config.epochs + 1):
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(config.seed + epoch)
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=config.shuffle, generator=generator,
                            num_workers=config.num_workers)
        sums: dict[str, float] = {}
        batches = 0
        for batch in tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", disable=not progress, leave=False):
            outputs = step(batch)
            if "loss" not in outputs:
                raise KeyError("train: the step function must return a dict with a 'loss' entry")
            optimizer.zero_grad(set_to_none=True)
            outputs["loss"].backward()
            optimizer.step()
            batches += 1
            for key, value in outputs.items():
                if torch.is_tensor(value) and value.numel() == 1:
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
        row = {"epoch": epoch, "seconds": time.perf_counter() - started}
        row.update({key: total / max(batches, 1) for key, total in sums.items()})
        result.log.append(row)
        if config.checkpoint_dir:
            result.checkpoints.append(
                save_checkpoint(checkpoint_path(config.checkpoint_dir, epoch), named, optimizer, epoch, result.log,
                                config, run)
            )
            write_log(config.checkpoint_dir, result.log)
    return result
