"""AA-CLIP: the residual adapter, the V-V batch mixing of stage 1, the losses' switches, the maps and the fusions,
class phrases and checkpoints (ours and the official layout)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from zsadkit.maps import gaussian_blur
from zsadkit.methods.aaclip import (
    AACLIP,
    CLASS_NAMES_FILE,
    AACLIPConfig,
    ResidualAdapter,
    build_aaclip,
    class_phrase,
    import_official_state,
    reference_config,
    transductive_image_scores,
)
from zsadkit.models import load_clip

FIXTURE = Path(__file__).parent / "fixtures" / "aaclip"
MANIFESTS = Path(__file__).resolve().parent.parent / "data_manifests"
SIZE = 64


@pytest.fixture(scope="module")
def clip():
    return load_clip("zsad-tiny", image_size=SIZE, seed=3, pos_embed_resize="open_clip", quick_gelu=False)


@pytest.fixture()
def model(clip) -> AACLIP:
    torch.manual_seed(0)
    return AACLIP(clip, reference_config(clip)).eval()


def test_residual_adapter_rescales_to_the_input_norm_and_mixes_with_lambda() -> None:
    torch.manual_seed(0)
    adapter = ResidualAdapter(8, weight=0.1)
    hidden = torch.randn(3, 5, 8)
    raw = F.leaky_relu(hidden @ adapter.linear.weight.T)
    rescaled = raw / raw.norm(dim=-1, keepdim=True) * hidden.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(adapter(hidden), 0.1 * rescaled + 0.9 * hidden)
    torch.testing.assert_close(rescaled.norm(dim=-1), hidden.norm(dim=-1))


def test_reference_config_scales_levels_adapters_and_surgery_with_depth(clip) -> None:
    config = reference_config(clip)
    assert config.levels == (1, 2, 3, 4) and config.image_adapter_layers == 1 and config.text_adapter_layers == 1
    assert config.surgery_first_layer == 2  # DAPM_replace(20) of 24 blocks starts at block 6
    assert AACLIPConfig().levels == (6, 12, 18, 24)  # ViT-L: the reference's own numbers
    with pytest.raises(ValueError, match=r"levels \[6\] outside the 4 blocks"):
        AACLIP(clip, AACLIPConfig(levels=(6,), image_adapter_layers=1, text_adapter_layers=1, surgery_first_layer=2))
    with pytest.raises(TypeError, match="unknown options .*'level'"):
        build_aaclip(image_size=SIZE, level=(1,))


def test_parameter_counts_follow_the_reference_layout(model: AACLIP) -> None:
    # zsad-tiny: vision width 128, text width 128, embed 32; 1 vision + 1 text adapter, 4 levels
    assert {name: tuple(p.shape) for name, p in model.image_parameters().items()} == {
        "image_adapters.0.linear.weight": (128, 128), **{f"seg_projections.{i}.linear.weight": (32, 128)
                                                          for i in range(4)}, "det_projection.linear.weight": (32, 128)}
    assert {name: tuple(p.shape) for name, p in model.text_parameters().items()} == {
        "text_adapters.0.linear.weight": (128, 128), "text_projection.linear.weight": (32, 128)}
    assert not any(p.requires_grad for p in model.clip.parameters())


def _stage1_patch_features(model: AACLIP, images: torch.Tensor) -> torch.Tensor:
    return model.stage1_features(images)["patch_features"]


def test_reference_vv_mixes_images_across_the_batch_and_the_per_image_option_does_not(clip) -> None:
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    mixing = AACLIP(clip, reference_config(clip))
    per_image = AACLIP(clip, reference_config(clip, vv_batch_mixing=False))
    in_batch, alone = _stage1_patch_features(mixing, images)[0], _stage1_patch_features(mixing, images[:1])[0]
    assert (in_batch - alone).abs().max() > 1e-2  # image 0's features depend on the other two images
    in_batch, alone = _stage1_patch_features(per_image, images)[0], _stage1_patch_features(per_image, images[:1])[0]
    torch.testing.assert_close(in_batch, alone, atol=1e-5, rtol=1e-5)


def test_per_image_vv_is_softmax_of_v_v_transposed_over_the_image_tokens(clip) -> None:
    """Block 2 onwards use V-V in the residual stream (single path, MLP kept): recompute block 2 by hand."""
    model = AACLIP(clip, reference_config(clip, vv_batch_mixing=False))
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    visual = model.visual
    with torch.no_grad():
        hidden = visual.blocks[0](visual.embed(images))
        block = visual.blocks[1]
        attn = block.attn
        v = F.linear(block.ln_1(hidden), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)[2]
        heads, head_dim = attn.num_heads, v.shape[-1] // attn.num_heads
        v = v.view(2, -1, heads, head_dim).transpose(1, 2)
        weights = (v @ v.transpose(-1, -2) / math.sqrt(head_dim)).softmax(dim=-1)
        merged = (weights @ v).transpose(1, 2).reshape(2, -1, heads * head_dim)
        expected = hidden + attn.out_proj(merged)
        expected = expected + block.mlp(block.ln_2(expected))
        ours = visual(images, [2], tokens="raw", attention=model.surgery_attention, return_global=False)
    torch.testing.assert_close(ours.layer_tokens[0], expected, atol=1e-5, rtol=1e-5)


def test_dual_surgery_path_reads_a_vv_side_stream_beside_the_unchanged_clip_stream(clip) -> None:
    """surgery_path="dual" (DPAM-style): level 2 is h¹ + Out(V-V(ln_1(h¹))) with no MLP; "single" (the reference)
    keeps the MLP in the residual stream; the global embedding of stage 1 is plain CLIP's either way."""
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    dual = AACLIP(clip, reference_config(clip, vv_batch_mixing=False, surgery_path="dual", levels=(2,)))
    single = AACLIP(clip, reference_config(clip, vv_batch_mixing=False, levels=(2,)))
    assert single.config.surgery_path == "single" and single.surgery_attention.path == "single"
    visual = dual.visual
    with torch.no_grad():
        hidden = visual.blocks[0](visual.embed(images))
        block = visual.blocks[1]
        attn = block.attn
        v = F.linear(block.ln_1(hidden), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)[2]
        heads, head_dim = attn.num_heads, v.shape[-1] // attn.num_heads
        v = v.view(2, -1, heads, head_dim).transpose(1, 2)
        merged = ((v @ v.transpose(-1, -2) / math.sqrt(head_dim)).softmax(dim=-1) @ v).transpose(1, 2)
        side = hidden + attn.out_proj(merged.reshape(2, -1, heads * head_dim))
        expected = F.normalize((visual.visual.ln_post(side) @ visual.visual.proj)[:, 1:], dim=-1)
        features = {name: model.stage1_features(images) for name, model in (("dual", dual), ("single", single))}
    torch.testing.assert_close(features["dual"]["patch_features"][:, 0], expected, atol=1e-5, rtol=1e-5)
    assert (features["dual"]["patch_features"] - features["single"]["patch_features"]).abs().max() > 1e-2
    torch.testing.assert_close(features["dual"]["global_embedding"], features["single"]["global_embedding"])
    assert dual.stage1_cache_key() != single.stage1_cache_key()
    with pytest.raises(ValueError, match="surgery_path"):
        reference_config(clip, surgery_path="side")


