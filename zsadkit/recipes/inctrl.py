"""How InCTRL is trained and evaluated (mala-lab/InCTRL @ cc535d0: `engine_IC.py`, `datasets/IC_dataset_new.py`,
`datasets/new_utlis.py`, `main.py`, `engine_test.py`), on the shared trainer `zsadkit.training.train`.

* Auxiliary data (`auxiliary_samples`): the train and test splits of the auxiliary set together (normals =
  train/good + test/good, anomalies = the test defects, `gen_train_json.py`); MVTec AD for every target but
  MVTec AD, VisA for MVTec AD (`zsadkit/protocols.yaml`, paper `inctrl`).
* Episodes (`EpisodeDataset`): a query (any auxiliary image) and K normal prompts of its class, drawn without
  replacement (`random.sample`, IC_dataset_new.py:121-122). The query is not excluded from its own prompts
  (`query_in_prompts=True`, the reference; False excludes it).
* Batches: 8 normal then 8 anomalous queries, each label drawn from an endless stream of permutations
  (`BalancedBatchSampler`, new_utlis.py:10-58); 100 steps per epoch (`main.py --steps_per_epoch`).
* Optimiser: AdamW, lr 1e-3, betas (0.9, 0.999), weight decay 0.01 (torch's default), constant; 10 epochs, a
  checkpoint per epoch (engine_IC.py:188-234); the losses of `InCTRL.losses`. One model per K (`--shot`).
* Epoch selection: the maintainer evaluated the epoch-6 checkpoint "to avoid overfitting" (issue #26):
  `select_epoch=6` (None = the last); the chosen epoch is loaded into the model and recorded in the result.
* Few-shot protocol (`evaluate`): K ∈ {2, 4, 8}; prompt sets drawn from the target's train split per seed
  (`zsadkit.engine.draw_reference_sets`, written beside the results and given to every method compared); three
  seeds; `mean_std_over_seeds` gives the paper's mean ± std per class and dataset.
* Protocol views (`protocol_samples`): the multi-class MNIST/CIFAR-10 sets derived from the one-vs-all ones, and
  the object names InCTRL's text prior uses ("headct" for HeadCT, ...).

Deviations: the reference seeds numpy and torch (10) but not python's `random`, which draws the prompts; here every
draw is a function of (seed, epoch, index), so a run is reproducible and resumable. The frozen image tower's
outputs are cached (`use_cache=True`): an epoch then costs the adapter and heads only (`use_cache=False` encodes
every episode's images at every step, as the reference).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from zsadkit.data.dataset import batches
from zsadkit.data.records import Sample, samples_fingerprint
from zsadkit.engine import ReferenceSets
from zsadkit.feature_cache import cached_rows
from zsadkit.methods.inctrl import InCTRL
from zsadkit.metrics import Evaluator
from zsadkit.protocols import paper_setting, protocol
from zsadkit.training import (
    TrainConfig,
    TrainResult,
    checkpoint_path,
    load_checkpoint,
    method_code_digest,
    train,
)

__all__ = [
    "EpisodeDataset",
    "InCTRLFitResult",
    "InCTRLTrainingConfig",
    "auxiliary_samples",
    "evaluate",
    "fit",
    "mean_std_over_seeds",
    "multi_class_view",
    "protocol_samples",
]

NAME = "inctrl"
Loader = Callable[[str, str], list[Sample]]


@dataclass(frozen=True)
class InCTRLTrainingConfig:
    """Training settings; defaults are the reference's.

    Attributes:
        shots: K, normal prompts per episode (`--shot`; one model per K).
        epochs: 10.
        steps_per_epoch: batches per epoch (100).
        normal_per_batch: normal queries per batch (8).
        anomalous_per_batch: anomalous queries per batch (8).
        lr: AdamW learning rate (1e-3).
        betas: AdamW betas (0.9, 0.999).
        weight_decay: AdamW's decoupled weight decay (torch default 0.01).
        seed: `RNG_SEED` (10): the heads' training draws (query streams, prompts).
        query_in_prompts: a normal query may be among its own prompts (reference True).
        select_epoch: the epoch whose heads are kept (maintainer: 6, issue #26); None = the last.
        checkpoint_dir: per-epoch checkpoints ("" = none); a rerun resumes from them.
        resume: continue from the last checkpoint in `checkpoint_dir` (False: train from scratch).
    """

    shots: int = 2
    epochs: int = 10
    steps_per_epoch: int = 100
    normal_per_batch: int = 8
    anomalous_per_batch: int = 8
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    seed: int = 10
    query_in_prompts: bool = True
    select_epoch: int | None = 6
    checkpoint_dir: str = ""
    resume: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.shots < 1 or self.steps_per_epoch < 1 or self.normal_per_batch < 0 or self.anomalous_per_batch < 0 \
                or self.normal_per_batch + self.anomalous_per_batch < 1:
            raise ValueError(f"InCTRLTrainingConfig: shots, steps_per_epoch and the batch must be >= 1, got {self}")
        if self.select_epoch is not None and not 1 <= self.select_epoch <= self.epochs:
            raise ValueError(f"InCTRLTrainingConfig.select_epoch must be in [1, epochs={self.epochs}] or None, got "
                             f"{self.select_epoch}")

    @property
    def batch_size(self) -> int:
        return self.normal_per_batch + self.anomalous_per_batch

    @property
    def selected_epoch(self) -> int:
        return self.select_epoch if self.select_epoch is not None else self.epochs

    def train_config(self) -> TrainConfig:
        """The shared trainer's settings: AdamW, constant lr, batches in the dataset's (balanced) order."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, optimizer="adamw",
                           betas=self.betas, weight_decay=self.weight_decay, seed=self.seed, shuffle=False,
                           checkpoint_dir=self.checkpoint_dir, resume=self.resume)


