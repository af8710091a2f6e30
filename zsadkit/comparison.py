"""One comparison of every registered method under one protocol (notebook `60_compare_methods`): the runs, both
kinds of uncertainty, ranks, cost from the same run, and the published numbers beside ours with the protocol
differences flagged.

The protocol is data (`comparison:` in `zsadkit/protocols.yaml`): the runs (auxiliary set -> test sets), the
contenders (a registered method with a runner, its few-shot K, its backbone, its schedule) and, per contender, the
published tables its numbers are put beside, each with the flags that say how the protocol behind that published
number differs from this one.

* Same images, same metric code: every contender's test images go through `zsadkit.engine` and one `Evaluator`
  (AU-PRO variant `pro`, AUPIMO optional); every image is scored on its own, resized the same way.
* Same reference sets: one draw per (test set, K, prompt seed) (`zsadkit.engine.draw_reference_sets`), given to
  every few-shot contender.
* Trained contenders learn on the auxiliary set through their recipes (`zsadkit.recipes`), once per training seed.
* Two uncertainties, kept apart: the bootstrap interval over test images (`zsadkit.stats`, computed in the same
  pass through `Evaluator(class_hook=...)`; the mean row's interval is that of the class mean) and mean ± std over
  seeds (prompt seeds of few-shot contenders, training seeds of trained ones).
* Cost from the same run: trainable parameters, training seconds per epoch (all stages' epochs), test images per
  second (prediction and metrics; the bootstrap excluded), peak memory (`zsadkit.models.runtime.PeakMemory`:
  CUDA: torch's peak allocation; CPU: the process's peak resident set (VmHWM, reset at the cell's start) above its
  resident set at the start).

`run_cell` is one grid cell (a contender on one run with one training seed, `zsadkit.grid.run_grid`);
`result_rows`, `leaderboard`, `paired_with_best`, `friedman_blocks`, `cost_table` shape its results, and
`heatmap_figure`, `cost_figure` draw them.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from zsadkit.data.records import Sample
from zsadkit.engine import ReferenceSets, evaluate, evaluate_few_shot
from zsadkit.experiment import RunConfig, load_split
from zsadkit.methods import Detector, registered_methods
from zsadkit.metrics import ClassSamples
from zsadkit.models.runtime import PeakMemory
from zsadkit.protocols import (
    beside_published,
    comparison_protocol,
    domain,
    published_dataset_name,
    published_method_name,
)
from zsadkit.results import KEY_COLUMNS, PROVENANCE_COLUMNS, tidy
from zsadkit.stats import (
    BootstrapConfig,
    ClassBootstrap,
    FriedmanResult,
    bootstrap_class,
    bootstrap_rows,
    friedman_test,
    paired_difference,
    uncertainty_table,
)

__all__ = [
    "LEADERBOARD_COLUMNS",
    "RUNNERS",
    "CellResult",
    "Contender",
    "Evaluation",
    "Plan",
    "PublishedSource",
    "contender_label",
    "contenders",
    "cost_figure",
    "cost_table",
    "friedman_blocks",
    "heatmap_figure",
    "leaderboard",
    "paired_with_best",
    "published_sources",
    "result_rows",
    "run_cell",
    "runs_for",
]

RUNNERS = ("zero_shot", "few_shot", "vand", "prompts", "aaclip", "inctrl")
LEADERBOARD_COLUMNS = (
    "method", "dataset", "class_name", "level", "metric", "value", "ci_low", "ci_high", "seeds", "std", "rank", "n_seeds",
    "seed_kind", "confidence", "n_resamples", "published", "diff", "published_source", "protocol_flags", "epochs",
    "note", *PROVENANCE_COLUMNS,
)
#: The columns of `bootstrap_rows` kept beside the Evaluator's rows.
INTERVAL_COLUMNS = ("ci_low", "ci_high", "confidence", "n_resamples")
ROW_KEY = ["dataset", "class_name", "level", "metric"]


# ---------------------------------------------------------------------------------------------- the protocol
@dataclass(frozen=True)
class PublishedSource:
    """A published table a contender's numbers are put beside.

    Attributes:
        paper: whose names and protocol (`zsadkit.protocols.protocol`).
        source: the `results/published/` table ("" = the paper's main table).
        printed_method: the method name in that table ("" = `published_method_name(contender, paper)`).
        table: only rows of this `table` cell ("" = all).
        flags: names of `comparison.flags` in protocols.yaml that apply to its numbers.
    """

    paper: str
    source: str = ""
    printed_method: str = ""
    table: str = ""
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Contender:
    """One leaderboard method: a registered method run one way.

    Attributes:
        name: the leaderboard's `method` ("winclip+").
        method: the registered method it builds ("winclip").
        runner: how it is trained and scored (`RUNNERS`).
        shots: K normal references per class (few-shot runners), one score per K.
        backbone: "" (the run's backbone) or the name of another (the notebook's `<name>_backbone` parameters).
        schedule: runner settings (`epochs` per auxiliary set, `optimizer`, `epoch_policy`, `select_epoch`).
        published: the published tables, first match wins.
        described: False for a registered method protocols.yaml does not list (run zero-shot as built).
    """

    name: str
    method: str
    runner: str = "zero_shot"
    shots: tuple[int, ...] = ()
    backbone: str = ""
    schedule: Mapping[str, Any] = field(default_factory=dict)
    published: tuple[PublishedSource, ...] = ()
    described: bool = True

    def labels(self) -> list[str]:
        """The figure labels of its scores, one per K."""
        return [contender_label(self.name, k) for k in (self.shots or (0,))]


def contender_label(method: str, shots: int) -> str:
    """"winclip+ K=2" for a few-shot score, the method name for a zero-shot one."""
    return f"{method} K={int(shots)}" if shots else method


def contenders(methods: Sequence[str] | None = None,
               shots: Mapping[str, Sequence[int]] | None = None) -> list[Contender]:
    """The contenders of the registered methods, in the order of protocols.yaml, then every registered method it
    does not list (zero-shot as `build_method` builds it: a method that lands later joins by itself).

    Args:
        methods: registry names to keep (None or empty: every registered method).
        shots: contender name -> the K to run instead of its protocols.yaml ones.
    """
    registered = registered_methods()
    unknown = sorted(set(methods or ()) - set(registered))
    if unknown:
        raise KeyError(f"methods {unknown} are not registered; registered: {registered}")
    unknown = sorted(set(shots or {}) - {name for name in comparison_protocol()["contenders"]})
    if unknown:
        raise KeyError(f"shots names {unknown}, which are not contenders of protocols.yaml `comparison`")
    found = []
    for name, entry in comparison_protocol()["contenders"].items():
        runner = entry.get("runner", "zero_shot")
        if runner not in RUNNERS:
            raise ValueError(f"protocols.yaml comparison contender {name!r}: runner {runner!r} is not one of {RUNNERS}")
        if entry["method"] not in registered:
            raise KeyError(f"protocols.yaml comparison contender {name!r} runs {entry['method']!r}, which is not "
                           f"registered ({registered})")
        k = tuple(int(value) for value in (shots or {}).get(name, entry.get("shots", ())))
        if (runner in ("few_shot", "inctrl")) != bool(k):
            raise ValueError(f"contender {name!r}: runner {runner!r} needs K (shots) exactly when it is few-shot")
        published = tuple(PublishedSource(source["paper"], source.get("source", ""), source.get("printed_method", ""),
                                          source.get("table", ""), tuple(source.get("flags", ())))
                          for source in entry.get("published", ()))
        found.append(Contender(name, entry["method"], runner, k, entry.get("backbone", ""),
                               dict(entry.get("schedule", {})), published))
    listed = {contender.method for contender in found}
    found += [Contender(method, method, described=False) for method in registered if method not in listed]
    return [contender for contender in found if not methods or contender.method in methods]


def runs_for(data_root: str) -> list[list]:
    """[auxiliary set, [test sets]] of the comparison: the synthetic ones without a data root."""
    protocol = comparison_protocol()
    return [[train, list(tests)] for train, tests in protocol["runs" if data_root else "smoke_runs"]]


# ---------------------------------------------------------------------------------------------- one cell
@dataclass(frozen=True)
class Plan:
    """How every contender is trained and scored in one comparison (part of every grid cell's context).

    Attributes:
        output: folder of the training checkpoints.
        data_protocol: the manifests the datasets are read from.
        epochs: 0 = each recipe's schedule; n = n epochs for every stage of every trained contender.
        steps_per_epoch: InCTRL's steps per epoch (0 = its recipe's).
        subsample: keep every n-th auxiliary and test image (1 = all).
        pro: AU-PRO variant of the Evaluator (the comparison protocol's `pro`).
        resize: how every contender's images are brought to S × S (the comparison protocol's `resize`).
        aupimo: add the pixel metric AUPIMO.
        image_bootstrap: the image-level resampling (None = no interval).
        pixel_bootstrap: the pixel-level resampling (None = no interval).
        cache_root: feature caches of the training images ("" = the default).
        cache_dtype: their storage dtype.
        retrain: train from scratch even where checkpoints exist.
    """

    output: str
    data_protocol: str = "anomalyclip"
    epochs: int = 0
    steps_per_epoch: int = 0
    subsample: int = 1
    pro: str | None = "cflow200"
    resize: str = "squash"
    aupimo: bool = False
    image_bootstrap: BootstrapConfig | None = None
    pixel_bootstrap: BootstrapConfig | None = None
    cache_root: str = ""
    cache_dtype: str = "float32"
    retrain: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "steps_per_epoch"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.subsample < 1:
            raise ValueError(f"subsample must be >= 1, got {self.subsample}")


@dataclass(frozen=True, eq=False)
class Evaluation:
    """One contender scored on one test set with one K and seeds.

    Attributes:
        contender: its name.
        dataset: the test set.
        shots: K (0 = zero-shot).
        train_seed: the training seed (None for training-free contenders).
        prompt_seed: the reference-set seed (None for zero-shot ones).
        rows: the Evaluator's rows with provenance (`zsadkit.results.tidy`).
        image_bootstrap: per-class image-level bootstraps.
        pixel_bootstrap: per-class pixel-level bootstraps.
        seconds: prediction and metrics (the bootstrap excluded).
        n_images: test images scored.
    """

    contender: str
    dataset: str
    shots: int
    train_seed: int | None
    prompt_seed: int | None
    rows: pd.DataFrame
    image_bootstrap: list[ClassBootstrap]
    pixel_bootstrap: list[ClassBootstrap]
    seconds: float
    n_images: int


@dataclass(frozen=True, eq=False)
class CellResult:
    """A contender on one run with one training seed: its evaluations and what it cost.

    Attributes:
        contender: its name.
        train_set: the auxiliary set ("none" for training-free contenders).
        train_seed: the training seed (None for training-free contenders).
        evaluations: one per test set, K and prompt seed.
        trainable_parameters: learned tensors' elements (all models of the cell, e.g. InCTRL's per K).
        train_seconds_per_epoch: training seconds / epochs, all stages and models (NaN when nothing was trained).
        epochs: what was trained ("15", AA-CLIP "5+20", "" for nothing).
        peak_memory_mb: `zsadkit.models.runtime.PeakMemory` of the whole cell (above its start).
        memory_kind: what that measures.
        log: the training log rows.
    """

    contender: str
    train_set: str
    train_seed: int | None
    evaluations: list[Evaluation]
    trainable_parameters: int
    train_seconds_per_epoch: float
    epochs: str
    peak_memory_mb: float
    memory_kind: str
    log: list[dict] = field(default_factory=list)


@dataclass
class _Trained:
    """What a runner's training gives: a detector per K (0 for zero-shot) and what it cost."""

    detectors: dict[int, Detector]
    checkpoint: str = ""
    epochs: str = ""
    log: list[dict] = field(default_factory=list)
    parameters: int = 0