def test_disentanglement_reductions_are_the_square_of_the_mean_or_the_mean_of_squares() -> None:
    anchors = F.normalize(torch.randn(4, 2, 6, generator=torch.Generator().manual_seed(2)), dim=-1)
    cosines = (anchors[:, 0] * anchors[:, 1]).sum(-1)
    assert float(AACLIP.disentanglement(anchors)) == pytest.approx(float(cosines.mean() ** 2), abs=1e-7)
    assert float(AACLIP.disentanglement(anchors, "square_then_mean")) == pytest.approx(float((cosines**2).mean()),
                                                                                       abs=1e-7)


def _stage1_rows(model: AACLIP, batch: int = 2) -> dict:
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(batch, 3, SIZE, SIZE, generator=generator)
    masks = torch.zeros(batch, SIZE, SIZE)
    masks[0, 10:30, 20:40] = 1
    return {**model.stage1_features(images), "mask": masks, "label": torch.tensor([1] + [0] * (batch - 1)),
            "class_name": ["bottle"] * batch}


def test_stage1_loss_switches_levels_global_embedding_and_classification(clip) -> None:
    reference = AACLIP(clip, reference_config(clip))
    rows = _stage1_rows(reference)
    losses = reference.stage1_losses(rows)
    everything = AACLIP(clip, reference_config(clip, stage1_levels="all"))
    everything.load_state(reference.trainable_parameters())
    all_losses = everything.stage1_losses(rows)
    per_level = all_losses["seg_per_level"].detach()
    assert per_level.shape == (4,) and losses["seg_per_level"].shape == (1,)
    assert losses["loss"].item() == pytest.approx((per_level[-1] + 0.1 * losses["disentangle"]).item(), rel=1e-6)
    assert all_losses["loss"].item() == pytest.approx((per_level.sum() + 0.1 * losses["disentangle"]).item(), rel=1e-5)
    paper = AACLIP(clip, reference_config(clip, stage1_cls_loss=True, stage1_add_global=False))
    paper.load_state(reference.trainable_parameters())
    paper_losses = paper.stage1_losses(rows)
    anchors = reference.anchors_per_image(rows["class_name"]).detach()
    logits = torch.einsum("bd,bkd->bk", rows["global_embedding"], anchors)
    assert paper_losses["cls"].item() == pytest.approx(F.cross_entropy(logits, rows["label"]).item(), rel=1e-5)
    assert not torch.allclose(paper_losses["seg_per_level"], per_level[-1:])  # the global embedding is not added


