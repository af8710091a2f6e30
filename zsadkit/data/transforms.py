"""Image and mask transforms, as the reference implementations apply them (no augmentation).

Reference (AnomalyCLIP `utils.get_transform`, also AA-CLIP, VAND, AdaCLIP): square resize of the PIL
image with bicubic resampling (Pillow antialiases; the aspect ratio is not kept), conversion to RGB
**after** the resize, `ToTensor`, normalisation with the OpenAI CLIP mean/std. Masks: `mask > 0` is
set to 255, resized with bilinear resampling, `ToTensor`, then binarised with `> 0.5`.

Named options cover the other references:

* `resize="shorter_side_crop"`: resize the shorter side to S, then centre-crop S x S
  (InCTRL, WinCLIP of mala-lab and zqhang; torchvision `Resize(S)` + `CenterCrop(S)`).
* `interpolation="nearest"` for masks (AA-CLIP).
* `threshold=None` keeps the soft mask in [0, 1].

Example:
    >>> from PIL import Image
    >>> image_transform(32)(Image.new("RGB", (50, 40))).shape
    torch.Size([3, 32, 32])
    >>> mask_transform(32)(Image.new("L", (50, 40))).shape
    torch.Size([32, 32])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

__all__ = [
    "image_transform",
    "ImageTransform",
    "mask_transform",
    "MaskTransform",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "pil_to_tensor",
    "resize_square",
]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

ResizeMode = Literal["squash", "shorter_side_crop"]
_RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def resize_square(image: Image.Image, size: int, resize: ResizeMode, interpolation: str) -> Image.Image:
    """Resize a PIL image to `size` x `size`.

    Args:
        image: any PIL image.
        size: output side S.
        resize: "squash" (direct resize to S x S, aspect ratio not kept) or "shorter_side_crop"
            (shorter side to S, longer side to int(S * long / short), then centre crop, as torchvision).
        interpolation: "bicubic", "bilinear" or "nearest" (Pillow filters; Pillow antialiases when it
            downsamples). Pillow always uses nearest on "P" and "1" images.
    """
    if interpolation not in _RESAMPLING:
        raise ValueError(f"interpolation must be one of {sorted(_RESAMPLING)}, got {interpolation!r}")
    resample = _RESAMPLING[interpolation]
    if resize == "squash":
        return image.resize((size, size), resample)
    if resize == "shorter_side_crop":
        resized = TF.resize(image, size, interpolation=TF.InterpolationMode(interpolation))
        return TF.center_crop(resized, [size, size])
    raise ValueError(f"resize must be 'squash' or 'shorter_side_crop', got {resize!r}")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 PIL image -> float32 tensor in [0, 1], (C, H, W) (torchvision `ToTensor`)."""
    array = np.array(image, dtype=np.uint8, copy=True)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div(255)


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> normalised (3, S, S) float32 tensor. Build it with `image_transform`."""

    size: int
    resize: ResizeMode = "squash"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def __call__(self, image: Image.Image) -> torch.Tensor:
        resized = resize_square(image, self.size, self.resize, self.interpolation).convert("RGB")
        pixels = pil_to_tensor(resized)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (pixels - mean) / std


@dataclass(frozen=True)
class MaskTransform:
    """PIL mask -> (S, S) float32 tensor, binary in {0, 1} unless `threshold` is None. See `mask_transform`."""

    size: int
    threshold: float | None = 0.5
    resize: ResizeMode = "squash"
    interpolation: str = "bilinear"
    nonzero_is_anomalous: bool = True

    def __call__(self, mask: Image.Image) -> torch.Tensor:
        mask = mask.convert("L")
        if self.nonzero_is_anomalous:
            mask = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255, mode="L")
        soft = pil_to_tensor(resize_square(mask, self.size, self.resize, self.interpolation))[0]
        if self.threshold is None:
            return soft
        return (soft > self.threshold).float()


def image_transform(
    size: int,
    *,
    resize: ResizeMode = "squash",
    interpolation: str = "bicubic",
    mean: tuple[float, float, float] = OPENAI_MEAN,
    std: tuple[float, float, float] = OPENAI_STD,
) -> ImageTransform:
    """The reference image transform: PIL image -> (3, S, S) float32 tensor.

    Args:
        size: output side S.
        resize: "squash" (default, AnomalyCLIP/AA-CLIP/VAND) or "shorter_side_crop" (InCTRL, WinCLIP).
        interpolation: Pillow filter, "bicubic" by default.
        mean, std: per-channel normalisation, OpenAI CLIP values by default.
    """
    return ImageTransform(size, resize, interpolation, tuple(mean), tuple(std))


def mask_transform(
    size: int,
    threshold: float | None = 0.5,
    *,
    resize: ResizeMode = "squash",
    interpolation: str = "bilinear",
    nonzero_is_anomalous: bool = True,
) -> MaskTransform:
    """The reference mask transform: PIL mask -> (S, S) float32 tensor.

    Args:
        size: output side S.
        threshold: pixels strictly above it become 1, the others 0 (reference: 0.5); None keeps the
            soft resized mask in [0, 1].
        resize: as in `image_transform`; use the same value for images and masks.
        interpolation: "bilinear" (default, AnomalyCLIP) or "nearest" (AA-CLIP).
        nonzero_is_anomalous: set every non-zero pixel to 255 before resizing (reference; makes
            label-valued masks, such as VisA's, binary). False keeps the grey levels.
    """
    return MaskTransform(size, threshold, resize, interpolation, nonzero_is_anomalous)
