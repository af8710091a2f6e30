"""HeadCLIP (a reconstruction): identity at initialisation, where the head weights act, the joint score, mAD,
checkpoints and the registry."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from conftest import fixture_arrays

from zsadkit.methods import build_method
from zsadkit.methods.anomalyclip import AnomalyCLIP
from zsadkit.methods.anomalyclip import reference_config as anomalyclip_config
from zsadkit.methods.base import seeded
from zsadkit.methods.headclip import (
    FIDELITY,
    HeadCLIP,
    HeadCLIPConfig,
    HeadWeights,
    build_headclip,
    joint_score,
    minmax_per_class,
    pool_map,
    reference_config,
    weighted_layers,
)
from zsadkit.recipes.headclip import gains_beside_claims, mad_metrics, mad_rows

PARAMETERISATIONS = ("scalar", "softmax", "sigmoid", "conditional")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return fixture_arrays("inputs.npz")["images"]


@pytest.fixture(scope="module")
def anomalyclip(clip) -> AnomalyCLIP:
    """AnomalyCLIP on the fixture's tiny CLIP (DPAM from layer 2, feature layer 4), prompts from seed 0."""
    with seeded(0):
        return AnomalyCLIP(clip, anomalyclip_config(clip)).eval()


def headclip(clip, train_seed: int = 0, **overrides) -> HeadCLIP:
    with seeded(train_seed):
        return HeadCLIP(clip, reference_config(clip, **overrides)).eval()


@pytest.mark.parametrize(("parameterisation", "placement", "layers"),
                         [*itertools.product(PARAMETERISATIONS, ("qk", "vv", "both"), ("all",)),
                          ("scalar", "both", "tapped"), ("sigmoid", "both", "last")])
def test_identity_head_weights_give_anomalyclip_features_and_maps(clip, images, anomalyclip, parameterisation,
                                                                   placement, layers) -> None:
    model = headclip(clip, lhw_parameterisation=parameterisation, lhw_placement=placement, lhw_layers=layers,
                     lhw_last_n=2, jas_beta=1.0)
    assert torch.equal(model.prompt_learner.contexts, anomalyclip.prompt_learner.contexts)  # same seed, same draws
    with torch.no_grad():
        ours, theirs = model.encode_image(images), anomalyclip.encode_image(images)
        text = model.frozen_text_for_images(["x", "x"])
        parts = model.score_parts(ours, text)
        prediction, expected = model.predict(images, ["x", "x"]), anomalyclip.predict(images, ["x", "x"])
    # Exact: a weighted block adds Out(w·heads) − Out(heads) = 0 to the block's own attention (bit for bit).
    assert torch.equal(ours.global_embedding, theirs.global_embedding)
    assert torch.equal(ours.layer_tokens, theirs.layer_tokens)
    assert torch.equal(parts.maps, expected.anomaly_maps)
    assert torch.equal(prediction.anomaly_maps, expected.anomaly_maps)
    assert torch.equal(prediction.image_scores, expected.image_scores)  # β = 1: AnomalyCLIP's score


@pytest.mark.parametrize("parameterisation", PARAMETERISATIONS)
def test_gradients_reach_the_head_weights_and_the_prompts_and_nothing_else(clip, images, parameterisation) -> None:
    model = headclip(clip, lhw_parameterisation=parameterisation).train()
    inputs = fixture_arrays("inputs.npz")
    masks, labels = inputs["masks_raw"][:, 0], inputs["labels"]
    trainable = model.trainable_parameters()
    assert {name for name in trainable if name.startswith("head_weights.")} and "contexts" in trainable
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trainable.values()}
    optimiser = torch.optim.Adam(trainable.values(), lr=0.05)
    for _ in range(2):  # the conditional MLP's first layer gets gradients once its zero last layer has moved
        optimiser.zero_grad()
        model.losses(model.encode_image(images), masks, labels)["loss"].backward()
        optimiser.step()
    for name, parameter in trainable.items():
        assert parameter.grad is not None and parameter.grad.abs().max() > 0, name
    assert all(p.grad is None for p in model.text.clip.parameters())  # the CLIP stays frozen


