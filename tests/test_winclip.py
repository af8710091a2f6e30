"""WinCLIP / WinCLIP+: window masks, harmonic aggregation, masked-token windows, score fusion, profiles."""

import pytest
import torch
import torch.nn.functional as F

from zsadkit.engine import evaluate_few_shot, sample_references
from zsadkit.experiment import RunConfig, load_split
from zsadkit.methods.base import build_method
from zsadkit.methods.winclip import (
    WinClip,
    WinClipConfig,
    harmonic_aggregation,
    harmonic_mean,
    visual_association,
    window_count,
)
from zsadkit.models import load_clip, sliding_windows
from zsadkit.prompts import class_phrase

SIZE = 80  # zsad-tiny: patch 16 → 5×5 grid, 16 small and 9 mid windows


@pytest.fixture(scope="module")
def clip():
    return load_clip("zsad-tiny", image_size=SIZE, seed=5)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_window_masks_on_a_3x3_grid_by_hand():
    assert sliding_windows(3, 2).tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    assert sliding_windows(3, 3).tolist() == [list(range(9))]
    assert window_count(15, (2, 3)) == 196 + 169


def test_harmonic_aggregation_on_a_hand_case():
    scores = torch.tensor([[1.0, 0.75, 0.5, 0.25]])
    aggregated = harmonic_aggregation(scores, sliding_windows(3, 2), 3)
    # patch 1 is in windows 0, 1: 2 / (1/1 + 1/0.75); the centre in all four: 4 / (1 + 4/3 + 2 + 4).
    expected = torch.tensor([[1.0, 2 / (1 + 4 / 3), 0.75],
                             [2 / (1 + 2), 4 / (1 + 4 / 3 + 2 + 4), 2 / (4 / 3 + 4)],
                             [0.5, 2 / (2 + 4), 0.25]])
    assert torch.allclose(aggregated[0], expected, atol=1e-6)


def test_a_zero_window_score_zeroes_every_patch_it_covers():
    aggregated = harmonic_aggregation(torch.tensor([[1.0, 0.0, 0.5, 0.25]]), sliding_windows(3, 2), 3)[0]
    assert aggregated[0, 1] == 0 and aggregated[0, 2] == 0 and aggregated[1, 1] == 0 and aggregated[1, 2] == 0
    assert aggregated[2, 2] == 0.25  # window 1 (patches 1, 2, 4, 5) does not cover it
    assert aggregated[0, 0] == 1.0


def test_harmonic_mean_across_scales():
    maps = [torch.full((1, 2, 2), 0.5), torch.full((1, 2, 2), 0.25), torch.full((1, 2, 2), 1.0)]
    assert torch.allclose(harmonic_mean(maps), torch.full((1, 2, 2), 3 / (2 + 4 + 1)))


def test_window_embedding_runs_the_vit_on_cls_plus_the_window_tokens_only(clip, images):
    winclip = WinClip(clip)
    features = winclip.encode(images)
    visual = clip.visual
    with torch.no_grad():
        patches = visual.conv1(images).flatten(2).transpose(1, 2)
        tokens = torch.cat([visual.class_embedding.expand(2, 1, -1), patches], dim=1) + visual.positional_embedding
        window = sliding_windows(5, 3)[4]  # the centre 3×3 window
        sequence = visual.ln_pre(torch.cat([tokens[:, :1], tokens[:, 1 + window]], dim=1))
        expected = visual.ln_post(visual.transformer(sequence)[:, 0]) @ visual.proj
    assert torch.allclose(features.window_embeddings[1][:, 4], expected, atol=1e-5)


def test_batched_windows_equal_one_forward_per_window(clip, images):
    winclip = WinClip(clip, WinClipConfig(windows_per_pass=7))  # forces several chunks
    batched = winclip.encode(images).window_embeddings[0]
    with torch.no_grad():
        one_by_one = torch.cat([winclip.visual.encode_windows(images, w[None]) for w in winclip.windows[0]], dim=1)
    assert torch.allclose(batched, one_by_one, atol=1e-5)


def test_zero_shot_image_score_is_softmax_over_the_ensemble_embeddings(clip, images):
    winclip = WinClip(clip)
    scores = winclip.predict(images, ["metal_nut", "metal_nut"]).image_scores
    with torch.no_grad():
        image = F.normalize(clip.encode_image(images), dim=-1)
    text = winclip.text_features("metal_nut")
    assert torch.allclose(scores, (image @ text.T / 0.01).softmax(dim=-1)[:, 1], atol=1e-5)