def _parameter_count(*models: object) -> int:
    counted: dict[int, int] = {}
    for model in models:
        if hasattr(model, "trainable_parameters"):
            for parameter in model.trainable_parameters().values():
                counted[id(parameter)] = parameter.numel()
    return sum(counted.values())


def _epochs(contender: Contender, plan: Plan, train_set: str, default: int) -> int:
    """The epochs of a stage: the plan's override, else the contender's per-set schedule, else `default`."""
    if plan.epochs:
        return plan.epochs
    schedule = contender.schedule.get("epochs", {})
    return int(schedule.get(train_set, schedule.get("default", default)) if isinstance(schedule, Mapping)
               else schedule or default)


def _checkpoints(plan: Plan, contender: Contender, train_set: str, seed: int) -> Path:
    return Path(plan.output) / "checkpoints" / f"{contender.name}_{train_set}_seed{seed}"


def _train(contender: Contender, cfg: RunConfig, plan: Plan, train_set: str, seed: int | None) -> _Trained:
    """Build the contender's detector(s) and train them on `train_set` with its recipe."""
    if contender.runner in ("zero_shot", "few_shot"):
        detector = cfg.build(contender.method)
        return _Trained({k: detector for k in contender.shots or (0,)})
    if seed is None:
        raise ValueError(f"contender {contender.name!r} is trained: its grid cell needs a train_seed")
    samples = load_split(cfg, train_set, "test", protocol=plan.data_protocol)[:: plan.subsample]
    folder = _checkpoints(plan, contender, train_set, seed)
    if contender.runner == "vand":
        from zsadkit.recipes.vand import VandTrainingConfig, train_vand

        model = cfg.build(contender.method, train_seed=seed)
        epochs = _epochs(contender, plan, train_set, VandTrainingConfig().epochs)
        result = train_vand(model, samples, VandTrainingConfig(epochs=epochs, seed=seed, checkpoint_dir=str(folder),
                                                               resume=not plan.retrain))
        return _Trained({0: model}, str(folder), str(epochs), result.log, _parameter_count(model))
    if contender.runner == "prompts":
        from zsadkit.training import TrainConfig

        recipe = importlib.import_module(f"zsadkit.recipes.{contender.method}")
        model = cfg.build(contender.method, train_seed=seed)
        optimizer = contender.schedule.get("optimizer")
        config = recipe.train_config(optimizer) if optimizer else TrainConfig()
        config = replace(config, epochs=_epochs(contender, plan, train_set, config.epochs), seed=seed,
                         checkpoint_dir=str(folder), resume=not plan.retrain)
        result = recipe.fit(model, samples, config, cache_root=plan.cache_root or None, cache_dtype=plan.cache_dtype,
                            device=cfg.device)
        return _Trained({0: model}, str(folder), str(config.epochs), result.log, _parameter_count(model))
    if contender.runner == "aaclip":
        from zsadkit.recipes import aaclip as recipe

        model = cfg.build(contender.method, train_seed=seed)
        stage1 = replace(recipe.STAGE1, epochs=plan.epochs or recipe.STAGE1.epochs, seed=seed)
        stage2 = replace(recipe.STAGE2, epochs=plan.epochs or recipe.STAGE2.epochs, seed=seed)
        run = recipe.fit(model, recipe.training_samples(samples, "full", seed=seed), stage1, stage2,
                         checkpoint_dir=folder, cache_root=plan.cache_root or None, device=cfg.device)
        choice = recipe.choose_epoch(contender.schedule.get("epoch_policy", "last"), stage2.epochs)
        checkpoint = str(recipe.load_epoch(model, run, choice.epoch))
        return _Trained({0: model}, checkpoint, f"{stage1.epochs}+{stage2.epochs}", run.log, _parameter_count(model))
    if contender.runner == "inctrl":
        from zsadkit.recipes import inctrl as recipe

        clip = cfg.load_backbone()
        auxiliary = recipe.auxiliary_samples(lambda d, s: load_split(cfg, d, s, protocol=plan.data_protocol),
                                             train_set)[:: plan.subsample]
        defaults = recipe.InCTRLTrainingConfig()
        models, log, checkpoints = {}, [], []
        for k in contender.shots:
            model = cfg.build(contender.method, clip=clip, train_seed=seed)
            if models:
                model.share_text_cache(next(iter(models.values())))
            config = recipe.InCTRLTrainingConfig(
                shots=k, epochs=plan.epochs or defaults.epochs, seed=seed,
                steps_per_epoch=plan.steps_per_epoch or defaults.steps_per_epoch,
                select_epoch=contender.schedule.get("select_epoch", defaults.select_epoch),
                checkpoint_dir=str(folder / f"k{k}"))
            result = recipe.fit(model, auxiliary, config, cache_root=plan.cache_root or None,
                                cache_dtype=plan.cache_dtype, resize=plan.resize, device=cfg.device)
            models[k] = model
            log += [{"shots": k, **row} for row in result.log]
            checkpoints.append(result.selected_checkpoint)
        return _Trained(models, ";".join(checkpoints), str(plan.epochs or defaults.epochs), log,
                        _parameter_count(*models.values()))
    raise ValueError(f"contender {contender.name!r}: unknown runner {contender.runner!r}; known: {RUNNERS}")


