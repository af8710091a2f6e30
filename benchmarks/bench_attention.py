"""One residual attention block at ViT-L width: open_clip's forward against the kit's (`block_forward`), batch 1 and 4.

Usage:
    python benchmarks/bench_attention.py                      # ViT-L-14-336 at 518 px: 1370 tokens, width 1024
    python benchmarks/bench_attention.py --tokens 197 --width 768 --heads 12 --batches 1 8

Why batch 4 was slower per image than batch 1 at ViT-L-14-336@518 on CPU (issue 16): under `torch.no_grad` /
`inference_mode` open_clip's `nn.MultiheadAttention` takes PyTorch's fast path (`_native_multi_head_attention`),
which on CPU computes softmax(q kᵀ) with `bmm` and materialises the (B·H, N, N) float32 weights: 120 MB per image
and block at N = 1370, H = 16, so 480 MB at batch 4, far beyond the caches, and the block becomes memory-bound.
`zsadkit.models.attention.block_forward` runs the same block through `scaled_dot_product_attention`, whose CPU
kernel tiles the softmax and never holds the N × N matrix. Prints ms per image (best and median of
`--repeats`, runs alternated) for: open_clip's block, the kit's SDPA block, the kit's explicit block (the
formula written out, as the references' attention code computes it), and the largest |Δ| between them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from open_clip.transformer import ResidualAttentionBlock

from zsadkit.models.attention import block_forward
from zsadkit.models.runtime import explicit_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1370)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    block = ResidualAttentionBlock(args.width, args.heads, batch_first=True).eval()

    def explicit(tokens: torch.Tensor) -> torch.Tensor:
        with explicit_attention():
            return block_forward(block, tokens)

    paths = {"open_clip": block, "sdpa": lambda tokens: block_forward(block, tokens), "explicit": explicit}
    print(f"# one block, width {args.width}, {args.heads} heads, {args.tokens} tokens, {torch.get_num_threads()} "
          f"threads; ms per image, best/median of {args.repeats}")
    with torch.inference_mode():
        for batch in args.batches:
            tokens = torch.randn(batch, args.tokens, args.width)
            outputs = {name: path(tokens) for name, path in paths.items()}  # warm-up
            seconds: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(args.repeats):
                for name, path in paths.items():
                    start = time.perf_counter()
                    path(tokens)
                    seconds[name].append((time.perf_counter() - start) / batch)
            row = "  ".join(f"{name}={1000 * min(times):6.0f}/{1000 * statistics.median(times):<6.0f}"
                            for name, times in seconds.items())
            difference = max(float((outputs[name] - outputs["open_clip"]).abs().max()) for name in ("sdpa", "explicit"))
            print(f"batch {batch:<3} {row}  max|Δ|={difference:.1e}", flush=True)


if __name__ == "__main__":
    main()
