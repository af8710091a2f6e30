"""CoOp adapted to zero-shot anomaly detection, as AnomalyCLIP's appendix A.2 describes it (Zhou et al. 2022b).

CoOp's learnable prompt "[V1]…[VN][cls]" becomes two prompts,

    normal:     [V1][V2]…[VN][normal][cls].
    anomalous:  [V1][V2]…[VN][anomalous][cls].

with the V_i learnable word embeddings and [cls] each image's class name (object-aware). "Anomaly probabilities
and segmentation are obtained in the same way as for AnomalyCLIP": this module is AnomalyCLIP's model
(`zsadkit.methods.anomalyclip.AnomalyCLIP`: Eq. 1 scoring with τ = 0.07 on the global embedding and on local
patch embeddings, training with global cross-entropy + local focal + dice, maps summed over layers and smoothed
with σ = 4) with CoOp's prompts in place of the object-agnostic ones and none of AnomalyCLIP's other parts:

* no DPAM (plain Q-K attention tokens), no deep text prompts;
* CoOp's defaults for the context: N = 16 words, one context shared by both prompts (CoOp's "unified" context;
  the appendix does not say whether the two prompts share it), N(0, 0.02²) initialisation;
* local features from layers 6/12/18/24 (ViT-L) with λ = 1, AnomalyCLIP's paper setting at the time the CoOp
  numbers were made (without DPAM the multi-layer aliasing of AnomalyCLIP's old code does not arise).

Training (`zsadkit.recipes.coop`): AnomalyCLIP's appendix says CoOp's parameters "are kept the same as in their
paper", so the default is CoOp's optimiser: SGD (lr 0.002, momentum 0.9, weight decay 5e-4), a cosine schedule
after one constant warm-up epoch at 1e-5, batch 32 (CoOp's Dassl configuration); the epochs (15, AnomalyCLIP's
schedule) are not stated anywhere [unverified]. AnomalyCLIP's Adam is the named option `optimizer="anomalyclip"`.

Example:
    >>> coop = build_coop(backbone="zsad-tiny", image_size=112)
    >>> coop.prompt_learner.prompt_texts(["metal_nut"])[1].split()[16:]
    ['anomalous', 'metal', 'nut.']
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from zsadkit.methods.anomalyclip import AnomalyCLIP, AnomalyCLIPConfig, on_backbone
from zsadkit.methods.base import backbone_defaults, backbone_for, check_options, register_method
from zsadkit.prompt_learning import PromptLearnerConfig

__all__ = ["CoOpConfig", "build_coop", "reference_config"]

COOP_N_CTX = 16


@dataclass(frozen=True)
class CoOpConfig(AnomalyCLIPConfig):
    """AnomalyCLIP's settings with CoOp's prompts (defaults for ViT-L/14@336; see `reference_config` for others).

    Attributes (beyond `AnomalyCLIPConfig`):
        normal_word: the state word of the normal prompt ("normal").
    """

    feature_layers: tuple[int, ...] = (6, 12, 18, 24)
    dpam_first_layer: int | None = None
    n_ctx: int = COOP_N_CTX
    deep_depth: int = 1
    deep_length: int = 0
    abnormal_word: str = "anomalous"
    object_agnostic: bool = False
    shared_context: bool = True
    lam: float = 1.0
    normal_word: str = "normal"

    def prompt_config(self) -> PromptLearnerConfig:
        """CoOp's prompts: "[V1..VN] normal [cls]." / "[V1..VN] anomalous [cls].", class names per image."""
        return PromptLearnerConfig(
            n_ctx=self.n_ctx,
            deep_depth=self.deep_depth,
            deep_length=self.deep_length,
            state_templates=(f"{self.normal_word} {{}}", f"{self.abnormal_word} {{}}"),
            class_token="object" if self.object_agnostic else None,
            shared_context=self.shared_context,
        )


def reference_config(clip: nn.Module, **overrides: Any) -> CoOpConfig:
    """CoOp settings for `clip`'s depth: four evenly spaced local layers (ViT-L 6/12/18/24, ViT-B 3/6/9/12, the
    4-layer tiny 1/2/3/4); `overrides` are `CoOpConfig` fields."""
    return replace(CoOpConfig(feature_layers=backbone_defaults(clip).four_layers), **overrides)


@register_method("coop")
def build_coop(
    backbone: str = "zsad-tiny",
    pretrained: str = "",
    image_size: int = 112,
    device: str = "cpu",
    backbone_seed: int = 0,
    train_seed: int = 0,
    checkpoint: str = "",
    clip: nn.Module | None = None,
    **config_overrides: Any,
) -> AnomalyCLIP:
    """CoOp from run settings; `config_overrides` are `CoOpConfig` fields, `checkpoint` learned prompts
    (`AnomalyCLIP.save_prompts` output or a training epoch checkpoint). Train with `zsadkit.recipes.coop.fit`."""
    check_options("coop", CoOpConfig, config_overrides)
    clip = backbone_for(clip, backbone, pretrained, image_size, device, backbone_seed)
    return on_backbone(clip, reference_config(clip, **config_overrides), checkpoint, device, train_seed)
