"""CLIP and CLIP-AC baselines: Eq. 1 on the global and local embeddings, checked by hand against open_clip."""

import pytest
import torch
import torch.nn.functional as F

from zsadkit.methods.base import build_method
from zsadkit.methods.clip_baseline import ClipBaseline, ClipBaselineConfig
from zsadkit.models import load_clip, tokenize
from zsadkit.prompts import CLIP_IMAGENET_TEMPLATES

SIZE = 64


@pytest.fixture(scope="module")
def clip():
    return load_clip("zsad-tiny", image_size=SIZE, seed=3)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _text(clip, sentences):
    return F.normalize(clip.encode_text(tokenize(sentences)), dim=-1)


@pytest.mark.parametrize("temperature", [0.07, 0.01])
def test_image_score_is_softmax_of_global_cosines_over_the_two_prompts(clip, images, temperature):
    detector = ClipBaseline(clip, ClipBaselineConfig(temperature=temperature, smoothing_sigma=0))
    scores = detector.predict(images, ["metal_nut"] * 3).image_scores
    with torch.no_grad():
        image = F.normalize(clip.encode_image(images), dim=-1)
    text = _text(clip, ["a photo of a normal metal nut", "a photo of an anomalous metal nut"])
    cosines = image @ text.T
    expected = torch.exp(cosines[:, 1] / temperature) / torch.exp(cosines / temperature).sum(dim=1)
    assert torch.allclose(scores, expected, atol=1e-6)


def test_map_is_eq1_on_last_layer_projected_patch_tokens_upsampled(clip, images):
    detector = ClipBaseline(clip, ClipBaselineConfig(smoothing_sigma=0))
    maps = detector.predict(images, ["bottle"] * 3).anomaly_maps
    visual = clip.visual
    visual.output_tokens = True
    try:
        with torch.no_grad():
            _, tokens = visual(images)  # open_clip: last layer, ln_post applied, not projected
    finally:
        visual.output_tokens = False
    local = F.normalize(tokens @ visual.proj, dim=-1)
    text = _text(clip, ["a photo of a normal bottle", "a photo of an anomalous bottle"])
    probs = (local @ text.T / 0.07).softmax(dim=-1)[..., 1]
    grid = SIZE // 16
    expected = F.interpolate(probs.reshape(3, 1, grid, grid), size=SIZE, mode="bilinear", align_corners=False)
    assert torch.allclose(maps, expected[:, 0], atol=1e-5)


def test_clip_ac_class_embedding_is_the_mean_of_80_normalised_template_embeddings(clip):
    detector = ClipBaseline(clip, ClipBaselineConfig(prompts="clip-ac"))
    features = detector.text_features("screw")
    normal = _text(clip, [t.format("normal screw") for t in CLIP_IMAGENET_TEMPLATES])
    anomalous = _text(clip, [t.format("anomalous screw") for t in CLIP_IMAGENET_TEMPLATES])
    expected = F.normalize(torch.stack([normal.mean(0), anomalous.mean(0)]), dim=-1)
    assert torch.allclose(features, expected, atol=1e-6)


def test_text_features_are_cached_per_class(clip, images):
    detector = ClipBaseline(clip)
    detector.predict(images, ["a", "b", "a"])
    assert sorted(detector.class_text.cache) == ["a", "b"]
    first = detector.text_features("a")
    assert detector.text_features("a") is first


def test_each_image_is_scored_against_its_own_class(clip, images):
    detector = ClipBaseline(clip, ClipBaselineConfig(smoothing_sigma=0))
    mixed = detector.predict(images, ["bottle", "cable", "bottle"])
    for index, name in enumerate(["bottle", "cable", "bottle"]):
        alone = detector.predict(images[index : index + 1], [name])
        assert torch.allclose(mixed.image_scores[index], alone.image_scores[0], atol=1e-6)
        assert torch.allclose(mixed.anomaly_maps[index], alone.anomaly_maps[0], atol=1e-6)


def test_smoothing_sigma_four_smooths_the_map(clip, images):
    raw = ClipBaseline(clip, ClipBaselineConfig(smoothing_sigma=0)).predict(images, ["x"] * 3).anomaly_maps
    smooth = ClipBaseline(clip).predict(images, ["x"] * 3).anomaly_maps
    assert smooth.std() < raw.std()
    assert torch.allclose(smooth.mean(), raw.mean(), atol=1e-2)


def test_registered_builders_make_clip_and_clip_ac_from_run_settings():
    clip = build_method("clip", backbone="zsad-tiny", image_size=SIZE)
    clip_ac = build_method("clip-ac", backbone="zsad-tiny", image_size=SIZE, temperature=0.01)
    assert clip.config.prompts == "clip" and clip_ac.config.prompts == "clip-ac"
    assert clip_ac.config.temperature == 0.01 and clip.image_size == SIZE


def test_bad_options_and_inputs_raise_clear_errors(clip, images):
    with pytest.raises(KeyError, match="unknown prompt ensemble"):
        ClipBaselineConfig(prompts="nope")
    with pytest.raises(ValueError, match="temperature"):
        ClipBaselineConfig(temperature=0)
    with pytest.raises(ValueError, match="patch_layer"):
        ClipBaseline(clip, ClipBaselineConfig(patch_layer=9))
    with pytest.raises(ValueError, match="class names"):
        ClipBaseline(clip).predict(images, ["x"])


@pytest.mark.parametrize("name", ["clip", "clip-ac"])
def test_baseline_runs_end_to_end_on_the_synthetic_target_set(name, tmp_path):
    from zsadkit.engine import evaluate
    from zsadkit.experiment import RunConfig, load_split

    cfg = RunConfig(out_dir=str(tmp_path))
    samples = [s for s in load_split(cfg, "synth-target") if s.class_name in ("mesh", "bolt")]
    rows = evaluate(build_method(name, image_size=SIZE), samples, dataset="synth-target", image_size=SIZE,
                    batch_size=20, progress=False)
    means = rows[rows["class_name"] == "mean"].set_index(["level", "metric"])["value"]
    assert {("image", "auroc"), ("pixel", "auroc"), ("pixel", "aupro_cflow200")} <= set(means.index)
    assert means.between(0, 1).all()
