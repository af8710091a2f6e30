"""WinCLIP and WinCLIP+ (Jeong et al., CVPR 2023): compositional prompts, masked-token windows, harmonic fusion.

No official code exists; this follows the paper and three implementations: anomalib's
(`src/anomalib/models/image/winclip/torch_model.py`), mala-lab/WinCLIP (used by InCTRL) and zqhang/WinCLIP-pytorch.

Method, in the order of the paper's Sec. 4:

1. Compositional prompt ensemble (Sec. 4.1): 7 normal × 4 anomalous states × 22 templates, each class embedding
   the (normalised) mean of its sentence embeddings (`zsadkit.prompts`, "winclip").
2. Zero-shot classification (Eq. 1–2): ascore₀(x) = softmax(⟨f, [g_n, g_a]⟩ / τ)[anomalous] on the global
   embedding f (CLS → ``ln_post`` → ``proj``).
3. Window embeddings (Sec. 4.2): for every k×k window of patches (k = 2 "small", 3 "mid", stride 1), the ViT runs
   on the class token plus only the window's tokens (the token sequence is masked, the image is not cropped);
   the window embedding is the output CLS → ``ln_post`` → ``proj``. All windows of a batch run in a few
   batched forward passes (`VisualEncoder.encode_windows`), not one pass per window.
4. Per scale, each window gets its text score and every patch the **harmonic mean** of the scores of the
   windows covering it (Eq. 3, `harmonic_aggregation`).
5. Zero-shot map: harmonic mean of {small map, mid map, ascore₀ broadcast} (anomalib, zqhang), bilinearly
   upsampled to the input. No smoothing. The zero-shot image score is ascore₀ alone.

WinCLIP+ (Sec. 4.3, K normal references, `fit_references`):

6. Memory: the references' window embeddings per scale and their last-layer patch tokens (``ln_post``, not
   projected: 896-d for ViT-B/16+).
7. Visual association score of a query item: min over the memory of ½·(1 − cos) (Eq. 4); harmonic aggregation
   per window scale, identity for the patch scale; M_W = arithmetic mean over the 3 scales.
8. Image score: ½·(ascore₀ + max M_W). Pixel map: ½·(zero-shot map + M_W) (anomalib) or the sum (zqhang).

Variants (`WINCLIP_PROFILES`; the default is mala-lab's, the implementation InCTRL's WinCLIP+ numbers come from):

============  ===========  =====  =================  ===============  ====================
profile       templates    τ      prompt averaging   few-shot map     class name
============  ===========  =====  =================  ===============  ====================
"mala"        22           0.01   normalised         mean (½ each)    "metal nut"
"anomalib"    21           0.07   raw embeddings     mean (½ each)    as given "metal_nut"
"zqhang"      21           0.07   raw embeddings     sum              as given "metal_nut"
============  ===========  =====  =================  ===============  ====================

(mala-lab: `replace('_', ' ')` as InCTRL's `open_clip/model.py:564`; anomalib 2.7 passes the category name unchanged;
zqhang/WinCLIP-pytorch @ 6b070ff `reproduce_WinCLIP.py:149-155, 277-296`: names unchanged, raw mean of the
sentence embeddings.)

Paper setting: OpenCLIP ViT-B-16-plus-240 (``laion400m_e31``) at 240 px; ViT-L-14-336 at 518 px is an option.

Example:
    >>> winclip = build_winclip(backbone="zsad-tiny", image_size=112)
    >>> winclip.predict(torch.zeros(1, 3, 112, 112), ["bottle"]).anomaly_maps.shape
    torch.Size([1, 112, 112])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from zsadkit.maps import CLIP_TEMPERATURE
from zsadkit.methods.base import Prediction, backbone_for, check_options, register_method
from zsadkit.models import TextEncoder, VisualEncoder, sliding_windows
from zsadkit.prompts import ClassTextFeatures, prompt_ensemble

__all__ = ["WINCLIP_PROFILES", "WinClip", "WinClipConfig", "build_winclip", "harmonic_aggregation", "harmonic_mean",
           "visual_association", "window_count"]

WINCLIP_PROFILES: dict[str, dict] = {
    "mala": dict(prompts="winclip", temperature=CLIP_TEMPERATURE, normalize_prompts=True, few_shot_map="mean"),
    "anomalib": dict(prompts="winclip-21", temperature=0.07, normalize_prompts=False, few_shot_map="mean",
                     replace_underscores=False),
    "zqhang": dict(prompts="winclip-21", temperature=0.07, normalize_prompts=False, few_shot_map="sum",
                   replace_underscores=False),
}


@dataclass(frozen=True)
class WinClipConfig:
    """Options of WinCLIP (defaults: the "mala" profile).

    Attributes:
        prompts: "winclip" (22 templates) or "winclip-21" (anomalib/zqhang list).
        temperature: τ (0.01 mala-lab/InCTRL, 0.07 anomalib/zqhang).
        normalize_prompts: normalise sentence embeddings before averaging (False: anomalib).
        scales: window sides in patches (small 2, mid 3).
        few_shot_map: WinCLIP+ pixel fusion, "mean" ½(zero-shot + M_W) or "sum".
        replace_underscores: "metal_nut" → "metal nut" in prompts (mala-lab/InCTRL do; anomalib and zqhang take the
            name as given).
        windows_per_pass: most (image, window) sequences per forward pass (bounds memory, not the result).
    """

    prompts: str = "winclip"
    temperature: float = CLIP_TEMPERATURE
    normalize_prompts: bool = True
    scales: tuple[int, ...] = (2, 3)
    few_shot_map: Literal["mean", "sum"] = "mean"
    replace_underscores: bool = True
    windows_per_pass: int = 4096

    @classmethod
    def from_profile(cls, profile: str, **overrides) -> WinClipConfig:
        """A named implementation's settings (`WINCLIP_PROFILES`), with overrides."""
        if profile not in WINCLIP_PROFILES:
            raise KeyError(f"unknown WinCLIP profile {profile!r}; known: {sorted(WINCLIP_PROFILES)}")
        return cls(**{**WINCLIP_PROFILES[profile], **overrides})

    def __post_init__(self) -> None:
        prompt_ensemble(self.prompts)
        object.__setattr__(self, "scales", tuple(int(scale) for scale in self.scales))
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.few_shot_map not in ("mean", "sum"):
            raise ValueError(f"few_shot_map must be 'mean' or 'sum', got {self.few_shot_map!r}")
        if not self.scales or min(self.scales) < 1:
            raise ValueError(f"scales must be window sides >= 1, got {self.scales}")


