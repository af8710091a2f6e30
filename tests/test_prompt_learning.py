"""The learnable prompts: token layout, contexts per state or shared, object-aware classes, reference init."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from zsadkit.models import tokenize
from zsadkit.prompt_learning import PromptLearner, PromptLearnerConfig

FIXTURES = Path(__file__).parent / "fixtures" / "anomalyclip"


def embedding(width: int = 16, seed: int = 0) -> nn.Embedding:
    generator = torch.Generator().manual_seed(seed)
    return nn.Embedding.from_pretrained(torch.randn(49408, width, generator=generator))


def test_object_agnostic_prompts_have_the_reference_token_ids_and_eot_positions() -> None:
    learner = PromptLearner(embedding(), PromptLearnerConfig(n_ctx=12, deep_depth=3, deep_length=4))
    prompts = learner(["bottle", "screw"])  # class names are ignored for object-agnostic prompts
    assert prompts.num_classes == 1 and prompts.num_states == 2
    expected_normal = [49406] + [343] * 12 + [14115, 269, 49407]
    expected_abnormal = [49406] + [343] * 12 + [13568, 14115, 269, 49407]
    assert prompts.token_ids[0, :16].tolist() == expected_normal
    assert prompts.token_ids[1, :17].tolist() == expected_abnormal
    assert prompts.token_ids.argmax(-1).tolist() == [15, 16]


def test_contexts_replace_the_placeholder_embeddings_and_the_rest_is_frozen_embedding() -> None:
    table = embedding()
    learner = PromptLearner(table, PromptLearnerConfig(n_ctx=3, deep_depth=1, deep_length=0))
    prompts = learner()
    frozen = table(tokenize(learner.prompt_texts([])))
    assert torch.equal(prompts.embeddings[:, 0], frozen[:, 0])
    assert torch.equal(prompts.embeddings[0, 1:4], learner.contexts[0].detach())
    assert torch.equal(prompts.embeddings[1, 1:4], learner.contexts[1].detach())
    assert torch.equal(prompts.embeddings[:, 4:], frozen[:, 4:])
    assert prompts.deep_prompts == []


def test_gradients_reach_only_the_contexts_of_each_state() -> None:
    learner = PromptLearner(embedding(), PromptLearnerConfig(n_ctx=2, deep_depth=2, deep_length=1))
    prompts = learner()
    prompts.embeddings[1].sum().backward()  # the abnormal prompt only
    assert torch.count_nonzero(learner.contexts.grad[0]) == 0
    assert torch.count_nonzero(learner.contexts.grad[1]) == learner.contexts[1].numel()
    assert [name for name, _ in learner.named_parameters()] == ["contexts", "deep_prompts.0"]


def test_shared_context_is_one_tensor_used_by_both_states() -> None:
    learner = PromptLearner(embedding(), PromptLearnerConfig(n_ctx=4, shared_context=True, deep_depth=1))
    assert learner.contexts.shape == (1, 4, 16)
    prompts = learner()
    assert torch.equal(prompts.embeddings[0, 1:5], prompts.embeddings[1, 1:5])


def test_object_aware_prompts_use_class_names_class_major() -> None:
    learner = PromptLearner(embedding(), PromptLearnerConfig(n_ctx=2, class_token=None, deep_depth=1))
    assert learner.prompt_texts(["metal_nut", "pill"]) == [
        "X X metal nut.", "X X damaged metal nut.", "X X pill.", "X X damaged pill."]
    prompts = learner(["metal_nut", "pill"])
    assert prompts.num_classes == 2 and prompts.embeddings.shape[0] == 4
    with pytest.raises(ValueError, match="need at least one class name"):
        learner([])


def test_state_templates_set_the_abnormality_word() -> None:
    learner = PromptLearner(embedding(), PromptLearnerConfig(n_ctx=1, deep_depth=1, state_templates=("{}", "flawed {}")))
    assert learner.prompt_texts([]) == ["X object.", "X flawed object."]


def test_invalid_configurations_are_rejected_with_the_parameter_named() -> None:
    with pytest.raises(ValueError, match="state_templates"):
        PromptLearnerConfig(state_templates=("{}",))
    with pytest.raises(ValueError, match="deep_length"):
        PromptLearnerConfig(n_ctx=2, deep_length=4)


def test_initialisation_after_seed_111_reproduces_the_reference_prompt_learner() -> None:
    reference = np.load(FIXTURES / "prompt_learner_init.npz")
    state = np.load(FIXTURES / "state_dict.npz")
    table = nn.Embedding.from_pretrained(torch.from_numpy(state["token_embedding.weight"]))
    torch.manual_seed(111)
    learner = PromptLearner(table, PromptLearnerConfig(n_ctx=12, deep_depth=3, deep_length=4))
    np.testing.assert_array_equal(learner.contexts[0].detach().numpy(), reference["ctx_pos"][0, 0])
    np.testing.assert_array_equal(learner.contexts[1].detach().numpy(), reference["ctx_neg"][0, 0])
    for index in range(2):
        np.testing.assert_array_equal(learner.deep_prompts[index].detach().numpy(),
                                      reference[f"compound_prompts_text.{index}"])
