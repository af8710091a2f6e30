"""Anomaly maps from patch-text similarities: per-layer softmax, upsampling, fusion over layers, smoothing.

The pipeline of AnomalyCLIP's `test.py` (zqhang/AnomalyCLIP @ 45ed4dd: `AnomalyCLIP_lib.get_similarity_map`,
then `gaussian_filter(sigma=4)`), shared by CLIP/CLIP-AC, CoOp, VAND, AA-CLIP and HeadCLIP:

1. `patch_text_probabilities`: P = softmax(⟨f_patch, g_state⟩ / τ) over the text states, per token.
2. `upsample_token_probabilities`: drop CLS, reshape the G×G patch grid row-major, bilinear upsampling to S×S
   (`align_corners=False`).
3. `anomaly_map_from_probabilities`: (P_abnormal + 1 − P_normal) / 2 per layer (≡ P_abnormal for 2 states).
4. Sum over layers (not mean), then `gaussian_smooth` with σ = 4.

AA-CLIP smooths differently (Mwxinnn/AA-CLIP @ 53db195, `forward_utils.calculate_similarity_map`): each layer's map
is blurred on the patch grid, before upsampling, with kornia's `gaussian_blur2d` (a fixed kernel size, 'reflect'
border): `gaussian_blur`.

`state_maps` runs steps 1–2 in either order: AnomalyCLIP's softmax then upsampling, or VAND's upsampling of the
logits with `align_corners=True` then the softmax (VAND-APRIL-GAN @ f13b8a6, `test.py`).

`gaussian_smooth` equals `scipy.ndimage.gaussian_filter(map, sigma)` per image (mode "reflect", i.e.
half-sample symmetric, truncate 4 → radius int(4σ + 0.5)) but runs batched on the maps' device.

Example:
    >>> maps = torch.rand(2, 32, 32)
    >>> gaussian_smooth(maps, sigma=4).shape
    torch.Size([2, 32, 32])
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "ANOMALYCLIP_TEMPERATURE",
    "CLIP_TEMPERATURE",
    "anomaly_map_from_probabilities",
    "fuse_layer_maps",
    "gaussian_blur",
    "gaussian_kernel1d",
    "gaussian_smooth",
    "patch_text_probabilities",
    "state_maps",
    "upsample_token_probabilities",
]

ANOMALYCLIP_TEMPERATURE = 0.07  # AnomalyCLIP's Eq. 1 in its code (cos / 0.07)
CLIP_TEMPERATURE = 0.01  # CLIP's logit scale 100 (VAND, InCTRL, mala-lab WinCLIP)


def patch_text_probabilities(
    tokens: torch.Tensor, text_features: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """Softmax over text states of the cosine similarities / τ (Eq. 1 applied to every token).

    Args:
        tokens: (B, N, D) L2-normalised visual tokens (CLS and patches, or the global embedding with N = 1).
        text_features: (K, D) shared by the batch, or (B, K, D) per image; L2-normalised.
        temperature: τ (AnomalyCLIP: 0.07, so logits are cos / 0.07).

    Returns:
        (B, N, K) probabilities.
    """
    if text_features.ndim == 2:
        logits = tokens @ text_features.t()
    else:
        logits = tokens @ text_features.transpose(-1, -2)
    return (logits / temperature).softmax(dim=-1)


def upsample_token_probabilities(
    probs: torch.Tensor, image_size: int, has_cls: bool = True, align_corners: bool = False
) -> torch.Tensor:
    """Patch-grid values upsampled to the image (reference `get_similarity_map`).

    Args:
        probs: (B, N, K) per-token values; N = 1 + G² with a leading CLS row when `has_cls`, else G².
        image_size: output side S.
        has_cls: drop the first row first.
        align_corners: bilinear `align_corners` (AnomalyCLIP False, VAND True).

    Returns:
        (B, S, S, K), bilinear.
    """
    patch_probs = probs[:, 1:] if has_cls else probs
    side = math.isqrt(patch_probs.shape[1])
    if side * side != patch_probs.shape[1]:
        raise ValueError(f"upsample_token_probabilities: {patch_probs.shape[1]} patch tokens are not a square grid")
    grid = patch_probs.reshape(patch_probs.shape[0], side, side, -1).permute(0, 3, 1, 2)
    upsampled = F.interpolate(grid, size=(image_size, image_size), mode="bilinear", align_corners=align_corners)
    return upsampled.permute(0, 2, 3, 1)


def state_maps(
    tokens: torch.Tensor,
    text_features: torch.Tensor,
    temperature: float,
    image_size: int,
    *,
    has_cls: bool = True,
    order: Literal["softmax_then_upsample", "upsample_then_softmax"] = "softmax_then_upsample",
    align_corners: bool = False,
) -> torch.Tensor:
    """Per-pixel state probabilities (B, S, S, K) of normalised tokens (B, N, D) against text (K or B×K, D).

    `order="softmax_then_upsample"` is AnomalyCLIP's (softmax per token, then bilinear upsampling);
    `"upsample_then_softmax"` is VAND's (logits upsampled, with `align_corners=True` in its code, then softmax).
    """
    if order == "softmax_then_upsample":
        return upsample_token_probabilities(patch_text_probabilities(tokens, text_features, temperature),
                                            image_size, has_cls, align_corners)
    if order == "upsample_then_softmax":  # VAND's layout: (B, K, G, G) contiguous, softmax over dim 1
        logits = tokens @ (text_features.t() if text_features.ndim == 2 else text_features.transpose(-1, -2))
        logits = (logits[:, 1:] if has_cls else logits) / temperature
        side = math.isqrt(logits.shape[1])
        grid = logits.transpose(1, 2).reshape(logits.shape[0], logits.shape[2], side, side)
        upsampled = F.interpolate(grid, size=(image_size, image_size), mode="bilinear", align_corners=align_corners)
        return upsampled.softmax(dim=1).permute(0, 2, 3, 1)
    raise ValueError(f"order must be 'softmax_then_upsample' or 'upsample_then_softmax', got {order!r}")


def anomaly_map_from_probabilities(state_maps: torch.Tensor) -> torch.Tensor:
    """(P_abnormal + 1 − P_normal) / 2 from (…, 2) maps whose last axis is (normal, abnormal)."""
    if state_maps.shape[-1] != 2:
        raise ValueError(f"expected a last axis of size 2 (normal, abnormal), got shape {tuple(state_maps.shape)}")
    return (state_maps[..., 1] + 1.0 - state_maps[..., 0]) / 2.0


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """scipy's Gaussian taps: exp(−x²/(2σ²)) for |x| ≤ int(truncate·σ + 0.5), normalised to sum 1.

    Returns:
        (2r + 1,) kernel.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 / float(sigma) ** 2 * x**2)
    return (kernel / kernel.sum()).to(dtype)


