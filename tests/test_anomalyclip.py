"""AnomalyCLIP: configuration defaults, scoring, losses, checkpoints and the official-checkpoint importer."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from zsadkit.methods.anomalyclip import (
    AnomalyCLIP,
    AnomalyCLIPConfig,
    build_anomalyclip,
    import_official_prompt_learner,
    reference_config,
)
from zsadkit.methods.base import build_method
from zsadkit.models import load_clip

FIXTURES = Path(__file__).parent / "fixtures" / "anomalyclip"


@pytest.fixture(scope="module")
def fixture_clip_state() -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(value) for key, value in np.load(FIXTURES / "state_dict.npz").items()}


def fixture_model(state: dict[str, torch.Tensor], **overrides) -> AnomalyCLIP:
    """The fixture's tiny CLIP with the fixture's configuration (DPAM from layer 2, features [4], depth 3)."""
    clip = load_clip(state_dict=state, image_size=112)
    return AnomalyCLIP(clip, reference_config(clip, **overrides)).eval()


@pytest.fixture(scope="module")
def tiny() -> AnomalyCLIP:
    return build_anomalyclip("zsad-tiny", "", 112, backbone_seed=3, train_seed=3)


def test_default_configuration_is_the_released_reference_setting() -> None:
    config = AnomalyCLIPConfig()
    assert config.feature_layers == (24,) and config.lam == 4.0
    assert config.temperature == 0.07 and config.sigma == 4.0
    assert config.dpam_first_layer == 6 and config.dpam_variants == ("vv",)
    assert (config.n_ctx, config.deep_length, config.deep_depth) == (12, 4, 9)
    assert not config.shared_context and config.object_agnostic and config.abnormal_word == "damaged"
    assert config.prompt_config().state_templates == ("{}", "damaged {}")


def test_importing_the_official_checkpoint_gives_the_fixture_text_features(fixture_clip_state) -> None:
    model = fixture_model(fixture_clip_state)
    with pytest.warns(UserWarning, match="compound_prompt_projections"):
        model.load_prompts(FIXTURES / "prompt_learner_init_ckpt.pth")
    expected = np.load(FIXTURES / "text.npz")["text_features"]
    with torch.no_grad():
        np.testing.assert_allclose(model.encode_text().numpy(), expected, atol=1e-5, rtol=1e-5)


def test_official_checkpoint_made_for_another_abnormal_word_is_rejected(fixture_clip_state) -> None:
    model = fixture_model(fixture_clip_state, abnormal_word="flawed")
    state = torch.load(FIXTURES / "prompt_learner_init_ckpt.pth", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="tokenized_prompts_neg differ"):
            import_official_prompt_learner(state, model)


def test_safetensors_checkpoint_round_trip_restores_prompts_and_config(tiny: AnomalyCLIP, tmp_path: Path) -> None:
    path = tiny.save_prompts(tmp_path / "prompts.safetensors")
    other = build_anomalyclip("zsad-tiny", "", 112, backbone_seed=3, train_seed=3)
    with torch.no_grad():
        other.prompt_learner.contexts.add_(1.0)
    other.load_prompts(path)
    with torch.no_grad():
        assert torch.equal(other.encode_text(), tiny.encode_text())
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["config"])["feature_layers"] == [4]


def test_loading_prompts_of_another_shape_names_the_mismatch(tiny: AnomalyCLIP) -> None:
    longer = build_anomalyclip("zsad-tiny", "", 112, n_ctx=6)
    with pytest.raises(ValueError, match=r"wrong shapes \['contexts: \(2, 12, 128\) vs \(2, 6, 128\)'\]"):
        longer.load_prompt_state(tiny.trainable_parameters(), source="tiny")


@pytest.mark.parametrize("overrides, field", [
    ({"abnormal_word": "flawed"}, "abnormal_word"),  # same shapes: only the saved config can tell
    ({"object_agnostic": False}, "object_agnostic"),
    ({"n_ctx": 6}, "n_ctx"),
    ({"deep_length": 2}, "deep_length"),
])
def test_saved_prompts_of_another_prompt_configuration_are_rejected(tiny: AnomalyCLIP, tmp_path: Path,
                                                                    overrides: dict, field: str) -> None:
    path = tiny.save_prompts(tmp_path / "prompts.safetensors")
    other = build_anomalyclip("zsad-tiny", "", 112, **overrides)
    with pytest.raises(ValueError, match=f"another prompt configuration.*{field}: saved"):
        other.load_prompts(path)


def test_saved_prompts_load_into_a_model_differing_only_in_scoring_settings(tiny: AnomalyCLIP, tmp_path: Path) -> None:
    path = tiny.save_prompts(tmp_path / "prompts.safetensors")
    other = build_anomalyclip("zsad-tiny", "", 112, sigma=0.0, feature_layers=(3, 4), dpam_first_layer=None)
    other.load_prompts(path)
    for name, value in tiny.trainable_parameters().items():
        assert torch.equal(other.trainable_parameters()[name], value)


def test_test_time_text_features_are_refreshed_explicitly_after_in_place_prompt_changes() -> None:
    model = build_anomalyclip("zsad-tiny", "", 112, backbone_seed=7, train_seed=7)
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    before = model.predict(images, ["a", "b"])
    with torch.no_grad():
        model.prompt_learner.contexts[1, :, 0].add_(0.5)  # one coordinate: a uniform shift is undone by LayerNorm
    assert torch.equal(model.predict(images, ["a", "b"]).image_scores, before.image_scores)  # cached until refreshed
    model.refresh_text_features()
    expected = model.score(model.encode_image(images), model.text_for_images(["a", "b"]).detach())
    after = model.predict(images, ["a", "b"])
    assert not torch.allclose(after.image_scores, before.image_scores)
    assert torch.equal(after.image_scores, expected.image_scores)
    # Loading prompts (either way), a mode switch or a device/dtype move refresh them without being asked.
    model.prompt_learner.load_state_dict({k: v * 1.5 for k, v in model.prompt_learner.state_dict().items()})
    scaled = model.predict(images, ["a", "b"])
    assert not torch.allclose(scaled.image_scores, after.image_scores)
    model.load_prompt_state({k: v / 1.5 for k, v in model.trainable_parameters().items()})
    assert torch.allclose(model.predict(images, ["a", "b"]).image_scores, after.image_scores, atol=1e-6)
    with torch.no_grad():
        model.prompt_learner.contexts[1, :, 0].add_(0.5)
    model.train().eval()
    assert not torch.allclose(model.predict(images, ["a", "b"]).image_scores, after.image_scores)


def test_image_score_is_abnormal_softmax_probability_of_the_global_embedding(tiny: AnomalyCLIP) -> None:
    images = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    prediction = tiny.predict(images, ["a", "b", "c"])
    with torch.no_grad():
        features = tiny.encode_image(images)
        text = tiny.encode_text()[0]
        image = features.global_embedding / features.global_embedding.norm(dim=-1, keepdim=True)
        expected = (image @ text.t() / 0.07).softmax(-1)[:, 1]
    assert torch.allclose(prediction.image_scores, expected, atol=1e-6)
    assert prediction.anomaly_maps.shape == (3, 112, 112)


def test_batched_prediction_equals_one_image_at_a_time(tiny: AnomalyCLIP) -> None:
    images = torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    batched = tiny.predict(images, ["x"] * 4)
    single = [tiny.predict(images[i : i + 1], ["x"]) for i in range(4)]
    assert torch.allclose(batched.image_scores, torch.cat([p.image_scores for p in single]), atol=1e-6)
    assert torch.allclose(batched.anomaly_maps, torch.cat([p.anomaly_maps for p in single]), atol=1e-5)


def test_multi_layer_map_is_the_sum_of_single_layer_maps(fixture_clip_state) -> None:
    images = torch.from_numpy(np.load(FIXTURES / "inputs.npz")["images"])
    both = fixture_model(fixture_clip_state, feature_layers=(3, 4), sigma=0)
    maps = []
    for layer in (3, 4):
        single = fixture_model(fixture_clip_state, feature_layers=(layer,), sigma=0)
        single.prompt_learner.load_state_dict(both.prompt_learner.state_dict())
        maps.append(single.predict(images, ["o", "o"]).anomaly_maps)
    assert torch.allclose(both.predict(images, ["o", "o"]).anomaly_maps, maps[0] + maps[1], atol=1e-5)


def test_dpam_ensemble_averages_the_logits_of_its_variants(fixture_clip_state) -> None:
    images = torch.from_numpy(np.load(FIXTURES / "inputs.npz")["images"])
    ensemble = fixture_model(fixture_clip_state, dpam_variants=("qq", "vv"))
    with torch.no_grad():
        text = ensemble.encode_text()
        tokens = ensemble.encode_image(images).layer_tokens  # (2, L, B, 1+N, D)
        probs = ensemble.token_probabilities(tokens, text)
        per_variant = [ensemble.token_probabilities(tokens[i : i + 1], text).log() for i in range(2)]
    # log-softmax differences are logit differences: the ensemble's equals the mean of the variants'
    ensemble_margin = probs[..., 1].log() - probs[..., 0].log()
    mean_margin = sum(p[..., 1] - p[..., 0] for p in per_variant) / 2
    assert torch.allclose(ensemble_margin, mean_margin, atol=1e-4)
    assert not torch.allclose(per_variant[0], per_variant[1])


def test_without_dpam_the_local_tokens_are_plain_clip_tokens(fixture_clip_state) -> None:
    images = torch.from_numpy(np.load(FIXTURES / "inputs.npz")["images"])
    model = fixture_model(fixture_clip_state, dpam_first_layer=None, feature_layers=(1, 2, 3, 4))
    expected = np.load(FIXTURES / "visual_nodpam.npz")["patch_tokens"]
    np.testing.assert_allclose(model.encode_image(images).layer_tokens[0].numpy(), expected, atol=1e-5, rtol=1e-5)


def test_object_aware_prompts_give_each_image_the_text_of_its_class(tiny: AnomalyCLIP) -> None:
    model = build_anomalyclip("zsad-tiny", "", 112, backbone_seed=3, train_seed=3, object_agnostic=False)
    with torch.no_grad():
        per_image = model.text_for_images(["pill", "screw", "pill"])
        by_class = model.encode_text(["pill", "screw"])
    assert torch.allclose(per_image[0], by_class[0]) and torch.allclose(per_image[1], by_class[1])
    assert torch.allclose(per_image[2], by_class[0]) and not torch.allclose(by_class[0], by_class[1])


def test_loss_terms_follow_the_configuration_switches(fixture_clip_state) -> None:
    inputs = np.load(FIXTURES / "inputs.npz")
    model = fixture_model(fixture_clip_state)
    features = model.encode_image(torch.from_numpy(inputs["images"]))
    masks, labels = torch.from_numpy(inputs["masks_raw"][:, 0]), torch.from_numpy(inputs["labels"])
    full = model.losses(features, masks, labels)
    assert torch.allclose(full["loss"], full["image"] + 4 * full["per_layer"].sum())
    local_only = replace(model.config, use_global_loss=False)
    model.config = local_only
    assert torch.allclose(model.losses(features, masks, labels)["loss"], full["local"])
    model.config = replace(local_only, use_dice_loss=False, use_global_loss=True)
    no_dice = model.losses(features, masks, labels)
    assert torch.count_nonzero(no_dice["per_layer"][:, 1:]) == 0
    assert torch.allclose(no_dice["loss"], full["image"] + 4 * full["per_layer"][:, 0].sum())


def test_registry_builds_anomalyclip_and_rejects_unknown_options() -> None:
    model = build_method("anomalyclip", backbone="zsad-tiny", pretrained="", image_size=112)
    assert isinstance(model, AnomalyCLIP) and model.config.feature_layers == (4,)
    with pytest.raises(TypeError, match="unknown options"):
        build_method("anomalyclip", backbone="zsad-tiny", pretrained="", image_size=112, n_context=3)


def test_feature_layers_beyond_the_backbone_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"feature_layers \[24\] .*valid: 1\.\.4"):
        build_anomalyclip("zsad-tiny", "", 112, feature_layers=(24,))
    with pytest.raises(ValueError, match=r"feature_layers \[0\]"):
        build_anomalyclip("zsad-tiny", "", 112, feature_layers=(0, 4))


@pytest.mark.parametrize("first_layer", [0, 5, 9])
def test_dpam_first_layer_outside_the_backbone_is_rejected(first_layer: int) -> None:
    with pytest.raises(ValueError, match=rf"dpam_first_layer {first_layer} .*valid: 1\.\.4, or None"):
        build_anomalyclip("zsad-tiny", "", 112, dpam_first_layer=first_layer)
    assert build_anomalyclip("zsad-tiny", "", 112, dpam_first_layer=4).attention_variants[0].first_layer == 4


def test_cropping_the_text_after_eot_does_not_change_the_text_features(tiny: AnomalyCLIP) -> None:
    full = AnomalyCLIP(tiny.text.clip, replace(tiny.config, crop_text_after_eot=False))
    full.prompt_learner.load_state_dict(tiny.prompt_learner.state_dict())
    assert tiny.config.crop_text_after_eot
    with torch.no_grad():
        assert torch.allclose(tiny.encode_text(), full.encode_text(), atol=1e-6)
