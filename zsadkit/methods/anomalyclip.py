"""AnomalyCLIP: object-agnostic prompt learning for zero-shot anomaly detection (Zhou et al., ICLR 2024).

The file follows the paper's Sec. 3, and the official code (zqhang/AnomalyCLIP @ 45ed4dd; see
`tests/fixtures/anomalyclip/README.md`) where they differ; each difference is a named option of
`AnomalyCLIPConfig` whose default is the released code's behaviour. `python -m zsadkit.verify anomalyclip DIR`
checks this file against the reference's outputs.

* Sec. 3.2, Eq. 2–3: two object-agnostic prompts g_n = "[V1..VE] object." and g_a = "[W1..WE] damaged object."
  with separate (unshared) contexts (`zsadkit.prompt_learning.PromptLearner`).
* Sec. 3.2 "textual space refinement": deep prompts of `deep_length` tokens **overwrite** tokens 1..t before text
  layers 2..`deep_depth` (the older paper text says concatenation into "the first 9 layers"), rounded to fp16
  at insertion as the reference's `.half()` does (`deep_prompt_fp16_round`).
* Sec. 3.3 DPAM: from `dpam_first_layer` on, a V-V attention side stream (no MLP) provides the local tokens;
  the original stream is untouched. Local tokens = `ln_post(tokens) @ proj`; the **global embedding skips
  `ln_post`** (reference, issue #14).
* Eq. 1: P(g, f) = softmax(⟨f, g⟩ / τ) with τ = 0.07 for the image score and for every patch.
* Sec. 3.4, Eq. 4: L_total = L_global + λ Σ_layers L_local, L_local = Focal([S_n, S_a], S) + Dice(S_a, S)
  + Dice(S_n, 1 − S); the released code uses layer 24 only with **λ = 4** (`train.py:50`, `train.sh`; the multi-layer setting
  of the paper was an aliasing bug; [6, 12, 18, 24] with λ = 1 in the paper is equivalent to 4× layer 24).
* Inference: image score = P(g_a, f_global) (no pixel-max fusion); anomaly map = Σ_layers
  (S_a + 1 − S_n)/2 upsampled bilinearly, then a Gaussian filter with σ = 4 (`test.py:94-111`).

How the prompts are trained (data, optimiser, the feature cache) is `zsadkit.recipes.anomalyclip`.

Deviations of ours (none changes a value beyond float rounding):
* Test-time text features are computed once per class list and kept until `refresh_text_features` (the
  reference recomputes them per batch; they do not depend on the image).
* `crop_text_after_eot`: the text tower runs on tokens 0..EOT only (exact under the causal mask).
* The image tower runs batched (the reference tests at batch 1).

Example:
    >>> from zsadkit.models import load_clip
    >>> clip = load_clip("zsad-tiny", image_size=112)
    >>> model = AnomalyCLIP(clip, reference_config(clip))
    >>> prediction = model.predict(torch.randn(2, 3, 112, 112), ["bottle", "bottle"])
    >>> prediction.image_scores.shape, prediction.anomaly_maps.shape
    (torch.Size([2]), torch.Size([2, 112, 112]))
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from zsadkit.losses import binary_dice_loss, focal_loss
from zsadkit.maps import (
    anomaly_map_from_probabilities,
    fuse_layer_maps,
    gaussian_smooth,
    upsample_token_probabilities,
)
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
from zsadkit.prompt_learning import PromptLearner, PromptLearnerConfig

__all__ = [
    "ABNORMAL_WORDS",
    "AnomalyCLIP",
    "AnomalyCLIPConfig",
    "ImageFeatures",
    "build_anomalyclip",
    "import_official_prompt_learner",
    "on_backbone",
    "reference_config",
]

#: Abnormality words of the paper's Table 13/14 ablation ("damaged" is the default).
ABNORMAL_WORDS = ("damaged", "anomalous", "flawed", "defective", "blemished")
CHECKPOINT_FORMAT = "zsadkit-anomalyclip-prompts/1"
#: `AnomalyCLIPConfig` fields that define the prompts (Sec. 3.2): saved prompts load only into a model that agrees.
PROMPT_FIELDS = ("abnormal_word", "object_agnostic", "shared_context", "n_ctx", "deep_depth", "deep_length")


@dataclass(frozen=True)
class AnomalyCLIPConfig:
    """Every AnomalyCLIP setting; defaults are the reference's released configuration for ViT-L/14@336.

    Attributes:
        feature_layers: 1-indexed vision layers whose tokens give local features. Reference: (24,).
            (6, 12, 18, 24) is the post-fix multi-layer setting, not the paper's (issues #18, #64, #82).
        dpam_first_layer: first vision layer with the DPAM side stream (reference `DPAM_layer=20` → 6 of 24);
            None = no DPAM (plain Q-K tokens; Table 4 "base", Table 7 "w/o T1").
        dpam_variants: attention of the side stream: ("vv",) (default), or several variants whose logits are
            averaged (Table 10 ensembles, e.g. ("qq", "kk", "vv")). "qk" is the original attention in the same
            side-stream architecture.
        n_ctx: E, learnable words per prompt (12).
        deep_depth: text layers with learnable tokens, counting the input (9 → 8 deep prompts, layers 2–9).
        deep_length: tokens per deep prompt (4).
        abnormal_word: the word of the abnormal template "<word> object" (Table 13).
        object_agnostic: "object" in both prompts (True) or each image's class name (object-aware, Fig. 5).
        shared_context: one context for both prompts (Table 9); reference False.
        temperature: τ of Eq. 1 (0.07; CLIP's learned logit scale is not used).
        sigma: σ of the Gaussian smoothing of the test maps (4); 0 disables it.
        lam: λ, weight of the local loss (4 with layer 24; the paper's λ = 1 with 4 aliased layers).
        use_global_loss: the cross-entropy term of Eq. 4 (Table 5).
        use_focal_loss: the focal term of L_local (Table 11).
        use_dice_loss: the two dice terms of L_local (Table 11).
        deep_prompt_fp16_round: the reference's `.half()` cast of deep prompts (bit-level parity).
        layer_fusion: "sum" over layers (reference) or "mean".
        crop_text_after_eot: run the text encoder on tokens 0..EOT only (17 of 77 for the AnomalyCLIP prompts).
            Exact: attention is causal and everything else acts per token, so later tokens never reach the EOT
            feature; about 4× less text compute, which is what a training step with cached image features costs.
            False runs all 77 positions as the reference does.
    """

    feature_layers: tuple[int, ...] = (24,)
    dpam_first_layer: int | None = 6
    dpam_variants: tuple[str, ...] = ("vv",)
    n_ctx: int = 12
    deep_depth: int = 9
    deep_length: int = 4
    abnormal_word: str = "damaged"
    object_agnostic: bool = True
    shared_context: bool = False
    temperature: float = 0.07
    sigma: float = 4.0
    lam: float = 4.0
    use_global_loss: bool = True
    use_focal_loss: bool = True
    use_dice_loss: bool = True
    deep_prompt_fp16_round: bool = True
    layer_fusion: str = "sum"
    crop_text_after_eot: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "feature_layers", tuple(int(layer) for layer in self.feature_layers))
        variants = (self.dpam_variants,) if isinstance(self.dpam_variants, str) else tuple(self.dpam_variants)
        object.__setattr__(self, "dpam_variants", variants)
        if not self.feature_layers:
            raise ValueError("AnomalyCLIPConfig.feature_layers must name at least one layer")
        if not variants:
            raise ValueError("AnomalyCLIPConfig.dpam_variants must name at least one attention variant")
        if self.temperature <= 0 or self.sigma < 0 or self.lam < 0:
            raise ValueError(
                f"AnomalyCLIPConfig: temperature > 0, sigma >= 0 and lam >= 0 are required, got "
                f"{self.temperature}, {self.sigma}, {self.lam}"
            )
        if not self.abnormal_word.strip():
            raise ValueError("AnomalyCLIPConfig.abnormal_word is empty")

    def prompt_config(self) -> PromptLearnerConfig:
        """The prompt learner of Sec. 3.2 for this configuration."""
        return PromptLearnerConfig(
            n_ctx=self.n_ctx,
            deep_depth=self.deep_depth,
            deep_length=self.deep_length,
            state_templates=("{}", f"{self.abnormal_word} {{}}"),
            class_token="object" if self.object_agnostic else None,
            shared_context=self.shared_context,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def reference_config(clip: nn.Module, **overrides: Any) -> AnomalyCLIPConfig:
    """The released settings scaled to `clip`'s depth (`zsadkit.methods.base.backbone_defaults`): the last block as
    feature layer, DPAM from the reference's first block (6 of 24, 3 of 12, 2 of the fixtures' 4), deep prompts in
    the reference's text blocks (9 of 12, 3 of 4); `overrides` are `AnomalyCLIPConfig` fields."""
    defaults = backbone_defaults(clip)
    base = AnomalyCLIPConfig(feature_layers=(defaults.last_layer,), dpam_first_layer=defaults.dpam_first_layer,
                             deep_depth=defaults.deep_depth)
    return replace(base, **overrides)


@dataclass
class ImageFeatures:
    """Frozen image-encoder outputs AnomalyCLIP needs (what the feature cache stores).

    Attributes:
        global_embedding: (B, D) CLS of the original stream @ proj (no ln_post), not normalised.
        layer_tokens: (V, L, B, 1+N, D) `ln_post(tokens) @ proj` per attention variant and feature layer, CLS
            at index 0, not normalised.
    """

    global_embedding: torch.Tensor
    layer_tokens: torch.Tensor

    def as_cache_rows(self) -> dict[str, torch.Tensor]:
        """Batch-first arrays for `FeatureCache`: global (B, D) and tokens (B, V, L, 1+N, D)."""
        return {"global_embedding": self.global_embedding, "layer_tokens": self.layer_tokens.permute(2, 0, 1, 3, 4)}

    @classmethod
    def from_cache_rows(cls, rows: Mapping[str, torch.Tensor], device: torch.device | str) -> ImageFeatures:
        """Inverse of `as_cache_rows` (a collated batch of cache rows)."""
        return cls(rows["global_embedding"].to(device), rows["layer_tokens"].to(device).permute(1, 2, 0, 3, 4))


class AnomalyCLIP(nn.Module):
    """Frozen CLIP + learnable object-agnostic prompts; `predict` gives image scores and anomaly maps.

    Args:
        clip: open_clip `CLIP` from `zsadkit.models.load_clip` (resized for the input size); its weights are
            frozen (`requires_grad=False`).
        config: `AnomalyCLIPConfig`.
    """

    #: the `format` metadata of `save_prompts` files, and the config fields a saved file must agree on to load
    checkpoint_format: str = CHECKPOINT_FORMAT
    saved_config_fields: tuple[str, ...] = PROMPT_FIELDS

    def __init__(self, clip: nn.Module, config: AnomalyCLIPConfig | None = None) -> None:
        super().__init__()
        self.config = config or AnomalyCLIPConfig()
        for parameter in clip.parameters():
            parameter.requires_grad_(False)
        self.visual = VisualEncoder(clip)
        self.text = TextEncoder(clip)
        num_layers = self.visual.num_layers
        bad = [layer for layer in self.config.feature_layers if not 1 <= layer <= num_layers]
        if bad:
            raise ValueError(
                f"feature_layers {bad} outside the {num_layers} vision layers of this backbone (valid: 1..{num_layers}; "
                "use reference_config(clip) for its reference layers)"
            )
        first = self.config.dpam_first_layer
        if first is not None and not 1 <= first <= num_layers:
            raise ValueError(
                f"dpam_first_layer {first} outside the {num_layers} vision layers of this backbone (valid: "
                f"1..{num_layers}, or None for no DPAM; use reference_config(clip) for its reference layer)"
            )
        if self.config.deep_depth > len(self.text.blocks):
            raise ValueError(
                f"deep_depth {self.config.deep_depth} exceeds the {len(self.text.blocks)} text layers of this backbone"
            )
        self.prompt_learner = PromptLearner(clip.token_embedding, self.config.prompt_config(), tokenize)
        self._text_feature_cache: dict[tuple[str, ...], torch.Tensor] = {}
        self.prompt_learner.register_load_state_dict_post_hook(self._prompts_loaded)

    # ----------------------------------------------------------------------------------------- visual side
    @property
    def attention_variants(self) -> list[AttentionVariant | None]:
        """One image-encoder pass per DPAM variant (Sec. 3.3); [None] without DPAM."""
        if self.config.dpam_first_layer is None:
            return [None]
        return [
            AttentionVariant((mode,), first_layer=self.config.dpam_first_layer, path="dual")
            for mode in self.config.dpam_variants
        ]

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """Frozen features of a batch (B, 3, S, S): global embedding and the local tokens of every variant."""
        passes = []
        for index, variant in enumerate(self.attention_variants):
            passes.append(
                self.visual(
                    images,
                    self.config.feature_layers,
                    tokens="projected",
                    global_ln_post=False,
                    attention=variant,
                    return_global=index == 0,
                )
            )
        layer_tokens = torch.stack([torch.stack(features.layer_tokens) for features in passes])
        return ImageFeatures(passes[0].global_embedding, layer_tokens)

    # ------------------------------------------------------------------------------------------- text side
    def encode_text(self, class_names: Sequence[str] = ()) -> torch.Tensor:
        """Normalised prompt embeddings (C, 2, D), (normal, abnormal) per class; C = 1 when object-agnostic."""
        prompts = self.prompt_learner(class_names)
        length = prompts.token_ids.shape[1]
        if self.config.crop_text_after_eot:
            length = int(prompts.token_ids.argmax(dim=-1).max()) + 1
        features = self.text.encode_embeddings(
            prompts.embeddings[:, :length],
            prompts.token_ids[:, :length],
            deep_prompts=prompts.deep_prompts,
            deep_prompt_fp16_round=self.config.deep_prompt_fp16_round,
        )
        features = features.view(prompts.num_classes, prompts.num_states, -1)
        return features / features.norm(dim=-1, keepdim=True)

    def text_for_images(self, class_names: Sequence[str]) -> torch.Tensor:
        """Text features per image: (1, 2, D) object-agnostic (shared), else (B, 2, D) by each image's class."""
        if self.config.object_agnostic:
            return self.encode_text()
        unique = sorted(set(class_names))
        features = self.encode_text(unique)
        return features[torch.tensor([unique.index(name) for name in class_names], device=features.device)]

    def refresh_text_features(self) -> None:
        """Forget the test-time text features; call after changing the prompts in place outside `zsadkit.training`
        (training, loading prompts, a mode switch and device or dtype moves refresh them already)."""
        self._text_feature_cache.clear()

    def _prompts_loaded(self, module: nn.Module, incompatible_keys: object) -> None:
        self.refresh_text_features()

    def frozen_text_for_images(self, class_names: Sequence[str]) -> torch.Tensor:
        """`text_for_images` without a graph, computed once per class list until `refresh_text_features` (in
        training mode always recomputed)."""
        key = () if self.config.object_agnostic else tuple(sorted(set(class_names)))
        if self.training or key not in self._text_feature_cache:
            with frozen_features():
                features = self.encode_text(list(key))
            if self.training:
                return features if self.config.object_agnostic else self._per_image(features, key, class_names)
            self._text_feature_cache[key] = features
        features = self._text_feature_cache[key]
        return features if self.config.object_agnostic else self._per_image(features, key, class_names)

    @staticmethod
    def _per_image(features: torch.Tensor, classes: Sequence[str], class_names: Sequence[str]) -> torch.Tensor:
        """Rows of per-class features (C, 2, D) for each image's class → (B, 2, D)."""
        return features[torch.tensor([list(classes).index(name) for name in class_names], device=features.device)]

    def train(self, mode: bool = True) -> AnomalyCLIP:
        """Switch mode; any change of mode drops the test-time text features (prompts may have changed)."""
        self.refresh_text_features()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        """Device and dtype moves (`.to`, `.half`, ...) drop the test-time text features too."""
        self.refresh_text_features()
        return super()._apply(fn, recurse)

    # -------------------------------------------------------------------------------------------- scoring
    def image_logits(self, global_embedding: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Eq. 1 logits ⟨f, g⟩/τ of the normalised global embedding (B, D) vs text (1 or B, 2, D) → (B, 2)."""
        image = global_embedding / global_embedding.norm(dim=-1, keepdim=True)
        cosine = torch.einsum("bd,bkd->bk", image, text_features.expand(image.shape[0], -1, -1))
        return cosine / self.config.temperature

    def token_probabilities(self, layer_tokens: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Per-token state probabilities (L, B, 1+N, 2): softmax over states of the variant-averaged logits.

        Args:
            layer_tokens: (V, L, B, 1+N, D) local tokens (not normalised).
            text_features: (1 or B, 2, D) normalised text features.
        """
        tokens = layer_tokens / layer_tokens.norm(dim=-1, keepdim=True)
        text = text_features.expand(tokens.shape[2], -1, -1)
        logits = torch.einsum("vlbnd,bkd->vlbnk", tokens, text) / self.config.temperature
        return logits.mean(dim=0).softmax(dim=-1)

    def state_maps(self, token_probs: torch.Tensor) -> torch.Tensor:
        """Bilinearly upsampled patch probabilities (L, B, S, S, 2) from (L, B, 1+N, 2) (CLS dropped)."""
        return torch.stack([upsample_token_probabilities(probs, self.image_size) for probs in token_probs])

    def anomaly_maps(self, layer_tokens: torch.Tensor, text_features: torch.Tensor, smooth: bool = True) -> torch.Tensor:
        """Σ_layers (S_a + 1 − S_n)/2, then the Gaussian filter (σ = `config.sigma`): (B, S, S)."""
        layer_maps = anomaly_map_from_probabilities(self.state_maps(self.token_probabilities(layer_tokens, text_features)))
        fused = fuse_layer_maps(layer_maps, self.config.layer_fusion)
        return gaussian_smooth(fused, self.config.sigma) if smooth and self.config.sigma > 0 else fused

    def score(self, features: ImageFeatures, text_features: torch.Tensor) -> Prediction:
        """Image scores P(g_a, f) (B,) and smoothed anomaly maps (B, S, S) from cached or fresh features."""
        image_scores = self.image_logits(features.global_embedding, text_features).softmax(dim=-1)[:, 1]
        return Prediction(image_scores, self.anomaly_maps(features.layer_tokens, text_features))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: Sequence[str]) -> Prediction:
        """Zero-shot prediction for a batch (B, 3, S, S) of normalised images (the `Detector` protocol)."""
        if len(class_names) != images.shape[0]:
            raise ValueError(f"predict: {images.shape[0]} images but {len(class_names)} class names")
        return self.score(self.encode_image(images), self.frozen_text_for_images(class_names))

    # ------------------------------------------------------------------------------------------- training
    def losses(
        self,
        features: ImageFeatures,
        masks: torch.Tensor,
        labels: torch.Tensor,
        class_names: Sequence[str] = (),
    ) -> dict[str, torch.Tensor]:
        """Eq. 4 on one batch, as the reference `train.py` computes it (text recomputed, graph kept).

        Args:
            features: `ImageFeatures` of the batch (from `encode_image` or the feature cache).
            masks: (B, S, S) ground truth; binarised at 0.5 as the reference does.
            labels: (B,) image labels, 0 normal / 1 anomalous.
            class_names: per image (only used by object-aware prompts).

        Returns:
            "loss" (the objective), "image" (global CE), "local" (λ·Σ_layers local terms, the reference's log),
            "per_layer" (L, 3): focal, dice(S_a, S), dice(S_n, 1 − S) before λ.
        """
        text_features = self.text_for_images(class_names)
        device = text_features.device
        gt = (masks.to(device) > 0.5).float()
        image_loss = F.cross_entropy(self.image_logits(features.global_embedding, text_features), labels.to(device).long())
        state_maps = self.state_maps(self.token_probabilities(features.layer_tokens, text_features))
        per_layer = []
        for layer_map in state_maps:  # (B, S, S, 2)
            probs = layer_map.permute(0, 3, 1, 2)  # (B, 2, S, S), channel 0 = normal
            zero = probs.new_zeros(())
            focal = focal_loss(probs, gt) if self.config.use_focal_loss else zero
            dice_abnormal = binary_dice_loss(probs[:, 1], gt) if self.config.use_dice_loss else zero
            dice_normal = binary_dice_loss(probs[:, 0], 1 - gt) if self.config.use_dice_loss else zero
            per_layer.append(torch.stack([focal, dice_abnormal, dice_normal]))
        per_layer_terms = torch.stack(per_layer)
        local = self.config.lam * per_layer_terms.sum()
        total = local + (image_loss if self.config.use_global_loss else 0.0)
        return {"loss": total, "image": image_loss, "local": local, "per_layer": per_layer_terms}

    def feature_cache_key(self) -> dict[str, object]:
        """Everything `encode_image` depends on, for `FeatureCache` (weights by fingerprint)."""
        source = getattr(self.visual.visual, "zsad_source", None) or getattr(self.text.clip, "zsad_source", None)
        return {
            "method": "anomalyclip",
            "backbone": asdict(source) if source is not None else None,
            "weights": module_fingerprint(self.visual),
            "image_size": self.image_size,
            "feature_layers": list(self.config.feature_layers),
            "attention": [None if v is None else [list(v.modes), v.first_layer, v.path] for v in self.attention_variants],
            "tokens": "ln_post+proj",
            "global": "cls@proj without ln_post",
        }

    # ----------------------------------------------- `FeatureModel`: training and evaluation on cached features
    def encode_rows(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """`encode_image` as batch-first cache rows."""
        return self.encode_image(images).as_cache_rows()

    def losses_from_rows(self, rows: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """`losses` of a batch of cache rows (with "mask", "label", "class_name")."""
        features = ImageFeatures.from_cache_rows(rows, self.visual.visual.proj.device)
        return self.losses(features, rows["mask"], rows["label"], rows["class_name"])

    @torch.no_grad()
    def predict_from_rows(self, rows: Mapping[str, Any]) -> Prediction:
        """`predict` on a batch of cache rows."""
        features = ImageFeatures.from_cache_rows(rows, self.visual.visual.proj.device)
        return self.score(features, self.frozen_text_for_images(list(rows["class_name"])))

    def fingerprint(self) -> dict[str, object]:
        """What besides the training settings and samples determines the trained prompts."""
        return {"config": asdict(self.config), "backbone_weights": module_fingerprint(self.text.clip)}

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The prompt learner's parameters by checkpoint name (contexts, deep_prompts.i)."""
        return dict(self.prompt_learner.named_parameters())

    # ----------------------------------------------------------------------------------------- checkpoints
    def save_prompts(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
        """Write the learned prompts to a safetensors file with the configuration in its metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: value.detach().cpu().contiguous() for name, value in self.trainable_parameters().items()}
        save_file(tensors, str(path), metadata={"format": self.checkpoint_format, "config": self.config.to_json(),
                                                **dict(metadata or {})})
        return path

    def load_prompts(self, path: str | Path) -> None:
        """Load learned prompts: `save_prompts` output, a training epoch checkpoint (`epoch_XXX.safetensors`), or
        an official `{"prompt_learner": ...}` .pth checkpoint (e.g. the released `epoch_15.pth`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{type(self).__name__} prompts {path} do not exist")
        if path.suffix == ".safetensors":
            self.check_saved_config(path)
            state = load_file(str(path), device="cpu")
            if any(key.startswith("param/") for key in state):  # a `zsadkit.training` epoch checkpoint
                state = {key[len("param/"):]: value for key, value in state.items() if key.startswith("param/")}
        else:
            state = import_official_prompt_learner(torch.load(path, map_location="cpu", weights_only=True), self,
                                                   source=str(path))
        self.load_prompt_state(state, source=str(path))

    def check_saved_config(self, path: str | Path) -> None:
        """Raise a ValueError when the configuration saved with prompts (`save_prompts` metadata "config", or a
        training checkpoint's fingerprint) differs from this model's in a `saved_config_fields` field (same shapes
        can hold prompts of another word or layout). Files without a saved configuration are only shape-checked."""
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if "config" in metadata and metadata.get("format") == self.checkpoint_format:
            saved = json.loads(metadata["config"])
        elif "fingerprint" in metadata:
            saved = json.loads(metadata["fingerprint"]).get("config")
        else:
            saved = None
        if not isinstance(saved, dict):
            return
        own = json.loads(self.config.to_json())
        differing = [f"{name}: saved {saved[name]!r}, model {own[name]!r}" for name in self.saved_config_fields
                     if name in saved and saved[name] != own[name]]
        if differing:
            raise ValueError(f"{type(self).__name__} prompts {path} were learned with another prompt configuration "
                             f"({'; '.join(differing)}); build the model with the saved settings")

    def load_prompt_state(self, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Copy `contexts` and `deep_prompts.i` into the prompt learner, checking names and shapes."""
        own = self.trainable_parameters()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state
                 and state[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(f"{type(self).__name__} prompts {source} do not fit this configuration: missing {missing}, "
                             f"unexpected {unexpected}, wrong shapes {wrong}")
        with torch.no_grad():
            for name, parameter in own.items():
                parameter.copy_(state[name].to(parameter.dtype))
        self.refresh_text_features()


def import_official_prompt_learner(
    checkpoint: Mapping[str, object], model: AnomalyCLIP, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Translate the reference `AnomalyCLIP_PromptLearner` state dict into ours.

    `ctx_pos` [1,1,E,W] → `contexts[0]`, `ctx_neg` → `contexts[1]`, `compound_prompts_text.i` → `deep_prompts.i`.
    The `compound_prompt_projections.*` entries are never used by the reference forward and are ignored (a
    warning says so). The saved token buffers are checked: `tokenized_prompts_*` must equal our prompt tokens
    (else the checkpoint was made for other prompt words); `token_prefix/suffix_*` that differ from our CLIP's
    token embedding only warn (another CLIP's weights: the buffers are unused).

    Args:
        checkpoint: `torch.load` of an official file (`{"prompt_learner": state_dict}`) or the state dict.
        model: the `AnomalyCLIP` to load into (object-agnostic, unshared contexts).
        source: name for messages.
    """
    state = checkpoint.get("prompt_learner", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or "ctx_pos" not in state or "ctx_neg" not in state:
        raise ValueError(f"{source}: not an official AnomalyCLIP checkpoint (expected {{'prompt_learner': "
                         "{'ctx_pos', 'ctx_neg', 'compound_prompts_text.*', ...}}})")
    if model.config.shared_context or not model.config.object_agnostic:
        raise ValueError(f"{source}: official checkpoints hold unshared object-agnostic prompts; the model is "
                         "configured with shared_context or object-aware prompts")
    converted = {"contexts": torch.cat([state["ctx_pos"].reshape(1, *state["ctx_pos"].shape[-2:]),
                                        state["ctx_neg"].reshape(1, *state["ctx_neg"].shape[-2:])]).float()}
    deep_keys = sorted((k for k in state if k.startswith("compound_prompts_text.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    for index, key in enumerate(deep_keys):
        converted[f"deep_prompts.{index}"] = state[key].float()
    ignored = sorted(k for k in state if k.startswith("compound_prompt_projections."))
    if ignored:
        warnings.warn(f"{source}: ignoring {len(ignored)} compound_prompt_projections.* entries (never used by the "
                      "reference forward pass)", stacklevel=2)
    prompts = model.prompt_learner()
    for index, suffix in enumerate(("pos", "neg")):
        saved_ids = state.get(f"tokenized_prompts_{suffix}")
        if saved_ids is not None and not torch.equal(saved_ids.reshape(-1).long(), prompts.token_ids[index].cpu().long()):
            raise ValueError(f"{source}: tokenized_prompts_{suffix} differ from this model's prompt "
                             f"{model.prompt_learner.prompt_texts([])[index]!r} (another abnormal word or length?)")
        for part, tokens in (("prefix", prompts.embeddings[index, :1]),
                             ("suffix", prompts.embeddings[index, 1 + model.config.n_ctx:])):
            saved = state.get(f"token_{part}_{suffix}")
            if saved is not None and not torch.allclose(saved.reshape(tokens.shape).float(), tokens.detach().cpu(),
                                                        atol=1e-6):
                warnings.warn(f"{source}: token_{part}_{suffix} differs from this CLIP's token embedding (checkpoint "
                              "made with other CLIP weights?); the buffer is not used", stacklevel=2)
    return converted


@register_method("anomalyclip")
def build_anomalyclip(
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
    """An `AnomalyCLIP` on a loaded backbone, optionally with trained prompts (`checkpoint`: ours or official).

    Args:
        backbone: open_clip name or "zsad-tiny".
        pretrained: open_clip tag ("openai"), a local weights file, or "" for random weights.
        image_size: input side S.
        device: torch device.
        backbone_seed: seed of random backbone weights.
        train_seed: seed of the prompt initialisation.
        checkpoint: prompts file (.safetensors written by `save_prompts`, or the official `epoch_15.pth`).
        clip: a loaded backbone to reuse instead of loading one.
        **config_overrides: fields of `AnomalyCLIPConfig` (defaults: `reference_config(clip)`).
    """
    check_options("anomalyclip", AnomalyCLIPConfig, config_overrides)
    clip = backbone_for(clip, backbone, pretrained, image_size, device, backbone_seed)
    return on_backbone(clip, reference_config(clip, **config_overrides), checkpoint, device, train_seed)


def on_backbone(
    clip: nn.Module, config: AnomalyCLIPConfig, checkpoint: str = "", device: str = "cpu", train_seed: int = 0
) -> AnomalyCLIP:
    """An `AnomalyCLIP` (or CoOp) model with prompts initialised from `train_seed`, optionally loaded from
    `checkpoint`."""
    with seeded(train_seed):
        model = AnomalyCLIP(clip, config)
    if checkpoint:
        model.load_prompts(checkpoint)
    return model.to(device).eval()