def test_stage1_gradients_reach_only_the_text_parameters(model: AACLIP) -> None:
    model.stage1_losses(_stage1_rows(model))["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.text_parameters().values())
    assert all(p.grad is None for p in model.image_parameters().values())


def test_stage2_loss_is_ce_of_raw_cosines_plus_the_seg_loss_of_every_level(model: AACLIP) -> None:
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    masks = torch.zeros(2, SIZE, SIZE)
    masks[1, :20, :20] = 1
    labels = torch.tensor([0, 1])
    losses = model.stage2_losses(images, masks, labels, ["bottle", "bottle"])
    features = model.encode_image(images)
    anchors = model.frozen_anchors(["bottle", "bottle"])
    logits = torch.einsum("bd,bkd->bk", features.det_token, anchors)
    assert losses["ce"].item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert losses["loss"].item() == pytest.approx((losses["ce"] + losses["seg_per_level"].sum()).item(), rel=1e-6)
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.image_parameters().values())
    assert all(p.grad is None for p in model.text_parameters().values())


def test_level_maps_blur_the_grid_before_upsampling_with_the_domain_kernel(model: AACLIP) -> None:
    seg = F.normalize(torch.randn(4, 1, 16, 32, generator=torch.Generator().manual_seed(6)), dim=-1)
    anchors = F.normalize(torch.randn(1, 2, 32, generator=torch.Generator().manual_seed(7)), dim=-1)
    logits = 100 * torch.einsum("lbnd,bkd->lbnk", seg, anchors)
    grid = ((logits[..., 1] + 1 - logits[..., 0]) / 2).reshape(4, 4, 4)
    for domain, (kernel, sigma) in (("industrial", (7, 1.0)), ("medical", (9, 1.5))):
        expected = F.interpolate(gaussian_blur(grid, kernel, sigma)[:, None], size=SIZE, mode="bilinear",
                                 align_corners=True)[:, 0]
        ours = model.set_domain(domain).level_maps(seg, anchors)
        torch.testing.assert_close(ours[:, 0], expected)
    with pytest.raises(ValueError, match="domain must be one of"):
        model.set_domain("dental")