def _half_sample_symmetric_index(length: int, radius: int, device: torch.device) -> torch.Tensor:
    """Source indices of a signal padded by `radius` on both sides in scipy's 'reflect' mode (d c b a | a b c d)."""
    positions = torch.arange(-radius, length + radius, device=device)
    folded = positions.remainder(2 * length)
    return torch.where(folded >= length, 2 * length - 1 - folded, folded)


def _smooth_last_axis(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    radius = (kernel.numel() - 1) // 2
    length = maps.shape[-1]
    padded = maps.index_select(-1, _half_sample_symmetric_index(length, radius, maps.device))
    rows = padded.reshape(-1, 1, length + 2 * radius)
    smoothed = F.conv1d(rows, kernel.view(1, 1, -1))
    return smoothed.reshape(maps.shape)


def gaussian_smooth(maps: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian smoothing of each map, equal to `scipy.ndimage.gaussian_filter(m, sigma)` per map.

    Args:
        maps: (B, H, W) (or (H, W)) maps; any float dtype, any device.
        sigma: σ in pixels; 0 returns the maps unchanged (the reference's `--sigma 0`).
        truncate: radius = int(truncate·σ + 0.5), scipy's default 4.

    Returns:
        Maps of the same shape and dtype. Boundary: half-sample symmetric reflection (scipy `mode="reflect"`),
        which also covers radii larger than the map.
    """
    if sigma == 0:
        return maps
    compute_dtype = maps.dtype if maps.dtype in (torch.float32, torch.float64) else torch.float32
    kernel = gaussian_kernel1d(sigma, truncate, dtype=compute_dtype).to(maps.device)
    smoothed = maps.to(compute_dtype)
    # scipy filters axis 0 (rows, H) first, then axis 1 (W); keep that order so roundings match.
    smoothed = _smooth_last_axis(smoothed.transpose(-1, -2), kernel).transpose(-1, -2)
    smoothed = _smooth_last_axis(smoothed, kernel)
    return smoothed.to(maps.dtype)


def _reflect_index(length: int, radius: int, device: torch.device) -> torch.Tensor:
    """Source indices of a signal padded by `radius` in torch's 'reflect' mode (d c b | a b c d | c b a), continued
    periodically where `radius` ≥ `length` (torch refuses those; the values stay a reflection of the signal)."""
    positions = torch.arange(-radius, length + radius, device=device)
    if length == 1:
        return torch.zeros_like(positions)
    folded = positions.remainder(2 * (length - 1))
    return torch.where(folded >= length, 2 * (length - 1) - folded, folded)


def gaussian_blur(maps: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """kornia's `gaussian_blur2d(maps[:, None], (k, k), (σ, σ))` (kornia 0.9; AA-CLIP's blur of the patch grid).

    Taps exp(−x²/(2σ²)) for x = −k//2 … k//2 (a fixed kernel size, not scipy's truncation), normalised to sum 1, in
    the maps' dtype; 'reflect' border without edge repeat; the width axis first, then the height axis.

    Args:
        maps: (B, H, W) maps.
        kernel_size: k, odd and positive (AA-CLIP: 7 industrial, 9 medical).
        sigma: σ > 0 (AA-CLIP: 1 industrial, 1.5 medical).

    Returns:
        (B, H, W) blurred maps.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if maps.ndim != 3:
        raise ValueError(f"gaussian_blur expects (B, H, W) maps, got shape {tuple(maps.shape)}")
    taps = torch.arange(kernel_size, dtype=maps.dtype, device=maps.device) - kernel_size // 2
    kernel = torch.exp(-taps.pow(2.0) / (2 * torch.tensor(float(sigma), dtype=maps.dtype) ** 2))
    kernel = kernel / kernel.sum()
    radius = kernel_size // 2
    blurred = maps
    for axis in (-1, -2):  # width, then height (kornia's filter2d_separable)
        moved = blurred.transpose(-1, axis) if axis == -2 else blurred
        length = moved.shape[-1]
        padded = moved.index_select(-1, _reflect_index(length, radius, maps.device))
        rows = F.conv1d(padded.reshape(-1, 1, length + 2 * radius), kernel.view(1, 1, -1)).reshape(moved.shape)
        blurred = rows.transpose(-1, axis) if axis == -2 else rows
    return blurred


def fuse_layer_maps(layer_maps: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Combine per-layer maps (L, B, S, S) → (B, S, S): "sum" (AnomalyCLIP, VAND) or "mean"."""
    if reduction == "sum":
        return layer_maps.sum(dim=0)
    if reduction == "mean":
        return layer_maps.mean(dim=0)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
