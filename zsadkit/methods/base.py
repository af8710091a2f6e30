"""What every method returns, the registry that builds methods by name, and what every builder shares.

* `Prediction` and the `Detector` protocol: normalised images in, image scores and anomaly maps out.
* `FeatureModel`: the protocol of methods whose frozen image features can be cached, so that the shared trainer
  (`zsadkit.training.fit`) and the cached evaluation (`zsadkit.engine.evaluate_cached`) work for any of them.
* The registry (timm's pattern): each method module registers its builder with `register_method`; the package
  imports every method module, so `build_method(name, ...)` knows them all.
* Builder helpers: `check_options` (one error for unknown options), `seeded` (one RNG behaviour for parameter
  initialisation), `backbone_for` (load, or reuse a loaded CLIP), `backbone_defaults` (reference layers from the
  model's depth, read from `backbone_defaults.yaml`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from torch import nn

from zsadkit.models import load_backbone

__all__ = [
    "BackboneDefaults",
    "Detector",
    "FeatureModel",
    "Prediction",
    "backbone_defaults",
    "backbone_for",
    "build_method",
    "check_options",
    "register_method",
    "registered_methods",
    "seeded",
]

DEFAULTS_FILE = Path(__file__).with_name("backbone_defaults.yaml")


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


class FeatureModel(Protocol):
    """A method whose image side is frozen up to some point: its outputs are cached rows, the rest is trained.

    Rows are batch-first tensors by name (what `zsadkit.feature_cache.FeatureCache` stores); a collated batch of
    rows also carries "mask" (B, S, S), "label" (B,) and "class_name".
    """

    image_size: int

    def feature_cache_key(self) -> dict[str, object]:
        """Everything `encode_rows` depends on (weights by fingerprint, layers, attention, ...)."""
        ...

    def encode_rows(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frozen part of the forward pass on (B, 3, S, S) images, as batch-first rows."""
        ...

    def losses_from_rows(self, rows: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The training objective of one batch of rows: {"loss": scalar, ...scalars to log}."""
        ...

    def predict_from_rows(self, rows: Mapping[str, Any]) -> Prediction:
        """`predict` on rows instead of images (identical values)."""
        ...

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The learned tensors by checkpoint name; nothing else is optimised."""
        ...


_REGISTRY: dict[str, Callable[..., Detector]] = {}


def register_method(name: str) -> Callable[[Callable[..., Detector]], Callable[..., Detector]]:
    """Decorator: make a builder constructible by name through `build_method(name, ...)`."""

    def decorate(factory: Callable[..., Detector]) -> Callable[..., Detector]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorate


def build_method(name: str, **settings: Any) -> Detector:
    """Construct a registered method; an unknown name lists the known ones.

    Every builder takes the run settings `backbone`, `pretrained`, `image_size`, `device`, `backbone_seed` (random
    backbone weights), `train_seed` (initialisation of learned parameters), `checkpoint`, `clip` (a loaded backbone
    to reuse) and the fields of its method's config.
    """
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**settings)


def registered_methods() -> list[str]:
    """Names `build_method` accepts, sorted."""
    return sorted(_REGISTRY)


def check_options(method: str, config_class: type, options: Mapping[str, object]) -> None:
    """Raise a TypeError naming the options that are not fields of `config_class` and listing the valid ones."""
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"{method}: unknown options {unknown}; {config_class.__name__} has {sorted(known)}")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's CPU RNG seeded by `seed`, leaving the global RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def backbone_for(
    clip: nn.Module | None,
    backbone: str,
    pretrained: str,
    image_size: int,
    device: str | torch.device,
    backbone_seed: int,
    **loader_options: Any,
) -> nn.Module:
    """`clip` when given (checked against `image_size`), else `zsadkit.models.load_backbone(...)`."""
    if clip is None:
        return load_backbone(backbone, pretrained, image_size, device, backbone_seed, **loader_options)
    loaded_size = clip.visual.image_size[0]
    if loaded_size != image_size:
        raise ValueError(f"clip= was loaded for {loaded_size}-pixel inputs, image_size={image_size} was asked for")
    return clip


@dataclass(frozen=True)
class BackboneDefaults:
    """The references' layer choices for a backbone of a given depth (`backbone_defaults.yaml`).

    Attributes:
        vision_layers: number of vision blocks.
        text_layers: number of text blocks.
        last_layer: the last vision block (AnomalyCLIP's feature layer).
        dpam_first_layer: first block of AnomalyCLIP's DPAM side stream.
        four_layers: four evenly spaced vision blocks (VAND, CoOp).
        deep_depth: text blocks with AnomalyCLIP's learnable tokens, input included.
        inctrl_layers: InCTRL's three tapped blocks (reference `out_layers=[7, 9, 11]` of 12).
        vision_adapter_layers: AA-CLIP's residual adapters follow vision blocks 1..n.
        text_adapter_layers: AA-CLIP's residual adapters follow text blocks 1..n.
    """

    vision_layers: int
    text_layers: int
    last_layer: int
    dpam_first_layer: int
    four_layers: tuple[int, ...]
    deep_depth: int
    inctrl_layers: tuple[int, ...] = ()
    vision_adapter_layers: int = 6
    text_adapter_layers: int = 3


@cache
def _defaults_table() -> dict[str, dict[int, dict]]:
    return yaml.safe_load(DEFAULTS_FILE.read_text())


def evenly_spaced_layers(num_layers: int, count: int = 4) -> tuple[int, ...]:
    """`count` 1-indexed layers ending at the last: 24 → (6, 12, 18, 24), 12 → (3, 6, 9, 12)."""
    step = max(1, num_layers // count)
    return tuple(range(step, num_layers + 1, step))[-count:]


def backbone_defaults(clip: nn.Module) -> BackboneDefaults:
    """The reference layer choices for `clip`'s depth, from `backbone_defaults.yaml`.

    A depth the table does not list is scaled from the 24-layer reference: DPAM from block max(2, L/4), the four
    evenly spaced taps, the last block, AA-CLIP's vision adapters after max(1, L/4) blocks; deep text prompts in
    min(9, T − 1) text blocks, AA-CLIP's text adapters after max(1, T/4) blocks; InCTRL's taps at round(L·l/12) for
    l = 7, 9, 11 of its 12-layer reference.
    """
    vision_layers = len(clip.visual.transformer.resblocks)
    text_layers = len(clip.transformer.resblocks)
    table = _defaults_table()
    vision = table["vision"].get(vision_layers) or {
        "last_layer": vision_layers,
        "dpam_first_layer": max(2, vision_layers // 4),
        "four_layers": list(evenly_spaced_layers(vision_layers)),
        "adapter_layers": max(1, vision_layers // 4),
    }
    inctrl_layers = vision.get("inctrl_layers") or sorted({max(1, round(vision_layers * layer / 12))
                                                           for layer in (7, 9, 11)})
    text = table["text"].get(text_layers) or {"deep_depth": min(9, text_layers - 1),
                                               "adapter_layers": max(1, text_layers // 4)}
    return BackboneDefaults(vision_layers, text_layers, int(vision["last_layer"]), int(vision["dpam_first_layer"]),
                            tuple(int(layer) for layer in vision["four_layers"]), int(text["deep_depth"]),
                            tuple(int(layer) for layer in inctrl_layers), int(vision["adapter_layers"]),
                            int(text["adapter_layers"]))
