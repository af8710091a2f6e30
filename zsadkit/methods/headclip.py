"""HeadCLIP: domain adaptation of attention heads for zero-shot anomaly detection (Jeong, Heo, Son, Kang; arXiv
2505.22259). **A reconstruction from the abstract** (`FIDELITY = "reconstructed"`): every output says so.

What is known, and where: only the abstract (v1 and v2, arxiv.org/html/2505.22259v1 and v2, whose stored copies
stop after the first lines of Sec. 1), the sciencestack.ai TL;DR and the front matter. The official code
(github.com/kiyoonjeong0305/HeadCLIP, named in the v2 abstract) could not be fetched, and no method section,
equation, hyper-parameter, table or third-party re-implementation was found. Places tried (queries listed in
docs/headclip.md): the repository under both spellings (fetch, file index), repositories of the authors and their
lab, exact strings ("HeadCLIP", "learnable head weights", "joint anomaly score", the arXiv id, the title), arXiv
HTML, sciencestack, sotaverified, arxivlens, tomesphere, emergentmind, deeppaper, catalyzex, arXiv digests; no
stored copy of OpenReview, Semantic Scholar, alphaxiv, papers-with-code, Hugging Face papers or ar5iv. So:

* [known] learnable prompts in the text encoder "generalize the concepts of normality and abnormality";
* [known] learnable head weights (LHW) in the image encoder "dynamically adjust the features held by each
  attention head according to domain characteristics" ("reweight Vision Transformer attention heads");
* [known] a joint anomaly score (JAS) "utilizes domain-adapted pixel-level information for image-level anomaly
  detection";
* [known] results as mAD ("mean anomaly detection score") per level on 7 industrial + 10 medical datasets.

Everything below is one reading of those sentences, and **every unknown is a switch** of `HeadCLIPConfig`:

* Prompts (H1): AnomalyCLIP's object-agnostic prompt learner with deep prompts (`AnomalyCLIP`, Sec. 3.2 of
  AnomalyCLIP), its sizes `n_ctx`, `deep_depth`, `deep_length` as parameters; DPAM side stream, Eq. 1 scoring,
  maps and the glocal loss (Eq. 4) are AnomalyCLIP's, inherited, not copied.
* LHW (H2), per attention path p and weighted layer l, head h: the head's output o_{l,h} = A_{l,h} v_{l,h} is
  scaled before the output projection, ``out_l = W_O · concat_h(w_{l,h} · o_{l,h}) + b_O``
  (`zsadkit.models.attention.weight_heads`). Switches:
  - `lhw_parameterisation`: "scalar" w = α (α₀ = 1), "softmax" w = H·softmax_h(α) (α₀ = 0), "sigmoid"
    w = 2·sigmoid(α) (α₀ = 0), or "conditional" w(x) = 2·sigmoid(MLP(LN(c))) with c the concatenated per-head
    outputs of the CLS token at that layer and the MLP's last layer zero-initialised. All four are exactly the
    identity at initialisation, so the untrained model is AnomalyCLIP (a test).
  - `lhw_placement`: "qk" (the residual stream's Q-K attention: changes the global embedding and what the side
    stream reads), "vv" (the DPAM V-V side stream only: changes the local tokens), or "both" (separate weights).
  - `lhw_layers`: "all", "tapped" (`lhw_tapped_layers`: by default the backbone's four evenly spaced tapped blocks,
    `backbone_defaults(clip).four_layers`, 6/12/18/24 of 24, the taps of VAND and AA-CLIP; AnomalyCLIP's own
    `feature_layers` is the last block only), "last" (`lhw_last_n` layers) or explicit layers; the V-V path exists
    from `dpam_first_layer` on only.
* JAS (H3), `joint_score`: s = β·p_global + (1−β)·pool(M) ("additive") or p_global^β·pool(M)^(1−β)
  ("multiplicative"), with p_global = P(g_a, f_global) (AnomalyCLIP's image score), M the anomaly map divided by
  the number of summed layers (so that M ∈ [0, 1]; `jas_map` "smoothed" or "raw"), pool "max" or "topk_mean" (mean
  of the top `jas_topk_percent` % pixels), and optionally both terms min-max normalised per class over the test set
  (`jas_normalize="minmax_per_class"`, as AA-CLIP does; needs the whole test set: `zsadkit.recipes.headclip`).
  β = 1 gives AnomalyCLIP's image score.
* mAD (H4): the metric lists per level are parameters of `zsadkit.recipes.headclip.mad_rows` (default: the
  `headclip` protocol's reported pairs, pixel AUROC + PRO and image AUROC + AP), written beside every value.
* Training (H5, `zsadkit.recipes.headclip`): AnomalyCLIP's protocol and optimiser; trainable = prompts + head
  weights; the image encoder's blocks before the first weighted layer are cached.

Official checkpoint import: none, the official weights' format is unknown (the repository could not be read).

Example:
    >>> from zsadkit.models import load_clip
    >>> clip = load_clip("zsad-tiny", image_size=112)
    >>> model = HeadCLIP(clip, reference_config(clip, lhw_placement="vv", lhw_parameterisation="sigmoid"))
    >>> sorted(model.head_weights), model.first_weighted_layer
    (['vv'], 2)
    >>> model.predict(torch.randn(2, 3, 112, 112), ["a", "b"]).anomaly_maps.shape
    torch.Size([2, 112, 112])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zsadkit.maps import gaussian_smooth
from zsadkit.methods.anomalyclip import PROMPT_FIELDS, AnomalyCLIP, AnomalyCLIPConfig, ImageFeatures
from zsadkit.methods.anomalyclip import reference_config as anomalyclip_reference_config
from zsadkit.methods.base import (
    Prediction,
    backbone_defaults,
    backbone_for,
    check_options,
    register_method,
    seeded,
)
from zsadkit.models import HeadWeighting, StreamState, module_fingerprint

__all__ = [
    "FIDELITY",
    "HeadCLIP",
    "HeadCLIPConfig",
    "HeadWeights",
    "ScoreParts",
    "build_headclip",
    "joint_score",
    "minmax_per_class",
    "pool_map",
    "reference_config",
    "weighted_layers",
]

#: What every HeadCLIP output carries until the paper's method is confirmed against its text or code.
FIDELITY = "reconstructed"
PARAMETERISATIONS = ("scalar", "softmax", "sigmoid", "conditional")
PLACEMENTS = ("qk", "vv", "both")
LAYER_CHOICES = ("all", "tapped", "last")
POOLS = ("max", "topk_mean")
JAS_MODES = ("additive", "multiplicative")
NORMALIZATIONS = ("none", "minmax_per_class")
MAP_CHOICES = ("smoothed", "raw")
#: Config fields that define the learned head weights: saved weights load only into a model that agrees.
LHW_FIELDS = ("lhw_parameterisation", "lhw_placement", "lhw_layers", "lhw_tapped_layers", "lhw_last_n",
              "lhw_mlp_hidden", "dpam_first_layer", "feature_layers")


@dataclass(frozen=True)
class HeadCLIPConfig(AnomalyCLIPConfig):
    """AnomalyCLIP's settings (inherited: prompts, DPAM, scoring, losses) plus the HeadCLIP switches.

    Every field below stands for an unknown of the paper (module docstring); the defaults are one reading.

    Attributes (beyond `AnomalyCLIPConfig`):
        lhw_parameterisation: "scalar", "softmax", "sigmoid" or "conditional" (H2).
        lhw_placement: "qk", "vv" or "both" (H2).
        lhw_layers: "all", "tapped", "last", or explicit 1-indexed layers (H2).
        lhw_tapped_layers: the layers of "tapped"; () = the backbone's four tapped blocks
            (`backbone_defaults(clip).four_layers`, filled in by `reference_config` and `HeadCLIP`).
        lhw_last_n: the N of "last".
        lhw_mlp_hidden: hidden width of the conditional weights' MLP.
        jas_beta: β of the joint score, in [0, 1] (H3); 1 = AnomalyCLIP's image score.
        jas_pool: "max" or "topk_mean" over the map's pixels.
        jas_topk_percent: the k of "topk_mean", in percent of the pixels (0, 100].
        jas_mode: "additive" or "multiplicative".
        jas_normalize: "none" or "minmax_per_class" (both terms min-max normalised per class over a test set).
        jas_map: pool the "smoothed" output map or the "raw" map before the Gaussian filter.
    """

    lhw_parameterisation: str = "scalar"
    lhw_placement: str = "both"
    lhw_layers: str | tuple[int, ...] = "all"
    lhw_tapped_layers: tuple[int, ...] = ()
    lhw_last_n: int = 4
    lhw_mlp_hidden: int = 32
    jas_beta: float = 0.5
    jas_pool: str = "max"
    jas_topk_percent: float = 1.0
    jas_mode: str = "additive"
    jas_normalize: str = "none"
    jas_map: str = "smoothed"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.lhw_layers, str):
            object.__setattr__(self, "lhw_layers", tuple(int(layer) for layer in self.lhw_layers))
        object.__setattr__(self, "lhw_tapped_layers", tuple(int(layer) for layer in self.lhw_tapped_layers))
        choices = {"lhw_parameterisation": PARAMETERISATIONS, "lhw_placement": PLACEMENTS, "jas_pool": POOLS,
                   "jas_mode": JAS_MODES, "jas_normalize": NORMALIZATIONS, "jas_map": MAP_CHOICES}
        if isinstance(self.lhw_layers, str):
            choices["lhw_layers"] = LAYER_CHOICES
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"HeadCLIPConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.lhw_layers:
            raise ValueError("HeadCLIPConfig.lhw_layers: give 'all', 'tapped', 'last' or at least one layer")
        if self.lhw_last_n < 1 or self.lhw_mlp_hidden < 1:
            raise ValueError(f"HeadCLIPConfig: lhw_last_n and lhw_mlp_hidden must be >= 1, got {self.lhw_last_n}, "
                             f"{self.lhw_mlp_hidden}")
        if not 0.0 <= self.jas_beta <= 1.0:
            raise ValueError(f"HeadCLIPConfig.jas_beta must be in [0, 1], got {self.jas_beta}")
        if not 0.0 < self.jas_topk_percent <= 100.0:
            raise ValueError(f"HeadCLIPConfig.jas_topk_percent must be in (0, 100], got {self.jas_topk_percent}")
        if self.lhw_placement in ("vv", "both") and self.dpam_first_layer is None:
            raise ValueError(f"HeadCLIPConfig: lhw_placement={self.lhw_placement!r} weights the DPAM V-V side "
                             "stream, but dpam_first_layer is None (no side stream); use lhw_placement='qk'")


def reference_config(clip: nn.Module, **overrides: Any) -> HeadCLIPConfig:
    """AnomalyCLIP's released settings scaled to `clip`'s depth (`anomalyclip.reference_config`) with the HeadCLIP
    defaults, "tapped" = `clip`'s four tapped blocks (`backbone_defaults`); `overrides` are `HeadCLIPConfig`
    fields."""
    base = HeadCLIPConfig(**asdict(anomalyclip_reference_config(clip)),
                          lhw_tapped_layers=backbone_defaults(clip).four_layers)
    config = replace(base, **overrides)
    if not config.lhw_tapped_layers:
        config = replace(config, lhw_tapped_layers=base.lhw_tapped_layers)
    return config


def weighted_layers(config: HeadCLIPConfig, num_layers: int) -> dict[str, tuple[int, ...]]:
    """The 1-indexed layers whose heads are weighted, per path ("qk", "vv"); a path that is not placed is absent.

    The V-V path exists from `dpam_first_layer` on only, so its layers are those of `lhw_layers` from there on.
    """
    choice = config.lhw_layers
    if choice == "all":
        layers = tuple(range(1, num_layers + 1))
    elif choice == "tapped":
        if not config.lhw_tapped_layers:
            raise ValueError("lhw_layers='tapped' needs lhw_tapped_layers (reference_config fills in the backbone's "
                             "four tapped blocks)")
        layers = tuple(sorted(set(config.lhw_tapped_layers)))
    elif choice == "last":
        layers = tuple(range(max(1, num_layers - config.lhw_last_n + 1), num_layers + 1))
    else:
        layers = tuple(sorted(set(choice)))
    bad = [layer for layer in layers if not 1 <= layer <= num_layers]
    if bad:
        raise ValueError(f"lhw_layers {bad} outside the {num_layers} vision layers of this backbone")
    paths = {"qk": layers}
    if config.dpam_first_layer is not None:
        paths["vv"] = tuple(layer for layer in layers if layer >= config.dpam_first_layer)
    placed = ("qk", "vv") if config.lhw_placement == "both" else (config.lhw_placement,)
    result = {path: paths[path] for path in placed}
    empty = [path for path, path_layers in result.items() if not path_layers]
    if empty:
        raise ValueError(f"lhw_layers={choice!r} leaves no layer on the {empty} path (the V-V side stream starts at "
                         f"layer {config.dpam_first_layer})")
    return result


class HeadWeights(nn.Module):
    """Learnable head weights w_{l,h} of one attention path (H2), identity at initialisation.

    Args:
        layers: the weighted 1-indexed layers.
        num_heads: H.
        width: transformer width W (input of the conditional MLP).
        parameterisation: "scalar", "softmax", "sigmoid" or "conditional".
        mlp_hidden: hidden width of the conditional MLP.
    """

    def __init__(self, layers: Sequence[int], num_heads: int, width: int, parameterisation: str,
                 mlp_hidden: int = 32) -> None:
        super().__init__()
        self.layers, self.num_heads, self.parameterisation = tuple(layers), num_heads, parameterisation
        count = len(self.layers)
        if parameterisation == "conditional":
            self.hidden_weight = nn.Parameter(torch.randn(count, width, mlp_hidden) * width**-0.5)
            self.hidden_bias = nn.Parameter(torch.zeros(count, mlp_hidden))
            self.out_weight = nn.Parameter(torch.zeros(count, mlp_hidden, num_heads))  # zero: identity at start
            self.out_bias = nn.Parameter(torch.zeros(count, num_heads))
        elif parameterisation in ("scalar", "softmax", "sigmoid"):
            self.alpha = nn.Parameter(torch.full((count, num_heads), 1.0 if parameterisation == "scalar" else 0.0))
        else:
            raise ValueError(f"head weight parameterisation must be one of {PARAMETERISATIONS}, got "
                             f"{parameterisation!r}")

    def static_weights(self) -> torch.Tensor:
        """(L_w, H) weights of the static parameterisations: α, H·softmax_h(α) or 2·sigmoid(α)."""
        if self.parameterisation == "scalar":
            return self.alpha
        if self.parameterisation == "softmax":
            return self.num_heads * self.alpha.softmax(dim=-1)
        if self.parameterisation == "sigmoid":
            return 2.0 * torch.sigmoid(self.alpha)
        raise ValueError("conditional head weights depend on the image; use conditional_weights")

    def conditional_weights(self, index: int, cls_heads: torch.Tensor) -> torch.Tensor:
        """(B, H) weights 2·sigmoid(MLP(LN(c))) of the `index`-th weighted layer from c = (B, W) CLS head outputs."""
        normalised = F.layer_norm(cls_heads, cls_heads.shape[-1:])
        hidden = F.gelu(normalised @ self.hidden_weight[index] + self.hidden_bias[index])
        return 2.0 * torch.sigmoid(hidden @ self.out_weight[index] + self.out_bias[index])

    def _scale_by_cls(self, index: int, record: dict[int, torch.Tensor] | None,
                      head_outputs: torch.Tensor) -> torch.Tensor:
        batch, heads, _, head_dim = head_outputs.shape
        weights = self.conditional_weights(index, head_outputs[:, :, 0].reshape(batch, heads * head_dim))
        if record is not None:
            record[self.layers[index]] = weights.detach()
        return head_outputs * weights.view(batch, heads, 1, 1)

    def weightings(self, record: dict[int, torch.Tensor] | None = None) -> dict[int, HeadWeighting]:
        """{layer: weighting} for `VisualEncoder` (tensors (H,), or callables on (B, H, N, Dh) per-head outputs);
        conditional weights computed in a forward are written to `record` (layer → (B, H)) when given."""
        if self.parameterisation == "conditional":
            return {layer: partial(self._scale_by_cls, index, record) for index, layer in enumerate(self.layers)}
        weights = self.static_weights()
        return {layer: weights[index] for index, layer in enumerate(self.layers)}


@dataclass
class ScoreParts:
    """What the joint score is made of, for a batch.

    Attributes:
        global_scores: (B,) p_global = P(g_a, f_global) (AnomalyCLIP's image score).
        raw_maps: (B, S, S) anomaly maps fused over layers, before the Gaussian filter.
        maps: (B, S, S) the output anomaly maps (smoothed when σ > 0).
        map_scale: divisor bringing the fused maps to [0, 1] (the number of layers summed, or 1 for "mean").
    """

    global_scores: torch.Tensor
    raw_maps: torch.Tensor
    maps: torch.Tensor
    map_scale: float

    def pooled(self, pool: str, topk_percent: float = 1.0, which: str = "smoothed") -> torch.Tensor:
        """(B,) pool(M) of the map in [0, 1] (`pool_map`)."""
        if which not in MAP_CHOICES:
            raise ValueError(f"jas_map must be one of {MAP_CHOICES}, got {which!r}")
        maps = self.maps if which == "smoothed" else self.raw_maps
        return pool_map(maps / self.map_scale, pool, topk_percent)


def pool_map(maps: torch.Tensor, pool: str, topk_percent: float = 1.0) -> torch.Tensor:
    """(B,) pixel statistic of (B, S, S) maps: "max", or "topk_mean" = the mean of the ⌈k% · S²⌉ largest pixels."""
    flat = maps.flatten(1)
    if pool == "max":
        return flat.max(dim=1).values
    if pool == "topk_mean":
        if not 0.0 < topk_percent <= 100.0:
            raise ValueError(f"topk_percent must be in (0, 100], got {topk_percent}")
        count = max(1, math.ceil(round(topk_percent * flat.shape[1] / 100.0, 6)))
        return flat.topk(count, dim=1).values.mean(dim=1)
    raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


def minmax_per_class(values: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
    """(values − min_c) / (max_c − min_c) within each class c of `class_names`; 0 for a class of equal values."""
    if len(class_names) != values.shape[0]:
        raise ValueError(f"minmax_per_class: {values.shape[0]} values but {len(class_names)} class names")
    result = torch.zeros_like(values)
    for name in sorted(set(class_names)):
        rows = torch.tensor([index for index, other in enumerate(class_names) if other == name])
        members = values[rows]
        spread = members.max() - members.min()
        result[rows] = (members - members.min()) / spread if spread > 0 else torch.zeros_like(members)
    return result


def joint_score(global_scores: torch.Tensor, pooled: torch.Tensor, beta: float, mode: str = "additive",
                normalize: str = "none", class_names: Sequence[str] | None = None) -> torch.Tensor:
    """JAS (H3): β·p + (1−β)·q ("additive") or p^β·q^(1−β) ("multiplicative") of p = p_global and q = pool(M).

    Args:
        global_scores: (B,) p_global in [0, 1].
        pooled: (B,) pool(M) in [0, 1].
        beta: β in [0, 1].
        mode: "additive" or "multiplicative".
        normalize: "minmax_per_class" normalises p and q per class first (`minmax_per_class`, over the whole
            test set: `class_names` required), "none" does not.
        class_names: (B,) classes, for the normalisation.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if normalize == "minmax_per_class":
        if class_names is None:
            raise ValueError("joint_score(normalize='minmax_per_class') needs the class names of the scores")
        global_scores, pooled = minmax_per_class(global_scores, class_names), minmax_per_class(pooled, class_names)
    elif normalize != "none":
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if mode == "additive":
        return beta * global_scores + (1.0 - beta) * pooled
    if mode == "multiplicative":
        return global_scores.clamp_min(0) ** beta * pooled.clamp_min(0) ** (1.0 - beta)
    raise ValueError(f"mode must be one of {JAS_MODES}, got {mode!r}")


class HeadCLIP(AnomalyCLIP):
    """AnomalyCLIP with learnable head weights in the image encoder and the joint anomaly score (a reconstruction).

    The image side is split at the first weighted layer: `frozen_rows` runs the frozen blocks before it (what the
    feature cache stores), `features_from_rows` the rest with the head weights (what training differentiates).

    Args:
        clip: open_clip `CLIP`; its weights are frozen.
        config: `HeadCLIPConfig`.
    """

    checkpoint_format = "zsadkit-headclip/1"
    saved_config_fields = PROMPT_FIELDS + LHW_FIELDS
    fidelity = FIDELITY

    def __init__(self, clip: nn.Module, config: HeadCLIPConfig | None = None) -> None:
        config = config or HeadCLIPConfig()
        if not isinstance(config, HeadCLIPConfig):
            raise TypeError(f"HeadCLIP needs a HeadCLIPConfig, got {type(config).__name__}")
        if not config.lhw_tapped_layers:
            config = replace(config, lhw_tapped_layers=backbone_defaults(clip).four_layers)
        super().__init__(clip, config)
        self.lhw_layers = weighted_layers(config, self.visual.num_layers)
        self.head_weights = nn.ModuleDict({
            path: HeadWeights(layers, self.visual.num_heads, self.visual.width, config.lhw_parameterisation,
                              config.lhw_mlp_hidden)
            for path, layers in self.lhw_layers.items()
        })

    @property
    def first_weighted_layer(self) -> int:
        """The first block with head weights: blocks before it are frozen and cached."""
        return min(min(layers) for layers in self.lhw_layers.values())

    @property
    def early_layers(self) -> tuple[int, ...]:
        """Feature layers before the first weighted layer (frozen taps, cached)."""
        return tuple(layer for layer in self.config.feature_layers if layer < self.first_weighted_layer)

    # --------------------------------------------------------------------------------------- visual side
    @torch.no_grad()
    def frozen_rows(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frozen part of the image encoder, as batch-first rows: "hidden" (B, 1+N, W), the stream entering
        the first weighted layer; "side" (B, V, 1+N, W), the DPAM side stream per variant when it started before;
        "early_tokens" (B, V, L_e, 1+N, D), the projected tokens of feature layers before it."""
        start = self.first_weighted_layer
        rows: dict[str, torch.Tensor] = {}
        sides, early = [], []
        for variant in self.attention_variants:
            state = self.visual.stream_state(images, start, attention=variant)
            rows["hidden"] = state.hidden  # the residual stream is plain CLIP before `start`, whatever the variant
            if state.side is not None:
                sides.append(state.side)
            if self.early_layers:
                taps = self.visual(images, self.early_layers, tokens="projected", attention=variant,
                                   return_global=False)
                early.append(torch.stack(taps.layer_tokens, dim=1))
        if sides:
            rows["side"] = torch.stack(sides, dim=1)
        if early:
            rows["early_tokens"] = torch.stack(early, dim=1)
        return rows

    def features_from_rows(self, rows: Mapping[str, torch.Tensor],
                           record: dict[str, dict[int, torch.Tensor]] | None = None) -> ImageFeatures:
        """`ImageFeatures` from frozen rows, running the weighted blocks (with a graph to the head weights).

        Args:
            rows: `frozen_rows` output (a collated batch of cache rows).
            record: when given, conditional weights of this forward are written to record[path][layer] (B, H).
        """
        device = self.visual.visual.proj.device
        weightings = {path: module.weightings(None if record is None else record.setdefault(path, {}))
                      for path, module in self.head_weights.items()}
        late_layers = tuple(layer for layer in self.config.feature_layers if layer >= self.first_weighted_layer)
        hidden = rows["hidden"].to(device)
        passes, global_embedding = [], None
        for index, variant in enumerate(self.attention_variants):
            tokens: dict[int, torch.Tensor] = {}
            if late_layers or index == 0:
                side = rows["side"][:, index].to(device) if "side" in rows else None
                features = self.visual(
                    None, late_layers, tokens="projected", global_ln_post=False, attention=variant,
                    head_weights=weightings.get("qk"), side_head_weights=weightings.get("vv"),
                    return_global=index == 0, start=StreamState(self.first_weighted_layer, hidden, side),
                )
                tokens.update(zip(late_layers, features.layer_tokens, strict=True))
                global_embedding = features.global_embedding if index == 0 else global_embedding
            if "early_tokens" in rows:
                tokens.update(zip(self.early_layers, rows["early_tokens"][:, index].to(device).unbind(1), strict=True))
            passes.append(torch.stack([tokens[layer] for layer in self.config.feature_layers]))
        return ImageFeatures(global_embedding, torch.stack(passes))

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """Features of a batch (B, 3, S, S): frozen blocks without a graph, weighted blocks with one."""
        return self.features_from_rows(self.frozen_rows(images))

    @torch.no_grad()
    def head_weight_matrix(self, path: str, images: torch.Tensor | None = None) -> torch.Tensor:
        """(num_layers, H) weights of one path, NaN on unweighted layers (for the layer × head heatmaps);
        conditional weights are averaged over `images` (required for them)."""
        if path not in self.head_weights:
            raise KeyError(f"no head weights on the {path!r} path; placed: {sorted(self.head_weights)}")
        module = self.head_weights[path]
        matrix = torch.full((self.visual.num_layers, self.visual.num_heads), float("nan"))
        if module.parameterisation == "conditional":
            if images is None:
                raise ValueError("conditional head weights depend on the image: pass images")
            record: dict[str, dict[int, torch.Tensor]] = {}
            self.features_from_rows(self.frozen_rows(images), record=record)
            for layer, weights in record[path].items():
                matrix[layer - 1] = weights.float().mean(dim=0).cpu()
        else:
            for index, layer in enumerate(module.layers):
                matrix[layer - 1] = module.static_weights()[index].float().cpu()
        return matrix

    # ------------------------------------------------------------------------------------------- scoring
    def score_parts(self, features: ImageFeatures, text_features: torch.Tensor) -> ScoreParts:
        """p_global, the raw and output maps of a batch: what the joint score pools."""
        global_scores = self.image_logits(features.global_embedding, text_features).softmax(dim=-1)[:, 1]
        raw_maps = self.anomaly_maps(features.layer_tokens, text_features, smooth=False)
        maps = gaussian_smooth(raw_maps, self.config.sigma) if self.config.sigma > 0 else raw_maps
        scale = float(len(self.config.feature_layers)) if self.config.layer_fusion == "sum" else 1.0
        return ScoreParts(global_scores, raw_maps, maps, scale)

    def score(self, features: ImageFeatures, text_features: torch.Tensor) -> Prediction:
        """JAS image scores (B,) and anomaly maps (B, S, S); the per-class normalisation needs a whole test set."""
        config = self.config
        if config.jas_normalize != "none":
            raise ValueError("jas_normalize='minmax_per_class' normalises over a whole test set, not a batch: "
                             "evaluate with zsadkit.recipes.headclip.evaluate")
        parts = self.score_parts(features, text_features)
        pooled = parts.pooled(config.jas_pool, config.jas_topk_percent, config.jas_map)
        return Prediction(joint_score(parts.global_scores, pooled, config.jas_beta, config.jas_mode), parts.maps)

    # ----------------------------------------------- `FeatureModel`: training and evaluation on cached features
    def feature_cache_key(self) -> dict[str, object]:
        """Everything `frozen_rows` depends on (weights by fingerprint)."""
        return {**super().feature_cache_key(), "method": "headclip", "resume_at_layer": self.first_weighted_layer,
                "early_layers": list(self.early_layers), "rows": "hidden, side, early_tokens"}

    def encode_rows(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """`frozen_rows`."""
        return self.frozen_rows(images)

    def losses_from_rows(self, rows: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """AnomalyCLIP's Eq. 4 on a batch of cache rows, through the weighted blocks."""
        return self.losses(self.features_from_rows(rows), rows["mask"], rows["label"], rows["class_name"])

    @torch.no_grad()
    def predict_from_rows(self, rows: Mapping[str, Any]) -> Prediction:
        """`predict` on a batch of cache rows."""
        return self.score(self.features_from_rows(rows), self.frozen_text_for_images(list(rows["class_name"])))

    @torch.no_grad()
    def score_parts_from_rows(self, rows: Mapping[str, Any]) -> ScoreParts:
        """`score_parts` of a batch of cache rows."""
        return self.score_parts(self.features_from_rows(rows), self.frozen_text_for_images(list(rows["class_name"])))

    def fingerprint(self) -> dict[str, object]:
        """What besides the training settings and samples determines the trained prompts and head weights."""
        return {"config": asdict(self.config), "fidelity": FIDELITY,
                "backbone_weights": module_fingerprint(self.text.clip)}

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The prompts (contexts, deep_prompts.i) and the head weights (head_weights.<path>.<name>)."""
        return {**dict(self.prompt_learner.named_parameters()),
                **{f"head_weights.{name}": value for name, value in self.head_weights.named_parameters()}}

    def load_prompts(self, path: str | Path) -> None:
        """Load trained prompts and head weights (`save_prompts` output or a training epoch checkpoint)."""
        if Path(path).suffix != ".safetensors":
            raise ValueError(f"{path}: HeadCLIP loads its own .safetensors files only (the format of the official "
                             "HeadCLIP weights is unknown; official AnomalyCLIP prompts hold no head weights)")
        super().load_prompts(path)



@register_method("headclip")
def build_headclip(
    backbone: str = "zsad-tiny",
    pretrained: str = "",
    image_size: int = 112,
    device: str = "cpu",
    backbone_seed: int = 0,
    train_seed: int = 0,
    checkpoint: str = "",
    clip: nn.Module | None = None,
    **config_overrides: Any,
) -> HeadCLIP:
    """A `HeadCLIP` on a loaded backbone, optionally with trained prompts and head weights (`checkpoint`).

    Args:
        backbone: open_clip name or "zsad-tiny".
        pretrained: open_clip tag ("openai"), a local weights file, or "" for random weights.
        image_size: input side S.
        device: torch device.
        backbone_seed: seed of random backbone weights.
        train_seed: seed of the prompt (and conditional MLP) initialisation.
        checkpoint: a `save_prompts` file or a training epoch checkpoint of this configuration.
        clip: a loaded backbone to reuse instead of loading one.
        **config_overrides: fields of `HeadCLIPConfig` (defaults: `reference_config(clip)`).
    """
    check_options("headclip", HeadCLIPConfig, config_overrides)
    clip = backbone_for(clip, backbone, pretrained, image_size, device, backbone_seed)
    with seeded(train_seed):
        model = HeadCLIP(clip, reference_config(clip, **config_overrides))
    if checkpoint:
        model.load_prompts(checkpoint)
    return model.to(device).eval()

