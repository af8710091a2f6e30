"""InCTRL's model: residuals against hand computations, the batch layouts, the text prior, heads, losses,
checkpoints and the official file formats (tiny random CLIP; parity with the reference is `test_verify_inctrl`)."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from zsadkit.losses import binary_focal_loss
from zsadkit.methods import build_method
from zsadkit.methods.inctrl import (
    SEMANTIC_PROMPTS,
    ImageFeatures,
    InCTRL,
    InCTRLConfig,
    arrange_tokens,
    build_inctrl,
    load_official_prompt_set,
    official_name,
    patch_residuals,
    reference_config,
)
from zsadkit.models import load_clip
from zsadkit.prompts import class_text_features, encode_sentences, prompt_ensemble

SIZE = 64


@pytest.fixture(scope="module")
def clip():
    return load_clip("zsad-tiny", image_size=SIZE)


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def trained_looking(model: InCTRL, seed: int = 1) -> InCTRL:
    """Non-trivial BatchNorm statistics (as a trained checkpoint has), so that eval mode matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buffer in model.head_buffers().items():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator).abs() * 0.3)
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
    return model.eval()


FIRST: list[InCTRL] = []  # the module's CLIP is shared: encode each class's prompts once


def model_for(clip, share_text: bool = True, **overrides) -> InCTRL:
    torch.manual_seed(0)
    model = trained_looking(InCTRL(clip, reference_config(clip, **overrides)))
    if share_text:
        if not FIRST:
            FIRST.append(model)
        model.share_text_cache(FIRST[0])
    return model


def test_patch_residual_is_half_the_cosine_distance_to_the_nearest_prompt_token_of_its_layer():
    generator = torch.Generator().manual_seed(3)
    query, pool = torch.randn(2, 3, 5, 8, generator=generator), torch.randn(2, 3, 7, 8, generator=generator)
    residuals = patch_residuals(query, pool)
    for b in range(2):
        for layer in range(3):
            for j in range(5):
                distances = [0.5 * (1 - F.cosine_similarity(query[b, layer, j], pool[b, layer, p], dim=0))
                             for p in range(7)]
                assert residuals[b, layer, j] == pytest.approx(float(min(distances)), abs=1e-6)
    assert residuals.min() >= 0 and residuals.max() <= 1
    assert torch.allclose(patch_residuals(query, pool[:, :, torch.randperm(7, generator=generator)]), residuals)
    assert torch.allclose(patch_residuals(query, query), torch.zeros(2, 3, 5), atol=1e-6)  # a query is its own prompt


def reference_reshape(query_tokens, prompt_tokens, prompt_embeddings):
    """model.py:515-524 literally: stack layers first, list prompts shot-major, then reshape."""
    batch, shots, layers, patches, width = prompt_tokens.shape
    stacked = torch.stack([query_tokens[:, layer] for layer in range(layers)])  # (L, B, N, W)
    listed = torch.stack([torch.cat([prompt_tokens[:, s, layer] for s in range(shots)]) for layer in range(layers)])
    embeddings = torch.cat([prompt_embeddings[:, s] for s in range(shots)])  # (K·B, D), row s·B + i
    return (stacked.reshape(batch, layers, patches, width), listed.reshape(batch, layers, patches * shots, width),
            embeddings.reshape(batch, shots, -1))


def tagged(batch: int, shots: int, layers: int = 3, patches: int = 4):
    """Tokens whose value names (sample, shot, layer): sample·100 + shot·10 + layer (queries: shot 9)."""
    query = torch.zeros(batch, layers, patches, 1)
    prompts = torch.zeros(batch, shots, layers, patches, 1)
    for b in range(batch):
        for layer in range(layers):
            query[b, layer] = 100 * b + 90 + layer
            for s in range(shots):
                prompts[b, s, layer] = 100 * b + 10 * s + layer
    embeddings = torch.tensor([[[100.0 * b + 10 * s] for s in range(shots)] for b in range(batch)])
    return query, prompts, embeddings


