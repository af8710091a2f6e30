"""What every builder shares: reference layers from the backbone's depth, one options error, seeded construction."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from zsadkit.methods import build_method
from zsadkit.methods.base import backbone_defaults, check_options, seeded
from zsadkit.methods.clip_baseline import ClipBaselineConfig


def depth_stub(vision: int, text: int) -> SimpleNamespace:
    return SimpleNamespace(visual=SimpleNamespace(transformer=SimpleNamespace(resblocks=[None] * vision)),
                           transformer=SimpleNamespace(resblocks=[None] * text))


@pytest.fixture(scope="module")
def twelve_layer_state_dict_file(tmp_path_factory) -> Path:
    """A random 12-layer OpenAI-format CLIP (width 64: one head per block) saved as a state-dict file."""
    with seeded(0):
        clip = CLIP(32, CLIPVisionCfg(layers=12, width=64, head_width=64, patch_size=16, image_size=64),
                    CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=12), quick_gelu=True)
    path = tmp_path_factory.mktemp("weights") / "vit12.npz"
    np.savez(path, **{name: value.detach().numpy() for name, value in clip.state_dict().items()})
    return path


def test_reference_layers_come_from_the_depth_of_the_model_not_its_name() -> None:
    vit_l, vit_b, tiny = backbone_defaults(depth_stub(24, 12)), backbone_defaults(depth_stub(12, 12)), \
        backbone_defaults(depth_stub(4, 4))
    assert (vit_l.last_layer, vit_l.dpam_first_layer, vit_l.four_layers, vit_l.deep_depth) == (24, 6, (6, 12, 18, 24), 9)
    assert (vit_b.last_layer, vit_b.dpam_first_layer, vit_b.four_layers, vit_b.deep_depth) == (12, 3, (3, 6, 9, 12), 9)
    assert (tiny.last_layer, tiny.dpam_first_layer, tiny.four_layers, tiny.deep_depth) == (4, 2, (1, 2, 3, 4), 3)
    # A depth the table does not list is scaled from the 24-layer reference.
    eight = backbone_defaults(depth_stub(8, 6))
    assert (eight.last_layer, eight.dpam_first_layer, eight.four_layers, eight.deep_depth) == (8, 2, (2, 4, 6, 8), 5)


def test_a_twelve_layer_backbone_from_a_state_dict_file_gets_the_reference_layer_choice(
    twelve_layer_state_dict_file: Path,
) -> None:
    settings = dict(backbone="openai-state-dict", pretrained=str(twelve_layer_state_dict_file), image_size=64)
    anomalyclip = build_method("anomalyclip", **settings)
    assert anomalyclip.config.feature_layers == (12,) and anomalyclip.config.dpam_first_layer == 3
    assert anomalyclip.config.deep_depth == 9
    assert build_method("coop", **settings).config.feature_layers == (3, 6, 9, 12)
    assert build_method("vand", **settings).config.layers == (3, 6, 9, 12)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert anomalyclip.predict(images, ["bottle"]).anomaly_maps.shape == (1, 64, 64)


def test_every_builder_rejects_unknown_options_listing_the_valid_ones() -> None:
    for method in ("anomalyclip", "coop", "vand", "winclip", "clip", "clip-ac"):
        with pytest.raises(TypeError, match=r"unknown options \['colour'\]; \w+Config has \["):
            build_method(method, backbone="zsad-tiny", image_size=64, colour="red")
    with pytest.raises(TypeError, match="ClipBaselineConfig has"):
        check_options("clip", ClipBaselineConfig, {"sigma": 1})


def test_a_loaded_backbone_is_reused_and_must_match_the_image_size() -> None:
    clip = build_method("clip", backbone="zsad-tiny", image_size=64, backbone_seed=4).clip
    reused = build_method("anomalyclip", clip=clip, image_size=64)
    assert reused.text.clip is clip
    with pytest.raises(ValueError, match="loaded for 64-pixel inputs, image_size=112"):
        build_method("anomalyclip", clip=clip, image_size=112)


def test_seeded_construction_leaves_the_global_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with seeded(7):
        first = torch.rand(2)
    assert torch.equal(torch.rand(3), expected)
    with seeded(7):
        assert torch.equal(torch.rand(2), first)


def test_train_seed_initialises_the_learned_parameters_and_backbone_seed_the_backbone() -> None:
    first = build_method("coop", backbone="zsad-tiny", image_size=64, backbone_seed=0, train_seed=1)
    other_train = build_method("coop", backbone="zsad-tiny", image_size=64, backbone_seed=0, train_seed=2)
    other_backbone = build_method("coop", backbone="zsad-tiny", image_size=64, backbone_seed=5, train_seed=1)
    assert torch.equal(first.text.clip.visual.proj, other_train.text.clip.visual.proj)
    assert not torch.equal(first.trainable_parameters()["contexts"], other_train.trainable_parameters()["contexts"])
    assert not torch.equal(first.text.clip.visual.proj, other_backbone.text.clip.visual.proj)
    assert torch.equal(first.trainable_parameters()["contexts"], other_backbone.trainable_parameters()["contexts"])
