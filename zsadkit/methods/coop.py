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

Deviation, recorded: CoOp's own optimiser is SGD (lr 0.002, cosine schedule); the shared trainer
(`zsadkit.training`) runs AnomalyCLIP's Adam (lr 1e-3, betas (0.5, 0.999), batch 8, 15 epochs), which is what
"trained like AnomalyCLIP" means here.

Example:
    >>> coop = build_coop(backbone="zsad-tiny", image_size=112)
    >>> coop.prompt_learner.prompt_texts(["metal_nut"])[1].split()[16:]
    ['anomalous', 'metal', 'nut.']
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from zsadkit.methods.anomalyclip import AnomalyCLIP, AnomalyCLIPConfig, check_options, on_backbone
from zsadkit.methods.base import register_method
from zsadkit.methods.vand import evenly_spaced_layers
from zsadkit.models import load_backbone
from zsadkit.prompt_learning import PromptLearnerConfig

COOP_N_CTX = 16


@dataclass(frozen=True)
class CoOpConfig(AnomalyCLIPConfig):
    """AnomalyCLIP's settings with CoOp's prompts (defaults for ViT-L/14@336; see `coop_config` for others).

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


def coop_config(backbone: str = "ViT-L-14-336", num_layers: int | None = None, **overrides) -> CoOpConfig:
    """CoOp settings for a backbone: four evenly spaced layers (ViT-L 6/12/18/24, ViT-B 3/6/9/12, 4-layer tiny
    1/2/3/4), from `num_layers` when given."""
    layers = num_layers or (4 if backbone == "zsad-tiny" else 12 if backbone.startswith("ViT-B") else 24)
    return replace(CoOpConfig(feature_layers=evenly_spaced_layers(layers)), **overrides)


@register_method("coop")
def build_coop(
    backbone: str = "zsad-tiny",
    pretrained: str = "",
    image_size: int = 112,
    checkpoint: str = "",
    device: str = "cpu",
    seed: int = 0,
    **config_overrides,
) -> AnomalyCLIP:
    """CoOp from run settings; `config_overrides` are `CoOpConfig` fields, `checkpoint` learned prompts
    (`AnomalyCLIP.save_prompts` output or a training epoch checkpoint). Train with
    `zsadkit.methods.anomalyclip.fit`."""
    check_options("coop", CoOpConfig, config_overrides)
    clip = load_backbone(backbone, pretrained, image_size, device, seed)
    config = coop_config(backbone, len(clip.visual.transformer.resblocks), **config_overrides)
    return on_backbone(clip, config, checkpoint, device, seed)