def _score(detector: Detector, cfg: RunConfig, plan: Plan, test_samples: Sequence[Sample], dataset: str,
           shots: int = 0, references: Mapping[str, Sequence[Sample]] | None = None
           ) -> tuple[pd.DataFrame, list[ClassBootstrap], list[ClassBootstrap], float]:
    """Evaluator rows, per-class bootstraps (computed while each class's maps exist) and the seconds of prediction
    and metrics."""
    image_boots: list[ClassBootstrap] = []
    pixel_boots: list[ClassBootstrap] = []
    bootstrap_seconds = [0.0]

    def hook(samples: ClassSamples) -> None:
        start = time.perf_counter()
        if plan.image_bootstrap is not None:
            image_boots.append(bootstrap_class(samples, plan.image_bootstrap))
        if plan.pixel_bootstrap is not None and samples.maps is not None:
            pixel_boots.append(bootstrap_class(samples, plan.pixel_bootstrap))
        bootstrap_seconds[0] += time.perf_counter() - start

    options: dict[str, Any] = {"aupimo": plan.aupimo}
    if plan.image_bootstrap is not None or plan.pixel_bootstrap is not None:
        options["class_hook"] = hook
    common = dict(dataset=dataset, image_size=cfg.image_size, batch_size=cfg.batch_size, device=cfg.device,
                  pro=plan.pro, resize=plan.resize, evaluator_options=options)
    start = time.perf_counter()
    if references is None:
        rows = evaluate(detector, test_samples, **common)
    else:
        try:
            rows = evaluate_few_shot(detector, test_samples, [], shots, references=references, **common)
        finally:
            detector.clear_references()
    return rows, image_boots, pixel_boots, time.perf_counter() - start - bootstrap_seconds[0]


