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
  + Dice(S_n, 1 − S); the released code uses layer 24 only with **λ = 4** (spec §2: the multi-layer setting
  of the paper was an aliasing bug; [6, 12, 18, 24] with λ = 1 in the paper is equivalent to 4× layer 24).
* Inference: image score = P(g_a, f_global) (no pixel-max fusion); anomaly map = Σ_layers
  (S_a + 1 − S_n)/2 upsampled bilinearly, then a Gaussian filter with σ = 4.

Example:
    >>> from zsadkit.models import load_clip
    >>> clip = load_clip("zsad-tiny", image_size=112)
    >>> model = AnomalyCLIP(clip, default_config("zsad-tiny"))
    >>> prediction = model.predict(torch.randn(2, 3, 112, 112), ["bottle", "bottle"])
    >>> prediction.image_scores.shape, prediction.anomaly_maps.shape
    (torch.Size([2]), torch.Size([2, 112, 112]))
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from zsadkit.data.records import Sample
from zsadkit.feature_cache import FeatureCache, default_cache_root, module_fingerprint, samples_fingerprint
from zsadkit.losses import binary_dice_loss, focal_loss
from zsadkit.maps import (
    anomaly_map_from_probabilities,
    fuse_layer_maps,
    gaussian_smooth,
    upsample_token_probabilities,
)
from zsadkit.methods.base import Prediction, register_method
from zsadkit.models import AttentionVariant, TextEncoder, VisualEncoder, load_backbone, tokenize
from zsadkit.prompt_learning import PromptLearner, PromptLearnerConfig
from zsadkit.training import TrainConfig, TrainResult, train

#: Abnormality words of the paper's Table 13/14 ablation ("damaged" is the default).
ABNORMAL_WORDS = ("damaged", "anomalous", "flawed", "defective", "blemished")
CHECKPOINT_FORMAT = "zsadkit-anomalyclip-prompts/1"
#: `AnomalyCLIPConfig` fields that define the prompts (Sec. 3.2): saved prompts load only into a model that agrees.
PROMPT_FIELDS = ("abnormal_word", "object_agnostic", "shared_context", "n_ctx", "deep_depth", "deep_length")

#: Our dataset names → the names of the paper's tables (Table 1: industrial, Table 2: medical).
INDUSTRIAL_DATASETS = {"mvtec": "MVTec AD", "visa": "VisA", "mpdd": "MPDD", "btad": "BTAD", "sdd": "SDD",
                       "dagm": "DAGM", "dtd_synthetic": "DTD-Synthetic"}
MEDICAL_DATASETS = {"headct": "HeadCT", "brainmri": "BrainMRI", "br35h": "Br35H", "covid19": "COVID-19",
                    "isic": "ISIC", "colondb": "CVC-ColonDB", "clinicdb": "CVC-ClinicDB", "kvasir": "Kvasir",
                    "endo": "Endo", "tn3k": "TN3K"}
PUBLISHED_DATASET_NAMES = {**INDUSTRIAL_DATASETS, **MEDICAL_DATASETS}
#: The paper's zero-shot protocol (Sec. 4.1): prompts trained on VisA are tested on MVTec AD; prompts trained on
#: MVTec AD are tested on every other dataset. Both use the auxiliary dataset's test split.
PAPER_PROTOCOL = (("visa", ("mvtec",)),
                  ("mvtec", tuple(name for name in PUBLISHED_DATASET_NAMES if name not in ("mvtec",))))


