"""VAND / April-GAN (Chen, Han, Zhang, arXiv 2305.17382): WinCLIP-style prompts + trained linear projections of
intermediate patch tokens. Follows the reference code ByChelsea/VAND-APRIL-GAN @ f13b8a6 (baselines spec §4).

Method, in the order of the paper's Sec. 2 (zero-shot track):

1. Text (Sec. 2.2): per class, the (normal, anomalous) embeddings of the prompt ensemble of 7 normal and 5
   anomalous states × 35 templates (`zsadkit.prompts`, "vand"), each sentence normalised, averaged,
   re-normalised. The reference inserts the class name verbatim ("metal_nut"); that is the default here.
2. Features (Sec. 2.3): the raw residual-stream tokens after blocks 6, 12, 18, 24 (ViT-L; 1-indexed), no
   ``ln_post``/``proj``, CLS dropped, each mapped by its own trained ``nn.Linear(W → D)`` (`VandProjections`).
3. Per-layer map: normalise the projected tokens; logits = 100 · ⟨token, text⟩ (τ = 0.01); reshape to the G×G
   grid, bilinear upsampling with ``align_corners=True`` to S×S, **then** the softmax over the two states
   (AnomalyCLIP's shared maps take the softmax before upsampling).
4. Loss (Sec. 2.3): Σ_layers [focal(probabilities, mask) + dice(P_anomalous, mask)] (γ = 2, no α), on the
   auxiliary dataset's *test* split with masks; Adam(lr 1e-3, betas (0.5, 0.999)), batch 8, 3 epochs on
   MVTec AD / 15 on VisA (`VandTrainingConfig`). On MVTec AD the reference replaces an item, with probability
   ``aug_rate`` = 0.2, by a 2×2 mosaic of four random test images of its class and their masks (`MosaicDataset`,
   ``VandTrainingConfig.mosaic_rate``; default 0.2 when every training record is from "mvtec", else 0).
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
    >>> vand.projections.trainable_parameters()
    16512
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from zsadkit.data.dataset import AnomalyDataset
from zsadkit.data.images import check_mask_matches_image, read_image
from zsadkit.data.records import Sample
from zsadkit.losses import binary_dice_loss, focal_loss
from zsadkit.methods.base import Prediction, register_method
from zsadkit.methods.clip_baseline import CLIP_TEMPERATURE
from zsadkit.models import TextEncoder, VisualEncoder, load_backbone
from zsadkit.prompts import ClassTextFeatures, prompt_ensemble

VAND_LAYERS_VIT_L = (6, 12, 18, 24)
REFERENCE_MVTEC_MOSAIC_RATE = 0.2  # reference train.py `aug_rate`


def evenly_spaced_layers(num_layers: int, count: int = 4) -> tuple[int, ...]:
    """`count` 1-indexed layers ending at the last: 24 → (6, 12, 18, 24), 12 → (3, 6, 9, 12), 4 → (1, 2, 3, 4)."""
    step = max(1, num_layers // count)
    return tuple(range(step, num_layers + 1, step))[-count:]


@dataclass
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
        self.layers = tuple(int(layer) for layer in self.layers)
        if not self.layers:
            raise ValueError("VandConfig.layers must name at least one layer")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        prompt_ensemble(self.prompts)


@dataclass
class VandTrainingConfig:
    """Training options (reference `train.py` / `train.sh`).

    Attributes:
        epochs: 3 when training on MVTec AD, 15 on VisA (the last epoch is kept).
        batch_size: 8.
        lr: Adam learning rate.
        betas: Adam betas.
        seed: `setup_seed(111)`: seeds the shuffling and the mosaic draws.
        mosaic_rate: probability that an item becomes a 2×2 mosaic of four images of its class (reference
            ``aug_rate``, applied by its MVTec AD dataset only). None = the reference's behaviour: 0.2 when every
            training record's dataset is "mvtec", else 0.
    """

    epochs: int = 3
    batch_size: int = 8
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 111
    mosaic_rate: float | None = None

    def __post_init__(self) -> None:
        if self.mosaic_rate is not None and not 0.0 <= self.mosaic_rate <= 1.0:
            raise ValueError(f"mosaic_rate must be in [0, 1] or None, got {self.mosaic_rate}")

    def resolved_mosaic_rate(self, samples: Sequence[Sample]) -> float:
        """`mosaic_rate`, with None resolved as the reference does (0.2 on MVTec AD, else 0)."""
        if self.mosaic_rate is not None:
            return self.mosaic_rate
        return REFERENCE_MVTEC_MOSAIC_RATE if all(sample.dataset == "mvtec" for sample in samples) else 0.0


def mosaic(images: Sequence[Image.Image], masks: Sequence[Image.Image]) -> tuple[Image.Image, Image.Image]:
    """Paste four images and their masks, unresized, into 2×2 canvases (reference ``combine_img``).

    The canvas is twice the first image's (W, H); image i goes to row i // 2, column i % 2, at (col·W, row·H).
    """
    width, height = images[0].size
    canvas = Image.new("RGB", (2 * width, 2 * height))
    mask_canvas = Image.new("L", (2 * width, 2 * height))
    for position, (image, mask) in enumerate(zip(images, masks, strict=True)):
        corner = ((position % 2) * width, (position // 2) * height)
        canvas.paste(image.convert("RGB"), corner)
        mask_canvas.paste(mask, corner)
    return canvas, mask_canvas


class MosaicDataset(Dataset):
    """Training items with the reference's mosaic augmentation (`MVTecDataset(aug_rate)`, Sec. 2.3).

    With probability ``rate`` item i is replaced by a mosaic (`mosaic`) of four records of its class, each drawn
    as the reference does: a defect type uniformly (``good`` included), then a record of that type uniformly,
    with replacement. The mosaic at full resolution then goes through the dataset's own transforms, so each
    quadrant is its image resized to S/2. The reference draws from the class's test folder on disk; here from
    the training records of the class (its test split, in the reference setting). Draws are deterministic in
    (seed, epoch, index); call `set_epoch` each epoch. A mosaic's label is 1 if any of its four is anomalous
    (the reference keeps the replaced item's label, which its loss does not use).

    Args:
        dataset: the records and transforms.
        rate: mosaic probability per item.
        seed: seed of the draws.
    """

    def __init__(self, dataset: AnomalyDataset, rate: float, seed: int) -> None:
        self.dataset, self.rate, self.seed, self.epoch = dataset, rate, seed, 0
        self.by_class_and_defect: dict[str, dict[str, list[int]]] = {}
        for index, sample in enumerate(dataset.samples):
            self.by_class_and_defect.setdefault(sample.class_name, {}).setdefault(sample.defect, []).append(index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def mosaic_indices(self, index: int) -> list[int] | None:
        """The four record indices item `index` is made of in this epoch, or None when it stays itself."""
        draw = random.Random(f"vand-mosaic/{self.seed}/{self.epoch}/{index}")
        if draw.random() >= self.rate:
            return None
        by_defect = self.by_class_and_defect[self.dataset.samples[index].class_name]
        defects = sorted(by_defect)
        return [draw.choice(by_defect[draw.choice(defects)]) for _ in range(4)]

    def __getitem__(self, index: int) -> dict:
        indices = self.mosaic_indices(index)
        if indices is None:
            return self.dataset[index]
        images, masks = [], []
        for sample in (self.dataset.samples[i] for i in indices):
            image = read_image(sample.image)
            if sample.mask is None:
                mask = Image.new("L", image.size)
            else:
                mask = read_image(sample.mask, what="mask")
                check_mask_matches_image(image, mask, sample.image, sample.mask)
            images.append(image)
            masks.append(mask)
        image, mask = mosaic(images, masks)
        sample = self.dataset.samples[index]
        return {
            "image": self.dataset.image_transform(image),
            "mask": self.dataset.mask_transform(mask),
            "label": int(any(self.dataset.samples[i].label for i in indices)),
            "class_name": sample.class_name,
            "has_mask": all(self.dataset.has_mask[i] for i in indices),
            "image_path": sample.image,
            "index": index,
        }


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

    def trainable_parameters(self) -> int:
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
        tokens = F.normalize(projected_tokens, dim=-1)
        logits = tokens @ text.transpose(1, 2) / self.config.temperature  # (B, N, 2)
        batch, num_tokens, _ = logits.shape
        grid = math.isqrt(num_tokens)
        logits = logits.permute(0, 2, 1).reshape(batch, 2, grid, grid)
        logits = F.interpolate(logits, size=self.image_size, mode="bilinear", align_corners=True)
        return logits.softmax(dim=1)

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


def vand_loss(state_maps: Sequence[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
    """Σ_layers [focal(P, mask) + dice(P_anomalous, mask)] (reference `train.py`).

    Args:
        state_maps: (B, 2, S, S) probabilities per layer.
        masks: (B, S, S) binary ground truth.
    """
    return sum(focal_loss(maps, masks) + binary_dice_loss(maps[:, 1], masks) for maps in state_maps)


def train_vand(
    vand: Vand,
    samples: Sequence[Sample],
    config: VandTrainingConfig | None = None,
    *,
    progress: bool = True,
) -> list[float]:
    """Train the projections on auxiliary samples with masks (the auxiliary *test* split in the reference).

    Args:
        vand: the model; its CLIP stays frozen.
        samples: training records; normal images count with an all-zero mask.
        config: optimisation settings.
        progress: show a progress bar.
    Returns:
        Mean loss of each epoch.
    """
    config = config or VandTrainingConfig()
    if not samples:
        raise ValueError("train_vand: no training samples")
    generator = torch.Generator().manual_seed(config.seed)
    dataset = MosaicDataset(AnomalyDataset(list(samples), image_size=vand.image_size),
                            config.resolved_mosaic_rate(samples), config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.Adam(vand.projections.parameters(), lr=config.lr, betas=config.betas)
    vand.train()
    epoch_losses = []
    for epoch in range(config.epochs):
        dataset.set_epoch(epoch)
        total, count = 0.0, 0
        for batch in tqdm(loader, desc=f"VAND epoch {epoch + 1}/{config.epochs}", disable=not progress):
            output = vand(batch["image"], list(batch["class_name"]))
            loss = vand_loss(output.state_maps, (batch["mask"] > 0.5).float().to(vand.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, count = total + float(loss.detach()) * len(batch["image"]), count + len(batch["image"])
        epoch_losses.append(total / count)
    vand.eval()
    return epoch_losses


@register_method("vand")
def build_vand(
    backbone: str = "zsad-tiny",
    pretrained: str = "",
    image_size: int = 112,
    device: str = "cpu",
    seed: int = 0,
    checkpoint: str = "",
    pos_embed_resize: str = "open_clip",
    quick_gelu: bool | None = None,
    **options,
) -> Vand:
    """VAND from run settings; `options` are `VandConfig` fields (``layers`` defaults to four evenly spaced
    layers: 6/12/18/24 on ViT-L). ``checkpoint`` loads trained projections (a safetensors file of
    `VandProjections`, or the reference's ``{'trainable_linearlayer': state_dict}``).

    Backbone as the reference's forked open_clip builds it: positional embedding resized with open_clip's
    bicubic resize (``pos_embed_resize="open_clip"``), and at an image size other than the weights' native one
    (ViT-L-14-336 at 518) the model is rebuilt with ``nn.GELU`` instead of QuickGELU (``quick_gelu=None``
    reproduces this; True/False force an activation).
    """
    if quick_gelu is None and image_size != native_image_size(backbone):
        quick_gelu = False  # the reference fork rebuilds CLIP without QuickGELU at a non-native size
    clip = load_backbone(backbone, pretrained, image_size, device, seed, pos_embed_resize=pos_embed_resize,
                         quick_gelu=quick_gelu)
    options.setdefault("layers", evenly_spaced_layers(len(clip.visual.transformer.resblocks)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the projections' initialisation
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
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and "trainable_linearlayer" in loaded:
        loaded = loaded["trainable_linearlayer"]
    if not isinstance(loaded, dict) or not all(key.startswith("fc.") for key in loaded):
        raise ValueError(f"{path}: expected VAND projections (keys fc.<i>.weight/bias), got {type(loaded).__name__}")
    return loaded