def test_zero_shot_map_is_the_harmonic_mean_of_small_mid_and_image_scales(clip, images):
    winclip = WinClip(clip)
    text = winclip.text_features("x").expand(2, 2, -1)
    features = winclip.encode(images)
    image_scores, patch_map = winclip.zero_shot(features, text)
    small = harmonic_aggregation(winclip.text_scores(features.window_embeddings[0], text), winclip.windows[0], 5)
    mid = harmonic_aggregation(winclip.text_scores(features.window_embeddings[1], text), winclip.windows[1], 5)
    expected = 3 / (1 / small + 1 / mid + 1 / image_scores[:, None, None])
    assert torch.allclose(patch_map, expected, atol=1e-6)
    upsampled = F.interpolate(expected[:, None], size=SIZE, mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(winclip.predict(images, ["x", "x"]).anomaly_maps, upsampled, atol=1e-5)


def test_visual_association_is_half_the_cosine_distance_to_the_nearest_memory_item():
    queries = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    memory = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    expected = torch.tensor([[0.0, 0.5 * (1 - 2**-0.5)]])
    assert torch.allclose(visual_association(queries, memory), expected, atol=1e-6)


@pytest.mark.parametrize(("fusion", "factor"), [("mean", 0.5), ("sum", 1.0)])
def test_few_shot_fusion_with_the_query_as_its_own_reference(clip, images, fusion, factor):
    winclip = WinClip(clip, WinClipConfig(few_shot_map=fusion))
    zero_shot = winclip.predict(images[:1], ["x"])
    winclip.fit_references(images[:1])
    assert winclip.memory.num_references == 1
    few_shot = winclip.predict(images[:1], ["x"])
    # M_W = 0 everywhere: image score ½·(ascore₀ + 0), map ½·(zero-shot + 0) or zero-shot + 0.
    assert torch.allclose(few_shot.image_scores, 0.5 * zero_shot.image_scores, atol=1e-5)
    assert torch.allclose(few_shot.anomaly_maps, factor * zero_shot.anomaly_maps, atol=1e-5)
    other = winclip.predict(images[1:], ["x"])
    winclip.clear_references()
    assert other.image_scores > 0.5 * winclip.predict(images[1:], ["x"]).image_scores


@pytest.mark.parametrize("profile, temperature", [("mala", 0.01), ("anomalib", 0.07)])
def test_profile_image_score_is_the_softmax_at_its_temperature_by_hand(clip, images, profile, temperature):
    winclip = WinClip(clip, WinClipConfig.from_profile(profile))
    global_embedding = F.normalize(winclip.encode(images).image_embedding, dim=-1)  # (B, D)
    text = winclip.text_features("x")  # (2, D): normal, anomalous
    cosines = global_embedding @ text.T
    by_hand = 1.0 / (1.0 + torch.exp((cosines[:, 0] - cosines[:, 1]) / temperature))  # 2-way softmax, Eq. 1
    assert torch.allclose(winclip.predict(images, ["x", "x"]).image_scores, by_hand, atol=1e-6)


def test_profiles_differ_in_prompts_temperature_and_prompt_normalisation(clip, images):
    mala, anomalib = (WinClip(clip, WinClipConfig.from_profile(name)) for name in ("mala", "anomalib"))
    assert (mala.config.prompts, mala.config.temperature, mala.config.normalize_prompts) == ("winclip", 0.01, True)
    assert (anomalib.config.prompts, anomalib.config.temperature, anomalib.config.normalize_prompts) == (
        "winclip-21", 0.07, False)
    assert not torch.allclose(mala.text_features("x"), anomalib.text_features("x"), atol=1e-4)
    assert not torch.allclose(mala.predict(images, ["x", "y"]).image_scores,
                              anomalib.predict(images, ["x", "y"]).image_scores, atol=1e-4)


def test_reference_draw_is_seeded_and_without_replacement(tmp_path):
    train = load_split(RunConfig(out_dir=str(tmp_path)), "synth-target", split="train")
    first = sample_references(train, "coin", 4, seed=3)
    assert first == sample_references(train, "coin", 4, seed=3)
    assert len({s.image for s in first}) == 4 and all(s.class_name == "coin" and s.label == 0 for s in first)
    with pytest.raises(ValueError, match="normal training images"):
        sample_references(train, "coin", 1000)


def test_winclip_and_winclip_plus_run_end_to_end_on_synthetic_data(tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path))
    test = [s for s in load_split(cfg, "synth-target") if s.class_name in ("coin", "mesh")]
    train = load_split(cfg, "synth-target", split="train")
    winclip = build_method("winclip", backbone="zsad-tiny", image_size=SIZE)
    rows = evaluate_few_shot(winclip, test, train, shots=2, dataset="synth-target", image_size=SIZE,
                             batch_size=20, pro=None)
    means = rows[rows["class_name"] == "mean"].set_index(["level", "metric"])["value"]
    assert {("image", "auroc"), ("pixel", "auroc")} <= set(means.index) and means.between(0, 1).all()
    assert winclip.memory.num_references == 2


def test_bad_configs_are_rejected(clip):
    with pytest.raises(KeyError, match="profile"):
        WinClipConfig.from_profile("nope")
    with pytest.raises(ValueError, match="few_shot_map"):
        WinClipConfig(few_shot_map="max")
    with pytest.raises(ValueError, match="do not fit"):
        WinClip(clip, WinClipConfig(scales=(2, 6)))


def test_each_profile_names_the_class_as_its_implementation_does(clip):
    """mala-lab (and InCTRL) write "metal nut"; anomalib 2.7 and zqhang/WinCLIP-pytorch keep "metal_nut"."""
    expected = {"mala": True, "anomalib": False, "zqhang": False}
    for profile, replaces in expected.items():
        winclip = WinClip(clip, WinClipConfig.from_profile(profile))
        assert winclip.config.replace_underscores is replaces, profile
        sentence = winclip.ensemble.sentences(class_phrase("metal_nut", winclip.config.replace_underscores),
                                              "anomalous")[0]
        assert ("metal nut" if replaces else "metal_nut") in sentence, (profile, sentence)
    anomalib = WinClip(clip, WinClipConfig.from_profile("anomalib"))
    assert not torch.allclose(anomalib.text_features("metal_nut"), anomalib.text_features("metal nut"), atol=1e-4)
