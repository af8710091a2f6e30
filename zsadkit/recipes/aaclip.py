"""How AA-CLIP is trained and evaluated (Mwxinnn/AA-CLIP @ 53db195: `train.py`, `test.py`, `dataset/__init__.py`,
`scripts.sh`), on the shared trainer `zsadkit.training.train`.

* Data: the auxiliary dataset's **test** split with masks ("full": VisA's 2162 images for every other test set;
  MVTec AD's for VisA), or K images per class of it (`training_samples`: 2-, 16-, 64-shot; the reference's
  K-shot lists are unreleased, so the draw is seeded here and the file list written beside the results).
* Augmentation (`dataset/__init__.py:30-94`), jointly on the normalised image and its mask: rotation ±30°
  (p 0.5), translation up to 15 % (p 0.5), horizontal and vertical flips (p 0.5 each), nearest interpolation
  with fill 0 (torchvision's defaults); stage 2 adds brightness, contrast and saturation jitter of strength 0.5,
  each with p 0.7, on the PIL image before the resize.
* Stage 1 (`train.py:38-114`): the text adapters and projection, Adam(lr 1e-5, betas (0.5, 0.999)), batch 16,
  5 epochs, no scheduler (`STAGE1`). The frozen visual side is computed per epoch for that epoch's augmented
  batches and kept in the feature cache (`use_cache`), so a rerun (another stage-1 switch, a resumed run) costs
  only the text side; `stage1_feature_draws="once"` (a deviation) draws and encodes epoch 1's batches only and
  reuses them in every epoch. The reference's V-V attention mixes the images of a batch, so the cache holds the
  features of the very batches training reads: the recipe draws each epoch's order itself (a permutation
  seeded by seed + epoch) and the trainer reads it unshuffled.
* Stage 2 (`train.py:117-174`): the vision adapters and projections with the text anchors frozen, Adam(lr 5e-4,
  betas (0.5, 0.999)), batch 2, 20 epochs, MultiStepLR halving at iterations 16 000 and 32 000, stepped per
  iteration (`STAGE2`); a checkpoint per epoch.
* Epoch (`choose_epoch`): the authors test every epoch's checkpoint and report epoch 15 (issues #13, #16, #19,
  #52), a choice made on test results; "reference" reproduces it and flags it, "last" is the paper's 20 epochs,
  `best_epoch_on_test` reproduces the sweep (flagged).
* Evaluation (`evaluate`): `test.py` per class, with the reference's transductive score fusion
  (`zsadkit.methods.aaclip.transductive_image_scores`) or the per-image one.

Deviations: augmentation draws come from a generator seeded by (seed, epoch, index) instead of the global RNG;
the pixel maps reach the metrics without the reference's per-class min-max (pixel AUROC and AP do not change
under it; an AU-PRO asked for with `pro=` would).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.functional as TF
from safetensors import safe_open
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from zsadkit.data.dataset import batches
from zsadkit.data.images import check_mask_matches_image, read_image
from zsadkit.data.records import Sample, samples_fingerprint, write_manifest
from zsadkit.data.transforms import image_transform, mask_transform
from zsadkit.feature_cache import FeatureCache
from zsadkit.methods.aaclip import AACLIP, AACLIPScores, transductive_image_scores
from zsadkit.metrics import Evaluator
from zsadkit.models import module_fingerprint
from zsadkit.paths import default_cache_root
from zsadkit.training import (
    TrainConfig,
    TrainResult,
    checkpoint_path,
    load_checkpoint,
    method_code_digest,
    train,
)

__all__ = [
    "Augmentation",
    "AugmentedDataset",
    "EpochChoice",
    "FEATURE_DRAWS",
    "REFERENCE_EPOCH",
    "STAGE1",
    "STAGE1_AUGMENTATION",
    "STAGE2",
    "STAGE2_AUGMENTATION",
    "NO_AUGMENTATION",
    "Stage1Epochs",
    "TrainingRun",
    "best_epoch_on_test",
    "choose_epoch",
    "epoch_order",
    "evaluate",
    "fit",
    "load_epoch",
    "saved_epoch",
    "training_samples",
]

#: Stage 1 (`train.py` defaults: `--text_lr 1e-5 --text_batch_size 16 --text_epoch 5 --seed 111`); the recipe
#: draws each epoch's order itself (see the module docstring), so the trainer does not shuffle.
STAGE1 = TrainConfig(epochs=5, batch_size=16, lr=1e-5, betas=(0.5, 0.999), seed=111, shuffle=False)
#: Stage 2 (`--image_lr 5e-4 --image_batch_size 2 --image_epoch 20`, `MultiStepLR([16000, 32000], 0.5)` per step).
STAGE2 = TrainConfig(epochs=20, batch_size=2, lr=5e-4, betas=(0.5, 0.999), seed=111, schedule="multistep",
                     schedule_unit="iteration", milestones=(16000, 32000), gamma=0.5)
#: The epoch of the official log and, per the author, of the paper (issues #13, #16, #19, #52).
REFERENCE_EPOCH = 15
FeatureDraws = Literal["per_epoch", "once"]
#: How often stage 1 draws its augmented images (and so encodes its frozen features): every epoch, as the
#: reference's shuffled, augmenting DataLoader does (`train.py:53-85, 311-313`, `dataset/__init__.py:74-92`), or once.
FEATURE_DRAWS: tuple[str, ...] = ("per_epoch", "once")


@dataclass(frozen=True)
class Augmentation:
    """The reference's training augmentation (`BaseDataset`, `dataset/__init__.py:30-94`).

    Attributes:
        rotation: maximum rotation in degrees (`RandomRotation(degrees(π/6))`), applied with `rotation_p`.
        rotation_p: probability of the rotation.
        translate: maximum shift as a fraction of the side (`RandomAffine(translate=(0.15, 0.15))`).
        translate_p: probability of the shift.
        hflip_p: probability of a horizontal flip.
        vflip_p: probability of a vertical flip.
        color_jitter: strength of the brightness, contrast and saturation jitter (0 = none; stage 1).
        color_jitter_p: probability of each of the three jitters.
    """

    rotation: float = math.degrees(math.pi / 6)
    rotation_p: float = 0.5
    translate: float = 0.15
    translate_p: float = 0.5
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    color_jitter: float = 0.0
    color_jitter_p: float = 0.7


STAGE1_AUGMENTATION = Augmentation()
STAGE2_AUGMENTATION = Augmentation(color_jitter=0.5)
NO_AUGMENTATION = Augmentation(rotation_p=0.0, translate_p=0.0, hflip_p=0.0, vflip_p=0.0)


class AugmentedDataset(Dataset):
    """Training items with the reference's augmentation, drawn as a function of (seed, epoch, index).

    Items are those of `zsadkit.data.AnomalyDataset` ("image" (3, S, S), "mask" (S, S), "label", "class_name",
    "index"); images are resized bicubically, masks with nearest neighbours (AA-CLIP's transforms). With `order`,
    item i is sample `order[i]` (its "index" is i, the row of a feature cache).

    Args:
        samples: training records (absolute paths); normal images get zero masks.
        image_size: side S.
        augmentation: what to draw.
        seed: seed of the draws.
    """

    def __init__(self, samples: Sequence[Sample], image_size: int, augmentation: Augmentation, seed: int) -> None:
        if not samples:
            raise ValueError("AugmentedDataset: no samples")
        self.samples, self.image_size, self.augmentation, self.seed = list(samples), image_size, augmentation, seed
        self.image_transform = image_transform(image_size)
        self.mask_transform = mask_transform(image_size, interpolation="nearest")
        self.epoch = 1
        self.order: list[int] | None = None

    def set_epoch(self, epoch: int, order: Sequence[int] | None = None) -> None:
        """Draw the augmentation of `epoch` (1-indexed); `order` lists the samples in reading order."""
        self.epoch = epoch
        self.order = None if order is None else [int(i) for i in order]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample_index = index if self.order is None else self.order[index]
        sample = self.samples[sample_index]
        draw = random.Random(f"aaclip-augment/{self.seed}/{self.epoch}/{sample_index}")
        aug = self.augmentation
        image = read_image(sample.image)
        if aug.color_jitter > 0:
            for adjust in (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation):
                if draw.random() < aug.color_jitter_p:
                    image = adjust(image, draw.uniform(max(0.0, 1 - aug.color_jitter), 1 + aug.color_jitter))
        if sample.mask is None or sample.label == 0:
            mask = torch.zeros(self.image_size, self.image_size)
        else:
            mask_image = read_image(sample.mask, what="mask")
            check_mask_matches_image(image, mask_image, sample.image, sample.mask)
            mask = self.mask_transform(mask_image)
        stacked = torch.cat([self.image_transform(image), mask[None]])  # (4, S, S), transformed jointly
        nearest = TF.InterpolationMode.NEAREST
        if draw.random() < aug.rotation_p:
            stacked = TF.rotate(stacked, draw.uniform(-aug.rotation, aug.rotation), interpolation=nearest, fill=0.0)
        if draw.random() < aug.translate_p:
            shift = [round(draw.uniform(-aug.translate * self.image_size, aug.translate * self.image_size))
                     for _ in range(2)]
            stacked = TF.affine(stacked, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0],
                                interpolation=nearest, fill=0.0)
        if draw.random() < aug.hflip_p:
            stacked = TF.hflip(stacked)
        if draw.random() < aug.vflip_p:
            stacked = TF.vflip(stacked)
        return {"image": stacked[:3], "mask": stacked[3], "label": sample.label, "class_name": sample.class_name,
                "image_path": sample.image, "index": index}


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The stage-1 reading order of an epoch: a permutation seeded by seed + epoch (the trainer's per-epoch rule)."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


class Stage1Epochs(Dataset):
    """Stage 1's items of the current epoch, in that epoch's order: cached frozen features or augmented images.

    With a cache, `set_epoch` builds (once per key) the epoch's `FeatureCache` by encoding the epoch's augmented
    images in its training batches (`batch_size`, so the V-V batch mixing sees the batches training reads), and
    items are its rows; without, items are the augmented images and the step encodes them. With
    ``draws="once"`` every epoch reads epoch 1's draw (its augmentation, its order, its cache), so the frozen side
    is encoded once per run.

    Args:
        model: the AA-CLIP model (its `stage1_features` and `stage1_cache_key`).
        samples: training records.
        augmentation: stage 1's augmentation.
        seed: seed of the orders and draws.
        batch_size: the training batch size.
        cache_root: parent folder of the feature caches, or None for no cache.
        device: where the encoder runs.
        progress: progress bars of the cache builds.
        draws: "per_epoch" (the reference: a new augmentation and order each epoch) or "once" (epoch 1's, reused).
    """

    def __init__(self, model: AACLIP, samples: Sequence[Sample], augmentation: Augmentation, seed: int,
                 batch_size: int, cache_root: str | Path | None, device: str | torch.device = "cpu",
                 progress: bool = False, draws: FeatureDraws = "per_epoch") -> None:
        if draws not in FEATURE_DRAWS:
            raise ValueError(f"stage1_feature_draws must be one of {FEATURE_DRAWS}, got {draws!r}")
        self.model, self.samples, self.seed, self.batch_size = model, list(samples), seed, batch_size
        self.augmentation, self.draws = augmentation, draws
        self.drawn_epoch: int | None = None
        self.images = AugmentedDataset(self.samples, model.image_size, augmentation, seed)
        self.cache_root, self.device, self.progress = cache_root, device, progress
        self.rows: Dataset | None = None
        self.samples_key = samples_fingerprint(self.samples)

    def cache_key(self, epoch: int) -> dict[str, object]:
        return {**self.model.stage1_cache_key(), "samples": self.samples_key, "augmentation": asdict(self.augmentation),
                "seed": self.seed, "epoch": epoch, "batch_size": self.batch_size}

    def set_epoch(self, epoch: int) -> None:
        draw = 1 if self.draws == "once" else epoch
        if draw == self.drawn_epoch:  # "once": the rows of epoch 1 serve every epoch
            return
        self.drawn_epoch = draw
        self.images.set_epoch(draw, epoch_order(len(self.samples), self.seed, draw))
        if self.cache_root is None:
            self.rows = self.images
            return
        cache = FeatureCache(self.cache_root, self.cache_key(draw), name=f"aaclip-stage1-e{draw:03d}")
        cache.build(self.samples, self.model.stage1_features, self.model.image_size, batch_size=self.batch_size,
                    device=self.device, progress=self.progress, dataset=self.images)
        self.rows = cache.dataset()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        if self.rows is None:
            raise RuntimeError("Stage1Epochs: call set_epoch(epoch) first")
        return self.rows[index]


@dataclass
class TrainingRun:
    """What `fit` did: the trainer's results of both stages and where their checkpoints are."""

    stage1: TrainResult
    stage2: TrainResult
    stage1_dir: str
    stage2_dir: str

    @property
    def log(self) -> list[dict[str, float]]:
        """Per-epoch rows of both stages, with a "stage" column."""
        return [{"stage": 1, **row} for row in self.stage1.log] + [{"stage": 2, **row} for row in self.stage2.log]


def _parameters_fingerprint(parameters: dict[str, torch.nn.Parameter]) -> str:
    module = torch.nn.ParameterDict({name.replace(".", "/"): value for name, value in parameters.items()})
    return module_fingerprint(module)


def fit(
    model: AACLIP,
    samples: Sequence[Sample],
    stage1: TrainConfig | None = None,
    stage2: TrainConfig | None = None,
    *,
    stage1_augmentation: Augmentation = STAGE1_AUGMENTATION,
    stage2_augmentation: Augmentation = STAGE2_AUGMENTATION,
    checkpoint_dir: str | Path = "",
    use_cache: bool = True,
    cache_root: str | Path | None = None,
    stage1_feature_draws: FeatureDraws = "per_epoch",
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> TrainingRun:
    """Train both stages on auxiliary samples; the model ends with the last epoch of each.

    Args:
        model: the model (on `device`).
        samples: training records with masks (`training_samples`).
        stage1: stage 1's `TrainConfig` (default `STAGE1`; `shuffle` is ignored: the recipe orders the epochs).
        stage2: stage 2's (default `STAGE2`); `epochs=0` skips a stage.
        stage1_augmentation: stage 1's augmentation (`NO_AUGMENTATION` to switch it off).
        stage2_augmentation: stage 2's.
        checkpoint_dir: where `stage1/` and `stage2/` epoch checkpoints go ("" = none); a rerun resumes.
        use_cache: keep stage 1's frozen features in the feature cache.
        cache_root: parent folder of the feature caches (default `zsadkit.paths.default_cache_root()`).
        stage1_feature_draws: "per_epoch" (the reference: each epoch draws new augmentations and a new order, so
            its frozen features are encoded again, one cache per epoch) or "once" (epoch 1's draw, order and
            cache serve every stage-1 epoch: the image towers run once per run; a deviation).
        device: where the model runs.
        progress: progress bars.
    """
    stage1 = replace(stage1 or STAGE1, shuffle=False)
    stage2 = stage2 or STAGE2
    if not samples:
        raise ValueError("aaclip.fit: no training samples")
    folders = [str(Path(checkpoint_dir) / stage) if checkpoint_dir else "" for stage in ("stage1", "stage2")]
    samples_key = samples_fingerprint(samples)
    common = {"method": "aaclip", **model.fingerprint(), "samples": samples_key,
              "code": method_code_digest(model, __name__)}

    model.train()
    epochs = Stage1Epochs(model, samples, stage1_augmentation, stage1.seed, stage1.batch_size,
                          (cache_root or default_cache_root()) if use_cache else None, device, progress,
                          draws=stage1_feature_draws)

    def stage1_step(batch: dict) -> dict[str, torch.Tensor]:
        if "image" in batch:
            batch = {**batch, **model.stage1_features(batch["image"])}
        return model.stage1_losses(batch)

    first = TrainResult()
    if stage1.epochs > 0:
        first = train(model.text_parameters(), epochs, stage1_step, replace(stage1, checkpoint_dir=folders[0]),
                      fingerprint={**common, "stage": 1, "augmentation": asdict(stage1_augmentation),
                                   "feature_draws": stage1_feature_draws},
                      on_epoch_start=epochs.set_epoch, progress=progress)
    model.train()  # drops anchors cached during stage 1: stage 2 freezes the trained ones
    images = AugmentedDataset(samples, model.image_size, stage2_augmentation, stage2.seed)

    def stage2_step(batch: dict) -> dict[str, torch.Tensor]:
        return model.stage2_losses(batch["image"], batch["mask"], batch["label"], list(batch["class_name"]))

    second = TrainResult()
    if stage2.epochs > 0:
        second = train(model.image_parameters(), images, stage2_step, replace(stage2, checkpoint_dir=folders[1]),
                       fingerprint={**common, "stage": 2, "augmentation": asdict(stage2_augmentation),
                                    "text_parameters": _parameters_fingerprint(model.text_parameters())},
                       on_epoch_start=images.set_epoch, progress=progress)
    model.eval()
    return TrainingRun(first, second, folders[0], folders[1])


def training_samples(
    samples: Sequence[Sample],
    shots: int | Literal["full"] = "full",
    *,
    seed: int = 0,
    composition: Literal["any", "anomalous"] = "any",
    write_to: str | Path | None = None,
) -> list[Sample]:
    """The training records of a data regime: all of them ("full") or K per class.

    The reference's K-shot lists are unreleased (issues #27, #28): here K images per class are drawn without
    replacement from the class's records sorted by path, with one generator seeded by `seed` (classes in sorted
    order); `composition="anomalous"` draws among anomalous images only. The list is written to `write_to`
    (CSV or JSONL, `zsadkit.data.write_manifest`) when given, so the subset is on record beside the results.
    """
    if shots != "full" and (not isinstance(shots, int) or shots < 1):
        raise ValueError(f"shots must be 'full' or a positive number of images per class, got {shots!r}")
    if composition not in ("any", "anomalous"):
        raise ValueError(f"composition must be 'any' or 'anomalous', got {composition!r}")
    if shots == "full":
        chosen = list(samples)
    else:
        generator = torch.Generator().manual_seed(seed)
        chosen = []
        for class_name in sorted({s.class_name for s in samples}):
            pool = sorted((s for s in samples if s.class_name == class_name
                           and (composition == "any" or s.label == 1)), key=lambda s: s.image)
            if len(pool) < shots:
                raise ValueError(f"class {class_name!r} has {len(pool)} {'' if composition == 'any' else 'anomalous '}"
                                 f"training images, {shots} shots asked")
            chosen += [pool[int(i)] for i in torch.randperm(len(pool), generator=generator)[:shots]]
    if write_to:
        write_manifest(chosen, write_to)
    return chosen


@dataclass(frozen=True)
class EpochChoice:
    """Which stage-2 epoch's checkpoint gives the reported numbers, and whether test results chose it."""

    epoch: int
    selected_on_test: bool
    reason: str


def choose_epoch(policy: Literal["reference", "last"] | int, epochs: int) -> EpochChoice:
    """The stage-2 epoch to report without looking at test results here.

    "reference": epoch 15 (`REFERENCE_EPOCH`), the authors' choice after testing every epoch (flagged as chosen on
    test results); "last": the last epoch (the paper's 20 epochs); an integer: that epoch (not flagged).
    """
    if policy == "reference":
        if epochs < REFERENCE_EPOCH:
            return EpochChoice(epochs, False, f"last epoch ({epochs} < {REFERENCE_EPOCH}, the reference epoch)")
        return EpochChoice(REFERENCE_EPOCH, True, "epoch 15 of the official log, chosen by the authors after "
                                                  "testing every epoch (issues #13, #16, #19, #52)")
    if policy == "last":
        return EpochChoice(epochs, False, "last epoch")
    if isinstance(policy, int) and 1 <= policy <= epochs:
        return EpochChoice(policy, False, f"epoch {policy}, fixed in advance")
    raise ValueError(f"epoch policy must be 'reference', 'last' or an epoch in 1..{epochs}, got {policy!r}")


def saved_epoch(path: str | Path) -> EpochChoice | None:
    """The epoch a ``.safetensors`` adapters file was saved at, from its metadata; None when it records none.

    Reads ``epoch`` and ``epoch_selected_on_test`` ("True"/"False") of `AACLIP.save_adapters` files written with
    them (`31_aaclip_tables` does), or ``epoch`` of a `zsadkit.training` epoch checkpoint (not chosen on test
    results). Official ``.pth`` files and folders carry no such metadata: None.
    """
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "epoch" not in metadata:
        return None
    try:
        epoch = int(metadata["epoch"])
    except ValueError as error:
        raise ValueError(f"{path}: metadata 'epoch' must be an integer, got {metadata['epoch']!r}") from error
    flag = metadata.get("epoch_selected_on_test", "False")
    if flag not in ("True", "False"):
        raise ValueError(f"{path}: metadata 'epoch_selected_on_test' must be 'True' or 'False', got {flag!r}")
    return EpochChoice(epoch, flag == "True", f"epoch {epoch}, saved with {path.name}")


def load_epoch(model: AACLIP, run: TrainingRun, epoch: int) -> Path:
    """Load stage 2's checkpoint of `epoch` (the text side stays stage 1's last epoch); returns its path."""
    if not run.stage2_dir:
        raise ValueError("load_epoch: the run wrote no checkpoints (fit(..., checkpoint_dir=...))")
    path = checkpoint_path(run.stage2_dir, epoch)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (stage 2 ran {len(run.stage2.log)} epochs)")
    load_checkpoint(path, model.image_parameters())
    return path


def _scored_batches(model: AACLIP, samples: Sequence[Sample], batch_size: int,
                    device: str | torch.device) -> Iterator[tuple[dict, AACLIPScores]]:
    for batch in batches(samples, model.image_size, batch_size):
        yield batch, model.score(batch["image"].to(device), list(batch["class_name"]))


@torch.no_grad()
def evaluate(
    model: AACLIP,
    samples: Sequence[Sample],
    *,
    dataset: str,
    domain: Literal["industrial", "medical"],
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    fusion: Literal["transductive", "per_image"] | None = None,
    pro: str | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Per-class and mean metric rows of AA-CLIP on a test set, as `test.py` computes them.

    Pixel metrics come from the maps as they are produced; image metrics from the fused scores, which with
    `fusion="transductive"` (the config's default, the reference) need the whole class: each image's map
    maximum and the class's map minimum are kept, then `transductive_image_scores` fuses them per class.

    Args:
        model: the trained model (set to eval mode and to `domain`).
        samples: test records.
        dataset: dataset name of the rows.
        domain: "industrial" (blur 7/σ 1; 0.5·map + 0.5·image) or "medical" (9/σ 1.5; map only).
        batch_size: images per forward pass.
        device: where the model runs.
        fusion: "transductive" or "per_image" (default: `model.config.image_score_fusion`).
        pro: AU-PRO variant (AA-CLIP reports none).
        progress: progress bar.
    """
    model.eval().set_domain(domain)
    fusion = fusion or model.config.image_score_fusion
    if fusion not in ("transductive", "per_image"):
        raise ValueError(f"fusion must be 'transductive' or 'per_image', got {fusion!r}")
    has_masks = any(sample.mask is not None for sample in samples)
    pixels = Evaluator(dataset=dataset, pro=pro if has_masks else None)
    records: list[dict] = []
    bar = tqdm(total=math.ceil(len(samples) / batch_size), desc=f"AA-CLIP on {dataset}", disable=not progress)
    for batch, scores in _scored_batches(model, samples, batch_size, device):
        bar.update()
        maps = scores.anomaly_maps.float().cpu()
        per_image = model.per_image_image_scores(scores).cpu()
        if has_masks:
            pixels.update(list(batch["class_name"]), batch["label"], per_image, masks=batch["mask"], maps=maps,
                          sample_ids=list(batch["image_path"]))
        for index, class_name in enumerate(batch["class_name"]):
            records.append({"class_name": class_name, "label": int(batch["label"][index]),
                            "image_score": float(scores.image_scores[index]), "per_image": float(per_image[index]),
                            "map_max": float(maps[index].max()), "map_min": float(maps[index].min()),
                            "image_path": batch["image_path"][index]})
    bar.close()
    table = pd.DataFrame(records)
    images = Evaluator(dataset=dataset, pro=None)
    for class_name, group in table.groupby("class_name", sort=False):
        if fusion == "transductive":
            fused = transductive_image_scores(torch.tensor(group["image_score"].to_numpy()),
                                              torch.tensor(group["map_max"].to_numpy()),
                                              float(group["map_min"].min()), model.map_weight()).numpy()
        else:
            fused = group["per_image"].to_numpy()
        images.update([class_name] * len(group), group["label"].to_numpy(), np.asarray(fused, dtype=np.float64),
                      sample_ids=list(group["image_path"]))
    image_rows = images.compute()
    if not has_masks:
        return image_rows
    pixel_rows = pixels.compute()
    return pd.concat([image_rows, pixel_rows[pixel_rows.level == "pixel"]], ignore_index=True)


def best_epoch_on_test(
    model: AACLIP,
    run: TrainingRun,
    test_sets: dict[str, tuple[Sequence[Sample], str]],
    *,
    metric: tuple[str, str] = ("image", "auroc"),
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    evaluate_fn: Callable[..., pd.DataFrame] = evaluate,
) -> tuple[EpochChoice, pd.DataFrame]:
    """`test.py`'s sweep: every stage-2 epoch on the test sets; the epoch with the best mean `metric` (over the
    sets' class means) is loaded and returned **flagged as chosen on test results**, with all rows (an "epoch"
    column).

    Args:
        model: the trained model (its stage-1 parameters stay).
        run: `fit`'s result with checkpoints.
        test_sets: {dataset name: (samples, domain)}.
        metric: (level, metric) to maximise.
        batch_size: images per forward pass.
        device: where the model runs.
        evaluate_fn: the evaluation (default `evaluate`).
    """
    rows, scores = [], {}
    for epoch in range(1, len(run.stage2.log) + 1):
        load_epoch(model, run, epoch)
        for name, (samples, domain) in test_sets.items():
            frame = evaluate_fn(model, samples, dataset=name, domain=domain, batch_size=batch_size, device=device)
            rows.append(frame.assign(epoch=epoch))
        current = pd.concat([frame for frame in rows if frame["epoch"].iloc[0] == epoch])
        mean = current.query("class_name == 'mean' and level == @metric[0] and metric == @metric[1]")["value"]
        scores[epoch] = float(mean.mean())
    best = max(scores, key=lambda epoch: (scores[epoch], -epoch))
    load_epoch(model, run, best)
    return (EpochChoice(best, True, f"best mean {metric[0]} {metric[1]} over the test sets among epochs "
                                    f"1..{len(scores)}"), pd.concat(rows, ignore_index=True))
