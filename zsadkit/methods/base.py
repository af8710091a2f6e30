"""What every method returns, and the registry that lets notebooks and the CLI ask for methods by name."""

from __future__ import annotations

import importlib
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
#: Modules whose import registers the kit's methods (imported on the first look-up, not at package import,
#: so that a method module can use the engine without an import cycle).
METHOD_MODULES = ("clip_baseline", "winclip", "vand", "coop", "anomalyclip")


def _import_methods() -> None:
    for module in METHOD_MODULES:
        importlib.import_module(f"zsadkit.methods.{module}")


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
    _import_methods()
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def registered_methods() -> list[str]:
    _import_methods()
    return sorted(_REGISTRY)
