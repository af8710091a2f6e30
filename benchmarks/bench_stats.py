"""Benchmark of zsadkit.stats: bootstrap time on an MVTec AD-sized run.

Prints, for 1000 resamples (`--resamples`) of a synthetic run with the 15 MVTec AD test-set class sizes (1725
images, 1258 anomalous):
* image level: each of AUROC, AP, F1-max alone and all three together (target, issue 14: all three under
  10 s on the project's 2-core machine), and a paired comparison of two methods (both bootstraps and
  `paired_difference`);
* pixel level, on small maps (`--pixel-size`, default 32x32): pixel AUROC and AUPIMO over the same 1725 maps;
* optionally (`--large-class`), the cost of one pixel-AUROC resample of one class of 115 maps of 518x518, to
  extrapolate to full-size runs.

Usage:
    python benchmarks/bench_stats.py [--resamples 1000] [--pixel-size 32] [--large-class]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
from bench_metrics import MVTEC_TEST_COUNTS, synthetic_class

from zsadkit import stats
from zsadkit.metrics import ClassSamples


def image_run(seed: int, shift: float) -> list[ClassSamples]:
    """Scores of one method: normal ~ N(0, 1), anomalous ~ N(shift, 1), in float32 like a model's output."""
    rng = np.random.default_rng(seed)
    run = []
    for class_name, (n_images, n_anomalous) in MVTEC_TEST_COUNTS.items():
        labels = np.arange(n_images) >= n_images - n_anomalous
        scores = (rng.normal(size=n_images) + shift * labels).astype(np.float32)
        ids = np.array([f"{class_name}/{index:03d}.png" for index in range(n_images)])
        run.append(ClassSamples("mvtec-sized", class_name, ids, labels, scores))
    return run


def pixel_run(size: int) -> list[ClassSamples]:
    """Maps of `size` x `size` for the MVTec AD class sizes (bench_metrics' blobs and CLIP-like noise)."""
    rng = np.random.default_rng(0)
    run = []
    for class_name, (n_images, _) in MVTEC_TEST_COUNTS.items():
        masks, maps = synthetic_class(rng, n_images, size)  # every 4th map normal, the rest anomalous
        labels = masks.any(axis=(1, 2))
        scores = maps.max(axis=(1, 2))
        ids = np.array([f"{class_name}/{index:03d}.png" for index in range(n_images)])
        run.append(ClassSamples("mvtec-sized", class_name, ids, labels, scores, masks, maps))
    return run


def timed(label: str, function: Callable[[], object]) -> object:
    start = time.perf_counter()
    result = function()
    print(f"  {label:<52} {time.perf_counter() - start:7.2f} s")
    return result


def bootstrap_run(run: list[ClassSamples], config: stats.BootstrapConfig) -> list[stats.ClassBootstrap]:
    return [stats.bootstrap_class(samples, config) for samples in run]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--pixel-size", type=int, default=32)
    parser.add_argument("--large-class", action="store_true", help="time one resample of 115 maps of 518x518")
    args = parser.parse_args()
    n_images = sum(n for n, _ in MVTEC_TEST_COUNTS.values())
    n_anomalous = sum(a for _, a in MVTEC_TEST_COUNTS.values())
    print(
        f"image level: {len(MVTEC_TEST_COUNTS)} classes, {n_images} images ({n_anomalous} anomalous), "
        f"{args.resamples} resamples per class"
    )
    method_a, method_b = image_run(0, shift=1.5), image_run(1, shift=1.3)
    for metric in stats.IMAGE_METRICS:
        config = stats.BootstrapConfig(n_resamples=args.resamples, levels=("image",), metrics=(metric,))
        timed(f"image {metric}", lambda config=config: bootstrap_run(method_a, config))
    config = stats.BootstrapConfig(n_resamples=args.resamples, levels=("image",))
    boot_a = timed("image auroc + ap + f1_max (target < 10 s)", lambda: bootstrap_run(method_a, config))
    rows = timed("  + bootstrap_rows (intervals, mean rows)", lambda: stats.bootstrap_rows(boot_a))
    means = rows[rows.class_name == "mean"].set_index("metric")
    for metric, row in means.iterrows():
        print(f"    mean {metric:<7} {row.value:.4f}  [{row.ci_low:.4f}, {row.ci_high:.4f}]")

    def paired() -> object:
        return stats.paired_difference(bootstrap_run(method_a, config), bootstrap_run(method_b, config))

    difference = timed("paired comparison (two bootstraps + differences)", paired)
    row = difference[(difference.class_name == "mean") & (difference.metric == "auroc")].iloc[0]
    print(f"    mean auroc a - b {row.difference:+.4f}  [{row.ci_low:+.4f}, {row.ci_high:+.4f}]")

    size = args.pixel_size
    start = time.perf_counter()
    maps_run = pixel_run(size)
    print(
        f"pixel level: the same class sizes, maps of {size}x{size} ({n_images * size * size / 1e6:.1f} M pixels; "
        f"generated in {time.perf_counter() - start:.1f} s), {args.resamples} resamples per class"
    )
    for metric, extra in [("auroc", {}), ("aupimo", {"aupimo": True, "aupimo_fpr_bounds": (1e-3, 1e-2)})]:
        config = stats.BootstrapConfig(
            n_resamples=args.resamples, levels=("pixel",), metrics=(metric,), **extra
        )
        boot = timed(f"pixel {metric}", lambda config=config: bootstrap_run(maps_run, config))
        mean = stats.bootstrap_rows(boot).query("class_name == 'mean'").iloc[0]
        print(f"    mean {metric} {mean.value:.4f}  [{mean.ci_low:.4f}, {mean.ci_high:.4f}]")

    if args.large_class:
        rng = np.random.default_rng(1)
        masks, maps = synthetic_class(rng, 115, 518)
        samples = ClassSamples(
            "large", "one", np.array([f"{i}" for i in range(115)]), masks.any(axis=(1, 2)), maps.max(axis=(1, 2)),
            masks, maps,
        )  # fmt: skip
        seconds = {}
        for resamples in (1, 6):
            config = stats.BootstrapConfig(n_resamples=resamples, levels=("pixel",), metrics=("auroc",))
            start = time.perf_counter()
            stats.bootstrap_class(samples, config)
            seconds[resamples] = time.perf_counter() - start
        print(
            f"pixel auroc, one class of 115 maps of 518x518: {seconds[1]:.1f} s with 1 resample (sorting once), "
            f"{(seconds[6] - seconds[1]) / 5:.2f} s per further resample"
        )


if __name__ == "__main__":
    main()