def harmonic_aggregation(window_scores: torch.Tensor, windows: torch.Tensor, grid: int) -> torch.Tensor:
    """Per patch, the harmonic mean of the scores of the windows covering it (Sec. 4.2, Eq. 3).

    Args:
        window_scores: (B, W) positive scores of W windows.
        windows: (W, K) patch indices of each window (`sliding_windows`).
        grid: patch-grid side G.
    Returns:
        (B, G, G). A zero window score makes the patches it covers 0 (the harmonic mean's limit); a patch that no
        window covers (stride > 1) is 0.
    """
    if window_scores.ndim != 2 or window_scores.shape[1] != windows.shape[0]:
        raise ValueError(f"window_scores must be (B, {windows.shape[0]}), got {tuple(window_scores.shape)}")
    batch = window_scores.shape[0]
    index = windows.to(window_scores.device).reshape(1, -1).expand(batch, -1)
    inverse = (1.0 / window_scores).repeat_interleave(windows.shape[1], dim=1)  # one entry per (window, patch)
    inverse_sum = window_scores.new_zeros(batch, grid * grid).scatter_add_(1, index, inverse)
    coverage = torch.bincount(windows.reshape(-1).cpu(), minlength=grid * grid).to(window_scores)
    return (coverage / inverse_sum).nan_to_num(nan=0.0).reshape(batch, grid, grid)