def test_gaussian_blur_equals_a_reflect_padded_convolution_with_kornias_taps() -> None:
    maps = torch.rand(2, 9, 11, generator=torch.Generator().manual_seed(8))
    x = torch.arange(7, dtype=torch.float32) - 3
    taps = torch.exp(-(x**2) / 2)
    taps = taps / taps.sum()
    kernel = (taps[:, None] * taps[None, :])[None, None]
    expected = F.conv2d(F.pad(maps[:, None], (3, 3, 3, 3), mode="reflect"), kernel)[:, 0]
    torch.testing.assert_close(gaussian_blur(maps, 7, 1.0), expected, atol=1e-6, rtol=1e-6)
    small = gaussian_blur(torch.rand(1, 4, 4), 9, 1.5)  # torch's reflect padding refuses a radius >= the side
    assert small.shape == (1, 4, 4) and torch.isfinite(small).all()
    constant = gaussian_blur(torch.full((1, 4, 4), 2.5), 9, 1.5)
    torch.testing.assert_close(constant, torch.full((1, 4, 4), 2.5))
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(maps, 4, 1.0)


def test_transductive_fusion_min_max_normalises_over_the_class_as_the_reference() -> None:
    scores = torch.tensor([0.2, 0.4, 0.8])
    maxima, minimum = torch.tensor([3.0, 5.0, 4.0]), 1.0
    fused = transductive_image_scores(scores, maxima, minimum, 0.5)
    expected = 0.5 * (maxima - 1.0) / 4.0 + 0.5 * (scores - 0.2) / 0.6
    torch.testing.assert_close(fused, expected.double())
    torch.testing.assert_close(transductive_image_scores(scores, maxima, minimum, 1.0), ((maxima - 1) / 4).double())
    # the reference skips the min-max when the maximum is exactly 1
    torch.testing.assert_close(transductive_image_scores(torch.tensor([0.5, 1.0]), torch.tensor([0.25, 1.0]), 0.0, 0.5),
                               torch.tensor([0.375, 1.0], dtype=torch.float64))


def test_per_image_fusion_uses_the_fixed_map_range_and_does_not_depend_on_the_batch(model: AACLIP) -> None:
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    batch = model.predict(images, ["bottle"] * 3)
    singles = torch.cat([model.predict(images[i : i + 1], ["bottle"]).image_scores for i in range(3)])
    torch.testing.assert_close(batch.image_scores, singles, atol=1e-6, rtol=1e-6)
    scores = model.score(images, ["bottle"] * 3)
    low, high = model.map_range()
    assert (low, high) == (4 * -99.5, 4 * 100.5)
    expected = 0.5 * (scores.anomaly_maps.flatten(1).amax(1) - low) / (high - low) + 0.5 * scores.image_scores
    torch.testing.assert_close(batch.image_scores, expected)
    torch.testing.assert_close(batch.anomaly_maps, scores.level_maps.sum(0))


def test_class_phrases_cover_every_class_of_the_aaclip_test_sets() -> None:
    assert class_phrase("metal_nut") == "metal nut which has four notched edges"
    assert class_phrase("metal_nut", "raw") == "metal_nut"
    assert class_phrase("colon") == "colon endoscopy image" and class_phrase("brain") == "scan"
    assert class_phrase("synthetic-thing") == "synthetic-thing"
    table = yaml.safe_load(CLASS_NAMES_FILE.read_text())
    for path in sorted(MANIFESTS.glob("*.yaml")):
        protocols = yaml.safe_load(path.read_text())["protocols"]
        if "aaclip" in protocols:
            entry = protocols["aaclip"]
            entry = protocols[entry["same_as"]] if "same_as" in entry else entry
            assert set(map(str, entry["test"]["per_class"])) <= set(map(str, table[path.stem])), path.stem
    assert len(table) == 11  # the eleven AA-CLIP test sets


def test_sentences_are_the_reference_prompts_normal_first(model: AACLIP) -> None:
    sentences = model.sentences("pcb3")
    assert len(sentences) == 16
    assert sentences[:3] == ["infrared sensor pcb module.", "a photo of infrared sensor pcb module.",
                             "a infrared sensor pcb module."]
    assert sentences[6] == "a damaged infrared sensor pcb module."
    raw = AACLIP(model.clip, reference_config(model.clip, class_names="raw"))
    assert raw.sentences("pcb3")[0] == "pcb3."


