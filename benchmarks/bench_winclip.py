"""WinCLIP segmentation speed: all windows in batched passes vs one forward pass per window, same machine.

    python benchmarks/bench_winclip.py                        # paper geometry: ViT-B-16-plus-240 at 240 px
    python benchmarks/bench_winclip.py --backbone ViT-L-14-336 --image-size 518 --device cuda
    python benchmarks/bench_winclip.py --backbone zsad-tiny --image-size 112   # seconds, for a quick look

Weights are random (timing depends on the architecture only). Both paths compute the same window embeddings
(checked here to 1e-4); the per-window path is what a naive port does (one ViT call per window of each image).
Prints the time per image of each path and the speed-up; the target is ≥ 5×. The default batch of one image is
how the references test (and how AnomalyCLIP's Table 8 counts frames per second).
"""

from __future__ import annotations

import argparse
import time

import torch

from zsadkit.methods.winclip import WinClip, WinClipConfig, window_count
from zsadkit.models import load_clip
from zsadkit.models.runtime import synchronize


@torch.no_grad()
def time_call(function, device: torch.device, repeats: int) -> float:
    """Best wall-clock seconds of `repeats` calls, after one warm-up call."""
    function()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="ViT-B-16-plus-240")
    parser.add_argument("--image-size", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    clip = load_clip(args.backbone, image_size=args.image_size, device=device)
    winclip = WinClip(clip, WinClipConfig())
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    grid = winclip.grid
    print(f"{args.backbone} at {args.image_size} px: {grid}×{grid} patches, "
          f"{window_count(grid, winclip.config.scales)} windows per image (scales {winclip.config.scales}), "
          f"batch {args.batch_size}, device {device}, torch threads {torch.get_num_threads()}")

    def batched() -> list[torch.Tensor]:
        return winclip.encode(images).window_embeddings

    def one_per_window() -> list[torch.Tensor]:
        return [torch.cat([torch.cat([winclip.visual.encode_windows(image[None], window[None]) for window in windows],
                                     dim=1) for image in images]) for windows in winclip.windows]

    with torch.no_grad():
        for fast, slow in zip(batched(), one_per_window(), strict=True):
            difference = float((fast - slow).abs().max())
            if difference > 1e-4:
                raise AssertionError(f"batched and per-window embeddings differ by {difference}")
    batched_seconds = time_call(batched, device, args.repeats)
    per_window_seconds = time_call(one_per_window, device, args.repeats)
    per_image = args.batch_size
    print(f"batched windows (WinClip.encode):     {batched_seconds / per_image * 1e3:9.1f} ms per image")
    print(f"one forward pass per window:          {per_window_seconds / per_image * 1e3:9.1f} ms per image")
    print(f"speed-up: {per_window_seconds / batched_seconds:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
