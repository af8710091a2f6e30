"""The baselines' prompt lists and the ensembling of sentence embeddings into class embeddings."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zsadkit.prompts import (
    CLIP_IMAGENET_TEMPLATES,
    PROMPT_ENSEMBLES,
    STATES,
    VAND_TEMPLATES,
    WINCLIP_TEMPLATES,
    WINCLIP_TEMPLATES_21,
    PromptEnsemble,
    class_phrase,
    class_text_features,
    ensemble_text_features,
    prompt_ensemble,
)

FIXTURE = "tests/fixtures/vand/text_prompts.npz"


@pytest.mark.parametrize(
    ("name", "normal", "anomalous"),
    [("clip", 1, 1), ("clip-ac", 80, 80), ("winclip", 7 * 22, 4 * 22), ("winclip-21", 7 * 21, 4 * 21),
     ("vand", 7 * 35, 5 * 35)],
)
def test_ensemble_sizes_match_the_papers(name, normal, anomalous):
    ensemble = prompt_ensemble(name)
    assert len(ensemble.sentences("bottle", "normal")) == normal
    assert len(ensemble.sentences("bottle", "anomalous")) == anomalous


def test_clip_prompts_are_the_anomalyclip_appendix_wording():
    clip = PROMPT_ENSEMBLES["clip"]
    assert clip.sentences("metal nut", "normal") == ["a photo of a normal metal nut"]
    assert clip.sentences("metal nut", "anomalous") == ["a photo of an anomalous metal nut"]


def test_clip_ac_uses_the_80_imagenet_templates_around_the_state_word():
    assert len(set(CLIP_IMAGENET_TEMPLATES)) == 80
    sentences = PROMPT_ENSEMBLES["clip-ac"].sentences("pill", "anomalous")
    assert "a bad photo of a anomalous pill." in sentences
    assert "itap of my anomalous pill." in sentences


def test_winclip_template_lists_relate_as_the_spec_says():
    assert len(WINCLIP_TEMPLATES) == len(set(WINCLIP_TEMPLATES)) == 22
    assert len(WINCLIP_TEMPLATES_21) == 21 and len(set(WINCLIP_TEMPLATES_21)) == 20
    assert WINCLIP_TEMPLATES_21.count("a jpeg corrupted photo of the {}.") == 2
    assert set(WINCLIP_TEMPLATES) - set(WINCLIP_TEMPLATES_21) == {
        "a cropped photo of a {}.", "a jpeg corrupted photo of a {}."}
    assert len(set(WINCLIP_TEMPLATES) & set(CLIP_IMAGENET_TEMPLATES)) == 18


def test_vand_sentences_equal_the_reference_fixture_in_order():
    reference = [str(s) for s in np.load(FIXTURE)["sentences"]]
    vand = PROMPT_ENSEMBLES["vand"]
    ours = [s for name in ("candle", "metal_nut") for state in STATES
            for s in vand.sentences(class_phrase(name, replace_underscores=False), state)]
    assert ours == reference
    assert len(set(VAND_TEMPLATES) & set(CLIP_IMAGENET_TEMPLATES)) == 30


def test_class_phrase_replaces_underscores_unless_asked_not_to():
    assert class_phrase("metal_nut") == "metal nut"
    assert class_phrase("metal_nut", replace_underscores=False) == "metal_nut"


def test_normalised_averaging_is_the_mean_of_unit_vectors_renormalised():
    features = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    expected = F.normalize(torch.tensor([0.5, 0.5]), dim=0)
    assert torch.allclose(ensemble_text_features(features, normalize_prompts=True), expected)


def test_raw_averaging_weights_long_embeddings_more():
    features = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    expected = F.normalize(torch.tensor([1.5, 0.5]), dim=0)
    assert torch.allclose(ensemble_text_features(features, normalize_prompts=False), expected)


def test_class_text_features_encodes_each_state_group_once_and_stacks_normal_first():
    calls = []

    def encode(sentences):
        calls.append(list(sentences))
        anomalous = any("damaged" in s for s in sentences)
        return torch.tensor([[0.0, 2.0]] if anomalous else [[1.0, 0.0]]).repeat(len(sentences), 1)

    features = class_text_features(encode, PROMPT_ENSEMBLES["winclip"], "metal_nut")
    assert torch.allclose(features, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert [len(c) for c in calls] == [154, 88]
    assert calls[1][0] == "a cropped photo of the damaged metal nut."


def test_bad_ensembles_and_names_are_rejected_with_clear_errors():
    with pytest.raises(ValueError, match="exactly one"):
        PromptEnsemble("bad", ("{} {}",), ("x {}",), ("{}",))
    with pytest.raises(KeyError, match="known"):
        prompt_ensemble("nope")
    with pytest.raises(ValueError, match="state must be"):
        PROMPT_ENSEMBLES["clip"].sentences("x", "broken")
    with pytest.raises(ValueError, match=r"\(P, D\)"):
        ensemble_text_features(torch.zeros(0, 4))
