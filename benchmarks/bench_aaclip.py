"""AA-CLIP cost: stage-1 epochs with and without the feature cache, stage-2 epochs, prediction throughput, memory.

Usage:
    python benchmarks/bench_aaclip.py       # zsad-tiny @112, ViT-B-16 @224 (CPU), + ViT-L-14-336 @518 when CUDA is there
    python benchmarks/bench_aaclip.py --models ViT-L-14-336:518 --device cuda --images 64

Random weights (no download); the data are the synthetic auxiliary classes (`synth-aux`, generated on first
use), with the reference's augmentation and batch sizes (stage 1: 16, stage 2: 2). For every backbone it prints:

* stage 1, seconds per epoch: without the cache (the reference: every step reads the PNGs, augments them and runs
  the frozen surgery and plain image towers), on a first cached run (the same plus writing the epoch's cache),
  and on a run that finds the caches (a rerun, a resumed run, another stage-1 loss switch: the text side and the
  loss only), with the ratio no cache / cache (target ≥ 10×); and a first run with `stage1_feature_draws="once"`
  (epoch 1 builds the one cache, later epochs read it: the fastest epoch is a cached one);
* stage 2, seconds per epoch (the vision adapters train inside the image tower: nothing to cache);
* images/s of `AACLIP.predict` on batches of `--batch` images (best of `--repeats`);
* peak memory per phase: the process's RSS high-water mark, reset between phases (CPU, Linux), or
  `torch.cuda.max_memory_allocated` (GPU).

Without `--models` and `--device`, a machine with CUDA adds the paper's backbone, ViT-L-14-336 @518, on the GPU
(`GPU_ROW`). On a shared CPU, set OMP_NUM_THREADS to the cores you own: contention makes timings erratic.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from zsadkit.experiment import RunConfig, load_split
from zsadkit.methods.aaclip import AACLIP, reference_config
from zsadkit.models import load_clip
from zsadkit.models.runtime import peak_memory_mib, reset_peak_memory, synchronize
from zsadkit.recipes.aaclip import STAGE1, STAGE2, fit

CPU_MODELS = "zsad-tiny:112,ViT-B-16:224"
#: The paper's backbone, benchmarked on the GPU whenever CUDA is available and no models or device are given.
GPU_ROW = ("ViT-L-14-336", 518, "cuda")








def fastest_epoch(log: list[dict], stage: int) -> float:
    return min(row["seconds"] for row in log if row["stage"] == stage)


def bench(backbone: str, image_size: int, device: str, n_images: int, batch: int, epochs: int, repeats: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip(backbone, None, image_size=image_size, device=device, pos_embed_resize="open_clip",
                         quick_gelu=False)
    torch.manual_seed(0)
    model = AACLIP(clip, reference_config(clip)).to(device).eval()
    samples = load_split(RunConfig(profile="smoke"), "synth-aux")
    samples = (samples * (n_images // len(samples) + 1))[:n_images]
    row: dict[str, object] = {"backbone": f"{backbone}@{image_size}", "device": device, "images": n_images}
    stage1 = replace(STAGE1, epochs=epochs)
    no_stage2 = replace(STAGE2, epochs=0)

    with tempfile.TemporaryDirectory(prefix="zsad-bench-cache-") as cache_root:
        log = fit(model, samples, stage1, no_stage2, cache_root=cache_root, device=device).log
        row["stage-1 epoch s (building the cache)"] = fastest_epoch(log, 1)
        reset_peak_memory(device)
        log = fit(model, samples, stage1, no_stage2, cache_root=cache_root, device=device).log
        row["stage-1 epoch s (cache)"] = fastest_epoch(log, 1)
        row["stage-1 peak MiB (cache)"] = peak_memory_mib(device)
        row["cache MiB per epoch"] = sum(path.stat().st_size for path in Path(cache_root).glob("*-e001-*/*.npy")) / 2**20
    reset_peak_memory(device)  # after the cached runs, so that first-call costs (imports, file cache) fall on those
    log = fit(model, samples, stage1, no_stage2, use_cache=False, device=device).log
    row["stage-1 epoch s (no cache)"] = fastest_epoch(log, 1)
    row["stage-1 peak MiB (no cache)"] = peak_memory_mib(device)
    row["stage-1 speed-up"] = row["stage-1 epoch s (no cache)"] / row["stage-1 epoch s (cache)"]
    with tempfile.TemporaryDirectory(prefix="zsad-bench-cache-") as cache_root:
        log = fit(model, samples, stage1, no_stage2, cache_root=cache_root, device=device,
                  stage1_feature_draws="once").log
        row["stage-1 epoch s (draws once, first run)"] = fastest_epoch(log, 1)

    reset_peak_memory(device)
    log = fit(model, samples, replace(STAGE1, epochs=0), replace(STAGE2, epochs=1), device=device).log
    row["stage-2 epoch s"] = fastest_epoch(log, 2)
    row["stage-2 peak MiB"] = peak_memory_mib(device)

    images = torch.randn(batch, 3, image_size, image_size, device=device)
    reset_peak_memory(device)
    model.predict(images, ["bottle"] * batch)  # warm-up; the anchors are cached
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        model.predict(images, ["bottle"] * batch)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    row["predict img/s"] = batch / best
    row["predict peak MiB"] = peak_memory_mib(device)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help=f"comma-separated NAME:SIZE (default {CPU_MODELS})")
    parser.add_argument("--device", default=None, help="default cpu (and cuda for GPU_ROW when available)")
    parser.add_argument("--images", type=int, default=32, help="training images per epoch")
    parser.add_argument("--batch", type=int, default=8, help="images per prediction batch")
    parser.add_argument("--epochs", type=int, default=2, help="stage-1 epochs per mode (the fastest is reported)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = args.device or "cpu"
    runs = [(name, int(size), device) for name, size in (item.rsplit(":", 1)
                                                          for item in (args.models or CPU_MODELS).split(","))]
    if args.models is None and args.device is None and torch.cuda.is_available():
        runs.append(GPU_ROW)
    cuda = any(run_device.startswith("cuda") for _, _, run_device in runs)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, devices {sorted({r[2] for r in runs})}"
          + (f" ({torch.cuda.get_device_name()})" if cuda else ""))
    rows = []
    for name, size, run_device in runs:
        rows.append(bench(name, size, run_device, args.images, args.batch, args.epochs, args.repeats))
        print("  ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                        for key, value in rows[-1].items()), flush=True)
    try:
        import pandas as pd

        print(pd.DataFrame(rows).round(3).T.to_string(header=False))
    except ImportError:
        pass


if __name__ == "__main__":
    main()
