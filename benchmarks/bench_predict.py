"""`zsadkit.predict.predict` against `zsadkit.engine.predict` on the same images and model.

Usage:
    python benchmarks/bench_predict.py                                       # clip, zsad-tiny @112, synth-target
    python benchmarks/bench_predict.py --method vand --backbone ViT-B-16 --image-size 224 --device cuda

Random weights (no download); the images are the synthetic target classes (`synth-target`, generated on first use).
Prints the seconds of each path (best of `--repeats`, model built outside the timing) and images/s:

* `engine.predict`: the evaluation loop, scores and maps kept on the CPU, nothing written;
* `predict maps=none`: the same batches plus scores.csv (target: no slower than the engine, within noise);
* `predict maps=raw` and `maps=both`: plus the float16 .npy maps, and the PNG overlays (an image read and a PNG
  encoded per image).

On a shared CPU, set OMP_NUM_THREADS to the cores you own: contention makes timings erratic.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from unittest import mock

from zsadkit import engine
from zsadkit import predict as predict_module
from zsadkit.data.records import Sample
from zsadkit.experiment import RunConfig, load_split
from zsadkit.methods import build_method


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="clip")
    parser.add_argument("--backbone", default="zsad-tiny")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    images = [s.image for s in load_split(RunConfig(), "synth-target")]
    settings = dict(backbone=args.backbone, pretrained="", image_size=args.image_size, device=args.device)
    detector = build_method(args.method, **settings)
    samples = [Sample(path, None, 0, "object", "", "bench", "test") for path in images]

    def run_engine() -> None:
        for _ in engine.predict(detector, samples, image_size=args.image_size, batch_size=args.batch_size,
                                device=args.device, progress=False):
            pass

    def run_predict(maps: str) -> None:
        with tempfile.TemporaryDirectory() as out, mock.patch.object(predict_module, "build_method",
                                                                     return_value=detector):
            predict_module.predict(images, method=args.method, out=Path(out), maps=maps, batch_size=args.batch_size,
                                   progress=False, **settings)

    print(f"{args.method} on {args.backbone} @{args.image_size}, {len(images)} images, batch {args.batch_size}, "
          f"{args.device}")
    for name, run in [("engine.predict", run_engine), *((f"predict maps={m}", lambda m=m: run_predict(m))
                                                        for m in ("none", "raw", "both"))]:
        seconds = best_of(args.repeats, run)
        print(f"{name:<20} {seconds:7.2f} s  {len(images) / seconds:7.1f} images/s")


if __name__ == "__main__":
    main()