def test_the_per_sample_layout_keeps_each_sample_and_layer_and_the_reference_one_scrambles_them():
    query, prompts, embeddings = tagged(batch=2, shots=2)
    ours = arrange_tokens(query, prompts, embeddings)
    theirs = arrange_tokens(query, prompts, embeddings, "reference")
    for got, expected in zip(theirs, reference_reshape(query, prompts, embeddings), strict=True):
        assert torch.equal(got, expected)
    # per sample: sample b, layer l holds only its own tokens
    assert torch.equal(ours[0][1, 2], torch.full((4, 1), 192.0))
    assert set(ours[1][1, 2].flatten().tolist()) == {102.0, 112.0} and torch.equal(ours[2], embeddings)
    # the reference: sample 0's "layers" are (L7, s0), (L7, s1), (L9, s0); its prototype is shot 0 of both samples
    assert [float(theirs[0][0, layer, 0]) for layer in range(3)] == [90.0, 190.0, 91.0]
    assert set(theirs[1][0, 0].flatten().tolist()) == {0.0, 100.0}
    assert theirs[2][0].flatten().tolist() == [0.0, 100.0]
    single = [tensor[:1] for tensor in (query, prompts, embeddings)]
    for a, b in zip(arrange_tokens(*single), arrange_tokens(*single, "reference"), strict=True):
        assert torch.equal(a, b)  # identical at batch 1


def test_at_batch_4_the_default_layout_scores_each_sample_as_at_batch_1_and_the_reference_layout_does_not(clip, images):
    prompts = torch.randn(4, 2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    names = ["bottle", "screw", "bottle", "cat"]
    for layout, same in (("per_sample", True), ("reference", False)):
        model = model_for(clip, batch_reshape=layout)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            batched = model(images[:4], prompts, names).final_score
            single = torch.cat([model(images[i:i + 1], prompts[i:i + 1], names[i:i + 1]).final_score
                                for i in range(4)])
            model.fit_references(prompts[0])  # test format: the same K prompts for every query
            predicted = model.predict(images[:4], names).image_scores
            one_by_one = torch.cat([model.predict(images[i:i + 1], names[i:i + 1]).image_scores for i in range(4)])
        if same:
            torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)
            torch.testing.assert_close(predicted, one_by_one, atol=1e-6, rtol=0)
        else:
            assert (batched - single).abs().max() > 1e-4 and (predicted - one_by_one).abs().max() > 1e-4


