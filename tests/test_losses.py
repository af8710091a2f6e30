"""Focal and dice losses against hand-computed values and the reference formulas."""

from __future__ import annotations

import math

import pytest
import torch

from zsadkit.losses import binary_dice_loss, focal_loss


def test_focal_loss_matches_hand_computed_value_for_one_pixel() -> None:
    probs = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1)
    # one-hot [1, 0] clamped to [1 - 1e-5, 1e-5]; p_t = 0.9(1 - 1e-5) + 0.1e-5 + 1e-5
    p_t = 0.9 * (1 - 1e-5) + 0.1 * 1e-5 + 1e-5
    expected = -((1 - p_t) ** 2) * math.log(p_t)
    assert float(focal_loss(probs, torch.zeros(1, 1, 1))) == pytest.approx(expected, rel=1e-6)


def test_focal_loss_is_the_pixel_mean_of_the_reference_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 2, 5, 4, generator=generator).softmax(dim=1)
    target = (torch.rand(3, 5, 4, generator=generator) > 0.5).long()
    one_hot = torch.stack([1 - target, target], dim=1).float().clamp(1e-5, 1 - 1e-5)
    p_t = (one_hot * probs).sum(dim=1) + 1e-5
    expected = (-((1 - p_t) ** 2) * p_t.log()).mean()
    assert torch.allclose(focal_loss(probs, target), expected, atol=1e-7)
    assert torch.allclose(focal_loss(probs, target.unsqueeze(1)), expected, atol=1e-7)


def test_focal_loss_gamma_zero_is_cross_entropy_on_probabilities() -> None:
    probs = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    target = torch.tensor([0, 1])
    expected = -(torch.log(torch.tensor(0.7 * (1 - 1e-5) + 0.3e-5 + 1e-5)) +
                 torch.log(torch.tensor(0.8 * (1 - 1e-5) + 0.2e-5 + 1e-5))) / 2
    assert torch.allclose(focal_loss(probs, target, gamma=0.0), expected, atol=1e-7)


def test_focal_loss_alpha_weights_each_pixel_by_its_class() -> None:
    probs = torch.tensor([[0.6, 0.4], [0.6, 0.4]])
    target = torch.tensor([0, 1])
    unweighted = [focal_loss(probs[i : i + 1], target[i : i + 1]) for i in range(2)]
    weighted = focal_loss(probs, target, alpha=[0.25, 0.75])
    assert torch.allclose(weighted, (0.25 * unweighted[0] + 0.75 * unweighted[1]) / 2)


def test_focal_loss_rejects_a_target_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="target has 6 elements"):
        focal_loss(torch.rand(1, 2, 2, 2), torch.zeros(1, 2, 3))


def test_dice_loss_is_zero_for_a_perfect_binary_prediction_and_follows_the_formula() -> None:
    target = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    assert float(binary_dice_loss(target, target)) == pytest.approx(0.0)
    prediction = torch.tensor([[[0.5, 0.2], [0.1, 0.9]], [[0.0, 0.0], [0.0, 0.0]]])
    targets = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    first = (2 * (0.5 + 0.1 + 0.9) + 1) / (1.7 + 3 + 1)
    second = (0 + 1) / (0 + 0 + 1)
    assert float(binary_dice_loss(prediction, targets)) == pytest.approx(1 - (first + second) / 2, rel=1e-6)


def test_dice_loss_rejects_mismatched_sizes() -> None:
    with pytest.raises(ValueError, match="differ in size"):
        binary_dice_loss(torch.rand(2, 4, 4), torch.rand(2, 3, 3))