def run_cell(cell: Mapping[str, Any], *, contenders: Mapping[str, Contender], configs: Mapping[str, RunConfig],
             plan: Plan, reference_sets: Mapping[str, ReferenceSets]) -> CellResult:
    """Train one contender on one auxiliary set with one seed (`cell`: contender, train_set, test_sets,
    train_seed) and score it on every test set, with every K and prompt seed of `reference_sets`."""
    contender = contenders[cell["contender"]]
    cfg = configs[contender.backbone]
    trained = contender.runner not in ("zero_shot", "few_shot")
    seed = cell["train_seed"] if trained else None
    with PeakMemory(cfg.device) as memory:
        training = _train(contender, cfg, plan, cell["train_set"], seed)
        evaluations = []
        for dataset in cell["test_sets"]:
            test_samples = load_split(cfg, dataset, "test", protocol=plan.data_protocol)[:: plan.subsample]
            draws = [(k, prompt_seed) for k, prompt_seed in sorted(reference_sets.get(dataset, {}))
                     if k in contender.shots]
            missing = sorted(set(contender.shots) - {k for k, _ in draws})
            if missing:
                raise KeyError(f"{contender.name}: no reference sets of K = {missing} for {dataset!r}")
            for k, prompt_seed in draws or [(0, None)]:
                detector = training.detectors[k]
                if hasattr(detector, "set_domain"):  # AA-CLIP's blur and fusion per domain
                    detector.set_domain(domain(dataset))
                references = reference_sets[dataset][(k, prompt_seed)] if k else None
                rows, image_boots, pixel_boots, seconds = _score(detector, cfg, plan, test_samples, dataset, k,
                                                                 references)
                provenance = cfg.provenance(contender.name, train_set=cell["train_set"] if trained else "none",
                                            shots=k, checkpoint=training.checkpoint, train_seed=seed,
                                            reference_seed=prompt_seed)
                evaluations.append(Evaluation(contender.name, dataset, k, seed, prompt_seed,
                                              tidy(rows, provenance).assign(epochs=training.epochs),
                                              image_boots, pixel_boots, seconds, len(test_samples)))
    train_seconds = sum(float(row.get("seconds", 0.0)) for row in training.log)
    return CellResult(contender.name, cell["train_set"] if trained else "none", seed, evaluations,
                      training.parameters, train_seconds / len(training.log) if training.log else float("nan"),
                      training.epochs, memory.above_start, memory.kind, training.log)