def test_head_weights_act_where_they_are_placed(clip, images) -> None:
    """V-V weights change the local tokens only; Q-K weights on the last layer change the global embedding only
    (the tapped side stream of layer 4 reads the residual stream before block 4)."""
    side = headclip(clip, lhw_placement="vv")
    last = headclip(clip, lhw_placement="qk", lhw_layers=(4,))
    with torch.no_grad():
        side_base, last_base = side.encode_image(images), last.encode_image(images)
        side.head_weights["vv"].alpha[-1] = torch.tensor([0.3, 1.8])
        last.head_weights["qk"].alpha[0] = torch.tensor([0.3, 1.8])
        side_features, last_features = side.encode_image(images), last.encode_image(images)
    assert torch.equal(side_features.global_embedding, side_base.global_embedding)
    assert (side_features.layer_tokens - side_base.layer_tokens).abs().max() > 1e-2
    assert torch.equal(last_features.layer_tokens, last_base.layer_tokens)
    assert (last_features.global_embedding - last_base.global_embedding).abs().max() > 1e-2


def test_static_parameterisations_follow_their_formulas() -> None:
    alpha = torch.tensor([[0.0, math.log(3.0)], [1.0, -1.0]])
    expected = {"scalar": alpha, "softmax": 2 * alpha.softmax(-1), "sigmoid": 2 / (1 + torch.exp(-alpha))}
    for parameterisation, weights in expected.items():
        module = HeadWeights((1, 2), 2, 8, parameterisation)
        assert torch.equal(module.static_weights(), torch.ones(2, 2))  # identity at initialisation
        with torch.no_grad():
            module.alpha.copy_(alpha)
        torch.testing.assert_close(module.static_weights(), weights)
    softmax = HeadWeights((1,), 2, 8, "softmax")
    with torch.no_grad():
        softmax.alpha.copy_(torch.tensor([[0.0, math.log(3.0)]]))
    torch.testing.assert_close(softmax.static_weights(), torch.tensor([[0.5, 1.5]]))  # H·softmax: 2·(1/4, 3/4)


def test_conditional_weights_scale_each_head_by_2_sigmoid_of_an_mlp_of_the_cls_head_outputs() -> None:
    module = HeadWeights((3,), 2, 4, "conditional", mlp_hidden=3)
    heads = torch.randn(2, 2, 5, 2, generator=torch.Generator().manual_seed(0))  # (B, H, N, Dh), W = 4
    assert torch.equal(module.weightings()[3](heads), heads)  # zero last layer: identity
    with torch.no_grad():
        module.out_weight.normal_(generator=torch.Generator().manual_seed(1))
    record: dict[int, torch.Tensor] = {}
    out = module.weightings(record)[3](heads)
    cls = heads[:, :, 0].reshape(2, 4)
    normalised = (cls - cls.mean(-1, keepdim=True)) / torch.sqrt(cls.var(-1, unbiased=False, keepdim=True) + 1e-5)
    hidden = torch.nn.functional.gelu(normalised @ module.hidden_weight[0])
    weights = 2 * torch.sigmoid(hidden @ module.out_weight[0])
    torch.testing.assert_close(record[3], weights)
    torch.testing.assert_close(out, heads * weights.view(2, 2, 1, 1))


def test_weighted_layers_per_choice_and_path(clip) -> None:
    def layers(**overrides):
        return weighted_layers(reference_config(clip, **overrides), 4)

    assert layers() == {"qk": (1, 2, 3, 4), "vv": (2, 3, 4)}  # the side stream starts at layer 2
    assert layers(lhw_layers="tapped") == {"qk": (1, 2, 3, 4), "vv": (2, 3, 4)}  # the four taps of 4 blocks
    assert layers(lhw_layers="tapped", lhw_tapped_layers=(2, 4)) == {"qk": (2, 4), "vv": (2, 4)}
    assert layers(lhw_layers="tapped", feature_layers=(3,)) == layers(lhw_layers="tapped")  # not feature_layers
    assert layers(lhw_layers="last", lhw_last_n=3, lhw_placement="qk") == {"qk": (2, 3, 4)}
    assert layers(lhw_layers=(1, 3), lhw_placement="vv") == {"vv": (3,)}
    with pytest.raises(ValueError, match=r"no layer on the \['vv'\] path"):
        layers(lhw_layers=(1,), lhw_placement="vv")
    with pytest.raises(ValueError, match=r"lhw_layers \[7\] outside the 4 vision layers"):
        layers(lhw_layers=(7,))