def test_cropping_the_text_after_eot_changes_nothing(clip) -> None:
    cropped = AACLIP(clip, reference_config(clip))
    full = AACLIP(clip, reference_config(clip, crop_text_after_eot=False))
    full.load_state(cropped.trainable_parameters())
    with torch.no_grad():
        torch.testing.assert_close(cropped.text_anchors(["pcb3", "bottle"]), full.text_anchors(["pcb3", "bottle"]),
                                   atol=1e-6, rtol=1e-6)


def test_save_and_load_adapters_round_trip_and_refuse_another_layout(model: AACLIP, clip, tmp_path: Path) -> None:
    path = model.save_adapters(tmp_path / "adapters.safetensors")
    other = build_aaclip(clip=clip, image_size=SIZE, train_seed=5, checkpoint=str(path))
    for name, value in model.trainable_parameters().items():
        assert torch.equal(other.trainable_parameters()[name], value)
    with pytest.raises(ValueError, match="another adapter configuration.*image_adapter_layers"):
        build_aaclip(clip=clip, image_size=SIZE, image_adapter_layers=2, checkpoint=str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.load_checkpoint(tmp_path / "missing.safetensors")


def test_official_checkpoints_load_by_the_reference_names() -> None:
    arrays = np.load(FIXTURE / "adapters_init.npz")
    state = {key: torch.from_numpy(arrays[key]) for key in arrays.files}
    fixture_clip = load_clip(state_dict={k: torch.from_numpy(v) for k, v in np.load(FIXTURE / "state_dict.npz").items()},
                             image_size=112, pos_embed_resize="open_clip", quick_gelu=False, vision_heads=2,
                             text_heads=2)
    assert reference_config(fixture_clip) == AACLIPConfig()  # 24/12 blocks: the reference's own layer choices
    model = AACLIP(fixture_clip, AACLIPConfig())
    loaded = model.load_checkpoint(FIXTURE / "text_adapter_init.pth") + model.load_checkpoint(
        FIXTURE / "image_adapter_init.pth")
    assert len(loaded) == 4 + 11
    torch.testing.assert_close(model.text_projection.linear.weight, state["text_adapter.3.fc.0.weight"])
    torch.testing.assert_close(model.seg_projections[2].linear.weight, state["image_adapter.seg_proj.2.fc.weight"])
    torch.testing.assert_close(model.image_adapters[5].linear.weight,
                               state["image_adapter.layer_adapters.5.fc.0.weight"])
    with pytest.raises(ValueError, match="not an official AA-CLIP checkpoint"):
        import_official_state({"prompt_learner": {}}, model)
    with pytest.raises(ValueError, match="2 text adapters \\+ projection, the model has 3"):
        import_official_state({"text_adapter": {f"{i}.fc.0.weight": torch.zeros(1) for i in range(3)}}, model)


def test_an_official_save_path_folder_loads_the_text_adapter_and_the_chosen_epoch(tmp_path: Path) -> None:
    fixture_clip = load_clip(state_dict={k: torch.from_numpy(v) for k, v in np.load(FIXTURE / "state_dict.npz").items()},
                             image_size=112, pos_embed_resize="open_clip", quick_gelu=False, vision_heads=2,
                             text_heads=2)
    shutil.copy(FIXTURE / "text_adapter_after_stage1_bs1.pth", tmp_path / "text_adapter.pth")
    shutil.copy(FIXTURE / "image_adapter_init.pth", tmp_path / "image_adapter_15.pth")
    model = AACLIP(fixture_clip, AACLIPConfig())
    assert len(model.load_checkpoint(tmp_path, epoch=15)) == 15
    after = torch.load(FIXTURE / "text_adapter_after_stage1_bs1.pth", weights_only=True)["text_adapter"]
    torch.testing.assert_close(model.text_adapters[1].linear.weight, after["1.fc.0.weight"])
    with pytest.raises(FileNotFoundError, match="missing .*image_adapter.pth"):
        model.load_checkpoint(tmp_path)