def _permutation_stream(indices: Sequence[int], seed: int, start: int, count: int) -> list[int]:
    """Positions [start, start + count) of the endless concatenation of seeded permutations of `indices`
    (`BalancedBatchSampler.randomGenerator`)."""
    generator = np.random.default_rng(seed)
    size, drawn, taken = len(indices), [], 0
    while taken + size <= start:  # skip whole permutations before `start` (their draws advance the generator)
        generator.permutation(size)
        taken += size
    while len(drawn) < (start - taken) + count:
        drawn.extend(int(indices[i]) for i in generator.permutation(size))
    return drawn[start - taken: start - taken + count]


class EpisodeDataset(Dataset):
    """One epoch of balanced episodes: item i of batch b is a normal query for i < `normal_per_batch`, else an
    anomalous one, with its K prompts. Draws are functions of (seed, epoch, index); call `set_epoch` each epoch.

    Args:
        samples: the auxiliary records.
        config: `InCTRLTrainingConfig` (shots, batch composition, steps, seed, query_in_prompts).
        item: sample index → its row (cached features, or {"image": tensor}).
    """

    def __init__(self, samples: Sequence[Sample], config: InCTRLTrainingConfig,
                 item: Callable[[int], Mapping[str, Any]]) -> None:
        self.samples, self.config, self.item, self.epoch = list(samples), config, item, 1
        self.normals = [i for i, s in enumerate(self.samples) if s.label == 0]
        self.anomalies = [i for i, s in enumerate(self.samples) if s.label == 1]
        for kind, indices, wanted in (("normal", self.normals, config.normal_per_batch),
                                      ("anomalous", self.anomalies, config.anomalous_per_batch)):
            if wanted and not indices:
                raise ValueError(f"InCTRL training: no {kind} images among the {len(self.samples)} auxiliary samples")
        self.normals_by_class: dict[str, list[int]] = {}
        for index in self.normals:
            self.normals_by_class.setdefault(self.samples[index].class_name, []).append(index)
        needed = config.shots + (0 if config.query_in_prompts else 1)
        for name in sorted({s.class_name for s in self.samples}):
            have = len(self.normals_by_class.get(name, []))
            if have < needed:
                raise ValueError(f"InCTRL training: class {name!r} has {have} normal images, {config.shots} prompts "
                                 f"per episode need {needed}")
        self.queries: list[int] = []
        self.set_epoch(1)

    def set_epoch(self, epoch: int) -> None:
        """Draw the queries of 1-indexed `epoch` from the two label streams."""
        self.epoch = epoch
        config, steps = self.config, self.config.steps_per_epoch
        normals = _permutation_stream(self.normals, config.seed * 2, (epoch - 1) * steps * config.normal_per_batch,
                                      steps * config.normal_per_batch) if config.normal_per_batch else []
        anomalies = _permutation_stream(self.anomalies, config.seed * 2 + 1,
                                        (epoch - 1) * steps * config.anomalous_per_batch,
                                        steps * config.anomalous_per_batch) if config.anomalous_per_batch else []
        self.queries = []
        for step in range(steps):
            self.queries += normals[step * config.normal_per_batch: (step + 1) * config.normal_per_batch]
            self.queries += anomalies[step * config.anomalous_per_batch: (step + 1) * config.anomalous_per_batch]

    def prompt_indices(self, index: int) -> list[int]:
        """The K prompt samples of episode `index` in this epoch (distinct normals of the query's class)."""
        query = self.queries[index]
        pool = self.normals_by_class[self.samples[query].class_name]
        if not self.config.query_in_prompts:
            pool = [i for i in pool if i != query]
        draw = np.random.default_rng([self.config.seed, self.epoch, index])
        return [pool[i] for i in draw.choice(len(pool), self.config.shots, replace=False)]

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: int) -> dict:
        query = self.queries[index]
        rows = [self.item(i) for i in self.prompt_indices(index)]
        episode = {key: value for key, value in self.item(query).items() if torch.is_tensor(value)}
        episode.update({f"prompt_{key}": torch.stack([row[key] for row in rows]) for key in episode})
        episode.update(label=self.samples[query].label, class_name=self.samples[query].class_name, index=query)
        return episode


