"""VAND/April-GAN: trained per-layer projections, its map recipe, plain-CLIP image scores, training end to end."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from zsadkit.data.dataset import AnomalyDataset
from zsadkit.data.records import Sample
from zsadkit.engine import evaluate
from zsadkit.experiment import RunConfig, load_split
from zsadkit.methods.base import build_method
from zsadkit.methods.vand import (
    Vand,
    VandConfig,
    VandOutput,
    VandProjections,
    reference_few_shot_image_scores,
)
from zsadkit.models import load_clip
from zsadkit.recipes.vand import MosaicDataset, VandTrainingConfig, train_vand

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
    assert VandProjections(1024, 768, 4).num_parameters() == 4 * (1024 * 768 + 768) == 3_148_800


def test_only_the_projections_are_trainable(vand):
    trainable = {name for name, p in vand.named_parameters() if p.requires_grad}
    assert trainable == {f"projections.fc.{i}.{kind}" for i in range(4) for kind in ("weight", "bias")}
    assert vand.projections.num_parameters() == 4 * (128 * 32 + 32)


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


def test_loss_is_focal_plus_dice_of_the_anomalous_channel_per_layer(vand):
    probs = torch.rand(2, 1, 8, 8)
    maps = [torch.cat([1 - probs, probs], dim=1)] * 2
    mask = (torch.rand(2, 8, 8) > 0.7).float()
    eps = 1e-5
    target = F.one_hot(mask.long(), 2).permute(0, 3, 1, 2).float().clamp(eps, 1 - eps)
    p_t = (target * maps[0]).sum(dim=1) + eps
    focal = (-(1 - p_t) ** 2 * p_t.log()).mean()
    dice = 1 - ((2 * (probs[:, 0] * mask).sum((1, 2)) + 1) / (probs[:, 0].sum((1, 2)) + mask.sum((1, 2)) + 1)).mean()
    output = VandOutput(torch.zeros(2, 4), (), [], maps, torch.zeros(2))
    assert torch.allclose(vand.losses(output, mask), 2 * (focal + dice), atol=1e-6)


def test_few_shot_memory_adds_a_zero_distance_map_for_a_reference_image(vand):
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    zero_shot = vand.predict(images, ["x", "x"])
    vand.fit_references(images[:1])
    few_shot = vand.predict(images, ["x", "x"])
    assert torch.allclose(few_shot.anomaly_maps[0], zero_shot.anomaly_maps[0], atol=1e-4)
    assert bool((few_shot.anomaly_maps[1] > zero_shot.anomaly_maps[1] + 1e-4).any())


def test_few_shot_image_score_is_half_text_plus_final_map_max_over_its_range(vand):
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    text_scores = vand(images, ["x", "x"]).image_scores
    vand.fit_references(images[:1])
    few_shot = vand.predict(images, ["x", "x"])
    final_max = few_shot.anomaly_maps.flatten(1).amax(dim=1)  # zero-shot + memory map
    expected = 0.5 * (text_scores + final_max / (3 * len(TINY_LAYERS)))
    assert torch.allclose(few_shot.image_scores, expected, atol=1e-6)
    assert bool(((few_shot.image_scores >= 0) & (few_shot.image_scores <= 1)).all())


def test_reference_few_shot_image_scores_min_max_the_map_maxima_over_the_class_by_hand():
    text_scores = torch.tensor([0.2, 0.6, 0.4])
    maps = torch.zeros(3, 2, 2)
    maps[0, 0, 1], maps[1, 1, 1], maps[2, 0, 0] = 3.0, 7.0, 5.0  # maxima 3, 7, 5 → 0, 1, 0.5
    scores = reference_few_shot_image_scores(text_scores, maps)
    assert torch.allclose(scores, torch.tensor([0.1, 0.8, 0.45]))
    assert torch.allclose(reference_few_shot_image_scores(text_scores, torch.ones(3, 2, 2)), 0.5 * text_scores)


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def _solid_samples(tmp_path, dataset="mvtec"):
    """Four 32×32 solid-colour test images of one class; image 2 is anomalous with an all-white mask."""
    samples = []
    for i, colour in enumerate(COLOURS):
        image = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 32), colour).save(image)
        mask = None
        if i == 2:
            mask = tmp_path / "2_mask.png"
            Image.new("L", (32, 32), 255).save(mask)
        samples.append(Sample(str(image), None if mask is None else str(mask), int(i == 2), "cube",
                              "crack" if i == 2 else "good", dataset, "test"))
    return samples


def test_mosaic_is_the_four_drawn_images_in_quadrants_with_their_masks_and_any_anomalous_label(tmp_path):
    samples = _solid_samples(tmp_path)
    base = AnomalyDataset(samples, image_size=16)
    dataset = MosaicDataset(base, rate=1.0, seed=0)
    for index in range(len(samples)):
        drawn = dataset.mosaic_indices(index)
        item = dataset[index]
        assert len(drawn) == 4
        for position, source in enumerate(drawn):
            rows = slice(8 * (position // 2) + 2, 8 * (position // 2) + 6)  # quadrant interior, away from seams
            cols = slice(8 * (position % 2) + 2, 8 * (position % 2) + 6)
            expected = base.image_transform(Image.new("RGB", (16, 16), COLOURS[source]))[:, :4, :4]  # normalised
            assert torch.allclose(item["image"][:, rows, cols], expected, atol=1e-5)
            assert bool((item["mask"][rows, cols] == float(source == 2)).all())
        assert item["label"] == int(2 in drawn)
        assert item["class_name"] == "cube" and item["image"].shape == (3, 16, 16)


def test_mosaic_draws_are_seeded_and_follow_the_rate(tmp_path):
    base = AnomalyDataset(_solid_samples(tmp_path), image_size=16)
    first, again = MosaicDataset(base, 0.5, seed=3), MosaicDataset(base, 0.5, seed=3)
    draws = [first.mosaic_indices(i) for i in range(4)]
    assert draws == [again.mosaic_indices(i) for i in range(4)]
    assert all(MosaicDataset(base, 0.0, seed=3).mosaic_indices(i) is None for i in range(4))
    # Defect type first (good or crack, ½ each), then a record: the single crack image is drawn about half the time.
    many = MosaicDataset(base, 1.0, seed=3)
    picks = np.array([many.mosaic_indices(i) for i in range(4)] + [
        (many.set_epoch(epoch), many.mosaic_indices(0))[1] for epoch in range(1, 300)]).ravel()
    assert abs(float(np.mean(picks == 2)) - 0.5) < 0.05


def test_mosaic_rate_defaults_to_the_reference_on_mvtec_only(tmp_path):
    assert VandTrainingConfig().resolved_mosaic_rate(_solid_samples(tmp_path)) == 0.2
    assert VandTrainingConfig().resolved_mosaic_rate(_solid_samples(tmp_path, "visa")) == 0.0
    assert VandTrainingConfig(mosaic_rate=0.0).resolved_mosaic_rate(_solid_samples(tmp_path)) == 0.0
    with pytest.raises(ValueError, match="mosaic_rate"):
        VandTrainingConfig(mosaic_rate=1.5)


def test_vand_trains_on_synthetic_aux_and_evaluates_on_synthetic_target(tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path))
    model = build_method("vand", backbone="zsad-tiny", image_size=SIZE, layers=TINY_LAYERS)
    before = [p.detach().clone() for p in model.projections.parameters()]
    aux = [s for s in load_split(cfg, "synth-aux") if s.class_name in ("fabric", "washer")]
    result = train_vand(model, aux, VandTrainingConfig(epochs=2, batch_size=16,
                                                       checkpoint_dir=str(tmp_path / "ckpt")))
    losses = [row["loss"] for row in result.log]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert [path.name for path in result.checkpoints] == ["epoch_001.safetensors", "epoch_002.safetensors"]
    resumed = build_method("vand", backbone="zsad-tiny", image_size=SIZE, layers=TINY_LAYERS)
    again = train_vand(resumed, aux, VandTrainingConfig(epochs=2, batch_size=16, checkpoint_dir=str(tmp_path / "ckpt")))
    assert again.resumed_from == 2 and not again.checkpoints  # the shared trainer's resume
    for name, value in model.trainable_parameters().items():
        assert torch.equal(resumed.trainable_parameters()[name], value)
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
