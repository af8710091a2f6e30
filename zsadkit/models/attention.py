"""Head-wise multi-head attention over an open_clip block's weights, with the attention variants of ZSAD papers.

One implementation of the self-attention variants used by the kit (STYLE: "one implementation of each shared
piece"):

* ``"qk"``: the usual softmax(q kᵀ s) v.
* ``"qq"``, ``"kk"``, ``"vv"``: the diagonally prominent variants softmax(q qᵀ s) v, softmax(k kᵀ s) v,
  softmax(v vᵀ s) v (DPAM, AnomalyCLIP Sec. 3.3; `AnomalyCLIP_lib/AnomalyCLIP.py:58-80` @ 45ed4dd). q, k, v include
  their in-projection biases and
  the temperature s = (W/H)^-1/2 is the usual one.

A tuple of modes averages their per-head outputs (e.g. the paper's V-V + Q-Q ablation). Since ``out_proj`` is
affine, averaging before or after it is the same.

Every attention runs through `scaled_attention`: `torch.nn.functional.scaled_dot_product_attention` (never
materialising the N × N weights), or, inside `zsadkit.models.runtime.explicit_attention()`, the formula written
out. `block_forward` runs a whole open_clip residual block the same way (open_clip's `nn.MultiheadAttention` fast
path materialises the weights on CPU: 120 MB per block and image for ViT-L at 518 px).

Per-head outputs are exposed before ``out_proj`` so that heads can be re-weighted (HeadCLIP's learnable head
weights): a `HeadWeighting` is either a tensor of shape (H,) or (B, H), or a callable mapping the per-head outputs
(B, H, N, Dh) to re-weighted outputs of the same shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from zsadkit.models.runtime import attention_kernel

__all__ = [
    "ATTENTION_MODES",
    "block_forward",
    "check_modes",
    "head_attention",
    "merge_heads",
    "project_qkv",
    "scaled_attention",
    "weight_heads",
]

AttentionMode = Literal["qk", "qq", "kk", "vv"]
ATTENTION_MODES: tuple[str, ...] = ("qk", "qq", "kk", "vv")

HeadWeighting = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


def check_modes(modes: Sequence[str]) -> tuple[str, ...]:
    """Validate attention modes and return them as a tuple."""
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    if not modes or any(mode not in ATTENTION_MODES for mode in modes):
        raise ValueError(f"attention modes must be a non-empty subset of {ATTENTION_MODES}, got {modes!r}")
    return modes


def project_qkv(attn: nn.MultiheadAttention, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply the packed in-projection of an ``nn.MultiheadAttention`` and split heads.

    Args:
        attn: the block's attention (``in_proj_weight`` rows ordered q, k, v; heads are contiguous chunks).
        tokens: (B, N, W) normalised tokens (``ln_1`` output).

    Returns:
        q, k, v, each (B, H, N, W/H), biases included.
    """
    batch, length, width = tokens.shape
    heads = attn.num_heads
    packed = F.linear(tokens, attn.in_proj_weight, attn.in_proj_bias)
    packed = packed.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    return packed[0], packed[1], packed[2]


def scaled_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(query keyᵀ / √Dh + mask) value over (B, H, N, Dh) operands: SDPA, or written out when the kernel is
    "explicit" (`zsadkit.models.runtime.explicit_attention`)."""
    if attention_kernel() == "sdpa":
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)
    scores = (query * query.shape[-1] ** -0.5) @ key.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores + attn_mask
    return scores.softmax(dim=-1) @ value


def head_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    modes: Sequence[str] = ("qk",),
    *,
    attn_mask: torch.Tensor | None = None,
    batch_mixing: bool = False,
) -> torch.Tensor:
    """Per-head attention outputs for one mode or the average of several.

    Args:
        q, k, v: (B, H, N, Dh).
        modes: attention variants to average, from ``("qk", "qq", "kk", "vv")``.
        attn_mask: optional additive mask (N, N), e.g. the causal text mask.
        batch_mixing: reproduce AA-CLIP's layout bug (Mwxinnn/AA-CLIP @ 53db195, `model/transformer.py:102-153`: the
            V-V module reads (tokens, batch, width) as (batch, tokens, width)): each token position attends over the
            same position in the *other images of the batch* instead of over its own image's tokens.

    Returns:
        (B, H, N, Dh) per-head outputs, before ``out_proj``.
    """
    modes = check_modes(modes)
    if batch_mixing:
        q, k, v = (tensor.transpose(0, 2) for tensor in (q, k, v))
    operands = {"q": q, "k": k, "v": v}
    outputs = [
        scaled_attention(operands[mode[0]], operands[mode[1]], v, attn_mask=attn_mask) for mode in modes
    ]
    result = outputs[0] if len(outputs) == 1 else torch.stack(outputs).mean(dim=0)
    return result.transpose(0, 2) if batch_mixing else result


def weight_heads(head_outputs: torch.Tensor, weighting: HeadWeighting | None) -> torch.Tensor:
    """Scale each head's output before ``out_proj`` (HeadCLIP's learnable head weights).

    Args:
        head_outputs: (B, H, N, Dh).
        weighting: None (identity), a tensor (H,) or (B, H), or a callable returning (B, H, N, Dh).
    """
    if weighting is None:
        return head_outputs
    if callable(weighting) and not isinstance(weighting, torch.Tensor):
        weighted = weighting(head_outputs)
        if weighted.shape != head_outputs.shape:
            raise ValueError(
                f"head weighting callable must return shape {tuple(head_outputs.shape)}, got {tuple(weighted.shape)}"
            )
        return weighted
    batch, heads = head_outputs.shape[:2]
    if weighting.shape == (heads,):
        return head_outputs * weighting.view(1, heads, 1, 1)
    if weighting.shape == (batch, heads):
        return head_outputs * weighting.view(batch, heads, 1, 1)
    raise ValueError(f"head weights must have shape ({heads},) or ({batch}, {heads}), got {tuple(weighting.shape)}")


def merge_heads(attn: nn.MultiheadAttention, head_outputs: torch.Tensor) -> torch.Tensor:
    """Concatenate heads (B, H, N, Dh) → (B, N, W) and apply the block's ``out_proj``."""
    batch, heads, length, head_dim = head_outputs.shape
    merged = head_outputs.transpose(1, 2).reshape(batch, length, heads * head_dim)
    return F.linear(merged, attn.out_proj.weight, attn.out_proj.bias)


def block_forward(block: nn.Module, hidden: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """An open_clip ``ResidualAttentionBlock`` on (B, N, W) tokens, its attention through `scaled_attention`.

    Equals ``block(hidden, attn_mask=attn_mask)`` (to float rounding): x + ls_1(attn(ln_1(x))), then
    x + ls_2(mlp(ln_2(x))). Under the "module" kernel it is that call.
    """
    if attention_kernel() == "module":
        return block(hidden, attn_mask=attn_mask)
    q, k, v = project_qkv(block.attn, block.ln_1(hidden))
    hidden = hidden + block.ls_1(merge_heads(block.attn, head_attention(q, k, v, ("qk",), attn_mask=attn_mask)))
    return hidden + block.ls_2(block.mlp(block.ln_2(hidden)))