@pytest.mark.parametrize(("vision_blocks", "tapped"), [(24, (6, 12, 18, 24)), (12, (3, 6, 9, 12))])
def test_tapped_head_weight_layers_are_the_backbones_four_tapped_blocks_not_the_feature_layer(
    vision_blocks: int, tapped: tuple[int, ...]
) -> None:
    depth_only = SimpleNamespace(visual=SimpleNamespace(transformer=SimpleNamespace(resblocks=[None] * vision_blocks)),
                                 transformer=SimpleNamespace(resblocks=[None] * 12))
    config = reference_config(depth_only, lhw_layers="tapped")
    assert config.feature_layers == (vision_blocks,) and config.lhw_tapped_layers == tapped
    dpam = config.dpam_first_layer
    assert weighted_layers(config, vision_blocks) == {"qk": tapped, "vv": tuple(t for t in tapped if t >= dpam)}
    with pytest.raises(ValueError, match="lhw_tapped_layers"):
        weighted_layers(HeadCLIPConfig(lhw_layers="tapped"), vision_blocks)


def test_cached_rows_hold_the_frozen_blocks_before_the_first_weighted_layer(clip, images) -> None:
    model = headclip(clip, lhw_layers="last", lhw_last_n=1, feature_layers=(2, 4), dpam_variants=("vv", "qq"))
    assert model.first_weighted_layer == 4 and model.early_layers == (2,)
    rows = model.frozen_rows(images)
    assert rows["hidden"].shape == (2, 50, 128) and rows["side"].shape == (2, 2, 50, 128)
    assert rows["early_tokens"].shape == (2, 2, 1, 50, 32)
    full = AnomalyCLIP(clip, model.config)
    with torch.no_grad():
        torch.testing.assert_close(model.features_from_rows(rows).layer_tokens, full.encode_image(images).layer_tokens,
                                   rtol=0, atol=1e-6)
    assert model.feature_cache_key()["resume_at_layer"] == 4


def test_pooling_and_joint_score_by_hand() -> None:
    maps = torch.arange(100.0).view(1, 10, 10) / 100
    assert pool_map(maps, "max").item() == pytest.approx(0.99)
    assert pool_map(maps, "topk_mean", 5.0).item() == pytest.approx((0.99 + 0.98 + 0.97 + 0.96 + 0.95) / 5)
    assert pool_map(maps, "topk_mean", 0.1).item() == pytest.approx(0.99)  # at least one pixel
    p, q = torch.tensor([0.2, 0.8]), torch.tensor([0.6, 0.4])
    torch.testing.assert_close(joint_score(p, q, 0.25), torch.tensor([0.25 * 0.2 + 0.75 * 0.6, 0.25 * 0.8 + 0.75 * 0.4]))
    torch.testing.assert_close(joint_score(p, q, 0.5, "multiplicative"), torch.sqrt(p * q))
    torch.testing.assert_close(joint_score(p, q, 1.0), p)
    values = torch.tensor([1.0, 3.0, 2.0, 5.0, 5.0])
    torch.testing.assert_close(minmax_per_class(values, ["a", "a", "a", "b", "b"]), torch.tensor([0, 1, 0.5, 0, 0]))
    normalised = joint_score(torch.tensor([0.1, 0.3, 0.2]), torch.tensor([0.0, 0.5, 1.0]), 0.5,
                             normalize="minmax_per_class", class_names=["a"] * 3)
    torch.testing.assert_close(normalised, torch.tensor([0.0, 0.75, 0.75]))
    with pytest.raises(ValueError, match="needs the class names"):
        joint_score(p, q, 0.5, normalize="minmax_per_class")


def test_jas_of_predict_pools_the_map_scaled_to_the_unit_interval(clip, images) -> None:
    model = headclip(clip, feature_layers=(3, 4), jas_beta=0.3, jas_pool="topk_mean", jas_topk_percent=2.0)
    with torch.no_grad():
        features = model.encode_image(images)
        parts = model.score_parts(features, model.frozen_text_for_images(["x", "x"]))
        prediction = model.predict(images, ["x", "x"])
    pooled = pool_map(parts.maps / 2, "topk_mean", 2.0)  # two summed layers
    torch.testing.assert_close(prediction.image_scores, 0.3 * parts.global_scores + 0.7 * pooled)
    assert 0 <= pooled.min() and pooled.max() <= 1
    model.config = replace(model.config, jas_normalize="minmax_per_class")
    with pytest.raises(ValueError, match="whole test set"):
        model.predict(images, ["x", "x"])


