"""Frozen image-encoder outputs cached on disk (memory-mapped), so training epochs skip the image tower.

AnomalyCLIP (and AA-CLIP's text stage, HeadCLIP, InCTRL) train a few parameters while the image encoder stays
frozen and the reference applies no augmentation, so every epoch would recompute identical image features
(AnomalyCLIP's `train.py` runs the frozen encoder on every batch of every epoch). `FeatureCache` computes them
once per (backbone weights, image size, layers, attention, ..., samples) and stores one `.npy` per output plus the
masks and labels; epochs then read memory-mapped rows. `cached_rows` does this for any `FeatureModel`.

Staleness: the directory name is a hash of a key that includes a fingerprint of the backbone's weights
(`zsadkit.models.module_fingerprint`), the caller's settings (layers, attention variants, token type, ...), the image size,
the dtype and every sample's paths, label, size and modification time. A different key gives a different
directory, so a stale cache is never reused. A cache is built in a temporary folder beside its directory and
renamed into place once its `meta.json` is written (last), so processes that build the same cache at once (grid
cells on several workers) never read or delete a half-written one; an interrupted build is rebuilt.

Example:
    >>> cache = FeatureCache("/tmp/zsad-cache", {"backbone": "zsad-tiny", "layers": [4]})  # doctest: +SKIP
    >>> cache.build(samples, encode, image_size=112)                                       # doctest: +SKIP
    >>> dataset = cache.dataset()  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from zsadkit.data.dataset import batches
from zsadkit.data.records import Sample, samples_fingerprint
from zsadkit.data.transforms import ResizeMode
from zsadkit.methods.base import FeatureModel
from zsadkit.paths import default_cache_root

CACHE_FORMAT = "zsadkit-feature-cache/1"
META_FILE = "meta.json"
#: The storage name of bfloat16 caches (numpy has no bfloat16: the 16 bits are kept in uint16 arrays).
BFLOAT16 = "bfloat16"
EncodeFunction = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]

__all__ = ["CachedFeatureDataset", "FeatureCache", "cached_rows"]


class FeatureCache:
    """A directory of memory-mapped arrays (one row per sample) for one cache key.

    Args:
        root: parent folder of all caches.
        key: everything the cached values depend on (JSON-serialisable); hashed into the directory name.
        name: readable prefix of the directory name.
    """

    def __init__(self, root: str | Path, key: Mapping[str, object], name: str = "features") -> None:
        self.key = {"format": CACHE_FORMAT, **dict(key)}
        encoded = json.dumps(self.key, sort_keys=True, default=str)
        self.digest = hashlib.sha256(encoded.encode()).hexdigest()[:20]
        self.directory = Path(root) / f"{name}-{self.digest}"

    @property
    def complete(self) -> bool:
        meta = self.directory / META_FILE
        if not meta.is_file():
            return False
        return json.loads(meta.read_text()).get("key") == json.loads(json.dumps(self.key, sort_keys=True, default=str))

    def build(
        self,
        samples: Sequence[Sample],
        encode: EncodeFunction,
        image_size: int,
        *,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        dtype: np.dtype | str = np.float32,
        progress: bool = False,
        resize: ResizeMode = "squash",
        dataset: Dataset | None = None,
    ) -> FeatureCache:
        """Encode every sample once (unless the cache is complete) and store outputs, masks and labels.

        Args:
            samples: records with absolute paths (the order defines the rows).
            encode: images (B, 3, S, S) on `device` → {name: (B, ...) tensor}; one array per name.
            image_size: side S of the transformed images and masks.
            batch_size: images per encoder call.
            device: where `encode` runs.
            dtype: storage dtype of the encoder outputs (float32 keeps exact values; float16 or "bfloat16" halve
                the disk; bfloat16 is stored as its 16 bits in uint16 arrays and read back as float32).
            progress: show a progress bar.
            resize: how images are brought to S × S (`zsadkit.data.transforms.image_transform`); part of the key.
            dataset: items to encode instead of the plain transforms of `samples` (e.g. augmented views); item i
                is row i and has the keys of `AnomalyDataset` items ("image", "mask", "label", "class_name",
                "index"). It is read in order, `batch_size` items per encoder call (the encoder sees those batches).
        """
        if self.complete:
            return self
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{self.directory.name}-", dir=self.directory.parent))
        try:
            storage = BFLOAT16 if str(dtype) == "bfloat16" else np.dtype(dtype)
            self._write(staging, samples, encode, image_size, batch_size, device, storage, progress, resize, dataset)
            for attempt in range(2):
                try:
                    os.replace(staging, self.directory)
                    break
                except OSError:  # the directory exists: built by another process meanwhile, or interrupted in place
                    if self.complete:
                        break
                    if attempt:
                        raise
                    shutil.rmtree(self.directory, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self

    def _write(
        self,
        directory: Path,
        samples: Sequence[Sample],
        encode: EncodeFunction,
        image_size: int,
        batch_size: int,
        device: str | torch.device,
        dtype: np.dtype | str,
        progress: bool,
        resize: ResizeMode,
        dataset: Dataset | None,
    ) -> None:
        """Encode every sample into `directory`: one array per output, the masks, labels and `meta.json` last."""
        count = len(samples) if dataset is None else len(dataset)
        arrays: dict[str, np.ndarray] = {}
        masks = np.lib.format.open_memmap(directory / "mask.npy", "w+", np.uint8, (count, image_size, image_size))
        labels = np.zeros(count, dtype=np.int64)
        class_names: list[str] = [""] * count
        if dataset is None:
            loader = batches(samples, image_size, batch_size, resize=resize)
        else:
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        bar = tqdm(total=len(loader), desc="feature cache", disable=not progress)
        for batch in loader:
            bar.update()
            index = batch["index"].numpy()
            with torch.no_grad():
                outputs = encode(batch["image"].to(device))
            for name, value in outputs.items():
                if name in ("mask", "label", "class_name", "index"):
                    raise ValueError(f"FeatureCache: encoder output name {name!r} is reserved")
                if name not in arrays:
                    arrays[name] = np.lib.format.open_memmap(
                        directory / f"{name}.npy", "w+", np.uint16 if dtype == BFLOAT16 else dtype,
                        (count, *value.shape[1:])
                    )
                arrays[name][index] = _stored(value.detach().float().cpu(), dtype)
            masks[index] = (batch["mask"] > 0.5).numpy().astype(np.uint8)
            labels[index] = batch["label"].numpy()
            for row, name in zip(index, batch["class_name"], strict=True):
                class_names[row] = name
        bar.close()
        for array in (*arrays.values(), masks):
            array.flush()
        np.save(directory / "label.npy", labels)
        meta = {"key": self.key, "count": count, "arrays": sorted(arrays), "class_names": class_names,
                "bfloat16": dtype == BFLOAT16}
        (directory / META_FILE).write_text(json.dumps(meta, sort_keys=True, default=str))

    def dataset(self) -> CachedFeatureDataset:
        """The cached rows as a map-style dataset (memory-mapped, read on access)."""
        if not self.complete:
            raise FileNotFoundError(f"feature cache {self.directory} is not complete; call build() first")
        return CachedFeatureDataset(self.directory)

    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.directory.glob("*.npy"))


def _stored(values: torch.Tensor, dtype: np.dtype | str) -> np.ndarray:
    """float32 values as stored: cast to `dtype`, or for bfloat16 the upper 16 bits after rounding to bf16."""
    if dtype == BFLOAT16:
        return values.bfloat16().view(torch.int16).numpy().view(np.uint16)
    return values.numpy().astype(dtype)


def _loaded(row: np.ndarray, bfloat16: bool) -> torch.Tensor:
    """A stored row as float32 (bfloat16 bits shifted back into the upper half of a float32)."""
    if bfloat16:
        return torch.from_numpy((np.asarray(row).astype(np.uint32) << 16).view(np.float32))
    return torch.from_numpy(np.array(row, dtype=np.float32))


class CachedFeatureDataset(Dataset):
    """Rows of a complete cache: {output names: tensors, "mask" (S, S) float, "label", "class_name", "index"}."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta = json.loads((self.directory / META_FILE).read_text())
        self.class_names: list[str] = meta["class_names"]
        self.arrays = {name: np.load(self.directory / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
        self.masks = np.load(self.directory / "mask.npy", mmap_mode="r")
        self.labels = np.load(self.directory / "label.npy")
        self.bfloat16 = bool(meta.get("bfloat16", False))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        item = {name: _loaded(array[index], self.bfloat16) for name, array in self.arrays.items()}
        item["mask"] = torch.from_numpy(np.array(self.masks[index], dtype=np.float32))
        item["label"] = int(self.labels[index])
        item["class_name"] = self.class_names[index]
        item["index"] = index
        return item


def cached_rows(
    model: FeatureModel,
    samples: Sequence[Sample],
    *,
    name: str,
    cache_root: str | Path | None = None,
    dtype: str = "float32",
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = False,
    resize: ResizeMode = "squash",
) -> CachedFeatureDataset:
    """The rows of `model.encode_rows` for `samples`, computed once into the cache and memory-mapped.

    Args:
        model: a `FeatureModel`; its `feature_cache_key()` names what the rows depend on.
        samples: records with absolute paths (the order defines the rows).
        name: readable prefix of the cache directory (the method's name).
        cache_root: parent folder of the caches (default `zsadkit.paths.default_cache_root()`).
        dtype: storage dtype ("float32" exact, "float16" half the disk).
        batch_size: images per encoder call.
        device: where the encoder runs.
        progress: show a progress bar.
        resize: how images are brought to S × S ("squash" default; "shorter_side_crop" for InCTRL).
    """
    key = {**model.feature_cache_key(), "dtype": dtype, "samples": samples_fingerprint(samples)}
    if resize != "squash":  # the default keeps the keys (and directories) of existing caches
        key["resize"] = resize
    cache = FeatureCache(cache_root or default_cache_root(), key, name=name)
    cache.build(samples, model.encode_rows, model.image_size, batch_size=batch_size, device=device, dtype=dtype,
                progress=progress, resize=resize)
    return cache.dataset()
