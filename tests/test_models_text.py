"""TextEncoder: AnomalyCLIP learned-prompt parity (deep prompts, fp16 rounding), open_clip parity, tokenizer."""

from __future__ import annotations

import pytest
import torch
from conftest import fixture_arrays

from zsadkit.models import TextEncoder, tokenize

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def text(clip):
    return TextEncoder(clip)


@pytest.fixture(scope="module")
def reference():
    return fixture_arrays("text.npz")


def test_tokenizer_gives_the_reference_prompt_ids_and_eot_positions(reference):
    ids = tokenize(["X X X X X X X X X X X X object.", "X X X X X X X X X X X X damaged object."])
    torch.testing.assert_close(ids, reference["tokenized_prompts"].long(), rtol=0, atol=0)
    assert ids.argmax(dim=-1).tolist() == reference["eot_index"].tolist() == [15, 16]


@pytest.mark.parametrize(
    ("fp16_round", "key"), [(True, "text_features_raw"), (False, "text_features_raw_no_fp16_rounding")]
)
def test_learned_prompts_with_deep_prompts_match_encode_text_learn(text, reference, fp16_round, key):
    with torch.no_grad():
        features = text.encode_embeddings(
            reference["prompts"],
            reference["tokenized_prompts"],
            deep_prompts=list(reference["compound_prompts_text"]),
            deep_prompt_fp16_round=fp16_round,
        )
    torch.testing.assert_close(features, reference[key], **TOL)


def test_fp16_rounding_changes_the_features_as_much_as_the_reference_says(text, reference):
    with torch.no_grad():
        kwargs = {"deep_prompts": list(reference["compound_prompts_text"])}
        rounded = text.encode_embeddings(reference["prompts"], reference["tokenized_prompts"], **kwargs)
        exact = text.encode_embeddings(
            reference["prompts"], reference["tokenized_prompts"], deep_prompt_fp16_round=False, **kwargs
        )
    normalise = torch.nn.functional.normalize
    assert 1e-5 < (normalise(rounded, dim=-1) - normalise(exact, dim=-1)).abs().max() < 1e-4  # README: 3.5e-5


def test_deep_prompts_overwrite_tokens_one_to_t_before_layers_two_onwards(text, reference):
    prompts, ids = reference["prompts"], reference["tokenized_prompts"]
    deep = [torch.randn(4, 128), torch.randn(4, 128)]
    with torch.no_grad():
        features = text.encode_embeddings(prompts, ids, deep_prompts=deep, deep_prompt_fp16_round=False)
        # the same computation written out with open_clip's blocks
        hidden = prompts + text.clip.positional_embedding
        for index, block in enumerate(text.blocks):
            if index in (1, 2):
                hidden = hidden.clone()
                hidden[:, 1:5] = deep[index - 1]
            hidden = block(hidden, attn_mask=text.clip.attn_mask)
        expected = text.clip.ln_final(hidden)[torch.arange(2), ids.argmax(-1)] @ text.clip.text_projection
        per_prompt = text.encode_embeddings(
            prompts, ids, deep_prompts=[d.expand(2, 4, 128) for d in deep], deep_prompt_fp16_round=False
        )
    torch.testing.assert_close(features, expected, **TOL)
    torch.testing.assert_close(per_prompt, expected, **TOL)


def test_deep_prompt_gradient_passes_through_the_fp16_cast(text, reference):
    """The reference broadcasts, then casts to fp16: each prompt's gradient is rounded, then summed (README)."""
    prompts, ids = reference["prompts"], reference["tokenized_prompts"]
    single = reference["compound_prompts_text"][0].clone().requires_grad_(True)
    text.encode_embeddings(prompts[:1], ids[:1], deep_prompts=[single]).pow(2).sum().backward()
    assert single.grad is not None and single.grad.abs().max() > 0
    torch.testing.assert_close(single.grad, single.grad.half().float(), rtol=0, atol=0)  # rounded to fp16
    both = reference["compound_prompts_text"][0].clone().requires_grad_(True)
    per_prompt = [text.encode_embeddings(prompts[i : i + 1], ids[i : i + 1], deep_prompts=[both]) for i in range(2)]
    rounded_sum = sum(torch.autograd.grad(f.pow(2).sum(), both)[0] for f in per_prompt)
    text.encode_embeddings(prompts, ids, deep_prompts=[both]).pow(2).sum().backward()
    torch.testing.assert_close(both.grad, rounded_sum, rtol=2e-3, atol=1e-5)  # up to one fp16 ulp


def test_encode_tokens_equals_open_clip_encode_text(clip, text):
    ids = tokenize(["a photo of a normal bottle.", "a photo of an anomalous bottle.", "x"])
    with torch.no_grad():
        torch.testing.assert_close(text.encode_tokens(ids), clip.encode_text(ids), rtol=0, atol=0)
        unprojected = text.encode_tokens(ids, project=False)
    assert unprojected.shape == (3, 128)
    torch.testing.assert_close(unprojected @ clip.text_projection, clip.encode_text(ids), **TOL)


def test_text_adapters_act_after_their_block(text):
    ids = tokenize(["a photo of a damaged bottle."])
    with torch.no_grad():
        adapted = text.encode_tokens(ids, adapters={4: lambda tokens: tokens * 0.0})
        expected = text.clip.ln_final(torch.zeros(1, 128)) @ text.clip.text_projection
    torch.testing.assert_close(adapted, expected, **TOL)


def test_too_many_deep_prompts_or_bad_shapes_are_reported(text, reference):
    with pytest.raises(ValueError, match="at most 3"):
        text.encode_embeddings(
            reference["prompts"], reference["tokenized_prompts"], deep_prompts=[torch.zeros(4, 128)] * 4
        )
    with pytest.raises(ValueError, match="deep prompts must be"):
        text.encode_embeddings(
            reference["prompts"], reference["tokenized_prompts"], deep_prompts=[torch.zeros(4, 64)]
        )
    with pytest.raises(ValueError, match=r"\(P, L, W\)"):
        text.encode_embeddings(reference["prompts"][0], reference["tokenized_prompts"])
