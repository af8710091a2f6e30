"""The CLIP text tower: hand-written prompts (token ids) and learned prompts (embeddings + deep prompt tokens).

`TextEncoder` wraps the text tower of an open_clip ``CLIP`` (weights shared, not copied).

* `TextEncoder.encode_tokens`: token ids → features; equals open_clip's ``encode_text`` (baselines, CLIP-AC,
  WinCLIP, VAND prompt ensembles).
* `TextEncoder.encode_embeddings`: prompt embeddings (from a prompt learner) → features, with optional deep
  prompts that **overwrite** tokens 1..T before text blocks 2..depth (AnomalyCLIP @ 45ed4dd,
  `AnomalyCLIP_lib/AnomalyCLIP.py:208-246` and ``encode_text_learn``, line 497): x = prompts + positional embedding (input only); before block i (0-indexed),
  1 ≤ i ≤ len(deep), tokens 1..T are replaced by deep[i−1], broadcast over prompts, optionally rounded to
  fp16 and back (the reference's ``.half()`` cast; on by default for parity); ``ln_final``; the end-of-text token
  (argmax of token ids); ``@ text_projection``.

The tokenizer is open_clip's bundled BPE (works offline): `tokenize`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import open_clip
import torch
from torch import nn

__all__ = [
    "TextEncoder",
    "tokenize",
]

Adapter = Callable[[torch.Tensor], torch.Tensor]


def tokenize(texts: str | Sequence[str], context_length: int = 77) -> torch.Tensor:
    """Token ids of CLIP's BPE tokenizer: SOT, tokens, EOT, zero padding.

    Args:
        texts: one string or a list of strings.
        context_length: padded length (77 for CLIP).

    Returns:
        (P, context_length) long tensor; the end-of-text token has the largest id (49407) in each row.
    """
    return open_clip.tokenize(texts, context_length=context_length)


class TextEncoder(nn.Module):
    """Prompt encoding over the text tower of an open_clip ``CLIP``.

    Args:
        clip: open_clip ``CLIP`` (the text tower lives on the model: ``token_embedding``, ``transformer``, ...).
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        required = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")
        missing = [name for name in required if not hasattr(clip, name)]
        if missing:
            raise TypeError(f"TextEncoder needs an open_clip CLIP with a built-in text tower; missing {missing}")
        if not clip.transformer.batch_first:
            raise ValueError("TextEncoder expects the open_clip 3.x batch_first text transformer")
        self.clip = clip

    @property
    def blocks(self) -> nn.ModuleList:
        """Text residual blocks; block ``l`` (1-indexed) is ``blocks[l - 1]``."""
        return self.clip.transformer.resblocks

    @property
    def width(self) -> int:
        """Text transformer width W."""
        return self.clip.transformer.width

    @property
    def context_length(self) -> int:
        return self.clip.positional_embedding.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.clip.text_projection.shape[1]

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings (no positional embedding) of token ids (P, L) → (P, L, W); for prompt learners."""
        return self.clip.token_embedding(token_ids)

    def encode_tokens(
        self,
        token_ids: torch.Tensor,
        *,
        adapters: Mapping[int, Adapter] | None = None,
        project: bool = True,
    ) -> torch.Tensor:
        """Encode tokenised prompts; equals ``clip.encode_text`` when no adapters are given.

        Args:
            token_ids: (P, L) ids from `tokenize`.
            adapters: {1-indexed layer: module} applied to all tokens after that block (AA-CLIP text adapters).
            project: apply ``text_projection`` (False returns the ``ln_final`` EOT feature, (P, W)).

        Returns:
            (P, D) text features, not normalised.
        """
        return self.encode_embeddings(self.embed_tokens(token_ids), token_ids, adapters=adapters, project=project)

    def encode_embeddings(
        self,
        prompt_embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        *,
        deep_prompts: Sequence[torch.Tensor] | None = None,
        deep_prompt_fp16_round: bool = True,
        adapters: Mapping[int, Adapter] | None = None,
        project: bool = True,
    ) -> torch.Tensor:
        """Encode prompt embeddings, with deep prompts overwriting tokens 1..T before blocks 2..len(deep)+1.

        Args:
            prompt_embeddings: (P, L, W) word embeddings of the prompts (learned context included), without
                positional embedding.
            token_ids: (P, L) ids; only used to find the end-of-text token (argmax per row).
            deep_prompts: list of (T, W) or (P, T, W) tensors; entry j overwrites tokens 1..T right before text
                block j + 2 (1-indexed), i.e. before 0-indexed block j + 1 (AnomalyCLIP: depth 9 → 8 tensors,
                layers 2–9). At most ``num_layers − 1`` entries.
            deep_prompt_fp16_round: round deep prompts to fp16 and back before insertion (the reference's
                ``.half()``; its gradient is rounded too). AnomalyCLIP parity: True.
            adapters: {1-indexed layer: module} applied to the tokens after that block (AA-CLIP).
            project: apply ``text_projection``; False returns the ``ln_final`` EOT feature (P, W).

        Returns:
            (P, D) text features (or (P, W) with ``project=False``), not normalised.
        """
        if prompt_embeddings.ndim != 3 or token_ids.shape != prompt_embeddings.shape[:2]:
            raise ValueError(
                f"prompt_embeddings must be (P, L, W) and token_ids (P, L); got {tuple(prompt_embeddings.shape)} "
                f"and {tuple(token_ids.shape)}"
            )
        num_prompts, length, _ = prompt_embeddings.shape
        if length > self.context_length:
            raise ValueError(f"prompts have {length} tokens, the text tower takes at most {self.context_length}")
        deep_prompts = list(deep_prompts or [])
        if len(deep_prompts) > len(self.blocks) - 1:
            raise ValueError(f"{len(deep_prompts)} deep prompts given; the text tower has {len(self.blocks)} layers "
                             f"so at most {len(self.blocks) - 1} fit (before layers 2..{len(self.blocks)})")
        adapters = dict(adapters or {})
        bad = [layer for layer in adapters if not 1 <= layer <= len(self.blocks)]
        if bad:
            raise ValueError(f"adapters: layers are 1-indexed in [1, {len(self.blocks)}], got {bad}")

        hidden = prompt_embeddings + self.clip.positional_embedding[:length].to(prompt_embeddings.dtype)
        attn_mask = self.clip.attn_mask[:length, :length].to(hidden.dtype)
        for index, block in enumerate(self.blocks):
            if 1 <= index <= len(deep_prompts):
                hidden = self._overwrite_with_deep_prompt(hidden, deep_prompts[index - 1], deep_prompt_fp16_round)
            hidden = block(hidden, attn_mask=attn_mask)
            if index + 1 in adapters:
                hidden = adapters[index + 1](hidden)
        hidden = self.clip.ln_final(hidden)
        eot = hidden[torch.arange(num_prompts, device=hidden.device), token_ids.argmax(dim=-1)]
        return eot @ self.clip.text_projection if project else eot

    @staticmethod
    def _overwrite_with_deep_prompt(hidden: torch.Tensor, deep: torch.Tensor, fp16_round: bool) -> torch.Tensor:
        num_prompts = hidden.shape[0]
        if deep.ndim == 2:
            deep = deep.unsqueeze(0).expand(num_prompts, -1, -1)
        if deep.ndim != 3 or deep.shape[0] != num_prompts or deep.shape[-1] != hidden.shape[-1]:
            raise ValueError(f"deep prompts must be (T, W) or (P, T, W) with W={hidden.shape[-1]}, got "
                             f"{tuple(deep.shape)}")
        if 1 + deep.shape[1] > hidden.shape[1]:
            raise ValueError(f"deep prompt of {deep.shape[1]} tokens does not fit in {hidden.shape[1]} positions")
        if fp16_round:
            deep = deep.to(torch.float16).to(hidden.dtype)
        return torch.cat([hidden[:, :1], deep.to(hidden.dtype), hidden[:, 1 + deep.shape[1]:]], dim=1)
