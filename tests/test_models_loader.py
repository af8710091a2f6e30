"""load_clip: the four weight sources, position-embedding resizing, activation/head overrides, clear errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from zsadkit.models import (
    PretrainedWeightsUnavailableError,
    TextEncoder,
    VisualEncoder,
    load_backbone,
    load_clip,
    read_checkpoint,
    resize_position_embedding,
    tokenize,
)
from zsadkit.models.loader import CONFIG_DIR

FIXTURES = Path(__file__).parent / "fixtures"


def _state_dict(name: str) -> dict[str, torch.Tensor]:
    with np.load(FIXTURES / name / "state_dict.npz") as arrays:
        return {key: torch.from_numpy(arrays[key]) for key in arrays.files}


@pytest.fixture(scope="module")
def anomalyclip_state_dict() -> dict[str, torch.Tensor]:
    return _state_dict("anomalyclip")


def _assert_same_weights(model_a: torch.nn.Module, model_b: torch.nn.Module) -> None:
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=0, msg=key)


def test_in_memory_openai_state_dict_builds_the_fixture_architecture_in_fp32(anomalyclip_state_dict):
    clip = load_clip(state_dict=anomalyclip_state_dict, image_size=112)
    visual, text = VisualEncoder(clip), TextEncoder(clip)
    assert (visual.width, visual.num_layers, visual.num_heads, visual.embed_dim) == (128, 4, 2, 32)
    assert (text.width, len(text.blocks), text.blocks[0].attn.num_heads) == (128, 4, 2)
    assert clip.zsad_source.native_image_size == 64 and clip.zsad_source.image_size == 112
    assert clip.zsad_source.quick_gelu and not clip.training
    assert all(param.dtype == torch.float32 for param in clip.parameters())
    # weights are copied exactly (no fp16 round trip)
    torch.testing.assert_close(
        clip.visual.transformer.resblocks[2].mlp.c_fc.weight,
        anomalyclip_state_dict["visual.transformer.resblocks.2.mlp.c_fc.weight"],
        rtol=0,
        atol=0,
    )


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_checkpoint_files_pt_safetensors_npz_and_torchscript_load_the_same_weights(anomalyclip_state_dict, tmp_path):
    reference = load_clip(state_dict=anomalyclip_state_dict)
    weights = {key: value.contiguous() for key, value in anomalyclip_state_dict.items()}
    torch.save(weights, tmp_path / "plain.pt")
    torch.save({"state_dict": {f"module.{key}": value for key, value in weights.items()}}, tmp_path / "wrapped.pth")
    save_file(weights, str(tmp_path / "weights.safetensors"))
    np.savez(tmp_path / "weights.npz", **{key: value.numpy() for key, value in weights.items()})
    # a TorchScript archive (the OpenAI release format), traced from the reference model itself
    traced = torch.jit.trace_module(reference, {"encode_image": (torch.zeros(1, 3, 64, 64),)}, check_trace=False)
    torch.jit.save(traced, str(tmp_path / "archive.pt"))

    for name in ("plain.pt", "wrapped.pth", "weights.safetensors", "weights.npz", "archive.pt"):
        clip = load_clip(checkpoint=tmp_path / name)
        assert clip.zsad_source.checkpoint == str(tmp_path / name)
        _assert_same_weights(clip, reference)


def test_checkpoint_with_model_name_uses_that_open_clip_config(anomalyclip_state_dict, tmp_path):
    save_file({k: v.contiguous() for k, v in anomalyclip_state_dict.items()}, str(tmp_path / "tiny.safetensors"))
    clip = load_clip("zsad-tiny", checkpoint=tmp_path / "tiny.safetensors", image_size=112)
    _assert_same_weights(clip, load_clip(state_dict=anomalyclip_state_dict, image_size=112))
    assert clip.zsad_source.model == "zsad-tiny" and not clip.zsad_source.random_init


def test_a_weights_file_with_a_model_name_says_which_file_without_open_clips_random_init_warning(
    anomalyclip_state_dict, tmp_path, caplog, capsys
):
    configs = tmp_path / "configs"  # an open_clip name that is not a built-in random model
    configs.mkdir()
    (configs / "zsad-tiny-local-test.json").write_text((CONFIG_DIR / "zsad-tiny.json").read_text())
    open_clip.add_model_config(configs)
    weights = tmp_path / "local.safetensors"
    save_file({k: v.contiguous() for k, v in anomalyclip_state_dict.items()}, str(weights))
    with caplog.at_level(logging.INFO):
        clip = load_clip("zsad-tiny-local-test", checkpoint=weights, image_size=112)
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    assert f"from {weights}" in capsys.readouterr().out
    _assert_same_weights(clip, load_clip(state_dict=anomalyclip_state_dict, image_size=112))


def test_tiny_model_by_name_is_seeded_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = load_clip("zsad-tiny", seed=0)
    torch.testing.assert_close(torch.rand(3), expected_next)  # global RNG state untouched
    _assert_same_weights(first, load_clip("zsad-tiny", seed=0))
    other = load_clip("zsad-tiny", seed=1)
    assert not torch.equal(first.visual.proj, other.visual.proj)
    assert first.zsad_source.random_init and first.visual.image_size == (64, 64)
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        features = VisualEncoder(load_clip("zsad-tiny", image_size=112))(images).global_embedding
    assert features.shape == (2, 32) and torch.isfinite(features).all()


def test_pretrained_tag_offline_raises_a_clear_error_instead_of_a_random_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PretrainedWeightsUnavailableError) as error:
        load_clip("ViT-B-16", "openai", cache_dir=tmp_path / "empty_cache")
    message = str(error.value)
    assert "'ViT-B-16'" in message and "'openai'" in message
    assert "internet" in message and "checkpoint=" in message


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "needs a source"),
        ({"model": "no-such-model"}, "unknown open_clip model"),
        ({"model": "ViT-B-16", "pretrained": "no-such-tag"}, "unknown pretrained tag"),
        ({"pretrained": "openai"}, "needs model="),
        ({"model": "zsad-tiny", "pos_embed_resize": "nearest"}, "pos_embed_resize"),
        ({"model": "zsad-tiny", "image_size": 100}, "multiple of the patch size"),
        ({"model": "zsad-tiny", "text_heads": 4}, "head counts"),
    ],
)
def test_bad_arguments_raise_errors_naming_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_clip(**kwargs)


def test_incomplete_state_dict_and_missing_file_are_reported(anomalyclip_state_dict, tmp_path):
    broken = {key: value for key, value in anomalyclip_state_dict.items() if key != "visual.proj"}
    with pytest.raises(ValueError, match="visual.proj"):
        load_clip(state_dict=broken)
    without_block = {k: v for k, v in anomalyclip_state_dict.items() if not k.startswith("visual.ln_post")}
    with pytest.raises(ValueError, match="missing"):
        load_clip(state_dict=without_block)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_checkpoint(tmp_path / "missing.pt")


def test_bilinear_resize_matches_the_reference_interpolated_position_embedding(anomalyclip_state_dict):
    with np.load(FIXTURES / "anomalyclip" / "visual_dpam.npz") as reference:
        source, expected = reference["pos_embedding_state_dict"], reference["pos_embedding_interpolated"]
    resized = resize_position_embedding(torch.from_numpy(source), 7, "bilinear")
    assert resized.shape == (50, 128)
    torch.testing.assert_close(resized, torch.from_numpy(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(resized[0], torch.from_numpy(source[0]), rtol=0, atol=0)  # class row kept
    clip = load_clip(state_dict=anomalyclip_state_dict, image_size=112)
    torch.testing.assert_close(clip.visual.positional_embedding.detach(), resized, rtol=0, atol=0)
    assert clip.visual.grid_size == (7, 7)


def test_open_clip_resize_matches_the_vand_fork_and_differs_from_bilinear():
    with np.load(FIXTURES / "vand" / "pos_embedding.npz") as reference:
        source, expected = torch.from_numpy(reference["state_dict_4x4"]), torch.from_numpy(reference["resized_8x8"])
    torch.testing.assert_close(resize_position_embedding(source, 8, "open_clip"), expected, rtol=1e-6, atol=1e-6)
    assert (resize_position_embedding(source, 8, "bilinear") - expected).abs().max() > 1e-2


def test_vand_fixture_model_loads_with_gelu_and_explicit_text_heads():
    state_dict = _state_dict("vand")
    clip = load_clip(
        state_dict=state_dict, image_size=112, quick_gelu=False, text_heads=2, pos_embed_resize="open_clip"
    )
    assert not clip.zsad_source.quick_gelu
    assert isinstance(clip.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    inputs = np.load(FIXTURES / "vand" / "inputs.npz")
    train = np.load(FIXTURES / "vand" / "train.npz")
    with torch.no_grad():
        out = VisualEncoder(clip)(torch.from_numpy(inputs["images"]), [6, 12, 18, 24], tokens="raw")
    torch.testing.assert_close(out.global_embedding, torch.from_numpy(train["image_features"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        torch.stack(out.layer_tokens), torch.from_numpy(train["patch_tokens_raw"]), rtol=1e-5, atol=1e-4
    )
    # text heads: the VAND prompt ensemble for "candle" (7 normal + 5 anomalous states × 35 templates)
    prompts = np.load(FIXTURES / "vand" / "text_prompts.npz")
    sentences = [str(sentence) for sentence in prompts["sentences"][:420]]
    with torch.no_grad():
        features = TextEncoder(clip).encode_tokens(tokenize(sentences))
    features = features / features.norm(dim=-1, keepdim=True)
    classes = [features[:245].mean(0), features[245:].mean(0)]
    ensemble = torch.stack([c / c.norm() for c in classes], dim=1)
    torch.testing.assert_close(ensemble, torch.from_numpy(prompts["candle"]), rtol=1e-5, atol=1e-5)


def test_openai_weights_get_quickgelu_whether_passed_with_a_model_name_or_not(tmp_path: Path, capsys) -> None:
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    tiny = json.loads((CONFIG_DIR / "zsad-tiny.json").read_text())
    (config_dir / "zsad-tiny-gelu.json").write_text(json.dumps({**tiny, "quick_gelu": False}))
    open_clip.add_model_config(config_dir)
    weights = load_clip("zsad-tiny", seed=0).state_dict()
    openai_format = {**weights, "input_resolution": torch.tensor(64), "context_length": torch.tensor(77),
                     "vocab_size": torch.tensor(49408)}  # the scalar entries of OpenAI's archives
    path = tmp_path / "openai.pt"
    torch.save(openai_format, path)
    inferred = load_backbone("openai-state-dict", str(path), image_size=64)
    named = load_backbone("zsad-tiny-gelu", str(path), image_size=64)
    assert inferred.zsad_source.quick_gelu and named.zsad_source.quick_gelu
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(inferred.encode_image(images), named.encode_image(images))
    other_origin = tmp_path / "other.pt"  # the same tensors without OpenAI's entries: the config's activation
    torch.save(weights, other_origin)
    capsys.readouterr()
    assert not load_backbone("zsad-tiny-gelu", str(other_origin), image_size=64).zsad_source.quick_gelu
    assert "(MLP activation: GELU; OpenAI-trained weights" in capsys.readouterr().out  # the load says which
    assert load_backbone("zsad-tiny-gelu", str(other_origin), image_size=64, quick_gelu=True).zsad_source.quick_gelu
