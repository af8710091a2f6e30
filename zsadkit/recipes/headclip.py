"""How HeadCLIP is trained, scored and summarised (a reconstruction: see `zsadkit.methods.headclip`).

Nothing of HeadCLIP's training is known beyond "17 datasets across industrial and medical domains"; every choice
below is a hypothesis (H5 of the method file) and a parameter:

* Data: AnomalyCLIP's protocol (the `headclip` protocol of `zsadkit/protocols.yaml` is AnomalyCLIP's runs): train
  on the auxiliary dataset's **test** split with masks (VisA for MVTec AD, MVTec AD for the other sets).
* Objective: AnomalyCLIP's glocal loss (Eq. 4, `HeadCLIP.losses`, inherited).
* Trainable: the prompts and the head weights (`HeadCLIP.trainable_parameters`); optimiser: AnomalyCLIP's
  (`TrainConfig()`: Adam lr 1e-3, betas (0.5, 0.999), batch 8, 15 epochs, seed 111), one learning rate for both.
* Cache: the image-encoder blocks before the first weighted layer are frozen, so `fit` and `evaluate` read their
  output from the feature cache (`HeadCLIP.frozen_rows`) and run only the weighted blocks. With head weights in
  every layer this is the patch embedding alone; with the last N layers it is all blocks before them.
* Scoring: `evaluate_jas` scores a test set once and gives the image rows of several joint-score settings (the
  per-class min-max normalisation of the JAS needs the whole test set, so it happens here, not in `predict`).
* mAD (H4): `mad_rows` averages the metric lists per level it is given (default `mad_metrics`: the protocol's
  reported pairs, pixel AUROC + PRO, image AUROC + AP) and writes the definition beside every value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader

from zsadkit.data.records import Sample
from zsadkit.feature_cache import cached_rows
from zsadkit.methods.headclip import FIDELITY, HeadCLIP, HeadCLIPConfig, joint_score
from zsadkit.metrics import Evaluator, mad
from zsadkit.metrics.evaluator import PRO_METRICS
from zsadkit.protocols import domain, protocol
from zsadkit.results import load_published
from zsadkit.training import TrainConfig, TrainResult
from zsadkit.training import fit as fit_feature_model

__all__ = [
    "JAS_FIELDS",
    "evaluate",
    "evaluate_jas",
    "fidelity_of",
    "fit",
    "gains_beside_claims",
    "mad_metrics",
    "mad_rows",
]

NAME = "headclip"
#: The `HeadCLIPConfig` fields that only change the joint score (no retraining, no new forward pass).
JAS_FIELDS = tuple(field.name for field in fields(HeadCLIPConfig) if field.name.startswith("jas_"))
#: The fidelity written beside the results of the methods the HeadCLIP notebooks run.
FIDELITIES = {"headclip": FIDELITY, "anomalyclip": "reference"}


def fidelity_of(method: str) -> str:
    """"reconstructed" for HeadCLIP, "reference" for AnomalyCLIP (checked against its code by `zsadkit.verify`)."""
    if method not in FIDELITIES:
        raise KeyError(f"no fidelity recorded for {method!r}; known: {sorted(FIDELITIES)}")
    return FIDELITIES[method]


def fit(
    model: HeadCLIP,
    samples: Sequence[Sample],
    config: TrainConfig | None = None,
    *,
    use_cache: bool = True,
    cache_root: str | Path | None = None,
    cache_dtype: str = "float32",
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> TrainResult:
    """Train the prompts and head weights on auxiliary samples (`zsadkit.training.fit`; default `TrainConfig()`,
    AnomalyCLIP's schedule [unknown for HeadCLIP]). With `use_cache` the blocks before the first weighted layer
    are read from the feature cache (same values as running them)."""
    return fit_feature_model(model, samples, config or TrainConfig(), name=NAME, code=(__name__,), use_cache=use_cache,
                             cache_root=cache_root, cache_dtype=cache_dtype, device=device, progress=progress)


def _jas_configs(model: HeadCLIP, jas: Mapping[str, Mapping[str, Any]]) -> dict[str, HeadCLIPConfig]:
    """The model's configuration with each named set of `jas_*` overrides (validated by the config)."""
    if not jas:
        raise ValueError("evaluate_jas: give at least one joint-score setting, e.g. {'model': {}}")
    configs = {}
    for name, overrides in jas.items():
        unknown = sorted(set(overrides) - set(JAS_FIELDS))
        if unknown:
            raise ValueError(f"joint-score setting {name!r}: {unknown} are not joint-score fields {list(JAS_FIELDS)}")
        configs[name] = replace(model.config, **overrides)
    return configs


@torch.no_grad()
def evaluate_jas(
    model: HeadCLIP,
    samples: Sequence[Sample],
    jas: Mapping[str, Mapping[str, Any]],
    *,
    dataset: str,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    pro: str | None = "cflow200",
    cache_root: str | Path | None = None,
    cache_dtype: str = "float32",
    progress: bool = False,
) -> pd.DataFrame:
    """Metric rows of HeadCLIP for several joint-score settings from one pass over the test set.

    The pixel rows do not depend on the joint score and are computed once; the image rows are computed per
    setting from p_global and the pooled map statistics of every image, so that the per-class min-max
    normalisation (`jas_normalize="minmax_per_class"`) sees the whole test set.

    Args:
        model: a `HeadCLIP` (set to eval mode).
        samples: test records with absolute paths.
        jas: setting name → `jas_*` overrides of the model's configuration ({} = the model's own score).
        dataset: dataset name of the rows.
        batch_size, device, pro, cache_root, cache_dtype, progress: as `zsadkit.engine.evaluate_cached`.

    Returns:
        `Evaluator` rows with a column `jas` naming the setting (pixel rows repeated for each setting).
    """
    configs = _jas_configs(model, jas)
    model.eval()
    rows = cached_rows(model, samples, name=NAME, cache_root=cache_root, dtype=cache_dtype, batch_size=batch_size,
                       device=device, progress=progress)
    has_masks = any(sample.mask is not None for sample in samples)
    pooling = {(config.jas_pool, config.jas_topk_percent, config.jas_map) for config in configs.values()}
    class_names: list[str] = []
    labels, global_scores, pooled = [], [], {key: [] for key in pooling}
    with Evaluator(dataset=dataset, pro=pro) as pixel_evaluator:
        for batch in DataLoader(rows, batch_size=batch_size, shuffle=False):
            parts = model.score_parts_from_rows(batch)
            names = list(batch["class_name"])
            if has_masks:  # image scores of this evaluator are not used: its pixel rows are
                pixel_evaluator.update(names, batch["label"], parts.global_scores.float().cpu(), masks=batch["mask"],
                                       maps=parts.maps.float().cpu())
            class_names += names
            labels.append(batch["label"])
            global_scores.append(parts.global_scores.float().cpu())
            for key in pooling:
                pooled[key].append(parts.pooled(key[0], key[1], key[2]).float().cpu())
        pixel_rows = pixel_evaluator.compute().query("level == 'pixel'") if has_masks else None
    all_labels, all_global = torch.cat(labels), torch.cat(global_scores)
    frames = []
    for name, config in configs.items():
        key = (config.jas_pool, config.jas_topk_percent, config.jas_map)
        scores = joint_score(all_global, torch.cat(pooled[key]), config.jas_beta, config.jas_mode,
                             config.jas_normalize, class_names)
        with Evaluator(dataset=dataset, pro=None) as image_evaluator:
            image_evaluator.update(class_names, all_labels, scores)
            image_rows = image_evaluator.compute()
        frames.append(pd.concat([image_rows, pixel_rows], ignore_index=True).assign(jas=name))
    return pd.concat(frames, ignore_index=True)


def evaluate(
    model: HeadCLIP,
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
    """Metric rows of the model's own joint score (per-class normalisation included) on its cached frozen part;
    for `jas_normalize="none"` the same rows as `zsadkit.engine.evaluate`."""
    frame = evaluate_jas(model, samples, {"model": {}}, dataset=dataset, batch_size=batch_size, device=device,
                         pro=pro, cache_root=cache_root, cache_dtype=cache_dtype, progress=progress)
    return frame.drop(columns="jas")


def mad_metrics(pro: str | None = "cflow200") -> dict[str, list[tuple[str, str]]]:
    """The default mAD components per level: the (level, metric) pairs the `headclip` protocol reports, "pro"
    read as the run's AU-PRO variant (pixel AUROC + PRO, image AUROC + AP) [unknown for HeadCLIP]."""
    components: dict[str, list[tuple[str, str]]] = {}
    for level, metric in protocol(NAME).metrics:
        names = PRO_METRICS[pro] if metric == "pro" else (metric,)
        components.setdefault(level, []).extend((level, name) for name in names)
    return components


def mad_rows(
    results: pd.DataFrame,
    metrics: Mapping[str, Sequence[Sequence[str]]] | None = None,
    *,
    pro: str | None = "cflow200",
    by: Sequence[str] = ("method",),
) -> pd.DataFrame:
    """mAD per level (`zsadkit.metrics.mad`) for each group of `by` columns, with its definition beside it.

    Args:
        results: metric rows (tidy or `Evaluator` rows; several datasets and methods may be concatenated).
        metrics: level → (level, metric) pairs averaged at that level; default `mad_metrics(pro)`.
        pro: AU-PRO variant of the default definition.
        by: grouping columns present in `results` (e.g. method, train_set, variant).

    Returns:
        One row per group, dataset, class and level: metric "mad", value, note, n_classes and `metrics` (the
        definition, e.g. "pixel/auroc+pixel/aupro_cflow200"), plus the `by` columns.
    """
    definition = {level: [tuple(pair) for pair in pairs] for level, pairs in (metrics or mad_metrics(pro)).items()}
    keys = [column for column in by if column in results.columns]
    frames = []
    for group_key, group in results.groupby([*keys, "dataset"], sort=False, dropna=False):
        available = set(zip(group["level"], group["metric"], strict=True))
        for pairs in definition.values():
            if all(pair in available for pair in pairs):  # e.g. no pixel metrics on an image-level-only dataset
                frames.append(mad(group, pairs).assign(**dict(zip(keys, group_key[: len(keys)], strict=True))))
    if not frames:
        raise ValueError(f"mad_rows: no group has all the metrics of {definition}")
    return pd.concat(frames, ignore_index=True)


def claimed_gains() -> pd.DataFrame:
    """The abstract's claimed mAD gains (`results/published/headclip_results.csv`): domain, level, version, pp."""
    published = load_published("headclip_results")
    return pd.DataFrame({
        "domain": published["dataset"].map(lambda text: re.match(r"(\w+) domain", text).group(1)),
        "level": published["level"],
        "version": published["table"].str.replace("abstract ", "", regex=False),
        "claimed_pp": published["value"].astype(float),
    })


def gains_beside_claims(mad_frame: pd.DataFrame, method: str = "headclip",
                        baseline: str = "anomalyclip") -> pd.DataFrame:
    """Our mAD gain of `method` over `baseline` per domain and level, beside the abstract's claimed gains.

    The abstract's "up to X %p" gains are over the best prior method per dataset, whose tables are not available;
    ours are over our own `baseline` run on the same data. Two summaries per domain and level: the largest gain
    over the datasets ("up to") and the mean gain.

    Args:
        mad_frame: `mad_rows` output with a `method` column (class means are used).

    Returns:
        Columns domain, level, mad_definition, n_datasets, gain_max_pp, gain_max_dataset, gain_mean_pp,
        claimed_v1_pp, claimed_v2_pp, baseline, fidelity.
    """
    means = mad_frame[mad_frame["class_name"] == "mean"]
    table = means.pivot_table(index=["dataset", "level", "metrics"], columns="method", values="value").reset_index()
    missing = [name for name in (method, baseline) if name not in table.columns]
    if missing:
        raise ValueError(f"gains_beside_claims: no mAD rows of {missing}; methods: {sorted(set(means['method']))}")
    table = table.assign(gain_pp=(table[method] - table[baseline]) * 100, domain=table["dataset"].map(domain))
    claims = claimed_gains().pivot_table(index=["domain", "level"], columns="version", values="claimed_pp")
    rows = []
    for (domain_name, level), part in table.dropna(subset=["gain_pp"]).groupby(["domain", "level"], sort=False):
        best = part.loc[part["gain_pp"].idxmax()]
        claimed = claims.loc[(domain_name, level)] if (domain_name, level) in claims.index else {}
        rows.append({"domain": domain_name, "level": level, "mad_definition": "; ".join(sorted(set(part["metrics"]))),
                     "n_datasets": len(part), "gain_max_pp": best["gain_pp"], "gain_max_dataset": best["dataset"],
                     "gain_mean_pp": part["gain_pp"].mean(), "claimed_v1_pp": claimed.get("v1", float("nan")),
                     "claimed_v2_pp": claimed.get("v2", float("nan")), "baseline": baseline,
                     "fidelity": fidelity_of(method)})
    return pd.DataFrame(rows)