# ---------------------------------------------------------------------------------------------- rows
def result_rows(cells: Sequence[CellResult]) -> pd.DataFrame:
    """Every evaluation's rows (classes and class means) with its bootstrap interval: the tidy columns, then
    ci_low, ci_high, confidence, n_resamples (NaN where a metric was not resampled) and epochs; the prompt seed is the
    provenance's `reference_seed`."""
    frames = []
    for cell in cells:
        for evaluation in cell.evaluations:
            boots = [bootstrap_rows(b) for b in (evaluation.image_bootstrap, evaluation.pixel_bootstrap) if b]
            intervals = (pd.concat(boots, ignore_index=True)[[*ROW_KEY, *INTERVAL_COLUMNS]] if boots
                         else pd.DataFrame(columns=[*ROW_KEY, *INTERVAL_COLUMNS]))
            frames.append(evaluation.rows.merge(intervals, on=ROW_KEY, how="left", validate="one_to_one"))
    return pd.concat(frames, ignore_index=True)


def _seed_label(train_seed: Any, prompt_seed: Any) -> str:
    parts = [str(int(seed)) for seed in (train_seed, prompt_seed) if seed is not None and not pd.isna(seed)]
    return "/".join(parts)


def _distinct_seeds(values: pd.Series) -> str:
    return ",".join(dict.fromkeys(str(int(v)) for v in values if pd.notna(v) and v != ""))


def _seed_kind(contender: Contender) -> str:
    trained = contender.runner not in ("zero_shot", "few_shot")
    return "+".join([kind for kind, used in (("train", trained), ("prompt", bool(contender.shots))) if used])


def leaderboard(results: pd.DataFrame, contender_list: Sequence[Contender], data_protocol: str = "anomalyclip"
                ) -> pd.DataFrame:
    """The class-mean rows of `result_rows` averaged over seeds, ranked, beside the published values.

    Returns:
        `LEADERBOARD_COLUMNS` (a results file: `class_name` is "mean"): value (mean over seeds), ci_low/ci_high (the mean over seeds of each run's bootstrap
        interval), seeds (the seeds averaged, "train/prompt" for contenders with both), std (over seeds, ddof 1),
        rank (1 = best within dataset, level, metric; ties averaged), n_seeds, seed_kind, published and diff
        (fractions, value - published; NaN without a published value), published_source, protocol_flags, epochs,
        note and the provenance columns (train_seed, reference_seed and checkpoint list their distinct values).
    """
    by_name = {contender.name: contender for contender in contender_list}
    means = results[results.class_name == "mean"].copy()
    means["seed"] = [_seed_label(t, p) for t, p in zip(means.train_seed, means.reference_seed, strict=True)]
    keys = ["method", "shots", "dataset", "level", "metric", "train_set", "backbone", "weights", "image_size",
            "backbone_seed", "profile", "zsadkit_version", "commit", "epochs"]
    table = uncertainty_table(means, seed_columns=("seed",), keys=keys).rename(columns={"mean": "value"})
    distinct = means.groupby(keys, sort=False, dropna=False).agg(
        note=("note", "first"), confidence=("confidence", "first"), n_resamples=("n_resamples", "first"),
        train_seed=("train_seed", _distinct_seeds), reference_seed=("reference_seed", _distinct_seeds),
        checkpoint=("checkpoint", lambda values: ";".join(dict.fromkeys(str(v) for v in values if v))),
    ).reset_index()
    table = table.merge(distinct, on=keys, how="left")
    table["seeds"] = table["seeds"].fillna("")
    table["class_name"] = "mean"
    table["seed_kind"] = [_seed_kind(by_name[name]) for name in table.method]
    table["rank"] = table.groupby(["dataset", "level", "metric"])["value"].rank(ascending=False, method="average")
    table = _beside_published(table, contender_list, data_protocol)
    return table[list(LEADERBOARD_COLUMNS)].sort_values(["dataset", "level", "metric", "rank"], kind="stable",
                                                        ignore_index=True)


