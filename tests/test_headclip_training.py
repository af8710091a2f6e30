"""HeadCLIP training and evaluation on the synthetic data: the cache changes nothing, training helps zero-shot,
the joint-score settings of one pass equal scoring by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zsadkit.data import batches
from zsadkit.engine import evaluate
from zsadkit.experiment import RunConfig, load_split
from zsadkit.methods.headclip import build_headclip, joint_score
from zsadkit.metrics import Evaluator
from zsadkit.recipes.headclip import evaluate as evaluate_cached
from zsadkit.recipes.headclip import evaluate_jas, fit
from zsadkit.training import TrainConfig


@pytest.fixture(scope="module")
def splits() -> tuple[list, list]:
    cfg = RunConfig(profile="smoke")
    return load_split(cfg, "synth-aux"), load_split(cfg, "synth-target")


def mean_value(rows, level: str, metric: str = "auroc") -> float:
    return float(rows.query(f"class_name == 'mean' and level == '{level}' and metric == '{metric}'")["value"].iloc[0])


def test_training_from_the_cache_of_the_frozen_blocks_equals_training_on_images(splits, tmp_path: Path) -> None:
    auxiliary = splits[0][::10]
    config = TrainConfig(epochs=2, batch_size=4, seed=5)
    options = dict(lhw_layers="last", lhw_last_n=2, lhw_parameterisation="sigmoid")  # cache: blocks 1-2, side stream
    cached = build_headclip("zsad-tiny", "", 112, backbone_seed=1, train_seed=1, **options)
    on_images = build_headclip("zsad-tiny", "", 112, backbone_seed=1, train_seed=1, **options)
    assert cached.first_weighted_layer == 3
    log_cached = fit(cached, auxiliary, config, use_cache=True, cache_root=tmp_path).log
    log_images = fit(on_images, auxiliary, config, use_cache=False).log
    assert [r["loss"] for r in log_cached] == pytest.approx([r["loss"] for r in log_images], rel=1e-5)
    for name, value in cached.trainable_parameters().items():
        assert torch.allclose(value, on_images.trainable_parameters()[name], atol=1e-6), name
    assert not torch.equal(cached.head_weights["vv"].alpha, torch.zeros_like(cached.head_weights["vv"].alpha))
    cache = next(tmp_path.glob("headclip-*"))
    assert {path.name for path in cache.glob("*.npy")} >= {"hidden.npy", "side.npy"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_improves_pixel_auroc_on_held_out_target_classes(splits, tmp_path: Path, seed: int) -> None:
    auxiliary, target = splits
    assert not {s.class_name for s in auxiliary} & {s.class_name for s in target}
    model = build_headclip("zsad-tiny", "", 112, backbone_seed=seed, train_seed=seed)
    before = mean_value(evaluate_cached(model, target, dataset="t", batch_size=16, pro=None, cache_root=tmp_path),
                        "pixel")
    fit(model, auxiliary, TrainConfig(epochs=2, seed=seed), cache_root=tmp_path)
    after = mean_value(evaluate_cached(model, target, dataset="t", batch_size=16, pro=None, cache_root=tmp_path),
                       "pixel")
    # measured pixel AUROC before -> after over seeds 0, 1, 2 (2 epochs): 0.573 -> 0.632, 0.478 -> 0.662, 0.520 -> 0.581
    assert after > before + 0.03, (before, after)


def test_cached_evaluation_equals_the_engine_and_jas_settings_equal_scoring_by_hand(splits, tmp_path: Path) -> None:
    target = splits[1][::4]
    model = build_headclip("zsad-tiny", "", 112, backbone_seed=4, train_seed=4, jas_pool="topk_mean")
    engine_rows = evaluate(model, target, dataset="t", image_size=112, batch_size=8, progress=False)
    cached_rows = evaluate_cached(model, target, dataset="t", batch_size=8, cache_root=tmp_path)
    merged = engine_rows.merge(cached_rows, on=["class_name", "level", "metric"], suffixes=("_engine", "_cache"))
    assert len(merged) == len(engine_rows) > 0
    assert (merged["value_engine"] - merged["value_cache"]).abs().max() < 1e-6

    settings = {"minmax": {"jas_normalize": "minmax_per_class", "jas_pool": "max", "jas_beta": 0.4},
                "global only": {"jas_beta": 1.0}}
    rows = evaluate_jas(model, target, settings, dataset="t", batch_size=8, pro=None, cache_root=tmp_path)
    assert set(rows["jas"]) == set(settings)
    pixel = rows.query("level == 'pixel'").pivot_table(index=["class_name", "metric"], columns="jas", values="value")
    assert (pixel["minmax"] == pixel["global only"]).all()  # the joint score changes the image rows only
    parts, names, labels = [], [], []
    with torch.no_grad():
        for batch in batches(target, 112, 8):
            names += list(batch["class_name"])
            labels.append(batch["label"])
            parts.append(model.score_parts(model.encode_image(batch["image"]), model.frozen_text_for_images(names[:1])))
    global_scores = torch.cat([p.global_scores for p in parts])
    pooled = torch.cat([p.pooled("max") for p in parts])
    for name, scores in [("minmax", joint_score(global_scores, pooled, 0.4, normalize="minmax_per_class",
                                                class_names=names)), ("global only", global_scores)]:
        evaluator = Evaluator(dataset="t", pro=None)
        evaluator.update(names, torch.cat(labels), scores)
        expected = evaluator.compute().query("level == 'image'").set_index(["class_name", "metric"])["value"]
        ours = rows.query(f"jas == '{name}' and level == 'image'").set_index(["class_name", "metric"])["value"]
        assert (ours - expected.loc[ours.index]).abs().max() < 1e-6, name
