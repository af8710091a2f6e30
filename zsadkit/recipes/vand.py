"""How VAND / April-GAN is trained (reference ByChelsea/VAND-APRIL-GAN @ f13b8a6, `train.py`): its projections
learn on the auxiliary dataset's test split with masks, through the shared trainer.

* Loss: `Vand.losses` (Σ_layers focal + dice, paper Sec. 2.3).
* Optimiser: Adam(lr 1e-3, betas (0.5, 0.999)), batch 8, 3 epochs on MVTec AD / 15 on VisA (`train.sh`).
* Augmentation: on MVTec AD the reference replaces an item, with probability `aug_rate` = 0.2, by a 2×2 mosaic
  of four images of its class and their masks (`MVTecDataset(aug_rate)` in `dataset.py`; `MosaicDataset` here).

Deviation: the reference draws mosaic tiles from its test folder on disk; here from the training records of the
class (its test split, in the reference setting). Draws are a function of (seed, epoch, index).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset

from zsadkit.data.dataset import AnomalyDataset
from zsadkit.data.images import check_mask_matches_image, read_image
from zsadkit.data.records import Sample, samples_fingerprint
from zsadkit.methods.vand import Vand
from zsadkit.models import module_fingerprint
from zsadkit.training import TrainConfig, TrainResult, code_digest, train

__all__ = ["MosaicDataset", "VandTrainingConfig", "mosaic", "train_vand"]

REFERENCE_MVTEC_MOSAIC_RATE = 0.2  # reference train.py `aug_rate`


@dataclass(frozen=True)
class VandTrainingConfig:
    """Training options (reference `train.py` / `train.sh`); run by the shared trainer (`zsadkit.training.train`,
    one shuffling stream seeded once, as the reference's global RNG), with per-epoch checkpoints and resume.

    Attributes:
        epochs: 3 when training on MVTec AD, 15 on VisA (the last epoch is kept).
        batch_size: 8.
        lr: Adam learning rate.
        betas: Adam betas.
        seed: `setup_seed(111)`: seeds the shuffling and the mosaic draws.
        checkpoint_dir: where per-epoch checkpoints go ("" = none); a rerun resumes from them.
        resume: continue from the checkpoints of `checkpoint_dir` (False retrains from scratch).
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
    checkpoint_dir: str = ""
    resume: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
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


def train_vand(
    vand: Vand,
    samples: Sequence[Sample],
    config: VandTrainingConfig | None = None,
    *,
    progress: bool = False,
) -> TrainResult:
    """Train the projections on auxiliary samples with masks (the auxiliary *test* split in the reference).

    Args:
        vand: the model; its CLIP stays frozen.
        samples: training records; normal images count with an all-zero mask.
        config: optimisation settings.
        progress: show a progress bar.

    Returns:
        The trainer's `TrainResult` (per-epoch mean loss over batches, checkpoints written).
    """
    config = config or VandTrainingConfig()
    if not samples:
        raise ValueError("train_vand: no training samples")
    rate = config.resolved_mosaic_rate(samples)
    dataset = MosaicDataset(AnomalyDataset(list(samples), image_size=vand.image_size), rate, config.seed)

    def step(batch: dict) -> dict[str, torch.Tensor]:
        output = vand(batch["image"], list(batch["class_name"]))
        return {"loss": vand.losses(output, batch["mask"])}

    train_config = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, betas=config.betas,
                               seed=config.seed, shuffle_stream="continuous", checkpoint_dir=config.checkpoint_dir,
                               resume=config.resume)
    fingerprint = {"method": "vand", "config": vand.config.to_json(), "mosaic_rate": rate,
                   "samples": samples_fingerprint(samples), "backbone_weights": module_fingerprint(vand.clip),
                   "code": code_digest(type(vand).__module__, __name__)}
    vand.train()
    result = train(vand.trainable_parameters(), dataset, step, train_config, fingerprint=fingerprint,
                   on_epoch_start=lambda epoch: dataset.set_epoch(epoch - 1), progress=progress)
    vand.eval()
    return result