def _flag_texts(source: PublishedSource, dataset: str, row: pd.Series, method: str, data_protocol: str) -> list[str]:
    """The protocol differences behind a published number of `source` on `dataset` for our `row`."""
    protocol = comparison_protocol()
    texts = []
    for name in source.flags:
        if name not in protocol["flags"]:
            raise KeyError(f"protocols.yaml comparison: flag {name!r} is not defined under `flags`")
        flag = protocol["flags"][name]
        if "datasets" not in flag or dataset in flag["datasets"]:
            texts.append(" ".join(str(flag["text"]).split()))
    test_sets = protocol.get("test_sets", {}).get(dataset, {})
    theirs, ours = test_sets.get(source.paper), test_sets.get(data_protocol)
    if theirs and ours and theirs != ours:
        texts.append(f"published test set: {theirs}; here: {ours}")
    schedule = protocol.get("published_schedules", {}).get(method)
    if schedule and row["epochs"]:
        published = schedule.get(row["train_set"], schedule.get("default"))
        published = "+".join(str(e) for e in published) if isinstance(published, list) else str(published)
        if published != "None" and published != str(row["epochs"]):
            texts.append(f"trained {row['epochs']} epoch(s) here, {published} in the published run")
    return texts


def published_sources(contender_list: Sequence[Contender]) -> pd.DataFrame:
    """The published tables each contender is put beside, one row per (contender, source, flag): contender,
    paper, source, table, flag, datasets (where the flag applies, "" = every test set) and the flag's text."""
    flags = comparison_protocol()["flags"]
    rows = []
    for contender in contender_list:
        for source in contender.published:
            for name in source.flags or ("",):
                flag = flags.get(name, {}) if name else {}
                if name and not flag:
                    raise KeyError(f"protocols.yaml comparison: flag {name!r} is not defined under `flags`")
                rows.append(dict(contender=contender.name, paper=source.paper, source=source.source or "main",
                                 table=source.table, flag=name, datasets=",".join(flag.get("datasets", ())),
                                 text=" ".join(str(flag.get("text", "")).split())))
    return pd.DataFrame(rows, columns=["contender", "paper", "source", "table", "flag", "datasets", "text"])


def _beside_published(table: pd.DataFrame, contender_list: Sequence[Contender], data_protocol: str) -> pd.DataFrame:
    """Add published, diff, published_source and protocol_flags (first matching source of each contender)."""
    table = table.assign(published=np.nan, diff=np.nan, published_source="", protocol_flags="")
    for contender in contender_list:
        for source in contender.published:
            mine = table[(table.method == contender.name) & table.published.isna()]
            if mine.empty:
                break
            printed = source.printed_method or published_method_name(contender.name, source.paper)
            on = [*KEY_COLUMNS, "shots"] if contender.shots else list(KEY_COLUMNS)
            ours = mine.assign(class_name="mean", printed=printed, shots=mine.shots.astype(float))
            joined = beside_published(ours, source.paper, source=source.source or None, method_column="printed",
                                      on=on, published_filters={"table": [source.table]} if source.table else None,
                                      reported_only=False)
            joined = joined.dropna(subset=["ours", "published"]).drop_duplicates(subset=on)
            lookup = {(row.dataset, row.level, row.metric, getattr(row, "shots", 0.0) if contender.shots else 0.0):
                      row.published / 100 for row in joined.itertuples()}
            for index, row in mine.iterrows():
                key = (published_dataset_name(row.dataset), row.level, row.metric,
                       float(row.shots) if contender.shots else 0.0)
                if key not in lookup:
                    continue
                table.loc[index, "published"] = lookup[key]
                table.loc[index, "diff"] = row.value - lookup[key]
                table.loc[index, "published_source"] = (f"{source.source or source.paper}"
                                                        f"{': ' + source.table if source.table else ''}")
                table.loc[index, "protocol_flags"] = " | ".join(
                    _flag_texts(source, row.dataset, row, contender.method, data_protocol))
    return table


# ---------------------------------------------------------------------------------------------- comparisons
def _average(runs: Sequence[Sequence[ClassBootstrap]]) -> list[ClassBootstrap]:
    """Bootstraps of the seed-averaged method: per class the mean over runs of its values and of its draws (the
    runs saw the same images, so the same resamples)."""
    if len(runs) == 1:
        return list(runs[0])
    averaged = []
    for index, first in enumerate(runs[0]):
        members = [run[index] for run in runs]
        if any((m.class_name, m.dataset) != (first.class_name, first.dataset)
               or not np.array_equal(m.sample_ids, first.sample_ids) for m in members):
            raise ValueError(f"{first.dataset}/{first.class_name}: the seeds' runs were not scored on the same images")
        averaged.append(ClassBootstrap(
            first.dataset, first.class_name, first.n_resamples, first.seed, first.sample_ids, first.labels,
            {key: float(np.mean([m.values[key] for m in members])) for key in first.values},
            {key: next((m.notes[key] for m in members if m.notes[key]), "") for key in first.values},
            {key: np.mean([m.draws[key] for m in members], axis=0) for key in first.values}))
    return averaged


