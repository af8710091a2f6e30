"""VAND / April-GAN (Chen, Han, Zhang, arXiv 2305.17382): WinCLIP-style prompts + trained linear projections of
intermediate patch tokens. Follows the reference code ByChelsea/VAND-APRIL-GAN @ f13b8a6.

Method, in the order of the paper's Sec. 2 (zero-shot track):

1. Text (Sec. 2.2): per class, the (normal, anomalous) embeddings of the prompt ensemble of 7 normal and 5
   anomalous states × 35 templates (`zsadkit.prompts`, "vand"), each sentence normalised, averaged,
   re-normalised. The reference inserts the class name verbatim ("metal_nut"); that is the default here.
2. Features (Sec. 2.3): the raw residual-stream tokens after blocks 6, 12, 18, 24 (ViT-L; 1-indexed), no
   ``ln_post``/``proj``, CLS dropped, each mapped by its own trained ``nn.Linear(W → D)`` (`VandProjections`).
3. Per-layer map: normalise the projected tokens; logits = 100 · ⟨token, text⟩ (τ = 0.01); reshape to the G×G
   grid, bilinear upsampling with ``align_corners=True`` to S×S, **then** the softmax over the two states
   (`zsadkit.maps.state_maps(order="upsample_then_softmax")`; AnomalyCLIP's maps take the softmax first).
4. Loss (Sec. 2.3, `Vand.losses`): Σ_layers [focal(probabilities, mask) + dice(P_anomalous, mask)] (γ = 2, no
   α). How it is trained (the auxiliary test split, Adam, the mosaic augmentation) is `zsadkit.recipes.vand`.
5. Inference: the pixel map is the **sum** over layers of P_anomalous (range 0 to 4), no smoothing. The image
   score is plain CLIP on the global embedding: softmax(100 · ⟨normalize(CLS → ln_post → proj), text⟩)[1];
   the trained projections do not touch it.

Few-shot memory (Sec. 3, `fit_references`, optional): the raw tokens of K normal references at the same
layers; per layer min over memory of (1 − cos), upsampled (align_corners=True) and summed over layers, added
to the zero-shot map (final map, range 0 to 3L for L layers: L probabilities plus L distances in [0, 2]). The
reference's few-shot image score is ½·(text probability + the per-image max of the *final* map, min-max
normalised over the whole test set of the class): transductive (issue #33), so one image's score depends on
the others. `reference_few_shot_image_scores` computes exactly that from a whole class's outputs. A per-batch
`predict` cannot, so its few-shot image score is ½·(text probability + max of the final map / 3L): the same
map maximum scaled to [0, 1] by its fixed range instead of by the class's observed range (a deviation; the
two agree up to that affine rescaling of the map term).

Example:
    >>> vand = build_vand(backbone="zsad-tiny", image_size=112)  # layers 1/2/3/4 of 4
    >>> vand.projections.num_parameters()
    16512
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from safetensors.torch import load_file, save_file
from torch import nn

from zsadkit.losses import binary_dice_loss, focal_loss
from zsadkit.maps import CLIP_TEMPERATURE, state_maps
from zsadkit.methods.base import (
    Prediction,
    backbone_defaults,
    backbone_for,
    check_options,
    register_method,
    seeded,
)
from zsadkit.models import TextEncoder, VisualEncoder
from zsadkit.prompts import ClassTextFeatures, prompt_ensemble

__all__ = ["Vand", "VandConfig", "VandOutput", "VandProjections", "build_vand", "read_projections",
           "reference_few_shot_image_scores"]

VAND_LAYERS_VIT_L = (6, 12, 18, 24)


@dataclass(frozen=True)
class VandConfig:
    """Model options of VAND (defaults: the reference's ViT-L-14-336 settings).

    Attributes:
        layers: 1-indexed blocks whose tokens are projected (reference `--features_list 6 12 18 24`).
        temperature: τ of the softmaxes (reference: logit scale 100, τ = 0.01).
        prompts: prompt ensemble name ("vand").
        normalize_prompts: normalise each sentence before averaging (reference: yes).
        replace_underscores: "metal_nut" → "metal nut"; the reference keeps the name verbatim (False).
    """

    layers: tuple[int, ...] = VAND_LAYERS_VIT_L
    temperature: float = CLIP_TEMPERATURE
    prompts: str = "vand"
    normalize_prompts: bool = True
    replace_underscores: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))
        if not self.layers:
            raise ValueError("VandConfig.layers must name at least one layer")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        prompt_ensemble(self.prompts)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class VandProjections(nn.Module):
    """One trained ``Linear(W → D)`` (with bias) per tapped layer: the reference's ``LinearLayer``.

    The module keeps the reference's parameter names (``fc.{i}.weight``/``bias``), so its checkpoints load.

    Args:
        width: transformer width W (1024 for ViT-L).
        embed_dim: joint embedding dimension D (768 for ViT-L/14@336).
        num_layers: number of tapped layers.
    """

    def __init__(self, width: int, embed_dim: int, num_layers: int) -> None:
        super().__init__()
        self.fc = nn.ModuleList([nn.Linear(width, embed_dim) for _ in range(num_layers)])

    def forward(self, layer_tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """(B, 1+N, W) tokens per layer (CLS first) → (B, N, D) projected patch tokens per layer."""
        if len(layer_tokens) != len(self.fc):
            raise ValueError(f"expected tokens of {len(self.fc)} layers, got {len(layer_tokens)}")
        return [fc(tokens[:, 1:]) for fc, tokens in zip(self.fc, layer_tokens, strict=True)]

    def num_parameters(self) -> int:
        """Number of trained values."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


@dataclass
class VandOutput:
    """Everything one VAND forward produces (the fixture compares each piece).

    Attributes:
        image_features: (B, D) global embedding, not normalised.
        layer_tokens: raw (B, 1+N, W) tokens per layer.
        projected_tokens: (B, N, D) per layer, before normalisation.
        state_maps: (B, 2, S, S) per layer: softmax over (normal, anomalous) after upsampling.
        image_scores: (B,) P(anomalous) from the global embedding.
    """

    image_features: torch.Tensor
    layer_tokens: tuple[torch.Tensor, ...]
    projected_tokens: list[torch.Tensor]
    state_maps: list[torch.Tensor]
    image_scores: torch.Tensor

    @property
    def anomaly_map(self) -> torch.Tensor:
        """(B, S, S) Σ_layers P_anomalous (range 0 to the number of layers)."""
        return torch.stack([maps[:, 1] for maps in self.state_maps]).sum(dim=0)


class Vand(nn.Module):
    """VAND/April-GAN over a frozen CLIP; only `projections` are trained.

    Args:
        clip: open_clip CLIP loaded for the input size (VAND: ViT-L-14-336 at 518, positional embedding
            resized with ``pos_embed_resize="open_clip"`` as its forked factory does).
        config: model options.
    """

    def __init__(self, clip: CLIP, config: VandConfig | None = None) -> None:
        super().__init__()
        self.config = config or VandConfig()
        self.clip = clip.eval()
        for parameter in self.clip.parameters():
            parameter.requires_grad_(False)
        self.visual = VisualEncoder(clip)
        self.text = TextEncoder(clip)
        bad = [layer for layer in self.config.layers if not 1 <= layer <= self.visual.num_layers]
        if bad:
            raise ValueError(f"VAND layers must be in [1, {self.visual.num_layers}] for this backbone, got {bad}")
        self.ensemble = prompt_ensemble(self.config.prompts)
        self.class_text = ClassTextFeatures(
            self.text, self.ensemble, normalize_prompts=self.config.normalize_prompts,
            replace_underscores=self.config.replace_underscores,
        )
        self.projections = VandProjections(self.visual.width, self.visual.embed_dim, len(self.config.layers)).to(
            self.device
        )
        self.reference_tokens: list[torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.clip.visual.proj.device

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    def train(self, mode: bool = True) -> Vand:
        """Only the projections switch mode; CLIP stays in eval mode."""
        self.training = mode
        self.projections.train(mode)
        return self

    # Sec. 2.2: text embeddings of the prompt ensemble.
    def text_features(self, class_name: str) -> torch.Tensor:
        """(2, D) unit-norm (normal, anomalous) embeddings of a class, cached."""
        return self.class_text(class_name)

    def batch_text_features(self, class_names: Sequence[str]) -> torch.Tensor:
        """(B, 2, D) text embeddings of each image's class."""
        return self.class_text.batch(class_names)

    # Sec. 2.3: projected intermediate tokens → per-layer maps.
    def state_map(self, projected_tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """One layer's (B, 2, S, S) state probabilities from (B, N, D) projected tokens and (B, 2, D) text."""
        maps = state_maps(F.normalize(projected_tokens, dim=-1), text, self.config.temperature, self.image_size,
                          has_cls=False, order="upsample_then_softmax", align_corners=True)
        return maps.permute(0, 3, 1, 2)

    def image_scores(self, image_features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B,) P(anomalous) of plain CLIP on the global embedding (B, D)."""
        image = F.normalize(image_features, dim=-1).unsqueeze(1)  # (B, 1, D)
        return (image @ text.transpose(1, 2) / self.config.temperature).softmax(dim=-1)[:, 0, 1]

    def forward(self, images: torch.Tensor, class_names: Sequence[str]) -> VandOutput:
        """The zero-shot forward; gradients flow into `projections` only."""
        if len(class_names) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(class_names)} class names")
        text = self.batch_text_features(class_names)
        with torch.no_grad():
            features = self.visual(images.to(self.device), layers=self.config.layers, tokens="raw")
        projected = self.projections(features.layer_tokens)
        return VandOutput(
            image_features=features.global_embedding,
            layer_tokens=features.layer_tokens,
            projected_tokens=projected,
            state_maps=[self.state_map(tokens, text) for tokens in projected],
            image_scores=self.image_scores(features.global_embedding, text),
        )

    def losses(self, output: VandOutput, masks: torch.Tensor) -> torch.Tensor:
        """Sec. 2.3: Σ_layers [focal(P, mask) + dice(P_anomalous, mask)] with masks (B, S, S) binarised at 0.5
        (reference `train.py`)."""
        gt = (masks > 0.5).float().to(self.device)
        return sum(focal_loss(maps, gt) + binary_dice_loss(maps[:, 1], gt) for maps in output.state_maps)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The projections by checkpoint name (`fc.<i>.weight`/`bias`, the reference's names)."""
        return dict(self.projections.named_parameters())

    def save_projections(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write the projections to a safetensors file (`read_projections` and `checkpoint=` read it back)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: value.detach().cpu().contiguous() for name, value in self.trainable_parameters().items()}
        save_file(tensors, str(path), metadata={"config": self.config.to_json(), **dict(metadata or {})})
        return path

    # Sec. 3: few-shot memory of normal references (optional).
    @torch.no_grad()
    def fit_references(self, reference_images: torch.Tensor) -> None:
        """Store the raw tokens of K normal references (K, 3, S, S) at the tapped layers, per layer (K·N, W).

        One memory serves every image passed to `predict`, so fit one class at a time.
        """
        features = self.visual(reference_images.to(self.device), layers=self.config.layers, tokens="raw",
                               return_global=False)
        self.reference_tokens = [tokens[:, 1:].reshape(-1, tokens.shape[-1]) for tokens in features.layer_tokens]

    def few_shot_map(self, layer_tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, S, S) Σ_layers upsampled min over memory of (1 − cos) (not halved, as the reference)."""
        if self.reference_tokens is None:
            raise RuntimeError("few_shot_map needs fit_references(...) first")
        maps = []
        for tokens, memory in zip(layer_tokens, self.reference_tokens, strict=True):
            query = F.normalize(tokens[:, 1:], dim=-1)
            distance = 1.0 - query @ F.normalize(memory, dim=-1).T  # (B, N, K·N)
            nearest = distance.min(dim=-1).values
            grid = math.isqrt(nearest.shape[1])
            nearest = nearest.reshape(-1, 1, grid, grid)
            maps.append(F.interpolate(nearest, size=self.image_size, mode="bilinear", align_corners=True)[:, 0])
        return torch.stack(maps).sum(dim=0)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: Sequence[str]) -> Prediction:
        """Image scores (B,) and maps (B, S, S); with references fitted, the few-shot variant."""
        output = self.forward(images, class_names)
        anomaly_maps, image_scores = output.anomaly_map, output.image_scores
        if self.reference_tokens is not None:
            anomaly_maps = anomaly_maps + self.few_shot_map(output.layer_tokens)
            map_range = 3.0 * len(self.config.layers)  # zero-shot Σ_L P ∈ [0, L] + memory Σ_L (1 − cos) ∈ [0, 2L]
            image_scores = 0.5 * (image_scores + anomaly_maps.flatten(1).amax(dim=1) / map_range)
        return Prediction(image_scores=image_scores, anomaly_maps=anomaly_maps)


def reference_few_shot_image_scores(text_scores: torch.Tensor, anomaly_maps: torch.Tensor) -> torch.Tensor:
    """The reference's transductive few-shot image scores of one class's whole test set (`test.py`, issue #33).

    ½·(text probability + per-image max of the final map, min-max normalised over the N images).

    Args:
        text_scores: (N,) plain-CLIP probabilities (`Vand.forward(...).image_scores`).
        anomaly_maps: (N, S, S) final few-shot maps (`Vand.predict` with references fitted).
    Returns:
        (N,) scores; the map term is 0 for every image when all maxima are equal.
    """
    maxima = anomaly_maps.flatten(1).amax(dim=1)
    spread = maxima.max() - maxima.min()
    normalised = (maxima - maxima.min()) / spread if spread > 0 else torch.zeros_like(maxima)
    return 0.5 * (text_scores + normalised)


@register_method("vand")
def build_vand(
    backbone: str = "zsad-tiny",
    pretrained: str = "",
    image_size: int = 112,
    device: str = "cpu",
    backbone_seed: int = 0,
    train_seed: int = 0,
    checkpoint: str = "",
    clip: nn.Module | None = None,
    pos_embed_resize: str = "open_clip",
    quick_gelu: bool | None = None,
    **options: Any,
) -> Vand:
    """VAND from run settings; `options` are `VandConfig` fields (``layers`` defaults to the model's four evenly
    spaced layers, `zsadkit.methods.base.backbone_defaults`: 6/12/18/24 on ViT-L). ``train_seed`` seeds the
    projections' initialisation; ``checkpoint`` loads trained projections (a safetensors file of
    `VandProjections`, or the reference's ``{'trainable_linearlayer': state_dict}``).

    Backbone as the reference's forked open_clip builds it: positional embedding resized with open_clip's
    bicubic resize (``pos_embed_resize="open_clip"``), and at an image size other than the weights' native one
    (ViT-L-14-336 at 518) the model is rebuilt with ``nn.GELU`` instead of QuickGELU (``quick_gelu=None``
    reproduces this; True/False force an activation). A given ``clip`` is used as it is.
    """
    check_options("vand", VandConfig, options)
    if quick_gelu is None and image_size != native_image_size(backbone):
        quick_gelu = False  # the reference fork rebuilds CLIP without QuickGELU at a non-native size
    clip = backbone_for(clip, backbone, pretrained, image_size, device, backbone_seed,
                        pos_embed_resize=pos_embed_resize, quick_gelu=quick_gelu)
    options.setdefault("layers", backbone_defaults(clip).four_layers)
    with seeded(train_seed):  # the projections' initialisation
        vand = Vand(clip, VandConfig(**options))
    if checkpoint:
        vand.projections.load_state_dict(read_projections(checkpoint))
    return vand


def native_image_size(backbone: str) -> int | None:
    """The input side an open_clip config was trained at, or None for names open_clip does not know."""
    config = open_clip.get_model_config(backbone)
    if config is None:
        return None
    size = config["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


def read_projections(path: str) -> dict[str, torch.Tensor]:
    """Projection weights from a safetensors file or a reference ``.pth`` (``{'trainable_linearlayer': sd}``)."""
    if str(path).endswith(".safetensors"):
        return load_file(str(path), device="cpu")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and "trainable_linearlayer" in loaded:
        loaded = loaded["trainable_linearlayer"]
    if not isinstance(loaded, dict) or not all(key.startswith("fc.") for key in loaded):
        raise ValueError(f"{path}: expected VAND projections (keys fc.<i>.weight/bias), got {type(loaded).__name__}")
    return loaded
