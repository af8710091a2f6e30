"""AnomalyCLIP cost: batched prediction throughput, training epochs with and without the feature cache, memory.

Usage:
    python benchmarks/bench_anomalyclip.py                                   # zsad-tiny @112, ViT-B-16 @224 (CPU)
    python benchmarks/bench_anomalyclip.py --models ViT-L-14-336:518 --device cuda --images 64

Random weights (no download); the data are the synthetic auxiliary classes (`synth-aux`, generated on first
use). For every backbone it prints:

* images/s of `AnomalyCLIP.predict` on batches of `--batch` images (best of `--repeats`);
* seconds per training epoch without the cache (the reference: every step reads the PNGs and runs the frozen
  image encoder) and with the memory-mapped feature cache (text encoder and loss only), the one-time cache
  build, and their ratio (target: ≥ 10×);
* peak memory per phase: the process's RSS high-water mark, reset between phases (CPU, Linux), or
  `torch.cuda.max_memory_allocated` (GPU).

On a shared CPU, set OMP_NUM_THREADS to the cores you own: contention makes timings erratic.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch

from zsadkit.experiment import RunConfig, load_split
from zsadkit.feature_cache import cached_rows
from zsadkit.methods.anomalyclip import AnomalyCLIP, reference_config
from zsadkit.models import load_clip
from zsadkit.models.runtime import peak_memory_mib, reset_peak_memory, synchronize
from zsadkit.recipes.anomalyclip import fit
from zsadkit.training import TrainConfig


def bench(backbone: str, image_size: int, device: str, n_images: int, batch: int, epochs: int, repeats: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip(backbone, None, image_size=image_size, device=device)
    torch.manual_seed(0)
    model = AnomalyCLIP(clip, reference_config(clip)).to(device).eval()
    samples = load_split(RunConfig(profile="smoke"), "synth-aux")
    samples = (samples * (n_images // len(samples) + 1))[:n_images]
    row: dict[str, object] = {"backbone": f"{backbone}@{image_size}", "device": device, "images": n_images}

    images = torch.randn(batch, 3, image_size, image_size, device=device)
    reset_peak_memory(device)
    model.predict(images, ["object"] * batch)  # warm-up, text features cached
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        model.predict(images, ["object"] * batch)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    row["predict img/s"] = batch / best
    row["predict peak MiB"] = peak_memory_mib(device)

    config = TrainConfig(epochs=epochs, batch_size=batch, seed=111)
    reset_peak_memory(device)
    no_cache = fit(model, samples, config, use_cache=False, device=device)
    row["epoch s (no cache)"] = min(r["seconds"] for r in no_cache.log)
    row["train peak MiB (no cache)"] = peak_memory_mib(device)
    with tempfile.TemporaryDirectory(prefix="zsad-bench-cache-") as cache_root:
        reset_peak_memory(device)
        started = time.perf_counter()
        rows = cached_rows(model, samples, name="anomalyclip", cache_root=cache_root, batch_size=batch, device=device)
        row["cache build s"] = time.perf_counter() - started
        cached = fit(model, samples, config, use_cache=True, cache_root=cache_root, device=device)
        row["epoch s (cache)"] = min(r["seconds"] for r in cached.log)
        row["train peak MiB (cache)"] = peak_memory_mib(device)
        row["cache MiB"] = sum(path.stat().st_size for path in rows.directory.glob("*.npy")) / 2**20
    row["speed-up"] = row["epoch s (no cache)"] / row["epoch s (cache)"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="zsad-tiny:112,ViT-B-16:224", help="comma-separated NAME:SIZE")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=32, help="training images per epoch")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per mode (the fastest is reported)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    rows = []
    for item in args.models.split(","):
        name, size = item.rsplit(":", 1)
        rows.append(bench(name, int(size), args.device, args.images, args.batch, args.epochs, args.repeats))
        print("  ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                        for key, value in rows[-1].items()), flush=True)
    try:
        import pandas as pd

        print(pd.DataFrame(rows).round(3).to_string(index=False))
    except ImportError:
        pass


if __name__ == "__main__":
    main()