def test_mad_is_the_mean_of_the_listed_metrics_with_the_definition_beside_it() -> None:
    rows = pd.DataFrame([
        dict(method=m, dataset=d, class_name="mean", level=level, metric=metric, value=v, note="", n_classes=2)
        for m, d, level, metric, v in [
            ("headclip", "mvtec", "pixel", "auroc", 0.90), ("headclip", "mvtec", "pixel", "aupro_cflow200", 0.70),
            ("headclip", "mvtec", "image", "auroc", 0.80), ("headclip", "mvtec", "image", "ap", 0.84),
            ("anomalyclip", "mvtec", "pixel", "auroc", 0.88), ("anomalyclip", "mvtec", "pixel", "aupro_cflow200", 0.66),
            ("anomalyclip", "mvtec", "image", "auroc", 0.81), ("anomalyclip", "mvtec", "image", "ap", 0.85),
            ("headclip", "headct", "image", "auroc", 0.70), ("headclip", "headct", "image", "ap", 0.72),
            ("anomalyclip", "headct", "image", "auroc", 0.71), ("anomalyclip", "headct", "image", "ap", 0.71)]])
    assert mad_metrics() == {"image": [("image", "auroc"), ("image", "ap")],
                             "pixel": [("pixel", "auroc"), ("pixel", "aupro_cflow200")]}
    table = mad_rows(rows).set_index(["method", "dataset", "level"])
    assert table.loc[("headclip", "mvtec", "pixel"), "value"] == pytest.approx(0.80)
    assert table.loc[("headclip", "mvtec", "pixel"), "metrics"] == "pixel/auroc+pixel/aupro_cflow200"
    assert ("headclip", "headct", "pixel") not in table.index  # no pixel metrics on an image-level-only set
    auroc_only = mad_rows(rows, {"image": [("image", "auroc")]}).set_index(["method", "dataset"])
    assert auroc_only.loc[("headclip", "mvtec"), "value"] == pytest.approx(0.80)
    gains = gains_beside_claims(mad_rows(rows)).set_index(["domain", "level"])
    assert gains.loc[("industrial", "pixel"), "gain_max_pp"] == pytest.approx(3.0)
    assert gains.loc[("industrial", "image"), "gain_max_pp"] == pytest.approx(-1.0)
    assert gains.loc[("medical", "image"), "gain_mean_pp"] == pytest.approx(0.0)
    assert gains.loc[("industrial", "pixel"), "claimed_v2_pp"] == 4.9
    assert gains.loc[("industrial", "image"), "claimed_v1_pp"] == 3.0
    assert set(gains["fidelity"]) == {FIDELITY}


def test_trained_weights_round_trip_and_other_head_layouts_are_refused(tmp_path: Path) -> None:
    model = build_headclip("zsad-tiny", "", 112, backbone_seed=2, train_seed=2)
    with torch.no_grad():
        model.head_weights["qk"].alpha.mul_(0.5)
    path = model.save_prompts(tmp_path / "headclip.safetensors")
    loaded = build_headclip("zsad-tiny", "", 112, backbone_seed=2, train_seed=5, checkpoint=str(path))
    for name, value in model.trainable_parameters().items():
        assert torch.equal(loaded.trainable_parameters()[name], value), name
    with pytest.raises(ValueError, match="lhw_parameterisation: saved 'scalar', model 'sigmoid'"):
        build_headclip("zsad-tiny", "", 112, lhw_parameterisation="sigmoid", checkpoint=str(path))
    with pytest.raises(ValueError, match="own .safetensors files only"):
        build_headclip("zsad-tiny", "", 112, checkpoint=str(Path(__file__).parent / "fixtures" / "anomalyclip"
                                                              / "prompt_learner_init_ckpt.pth"))


def test_registry_builds_headclip_and_configuration_errors_name_the_field() -> None:
    model = build_method("headclip", backbone="zsad-tiny", image_size=112)
    assert isinstance(model, HeadCLIP) and model.fidelity == FIDELITY and model.config.feature_layers == (4,)
    with pytest.raises(TypeError, match="unknown options"):
        build_method("headclip", backbone="zsad-tiny", image_size=112, lhw_init=1.0)
    for field, value in [("lhw_parameterisation", "gate"), ("lhw_placement", "kv"), ("lhw_layers", "first"),
                         ("jas_pool", "mean"), ("jas_mode", "max"), ("jas_normalize", "zscore")]:
        with pytest.raises(ValueError, match=f"HeadCLIPConfig.{field} must be one of"):
            HeadCLIPConfig(**{field: value})
    with pytest.raises(ValueError, match=r"jas_beta must be in \[0, 1\]"):
        HeadCLIPConfig(jas_beta=1.5)
    with pytest.raises(ValueError, match="dpam_first_layer is None"):
        HeadCLIPConfig(dpam_first_layer=None)
    assert HeadCLIPConfig(dpam_first_layer=None, lhw_placement="qk").lhw_placement == "qk"