def harmonic_mean(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Element-wise n / Σ 1/x over same-shaped maps (the fusion across scales)."""
    if not maps:
        raise ValueError("harmonic_mean needs at least one map")
    return len(maps) / torch.stack([1.0 / m for m in maps]).sum(dim=0)


def visual_association(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """Eq. 4: min over the memory of ½·(1 − cos).

    Args:
        queries: (B, Q, C) embeddings.
        memory: (M, C) reference embeddings (all positions of all references).
    Returns:
        (B, Q), in [0, 1].
    """
    cosine = F.normalize(queries, dim=-1) @ F.normalize(memory, dim=-1).T
    return 0.5 * (1.0 - cosine).amin(dim=-1).clamp_min(0.0)  # rounding can push cos above 1


@dataclass
class WindowFeatures:
    """One image batch's embeddings at every scale.

    Attributes:
        image_embedding: (B, D) global embedding.
        window_embeddings: per scale, (B, W_s, D).
        patch_tokens: (B, N, W) last-layer patch tokens after ``ln_post`` (WinCLIP+'s patch scale).
    """

    image_embedding: torch.Tensor
    window_embeddings: list[torch.Tensor]
    patch_tokens: torch.Tensor


@dataclass
class ReferenceMemory:
    """WinCLIP+'s memory of K normal references: per-scale window embeddings and patch tokens, flattened."""

    window_embeddings: list[torch.Tensor] = field(default_factory=list)  # per scale (K·W_s, D)
    patch_tokens: torch.Tensor | None = None  # (K·N, W)
    num_references: int = 0


class WinClip:
    """WinCLIP (zero-shot) and WinCLIP+ (after `fit_references`).

    Args:
        clip: open_clip CLIP loaded for the input size (paper: ViT-B-16-plus-240 at 240).
        config: options.
    """

    def __init__(self, clip: CLIP, config: WinClipConfig | None = None) -> None:
        self.config = config or WinClipConfig()
        self.clip = clip.eval()
        self.visual = VisualEncoder(clip)
        self.text = TextEncoder(clip)
        self.ensemble = prompt_ensemble(self.config.prompts)
        self.class_text = ClassTextFeatures(
            self.text, self.ensemble, normalize_prompts=self.config.normalize_prompts,
            replace_underscores=self.config.replace_underscores,
        )
        grid = self.visual.grid_size
        if max(self.config.scales) > grid:
            raise ValueError(f"window scales {self.config.scales} do not fit the {grid}×{grid} patch grid")
        self.windows = [sliding_windows(grid, scale) for scale in self.config.scales]
        self.memory: ReferenceMemory | None = None

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    @property
    def grid(self) -> int:
        return self.visual.grid_size

    @property
    def device(self) -> torch.device:
        return self.clip.visual.proj.device

    # Sec. 4.1: compositional prompt ensemble.
    def text_features(self, class_name: str) -> torch.Tensor:
        """(2, D) unit-norm (normal, anomalous) embeddings of a class, cached."""
        return self.class_text(class_name)

    def text_scores(self, embeddings: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Eq. 1–2: P(anomalous) of (B, Q, D) embeddings against per-image (B, 2, D) text → (B, Q)."""
        logits = F.normalize(embeddings, dim=-1) @ text.transpose(1, 2) / self.config.temperature
        return logits.softmax(dim=-1)[..., 1]

    # Sec. 4.2: masked-token window embeddings, batched.
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> WindowFeatures:
        """Global, per-scale window and patch embeddings of (B, 3, S, S) images."""
        images = images.to(self.device)
        features = self.visual(images, layers=[self.visual.num_layers], tokens="ln_post")
        windows_per_pass = max(1, self.config.windows_per_pass // images.shape[0])
        window_embeddings = [
            torch.cat([self.visual.encode_windows(images, chunk) for chunk in windows.split(windows_per_pass)], dim=1)
            for windows in self.windows
        ]
        return WindowFeatures(features.global_embedding, window_embeddings, features.patch_tokens[0])

    def zero_shot(self, features: WindowFeatures, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ascore₀ (B,) and the zero-shot patch map (B, G, G): harmonic mean of {windows per scale, ascore₀}."""
        image_scores = self.text_scores(features.image_embedding.unsqueeze(1), text)[:, 0]
        scale_maps = [
            harmonic_aggregation(self.text_scores(embeddings, text), windows, self.grid)
            for embeddings, windows in zip(features.window_embeddings, self.windows, strict=True)
        ]
        image_map = image_scores[:, None, None].expand(-1, self.grid, self.grid)
        return image_scores, harmonic_mean([*scale_maps, image_map])

    # Sec. 4.3: WinCLIP+ reference memory.
    @torch.no_grad()
    def fit_references(self, reference_images: torch.Tensor) -> None:
        """Store the memory of K normal references (K, 3, S, S) of one class; `predict` then runs WinCLIP+."""
        if reference_images.ndim != 4 or reference_images.shape[0] == 0:
            raise ValueError(f"reference_images must be (K, 3, S, S) with K >= 1, got {tuple(reference_images.shape)}")
        features = self.encode(reference_images)
        self.memory = ReferenceMemory(
            window_embeddings=[e.reshape(-1, e.shape[-1]) for e in features.window_embeddings],
            patch_tokens=features.patch_tokens.reshape(-1, features.patch_tokens.shape[-1]),
            num_references=reference_images.shape[0],
        )

    def clear_references(self) -> None:
        """Back to zero-shot WinCLIP."""
        self.memory = None

    def few_shot_map(self, features: WindowFeatures) -> torch.Tensor:
        """M_W (B, G, G): the mean over scales of the aggregated visual association scores."""
        if self.memory is None:
            raise RuntimeError("few_shot_map needs fit_references(...) first")
        batch = features.patch_tokens.shape[0]
        scale_maps = [
            harmonic_aggregation(visual_association(embeddings, memory), windows, self.grid)
            for embeddings, memory, windows in zip(
                features.window_embeddings, self.memory.window_embeddings, self.windows, strict=True
            )
        ]
        patch_map = visual_association(features.patch_tokens, self.memory.patch_tokens)
        scale_maps.append(patch_map.reshape(batch, self.grid, self.grid))
        return torch.stack(scale_maps).mean(dim=0)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: Sequence[str]) -> Prediction:
        """Image scores (B,) and maps (B, S, S); WinCLIP+ once references are fitted."""
        if len(class_names) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(class_names)} class names")
        text = self.class_text.batch(class_names)
        features = self.encode(images)
        image_scores, patch_map = self.zero_shot(features, text)
        if self.memory is not None:
            association_map = self.few_shot_map(features)
            image_scores = 0.5 * (image_scores + association_map.flatten(1).amax(dim=1))
            fused = patch_map + association_map
            patch_map = 0.5 * fused if self.config.few_shot_map == "mean" else fused
        anomaly_maps = F.interpolate(patch_map.unsqueeze(1), size=self.image_size, mode="bilinear",
                                     align_corners=False)[:, 0]
        return Prediction(image_scores=image_scores, anomaly_maps=anomaly_maps)


def window_count(grid: int, scales: Sequence[int]) -> int:
    """Number of windows a batch image needs at these scales: Σ_k (G − k + 1)² (e.g. 196 + 169 at G = 15)."""
    return sum((grid - scale + 1) ** 2 for scale in scales if scale <= grid)


@register_method("winclip")
def build_winclip(
    backbone: str = "zsad-tiny",
    pretrained: str = "",
    image_size: int = 112,
    device: str = "cpu",
    backbone_seed: int = 0,
    train_seed: int = 0,
    checkpoint: str = "",
    clip: nn.Module | None = None,
    profile: str = "mala",
    **options: Any,
) -> WinClip:
    """WinCLIP from run settings; `profile` picks a `WINCLIP_PROFILES` entry, `options` override its fields
    (`train_seed` is unused: nothing is drawn; the few-shot references are drawn by
    `zsadkit.engine.sample_references`).

    The paper setting is ``backbone="ViT-B-16-plus-240", pretrained="laion400m_e31", image_size=240``.
    """
    check_options("winclip", WinClipConfig, options)
    if checkpoint:
        raise ValueError(f"winclip: a training-free method takes no checkpoint, got {checkpoint!r}")
    clip = backbone_for(clip, backbone, pretrained, image_size, device, backbone_seed)
    return WinClip(clip, WinClipConfig.from_profile(profile, **options))
