"""The CLIP image tower with the hooks ZSAD methods need: layer taps, attention variants, head weights, adapters.

`VisualEncoder` wraps an open_clip ``VisionTransformer`` (``model.visual``, ``batch_first=True`` in open_clip 3.x)
without copying its weights. One forward returns, for a list of 1-indexed layers, the tokens after those blocks
(raw, through ``ln_post``, or through ``ln_post`` and ``proj``) and the global embedding (with or without
``ln_post``). Attention variants (DPAM's V-V and friends) are configured by an `AttentionVariant`:

* ``path="dual"`` (AnomalyCLIP DPAM, Sec. 3.3; `AnomalyCLIP_lib/AnomalyCLIP.py:58-160, 345` @ 45ed4dd; the
  CLIP-Surgery design): from ``first_layer`` on, a second
  stream accumulates the variant attention computed from ``ln_1`` of the *unmodified* stream, with no MLP and no
  LayerNorm of its own: ``x_side = h^(f-1) + Σ_{k=f..l} Out_k(variant(ln_1(h^(k-1))))``. The original stream is
  standard CLIP, so the global embedding is unchanged. Tapped layers ≥ ``first_layer`` return the side stream.
* ``path="single"`` (AA-CLIP stage 1): the variant replaces the attention in the residual stream, MLP kept.

A forward can stop before a block (`VisualEncoder.stream_state`) and resume there later
(`VisualEncoder.forward(start=...)`), with the same result as one full forward: methods that train parameters
inside the tower from some block on (HeadCLIP's head weights) cache the frozen blocks before it.

Every attention runs through `zsadkit.models.attention.scaled_attention` (SDPA, or the explicit formula for parity
checks); the tower runs in the precision of `zsadkit.models.runtime` (autocast) and returns float32 tensors.

Layers are 1-indexed, as in the papers. Nothing here is wrapped in ``torch.no_grad()``: callers that freeze the
tower (AnomalyCLIP) wrap the call themselves; methods that train adapters inside it need the graph.

Example:
    >>> from zsadkit.models import load_clip, VisualEncoder, AttentionVariant
    >>> encoder = VisualEncoder(load_clip("zsad-tiny", image_size=112))
    >>> out = encoder(torch.zeros(2, 3, 112, 112), layers=[4], global_ln_post=False,
    ...               attention=AttentionVariant(("vv",), first_layer=2))
    >>> out.layer_tokens[0].shape, out.global_embedding.shape
    (torch.Size([2, 50, 32]), torch.Size([2, 32]))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from zsadkit.models.attention import (
    HeadWeighting,
    block_forward,
    check_modes,
    head_attention,
    merge_heads,
    project_qkv,
    weight_heads,
)
from zsadkit.models.runtime import attention_kernel, tower_autocast

__all__ = [
    "AttentionVariant",
    "sliding_windows",
    "VisualEncoder",
    "VisualFeatures",
]

TokenOutput = Literal["raw", "ln_post", "projected"]
Adapter = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttentionVariant:
    """Which attention variant to run from which layer on, and how it enters the network.

    Attributes:
        modes: variants from ``("qk", "qq", "kk", "vv")``; several are averaged (e.g. ``("vv", "qq")``).
        first_layer: first 1-indexed layer using the variant; it applies to all later layers too. A value
            larger than the number of layers switches the variant off.
        path: ``"dual"`` (AnomalyCLIP DPAM: a side stream, no MLP, the original stream untouched) or
            ``"single"`` (AA-CLIP: the variant replaces the residual-stream attention, MLP kept).
        batch_mixing: reproduce AA-CLIP's layout bug, where the variant attention runs across the images of the
            batch at each token position (Mwxinnn/AA-CLIP @ 53db195, `model/transformer.py:102-153`). Off = the
            correct per-image attention.
    """

    modes: tuple[str, ...] = ("vv",)
    first_layer: int = 1
    path: Literal["dual", "single"] = "dual"
    batch_mixing: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "modes", check_modes(self.modes))
        if self.first_layer < 1:
            raise ValueError(f"AttentionVariant.first_layer is 1-indexed, got {self.first_layer}")
        if self.path not in ("dual", "single"):
            raise ValueError(f"AttentionVariant.path must be 'dual' or 'single', got {self.path!r}")

    @classmethod
    def from_dpam_layer(cls, dpam_layer: int, num_layers: int, modes: Sequence[str] = ("vv",)) -> AttentionVariant:
        """The dual-path variant that AnomalyCLIP's ``DAPM_replace(DPAM_layer=dpam_layer)`` builds.

        The reference replaces the last ``dpam_layer - 1`` blocks, so the first DPAM layer is
        ``num_layers - dpam_layer + 2`` (ViT-L: ``DPAM_layer=20`` → layer 6; ``DPAM_layer=1`` → none).
        """
        if dpam_layer < 1:
            raise ValueError(f"DPAM_layer must be >= 1, got {dpam_layer}")
        return cls(tuple(modes), first_layer=max(1, num_layers - dpam_layer + 2), path="dual")


@dataclass
class VisualFeatures:
    """Output of `VisualEncoder.forward`.

    Attributes:
        layers: the tapped 1-indexed layers, in the order asked for.
        layer_tokens: one (B, 1+N, C) tensor per tapped layer, CLS token at index 0; C = W for ``"raw"`` and
            ``"ln_post"``, D for ``"projected"``. Side stream for dual-path layers ≥ ``first_layer``.
        global_embedding: (B, D) CLS of the final original stream (@ proj, with or without ``ln_post``);
            None when ``return_global=False``.
        final_tokens: (B, 1+N, W) raw output of the last block (original stream); None when stopped early.
    """

    layers: tuple[int, ...]
    layer_tokens: tuple[torch.Tensor, ...]
    global_embedding: torch.Tensor | None
    final_tokens: torch.Tensor | None

    @property
    def patch_tokens(self) -> tuple[torch.Tensor, ...]:
        """The tapped tokens without the CLS token: one (B, N, C) tensor per layer."""
        return tuple(tokens[:, 1:] for tokens in self.layer_tokens)


@dataclass
class StreamState:
    """The stream(s) entering block `next_layer`: where a forward stopped by `VisualEncoder.stream_state` resumes.

    Attributes:
        next_layer: the first 1-indexed block still to run.
        hidden: (B, 1+N, W) residual stream after block ``next_layer - 1`` (the `embed` output when 1).
        side: (B, 1+N, W) dual-path side stream after block ``next_layer - 1``; None when no dual-path variant
            is active before ``next_layer``.
    """

    next_layer: int
    hidden: torch.Tensor
    side: torch.Tensor | None = None


def sliding_windows(grid_size: int, window: int, stride: int = 1) -> torch.Tensor:
    """Patch indices of all square windows on a G×G patch grid (row-major windows, row-major inside).

    Args:
        grid_size: patch-grid side G.
        window: window side in patches (WinCLIP: 2 and 3).
        stride: step in patches.

    Returns:
        (num_windows, window²) long tensor of indices into the N = G² patch tokens (CLS excluded).
    """
    if not 1 <= window <= grid_size or stride < 1:
        raise ValueError(f"window must be in [1, {grid_size}] and stride >= 1, got window={window}, stride={stride}")
    grid = torch.arange(grid_size * grid_size).view(grid_size, grid_size)
    patches = grid.unfold(0, window, stride).unfold(1, window, stride)  # (nh, nw, window, window)
    return patches.reshape(-1, window * window)


class VisualEncoder(nn.Module):
    """Hookable forward over an open_clip ViT image tower (weights shared with the wrapped model).

    Args:
        clip: an open_clip ``CLIP`` (its ``.visual`` is used) or a ``VisionTransformer``.
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        visual = getattr(clip, "visual", clip)
        if not isinstance(visual, VisionTransformer):
            raise TypeError(f"VisualEncoder needs an open_clip VisionTransformer, got {type(visual).__name__}")
        if not visual.transformer.batch_first:
            raise ValueError("VisualEncoder expects the open_clip 3.x batch_first vision transformer")
        if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
            raise ValueError("VisualEncoder supports class-token pooling only (CLIP ViTs), not attentional/avg pooling")
        if not all(isinstance(block, ResidualAttentionBlock) for block in visual.transformer.resblocks):
            raise ValueError("VisualEncoder supports the default open_clip ResidualAttentionBlock only")
        self.visual = visual

    @property
    def blocks(self) -> nn.ModuleList:
        """The residual attention blocks; block ``l`` (1-indexed) is ``blocks[l - 1]``."""
        return self.visual.transformer.resblocks

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def width(self) -> int:
        """Transformer width W."""
        return self.visual.transformer.width

    @property
    def num_heads(self) -> int:
        return self.blocks[0].attn.num_heads

    @property
    def embed_dim(self) -> int:
        """Joint embedding dimension D (columns of ``proj``)."""
        return self.visual.proj.shape[1]

    @property
    def grid_size(self) -> int:
        """Patch-grid side G at the current image size."""
        return self.visual.grid_size[0]

    @property
    def image_size(self) -> int:
        return self.visual.image_size[0]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch + class embedding, positional embedding and ``ln_pre``.

        Args:
            images: (B, 3, S, S) normalised images, S = the size the model was loaded for.

        Returns:
            (B, 1 + N, W) tokens entering block 1, CLS first.
        """
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != self.visual.image_size:
            raise ValueError(
                f"images must be (B, 3, {self.image_size}, {self.image_size}) for this model "
                f"(load_clip(image_size=...) sets the size), got {tuple(images.shape)}"
            )
        visual = self.visual
        patches = visual.conv1(images.to(visual.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, W)
        class_token = visual.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        tokens = torch.cat([class_token, patches], dim=1) + visual.positional_embedding.to(patches.dtype)
        return visual.ln_pre(visual.patch_dropout(tokens))

    def project_tokens(self, tokens: torch.Tensor, output: TokenOutput = "projected") -> torch.Tensor:
        """Map residual-stream tokens (..., W) to ``"raw"`` (unchanged), ``"ln_post"`` or ``"projected"`` (..., D)."""
        if output == "raw":
            return tokens
        if output == "ln_post":
            return self.visual.ln_post(tokens)
        if output == "projected":
            return self.visual.ln_post(tokens) @ self.visual.proj
        raise ValueError(f"tokens must be 'raw', 'ln_post' or 'projected', got {output!r}")

    def forward(
        self,
        images: torch.Tensor | None,
        layers: Sequence[int] = (),
        *,
        tokens: TokenOutput = "projected",
        global_ln_post: bool = True,
        attention: AttentionVariant | None = None,
        head_weights: Mapping[int, HeadWeighting] | None = None,
        side_head_weights: Mapping[int, HeadWeighting] | None = None,
        adapters: Mapping[int, Adapter] | None = None,
        return_global: bool = True,
        start: StreamState | None = None,
    ) -> VisualFeatures:
        """Run the image tower once, batched, and return tapped layers and the global embedding.

        Args:
            images: (B, 3, S, S) normalised images; None when resuming from `start`.
            layers: 1-indexed blocks whose output to return (AnomalyCLIP: ``[24]``; VAND: ``[6, 12, 18, 24]``).
            tokens: ``"projected"`` (``ln_post`` then ``proj``; AnomalyCLIP, CLIP baseline), ``"ln_post"``
                (AA-CLIP's own projections) or ``"raw"`` (VAND, InCTRL).
            global_ln_post: apply ``ln_post`` to the global CLS token (plain CLIP: True; AnomalyCLIP: False, #14).
            attention: attention variant (DPAM etc.); None = plain CLIP.
            head_weights: {layer: weighting} scaling each head's output before ``out_proj`` in the residual
                stream (HeadCLIP); a tensor (H,) or (B, H), or a callable on (B, H, N, Dh).
            side_head_weights: the same for the dual-path side stream.
            adapters: {layer: module} applied to the residual stream after that block (AA-CLIP residual
                adapters: the module returns the fused tokens, e.g. ``λ·Â(h) + (1−λ)·h``).
            return_global: False stops after the deepest tapped layer and returns no global embedding.
            start: resume from a `stream_state` (same `attention`; the earlier blocks' hooks were applied when it
                was made); `layers` and hooks must then be at or after ``start.next_layer``.

        Returns:
            `VisualFeatures`.
        """
        layers = tuple(int(layer) for layer in layers)
        num_layers = self.num_layers
        if not return_global and not layers:
            raise ValueError("return_global=False needs at least one layer to tap")
        last_layer = num_layers if return_global else max(layers)
        hooks = self._checked_hooks(layers, attention, head_weights, side_head_weights, adapters)
        if start is None and images is None:
            raise ValueError("VisualEncoder.forward needs images or a start state")
        if start is not None and images is not None:
            raise ValueError("VisualEncoder.forward takes images or a start state, not both")
        if start is not None:
            self._check_start(start, attention, layers, hooks)
        with tower_autocast(self.visual.proj.device):
            if start is None:
                start = StreamState(1, self.embed(images))
            hidden, side, taps = self._run_blocks(start, last_layer, attention, *hooks, layers)
        hidden = hidden.float()  # ln_post and proj in float32 (the blocks may have run in bf16/fp16)
        global_embedding = None
        if return_global:
            cls_token = hidden[:, 0]
            if global_ln_post:
                cls_token = self.visual.ln_post(cls_token)
            global_embedding = cls_token @ self.visual.proj
        return VisualFeatures(
            layers=layers,
            layer_tokens=tuple(self.project_tokens(taps[layer].float(), tokens) for layer in layers),
            global_embedding=global_embedding,
            final_tokens=hidden if last_layer == num_layers else None,
        )

    def stream_state(
        self,
        images: torch.Tensor,
        next_layer: int,
        *,
        attention: AttentionVariant | None = None,
        head_weights: Mapping[int, HeadWeighting] | None = None,
        side_head_weights: Mapping[int, HeadWeighting] | None = None,
        adapters: Mapping[int, Adapter] | None = None,
    ) -> StreamState:
        """Run blocks 1 .. ``next_layer - 1`` and return the stream(s) entering block `next_layer`.

        ``forward(None, layers, start=stream_state(images, l, ...), ...)`` equals ``forward(images, layers, ...)``
        for the same `attention` and hooks (the hooks before `l` given here, those from `l` on to `forward`).

        Args:
            images: (B, 3, S, S) normalised images.
            next_layer: 1-indexed block where the forward will resume, in [1, num_layers].
            attention, head_weights, side_head_weights, adapters: as in `forward`, for the blocks before it.
        """
        if not 1 <= next_layer <= self.num_layers:
            raise ValueError(f"next_layer is 1-indexed in [1, {self.num_layers}], got {next_layer}")
        hooks = self._checked_hooks((), attention, head_weights, side_head_weights, adapters)
        late = sorted(layer for hook in hooks for layer in hook if layer >= next_layer)
        if late:
            raise ValueError(f"stream_state(next_layer={next_layer}) runs blocks before it only; hooks at {late} "
                             "belong to the resumed forward")
        with tower_autocast(self.visual.proj.device):
            hidden, side, _ = self._run_blocks(StreamState(1, self.embed(images)), next_layer - 1, attention, *hooks,
                                               ())
        return StreamState(next_layer, hidden.float(), None if side is None else side.float())

    def _checked_hooks(
        self,
        layers: Sequence[int],
        attention: AttentionVariant | None,
        head_weights: Mapping[int, HeadWeighting] | None,
        side_head_weights: Mapping[int, HeadWeighting] | None,
        adapters: Mapping[int, Adapter] | None,
    ) -> tuple[dict[int, HeadWeighting], dict[int, HeadWeighting], dict[int, Adapter]]:
        """The hooks as dicts, after checking every layer index."""
        num_layers = self.num_layers
        head_weights = dict(head_weights or {})
        side_head_weights = dict(side_head_weights or {})
        adapters = dict(adapters or {})
        for name, keys in (("layers", layers), ("head_weights", head_weights), ("side_head_weights", side_head_weights),
                           ("adapters", adapters)):
            bad = [layer for layer in keys if not 1 <= layer <= num_layers]
            if bad:
                raise ValueError(f"{name}: layers are 1-indexed in [1, {num_layers}], got {bad}")
        first_variant = attention.first_layer if attention is not None else num_layers + 1
        if side_head_weights and (attention is None or attention.path != "dual"
                                  or min(side_head_weights) < first_variant):
            raise ValueError("side_head_weights need a dual-path AttentionVariant active at those layers")
        return head_weights, side_head_weights, adapters

    def _check_start(
        self, start: StreamState, attention: AttentionVariant | None, layers: Sequence[int], hooks: Sequence[Mapping]
    ) -> None:
        """A start state must fit the layers asked for and the attention variant (side stream or not)."""
        if not 1 <= start.next_layer <= self.num_layers:
            raise ValueError(f"start.next_layer is 1-indexed in [1, {self.num_layers}], got {start.next_layer}")
        early = sorted({layer for layer in layers if layer < start.next_layer}
                       | {layer for hook in hooks for layer in hook if layer < start.next_layer})
        if early:
            raise ValueError(f"layers or hooks {early} precede the start state (block {start.next_layer}); "
                             "make the state earlier")
        side_expected = attention is not None and attention.path == "dual" and attention.first_layer < start.next_layer
        if side_expected != (start.side is not None):
            raise ValueError(f"start state at block {start.next_layer} {'lacks' if side_expected else 'has'} a side "
                             f"stream but the attention variant {attention} {'has' if side_expected else 'has none'} "
                             "before that block; make the state with the same attention")

    def _run_blocks(
        self,
        start: StreamState,
        last_layer: int,
        attention: AttentionVariant | None,
        head_weights: Mapping[int, HeadWeighting],
        side_head_weights: Mapping[int, HeadWeighting],
        adapters: Mapping[int, Adapter],
        layers: Sequence[int],
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[int, torch.Tensor]]:
        """Blocks ``start.next_layer`` .. `last_layer`: the final (hidden, side) streams and the tapped tokens."""
        first_variant = attention.first_layer if attention is not None else self.num_layers + 1
        hidden, side = start.hidden, start.side
        taps: dict[int, torch.Tensor] = {}
        for layer in range(start.next_layer, last_layer + 1):
            block = self.blocks[layer - 1]
            variant_active = layer >= first_variant
            if not variant_active and layer not in head_weights:
                hidden = block_forward(block, hidden)
            elif not variant_active:
                hidden = self._head_weighted_block(block, hidden, head_weights[layer])
            else:
                q, k, v = project_qkv(block.attn, block.ln_1(hidden))
                single = variant_active and attention.path == "single"
                main_heads = head_attention(
                    q, k, v, attention.modes if single else ("qk",), batch_mixing=single and attention.batch_mixing
                )
                main_out = merge_heads(block.attn, weight_heads(main_heads, head_weights.get(layer)))
                if variant_active and attention.path == "dual":
                    side_heads = head_attention(q, k, v, attention.modes, batch_mixing=attention.batch_mixing)
                    side_out = merge_heads(block.attn, weight_heads(side_heads, side_head_weights.get(layer)))
                    side = (hidden if side is None else side) + block.ls_1(side_out)
                hidden = hidden + block.ls_1(main_out)
                hidden = hidden + block.ls_2(block.mlp(block.ln_2(hidden)))
            if layer in adapters:
                hidden = adapters[layer](hidden)
            if layer in layers:
                taps[layer] = side if side is not None else hidden
        return hidden, side, taps

    @staticmethod
    def _head_weighted_block(block: ResidualAttentionBlock, hidden: torch.Tensor,
                             weighting: HeadWeighting) -> torch.Tensor:
        """A standard block with its heads re-weighted, written as the block's own attention plus the change the
        weights make: ``h + ls_1(Attn(ln_1(h)) + Out(w·heads) − Out(heads))``, then the MLP as in the block.

        ``Attn`` is what `block_forward` computes under the current attention kernel (open_clip's module, or the
        heads merged). With identity weights ``w·heads`` equals ``heads`` bit for bit, the correction is exactly
        zero and the result is bit-identical to `block_forward`; the weights still get gradients.
        """
        normalised = block.ln_1(hidden)
        heads = head_attention(*project_qkv(block.attn, normalised))
        unweighted = merge_heads(block.attn, heads)
        attended = block.attention(normalised) if attention_kernel() == "module" else unweighted
        correction = merge_heads(block.attn, weight_heads(heads, weighting)) - unweighted
        hidden = hidden + block.ls_1(attended + correction)
        return hidden + block.ls_2(block.mlp(block.ln_2(hidden)))

    def encode_windows(
        self, images: torch.Tensor, windows: torch.Tensor, *, windows_per_pass: int | None = None
    ) -> torch.Tensor:
        """Embed many token windows per image in one batched pass (WinCLIP's masked-token windows).

        For every image and window, the sequence [CLS, the window's patch tokens] (taken after the positional
        embedding; ``ln_pre`` acts per token, so before/after it is the same) runs through the full ViT with
        standard attention; the window embedding is the output CLS → ``ln_post`` → ``proj`` (WinCLIP Sec. 4.2).
        A window covering the whole grid gives the ordinary CLIP image embedding.

        Args:
            images: (B, 3, S, S) normalised images.
            windows: (W, K) long tensor of patch indices in [0, N) (CLS excluded), e.g. from `sliding_windows`.
            windows_per_pass: bound on memory: run at most this many windows (× B images) per transformer pass.
                None = all windows at once.

        Returns:
            (B, W, D) window embeddings (not normalised).
        """
        if windows.ndim != 2 or windows.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"windows must be a (W, K) integer tensor of patch indices, got {windows.dtype} "
                             f"{tuple(windows.shape)}")
        num_patches = self.grid_size**2
        if windows.numel() and (int(windows.min()) < 0 or int(windows.max()) >= num_patches):
            raise ValueError(f"window indices must lie in [0, {num_patches}) for a {self.grid_size}² grid")
        with tower_autocast(self.visual.proj.device):
            tokens = self.embed(images)
        windows = windows.to(tokens.device).long()
        step = windows.shape[0] if windows_per_pass is None else max(1, int(windows_per_pass))
        embeddings = [self._encode_window_chunk(tokens, windows[start : start + step])
                      for start in range(0, windows.shape[0], step)]
        return torch.cat(embeddings, dim=1)

    def _encode_window_chunk(self, tokens: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """(B, 1+N, width) embedded tokens, (W, K) windows → (B, W, D) window CLS embeddings."""
        batch, width = tokens.shape[0], tokens.shape[-1]
        num_windows, window_len = windows.shape
        window_tokens = tokens[:, windows + 1]  # (B, W, K, width); +1 skips the CLS token
        class_tokens = tokens[:, :1].unsqueeze(1).expand(batch, num_windows, 1, width)
        sequences = torch.cat([class_tokens, window_tokens], dim=2).reshape(batch * num_windows, 1 + window_len, width)
        with tower_autocast(self.visual.proj.device):
            for block in self.blocks:
                sequences = block_forward(block, sequences)
        embeddings = self.visual.ln_post(sequences[:, 0].float()) @ self.visual.proj
        return embeddings.view(batch, num_windows, -1)