def test_the_reference_layout_warns_at_batch_above_1(clip, images):
    model = model_for(clip, batch_reshape="reference")
    model.fit_references(images[:2])
    with pytest.warns(UserWarning, match="batch_reshape='reference' at batch 3"):
        model.predict(images[2:5], ["bottle"] * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.predict(images[2:3], ["bottle"])


def test_scores_follow_the_holistic_map_and_the_final_formula(clip, images):
    model = model_for(clip)
    model.fit_references(images[:3])
    with torch.no_grad():
        output = model.score_features(model.encode_image(images[3:6]), ["bottle", "metal_nut", "cat"])
    torch.testing.assert_close(output.patch_map, output.layer_residuals.mean(dim=1))
    torch.testing.assert_close(output.patch_score, output.patch_map.amax(dim=1))
    prototype = model.adapter(model.memory.embedding).mean(dim=0)
    torch.testing.assert_close(output.image_residual, prototype - model.adapter(model.encode_image(images[3:6]).embedding))
    expected_map = (output.text_score + output.image_score)[:, None] + output.patch_map
    torch.testing.assert_close(output.holistic_map, expected_map)
    torch.testing.assert_close(output.holistic_score, model.holistic_head(expected_map))
    torch.testing.assert_close(output.final_score, (output.holistic_score + output.patch_score) / 2)
    image = F.normalize(model.encode_image(images[3:6]).embedding, dim=-1)
    logits = 100 * torch.einsum("bd,bsd->bs", image, output.text_features)
    torch.testing.assert_close(output.text_score, logits.softmax(-1)[:, 1])


def test_the_text_prior_uses_the_ensemble_or_the_cifar_pair_and_is_encoded_once_per_class(clip, monkeypatch):
    model = model_for(clip, share_text=False)
    winclip = class_text_features(lambda s: encode_sentences(model.text, s), prompt_ensemble("winclip"), "metal nut")
    semantic = class_text_features(lambda s: encode_sentences(model.text, s), SEMANTIC_PROMPTS, "animal")
    assert SEMANTIC_PROMPTS.sentences("cat", "anomalous") == ["a photo without cat for anomaly detection."]
    calls = []
    original = model.text.encode_tokens
    monkeypatch.setattr(model.text, "encode_tokens", lambda tokens: calls.append(len(tokens)) or original(tokens))
    features = model.text_features(["metal_nut", "animal", "metal_nut", "animal"])
    torch.testing.assert_close(features[0], winclip)
    torch.testing.assert_close(features[1], semantic)
    assert calls == [154, 88, 1, 1]  # each class's sentences once, whatever the batch
    model.text_features(["metal_nut"] * 8)
    assert len(calls) == 4
    other = model_for(clip, share_text=False)
    other.share_text_cache(model)
    other.text_features(["animal"])
    assert len(calls) == 4  # the shared cache already holds it
    another_clip = load_clip("zsad-tiny", image_size=SIZE)
    with pytest.raises(ValueError, match="share the CLIP"):
        other.share_text_cache(InCTRL(another_clip, reference_config(another_clip)))
    uncached = replace(model.config, cache_text_features=False)
    model.config = uncached
    torch.testing.assert_close(model.text_features(["metal_nut", "animal"]), features[:2])
    assert len(calls) == 8  # re-encoded per sample, as the reference


def test_focal_loss_on_sigmoid_outputs_by_hand():
    probabilities, labels = torch.tensor([0.8, 0.3]), torch.tensor([1.0, 0.0])
    bce = torch.stack([torch.log1p(torch.exp(-probabilities[0])), torch.log1p(torch.exp(probabilities[1]))])
    expected = ((1 - torch.exp(-bce)) ** 2 * bce).mean()
    assert float(binary_focal_loss(probabilities, labels)) == pytest.approx(float(expected), rel=1e-6)
    textbook = (-(0.2 ** 2) * torch.log(torch.tensor(0.8)) - (0.3 ** 2) * torch.log(torch.tensor(0.7))) / 2
    assert float(binary_focal_loss(probabilities, labels, logits=False)) == pytest.approx(float(textbook), rel=1e-6)


def test_losses_are_the_focal_terms_of_the_final_and_image_scores(clip, images):
    for option, logits in (("reference", True), ("textbook", False)):
        model = model_for(clip, focal_loss=option).train()
        prompts = images[:4].reshape(2, 2, 3, SIZE, SIZE)
        output = model(images[4:6], prompts, ["bottle", "bottle"])
        labels = torch.tensor([1, 0])
        losses = model.losses(output, labels)
        final = binary_focal_loss(output.final_score, labels.float(), logits=logits)
        image = binary_focal_loss(output.image_score, labels.float(), logits=logits)
        torch.testing.assert_close(losses["loss"], final + image)
        losses["loss"].backward()
        assert all(p.grad is not None for p in model.trainable_parameters().values())
        assert all(p.grad is None for p in model.visual.parameters())  # the CLIP is frozen


def test_predict_runs_the_heads_in_eval_mode_and_keeps_the_mode(clip, images):
    model = model_for(clip)
    model.fit_references(images[:2])
    expected = model.predict(images[2:4], ["bottle"] * 2).image_scores
    model.train()
    torch.testing.assert_close(model.predict(images[2:4], ["bottle"] * 2).image_scores, expected)
    assert model.training and model.holistic_head.training and not model.visual.training


def test_prediction_needs_prompts_and_gives_the_upsampled_patch_map(clip, images):
    model = model_for(clip)
    with pytest.raises(RuntimeError, match="fit_references"):
        model.predict(images[:1], ["bottle"])
    model.fit_references(images[:1])  # K = 1: the prototype is the prompt (issue #27)
    prediction = model.predict(images[1:3], ["bottle"] * 2)
    assert prediction.anomaly_maps.shape == (2, SIZE, SIZE) and prediction.image_scores.shape == (2,)
    with pytest.raises(ValueError, match="reference_images must be"):
        model.fit_references(images[0])


@pytest.mark.parametrize("overrides", [
    {"text_prior": False}, {"image_residual": False}, {"patch_residual": False}, {"holistic_head": False},
    {"image_residual_op": "concatenation"}, {"image_residual_op": "average"},
    {"patch_residual": False, "image_residual": False},
])
def test_ablation_variants_score_with_the_components_they_keep(clip, images, overrides):
    model = model_for(clip, **overrides)
    model.fit_references(images[:2])
    output = model.score_features(model.encode_image(images[2:5]), ["bottle"] * 3)
    assert torch.isfinite(output.final_score).all()
    assert (output.text_score is None) == (not model.config.text_prior)
    assert (output.image_score is None) == (not model.config.image_residual)
    if not model.config.holistic_head:
        parts = [output.text_score, output.image_score, output.patch_score]
        torch.testing.assert_close(output.final_score, torch.stack([p for p in parts if p is not None]).mean(0))
    elif not model.config.patch_residual:
        torch.testing.assert_close(output.final_score, output.holistic_score)
        assert torch.allclose(output.holistic_map, output.holistic_map[:, :1])  # constant over patches
    if model.config.image_residual_op == "concatenation":
        assert output.image_residual.shape == (3, 2 * model.visual.embed_dim)


def test_config_errors_name_the_setting(clip):
    with pytest.raises(ValueError, match="batch_reshape"):
        InCTRLConfig(batch_reshape="scrambled")
    with pytest.raises(ValueError, match="at least one of"):
        InCTRLConfig(patch_residual=False, image_residual=False, text_prior=False)
    with pytest.raises(ValueError, match=r"layers \[9\] outside the 4 vision blocks"):
        InCTRL(clip, InCTRLConfig(layers=(2, 9)))
    with pytest.raises(TypeError, match="unknown options"):
        build_method("inctrl", image_size=SIZE, shots=2)
    assert reference_config(clip).layers == (2, 3, 4)  # 7, 9, 11 of 12 scaled to the tiny model's 4 blocks


def test_heads_round_trip_through_safetensors_and_the_builder(clip, images, tmp_path):
    model = model_for(clip)
    path = model.save_heads(tmp_path / "heads.safetensors", metadata={"train_set": "synth-aux"})
    loaded = build_inctrl(image_size=SIZE, clip=clip, checkpoint=str(path), train_seed=5)
    for name, value in model.head_state().items():
        assert torch.equal(loaded.head_state()[name], value), name
    with pytest.raises(ValueError, match="image_residual_op"):
        build_inctrl(image_size=SIZE, clip=clip, checkpoint=str(path), image_residual_op="concatenation")


def official_state(model: InCTRL) -> dict[str, torch.Tensor]:
    """What the reference's `torch.save(model.state_dict())` holds: CLIP, adapter.fc.*, diff_head(_ref).* with bn1."""
    ours_to_official = {}
    for prefix, official in (("adapter.", "adapter.fc."), ("holistic_head.", "diff_head."),
                             ("image_head.", "diff_head_ref.")):
        for name in model.head_state():
            if name.startswith(prefix):
                rest = name[len(prefix):]
                for new, old in (("linear1", "projection1"), ("norm1", "bn2"), ("linear2", "projection2"),
                                 ("norm2", "bn3"), ("linear3", "projection3")):
                    rest = rest.replace(new, old)
                ours_to_official[name] = official + rest
    state = {official: model.head_state()[name].clone() for name, official in ours_to_official.items()}
    for head, width in (("diff_head", model.visual.grid_size ** 2), ("diff_head_ref", model.visual.embed_dim)):
        state.update({f"{head}.bn1.weight": torch.ones(width), f"{head}.bn1.bias": torch.zeros(width)})
    state.update({k: v.clone() for k, v in model.text.clip.state_dict().items()})
    return state


def test_official_checkpoints_import_safely_and_warn_on_another_clip(clip, tmp_path):
    source = model_for(clip)
    torch.save({"model_state": official_state(source)}, tmp_path / "checkpoint_6.pyth")
    model = build_inctrl(image_size=SIZE, clip=clip, train_seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.load_heads(tmp_path / "checkpoint_6.pyth")
    for name, value in source.head_state().items():
        assert torch.equal(model.head_state()[name], value), name
    assert official_name("diff_head_ref.bn3.running_var") == "image_head.norm2.running_var"
    assert official_name("diff_head.bn1.weight") is None and official_name("visual.proj") is None
    other = official_state(source)
    other["visual.proj"] = other["visual.proj"] + 1
    torch.save(other, tmp_path / "other.pyth")
    with pytest.warns(UserWarning, match="CLIP tensors differ"):
        model.load_heads(tmp_path / "other.pyth")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "not_inctrl.pth")
    with pytest.raises(ValueError, match="not an official InCTRL checkpoint"):
        model.load_heads(tmp_path / "not_inctrl.pth")


def test_official_prompt_sets_load_as_a_batch_of_images(tmp_path):
    prompts = [torch.randn(3, SIZE, SIZE) for _ in range(4)]
    torch.save(prompts, tmp_path / "candle.pt")
    loaded = load_official_prompt_set(tmp_path / "candle.pt", image_size=SIZE)
    assert loaded.shape == (4, 3, SIZE, SIZE) and torch.equal(loaded[2], prompts[2])
    with pytest.raises(ValueError, match="240 px|px, the model takes"):
        load_official_prompt_set(tmp_path / "candle.pt", image_size=240)
    torch.save({"images": prompts}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="expected a list of K"):
        load_official_prompt_set(tmp_path / "bad.pt")


def test_cached_rows_give_the_same_prediction_as_images(clip, images):
    model = model_for(clip)
    model.fit_reference_rows(model.encode_rows(images[:2]))
    rows = {**model.encode_rows(images[2:5]), "class_name": ["bottle"] * 3}
    from_rows = model.predict_from_rows(rows)
    model.fit_references(images[:2])
    torch.testing.assert_close(from_rows.image_scores, model.predict(images[2:5], ["bottle"] * 3).image_scores)
    features = model.encode_image(images[:1])
    assert isinstance(features, ImageFeatures) and features.patch_tokens.shape == (1, 3, 16, 128)
