"""CLIP and CLIP-AC: CLIP's own zero-shot classifier over a "normal" and an "anomalous" prompt (AnomalyCLIP App. A.2).

Method (AnomalyCLIP Sec. 2, Eq. 1, and App. A.2):

1. Text: one class embedding per state. CLIP: "a photo of a normal [cls]" / "a photo of an anomalous [cls]".
   CLIP-AC: the mean over CLIP's 80 ImageNet templates around "normal [cls]" / "anomalous [cls]"
   (`zsadkit.prompts`).
2. Image score (Eq. 1): P(anomalous | x) = softmax_c(⟨g_c, f⟩ / τ) with f the global embedding (CLS →
   ``ln_post`` → ``proj``, plain CLIP) and ⟨·,·⟩ the cosine.
3. Map: Eq. 1 on every local (patch) embedding, reshaped to the G×G grid and upsampled bilinearly to S×S.

Assumptions, since the paper names neither (recorded here and in the notebooks):

* **Local embeddings**: last-layer patch tokens → ``ln_post`` → ``proj`` into the joint space where the text
  lives (``patch_layer`` selects another layer).
* **Temperature**: τ = 0.07, the value of AnomalyCLIP's Eq. 1 in its code (`test.py`: `/ 0.07`); τ = 0.01 (CLIP's logit
  scale 100) is the option. A single softmax score's AUROC does not depend on τ.
* **Smoothing**: the Gaussian σ = 4 of AnomalyCLIP's test pipeline, applied to every method AnomalyCLIP ran
  itself (CLIP, CLIP-AC, CoOp); 0 switches it off.
* **Class names**: underscores replaced by spaces ("metal_nut" → "metal nut"), as InCTRL and mala-lab WinCLIP
  do; AnomalyCLIP's code has no CLIP baseline to check against. ``replace_underscores=False`` keeps them.

Example:
    >>> detector = ClipBaseline(load_backbone("zsad-tiny", image_size=112))  # or build_method("clip", ...)
    >>> prediction = detector.predict(torch.zeros(2, 3, 112, 112), ["bottle", "metal_nut"])
    >>> prediction.image_scores.shape, prediction.anomaly_maps.shape
    (torch.Size([2]), torch.Size([2, 112, 112]))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from zsadkit.maps import (
    ANOMALYCLIP_TEMPERATURE,
    anomaly_map_from_probabilities,
    gaussian_smooth,
    patch_text_probabilities,
    upsample_token_probabilities,
)
from zsadkit.methods.base import Prediction, backbone_for, check_options, register_method
from zsadkit.models import TextEncoder, VisualEncoder
from zsadkit.prompts import ClassTextFeatures, prompt_ensemble

__all__ = ["ClipBaseline", "ClipBaselineConfig"]


@dataclass(frozen=True)
class ClipBaselineConfig:
    """Options of the CLIP / CLIP-AC baselines (defaults: see the module docstring).

    Attributes:
        prompts: prompt ensemble name, "clip" (CLIP) or "clip-ac" (CLIP-AC); any `zsadkit.prompts` ensemble.
        temperature: τ of Eq. 1 (0.07 AnomalyCLIP, 0.01 CLIP's logit scale).
        patch_layer: 1-indexed layer of the local embeddings; None = the last layer.
        smoothing_sigma: Gaussian σ on the S×S map (AnomalyCLIP's test pipeline: 4; 0 = none).
        normalize_prompts: L2-normalise each sentence before averaging (CLIP-AC; no effect for CLIP).
        replace_underscores: "metal_nut" → "metal nut" in prompts.
    """

    prompts: str = "clip"
    temperature: float = ANOMALYCLIP_TEMPERATURE
    patch_layer: int | None = None
    smoothing_sigma: float = 4.0
    normalize_prompts: bool = True
    replace_underscores: bool = True

    def __post_init__(self) -> None:
        prompt_ensemble(self.prompts)  # fails early on an unknown name
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.smoothing_sigma < 0:
            raise ValueError(f"smoothing_sigma must be >= 0, got {self.smoothing_sigma}")


class ClipBaseline:
    """CLIP zero-shot anomaly detection with fixed prompts (CLIP, CLIP-AC).

    Args:
        clip: an open_clip CLIP loaded for the input size (`zsadkit.models.load_clip(..., image_size=S)`).
        config: options; defaults to CLIP with AnomalyCLIP's τ.
    """

    def __init__(self, clip: CLIP, config: ClipBaselineConfig | None = None) -> None:
        self.config = config or ClipBaselineConfig()
        self.clip = clip.eval()
        self.visual = VisualEncoder(clip)
        self.text = TextEncoder(clip)
        self.ensemble = prompt_ensemble(self.config.prompts)
        self.class_text = ClassTextFeatures(
            self.text, self.ensemble, normalize_prompts=self.config.normalize_prompts,
            replace_underscores=self.config.replace_underscores,
        )
        layer = self.config.patch_layer or self.visual.num_layers
        if not 1 <= layer <= self.visual.num_layers:
            raise ValueError(f"patch_layer must be in [1, {self.visual.num_layers}], got {self.config.patch_layer}")
        self.patch_layer = layer

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    @property
    def device(self) -> torch.device:
        return self.clip.visual.proj.device

    def text_features(self, class_name: str) -> torch.Tensor:
        """(2, D) unit-norm (normal, anomalous) class embeddings, computed once per class."""
        return self.class_text(class_name)

    def batch_text_features(self, class_names: Sequence[str]) -> torch.Tensor:
        """(B, 2, D) text embeddings of each image's class."""
        return self.class_text.batch(class_names)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: Sequence[str]) -> Prediction:
        """Image scores (B,) and anomaly maps (B, S, S) of normalised images (B, 3, S, S)."""
        if len(class_names) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(class_names)} class names")
        text = self.batch_text_features(class_names)
        features = self.visual(images.to(self.device), layers=[self.patch_layer], tokens="projected")
        tau = self.config.temperature
        # Eq. 1 on the global embedding: P(anomalous | x).
        global_embedding = F.normalize(features.global_embedding, dim=-1).unsqueeze(1)  # (B, 1, D)
        image_scores = patch_text_probabilities(global_embedding, text, tau)[:, 0, 1]
        # Eq. 1 on each local embedding, then the G×G grid upsampled to S×S.
        patch_tokens = F.normalize(features.patch_tokens[0], dim=-1)  # (B, N, D)
        state_maps = upsample_token_probabilities(
            patch_text_probabilities(patch_tokens, text, tau), self.image_size, has_cls=False
        )
        anomaly_maps = gaussian_smooth(anomaly_map_from_probabilities(state_maps), self.config.smoothing_sigma)
        return Prediction(image_scores=image_scores, anomaly_maps=anomaly_maps)


def _builder(prompts: str) -> Callable[..., ClipBaseline]:
    def build(
        backbone: str = "zsad-tiny",
        pretrained: str = "",
        image_size: int = 112,
        device: str = "cpu",
        backbone_seed: int = 0,
        train_seed: int = 0,
        checkpoint: str = "",
        clip: nn.Module | None = None,
        **options: Any,
    ) -> ClipBaseline:
        check_options(prompts, ClipBaselineConfig, options)
        if checkpoint:
            raise ValueError(f"{prompts}: a training-free baseline takes no checkpoint, got {checkpoint!r}")
        clip = backbone_for(clip, backbone, pretrained, image_size, device, backbone_seed)
        return ClipBaseline(clip, ClipBaselineConfig(**{"prompts": prompts, **options}))

    build.__doc__ = (f"The {prompts!r} baseline from run settings (`train_seed` is unused: nothing is drawn); "
                     "`options` are `ClipBaselineConfig` fields.")
    return build


register_method("clip")(_builder("clip"))
register_method("clip-ac")(_builder("clip-ac"))
