"""Learnable text prompts: context vectors per state and deep prompts (AnomalyCLIP Sec. 3.2, CoOp, HeadCLIP).

A prompt for state s (normal, abnormal, ...) and class name c is the token sequence

    [SOT] [V^s_1] ... [V^s_E] <template_s.format(c)> . [EOT]

whose E placeholder words ("X") are replaced by learnable context vectors V^s (Eq. 2/3 of AnomalyCLIP). The
text encoder additionally receives `depth − 1` deep prompts of `length` tokens each, shared by all prompts,
which overwrite tokens 1..length before text layers 2..depth ("prefix overwriting": AnomalyCLIP @ 45ed4dd,
`AnomalyCLIP_lib/AnomalyCLIP.py:208-246`; issues #21, #75).

Options:
    * `class_token="object"` gives AnomalyCLIP's object-agnostic prompts; `class_token=None` puts each
      image's class name there (object-aware prompts, CoOp).
    * `shared_context=False` (AnomalyCLIP default): one context per state (V ≠ W); True: one context for all
      states (AnomalyCLIP Table 9, CoOp's unified context).
    * `state_templates`: the words around the class name per state, e.g. ("{}", "damaged {}"); the
      abnormality word ablation (AnomalyCLIP Table 13) changes "damaged".

Initialisation follows the reference `AnomalyCLIP_PromptLearner`: N(0, 0.02²) for each state's context in
state order, then for each deep prompt, drawn from the global torch RNG in that order (so
`torch.manual_seed(111)` before construction reproduces the reference's initial values).

Example:
    >>> from torch import nn
    >>> learner = PromptLearner(nn.Embedding(49408, 16), PromptLearnerConfig(n_ctx=4, deep_depth=3, deep_length=2))
    >>> prompts = learner(["object"])
    >>> prompts.embeddings.shape, prompts.token_ids.shape, len(prompts.deep_prompts)
    (torch.Size([2, 77, 16]), torch.Size([2, 77]), 2)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "default_tokenizer",
    "LearnedPrompts",
    "PLACEHOLDER_WORD",
    "PromptLearner",
    "PromptLearnerConfig",
]

PLACEHOLDER_WORD = "X"


def default_tokenizer(texts: Sequence[str]) -> torch.Tensor:
    """OpenAI BPE token ids (B, 77) via open_clip (ids equal the reference `simple_tokenizer`)."""
    import open_clip

    return open_clip.tokenize(list(texts))


@dataclass(frozen=True)
class PromptLearnerConfig:
    """Shape of the learnable prompts.

    Attributes:
        n_ctx: E, learnable context words per prompt (AnomalyCLIP "Prompt_length" 12).
        deep_depth: text layers receiving learnable tokens, counting the input layer (AnomalyCLIP
            "learnabel_text_embedding_depth" 9); `deep_depth − 1` deep prompts are created. 1 = none.
        deep_length: tokens per deep prompt (AnomalyCLIP "learnabel_text_embedding_length", t_n_ctx 4).
        state_templates: one template per state, normal first; "{}" is replaced by the class token.
        class_token: the word in every prompt ("object"), or None to use each class name (object-aware).
        shared_context: one context for all states instead of one per state.
        init_std: standard deviation of the normal initialisation.
    """

    n_ctx: int = 12
    deep_depth: int = 9
    deep_length: int = 4
    state_templates: tuple[str, ...] = ("{}", "damaged {}")
    class_token: str | None = "object"
    shared_context: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_ctx < 0 or self.deep_depth < 1 or self.deep_length < 0:
            raise ValueError(
                f"PromptLearnerConfig: n_ctx >= 0, deep_depth >= 1 and deep_length >= 0 are required, got "
                f"n_ctx={self.n_ctx}, deep_depth={self.deep_depth}, deep_length={self.deep_length}"
            )
        if len(self.state_templates) < 2 or any("{}" not in t for t in self.state_templates):
            raise ValueError(
                f"PromptLearnerConfig.state_templates needs >= 2 templates each containing '{{}}', "
                f"got {self.state_templates}"
            )
        if self.deep_depth > 1 and self.deep_length > self.n_ctx:
            raise ValueError(
                f"deep_length ({self.deep_length}) > n_ctx ({self.n_ctx}): deep prompts would overwrite class words"
            )

    @property
    def num_states(self) -> int:
        return len(self.state_templates)


@dataclass
class LearnedPrompts:
    """Inputs of the text encoder for every (class, state) pair.

    Attributes:
        embeddings: (C·K, L, W) token embeddings with the contexts in place, class-major then state
            (row c·K + k = class c, state k).
        token_ids: (C·K, L) token ids (the EOT position is their argmax).
        deep_prompts: `deep_depth − 1` tensors (deep_length, W), for text layers 2..deep_depth.
        num_classes: C.
        num_states: K.
    """

    embeddings: torch.Tensor
    token_ids: torch.Tensor
    deep_prompts: list[torch.Tensor]
    num_classes: int
    num_states: int


class PromptLearner(nn.Module):
    """Learnable contexts and deep prompts around frozen CLIP token embeddings.

    Args:
        token_embedding: the CLIP text token embedding (frozen; only read).
        config: `PromptLearnerConfig`.
        tokenizer: texts → (B, 77) ids; defaults to the OpenAI BPE.

    Parameters (the trainable state):
        contexts: (K or 1, E, W), one context per state unless `shared_context`.
        deep_prompts: ParameterList of `deep_depth − 1` tensors (deep_length, W).
    """

    def __init__(
        self,
        token_embedding: nn.Embedding,
        config: PromptLearnerConfig | None = None,
        tokenizer: Callable[[Sequence[str]], torch.Tensor] = default_tokenizer,
    ) -> None:
        super().__init__()
        self.config = config or PromptLearnerConfig()
        self.tokenizer = tokenizer
        # A plain attribute (not a submodule), so the frozen CLIP weights are not part of this module's state.
        self.__dict__["token_embedding"] = token_embedding
        width = token_embedding.weight.shape[1]
        num_contexts = 1 if self.config.shared_context else self.config.num_states
        contexts = []
        for _ in range(num_contexts):  # drawn one state at a time, as the reference draws ctx_pos then ctx_neg
            context = torch.empty(self.config.n_ctx, width)
            nn.init.normal_(context, std=self.config.init_std)
            contexts.append(context)
        self.contexts = nn.Parameter(torch.stack(contexts))
        deep = []
        for _ in range(self.config.deep_depth - 1):
            prompt = torch.empty(self.config.deep_length, width)
            nn.init.normal_(prompt, std=self.config.init_std)
            deep.append(nn.Parameter(prompt))
        self.deep_prompts = nn.ParameterList(deep)
        self._token_cache: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def width(self) -> int:
        return self.contexts.shape[-1]

    def prompt_texts(self, class_names: Sequence[str]) -> list[str]:
        """The tokenizer inputs, class-major then state: "X X ... X damaged object." (E placeholders)."""
        prefix = " ".join([PLACEHOLDER_WORD] * self.config.n_ctx)
        texts = []
        for name in self._prompt_classes(class_names):
            for template in self.config.state_templates:
                words = template.format(name)
                texts.append(f"{prefix} {words}." if prefix else f"{words}.")
        return texts

    def _prompt_classes(self, class_names: Sequence[str]) -> list[str]:
        if self.config.class_token is not None:
            return [self.config.class_token]
        if not class_names:
            raise ValueError("object-aware prompts (class_token=None) need at least one class name")
        return [name.replace("_", " ") for name in class_names]

    def _frozen_tokens(self, class_names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (P, L) and their frozen embeddings (P, L, W) for the prompt texts, cached per class list."""
        key = tuple(self._prompt_classes(class_names))
        if key not in self._token_cache:
            token_ids = self.tokenizer(self.prompt_texts(class_names)).to(self.token_embedding.weight.device)
            with torch.no_grad():
                embedded = self.token_embedding(token_ids).float()
            self._token_cache[key] = (token_ids, embedded)
        return self._token_cache[key]

    def forward(self, class_names: Sequence[str] = ()) -> LearnedPrompts:
        """Prompt embeddings for the given classes (ignored for a fixed `class_token`).

        Returns:
            `LearnedPrompts` with C = 1 for object-agnostic prompts, else C = number of class names.
        """
        token_ids, embedded = self._frozen_tokens(class_names)
        token_ids, embedded = token_ids.to(self.contexts.device), embedded.to(self.contexts.device)
        num_states = self.config.num_states
        num_prompts = token_ids.shape[0]
        state_index = torch.arange(num_prompts, device=self.contexts.device) % num_states
        contexts = self.contexts[state_index if not self.config.shared_context else torch.zeros_like(state_index)]
        n_ctx = self.config.n_ctx
        embeddings = torch.cat([embedded[:, :1], contexts.to(embedded.dtype), embedded[:, 1 + n_ctx :]], dim=1)
        return LearnedPrompts(
            embeddings=embeddings,
            token_ids=token_ids,
            deep_prompts=list(self.deep_prompts),
            num_classes=num_prompts // num_states,
            num_states=num_states,
        )
