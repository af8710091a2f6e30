"""InCTRL: in-context residual learning with few-shot sample prompts (Zhu & Pang, CVPR 2024).

A query image x is scored against K normal images of its class (the "sample prompts", `fit_references`) and the
class's text prompts. The file follows the reference code, mala-lab/InCTRL @ cc535d0 (`open_clip/model.py`, class
`InCTRL`, lines 443-592), whose steps the paper describes (its PDF was not available here, so no equation
numbers are cited). `python -m zsadkit.verify inctrl DIR` checks this file against the reference's outputs.

1. Multi-layer patch-level residual (model.py:515-556): the raw residual-stream tokens of blocks 7, 9, 11
   (1-indexed, no ``ln_post``/``proj``, CLS dropped). Per layer l and query patch j,
   r_l(j) = min over the K·N prompt tokens p of layer l of ½·(1 − cos(q_l(j), p)); M_p = mean_l r_l;
   s_p = max_j M_p(j).
2. Image-level residual (model.py:524-529, 581): ψ = Linear(D, D/4) → ReLU → Linear(D/4, D) → ReLU (no biases),
   F_I = mean_k ψ(f_k) − ψ(f_x) on the pooled embeddings f (CLS → ``ln_post`` → ``proj``, not normalised);
   s_i = η(F_I), η a `ScoreHead`. With K = 1 the mean is the one prompt (maintainer, issue #27).
3. Text prompt-guided prior (model.py:136-155, 558-578): WinCLIP's compositional ensemble (`zsadkit.prompts`,
   "winclip": 7 × 4 states × 22 templates), sentence embeddings normalised, averaged per state, re-normalised;
   s_a = softmax(100·[cos(f, t_n), cos(f, t_a)])[anomalous]. A class named like a CIFAR-10 class or "animal"
   (CIFAR multi-class) uses the single pair "a photo of {c} for anomaly detection." / "a photo without {c} for
   anomaly detection." instead. "metal_nut" is written "metal nut".
4. Holistic map and score (model.py:580-588): M_h = M_p + s_i + s_a (scalars broadcast over the N patches),
   s_h = φ(M_h) with φ a `ScoreHead` on N = 225 inputs; s(x) = (s_h + s_p) / 2.
5. Loss (engine_IC.py:59-64): L = FL(s(x), y) + FL(s_i, y), FL = `zsadkit.losses.binary_focal_loss` with α = 1,
   γ = 2 and ``logits=True`` applied to the **sigmoid outputs** (reference default; `focal_loss="textbook"` is the
   focal loss on probabilities).

`ScoreHead` (TransformerBasicHead, model.py:400-426): Linear(d, 128) → ReLU → BatchNorm → Linear(128, 64) → ReLU →
BatchNorm → Linear(64, 1) → sigmoid; the reference's unused `bn1` is left out. BatchNorm makes eval mode matter:
`predict` always runs the heads in eval mode.

Deviations (each a named option where the reference's behaviour can be asked for):

* Batch layout: the reference reshapes (instead of permuting) the stacked per-layer query tokens, the shot-major
  prompt tokens and the prompt embeddings (model.py:521-524), so at batch > 1 each query is compared with tokens
  of other samples and layers and gets another sample's prototype. Default: the correct per-sample layout (equal to
  the reference at batch 1). `batch_reshape="reference"` reproduces the scrambling (warns at batch > 1); the
  official checkpoints were trained in it and are evaluated at batch 1.
* Text embeddings are encoded once per class name and cached (the reference re-encodes all 242 sentences for every
  sample in every forward pass); `cache_text_features=False` re-encodes as the reference does. Sentences run
  through the text tower up to the longest end-of-text token (exact up to float rounding, `encode_sentences`).
* The patch residual is vectorised: 0.5·(1 − max cos) over all prompt tokens at once, normalising each token once
  (the reference loops over query patches and re-normalises the prompt tokens each time: differences of a few
  ulps).
* Options for the ablations (`patch_residual`, `image_residual`, `text_prior`, `holistic_head`,
  `image_residual_op`) switch components off or replace the image-level residual by a concatenation or an average
  (the paper's Table 3); their exact definitions are ours (see `InCTRLConfig`).

Example:
    >>> model = build_inctrl(backbone="zsad-tiny", image_size=64)
    >>> model.fit_references(torch.randn(2, 3, 64, 64))
    >>> model.predict(torch.randn(3, 3, 64, 64), ["bottle"] * 3).image_scores.shape
    torch.Size([3])
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from zsadkit.losses import binary_focal_loss
from zsadkit.maps import CLIP_TEMPERATURE
from zsadkit.methods.base import (
    Prediction,
    backbone_defaults,
    backbone_for,
    check_options,
    register_method,
    seeded,
)
from zsadkit.models import TextEncoder, VisualEncoder, module_fingerprint
from zsadkit.prompts import (
    ClassTextFeatures,
    PromptEnsemble,
    class_phrase,
    class_text_features,
    encode_sentences,
)
from zsadkit.prompts import prompt_ensemble as named_prompt_ensemble

__all__ = [
    "CIFAR10_CLASSES",
    "SEMANTIC_PROMPTS",
    "ImageFeatures",
    "InCTRL",
    "InCTRLConfig",
    "InCTRLOutput",
    "ScoreHead",
    "arrange_tokens",
    "build_inctrl",
    "import_official_checkpoint",
    "load_official_prompt_set",
    "official_name",
    "patch_residuals",
    "reference_config",
]

#: The class names of model.py:138-139 whose text prior is the single "a photo of/without {c}" pair.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: The pair used for those names (model.py:141-147), as a one-template ensemble.
SEMANTIC_PROMPTS = PromptEnsemble("inctrl-semantic", ("a photo of {} for anomaly detection.",),
                                  ("a photo without {} for anomaly detection.",), ("{}",))
CHECKPOINT_FORMAT = "zsadkit-inctrl-heads/1"
#: Reference module names (`InCTRL.state_dict()`) → ours; `bn1` of both heads is never used and not kept.
OFFICIAL_PREFIXES = {"adapter.fc.": "adapter.", "diff_head_ref.": "image_head.", "diff_head.": "holistic_head."}
OFFICIAL_LAYERS = {"projection1": "linear1", "bn2": "norm1", "projection2": "linear2", "bn3": "norm2",
                   "projection3": "linear3"}


@dataclass(frozen=True)
class InCTRLConfig:
    """Every InCTRL setting; defaults are the reference's (ViT-B-16-plus-240 at 240).

    Attributes:
        layers: 1-indexed blocks whose raw tokens give the patch residuals (reference `out_layers=[7, 9, 11]`;
            `reference_config` scales them to the backbone's depth).
        adapter_reduction: ψ's bottleneck D / r (4).
        temperature: τ of the text prior (0.01, the fixed logit scale 100).
        prompts: the `zsadkit.prompts` ensemble of the text prior ("winclip").
        semantic_prompt_classes: names whose prior is the `SEMANTIC_PROMPTS` pair (the CIFAR-10 classes and
            "animal", model.py:138-139).
        patch_residual: use M_p in M_h and s_p in s(x) ("P" of the ablation). Off: s(x) = s_h.
        image_residual: use s_i in M_h and FL(s_i, y) in the loss ("I").
        text_prior: use s_a in M_h ("T").
        holistic_head: score with φ(M_h) (reference). Off (ablation, our definition): s(x) is the mean of the
            enabled scalar scores among s_p, s_i, s_a, and φ is not used.
        image_residual_op: how query and prompts meet in the image branch: "difference" (reference: prototype −
            query), "concatenation" ([ψ(f_x), prototype], η takes 2D inputs) or "average" ((ψ(f_x) + prototype)/2):
            the alternatives of the paper's Table 3, for the image branch only (the patch-branch counterparts are
            not defined in the material available here).
        batch_reshape: "per_sample" (correct) or "reference" (model.py:521-524 reshapes; scrambles batch > 1).
        focal_loss: "reference" (BCE-with-logits on sigmoid outputs) or "textbook" (focal loss on probabilities).
        cache_text_features: encode each class's prompts once (True) or for every sample as the reference.
    """

    layers: tuple[int, ...] = (7, 9, 11)
    adapter_reduction: int = 4
    temperature: float = CLIP_TEMPERATURE
    prompts: str = "winclip"
    semantic_prompt_classes: tuple[str, ...] = (*CIFAR10_CLASSES, "animal")
    patch_residual: bool = True
    image_residual: bool = True
    text_prior: bool = True
    holistic_head: bool = True
    image_residual_op: Literal["difference", "concatenation", "average"] = "difference"
    batch_reshape: Literal["per_sample", "reference"] = "per_sample"
    focal_loss: Literal["reference", "textbook"] = "reference"
    cache_text_features: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))
        object.__setattr__(self, "semantic_prompt_classes", tuple(self.semantic_prompt_classes))
        named_prompt_ensemble(self.prompts)
        choices = {"image_residual_op": ("difference", "concatenation", "average"),
                   "batch_reshape": ("per_sample", "reference"), "focal_loss": ("reference", "textbook")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"InCTRLConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.layers:
            raise ValueError("InCTRLConfig.layers must name at least one block")
        if self.adapter_reduction < 1 or self.temperature <= 0:
            raise ValueError(f"InCTRLConfig: adapter_reduction >= 1 and temperature > 0 are required, got "
                             f"{self.adapter_reduction}, {self.temperature}")
        if not (self.patch_residual or self.image_residual or self.text_prior):
            raise ValueError("InCTRLConfig: at least one of patch_residual, image_residual, text_prior must be on")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def reference_config(clip: nn.Module, **overrides: Any) -> InCTRLConfig:
    """The reference settings with the tapped blocks of `clip`'s depth (`backbone_defaults`: 7, 9, 11 of 12);
    `overrides` are `InCTRLConfig` fields."""
    return replace(InCTRLConfig(layers=backbone_defaults(clip).inctrl_layers), **overrides)


class ScoreHead(nn.Module):
    """Linear(d, 128) → ReLU → BatchNorm → Linear(128, 64) → ReLU → BatchNorm → Linear(64, 1) → sigmoid.

    The reference's `TransformerBasicHead` (model.py:400-426): φ on the holistic map, η on the image residual.
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.linear1, self.norm1 = nn.Linear(in_features, 128), nn.BatchNorm1d(128)
        self.linear2, self.norm2 = nn.Linear(128, 64), nn.BatchNorm1d(64)
        self.linear3 = nn.Linear(64, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, d) → (B,) scores in (0, 1)."""
        hidden = self.norm1(F.relu(self.linear1(features)))
        hidden = self.norm2(F.relu(self.linear2(hidden)))
        return torch.sigmoid(self.linear3(hidden)).squeeze(-1)


@dataclass
class ImageFeatures:
    """Frozen image-encoder outputs InCTRL needs (what the feature cache stores), batch-first.

    Attributes:
        patch_tokens: (..., L, N, W) raw residual-stream tokens of the tapped blocks, CLS dropped.
        embedding: (..., D) CLS → ``ln_post`` → ``proj``, not normalised.

    The leading dimensions are (B,) for queries and (B, K) or (K,) for prompts.
    """

    patch_tokens: torch.Tensor
    embedding: torch.Tensor

    def as_cache_rows(self) -> dict[str, torch.Tensor]:
        return {"patch_tokens": self.patch_tokens, "embedding": self.embedding}

    @classmethod
    def from_cache_rows(cls, rows: Mapping[str, torch.Tensor], device: torch.device | str,
                        prefix: str = "") -> ImageFeatures:
        """From (collated) cache rows; `prefix` selects e.g. the "prompt_" rows of an episode."""
        return cls(rows[f"{prefix}patch_tokens"].to(device).float(), rows[f"{prefix}embedding"].to(device).float())


@dataclass
class InCTRLOutput:
    """Every intermediate of one forward pass (B queries; None for a component switched off).

    Attributes:
        layer_residuals: (B, L, N) r_l(j).
        patch_map: (B, N) M_p, the mean over layers.
        patch_score: (B,) s_p = max_j M_p(j).
        query_adapted: (B, D) ψ(f_x).
        prompt_adapted: (B, K, D) ψ(f_k).
        image_residual: (B, D) F_I (2D for "concatenation").
        image_score: (B,) s_i.
        text_features: (B, 2, D) unit-norm (normal, anomalous) class embeddings.
        text_score: (B,) s_a.
        holistic_map: (B, N) M_h.
        holistic_score: (B,) s_h.
        final_score: (B,) s(x).
    """

    layer_residuals: torch.Tensor
    patch_map: torch.Tensor
    patch_score: torch.Tensor
    final_score: torch.Tensor
    query_adapted: torch.Tensor | None = None
    prompt_adapted: torch.Tensor | None = None
    image_residual: torch.Tensor | None = None
    image_score: torch.Tensor | None = None
    text_features: torch.Tensor | None = None
    text_score: torch.Tensor | None = None
    holistic_map: torch.Tensor | None = None
    holistic_score: torch.Tensor | None = None


def arrange_tokens(
    query_tokens: torch.Tensor, prompt_tokens: torch.Tensor, prompt_embeddings: torch.Tensor,
    layout: Literal["per_sample", "reference"] = "per_sample",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample query tokens, prompt token pools and prompt embeddings, correctly or as the reference reshapes.

    Args:
        query_tokens: (B, L, N, W).
        prompt_tokens: (B, K, L, N, W), prompt k of sample b at [b, k].
        prompt_embeddings: (B, K, D).
        layout: "per_sample", or "reference": the reference stacks layers first, (L, B, N, W), and lists prompts
            shot-major, (L, K·B, N, W) and (K·B, D), then **reshapes** them to (B, L, N, W), (B, L, K·N, W) and
            (B, K, D) (model.py:515-524). Identical at B = 1.

    Returns:
        Query tokens (B, L, N, W), prompt pools (B, L, K·N, W), prompt embeddings (B, K, D) of each sample.
    """
    batch, shots, layers, patches, width = prompt_tokens.shape
    if layout == "per_sample":
        pools = prompt_tokens.permute(0, 2, 1, 3, 4).reshape(batch, layers, shots * patches, width)
        return query_tokens, pools, prompt_embeddings
    queries = query_tokens.transpose(0, 1).reshape(batch, layers, patches, width)
    pools = prompt_tokens.permute(2, 1, 0, 3, 4).reshape(batch, layers, shots * patches, width)
    embeddings = prompt_embeddings.transpose(0, 1).reshape(batch, shots, -1)
    return queries, pools, embeddings


