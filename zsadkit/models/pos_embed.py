"""Resizing the vision positional embedding to a new input resolution (e.g. 336 → 518, grid 24 → 37).

Two interpolations are offered, both keeping the class-token row unchanged:

* ``"bilinear"`` (default): ``F.interpolate(mode="bilinear", align_corners=False)`` without antialias.
  This is what AnomalyCLIP's reference code does (`AnomalyCLIP_lib/AnomalyCLIP.py:368` @ 45ed4dd).
* ``"open_clip"``: open_clip's own ``resize_pos_embed`` (bicubic, ``antialias=True``), used by the forked
  factories of VAND/April-GAN and AA-CLIP (`create_model(img_size=...)`; AA-CLIP's fixture
  `tests/fixtures/aaclip/pos_embedding.npz` equals it, while ``"bilinear"`` is off by up to 0.075 there).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "POS_EMBED_RESIZE_METHODS",
    "resize_position_embedding",
    "set_visual_image_size",
]

PosEmbedResize = Literal["bilinear", "open_clip"]
POS_EMBED_RESIZE_METHODS: tuple[str, ...] = ("bilinear", "open_clip")


def _as_grid(grid: int | tuple[int, int]) -> tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def resize_position_embedding(
    pos_embed: torch.Tensor,
    grid: int | tuple[int, int],
    method: PosEmbedResize = "bilinear",
) -> torch.Tensor:
    """Interpolate a ViT positional embedding with one leading class row to a new patch grid.

    Args:
        pos_embed: (1 + G0*G0, W) table; row 0 is the class token, the rest a square G0×G0 grid, row-major.
        grid: new grid side G (or (Gh, Gw)).
        method: ``"bilinear"`` (reference AnomalyCLIP behaviour, no antialias) or ``"open_clip"``
            (bicubic with antialias, open_clip's ``resize_pos_embed``; VAND and AA-CLIP).

    Returns:
        (1 + Gh*Gw, W) table with the class row copied unchanged. Returned as is (same tensor) when the grid
        does not change.

    Example:
        >>> resize_position_embedding(torch.randn(17, 8), 7).shape
        torch.Size([50, 8])
    """
    if method not in POS_EMBED_RESIZE_METHODS:
        raise ValueError(f"pos_embed_resize must be one of {POS_EMBED_RESIZE_METHODS}, got {method!r}")
    if pos_embed.ndim != 2:
        raise ValueError(f"pos_embed must be (1 + G*G, W), got shape {tuple(pos_embed.shape)}")
    new_grid = _as_grid(grid)
    class_row, patch_rows = pos_embed[:1], pos_embed[1:]
    old_side = math.isqrt(patch_rows.shape[0])
    if old_side * old_side != patch_rows.shape[0]:
        raise ValueError(f"pos_embed has {patch_rows.shape[0]} patch rows, which is not a square grid")
    if (old_side, old_side) == new_grid:
        return pos_embed
    width = pos_embed.shape[1]
    patch_image = patch_rows.reshape(1, old_side, old_side, width).permute(0, 3, 1, 2)
    if method == "bilinear":
        resized = F.interpolate(patch_image, size=new_grid, mode="bilinear", align_corners=False)
    else:
        resized = F.interpolate(patch_image, size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], width)
    return torch.cat([class_row, resized], dim=0)


def set_visual_image_size(visual: nn.Module, image_size: int, method: PosEmbedResize = "bilinear") -> None:
    """Adapt an open_clip ``VisionTransformer`` to square inputs of side ``image_size``, in place.

    Replaces ``visual.positional_embedding`` by its resized copy (once, at load time) and updates
    ``visual.image_size`` and ``visual.grid_size``.

    Args:
        visual: open_clip ``VisionTransformer`` (``model.visual``).
        image_size: new input side S; must be a multiple of the patch size.
        method: see `resize_position_embedding`.
    """
    patch = visual.patch_size[0]
    if image_size <= 0 or image_size % patch != 0:
        raise ValueError(f"image_size must be a positive multiple of the patch size {patch}, got {image_size}")
    grid = image_size // patch
    old = visual.positional_embedding
    with torch.no_grad():
        resized = resize_position_embedding(old.detach(), grid, method)
    visual.positional_embedding = nn.Parameter(resized.clone(), requires_grad=old.requires_grad)
    visual.image_size = (image_size, image_size)
    visual.grid_size = (grid, grid)
