"""Losses of the learned methods: segmentation losses (AnomalyCLIP, VAND/April-GAN, AA-CLIP, HeadCLIP) and the
binary focal loss of image scores (InCTRL).

Both losses follow the reference implementation shared by VAND and AnomalyCLIP (`loss.py`), including its
smoothing constants, so that training reproduces the reference numbers.

Focal loss (Lin et al. 2017), applied to **probabilities** (the reference passes softmax outputs, not logits):

    y_c  = clamp(onehot(target)_c, ε, 1 − ε)                        (ε = smooth = 1e-5)
    p_t  = Σ_c y_c · p_c + ε
    L    = mean over pixels of  −α_t · (1 − p_t)^γ · ln p_t         (γ = 2, α_t = 1 unless `alpha` is given)

Binary dice loss (Milletari et al. 2016), per sample b with smoothing s = 1 and no squaring:

    d_b = (2 Σ x·t + s) / (Σ x + Σ t + s),      L = 1 − mean_b d_b

Binary focal loss of image scores (InCTRL's `binary_focal_loss.py`, `BinaryFocalLoss(alpha=1, gamma=2,
logits=True)`), with b = the binary cross-entropy per sample, on logits or on probabilities:

    p_t = exp(−b),      L = mean of  α · (1 − p_t)^γ · b

Example:
    >>> probs = torch.tensor([[[[0.9]], [[0.1]]]])          # (B=1, C=2, H=1, W=1), class 0 likely
    >>> round(float(focal_loss(probs, torch.zeros(1, 1, 1))), 6)
    0.001054
    >>> float(binary_dice_loss(torch.ones(1, 2, 2), torch.ones(1, 2, 2)))
    0.0
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["binary_dice_loss", "binary_focal_loss", "focal_loss"]


def focal_loss(
    probs: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: Sequence[float] | None = None,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """Focal loss on class probabilities, averaged over all pixels (reference `FocalLoss()` defaults).

    Args:
        probs: (B, C, H, W) or (B, C) class probabilities (e.g. a softmax over normal/abnormal).
        target: (B, H, W), (B, 1, H, W) or (B,) integer class index per pixel (a {0,1} mask for C = 2).
        gamma: focusing parameter γ.
        alpha: optional per-class weights α_c (the reference's `alpha=None` means all ones).
        smooth: ε of the one-hot clamp and of p_t (clamp bounds are ε/(C−1) and 1 − ε, as in the reference).

    Returns:
        Scalar loss.
    """
    num_classes = probs.shape[1]
    if num_classes < 2:
        raise ValueError(f"focal_loss needs at least 2 classes in dim 1 of probs, got shape {tuple(probs.shape)}")
    flat_probs = probs.reshape(probs.shape[0], num_classes, -1).transpose(1, 2).reshape(-1, num_classes)
    index = target.reshape(-1).long()
    if index.numel() != flat_probs.shape[0]:
        raise ValueError(
            f"focal_loss: target has {index.numel()} elements, probs {tuple(probs.shape)} needs {flat_probs.shape[0]}"
        )
    one_hot = F.one_hot(index, num_classes).to(flat_probs.dtype)
    one_hot = one_hot.clamp(smooth / (num_classes - 1), 1.0 - smooth)
    p_t = (one_hot * flat_probs).sum(dim=1) + smooth
    loss = -((1.0 - p_t) ** gamma) * p_t.log()
    if alpha is not None:
        weights = torch.as_tensor(alpha, dtype=flat_probs.dtype, device=flat_probs.device)
        if weights.numel() != num_classes:
            raise ValueError(f"focal_loss: alpha has {weights.numel()} weights for {num_classes} classes")
        loss = weights[index] * loss
    return loss.mean()


def binary_dice_loss(prediction: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft dice loss 1 − mean_b (2Σxt + s)/(Σx + Σt + s) (reference `BinaryDiceLoss`).

    Args:
        prediction: (B, ...) soft foreground map in [0, 1], e.g. P(abnormal) per pixel (B, H, W).
        target: (B, ...) ground truth of the same number of elements per sample, in {0, 1}.
        smooth: s, added to numerator and denominator.

    Returns:
        Scalar loss.
    """
    batch = target.shape[0]
    prediction_flat = prediction.reshape(batch, -1)
    target_flat = target.reshape(batch, -1).to(prediction_flat.dtype)
    if prediction_flat.shape != target_flat.shape:
        raise ValueError(
            f"binary_dice_loss: prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in size"
        )
    intersection = (prediction_flat * target_flat).sum(dim=1)
    dice = (2.0 * intersection + smooth) / (prediction_flat.sum(dim=1) + target_flat.sum(dim=1) + smooth)
    return 1.0 - dice.mean()


def binary_focal_loss(
    scores: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0, gamma: float = 2.0, logits: bool = True
) -> torch.Tensor:
    """α·(1 − p_t)^γ·BCE, averaged over the batch (InCTRL's `BinaryFocalLoss`, defaults α = 1, γ = 2, logits).

    Args:
        scores: (B,) logits when `logits` (BCE-with-logits), else probabilities in [0, 1] (plain BCE, the textbook
            focal loss). InCTRL's reference passes **sigmoid outputs** with `logits=True`, so its loss is the focal
            loss of sigmoid(sigmoid(logit)).
        targets: (B,) labels in {0, 1}.
        alpha: weight α.
        gamma: focusing parameter γ.
        logits: whether `scores` are logits.

    Returns:
        Scalar loss.
    """
    if scores.shape != targets.shape:
        raise ValueError(f"binary_focal_loss: scores {tuple(scores.shape)} and targets {tuple(targets.shape)} differ")
    targets = targets.to(scores.dtype)
    if logits:
        bce = F.binary_cross_entropy_with_logits(scores, targets, reduction="none")
    else:
        bce = F.binary_cross_entropy(scores, targets, reduction="none")
    return (alpha * (1.0 - torch.exp(-bce)) ** gamma * bce).mean()
