"""The on-disk feature cache: rows equal the encoder's outputs, keys separate settings, stale caches are rebuilt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zsadkit.data.records import Sample, samples_fingerprint
from zsadkit.feature_cache import FeatureCache
from zsadkit.models import module_fingerprint


@pytest.fixture
def samples(tmp_path: Path) -> list[Sample]:
    rng = np.random.default_rng(0)
    records = []
    for index in range(5):
        image = tmp_path / f"img{index}.png"
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(image)
        mask = None
        if index % 2:
            mask = tmp_path / f"img{index}_mask.png"
            values = np.zeros((20, 24), np.uint8)
            values[5:10, 6:12] = 255
            Image.fromarray(values).save(mask)
        records.append(Sample(str(image), None if mask is None else str(mask), int(mask is not None),
                              f"class{index % 2}", "good" if mask is None else "hole", "toy", "test"))
    return records


class CountingEncoder:
    """A deterministic 'image encoder' that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {"mean": images.mean(dim=(2, 3)), "tokens": images[:, :, ::4, ::4].flatten(2)}


def test_cached_rows_equal_the_encoder_outputs_masks_and_labels(samples, tmp_path: Path) -> None:
    from zsadkit.data.dataset import AnomalyDataset

    encoder = CountingEncoder()
    cache = FeatureCache(tmp_path / "cache", {"encoder": "counting"}).build(samples, encoder, 16, batch_size=2)
    dataset = cache.dataset()
    reference = AnomalyDataset(samples, image_size=16)
    assert len(dataset) == 5
    for index in range(5):
        row, item = dataset[index], reference[index]
        expected = encoder(item["image"][None])
        assert torch.allclose(row["mean"], expected["mean"][0]) and torch.allclose(row["tokens"], expected["tokens"][0])
        assert torch.equal(row["mask"], item["mask"]) and row["label"] == item["label"]
        assert row["class_name"] == item["class_name"]
    assert isinstance(dataset.arrays["tokens"], np.memmap)


def test_a_complete_cache_is_reused_without_encoding_again(samples, tmp_path: Path) -> None:
    encoder = CountingEncoder()
    FeatureCache(tmp_path, {"encoder": "counting"}).build(samples, encoder, 16, batch_size=2)
    calls = encoder.calls
    assert calls == 3
    FeatureCache(tmp_path, {"encoder": "counting"}).build(samples, encoder, 16, batch_size=2)
    assert encoder.calls == calls


def test_different_settings_weights_or_samples_give_different_caches(samples, tmp_path: Path) -> None:
    base = FeatureCache(tmp_path, {"layers": [4], "samples": samples_fingerprint(samples)})
    assert FeatureCache(tmp_path, {"layers": [3], "samples": samples_fingerprint(samples)}).directory != base.directory
    assert FeatureCache(tmp_path, {"layers": [4], "samples": samples_fingerprint(samples[:4])}).directory != base.directory
    first, second = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    assert module_fingerprint(first) != module_fingerprint(second)
    assert module_fingerprint(first) == module_fingerprint(first)


def test_touching_an_image_file_changes_the_samples_fingerprint(samples) -> None:
    import os

    before = samples_fingerprint(samples)
    status = os.stat(samples[0].image)
    os.utime(samples[0].image, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))
    assert samples_fingerprint(samples) != before


def test_an_interrupted_build_is_rebuilt(samples, tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, {"encoder": "counting"})
    cache.directory.mkdir(parents=True)
    (cache.directory / "mean.npy").write_bytes(b"partial")
    assert not cache.complete
    with pytest.raises(FileNotFoundError, match="not complete"):
        cache.dataset()
    cache.build(samples, CountingEncoder(), 16)
    assert cache.complete and len(cache.dataset()) == 5


def test_builders_of_the_same_cache_at_once_never_expose_a_half_written_directory(samples, tmp_path: Path) -> None:
    import threading

    barrier = threading.Barrier(2, timeout=30)
    half_written: list[bool] = []

    class WatchingEncoder(CountingEncoder):
        """Meets the other builder at its first call; at every call, looks at the cache directory a reader sees."""

        def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
            if self.calls == 0:
                barrier.wait()
            cache = FeatureCache(tmp_path, {"encoder": "counting"})
            half_written.append(cache.directory.exists() and not cache.complete)
            return super().__call__(images)

    errors: list[BaseException] = []

    def build() -> None:
        try:
            FeatureCache(tmp_path, {"encoder": "counting"}).build(samples, WatchingEncoder(), 16, batch_size=2)
        except BaseException as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and half_written and not any(half_written)
    cache = FeatureCache(tmp_path, {"encoder": "counting"})
    assert cache.complete and len(cache.dataset()) == 5
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []  # no staging folder left


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_caches_hold_the_outputs_rounded_to_that_precision(samples, tmp_path: Path, dtype: str) -> None:
    from zsadkit.data.dataset import AnomalyDataset

    encoder = CountingEncoder()
    cache = FeatureCache(tmp_path / dtype, {"encoder": "counting"}).build(samples, encoder, 16, batch_size=2,
                                                                         dtype=dtype)
    dataset = cache.dataset()
    reference = AnomalyDataset(samples, image_size=16)
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    for index in range(5):
        expected = encoder(reference[index]["image"][None])["tokens"][0]
        row = dataset[index]["tokens"]
        assert row.dtype == torch.float32
        assert torch.equal(row, expected.to(torch_dtype).float())  # exactly the rounded value
        assert not torch.equal(row, expected)  # and rounded indeed
    assert dataset.arrays["tokens"].itemsize == 2
