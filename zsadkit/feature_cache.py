"""Frozen image-encoder outputs cached on disk (memory-mapped), so training epochs skip the image tower.

AnomalyCLIP (and VAND, AA-CLIP's text stage, HeadCLIP) train a few parameters while the image encoder stays
frozen and the reference applies no augmentation, so every epoch would recompute identical image features
(spec §10). `FeatureCache` computes them once per (backbone weights, image size, layers, attention, ...,
samples) and stores one `.npy` per output plus the masks and labels; epochs then read memory-mapped rows.

Staleness: the directory name is a hash of a key that includes a fingerprint of the backbone's weights
(`module_fingerprint`), the caller's settings (layers, attention variants, token type, ...), the image size,
the dtype and every sample's paths, label, size and modification time. A different key gives a different
directory, so a stale cache is never reused. A cache is complete only once its `meta.json` is written (last);
an interrupted build is rebuilt.

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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from zsadkit.data.records import Sample
from zsadkit.experiment import REPO_ROOT

CACHE_FORMAT = "zsadkit-feature-cache/1"
META_FILE = "meta.json"
EncodeFunction = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]


def default_cache_root() -> Path:
    """`$ZSADKIT_CACHE/features`, else `<repo>/.cache/features` (ignored by git)."""
    base = os.environ.get("ZSADKIT_CACHE")
    return Path(base) / "features" if base else REPO_ROOT / ".cache" / "features"


def module_fingerprint(module: nn.Module, samples_per_tensor: int = 1024) -> str:
    """A cheap identity of a module's weights: names, shapes, float64 sums and a strided sample of each tensor.

    Any realistic change of weights (another checkpoint, another seed, a resized position embedding) changes it.
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::stride][:samples_per_tensor].to("cpu", torch.float64)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{float(flat.double().sum())!r}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def samples_fingerprint(samples: Sequence[Sample]) -> str:
    """Identity of a list of samples: paths, labels, classes, and each file's size and modification time."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(f"{sample.image}|{sample.mask}|{sample.label}|{sample.class_name}|".encode())
        for path in (sample.image, sample.mask):
            if path is not None:
                status = Path(path).stat()
                digest.update(f"{status.st_size}:{status.st_mtime_ns}|".encode())
    return digest.hexdigest()


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
    ) -> FeatureCache:
        """Encode every sample once (unless the cache is complete) and store outputs, masks and labels.

        Args:
            samples: records with absolute paths (the order defines the rows).
            encode: images (B, 3, S, S) on `device` → {name: (B, ...) tensor}; one array per name.
            image_size: side S of the transformed images and masks.
            batch_size: images per encoder call.
            device: where `encode` runs.
            dtype: storage dtype of the encoder outputs (float32 keeps exact values; float16 halves the disk).
            progress: show a progress bar.
        """
        from zsadkit.engine import batches

        if self.complete:
            return self
        if self.directory.exists():
            shutil.rmtree(self.directory)  # an interrupted build
        self.directory.mkdir(parents=True)
        count = len(samples)
        arrays: dict[str, np.ndarray] = {}
        masks = np.lib.format.open_memmap(self.directory / "mask.npy", "w+", np.uint8, (count, image_size, image_size))
        labels = np.zeros(count, dtype=np.int64)
        class_names: list[str] = [""] * count
        for batch in tqdm(batches(samples, image_size, batch_size), desc="feature cache", disable=not progress):
            index = batch["index"].numpy()
            with torch.no_grad():
                outputs = encode(batch["image"].to(device))
            for name, value in outputs.items():
                if name in ("mask", "label", "class_name", "index"):
                    raise ValueError(f"FeatureCache: encoder output name {name!r} is reserved")
                if name not in arrays:
                    arrays[name] = np.lib.format.open_memmap(
                        self.directory / f"{name}.npy", "w+", np.dtype(dtype), (count, *value.shape[1:])
                    )
                arrays[name][index] = value.detach().float().cpu().numpy().astype(dtype)
            masks[index] = (batch["mask"] > 0.5).numpy().astype(np.uint8)
            labels[index] = batch["label"].numpy()
            for row, name in zip(index, batch["class_name"], strict=True):
                class_names[row] = name
        for array in (*arrays.values(), masks):
            array.flush()
        np.save(self.directory / "label.npy", labels)
        meta = {"key": self.key, "count": count, "arrays": sorted(arrays), "class_names": class_names}
        (self.directory / META_FILE).write_text(json.dumps(meta, sort_keys=True, default=str))
        return self

    def dataset(self) -> CachedFeatureDataset:
        """The cached rows as a map-style dataset (memory-mapped, read on access)."""
        if not self.complete:
            raise FileNotFoundError(f"feature cache {self.directory} is not complete; call build() first")
        return CachedFeatureDataset(self.directory)

    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.directory.glob("*.npy"))


class CachedFeatureDataset(Dataset):
    """Rows of a complete cache: {output names: tensors, "mask" (S, S) float, "label", "class_name", "index"}."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta = json.loads((self.directory / META_FILE).read_text())
        self.class_names: list[str] = meta["class_names"]
        self.arrays = {name: np.load(self.directory / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
        self.masks = np.load(self.directory / "mask.npy", mmap_mode="r")
        self.labels = np.load(self.directory / "label.npy")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        item = {name: torch.from_numpy(np.array(array[index], dtype=np.float32)) for name, array in self.arrays.items()}
        item["mask"] = torch.from_numpy(np.array(self.masks[index], dtype=np.float32))
        item["label"] = int(self.labels[index])
        item["class_name"] = self.class_names[index]
        item["index"] = index
        return item