@dataclass(frozen=True)
class AnomalyCLIPConfig:
    """Every AnomalyCLIP setting; defaults are the reference's released configuration for ViT-L/14@336.

    Attributes:
        feature_layers: 1-indexed vision layers whose tokens give local features. Reference: (24,).
            (6, 12, 18, 24) is the post-fix multi-layer setting, not the paper's (spec §2).
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


def default_config(backbone: str = "ViT-L-14-336", **overrides) -> AnomalyCLIPConfig:
    """Reference settings for a backbone: ViT-L/14 (24 vision layers) as released; the 4-layer `zsad-tiny` as in
    the golden fixtures (features [4], DPAM from layer 2, deep depth 3). Other names get the ViT-L settings
    scaled to 12 layers for ViT-B (features [12], DPAM from layer 3)."""
    if backbone == "zsad-tiny":
        base = AnomalyCLIPConfig(feature_layers=(4,), dpam_first_layer=2, deep_depth=3)
    elif backbone.startswith("ViT-B"):
        base = AnomalyCLIPConfig(feature_layers=(12,), dpam_first_layer=3)
    else:
        base = AnomalyCLIPConfig()
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
                "use default_config(backbone) for its reference layers)"
            )
        first = self.config.dpam_first_layer
        if first is not None and not 1 <= first <= num_layers:
            raise ValueError(
                f"dpam_first_layer {first} outside the {num_layers} vision layers of this backbone (valid: "
                f"1..{num_layers}, or None for no DPAM; use default_config(backbone) for its reference layer)"
            )
        if self.config.deep_depth > len(self.text.blocks):
            raise ValueError(
                f"deep_depth {self.config.deep_depth} exceeds the {len(self.text.blocks)} text layers of this backbone"
            )
        self.prompt_learner = PromptLearner(clip.token_embedding, self.config.prompt_config(), tokenize)
        self._text_feature_cache: dict[tuple[str, ...], torch.Tensor] = {}
        self._text_feature_cache_state: tuple = ()

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

    def _prompt_state(self) -> tuple:
        """Identifies the current prompt values: every in-place change (optimiser step, `copy_`, `+=`) bumps a
        tensor's `_version`; moving or casting the module changes its storage."""
        return tuple((id(p), p._version, p.data_ptr(), str(p.device), p.dtype)
                     for p in self.prompt_learner.parameters())

    def _frozen_text_for_images(self, class_names: Sequence[str]) -> torch.Tensor:
        """`text_for_images` computed once per class list while the prompts do not change (test time)."""
        state = self._prompt_state()
        if state != self._text_feature_cache_state:
            self._text_feature_cache.clear()
            self._text_feature_cache_state = state
        key = () if self.config.object_agnostic else tuple(sorted(set(class_names)))
        if key not in self._text_feature_cache:
            with torch.no_grad():
                self._text_feature_cache[key] = self.encode_text(list(key))
        features = self._text_feature_cache[key]
        if self.config.object_agnostic:
            return features
        return features[torch.tensor([key.index(name) for name in class_names], device=features.device)]

    def train(self, mode: bool = True) -> AnomalyCLIP:
        """Switch mode; any change of mode drops the test-time text features (prompts may have changed)."""
        self._text_feature_cache.clear()
        return super().train(mode)

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
        return self.score(self.encode_image(images), self._frozen_text_for_images(class_names))

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

    def feature_cache(
        self,
        samples: Sequence[Sample],
        cache_root: str | Path | None = None,
        dtype: str = "float32",
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        progress: bool = False,
    ) -> FeatureCache:
        """The (built) on-disk cache of `encode_image` for `samples` under `cache_root` (default root if None)."""
        key = {**self.feature_cache_key(), "dtype": dtype, "samples": samples_fingerprint(samples)}
        cache = FeatureCache(cache_root or default_cache_root(), key, name="anomalyclip")
        return cache.build(samples, lambda images: self.encode_image(images).as_cache_rows(), self.image_size,
                           batch_size=batch_size, device=device, dtype=dtype, progress=progress)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The prompt learner's parameters by checkpoint name (contexts, deep_prompts.i)."""
        return dict(self.prompt_learner.named_parameters())

    # ----------------------------------------------------------------------------------------- checkpoints
    def save_prompts(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
        """Write the learned prompts to a safetensors file with the configuration in its metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: value.detach().cpu().contiguous() for name, value in self.trainable_parameters().items()}
        save_file(tensors, str(path), metadata={"format": CHECKPOINT_FORMAT, "config": self.config.to_json(),
                                                **dict(metadata or {})})
        return path

    def load_prompts(self, path: str | Path) -> None:
        """Load learned prompts: `save_prompts` output, a training epoch checkpoint (`epoch_XXX.safetensors`), or
        an official `{"prompt_learner": ...}` .pth checkpoint (e.g. the released `epoch_15.pth`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"AnomalyCLIP prompts {path} do not exist")
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
        training checkpoint's fingerprint) differs from this model's in a `PROMPT_FIELDS` field (same shapes can
        hold prompts of another word or layout). Files without a saved configuration are only shape-checked."""
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if "config" in metadata and metadata.get("format") == CHECKPOINT_FORMAT:
            saved = json.loads(metadata["config"])
        elif "fingerprint" in metadata:
            saved = json.loads(metadata["fingerprint"]).get("config")
        else:
            saved = None
        if not isinstance(saved, dict):
            return
        own = json.loads(self.config.to_json())
        differing = [f"{name}: saved {saved[name]!r}, model {own[name]!r}" for name in PROMPT_FIELDS
                     if name in saved and saved[name] != own[name]]
        if differing:
            raise ValueError(f"AnomalyCLIP prompts {path} were learned with another prompt configuration "
                             f"({'; '.join(differing)}); build the model with the saved settings")

    def load_prompt_state(self, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Copy `contexts` and `deep_prompts.i` into the prompt learner, checking names and shapes."""
        own = self.trainable_parameters()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state
                 and state[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(f"AnomalyCLIP prompts {source} do not fit this configuration: missing {missing}, "
                             f"unexpected {unexpected}, wrong shapes {wrong}")
        with torch.no_grad():
            for name, parameter in own.items():
                parameter.copy_(state[name].to(parameter.dtype))
        self._text_feature_cache.clear()


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


def fit(
    model: AnomalyCLIP,
    samples: Sequence[Sample],
    config: TrainConfig | None = None,
    *,
    use_cache: bool = True,
    cache_root: str | Path | None = None,
    cache_dtype: str = "float32",
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> TrainResult:
    """Train the prompts on an auxiliary dataset (Sec. 3.4; reference: the auxiliary set's test split).

    With `use_cache` the frozen image features are computed once into a memory-mapped `FeatureCache` (spec §10:
    the reference recomputes them every epoch on identical, unaugmented images), so an epoch costs only the text
    encoder and the loss. Without it every step runs the image encoder, as the reference does.

    Args:
        model: the `AnomalyCLIP` to train (on `device`).
        samples: training records with masks (anomalous images need masks; normal ones get zero masks).
        config: `TrainConfig` (defaults: Adam 1e-3, betas (0.5, 0.999), batch 8, 15 epochs, seed 111).
        use_cache: read image features from the cache instead of recomputing them.
        cache_root: parent folder of feature caches (default `default_cache_root()`).
        cache_dtype: storage dtype of cached features ("float32" exact, "float16" half the disk).
        device: where the model runs.
        progress: progress bars.

    Returns:
        `TrainResult` with the per-epoch log (loss = objective, image = global CE, local = λ·Σ local terms).

    Raises:
        zsadkit.training.CheckpointMismatchError: `config.checkpoint_dir` holds a run of another method
            configuration, training setting or sample list (the checkpoints' fingerprint).
    """
    model.train()
    if use_cache:
        dataset = model.feature_cache(samples, cache_root, cache_dtype, (config or TrainConfig()).batch_size, device,
                                      progress).dataset()
    else:
        from zsadkit.data.dataset import AnomalyDataset

        dataset = AnomalyDataset(list(samples), image_size=model.image_size)

    def step(batch: dict) -> dict[str, torch.Tensor]:
        if "image" in batch:
            features = model.encode_image(batch["image"].to(device))
        else:
            features = ImageFeatures.from_cache_rows(batch, device)
        return model.losses(features, batch["mask"], batch["label"], batch["class_name"])

    fingerprint = {"method": "anomalyclip", "config": asdict(model.config), "samples": samples_fingerprint(samples),
                   "backbone_weights": module_fingerprint(model.text.clip),
                   "image_features": f"cache {cache_dtype}" if use_cache and cache_dtype != "float32" else "float32"}
    result = train(model.trainable_parameters(), dataset, step, config, fingerprint=fingerprint, progress=progress)
    model.eval()
    return result


@torch.no_grad()
def evaluate_cached(
    model: AnomalyCLIP,
    samples: Sequence[Sample],
    *,
    dataset: str,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    pro: str | None = "cflow200",
    cache_root: str | Path | None = None,
    cache_dtype: str = "float32",
    progress: bool = False,
) -> pd.DataFrame:
    """`zsadkit.engine.evaluate` for AnomalyCLIP, reading image features from the feature cache.

    Ablations that only change the text side (prompts, losses, words) share one cache per test set, so each
    variant's evaluation costs the scoring only. Same rows as `engine.evaluate`. Disk: (1 + N)·D values per
    image and variant (ViT-L at 518: 1370 × 768, 4.2 MB in float32, 2.1 MB with `cache_dtype="float16"`).
    """
    from zsadkit.engine import score_predictions

    model.eval()
    rows = model.feature_cache(samples, cache_root, cache_dtype, batch_size, device, progress).dataset()

    def pairs() -> Iterator[tuple[dict, Prediction]]:
        for batch in DataLoader(rows, batch_size=batch_size, shuffle=False):
            text = model._frozen_text_for_images(list(batch["class_name"]))
            yield batch, model.score(ImageFeatures.from_cache_rows(batch, device), text)

    has_masks = any(sample.mask is not None for sample in samples)
    return score_predictions(pairs(), dataset=dataset, has_masks=has_masks, pro=pro)


@register_method("anomalyclip")
def build_anomalyclip(
    backbone: str = "zsad-tiny",
    pretrained: str = "",
    image_size: int = 112,
    checkpoint: str = "",
    device: str = "cpu",
    seed: int = 0,
    **config_overrides,
) -> AnomalyCLIP:
    """An `AnomalyCLIP` on a loaded backbone, optionally with trained prompts (`checkpoint`: ours or official).

    Args:
        backbone: open_clip name or "zsad-tiny".
        pretrained: open_clip tag ("openai"), a local weights file, or "" for random weights (seeded by `seed`).
        image_size: input side S.
        checkpoint: prompts file (.safetensors written by `save_prompts`, or the official `epoch_15.pth`).
        device: torch device.
        seed: seed of random backbone weights and of the prompt initialisation.
        **config_overrides: fields of `AnomalyCLIPConfig` (defaults from `default_config(backbone)`).
    """
    check_options("anomalyclip", AnomalyCLIPConfig, config_overrides)
    clip = load_backbone(backbone, pretrained, image_size, seed=seed)
    return on_backbone(clip, default_config(backbone, **config_overrides), checkpoint, device, seed)


def check_options(method: str, config_class: type, options: Mapping) -> None:
    """Raise a TypeError naming the options that are not fields of `config_class`."""
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"{method}: unknown options {unknown}; {config_class.__name__} has {sorted(known)}")


def on_backbone(
    clip: nn.Module, config: AnomalyCLIPConfig, checkpoint: str = "", device: str = "cpu", seed: int = 0
) -> AnomalyCLIP:
    """An `AnomalyCLIP` (or CoOp) model with prompts initialised from `seed`, optionally loaded from `checkpoint`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AnomalyCLIP(clip, config)
    if checkpoint:
        model.load_prompts(checkpoint)
    return model.to(device).eval()
