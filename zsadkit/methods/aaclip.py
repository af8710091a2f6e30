"""AA-CLIP: anomaly-aware CLIP through residual adapters and two-stage training (Ma et al., CVPR 2025).

Follows the official code (Mwxinnn/AA-CLIP @ 53db195; the paper's method section is Sec. 3, Fig. 3) and its
paper where they agree; where they differ, each difference is a named option of `AACLIPConfig` whose default is
the code's behaviour. `python -m zsadkit.verify aaclip DIR` checks this file against the code's outputs.

* Residual adapter (Sec. 3, Fig. 3; `model/adapter.py:91-99, 128-136`, `model/adapter_modules.py`): A(x) = LeakyReLU(W x)
  (no bias, Xavier init), rescaled token by token to the norm of its input, Â(x) = A(x)·‖x‖/‖A(x)‖, fused after a
  **whole block** as λ·Â(h) + (1 − λ)·h (λ = 0.1), after text blocks 1–3 and vision blocks 1–6 of ViT-L.
* Text anchors (Sec. 3, stage 1; `forward_utils.py:138-162`): the adapted text tower's EOT feature goes through a
  **new projection with LeakyReLU** (CLIP's `text_projection` is not used); 3 normal × 2 and 5 anomalous × 2
  template sentences per class (`zsadkit.prompts` "aaclip"), each normalised, averaged per state, re-normalised:
  T_N(c), T_A(c). The class phrase is the reference's hand-written description (`class_names="descriptive"`).
* Stage 1 features (`train.py:74-85`): a "surgery" copy whose blocks 6–24 use single-path V-V attention
  (`model/transformer.py:407-425`), tapped at the levels, `ln_post @ proj`, normalised, plus the normalised global
  CLIP embedding on every patch vector (`stage1_add_global`).
* Stage 1 objective (`train.py:87-96`): focal + dice(P_N, 1 − M) + dice(P_A, M) on softmax(up(100·F·[T_N, T_A]))
  plus γ·L_dis, L_dis = (mean_b ⟨T_N, T_A⟩)² (γ = 0.1).
* Stage 2 (`model/adapter.py:67-112`, `train.py:144-154`): vision adapters in the Q-K tower, per level
  V_l = normalize(P_l(ln_post(tokens_l))) (patches only), d = mean over patches of normalize(P_det(ln_post(tokens_L)));
  loss CE([d·T_N, d·T_A], y) (raw cosines) + Σ_l L_seg(V_l).
* Inference (`test.py:80-94`, `forward_utils.py:196-216`): per level (100·V·T_A + 1 − 100·V·T_N)/2 on the patch grid,
  Gaussian-blurred there (kernel 7/σ 1 industrial, 9/1.5 medical), upsampled bilinearly (align_corners=True),
  summed over levels; image score s = (d·T_A + 1)/2; per class, over the whole test set, min-max of maps and of s,
  then 0.5·max(M̃) + 0.5·s̃ (industrial) or max(M̃) (medical) (`forward_utils.py:233-253`,
  `transductive_image_scores`).

Paper vs code (the code's behaviour is each default; the paper's reading is the other value):

| option | code (default) | paper's reading |
|---|---|---|
| `stage1_cls_loss` | False: no L_cls in stage 1 (issues #29, #38) | True: CE of the global embedding against the anchors |
| `stage1_add_global` | True: global embedding added to every patch vector | False |
| `stage1_levels` | "last": `loss` re-assigned in the level loop, only the last level trains | "all": Σ over levels |
| `disentangle_reduction` | "mean_then_square": (mean_b ⟨T_N, T_A⟩)² | "square_then_mean": mean_b ⟨T_N, T_A⟩² |
| `vv_batch_mixing` | True: the surgery V-V attention runs across the batch at each token position | False: per image |
| `surgery_path` | "single": V-V replaces the residual stream's attention from block 6 (`DAPM_replace`), MLP kept | "dual": DPAM-style V-V side stream beside the CLIP stream, no MLP |
| `image_score_fusion` | "transductive": per-class min-max over the test set | "per_image": fixed-range scaling |

Deviations of ours (all exact or documented): the text tower runs on tokens up to the last end-of-text token
(`crop_text_after_eot`; exact, the attention is causal and the adapters act per token); the blur's reflect
border continues periodically on patch grids smaller than the kernel (the reference raises there); `predict`
works per batch, so its image score is the per-image fusion (the reference's transductive score comes from
`transductive_image_scores` over a class, as `zsadkit.recipes.aaclip.evaluate` does).

Example:
    >>> model = build_aaclip(backbone="zsad-tiny", image_size=112)
    >>> prediction = model.predict(torch.randn(2, 3, 112, 112), ["bottle", "bottle"])
    >>> prediction.image_scores.shape, prediction.anomaly_maps.shape
    (torch.Size([2]), torch.Size([2, 112, 112]))
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from zsadkit.losses import binary_dice_loss, focal_loss
from zsadkit.maps import gaussian_blur, state_maps
from zsadkit.methods.base import (
    Prediction,
    backbone_defaults,
    backbone_for,
    check_options,
    register_method,
    seeded,
)
from zsadkit.models import AttentionVariant, TextEncoder, VisualEncoder, module_fingerprint, tokenize
from zsadkit.models.runtime import frozen_features
from zsadkit.prompts import STATES, ensemble_text_features, prompt_ensemble

__all__ = [
    "AACLIP",
    "AACLIPConfig",
    "AACLIPScores",
    "AdaptedImageFeatures",
    "DOMAINS",
    "Projection",
    "ResidualAdapter",
    "build_aaclip",
    "class_phrase",
    "import_official_state",
    "on_backbone",
    "reference_config",
    "transductive_image_scores",
]

CLASS_NAMES_FILE = Path(__file__).with_name("aaclip_class_names.yaml")
CHECKPOINT_FORMAT = "zsadkit-aaclip-adapters/1"
DOMAINS = ("industrial", "medical")
#: Parameter-name prefixes of the two training stages.
TEXT_PARAMETERS = ("text_adapters.", "text_projection.")
IMAGE_PARAMETERS = ("image_adapters.", "seg_projections.", "det_projection.")


@dataclass(frozen=True)
class AACLIPConfig:
    """Every AA-CLIP setting; defaults are the official code's (`train.py`/`test.py` arguments) for ViT-L/14@336.

    Attributes:
        levels: 1-indexed vision blocks whose tokens give the multi-granularity patch features (6, 12, 18, 24).
        text_adapter_layers: residual adapters after text blocks 1..n (`--text_adapt_until 3`).
        image_adapter_layers: residual adapters after vision blocks 1..n (`--image_adapt_until 6`).
        text_adapter_weight: λ of the text adapters (`--text_adapt_weight 0.1`).
        image_adapter_weight: λ of the vision adapters (`--image_adapt_weight 0.1`).
        projection_relu: LeakyReLU after the seg/det projections (`--relu`; off in `scripts.sh`).
        class_names: "descriptive" (the reference's REAL_NAMES, `aaclip_class_names.yaml`) or "raw" labels.
        prompts: the prompt ensemble of `zsadkit.prompts` ("aaclip").
        logit_scale: the 100 of 100·⟨feature, anchor⟩ in the maps (CLIP's logit scale).
        surgery_first_layer: first vision block with the stage-1 V-V attention (`DAPM_replace(20)`: 6 of 24).
        vv_batch_mixing: the reference's V-V layout bug (attention across the batch per token position); False
            runs V-V per image.
        surgery_path: "single" (the reference, `DAPM_replace`: V-V replaces the attention of the residual stream
            from `surgery_first_layer` on, MLP kept) or "dual" (CLIP Surgery's and AnomalyCLIP's DPAM design: a
            V-V side stream beside the unchanged CLIP stream, no MLP; taps from `surgery_first_layer` on read it).
        stage1_add_global: add the normalised global embedding to every stage-1 patch vector.
        stage1_cls_loss: add CE([g·T_N, g·T_A], y) of the global embedding g to stage 1 (the paper's L_cls).
        stage1_levels: "last" (the reference: only the last level's L_seg reaches the loss) or "all".
        disentangle_weight: γ of L_dis (`--text_norm_weight 0.1`).
        disentangle_reduction: "mean_then_square" (reference) or "square_then_mean" (the paper's |⟨T_N, T_A⟩|²).
        industrial_blur: (kernel size, σ) of the patch-grid blur on industrial sets.
        medical_blur: (kernel size, σ) on medical sets.
        industrial_map_weight: weight of the map maximum in the fused image score (industrial: 0.5).
        medical_map_weight: the same for medical sets (1: the map maximum only).
        image_score_fusion: "transductive" (the reference: min-max over the class's test set) or "per_image".
        crop_text_after_eot: run the text tower on tokens up to the last end-of-text token (exact, faster).
    """

    levels: tuple[int, ...] = (6, 12, 18, 24)
    text_adapter_layers: int = 3
    image_adapter_layers: int = 6
    text_adapter_weight: float = 0.1
    image_adapter_weight: float = 0.1
    projection_relu: bool = False
    class_names: Literal["descriptive", "raw"] = "descriptive"
    prompts: str = "aaclip"
    logit_scale: float = 100.0
    surgery_first_layer: int = 6
    vv_batch_mixing: bool = True
    surgery_path: Literal["single", "dual"] = "single"
    stage1_add_global: bool = True
    stage1_cls_loss: bool = False
    stage1_levels: Literal["last", "all"] = "last"
    disentangle_weight: float = 0.1
    disentangle_reduction: Literal["mean_then_square", "square_then_mean"] = "mean_then_square"
    industrial_blur: tuple[int, float] = (7, 1.0)
    medical_blur: tuple[int, float] = (9, 1.5)
    industrial_map_weight: float = 0.5
    medical_map_weight: float = 1.0
    image_score_fusion: Literal["transductive", "per_image"] = "transductive"
    crop_text_after_eot: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(int(level) for level in self.levels))
        for name in ("industrial_blur", "medical_blur"):
            kernel, sigma = getattr(self, name)
            object.__setattr__(self, name, (int(kernel), float(sigma)))
            if kernel < 1 or kernel % 2 == 0 or sigma <= 0:
                raise ValueError(f"AACLIPConfig.{name}: (odd kernel size, σ > 0) expected, got {(kernel, sigma)}")
        if not self.levels:
            raise ValueError("AACLIPConfig.levels must name at least one vision block")
        if self.text_adapter_layers < 0 or self.image_adapter_layers < 0:
            raise ValueError("AACLIPConfig: adapter layer counts must be >= 0")
        for name in ("text_adapter_weight", "image_adapter_weight", "industrial_map_weight", "medical_map_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"AACLIPConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        choices = {"class_names": ("descriptive", "raw"), "stage1_levels": ("last", "all"),
                   "disentangle_reduction": ("mean_then_square", "square_then_mean"),
                   "image_score_fusion": ("transductive", "per_image"), "surgery_path": ("single", "dual")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"AACLIPConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.logit_scale <= 0 or self.disentangle_weight < 0:
            raise ValueError("AACLIPConfig: logit_scale > 0 and disentangle_weight >= 0 are required")
        prompt_ensemble(self.prompts)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def reference_config(clip: nn.Module, **overrides: Any) -> AACLIPConfig:
    """The code's settings scaled to `clip`'s depth (`zsadkit.methods.base.backbone_defaults`): the four evenly
    spaced levels, adapters after the first quarter of the blocks (6 of 24 vision, 3 of 12 text), V-V from the
    reference's first surgery block (6 of 24); `overrides` are `AACLIPConfig` fields."""
    defaults = backbone_defaults(clip)
    base = AACLIPConfig(levels=defaults.four_layers, text_adapter_layers=defaults.text_adapter_layers,
                        image_adapter_layers=defaults.vision_adapter_layers,
                        surgery_first_layer=defaults.dpam_first_layer)
    return replace(base, **overrides)


@cache
def _class_phrases() -> dict[str, dict[str, str]]:
    """{class name: {"raw": ..., "descriptive": ...}} from `aaclip_class_names.yaml` (flat over datasets)."""
    phrases: dict[str, dict[str, str]] = {}
    for dataset, classes in yaml.safe_load(CLASS_NAMES_FILE.read_text()).items():
        for name, entry in classes.items():
            if str(name) in phrases and phrases[str(name)] != entry:
                raise ValueError(f"{CLASS_NAMES_FILE}: class {name!r} of {dataset!r} has other phrases than before")
            phrases[str(name)] = {"raw": str(entry["raw"]), "descriptive": str(entry["descriptive"])}
    return phrases


def class_phrase(class_name: str, mode: Literal["descriptive", "raw"] = "descriptive") -> str:
    """What replaces "{}" in the prompts of a class: the reference's description or the raw label (an unlisted
    class keeps its label in both modes).

    >>> class_phrase("pcb3"), class_phrase("pcb3", "raw"), class_phrase("fabric")
    ('infrared sensor pcb module', 'pcb3', 'fabric')
    """
    if mode not in ("descriptive", "raw"):
        raise ValueError(f"class name mode must be 'descriptive' or 'raw', got {mode!r}")
    entry = _class_phrases().get(class_name)
    return entry[mode] if entry is not None else class_name


class Projection(nn.Module):
    """y = W x (no bias), optionally followed by LeakyReLU (the reference's `SimpleProj`)."""

    def __init__(self, in_features: int, out_features: int, leaky_relu: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.leaky_relu = leaky_relu

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        projected = self.linear(features)
        return F.leaky_relu(projected) if self.leaky_relu else projected


class ResidualAdapter(nn.Module):
    """The residual adapter after a block: λ·Â(h) + (1 − λ)·h, Â(h) = A(h)·‖h‖/‖A(h)‖, A(h) = LeakyReLU(W h).

    Args:
        width: token width W.
        weight: λ.
    """

    def __init__(self, width: int, weight: float) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width, bias=False)
        self.lam = weight

    def adapt(self, hidden: torch.Tensor) -> torch.Tensor:
        """A(h) = LeakyReLU(W h), before the norm rescaling."""
        return F.leaky_relu(self.linear(hidden))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(…, W) tokens after a block → the fused tokens (…, W)."""
        adapted = self.adapt(hidden)
        adapted = adapted * hidden.norm(dim=-1, keepdim=True) / adapted.norm(dim=-1, keepdim=True)
        return self.lam * adapted + (1 - self.lam) * hidden


@dataclass
class AdaptedImageFeatures:
    """Stage-2 image features.

    Attributes:
        seg_tokens: (L, B, N, E) normalised per-level patch features V_l.
        det_token: (B, E) mean of the normalised det projections (not re-normalised).
    """

    seg_tokens: torch.Tensor
    det_token: torch.Tensor


@dataclass
class AACLIPScores:
    """What the test-time forward gives before any fusion.

    Attributes:
        image_scores: (B,) s = (d·T_A + 1)/2.
        level_maps: (L, B, S, S) blurred, upsampled per-level maps.
        anomaly_maps: (B, S, S) their sum over levels.
    """

    image_scores: torch.Tensor
    level_maps: torch.Tensor
    anomaly_maps: torch.Tensor


class AACLIP(nn.Module):
    """Frozen CLIP + residual adapters, text projection and seg/det projections.

    Args:
        clip: open_clip `CLIP` (`zsadkit.models.load_clip`, resized for the input size); frozen.
        config: `AACLIPConfig` (levels and adapter depths must fit the backbone; see `reference_config`).
    """

    def __init__(self, clip: nn.Module, config: AACLIPConfig | None = None) -> None:
        super().__init__()
        self.config = config or AACLIPConfig()
        self.clip = clip.eval()
        for parameter in clip.parameters():
            parameter.requires_grad_(False)
        self.visual = VisualEncoder(clip)
        self.text = TextEncoder(clip)
        vision_layers, text_layers = self.visual.num_layers, len(self.text.blocks)
        checks = [("levels", self.config.levels, vision_layers),
                  ("surgery_first_layer", (self.config.surgery_first_layer,), vision_layers),
                  ("image_adapter_layers", (max(self.config.image_adapter_layers, 1),), vision_layers),
                  ("text_adapter_layers", (max(self.config.text_adapter_layers, 1),), text_layers)]
        for name, values, limit in checks:
            bad = [value for value in values if not 1 <= value <= limit]
            if bad:
                raise ValueError(f"AACLIPConfig.{name} {bad} outside the {limit} blocks of this backbone (valid: 1.."
                                 f"{limit}; use reference_config(clip) for the reference's choice)")
        embed_dim, vision_width, text_width = self.text.embed_dim, self.visual.width, self.text.width
        cfg = self.config
        self.image_adapters = nn.ModuleList(
            [ResidualAdapter(vision_width, cfg.image_adapter_weight) for _ in range(cfg.image_adapter_layers)])
        self.seg_projections = nn.ModuleList(
            [Projection(vision_width, embed_dim, cfg.projection_relu) for _ in cfg.levels])
        self.det_projection = Projection(vision_width, embed_dim, cfg.projection_relu)
        self.text_adapters = nn.ModuleList(
            [ResidualAdapter(text_width, cfg.text_adapter_weight) for _ in range(cfg.text_adapter_layers)])
        self.text_projection = Projection(text_width, embed_dim, leaky_relu=True)
        for parameter in (*self.image_parameters().values(), *self.text_parameters().values()):
            nn.init.xavier_uniform_(parameter)  # `model/adapter.py:47-53`, image side first
        self.surgery_attention = AttentionVariant(("vv",), first_layer=cfg.surgery_first_layer,
                                                  path=cfg.surgery_path, batch_mixing=cfg.vv_batch_mixing)
        self.ensemble = prompt_ensemble(cfg.prompts)
        self.domain: str = "industrial"
        self._anchor_cache: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------- housekeeping
    @property
    def image_size(self) -> int:
        return self.visual.image_size

    @property
    def device(self) -> torch.device:
        return self.clip.visual.proj.device

    def set_domain(self, domain: str) -> AACLIP:
        """Use the blur and score fusion of "industrial" or "medical" test sets (`zsadkit.protocols.domain`)."""
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
        self.domain = domain
        return self

    def train(self, mode: bool = True) -> AACLIP:
        """Only the learned modules switch mode (CLIP stays in eval mode: no patch dropout); any switch drops the
        cached text anchors."""
        self.training = mode
        for module in (self.image_adapters, self.seg_projections, self.det_projection, self.text_adapters,
                       self.text_projection):
            module.train(mode)
        self.refresh_text_anchors()
        return self

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        """Device and dtype moves drop the cached text anchors too."""
        self.refresh_text_anchors()
        return super()._apply(fn, recurse)

    def refresh_text_anchors(self) -> None:
        """Forget the frozen anchors (call after changing the text adapters outside `train`/`load_state`)."""
        self._anchor_cache.clear()

    def text_parameters(self) -> dict[str, nn.Parameter]:
        """Stage 1's parameters: text adapters and text projection, by checkpoint name."""
        return {name: p for name, p in self.named_parameters() if name.startswith(TEXT_PARAMETERS)}

    def image_parameters(self) -> dict[str, nn.Parameter]:
        """Stage 2's parameters: vision adapters, seg and det projections, by checkpoint name."""
        return {name: p for name, p in self.named_parameters() if name.startswith(IMAGE_PARAMETERS)}

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Everything AA-CLIP learns (both stages)."""
        return {**self.text_parameters(), **self.image_parameters()}

    def fingerprint(self) -> dict[str, object]:
        """What besides the training settings and samples determines the learned parameters."""
        return {"config": asdict(self.config), "backbone_weights": module_fingerprint(self.clip)}

    # ------------------------------------------------------------------------------------- text: anchors
    def phrase(self, class_name: str) -> str:
        return class_phrase(class_name, self.config.class_names)

    def sentences(self, class_name: str) -> list[str]:
        """The prompt sentences of a class: normal ones first, state-major (`forward_utils.py:147-152`)."""
        phrase = self.phrase(class_name)
        return [sentence for state in STATES for sentence in self.ensemble.sentences(phrase, state)]

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Adapted text features (P, E), not normalised: adapters after blocks 1..n, `ln_final` at the EOT token,
        then the new projection with LeakyReLU (`model/adapter.py:114-145`)."""
        if self.config.crop_text_after_eot:
            token_ids = token_ids[:, : int(token_ids.argmax(dim=-1).max()) + 1]
        adapters = {index + 1: adapter for index, adapter in enumerate(self.text_adapters)}
        eot = self.text.encode_tokens(token_ids.to(self.device), adapters=adapters, project=False)
        return self.text_projection(eot)

    def text_anchors(self, class_names: Sequence[str]) -> torch.Tensor:
        """(C, 2, E) unit-norm (T_N, T_A) of each class, with the graph (one text-tower pass for all classes)."""
        sentences = [sentence for name in class_names for sentence in self.sentences(name)]
        features = self.encode_text(tokenize(sentences))
        templates = len(self.ensemble.templates)
        counts = (len(self.ensemble.normal_states) * templates, len(self.ensemble.anomalous_states) * templates)
        anchors, start = [], 0
        for _ in class_names:
            per_state = []
            for count in counts:
                per_state.append(ensemble_text_features(features[start : start + count]))
                start += count
            anchors.append(torch.stack(per_state))
        return torch.stack(anchors)

    def anchors_per_image(self, class_names: Sequence[str]) -> torch.Tensor:
        """(B, 2, E) anchors of each image's class, with the graph (stage 1)."""
        unique = sorted(set(class_names))
        anchors = self.text_anchors(unique)
        return anchors[torch.tensor([unique.index(name) for name in class_names], device=anchors.device)]

    def frozen_anchors(self, class_names: Sequence[str]) -> torch.Tensor:
        """(B, 2, E) anchors without a graph, computed once per class (stage 2 and inference)."""
        missing = sorted(set(class_names) - set(self._anchor_cache))
        if missing:
            with frozen_features():
                computed = self.text_anchors(missing)
            for name, anchors in zip(missing, computed, strict=True):
                self._anchor_cache[name] = anchors
        return torch.stack([self._anchor_cache[name] for name in class_names])

    @staticmethod
    def disentanglement(anchors: torch.Tensor, reduction: str = "mean_then_square") -> torch.Tensor:
        """L_dis of (B, 2, E) per-image anchors: (mean_b ⟨T_N, T_A⟩)² (`train.py:91-95`) or mean_b ⟨T_N, T_A⟩²."""
        cosines = (anchors[:, 0] * anchors[:, 1]).sum(dim=1)
        return cosines.mean() ** 2 if reduction == "mean_then_square" else (cosines**2).mean()

    # --------------------------------------------------------------------------------- stage-1 features
    @torch.no_grad()
    def stage1_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frozen visual side of stage 1 (`train.py:74-84`): what the feature cache stores.

        Returns:
            "patch_features" (B, L, N, E): normalised `ln_post(tokens) @ proj` of the surgery tower per level;
            "global_embedding" (B, E): the normalised CLIP image embedding (`ln_post(CLS) @ proj`).
        """
        images = images.to(self.device)
        surgery = self.visual(images, self.config.levels, tokens="projected", attention=self.surgery_attention,
                              return_global=False)
        patches = torch.stack([F.normalize(tokens[:, 1:], dim=-1) for tokens in surgery.layer_tokens], dim=1)
        global_embedding = self.visual(images, (), global_ln_post=True).global_embedding
        return {"patch_features": patches, "global_embedding": F.normalize(global_embedding, dim=-1)}

    def stage1_cache_key(self) -> dict[str, object]:
        """Everything `stage1_features` depends on (weights by fingerprint)."""
        source = getattr(self.clip, "zsad_source", None)
        return {"method": "aaclip-stage1", "backbone": asdict(source) if source is not None else None,
                "weights": module_fingerprint(self.visual), "image_size": self.image_size,
                "levels": list(self.config.levels), "surgery_first_layer": self.config.surgery_first_layer,
                "surgery_path": self.config.surgery_path,
                "vv_batch_mixing": self.config.vv_batch_mixing, "tokens": "ln_post+proj normalised",
                "global": "ln_post(cls)@proj normalised"}

    # ----------------------------------------------------------------------------------- stage-2 features
    def image_adapter_hooks(self) -> dict[int, nn.Module]:
        """{1-indexed vision block: its residual adapter}."""
        return {index + 1: adapter for index, adapter in enumerate(self.image_adapters)}

    def encode_image(self, images: torch.Tensor) -> AdaptedImageFeatures:
        """Stage-2 features with the graph through the adapters (`model/adapter.py:67-112`)."""
        features = self.visual(images.to(self.device), self.config.levels, tokens="ln_post",
                               adapters=self.image_adapter_hooks(), return_global=False)
        patches = [tokens[:, 1:] for tokens in features.layer_tokens]
        seg = torch.stack([F.normalize(project(tokens), dim=-1)
                           for project, tokens in zip(self.seg_projections, patches, strict=True)])
        det = F.normalize(self.det_projection(patches[-1]), dim=-1).mean(dim=1)
        return AdaptedImageFeatures(seg, det)

    # ------------------------------------------------------------------------------------- maps and losses
    def state_probabilities(self, patch_features: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """(B, 2, S, S) softmax over (normal, anomalous) of up(100·F·[T_N, T_A]) (`forward_utils.py:196-216`,
        training branch: bilinear with align_corners=True on the logits, then the softmax)."""
        maps = state_maps(patch_features, anchors, 1.0 / self.config.logit_scale, self.image_size, has_cls=False,
                          order="upsample_then_softmax", align_corners=True)
        return maps.permute(0, 3, 1, 2)

    @staticmethod
    def segmentation_loss(probabilities: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """L_seg = Focal(P, M) + Dice(P_N, 1 − M) + Dice(P_A, M) (`forward_utils.py:223-227`)."""
        return (focal_loss(probabilities, masks) + binary_dice_loss(probabilities[:, 0], 1 - masks)
                + binary_dice_loss(probabilities[:, 1], masks))

    def stage1_losses(self, rows: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Stage 1 on a batch of stage-1 rows (`stage1_features` + "mask", "label", "class_name").

        Returns:
            "loss"; "seg" (L_seg summed over the trained levels); "disentangle" (L_dis, before γ); "cls" (the
            stage-1 CE when `stage1_cls_loss`, else 0); "seg_per_level": L_seg of each trained level (the last
            one only with `stage1_levels="last"`: the reference computes the other three and discards them).
        """
        cfg = self.config
        anchors = self.anchors_per_image(list(rows["class_name"]))
        masks = (rows["mask"].to(self.device) > 0.5).float()
        patches = rows["patch_features"].to(self.device)
        global_embedding = rows["global_embedding"].to(self.device)
        if cfg.stage1_add_global:
            patches = patches + global_embedding[:, None, None]
        trained = [patches.shape[1] - 1] if cfg.stage1_levels == "last" else range(patches.shape[1])
        per_level = torch.stack([self.segmentation_loss(self.state_probabilities(patches[:, level], anchors), masks)
                                 for level in trained])
        seg = per_level.sum()
        disentangle = self.disentanglement(anchors, cfg.disentangle_reduction)
        cls = per_level.new_zeros(())
        if cfg.stage1_cls_loss:
            logits = torch.einsum("bd,bkd->bk", global_embedding, anchors)
            cls = F.cross_entropy(logits, torch.as_tensor(rows["label"], device=self.device).long())
        loss = seg + cfg.disentangle_weight * disentangle + cls
        return {"loss": loss, "seg": seg, "disentangle": disentangle, "cls": cls, "seg_per_level": per_level}

    def stage2_losses(self, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                      class_names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Stage 2 on a batch of images (`train.py:140-154`): CE of the det vector (raw cosines) + Σ_l L_seg.

        Returns:
            "loss", "ce", "seg" (Σ over levels), "seg_per_level" (L,).
        """
        anchors = self.frozen_anchors(class_names)
        masks = (masks.to(self.device) > 0.5).float()
        features = self.encode_image(images)
        logits = torch.einsum("bd,bkd->bk", features.det_token, anchors)
        ce = F.cross_entropy(logits, torch.as_tensor(labels, device=self.device).long())
        per_level = torch.stack([self.segmentation_loss(self.state_probabilities(tokens, anchors), masks)
                                 for tokens in features.seg_tokens])
        return {"loss": ce + per_level.sum(), "ce": ce, "seg": per_level.sum(), "seg_per_level": per_level}

    # ----------------------------------------------------------------------------------------- inference
    def blur(self) -> tuple[int, float]:
        """(kernel size, σ) of the current domain."""
        return self.config.industrial_blur if self.domain == "industrial" else self.config.medical_blur

    def map_weight(self) -> float:
        """Weight of the map maximum in the fused image score for the current domain."""
        return self.config.industrial_map_weight if self.domain == "industrial" else self.config.medical_map_weight

    def patch_logits(self, seg_tokens: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """(L, B, N, 2) 100·⟨V_l, [T_N, T_A]⟩."""
        return self.config.logit_scale * torch.einsum("lbnd,bkd->lbnk", seg_tokens, anchors)

    def level_maps(self, seg_tokens: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """(L, B, S, S): per level (logit_A + 1 − logit_N)/2 on the G×G grid, blurred there, upsampled bilinearly
        with align_corners=True (`forward_utils.py:203-213`)."""
        logits = self.patch_logits(seg_tokens, anchors)
        levels, batch, patches, _ = logits.shape
        side = math.isqrt(patches)
        grid = ((logits[..., 1] + 1 - logits[..., 0]) / 2).reshape(levels * batch, side, side)
        kernel, sigma = self.blur()
        blurred = gaussian_blur(grid, kernel, sigma)
        upsampled = F.interpolate(blurred[:, None], size=self.image_size, mode="bilinear", align_corners=True)
        return upsampled.reshape(levels, batch, self.image_size, self.image_size)

    @torch.no_grad()
    def score(self, images: torch.Tensor, class_names: Sequence[str]) -> AACLIPScores:
        """Image scores s and maps before any fusion (`test.get_predictions`)."""
        if len(class_names) != images.shape[0]:
            raise ValueError(f"AA-CLIP: {images.shape[0]} images but {len(class_names)} class names")
        anchors = self.frozen_anchors(class_names)
        features = self.encode_image(images)
        level_maps = self.level_maps(features.seg_tokens, anchors)
        image_scores = (torch.einsum("bd,bd->b", features.det_token, anchors[:, 1]) + 1) / 2
        return AACLIPScores(image_scores, level_maps, level_maps.sum(dim=0))

    def map_range(self) -> tuple[float, float]:
        """The range of a summed map: each level's (c·cos_A + 1 − c·cos_N)/2 lies in [(1 − 2c)/2, (1 + 2c)/2]."""
        scale, levels = self.config.logit_scale, len(self.config.levels)
        return levels * (1 - 2 * scale) / 2, levels * (1 + 2 * scale) / 2

    def per_image_image_scores(self, scores: AACLIPScores) -> torch.Tensor:
        """w·max(M) scaled by the map's fixed range + (1 − w)·s, image by image (the non-transductive fusion)."""
        low, high = self.map_range()
        map_term = (scores.anomaly_maps.flatten(1).amax(dim=1) - low) / (high - low)
        weight = self.map_weight()
        return weight * map_term + (1 - weight) * scores.image_scores

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: Sequence[str]) -> Prediction:
        """Maps (B, S, S) and per-image fused scores (B,) of a batch (the `Detector` protocol)."""
        scores = self.score(images, class_names)
        return Prediction(self.per_image_image_scores(scores), scores.anomaly_maps)

    # --------------------------------------------------------------------------------------- checkpoints
    def save_adapters(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
        """Write every learned tensor to a safetensors file with the configuration in its metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: value.detach().cpu().contiguous() for name, value in self.trainable_parameters().items()}
        save_file(tensors, str(path), metadata={"format": CHECKPOINT_FORMAT, "config": self.config.to_json(),
                                                **dict(metadata or {})})
        return path

    def load_checkpoint(self, path: str | Path, epoch: int | None = None) -> list[str]:
        """Load learned tensors; returns the names loaded.

        Accepts `save_adapters` output, a `zsadkit.training` epoch checkpoint of either stage
        (`epoch_XXX.safetensors`), an official `text_adapter.pth` or `image_adapter[_N].pth`, or an official
        `save_path` folder: its `text_adapter.pth` and `image_adapter.pth` (the last epoch), or
        `image_adapter_<epoch>.pth` with `epoch` (the paper's numbers are epoch 15's).
        """
        path = Path(path)
        if path.is_dir():
            image_file = "image_adapter.pth" if epoch is None else f"image_adapter_{epoch}.pth"
            files = [path / "text_adapter.pth", path / image_file]
            missing = [str(file) for file in files if not file.is_file()]
            if missing:
                raise FileNotFoundError(f"AA-CLIP checkpoint folder {path}: missing {missing} (an official save_path "
                                        "holds text_adapter.pth, image_adapter.pth and image_adapter_<epoch>.pth)")
            return [name for file in files for name in self.load_checkpoint(file)]
        if not path.is_file():
            raise FileNotFoundError(f"AA-CLIP checkpoint {path} does not exist")
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            self._check_saved_config(path, metadata)
            state = load_file(str(path), device="cpu")
            if any(key.startswith("param/") for key in state):  # a `zsadkit.training` epoch checkpoint
                state = {key[len("param/"):]: value for key, value in state.items() if key.startswith("param/")}
        else:
            state = import_official_state(torch.load(path, map_location="cpu", weights_only=True), self,
                                          source=str(path))
        self.load_state(state, source=str(path))
        return sorted(state)

    def _check_saved_config(self, path: Path, metadata: Mapping[str, str]) -> None:
        saved = None
        if metadata.get("format") == CHECKPOINT_FORMAT and "config" in metadata:
            saved = json.loads(metadata["config"])
        elif "fingerprint" in metadata:
            saved = json.loads(metadata["fingerprint"]).get("config")
        if not isinstance(saved, dict):
            return
        shape_fields = ("levels", "text_adapter_layers", "image_adapter_layers", "projection_relu",
                        "text_adapter_weight", "image_adapter_weight")
        own = json.loads(self.config.to_json())
        differing = [f"{name}: saved {saved[name]!r}, model {own[name]!r}" for name in shape_fields
                     if name in saved and saved[name] != own[name]]
        if differing:
            raise ValueError(f"AA-CLIP checkpoint {path} was trained with another adapter configuration "
                             f"({'; '.join(differing)}); build the model with the saved settings")

    def load_state(self, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Copy learned tensors by name (a subset is fine: one stage), checking names and shapes."""
        own = self.trainable_parameters()
        unexpected = sorted(set(state) - set(own))
        wrong = [f"{key}: {tuple(state[key].shape)} vs {tuple(own[key].shape)}" for key in state
                 if key in own and state[key].shape != own[key].shape]
        if unexpected or wrong or not state:
            raise ValueError(f"AA-CLIP checkpoint {source} does not fit this model: unexpected {unexpected}, wrong "
                             f"shapes {wrong}{', no tensors' if not state else ''}")
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value.to(own[name].dtype))
        self.refresh_text_anchors()


def import_official_state(checkpoint: Mapping[str, object], model: AACLIP,
                          source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Translate an official checkpoint (`torch.load(..., weights_only=True)` of `text_adapter.pth` or
    `image_adapter[_N].pth`, `train.py:105-113, 162-173`) into our parameter names.

    `text_adapter.{i}.fc.0.weight` → `text_adapters.{i}.linear.weight` (i < n), the last entry →
    `text_projection.linear.weight`; `layer_adapters.{i}.fc.0.weight` → `image_adapters.{i}.linear.weight`,
    `seg_proj.{l}.fc[.0].weight` → `seg_projections.{l}.linear.weight`, `det_proj.fc[.0].weight` →
    `det_projection.linear.weight`. The optimiser state is ignored.
    """
    if not isinstance(checkpoint, Mapping) or not ({"text_adapter", "image_adapter"} & set(checkpoint)):
        raise ValueError(f"{source}: not an official AA-CLIP checkpoint (expected a dict with 'text_adapter' or "
                         "'image_adapter')")
    converted: dict[str, torch.Tensor] = {}
    text = checkpoint.get("text_adapter")
    if text is not None:
        indices = sorted({int(key.split(".")[0]) for key in text})
        if len(indices) != model.config.text_adapter_layers + 1:
            raise ValueError(f"{source}: {len(indices) - 1} text adapters + projection, the model has "
                             f"{model.config.text_adapter_layers} (text_adapter_layers)")
        for index in indices[:-1]:
            converted[f"text_adapters.{index}.linear.weight"] = text[f"{index}.fc.0.weight"]
        converted["text_projection.linear.weight"] = text[f"{indices[-1]}.fc.0.weight"]
    image = checkpoint.get("image_adapter")
    if image is not None:
        suffix = "fc.0.weight" if model.config.projection_relu else "fc.weight"
        for key, value in image.items():
            parts = key.split(".")
            if parts[0] == "layer_adapters":
                converted[f"image_adapters.{parts[1]}.linear.weight"] = value
            elif parts[0] == "seg_proj" and ".".join(parts[2:]) == suffix:
                converted[f"seg_projections.{parts[1]}.linear.weight"] = value
            elif parts[0] == "det_proj" and ".".join(parts[1:]) == suffix:
                converted["det_projection.linear.weight"] = value
            else:
                raise ValueError(f"{source}: unexpected entry image_adapter[{key!r}] (projection_relu="
                                 f"{model.config.projection_relu} expects seg_proj.<l>.{suffix})")
    return {key: value.float() for key, value in converted.items()}


def transductive_image_scores(image_scores: torch.Tensor, map_maxima: torch.Tensor, map_minimum: float,
                              map_weight: float) -> torch.Tensor:
    """The reference's fused image scores of one class's whole test set (`forward_utils.metrics_eval`, :241-253).

    The class's maps are min-max normalised together and so are its image scores, each only when its maximum is
    not already exactly 1 (the reference's check); then w·max(M̃) + (1 − w)·s̃.

    Args:
        image_scores: (N,) s of every test image of the class.
        map_maxima: (N,) max of each image's map.
        map_minimum: the minimum over all the class's maps.
        map_weight: w (industrial 0.5, medical 1).
    """
    map_maxima, image_scores = map_maxima.double(), image_scores.double()
    map_maximum = float(map_maxima.max())
    if map_maximum != 1:
        map_maxima = (map_maxima - map_minimum) / (map_maximum - map_minimum)
    if float(image_scores.max()) != 1:
        image_scores = (image_scores - image_scores.min()) / (image_scores.max() - image_scores.min())
    return map_weight * map_maxima + (1 - map_weight) * image_scores


@register_method("aaclip")
def build_aaclip(
    backbone: str = "zsad-tiny",
    pretrained: str = "",
    image_size: int = 112,
    device: str = "cpu",
    backbone_seed: int = 0,
    train_seed: int = 0,
    checkpoint: str = "",
    clip: nn.Module | None = None,
    pos_embed_resize: str = "open_clip",
    quick_gelu: bool = False,
    **config_overrides: Any,
) -> AACLIP:
    """An `AACLIP` on a loaded backbone, optionally with learned adapters (`checkpoint`: ours or official).

    The backbone as the reference builds it: open_clip's bicubic antialiased position-embedding resize
    (`pos_embed_resize="open_clip"`) and **exact GELU** (`quick_gelu=False`; the reference rebuilds CLIP from its
    JSON config without QuickGELU even for the OpenAI weights). A given `clip` is used as it is.

    Args:
        backbone: open_clip name or "zsad-tiny".
        pretrained: open_clip tag ("openai"), a local weights file, or "" for random weights.
        image_size: input side S.
        device: torch device.
        backbone_seed: seed of random backbone weights.
        train_seed: seed of the adapters' Xavier initialisation.
        checkpoint: learned adapters (see `AACLIP.load_checkpoint`).
        clip: a loaded backbone to reuse instead of loading one.
        pos_embed_resize: position-embedding interpolation when loading.
        quick_gelu: activation when loading.
        **config_overrides: fields of `AACLIPConfig` (defaults: `reference_config(clip)`).
    """
    check_options("aaclip", AACLIPConfig, config_overrides)
    clip = backbone_for(clip, backbone, pretrained, image_size, device, backbone_seed,
                        pos_embed_resize=pos_embed_resize, quick_gelu=quick_gelu)
    return on_backbone(clip, reference_config(clip, **config_overrides), checkpoint, device, train_seed)


def on_backbone(clip: nn.Module, config: AACLIPConfig, checkpoint: str = "", device: str = "cpu",
                train_seed: int = 0) -> AACLIP:
    """An `AACLIP` with adapters initialised from `train_seed`, optionally loaded from `checkpoint`."""
    with seeded(train_seed):
        model = AACLIP(clip, config)
    if checkpoint:
        model.load_checkpoint(checkpoint)
    return model.to(device).eval()