def patch_residuals(query_tokens: torch.Tensor, prompt_pools: torch.Tensor) -> torch.Tensor:
    """r_l(j) = min_p ½·(1 − cos(q_l(j), p)) = ½·(1 − max_p cos) (model.py:534-553), in [0, 1].

    Args:
        query_tokens: (B, L, N, W).
        prompt_pools: (B, L, M, W), M = K·N prompt tokens per layer.

    Returns:
        (B, L, N).
    """
    cosine = F.normalize(query_tokens, dim=-1) @ F.normalize(prompt_pools, dim=-1).transpose(-1, -2)
    return 0.5 * (1.0 - cosine.amax(dim=-1))


class InCTRL(nn.Module):
    """Frozen CLIP + the trained adapter ψ and heads η (image residual) and φ (holistic map).

    Args:
        clip: open_clip `CLIP` loaded for the input size (paper: ViT-B-16-plus-240, laion400m_e32, 240 px); its
            weights are frozen.
        config: `InCTRLConfig`.
    """

    #: InCTRL scores a query only against K normal references (`fit_references`); `zsadkit.predict` and the
    #: registry's callers fit them before predicting.
    requires_references = True

    def __init__(self, clip: nn.Module, config: InCTRLConfig | None = None) -> None:
        super().__init__()
        self.config = config or InCTRLConfig()
        for parameter in clip.parameters():
            parameter.requires_grad_(False)
        self.visual = VisualEncoder(clip)
        self.text = TextEncoder(clip)
        bad = [layer for layer in self.config.layers if not 1 <= layer <= self.visual.num_layers]
        if bad:
            raise ValueError(f"InCTRL layers {bad} outside the {self.visual.num_layers} vision blocks of this backbone "
                             f"(use reference_config(clip) for its reference layers)")
        dim = self.visual.embed_dim
        if dim % self.config.adapter_reduction:
            raise ValueError(f"adapter_reduction {self.config.adapter_reduction} does not divide the embedding {dim}")
        hidden = dim // self.config.adapter_reduction
        self.adapter = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(),
                                     nn.Linear(hidden, dim, bias=False), nn.ReLU())
        self.image_head = ScoreHead(2 * dim if self.config.image_residual_op == "concatenation" else dim)
        self.holistic_head = ScoreHead(self.visual.grid_size ** 2)
        self.class_text = ClassTextFeatures(self.text, named_prompt_ensemble(self.config.prompts))
        self.semantic_text = ClassTextFeatures(self.text, SEMANTIC_PROMPTS)
        self.memory: ImageFeatures | None = None

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    @property
    def device(self) -> torch.device:
        return self.visual.visual.proj.device

    def train(self, mode: bool = True) -> InCTRL:
        """Train mode for the adapter and heads (BatchNorm uses batch statistics); the CLIP stays in eval mode."""
        super().train(mode)
        self.visual.eval()
        self.text.eval()
        return self

    # ----------------------------------------------------------------------------------------- encoders
    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """Raw tokens of the tapped blocks (B, L, N, W) and the pooled embedding (B, D) of (B, 3, S, S) images."""
        features = self.visual(images.to(self.device), self.config.layers, tokens="raw", global_ln_post=True)
        return ImageFeatures(torch.stack(features.patch_tokens, dim=1), features.global_embedding)

    def text_features(self, class_names: Sequence[str]) -> torch.Tensor:
        """(B, 2, D) unit-norm (normal, anomalous) embeddings of each image's class (model.py:563-575)."""
        rows = []
        for name in class_names:
            semantic = class_phrase(name) in self.config.semantic_prompt_classes
            if self.config.cache_text_features:
                rows.append((self.semantic_text if semantic else self.class_text)(name))
            else:
                with torch.no_grad():
                    rows.append(class_text_features(lambda sentences: encode_sentences(self.text, sentences),
                                                    SEMANTIC_PROMPTS if semantic else self.class_text.ensemble, name))
        return torch.stack(rows).to(self.device)

    def share_text_cache(self, other: InCTRL) -> None:
        """Use `other`'s cached class embeddings (and add to them): for models on the same CLIP whose prompts
        agree, e.g. the models per K or the ablation variants of one run."""
        if other.text.clip is not self.text.clip or other.config.prompts != self.config.prompts \
                or other.config.semantic_prompt_classes != self.config.semantic_prompt_classes:
            raise ValueError("share_text_cache: the models must share the CLIP and the prompt settings")
        self.class_text.cache, self.semantic_text.cache = other.class_text.cache, other.semantic_text.cache

    # ----------------------------------------------------------------------------------------- scoring
    def score(self, query: ImageFeatures, prompts: ImageFeatures, class_names: Sequence[str]) -> InCTRLOutput:
        """Scores of B queries, each against its own K prompts (prompts leading dims (B, K)): `residuals`, then
        `holistic`. The graph through the adapter and heads is kept (training); the heads' mode decides BatchNorm.
        """
        return self.holistic(self.residuals(query, prompts, class_names))

    def residuals(self, query: ImageFeatures, prompts: ImageFeatures, class_names: Sequence[str]) -> InCTRLOutput:
        """Steps 1-3: the patch residual map M_p and s_p, the image residual F_I and s_i, the text prior s_a."""
        batch = query.patch_tokens.shape[0]
        if len(class_names) != batch or prompts.patch_tokens.shape[0] != batch:
            raise ValueError(f"score: {batch} queries, {prompts.patch_tokens.shape[0]} prompt sets, "
                             f"{len(class_names)} class names")
        if self.config.batch_reshape == "reference" and batch > 1:
            warnings.warn(f"batch_reshape='reference' at batch {batch}: queries are compared with other samples' "
                          "tokens and layers, as in the reference code (use batch 1 for its correct behaviour)",
                          stacklevel=3)
        query_tokens, prompt_pools, prompt_embeddings = arrange_tokens(
            query.patch_tokens, prompts.patch_tokens, prompts.embedding, self.config.batch_reshape)
        # 1. Multi-layer patch-level residual map M_p and its maximum s_p.
        layer_residuals = patch_residuals(query_tokens, prompt_pools)
        patch_map = layer_residuals.mean(dim=1)
        output = InCTRLOutput(layer_residuals, patch_map, patch_map.amax(dim=1), final_score=patch_map.amax(dim=1))
        # 2. Image-level residual F_I = mean_k ψ(f_k) − ψ(f_x) and its score s_i.
        if self.config.image_residual:
            output.query_adapted = self.adapter(query.embedding)
            output.prompt_adapted = self.adapter(prompt_embeddings)
            prototype = output.prompt_adapted.mean(dim=1)
            if self.config.image_residual_op == "difference":
                output.image_residual = prototype - output.query_adapted
            elif self.config.image_residual_op == "concatenation":
                output.image_residual = torch.cat([output.query_adapted, prototype], dim=-1)
            else:
                output.image_residual = 0.5 * (output.query_adapted + prototype)
            output.image_score = self.image_head(output.image_residual)
        # 3. Text prompt-guided prior s_a.
        if self.config.text_prior:
            output.text_features = self.text_features(class_names)
            image = F.normalize(query.embedding, dim=-1) * (1.0 / self.config.temperature)
            output.text_score = torch.bmm(image[:, None], output.text_features.transpose(1, 2))[:, 0].softmax(-1)[:, 1]
        return output

    def holistic(self, output: InCTRLOutput) -> InCTRLOutput:
        """Step 4: M_h = s_a + s_i + M_p (in the reference's order of additions), s_h = φ(M_h) and s(x), filled
        into `output` (and returned)."""
        batch, patches = output.patch_map.shape
        scalars = [score for score in (output.text_score, output.image_score) if score is not None]
        if self.config.holistic_head:
            holistic = sum(scalars[1:], scalars[0])[:, None] if scalars else output.patch_map.new_zeros(batch, 1)
            output.holistic_map = holistic + output.patch_map if self.config.patch_residual else \
                holistic.expand(batch, patches)
            output.holistic_score = self.holistic_head(output.holistic_map)
            output.final_score = (output.holistic_score + output.patch_score) / 2 if self.config.patch_residual else \
                output.holistic_score
        else:
            scores = scalars + ([output.patch_score] if self.config.patch_residual else [])
            output.final_score = torch.stack(scores).mean(dim=0)
        return output

    def forward(self, query_images: torch.Tensor, prompt_images: torch.Tensor,
                class_names: Sequence[str]) -> InCTRLOutput:
        """Episodes: (B, 3, S, S) queries, (B, K, 3, S, S) prompts of each query's class."""
        if prompt_images.ndim != 5 or prompt_images.shape[0] != query_images.shape[0]:
            raise ValueError(f"prompt_images must be (B, K, 3, S, S) with B = {query_images.shape[0]}, got "
                             f"{tuple(prompt_images.shape)}")
        batch, shots = prompt_images.shape[:2]
        prompts = self.encode_image(prompt_images.flatten(0, 1))
        prompts = ImageFeatures(prompts.patch_tokens.unflatten(0, (batch, shots)),
                                prompts.embedding.unflatten(0, (batch, shots)))
        return self.score(self.encode_image(query_images), prompts, class_names)

    def losses(self, output: InCTRLOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """L = FL(s(x), y) + FL(s_i, y) (engine_IC.py:64): {"loss", "final", "image"}."""
        labels = labels.to(output.final_score.device).float()
        logits = self.config.focal_loss == "reference"
        final = binary_focal_loss(output.final_score, labels, logits=logits)
        image = (binary_focal_loss(output.image_score, labels, logits=logits) if output.image_score is not None
                 else final.new_zeros(()))
        return {"loss": final + image, "final": final, "image": image}

    # ----------------------------------------------------------------------------------------- few-shot use
    @torch.no_grad()
    def fit_references(self, reference_images: torch.Tensor) -> None:
        """Encode the K normal sample prompts (K, 3, S, S) of one class; `predict` then scores against them."""
        if reference_images.ndim != 4 or reference_images.shape[0] == 0:
            raise ValueError(f"reference_images must be (K, 3, S, S) with K >= 1, got {tuple(reference_images.shape)}")
        self.memory = self.encode_image(reference_images)

    def fit_reference_rows(self, rows: Mapping[str, torch.Tensor]) -> None:
        """`fit_references` from K cached rows (`encode_rows` of the prompt images)."""
        self.memory = ImageFeatures.from_cache_rows(rows, self.device)

    def clear_references(self) -> None:
        self.memory = None

    def _memory_for(self, batch: int) -> ImageFeatures:
        if self.memory is None:
            raise RuntimeError("InCTRL scores against K normal sample prompts: call fit_references(images) first")
        return ImageFeatures(self.memory.patch_tokens.expand(batch, *self.memory.patch_tokens.shape),
                             self.memory.embedding.expand(batch, *self.memory.embedding.shape))

    @torch.no_grad()
    def score_features(self, query: ImageFeatures, class_names: Sequence[str]) -> InCTRLOutput:
        """`score` against the fitted prompts, heads in eval mode."""
        training = self.training
        self.eval()
        try:
            return self.score(query, self._memory_for(query.patch_tokens.shape[0]), class_names)
        finally:
            self.train(training)

    def prediction(self, output: InCTRLOutput) -> Prediction:
        """s(x) (B,) and M_p upsampled to the input (B, S, S): the map the paper draws (issue #8)."""
        grid = self.visual.grid_size
        patch_map = output.patch_map.reshape(-1, 1, grid, grid)
        maps = F.interpolate(patch_map, size=self.image_size, mode="bilinear", align_corners=False)[:, 0]
        return Prediction(output.final_score, maps)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: Sequence[str]) -> Prediction:
        """Score (B, 3, S, S) images of the class whose prompts were fitted (the `Detector` protocol)."""
        if len(class_names) != images.shape[0]:
            raise ValueError(f"predict: {images.shape[0]} images but {len(class_names)} class names")
        return self.prediction(self.score_features(self.encode_image(images), class_names))

    # ----------------------------------------------- `FeatureModel`: cached frozen features
    def feature_cache_key(self) -> dict[str, object]:
        """Everything `encode_image` depends on (weights by fingerprint)."""
        source = getattr(self.visual.visual, "zsad_source", None) or getattr(self.text.clip, "zsad_source", None)
        return {"method": "inctrl", "backbone": asdict(source) if source is not None else None,
                "weights": module_fingerprint(self.visual), "image_size": self.image_size,
                "layers": list(self.config.layers), "tokens": "raw, CLS dropped", "embedding": "cls+ln_post@proj"}

    def encode_rows(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.encode_image(images).as_cache_rows()

    @torch.no_grad()
    def predict_from_rows(self, rows: Mapping[str, Any]) -> Prediction:
        """`predict` on a batch of cache rows (same values)."""
        query = ImageFeatures.from_cache_rows(rows, self.device)
        return self.prediction(self.score_features(query, list(rows["class_name"])))

    def episode_losses(self, rows: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """`losses` of a batch of episodes: query rows, "prompt_" rows (B, K, ...), "label", "class_name"."""
        output = self.score(ImageFeatures.from_cache_rows(rows, self.device),
                            ImageFeatures.from_cache_rows(rows, self.device, prefix="prompt_"),
                            list(rows["class_name"]))
        return self.losses(output, rows["label"])

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """ψ, η and φ by checkpoint name (the reference optimises nothing else)."""
        heads = {"adapter": self.adapter, "image_head": self.image_head, "holistic_head": self.holistic_head}
        return {f"{prefix}.{name}": parameter for prefix, module in heads.items()
                for name, parameter in module.named_parameters()}

    def head_buffers(self) -> dict[str, torch.Tensor]:
        """The heads' BatchNorm statistics by checkpoint name (saved with the parameters)."""
        heads = {"image_head": self.image_head, "holistic_head": self.holistic_head}
        return {f"{prefix}.{name}": buffer for prefix, module in heads.items() for name, buffer in module.named_buffers()}

    def fingerprint(self) -> dict[str, object]:
        """What besides the training settings and episodes determines the trained heads."""
        return {"config": asdict(self.config), "backbone_weights": module_fingerprint(self.text.clip)}

    # ----------------------------------------------------------------------------------------- checkpoints
    def head_state(self) -> dict[str, torch.Tensor]:
        return {**self.trainable_parameters(), **self.head_buffers()}

    def save_heads(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
        """Write ψ, η, φ and the BatchNorm statistics to safetensors, with the configuration in the metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: value.detach().cpu().contiguous() for name, value in self.head_state().items()}
        save_file(tensors, str(path), metadata={"format": CHECKPOINT_FORMAT, "config": self.config.to_json(),
                                                **dict(metadata or {})})
        return path

    def load_heads(self, path: str | Path) -> None:
        """Load trained heads: `save_heads` output, a `zsadkit.training` epoch checkpoint (`param/`, `buffer/`), or
        an official checkpoint (`checkpoint_N.pyth`, `torch.load(weights_only=True)`, `import_official_checkpoint`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"InCTRL checkpoint {path} does not exist")
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            saved = json.loads(metadata["config"]) if metadata.get("format") == CHECKPOINT_FORMAT else \
                json.loads(metadata.get("fingerprint", "{}")).get("config")
            if isinstance(saved, dict) and saved.get("image_residual_op", "difference") != self.config.image_residual_op:
                raise ValueError(f"{path}: heads trained with image_residual_op={saved['image_residual_op']!r}, "
                                 f"the model uses {self.config.image_residual_op!r}")
            state = load_file(str(path), device="cpu")
            if any(key.startswith(("param/", "buffer/")) for key in state):
                state = {key.split("/", 1)[1]: value for key, value in state.items()
                         if key.startswith(("param/", "buffer/"))}
        else:
            state = import_official_checkpoint(torch.load(path, map_location="cpu", weights_only=True), self,
                                               source=str(path))
        self.load_head_state(state, source=str(path))

    def load_head_state(self, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Copy ψ, η, φ and the BatchNorm statistics from `state` (our names), checking names and shapes."""
        own = self.head_state()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                 if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(f"InCTRL heads {source} do not fit this model: missing {missing}, unexpected "
                             f"{unexpected}, wrong shapes {wrong}")
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(state[name].to(tensor.dtype))


def official_name(key: str) -> str | None:
    """Our name of a reference `InCTRL.state_dict()` key of the adapter or heads (`OFFICIAL_NAMES`); None for the
    other keys (the CLIP, the unused `bn1`)."""
    for prefix, ours in OFFICIAL_PREFIXES.items():
        if key.startswith(prefix):
            module, _, leaf = key[len(prefix):].partition(".")
            if module == "bn1":
                return None
            return f"{ours}{OFFICIAL_LAYERS.get(module, module)}.{leaf}"
    return None


def import_official_checkpoint(
    checkpoint: Mapping[str, object], model: InCTRL, source: str = "checkpoint", atol: float = 1e-6
) -> dict[str, torch.Tensor]:
    """Translate an official InCTRL checkpoint (the full `InCTRL.state_dict()`, optionally under "model_state",
    as `engine_IC.train` saves `checkpoint_N.pyth` per epoch) into `load_head_state` names.

    The checkpoint's CLIP entries are compared with `model`'s backbone: a difference (another CLIP, e.g. not
    `laion400m_e32`) warns, as the heads were trained on the checkpoint's CLIP. The unused `bn1` entries are
    dropped. Official checkpoints were trained with the reference's batch reshape: evaluate them at batch 1.
    """
    state = checkpoint.get("model_state", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or "adapter.fc.0.weight" not in {k.removeprefix("module.") for k in state}:
        raise ValueError(f"{source}: not an official InCTRL checkpoint (expected a state dict with "
                         "'adapter.fc.0.weight', 'diff_head.*', 'diff_head_ref.*')")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    converted = {official_name(key): value for key, value in state.items() if official_name(key) is not None}
    backbone = model.text.clip.state_dict()
    differing = [key for key, value in state.items() if key in backbone and (
        value.shape != backbone[key].shape
        or not torch.allclose(value.float(), backbone[key].detach().cpu().float(), atol=atol))]
    if differing:
        warnings.warn(f"{source}: {len(differing)} CLIP tensors differ from the loaded backbone (e.g. "
                      f"{differing[:3]}); the heads were trained on the checkpoint's CLIP (laion400m_e32)",
                      stacklevel=2)
    return converted


def load_official_prompt_set(path: str | Path, image_size: int | None = None) -> torch.Tensor:
    """An official few-shot prompt file (`few_shot_dir/<category>.pt`: a `torch.save`d list of K preprocessed
    (3, S, S) tensors), read with `torch.load(weights_only=True)`; returns (K, 3, S, S)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"InCTRL prompt set {path} does not exist")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if torch.is_tensor(loaded):
        loaded = list(loaded)
    if not isinstance(loaded, (list, tuple)) or not loaded or not all(torch.is_tensor(item) for item in loaded):
        raise ValueError(f"{path}: expected a list of K (3, S, S) image tensors, got {type(loaded).__name__}")
    shapes = {tuple(item.shape) for item in loaded}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[0] != 3:
        raise ValueError(f"{path}: every prompt must be one (3, S, S) tensor, got shapes {sorted(shapes)}")
    size = next(iter(shapes))[-1]
    if image_size is not None and size != image_size:
        raise ValueError(f"{path}: prompts are {size} px, the model takes {image_size} px")
    return torch.stack([item.float() for item in loaded])


@register_method("inctrl")
def build_inctrl(
    backbone: str = "zsad-tiny",
    pretrained: str = "",
    image_size: int = 112,
    device: str = "cpu",
    backbone_seed: int = 0,
    train_seed: int = 0,
    checkpoint: str = "",
    clip: nn.Module | None = None,
    **config_overrides: Any,
) -> InCTRL:
    """An `InCTRL` on a loaded backbone, heads initialised from `train_seed`, optionally loaded from `checkpoint`
    (ours or an official `.pyth`). The paper setting is ``backbone="ViT-B-16-plus-240",
    pretrained="laion400m_e32", image_size=240``; `config_overrides` are `InCTRLConfig` fields (defaults:
    `reference_config(clip)`)."""
    check_options("inctrl", InCTRLConfig, config_overrides)
    clip = backbone_for(clip, backbone, pretrained, image_size, device, backbone_seed)
    with seeded(train_seed):
        model = InCTRL(clip, reference_config(clip, **config_overrides))
    if checkpoint:
        model.load_heads(checkpoint)
    return model.to(device).eval()
