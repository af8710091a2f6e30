"""InCTRL cost: prediction with cached vs per-sample text encoding, training epochs with and without the
image-feature cache, the vectorised patch residual against the reference's per-patch loop, peak memory.

Usage:
    python benchmarks/bench_inctrl.py                                  # zsad-tiny @112, ViT-B-16-plus-240 @240 (CPU)
    python benchmarks/bench_inctrl.py --models ViT-B-16-plus-240:240 --device cuda --steps 20

Random weights (no download); the training data are the synthetic auxiliary classes (`synth-aux`, generated on
first use). For every backbone it prints:

* images/s of `InCTRL.predict` (K fitted prompts, batches of `--batch`) with the text embeddings cached per class
  (default) and re-encoded for every sample as the reference does (`cache_text_features=False`), and the ratio;
* seconds per training epoch of `--steps` steps of 8 + 8 episodes with K prompts: without the cache (every step
  reads the PNGs and runs the frozen image tower on 16·(1 + K) images, as the reference) and with the
  memory-mapped feature cache (adapter and heads only), the one-time cache build and the ratio;
* milliseconds of the multi-layer patch residual of one batch: vectorised (`patch_residuals`) vs the reference's
  loop over query patches (model.py:534-553), and the ratio;
* peak memory per phase: the process's RSS high-water mark, reset between phases (CPU, Linux), or
  `torch.cuda.max_memory_allocated` (GPU).

On a shared CPU, set OMP_NUM_THREADS to the cores you own: contention makes timings erratic.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from dataclasses import replace

import torch

from zsadkit.experiment import RunConfig, load_split
from zsadkit.feature_cache import cached_rows
from zsadkit.methods.inctrl import InCTRL, patch_residuals, reference_config
from zsadkit.models import load_clip
from zsadkit.models.runtime import peak_memory_mib, reset_peak_memory, synchronize
from zsadkit.recipes.inctrl import InCTRLTrainingConfig, auxiliary_samples, fit


def timed(device: str, function, repeats: int) -> float:
    """Best wall time of `repeats` calls (after one warm-up call)."""
    function()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        function()
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


def reference_loop_residuals(query_tokens: torch.Tensor, prompt_pools: torch.Tensor) -> torch.Tensor:
    """The reference's loop: per sample, layer and query patch, normalise the pool again and take the minimum."""
    maps = []
    for sample_query, sample_pool in zip(query_tokens, prompt_pools, strict=True):
        layers = []
        for layer_query, layer_pool in zip(sample_query, sample_pool, strict=True):
            patches = []
            for token in layer_query:
                pool = layer_pool / layer_pool.norm(dim=-1, keepdim=True)
                token = token[None] / token.norm()
                patches.append((0.5 * (1 - token @ pool.T)).min(dim=1).values)
            layers.append(torch.cat(patches))
        maps.append(torch.stack(layers))
    return torch.stack(maps)


@torch.no_grad()
def bench_predict(model: InCTRL, device: str, batch: int, shots: int, repeats: int, row: dict) -> None:
    size = model.image_size
    model.fit_references(torch.randn(shots, 3, size, size, device=device))
    images = torch.randn(batch, 3, size, size, device=device)
    names = [f"class {i % 4}" for i in range(batch)]
    reset_peak_memory(device)
    row["predict img/s (text cached)"] = batch / timed(device, lambda: model.predict(images, names), repeats)
    row["predict peak MiB"] = peak_memory_mib(device)
    model.config = replace(model.config, cache_text_features=False)
    row["predict img/s (text per sample)"] = batch / timed(device, lambda: model.predict(images, names), 1)
    model.config = replace(model.config, cache_text_features=True)
    row["text cache speed-up"] = row["predict img/s (text cached)"] / row["predict img/s (text per sample)"]
    features = model.encode_image(images)
    memory = model.memory.patch_tokens  # (K, L, N, W): each query's pool is (L, K·N, W)
    pools = memory.transpose(0, 1).reshape(1, memory.shape[1], -1, memory.shape[-1]).expand(batch, -1, -1, -1)
    row["patch residual ms (vectorised)"] = 1e3 * timed(
        device, lambda: patch_residuals(features.patch_tokens, pools), repeats)
    row["patch residual ms (reference loop)"] = 1e3 * timed(
        device, lambda: reference_loop_residuals(features.patch_tokens, pools), 1)
    row["residual speed-up"] = row["patch residual ms (reference loop)"] / row["patch residual ms (vectorised)"]


def bench(backbone: str, image_size: int, device: str, steps: int, shots: int, batch: int, repeats: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip(backbone, None, image_size=image_size, device=device)
    torch.manual_seed(0)
    model = InCTRL(clip, reference_config(clip)).to(device).eval()
    row: dict[str, object] = {"backbone": f"{backbone}@{image_size}", "device": device, "K": shots}
    bench_predict(model, device, batch, shots, repeats, row)

    cfg = RunConfig(profile="smoke")
    samples = auxiliary_samples(lambda dataset, split: load_split(cfg, dataset, split), "synth-aux")
    config = InCTRLTrainingConfig(shots=shots, epochs=1, steps_per_epoch=steps, select_epoch=None)
    reset_peak_memory(device)
    no_cache = fit(model, samples, config, use_cache=False, resize="squash", device=device)
    row["epoch s (no cache)"] = no_cache.log[-1]["seconds"]
    row["train peak MiB (no cache)"] = peak_memory_mib(device)
    with tempfile.TemporaryDirectory(prefix="zsad-bench-inctrl-") as cache_root:
        reset_peak_memory(device)
        started = time.perf_counter()
        rows = cached_rows(model, samples, name="inctrl", cache_root=cache_root, batch_size=16, device=device)
        row["cache build s"] = time.perf_counter() - started
        cached = fit(model, samples, config, use_cache=True, cache_root=cache_root, resize="squash", device=device)
        row["epoch s (cache)"] = cached.log[-1]["seconds"]
        row["train peak MiB (cache)"] = peak_memory_mib(device)
        row["cache MiB"] = sum(path.stat().st_size for path in rows.directory.glob("*.npy")) / 2**20
    row["epoch speed-up"] = row["epoch s (no cache)"] / row["epoch s (cache)"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="zsad-tiny:112,ViT-B-16-plus-240:240", help="comma-separated NAME:SIZE")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="training steps (8 + 8 episodes) per timed epoch")
    parser.add_argument("--shots", type=int, default=2, help="K")
    parser.add_argument("--batch", type=int, default=8, help="prediction batch")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    rows = []
    for item in args.models.split(","):
        name, size = item.rsplit(":", 1)
        rows.append(bench(name, int(size), args.device, args.steps, args.shots, args.batch, args.repeats))
        print("  ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                        for key, value in rows[-1].items()), flush=True)
    try:
        import pandas as pd

        print(pd.DataFrame(rows).round(3).T.to_string(header=False))
    except ImportError:
        pass


if __name__ == "__main__":
    main()
