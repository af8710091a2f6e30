"""What every method returns, and the registry that lets notebooks and the CLI ask for methods by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Prediction:
    """Output of a detector on one batch.

    Attributes:
        image_scores: (B,) anomaly score per image, higher = more anomalous.
        anomaly_maps: (B, S, S) anomaly map per image at the input resolution.
    """

    image_scores: torch.Tensor
    anomaly_maps: torch.Tensor


class Detector(Protocol):
    """A zero-/few-shot anomaly detector: normalised images in, scores and maps out."""

    def predict(self, images: torch.Tensor, class_names: Sequence[str]) -> Prediction:
        """Score a batch of images (B, 3, S, S) whose classes are `class_names`."""
        ...


_REGISTRY: dict[str, Callable[..., Detector]] = {}


def register_method(name: str) -> Callable[[Callable[..., Detector]], Callable[..., Detector]]:
    """Class decorator: make a method constructible by name through `build_method(name, ...)`."""

    def decorate(factory: Callable[..., Detector]) -> Callable[..., Detector]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorate


def build_method(name: str, **kwargs) -> Detector:
    """Construct a registered method; an unknown name lists the known ones."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def registered_methods() -> list[str]:
    return sorted(_REGISTRY)
