"""VAND/April-GAN: trained per-layer projections, its map recipe, plain-CLIP image scores, training end to end."""

import pytest
import torch
import torch.nn.functional as F

from zsadkit.engine import evaluate
from zsadkit.experiment import RunConfig, load_split
from zsadkit.methods.base import build_method
from zsadkit.methods.vand import Vand, VandConfig, VandProjections, VandTrainingConfig, train_vand, vand_loss
from zsadkit.models import load_clip

SIZE = 64
TINY_LAYERS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def clip():
    return load_clip("zsad-tiny", image_size=SIZE, seed=1)


@pytest.fixture()
def vand(clip):
    torch.manual_seed(0)
    return Vand(clip, VandConfig(layers=TINY_LAYERS))


def test_projections_have_one_linear_with_bias_per_layer_vit_l_count():
    # ViT-L/14@336: W = 1024, D = 768, layers 6/12/18/24 → 4 × (1024·768 + 768).
    assert VandProjections(1024, 768, 4).trainable_parameters() == 4 * (1024 * 768 + 768) == 3_148_800


def test_only_the_projections_are_trainable(vand):
    trainable = {name for name, p in vand.named_parameters() if p.requires_grad}
    assert trainable == {f"projections.fc.{i}.{kind}" for i in range(4) for kind in ("weight", "bias")}
    assert vand.projections.trainable_parameters() == 4 * (128 * 32 + 32)


def test_layer_map_upsamples_logits_with_align_corners_then_softmaxes(vand):
    tokens = torch.randn(2, 16, 32)
    text = F.normalize(torch.randn(2, 2, 32), dim=-1)
    logits = 100 * F.normalize(tokens, dim=-1) @ text.transpose(1, 2)
    grid = logits.permute(0, 2, 1).reshape(2, 2, 4, 4)
    expected = F.interpolate(grid, size=SIZE, mode="bilinear", align_corners=True).softmax(dim=1)
    assert torch.allclose(vand.state_map(tokens, text), expected, atol=1e-6)


def test_image_score_is_plain_clip_and_ignores_the_projections(vand, clip):
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    before = vand.predict(images, ["metal_nut", "screw"])
    with torch.no_grad():
        for parameter in vand.projections.parameters():
            parameter.add_(1.0)
        image = F.normalize(clip.encode_image(images), dim=-1)
    after = vand.predict(images, ["metal_nut", "screw"])
    assert torch.allclose(before.image_scores, after.image_scores)
    assert not torch.allclose(before.anomaly_maps, after.anomaly_maps)
    text = vand.batch_text_features(["metal_nut", "screw"])
    expected = (100 * torch.einsum("bd,bkd->bk", image, text)).softmax(dim=-1)[:, 1]
    assert torch.allclose(after.image_scores, expected, atol=1e-6)


def test_pixel_map_is_the_sum_over_layers_of_the_anomalous_probability(vand):
    images = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        output = vand(images, ["bottle"])
    expected = sum(maps[:, 1] for maps in output.state_maps)
    assert torch.allclose(vand.predict(images, ["bottle"]).anomaly_maps, expected, atol=1e-6)
    assert 0 <= float(expected.min()) and float(expected.max()) <= len(TINY_LAYERS)


def test_reference_class_names_keep_underscores(vand):
    assert vand.config.replace_underscores is False
    sentences = vand.ensemble.sentences("metal_nut", "anomalous")
    assert sentences[0] == "a bad photo of a damaged metal_nut."


def test_loss_is_focal_plus_dice_of_the_anomalous_channel_per_layer():
    probs = torch.rand(2, 1, 8, 8)
    maps = [torch.cat([1 - probs, probs], dim=1)] * 2
    mask = (torch.rand(2, 8, 8) > 0.7).float()
    eps = 1e-5
    target = F.one_hot(mask.long(), 2).permute(0, 3, 1, 2).float().clamp(eps, 1 - eps)
    p_t = (target * maps[0]).sum(dim=1) + eps
    focal = (-(1 - p_t) ** 2 * p_t.log()).mean()
    dice = 1 - ((2 * (probs[:, 0] * mask).sum((1, 2)) + 1) / (probs[:, 0].sum((1, 2)) + mask.sum((1, 2)) + 1)).mean()
    assert torch.allclose(vand_loss(maps, mask), 2 * (focal + dice), atol=1e-6)


def test_few_shot_memory_adds_a_zero_distance_map_for_a_reference_image(vand):
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    zero_shot = vand.predict(images, ["x", "x"])
    vand.fit_references(images[:1])
    few_shot = vand.predict(images, ["x", "x"])
    assert torch.allclose(few_shot.anomaly_maps[0], zero_shot.anomaly_maps[0], atol=1e-4)
    assert bool((few_shot.anomaly_maps[1] > zero_shot.anomaly_maps[1] + 1e-4).any())


def test_vand_trains_on_synthetic_aux_and_evaluates_on_synthetic_target(tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path))
    model = build_method("vand", backbone="zsad-tiny", image_size=SIZE, layers=TINY_LAYERS)
    before = [p.detach().clone() for p in model.projections.parameters()]
    aux = [s for s in load_split(cfg, "synth-aux") if s.class_name in ("fabric", "washer")]
    losses = train_vand(model, aux, VandTrainingConfig(epochs=2, batch_size=16), progress=False)
    assert len(losses) == 2 and losses[1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.projections.parameters(), strict=True))
    target = [s for s in load_split(cfg, "synth-target") if s.class_name in ("planks", "coin")]
    rows = evaluate(model, target, dataset="synth-target", image_size=SIZE, batch_size=20, pro=None,
                    progress=False)
    means = rows[rows["class_name"] == "mean"]
    assert {"image", "pixel"} <= set(means["level"])
    assert means["value"].between(0, 1).all()


def test_bad_layers_are_rejected(clip):
    with pytest.raises(ValueError, match="VAND layers"):
        Vand(clip, VandConfig(layers=(6, 12)))


def test_backbone_is_built_like_the_reference_fork_gelu_at_a_non_native_size():
    resized = build_method("vand", backbone="zsad-tiny", image_size=SIZE + 48)  # native 64 → 112: GELU
    native = build_method("vand", backbone="zsad-tiny", image_size=64)
    assert resized.clip.zsad_source.quick_gelu is False and resized.clip.zsad_source.pos_embed_resize == "open_clip"
    assert native.clip.zsad_source.quick_gelu is True
