"""Benchmark of zsadkit.metrics: AU-PRO speed against the reference algorithm, and Evaluator peak memory.

Prints, on 100 maps of 518x518 with realistic blobs (one class, as AnomalyCLIP evaluates it):
* the time and value of `aupro` (exact, official MVTec AD), `aupro_cflow200`, and a straightforward
  re-implementation of the reference `cal_pro_score` (relabel every mask at each of ~200 thresholds);
* the time of pixel AUROC, ours against scikit-learn's `roc_auc_score`;
then, in a child process, the peak resident memory of an `Evaluator` fed an MVTec-AD-sized test set
(1725 maps of 518x518 in the 15 MVTec classes, batches of 8, pro="both").

Targets (issue 3): cflow200 >= 10x faster than the reference with the same value, exact >= 20x faster,
Evaluator peak < 1.5 GB.

Usage:
    python benchmarks/bench_metrics.py [--n-maps 100] [--size 518] [--skip-reference] [--skip-memory]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, roc_auc_score

from zsadkit.metrics import Evaluator, aupro, aupro_cflow200, pixel_auroc

# MVTec AD test-set images per class (1725 in total) and, of those, the anomalous ones.
MVTEC_TEST_COUNTS = {
    "bottle": (83, 63), "cable": (150, 92), "capsule": (132, 109), "carpet": (117, 89), "grid": (78, 57),
    "hazelnut": (110, 70), "leather": (124, 92), "metal_nut": (115, 93), "pill": (167, 141),
    "screw": (160, 119), "tile": (117, 84), "toothbrush": (42, 30), "transistor": (100, 40),
    "wood": (79, 60), "zipper": (151, 119),
}  # fmt: skip
PATCH_GRID = 37  # a ViT-L/14 at 518 px sees a 37x37 patch grid


def synthetic_sample(rng: np.random.Generator, size: int, anomalous: bool) -> tuple[np.ndarray, np.ndarray]:
    """A mask with 1-3 elliptic blobs (0.2-4 % of the image each) and a CLIP-like map.

    The map is patch-level noise upsampled to `size`, plus a blurred, partly detected copy of the mask,
    smoothed with a Gaussian of sigma 4 like AnomalyCLIP's maps; values lie roughly in [1, 3].
    """
    rows, cols = np.mgrid[0:size, 0:size]
    mask = np.zeros((size, size), dtype=bool)
    if anomalous:
        for _ in range(rng.integers(1, 4)):
            centre = rng.uniform(0.15, 0.85, size=2) * size
            radii = np.sqrt(rng.uniform(0.002, 0.04) * size * size / np.pi) * rng.uniform(0.6, 1.6, size=2)
            mask |= ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1
    patch_noise = rng.normal(size=(PATCH_GRID, PATCH_GRID))
    noise = ndimage.zoom(patch_noise, size / PATCH_GRID, order=1)[:size, :size]
    signal = ndimage.gaussian_filter(mask.astype(np.float32), sigma=8) * rng.uniform(0.3, 1.5)
    anomaly_map = ndimage.gaussian_filter(2.0 + 0.5 * noise + signal, sigma=4).astype(np.float32)
    return mask, anomaly_map


def synthetic_class(rng: np.random.Generator, n_maps: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    samples = [synthetic_sample(rng, size, anomalous=index % 4 != 0) for index in range(n_maps)]
    return np.stack([mask for mask, _ in samples]), np.stack([anomaly_map for _, anomaly_map in samples])


def reference_cal_pro_score(masks: np.ndarray, amaps: np.ndarray) -> float:
    """The reference algorithm written out (AnomalyCLIP `metrics.py`, from cflow-ad), scipy for skimage.

    At each threshold every mask is labelled again (8-connectivity, skimage's default) and every region's
    overlap is counted over its bounding box, as `regionprops` does. Masks are float32 as test.py gives them.
    """
    masks = masks.astype(np.float32)
    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    pros, fprs = [], []
    for th in np.arange(min_th, max_th, (max_th - min_th) / 200):
        binary_amaps[amaps <= th], binary_amaps[amaps > th] = 0, 1
        overlaps = []
        for binary_amap, mask in zip(binary_amaps, masks, strict=True):
            labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
            for region_index, box in enumerate(ndimage.find_objects(labels), start=1):
                region = labels[box] == region_index
                overlaps.append(binary_amap[box][region].sum() / region.sum())
        inverse_masks = 1 - masks
        fprs.append(np.logical_and(inverse_masks, binary_amaps).sum() / inverse_masks.sum())
        pros.append(np.array(overlaps).mean())
    pros, fprs = np.array(pros), np.array(fprs)
    kept = fprs < 0.3
    fprs = fprs[kept]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return auc(fprs, pros[kept])


def timed(function: Callable[[], float], repeats: int = 1) -> tuple[float, float]:
    """(value, best wall time in seconds over `repeats` runs)."""
    best, value = float("inf"), float("nan")
    for _ in range(repeats):
        start = time.perf_counter()
        value = function()
        best = min(best, time.perf_counter() - start)
    return value, best


def bench_speed(n_maps: int, size: int, with_reference: bool) -> None:
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    masks, maps = synthetic_class(rng, n_maps, size)
    n_regions = sum(ndimage.label(mask, structure=np.ones((3, 3)))[1] for mask in masks)
    print(
        f"data: {n_maps} maps of {size}x{size} ({masks.size / 1e6:.1f} M pixels, {masks.mean():.2%} anomalous, "
        f"{n_regions} regions), generated in {time.perf_counter() - start:.1f} s"
    )
    exact, exact_time = timed(lambda: aupro(masks, maps), repeats=3)
    cflow, cflow_time = timed(lambda: aupro_cflow200(masks, maps), repeats=3)
    print(f"aupro (exact, MVTec AD)       {exact_time:8.2f} s   value {exact:.12f}")
    print(f"aupro_cflow200                {cflow_time:8.2f} s   value {cflow:.12f}")
    if with_reference:
        reference, reference_time = timed(lambda: reference_cal_pro_score(masks, maps))
        print(f"reference cal_pro_score       {reference_time:8.2f} s   value {reference:.12f}")
        print(
            f"  cflow200 vs reference: {reference_time / cflow_time:.1f}x faster, |diff| = {abs(cflow - reference):.1e}"
        )
        print(f"  exact vs reference:    {reference_time / exact_time:.1f}x faster")
    ours, ours_time = timed(lambda: pixel_auroc(masks, maps), repeats=3)
    sklearn_value, sklearn_time = timed(lambda: roc_auc_score(masks.ravel(), maps.ravel()))
    print(f"pixel_auroc                   {ours_time:8.2f} s   value {ours:.12f}")
    print(f"sklearn roc_auc_score         {sklearn_time:8.2f} s   value {sklearn_value:.12f}")


def mvtec_sized_batches(
    size: int, batch_size: int
) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Batches (class_names, labels, scores, masks, maps) of a synthetic MVTec-AD-sized test set."""
    rng = np.random.default_rng(1)
    for class_name, (n_images, n_anomalous) in MVTEC_TEST_COUNTS.items():
        labels = np.r_[np.zeros(n_images - n_anomalous, dtype=int), np.ones(n_anomalous, dtype=int)]
        for start in range(0, n_images, batch_size):
            batch_labels = labels[start : start + batch_size]
            samples = [synthetic_sample(rng, size, bool(label)) for label in batch_labels]
            masks = np.stack([mask for mask, _ in samples])
            maps = np.stack([anomaly_map for _, anomaly_map in samples])
            scores = maps.reshape(len(maps), -1).max(axis=1)
            yield [class_name] * len(batch_labels), batch_labels, scores, masks, maps


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM; ru_maxrss would include the parent's peak after exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # macOS: bytes


def bench_evaluator_memory(size: int) -> None:
    """Runs in a child process so that ru_maxrss is the Evaluator's run alone."""
    baseline = peak_rss_mb()
    evaluator = Evaluator(dataset="mvtec-sized", pro="both")
    start = time.perf_counter()
    generate = 0.0
    batches = mvtec_sized_batches(size, batch_size=8)
    while True:
        generate_start = time.perf_counter()
        batch = next(batches, None)
        generate += time.perf_counter() - generate_start
        if batch is None:
            break
        class_names, labels, scores, masks, maps = batch
        evaluator.update(class_names, labels, scores, masks=masks, maps=maps)
    update_done = time.perf_counter()
    rows = evaluator.compute()
    end = time.perf_counter()
    n_maps = sum(n for n, _ in MVTEC_TEST_COUNTS.values())
    print(
        f"Evaluator on {n_maps} maps of {size}x{size}, {len(MVTEC_TEST_COUNTS)} classes, pro='both': "
        f"peak RSS {peak_rss_mb():.0f} MB (interpreter and imports alone: {baseline:.0f} MB)"
    )
    print(
        f"  time: updates {update_done - start - generate:.1f} s, compute {end - update_done:.1f} s "
        f"({(end - update_done) / len(MVTEC_TEST_COUNTS):.1f} s per class; data generation {generate:.1f} s excluded)"
    )
    means = rows[rows.class_name == "mean"].set_index(["level", "metric"]).value
    print(
        "  dataset means: "
        + ", ".join(f"{level} {metric} {value:.4f}" for (level, metric), value in means.items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-maps", type=int, default=100)
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--skip-reference", action="store_true", help="do not time the slow reference")
    parser.add_argument("--skip-memory", action="store_true", help="do not run the MVTec-sized Evaluator")
    parser.add_argument("--evaluator-memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.evaluator_memory_only:
        bench_evaluator_memory(args.size)
        return
    bench_speed(args.n_maps, args.size, with_reference=not args.skip_reference)
    if not args.skip_memory:
        subprocess.run(
            [sys.executable, __file__, "--evaluator-memory-only", "--size", str(args.size)], check=True
        )


if __name__ == "__main__":
    main()