def _seed_averaged_bootstraps(cells: Sequence[CellResult]) -> dict[tuple[str, int, str, str], list[ClassBootstrap]]:
    """(method, shots, dataset, "image" | "pixel") -> the seed-averaged bootstraps."""
    runs: dict[tuple[str, int, str, str], list[list[ClassBootstrap]]] = {}
    for cell in cells:
        for evaluation in cell.evaluations:
            for level, boots in (("image", evaluation.image_bootstrap), ("pixel", evaluation.pixel_bootstrap)):
                if boots:
                    key = (evaluation.contender, evaluation.shots, evaluation.dataset, level)
                    runs.setdefault(key, []).append(boots)
    return {key: _average(value) for key, value in runs.items()}


def paired_with_best(cells: Sequence[CellResult], board: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Each score minus the best score of its (dataset, level, metric), with the paired bootstrap interval of the
    difference (both on the same resampled images; seed-averaged methods: the per-resample mean over seeds).

    Returns:
        One row per (method, shots, dataset, level, metric) with an interval: best_method, best_shots, value,
        best_value, difference, ci_low, ci_high, confidence, n_resamples, significant (the interval excludes 0),
        note. The best's own row is 0 with the interval [0, 0].
    """
    boots = _seed_averaged_bootstraps(cells)
    rows, cache = [], {}
    scored = board[board.value.notna()]
    for (dataset, level, metric), group in scored.groupby(["dataset", "level", "metric"], sort=False):
        having = group[[(m, int(k), dataset, level) in boots for m, k in zip(group.method, group.shots, strict=True)]]
        if having.empty:
            continue
        best = having.sort_values("rank", kind="stable").iloc[0]
        best_key = (best.method, int(best.shots), dataset, level)
        for row in having.itertuples():
            key = (row.method, int(row.shots), dataset, level)
            if (key, best_key) not in cache:
                cache[(key, best_key)] = paired_difference(boots[key], boots[best_key], confidence)
            paired = cache[(key, best_key)]
            mean = paired[(paired.class_name == "mean") & (paired.metric == metric)]
            if mean.empty or pd.isna(mean.ci_low.iloc[0]):
                continue
            mean = mean.iloc[0]
            rows.append(dict(method=row.method, shots=int(row.shots), best_method=best.method,
                             best_shots=int(best.shots), dataset=dataset, level=level, metric=metric,
                             value=mean.value_a, best_value=mean.value_b, difference=mean.difference,
                             ci_low=mean.ci_low, ci_high=mean.ci_high, confidence=confidence,
                             n_resamples=mean.n_resamples, significant=bool(mean.ci_high < 0 or mean.ci_low > 0),
                             note=mean.note))
    return pd.DataFrame(rows, columns=["method", "shots", "best_method", "best_shots", "dataset", "level", "metric",
                                       "value", "best_value", "difference", "ci_low", "ci_high", "confidence",
                                       "n_resamples", "significant", "note"])


def friedman_blocks(results: pd.DataFrame, level: str, metric: str, blocks: str = "class",
                    alpha: float = 0.05) -> tuple[FriedmanResult | None, str]:
    """Average ranks of every score (method and K) over blocks, with the Friedman test (Demšar 2006).

    Args:
        results: `result_rows` output.
        level, metric: the metric ranked.
        blocks: "class" (every class of every test set, seed-averaged) or "dataset" (the class means).
        alpha: significance level of the critical difference.

    Returns:
        (the test, or None when fewer than 2 blocks or scores are complete, and a sentence saying what was ranked).
    """
    if blocks not in ("class", "dataset"):
        raise ValueError(f"blocks must be 'class' or 'dataset', got {blocks!r}")
    rows = results[(results.level == level) & (results.metric == metric)]
    rows = rows[(rows.class_name == "mean") if blocks == "dataset" else (rows.class_name != "mean")]
    rows = rows.assign(label=[contender_label(m, k) for m, k in zip(rows.method, rows.shots, strict=True)])
    table = rows.pivot_table(index=["dataset", "class_name"], columns="label", values="value", aggfunc="mean",
                             dropna=False)
    complete = table.dropna()
    dropped = len(table) - len(complete)
    what = (f"{level} {metric}: {len(complete.columns)} scores ranked over {len(complete)} "
            f"{'classes' if blocks == 'class' else 'test sets'}"
            + (f" ({dropped} left out: a score undefined or missing)" if dropped else ""))
    if len(complete) < 2 or len(complete.columns) < 2:
        return None, what + "; the Friedman test needs at least 2 blocks and 2 scores"
    return friedman_test(complete, alpha=alpha), what


# ---------------------------------------------------------------------------------------------- cost
def cost_table(cells: Sequence[CellResult]) -> pd.DataFrame:
    """Per score (method and K): trainable parameters, training seconds per epoch, epochs, test images per second,
    peak memory (MB) and what it measures; means over the training seeds and runs."""
    rows = []
    for cell in cells:
        per_k: dict[int, list[Evaluation]] = {}
        for evaluation in cell.evaluations:
            per_k.setdefault(evaluation.shots, []).append(evaluation)
        for k, evaluations in per_k.items():
            rows.append(dict(method=cell.contender, shots=k, label=contender_label(cell.contender, k),
                             trainable_parameters=cell.trainable_parameters,
                             train_seconds_per_epoch=cell.train_seconds_per_epoch, epochs=cell.epochs,
                             images_per_second=sum(e.n_images for e in evaluations) / sum(e.seconds for e in evaluations),
                             peak_memory_mb=cell.peak_memory_mb, memory_kind=cell.memory_kind))
    frame = pd.DataFrame(rows)
    return frame.groupby(["method", "shots", "label", "epochs", "memory_kind"], sort=False, as_index=False).mean()


# ---------------------------------------------------------------------------------------------- figures
def heatmap_figure(board: pd.DataFrame, title: str = "") -> Figure:
    """Metric x score heat map: each cell the value and its bootstrap interval (percent), scores ordered by their
    average rank over the columns (best on top); grey where a metric is undefined."""
    import matplotlib.pyplot as plt

    frame = board.assign(label=[contender_label(m, k) for m, k in zip(board.method, board.shots, strict=True)],
                         column=[f"{published_dataset_name(d)}\n{lv} {m}"
                                 for d, lv, m in zip(board.dataset, board.level, board.metric, strict=True)])
    columns = list(dict.fromkeys(frame.column))
    order = frame.groupby("label")["rank"].mean().sort_values(kind="stable").index.tolist()
    values = frame.pivot_table(index="label", columns="column", values="value", dropna=False).reindex(
        index=order, columns=columns)
    low = frame.pivot_table(index="label", columns="column", values="ci_low", dropna=False).reindex(
        index=order, columns=columns)
    high = frame.pivot_table(index="label", columns="column", values="ci_high", dropna=False).reindex(
        index=order, columns=columns)
    fig, axis = plt.subplots(figsize=(1.25 * len(columns) + 2.5, 0.55 * len(order) + 1.8))
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("lightgrey")
    percent = values.to_numpy(dtype=float) * 100
    image = axis.imshow(np.ma.masked_invalid(percent), cmap=cmap, aspect="auto")
    middle = (np.nanmin(percent) + np.nanmax(percent)) / 2 if np.isfinite(percent).any() else 0.0
    for i in range(len(order)):
        for j in range(len(columns)):
            value, lo, hi = values.iat[i, j], low.iat[i, j], high.iat[i, j]
            if pd.isna(value):
                continue
            text = f"{100 * value:.1f}" + (f"\n[{100 * lo:.1f}, {100 * hi:.1f}]" if pd.notna(lo) else "")
            axis.text(j, i, text, ha="center", va="center", fontsize=6.5,
                      color="white" if 100 * value < middle else "black")
    axis.set_xticks(range(len(columns)), columns, fontsize=7, rotation=45, ha="right")
    axis.set_yticks(range(len(order)), order, fontsize=8)
    fig.colorbar(image, ax=axis, label="value (%)", fraction=0.03)
    axis.set_title(title or "class mean (%), 95 % bootstrap interval over test images; best average rank on top",
                   fontsize=9)
    fig.tight_layout()
    return fig


COST_AXES = (("trainable_parameters", "trainable parameters", "symlog"),
             ("train_seconds_per_epoch", "training seconds per epoch", "log"),
             ("images_per_second", "test images per second", "log"),
             ("peak_memory_mb", "peak memory (MB)", "symlog"))


def cost_figure(cost: pd.DataFrame, board: pd.DataFrame, level: str = "image", metric: str = "auroc") -> Figure:
    """Cost vs accuracy: one panel per cost, y the mean over test sets of the class-mean `level` `metric` with
    the mean of the sets' bootstrap intervals as bars. Training-free scores have no training time (left out)."""
    import matplotlib.pyplot as plt

    scores = board[(board.level == level) & (board.metric == metric)]
    accuracy = scores.groupby(["method", "shots"])[["value", "ci_low", "ci_high"]].mean().reset_index()
    frame = cost.merge(accuracy, on=["method", "shots"], how="inner")
    fig, axes = plt.subplots(1, len(COST_AXES), figsize=(4.2 * len(COST_AXES), 3.8), sharey=True)
    for axis, (column, title, scale) in zip(axes, COST_AXES, strict=True):
        shown = frame[frame[column].notna() & np.isfinite(frame[column].astype(float))]
        if scale == "log":
            shown = shown[shown[column] > 0]
        lower = 100 * (shown.value - shown.ci_low.fillna(shown.value))
        upper = 100 * (shown.ci_high.fillna(shown.value) - shown.value)
        axis.errorbar(shown[column], 100 * shown.value, yerr=[lower.to_numpy(), upper.to_numpy()], fmt="o",
                      capsize=3, markersize=4)
        for row in shown.itertuples():
            axis.annotate(row.label, (getattr(row, column), 100 * row.value), fontsize=6.5,
                          xytext=(3, 3), textcoords="offset points")
        axis.set_xscale(scale)
        axis.set_xlabel(title, fontsize=8)
        left_out = len(frame) - len(shown)
        axis.set_title(title + (f" ({left_out} without one)" if left_out else ""), fontsize=8)
    axes[0].set_ylabel(f"{level} {metric} (%), mean over test sets", fontsize=8)
    fig.tight_layout()
    return fig
