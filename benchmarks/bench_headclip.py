"""HeadCLIP cost: prediction throughput and training epochs with and without the cache of the frozen blocks.

Usage:
    python benchmarks/bench_headclip.py                                      # zsad-tiny @112, ViT-B-16 @224 (CPU)
    python benchmarks/bench_headclip.py --models ViT-L-14-336:518 --device cuda --images 64 --layers all,last:6

Random weights (no download); the data are the synthetic auxiliary classes (`synth-aux`, generated on first use).
For every backbone and head-weight layer setting (`--layers`: "all", "tapped" or "last:N") it prints:

* images/s of `HeadCLIP.predict` on batches of `--batch` images (best of `--repeats`);
* seconds per training epoch without the cache (every step reads the PNGs and runs the whole image tower) and with
  the cache of the blocks before the first weighted layer (`HeadCLIP.frozen_rows`), the one-time cache build, the
  cache size and the speed-up. With head weights in every layer the cache holds the patch embedding only, so the
  speed-up is small by construction; with the last N layers it skips the first L − N blocks.

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
from zsadkit.methods.headclip import HeadCLIP, reference_config
from zsadkit.models import load_clip
from zsadkit.recipes.headclip import fit
from zsadkit.training import TrainConfig


def layer_options(setting: str) -> dict[str, object]:
    """"all" / "tapped" / "last:N" → `HeadCLIPConfig` overrides."""
    if setting.startswith("last:"):
        return {"lhw_layers": "last", "lhw_last_n": int(setting.split(":", 1)[1])}
    if setting in ("all", "tapped"):
        return {"lhw_layers": setting}
    raise ValueError(f"--layers entries are 'all', 'tapped' or 'last:N', got {setting!r}")


def bench(clip: torch.nn.Module, label: str, setting: str, device: str, n_images: int, batch: int, epochs: int,
          repeats: int) -> dict:
    torch.manual_seed(0)
    model = HeadCLIP(clip, reference_config(clip, **layer_options(setting))).to(device).eval()
    samples = load_split(RunConfig(profile="smoke"), "synth-aux")
    samples = (samples * (n_images // len(samples) + 1))[:n_images]
    row: dict[str, object] = {"backbone": label, "lhw_layers": setting, "first weighted": model.first_weighted_layer,
                              "device": device}
    images = torch.randn(batch, 3, model.image_size, model.image_size, device=device)
    model.predict(images, ["object"] * batch)  # warm-up, text features cached
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        model.predict(images, ["object"] * batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    row["predict img/s"] = batch / best
    config = TrainConfig(epochs=epochs, batch_size=batch, seed=111)
    row["epoch s (no cache)"] = min(r["seconds"] for r in fit(model, samples, config, use_cache=False,
                                                              device=device).log)
    with tempfile.TemporaryDirectory(prefix="zsad-bench-cache-") as cache_root:
        started = time.perf_counter()
        rows = cached_rows(model, samples, name="headclip", cache_root=cache_root, batch_size=batch, device=device)
        row["cache build s"] = time.perf_counter() - started
        row["epoch s (cache)"] = min(r["seconds"] for r in fit(model, samples, config, cache_root=cache_root,
                                                               device=device).log)
        row["cache MiB"] = sum(path.stat().st_size for path in rows.directory.glob("*.npy")) / 2**20
    row["speed-up"] = row["epoch s (no cache)"] / row["epoch s (cache)"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="zsad-tiny:112,ViT-B-16:224", help="comma-separated NAME:SIZE")
    parser.add_argument("--layers", default="all,last:1", help="comma-separated head-weight layer settings")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=32, help="training images per epoch")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per mode (the fastest is reported)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    rows = []
    for item in args.models.split(","):
        name, size = item.rsplit(":", 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clip = load_clip(name, None, image_size=int(size), device=args.device)
        for setting in args.layers.split(","):
            rows.append(bench(clip, item, setting, args.device, args.images, args.batch, args.epochs, args.repeats))
            print("  ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                            for key, value in rows[-1].items()), flush=True)
    try:
        import pandas as pd

        print(pd.DataFrame(rows).round(3).to_string(index=False))
    except ImportError:
        pass


if __name__ == "__main__":
    main()
