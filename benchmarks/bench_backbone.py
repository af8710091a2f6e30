"""Timing of the backbone wrappers against open_clip's own forward (random weights; prints a table).

Usage:
    python benchmarks/bench_backbone.py                       # zsad-tiny @112 and ViT-B-16 @224, CPU
    python benchmarks/bench_backbone.py --model ViT-L-14-336 --image-size 518 --batch 1 --device cuda

On a shared CPU, set OMP_NUM_THREADS=1: thread contention otherwise makes timings erratic.

Rows: open_clip ``encode_image``; `VisualEncoder` plain; DPAM dual path (AnomalyCLIP layout, V-V from layer
L−DPAM_layer+2 with DPAM_layer = 0.8·L); WinCLIP 2×2 windows (all positions, one batched pass); text encoding of 80
prompts (open_clip ``encode_text`` vs `TextEncoder.encode_tokens`).
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch

from zsadkit.models import AttentionVariant, TextEncoder, VisualEncoder, load_clip, sliding_windows, tokenize


def _time(function: Callable[[], object], repeats: int, device: str) -> float:
    """Best of ``repeats`` runs (seconds): robust to other processes sharing the CPU."""
    function()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def bench(model: str, image_size: int, batch: int, repeats: int, device: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "randomly initialised" is intended here
        clip = load_clip(model, image_size=image_size, device=device)
    visual, text = VisualEncoder(clip), TextEncoder(clip)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    layers = visual.num_layers
    dpam = AttentionVariant.from_dpam_layer(max(2, round(0.8 * layers)), layers)
    taps = sorted({layers // 4, layers // 2, 3 * layers // 4, layers} - {0})
    windows = sliding_windows(visual.grid_size, 2)
    tokens = tokenize([f"a photo of a number {i} object." for i in range(80)]).to(device)
    rows = {
        "open_clip encode_image": lambda: clip.encode_image(images),
        f"VisualEncoder plain, taps {taps}": lambda: visual(images, taps),
        f"VisualEncoder DPAM from layer {dpam.first_layer}, taps {taps}": lambda: visual(
            images, taps, global_ln_post=False, attention=dpam
        ),
        f"encode_windows 2x2 ({windows.shape[0]} windows)": lambda: visual.encode_windows(images, windows),
        "open_clip encode_text (80 prompts)": lambda: clip.encode_text(tokens),
        "TextEncoder.encode_tokens (80 prompts)": lambda: text.encode_tokens(tokens),
    }
    print(f"\n{model} @ {image_size}, batch {batch}, device {device}, threads {torch.get_num_threads()}")
    with torch.no_grad():
        for name, function in rows.items():
            seconds = _time(function, repeats, device)
            print(f"  {name:<60s} {seconds * 1000:9.1f} ms (best of {repeats})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="open_clip config name (repeatable)")
    parser.add_argument("--image-size", type=int, action="append", help="input side, one per --model")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    models = args.model or ["zsad-tiny", "ViT-B-16"]
    sizes = args.image_size or ([112, 224] if args.model is None else [224] * len(models))
    if len(sizes) != len(models):
        parser.error("give one --image-size per --model")
    for model, size in zip(models, sizes, strict=True):
        bench(model, size, args.batch, args.repeats, args.device)


if __name__ == "__main__":
    main()