@dataclass
class InCTRLFitResult(TrainResult):
    """`TrainResult` plus the epoch whose heads the model holds and its checkpoint file ("" without one)."""

    selected_epoch: int = 0
    selected_checkpoint: str = ""


def fit(
    model: InCTRL,
    samples: Sequence[Sample],
    config: InCTRLTrainingConfig | None = None,
    *,
    use_cache: bool = True,
    cache_root: str | Path | None = None,
    cache_dtype: str = "float32",
    resize: str = "shorter_side_crop",
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> InCTRLFitResult:
    """Train ψ, η and φ on auxiliary samples, then keep the heads of `config.select_epoch`.

    Args:
        model: the model (its CLIP stays frozen); left in eval mode with the selected epoch's heads.
        samples: the auxiliary records (`auxiliary_samples`).
        config: `InCTRLTrainingConfig`.
        use_cache: read the frozen features (tapped tokens, pooled embedding) from the feature cache.
        cache_root: parent folder of the caches.
        cache_dtype: storage dtype of the cache ("float16" halves ViT-B-16+'s 2.4 MB per image).
        resize: image preprocessing (the reference's shorter side + centre crop).
        device: where the model runs.
        progress: progress bars.
    """
    config = config or InCTRLTrainingConfig()
    samples = list(samples)
    if use_cache:
        rows = cached_rows(model, samples, name=NAME, cache_root=cache_root, dtype=cache_dtype,
                           batch_size=config.batch_size, device=device, progress=progress, resize=resize)
        def item(index: int) -> Mapping[str, Any]:
            row = rows[index]
            return {"patch_tokens": row["patch_tokens"], "embedding": row["embedding"]}
    else:
        images = batches(samples, model.image_size, 1, resize=resize).dataset

        def item(index: int) -> Mapping[str, Any]:
            return {"image": images[index]["image"]}

    dataset = EpisodeDataset(samples, config, item)

    def step(batch: dict) -> Mapping[str, torch.Tensor]:
        if "image" in batch:
            query = model.encode_image(batch["image"].to(device))
            prompts = model.encode_image(batch["prompt_image"].flatten(0, 1).to(device))
            shape = batch["prompt_image"].shape[:2]
            batch = {**batch, **query.as_cache_rows(), "prompt_patch_tokens": prompts.patch_tokens.unflatten(0, shape),
                     "prompt_embedding": prompts.embedding.unflatten(0, shape)}
        return model.episode_losses(batch)

    selected: dict[str, torch.Tensor] = {}

    def on_epoch_start(epoch: int) -> None:
        dataset.set_epoch(epoch)
        if epoch == config.selected_epoch + 1:  # the heads after the selected epoch
            selected.update({name: value.detach().clone() for name, value in model.head_state().items()})

    fingerprint = {"method": NAME, **model.fingerprint(), "samples": samples_fingerprint(samples),
                   "code": method_code_digest(model, __name__),
                   "episodes": {"shots": config.shots, "steps": config.steps_per_epoch,
                                "normal": config.normal_per_batch, "anomalous": config.anomalous_per_batch,
                                "query_in_prompts": config.query_in_prompts, "resize": resize},
                   "image_features": f"cache {cache_dtype}" if use_cache and cache_dtype != "float32" else "float32"}
    model.train()
    try:
        result = train(model.trainable_parameters(), dataset, step, config.train_config(), fingerprint=fingerprint,
                       on_epoch_start=on_epoch_start, progress=progress, buffers=model.head_buffers())
    finally:
        model.eval()
    chosen = ""
    if config.checkpoint_dir:
        chosen = str(checkpoint_path(config.checkpoint_dir, config.selected_epoch))
        load_checkpoint(chosen, model.trainable_parameters(), buffers=model.head_buffers())
    elif selected:
        model.load_head_state(selected, source=f"epoch {config.selected_epoch}")
    return InCTRLFitResult(result.log, result.resumed_from, result.checkpoints, config.selected_epoch, chosen)


def auxiliary_samples(load: Loader, dataset: str) -> list[Sample]:
    """The auxiliary records: every split of `protocol("inctrl").train_splits` (train and test) of `dataset`."""
    return [sample for split in protocol(NAME).train_splits for sample in load(dataset, split)]


def multi_class_view(samples: Sequence[Sample], normal_classes: Sequence[str], class_name: str,
                     dataset: str) -> list[Sample]:
    """A multi-class protocol from one-vs-all records: the images of `normal_classes` are normal, the others
    anomalous, all under one class `class_name`. Each image is taken once, from the records where its own class
    is the normal one (the one-vs-all sets list every test image once per class)."""
    known = {s.class_name for s in samples}
    unknown = sorted(set(normal_classes) - known)
    if unknown:
        raise ValueError(f"multi-class view {dataset!r}: normal classes {unknown} are not among {sorted(known)}")
    view = []
    for sample in samples:
        if sample.label != 0 or (sample.split == "train" and sample.class_name not in normal_classes):
            continue
        normal = sample.class_name in normal_classes
        view.append(replace(sample, class_name=class_name, label=int(not normal), dataset=dataset,
                            defect="good" if normal else sample.class_name))
    return view


def protocol_samples(load: Loader, dataset: str, split: str) -> list[Sample]:
    """The records of `dataset` as InCTRL's protocol uses them: multi-class sets derived from their one-vs-all
    source (`protocols.yaml` "multi_class"), class names replaced by InCTRL's object names ("object_names").

    Args:
        load: (dataset, split) → records, e.g. `lambda d, s: zsadkit.experiment.load_split(cfg, d, s, "inctrl")`.
        dataset: one of the protocol's datasets, or a smoke dataset.
        split: "train" or "test".
    """
    multi = (paper_setting(NAME, "multi_class") or {}).get(dataset)
    if multi is not None:
        samples = multi_class_view(load(multi["source"], split), multi["normal_classes"], multi["class_name"], dataset)
    else:
        samples = load(dataset, split)
    names = (paper_setting(NAME, "object_names") or {}).get(dataset, {})
    return [replace(s, class_name=names.get(s.class_name, s.class_name)) for s in samples]


def _prompt_images(references: Sequence[Sample] | torch.Tensor, image_size: int, resize: str) -> torch.Tensor:
    if torch.is_tensor(references):
        return references
    return torch.cat([batch["image"] for batch in batches(list(references), image_size, len(references),
                                                          resize=resize)])


@torch.no_grad()
def evaluate(
    models: Mapping[int, InCTRL],
    test_samples: Sequence[Sample],
    reference_sets: Mapping[tuple[int, int], Mapping[str, Sequence[Sample] | torch.Tensor]] | ReferenceSets,
    *,
    dataset: str,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    resize: str = "shorter_side_crop",
    progress: bool = False,
) -> dict[tuple[int, int], pd.DataFrame]:
    """Image-level metric rows per (K, seed): each test image is encoded once and scored against every prompt set.

    Args:
        models: the model trained with K prompts, per K (they share the frozen backbone).
        test_samples: the target's test records.
        reference_sets: (K, seed) → class → K normal records (`zsadkit.engine.draw_reference_sets`) or an
            official (K, 3, S, S) prompt tensor.
        dataset: dataset name of the rows.
        batch_size: test images per encoder pass.
        device: where the models run.
        resize: image preprocessing.
        progress: print one line per class.

    Returns:
        (K, seed) → rows as `zsadkit.engine.evaluate` (image AUROC, AP, F1-max per class and their means).
    """
    keys = sorted(reference_sets)
    missing = sorted({k for k, _ in keys} - set(models))
    if missing:
        raise KeyError(f"InCTRL evaluate: no model for K = {missing} (models for {sorted(models)})")
    encoder = models[keys[0][0]]
    if any(model.feature_cache_key() != encoder.feature_cache_key() for model in models.values()):
        raise ValueError("InCTRL evaluate: the models per K must share one frozen backbone and layers")
    evaluators = {key: Evaluator(dataset=dataset, pro=None) for key in keys}
    for class_name in sorted({s.class_name for s in test_samples}):
        memories = {}
        for key in keys:
            if class_name not in reference_sets[key]:
                raise KeyError(f"InCTRL evaluate: no prompt set for class {class_name!r} at (K, seed) = {key}")
            images = _prompt_images(reference_sets[key][class_name], encoder.image_size, resize)
            memories[key] = encoder.encode_image(images.to(device))
        class_samples = [s for s in test_samples if s.class_name == class_name]
        for batch in batches(class_samples, encoder.image_size, batch_size, resize=resize):
            features = encoder.encode_image(batch["image"].to(device))
            for key in keys:
                model = models[key[0]]
                model.memory = memories[key]
                scores = model.score_features(features, list(batch["class_name"])).final_score
                evaluators[key].update(list(batch["class_name"]), batch["label"], scores.float().cpu(),
                                       sample_ids=list(batch["image_path"]))
        if progress:
            print(f"inctrl: {dataset} / {class_name}: {len(class_samples)} images scored against {len(keys)} sets")
    for model in models.values():
        model.clear_references()
    return {key: evaluator.compute() for key, evaluator in evaluators.items()}


def mean_std_over_seeds(results: pd.DataFrame, seed_column: str = "reference_seed", ddof: int = 0) -> pd.DataFrame:
    """The paper's mean ± std over prompt seeds (`seed_column`): one row per (method, dataset, class, level, metric,
    shots, ...) with `value` the mean over seeds, `std` (ddof 0, numpy's; the paper's choice is not stated) and
    `n_seeds`. Class rows and the dataset's class-mean rows ("mean") are each aggregated over seeds."""
    if seed_column not in results.columns:
        raise ValueError(f"mean_std_over_seeds: no {seed_column!r} column; columns: {list(results.columns)}")
    keys = [column for column in ("method", "dataset", "class_name", "level", "metric", "shots", "train_set",
                                  "backbone", "weights", "image_size", "checkpoint", "profile", "backbone_seed")
            if column in results.columns]
    grouped = results.groupby(keys, dropna=False, sort=True)
    summary = grouped["value"].agg(["mean", lambda values: values.std(ddof=ddof), "count"])
    summary.columns = ["value", "std", "n_seeds"]
    return summary.reset_index()
