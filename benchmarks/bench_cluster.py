"""Benchmark of `zsadkit.grid.run_grid` on a local Dask cluster: speed-up from 1 to 2 workers, overhead per task.

Prints:
* the wall time of a 12-cell smoke grid (each cell: AnomalyCLIP on the random `zsad-tiny` CLIP, a prompt
  configuration of Fig. 8, `--repeats` forward passes over a batch of 8 synthetic 112 px images; CPU-bound and
  single-threaded, `threads=1`) serially, on 1 worker and on 2 workers, and the speed-up 1 -> 2 workers (target,
  issue 15: >= 1.6x on the project's 2-core machine);
* the scheduling overhead per task: `--tasks` cells that do nothing, on 2 workers, against the same grid run
  serially (which costs only the store), per task;
* the load average before and after each measurement, how many cores the cells got (their CPU seconds over the
  wall time), and first how many cores 1 and 2 spinning processes get: other sessions share the CPU, and a
  speed-up needs two free cores.

Cluster start-up (about 3 s) is timed apart; every measured grid writes to a fresh store, so every cell computes.

Usage:
    python benchmarks/bench_cluster.py [--repeats 40] [--tasks 200]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from zsadkit.grid import local_cluster, run_grid
from zsadkit.methods import build_method
from zsadkit.models import load_clip

CELLS = [{"n_ctx": n_ctx, "deep_length": length} for n_ctx in (4, 8, 12, 16) for length in (1, 2, 4)]  # 12 cells


def forward_passes(cell: dict, clip: torch.nn.Module, repeats: int) -> tuple[float, float]:
    """AnomalyCLIP with the cell's prompt configuration: `repeats` forward passes over 8 images. Returns a checksum
    of the scores and the CPU seconds the cell used."""
    start = time.process_time()
    model = build_method("anomalyclip", clip=clip, image_size=112, **cell)
    images = torch.randn(8, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    total = 0.0
    with torch.no_grad():
        for _ in range(repeats):
            total += float(model.predict(images, ["object"] * len(images)).image_scores.sum())
    return total, time.process_time() - start


def busy(seconds: float, cpu: Any) -> None:
    """Spin for `seconds`; add the CPU seconds this process got to `cpu`."""
    start, cpu_start = time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        pass
    with cpu.get_lock():
        cpu.value += time.process_time() - cpu_start


def available_cores(processes: int, seconds: float = 2.0) -> float:
    """How many cores `processes` spinning processes get right now (other sessions share the CPU)."""
    cpu = multiprocessing.Value("d", 0.0)
    workers = [multiprocessing.Process(target=busy, args=(seconds, cpu)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return cpu.value / seconds


def nothing(cell: dict) -> int:
    return cell["index"]


def load() -> str:
    return "load average " + " ".join(f"{value:.1f}" for value in os.getloadavg())


def timed_grid(label: str, function, cells: list[dict], **options) -> tuple[float, list]:
    """Wall time and results of a grid on a fresh store; prints them, the CPU the cells got and the load."""
    with tempfile.TemporaryDirectory() as store:
        before = load()
        start = time.perf_counter()
        results = run_grid(function, cells, store=Path(store), progress=False, **options)
        seconds = time.perf_counter() - start
    used = ""
    if results and isinstance(results[0], tuple):  # (checksum, CPU seconds): how many cores the cells got
        used = f"  cells got {sum(cpu for _, cpu in results) / seconds:.2f} cores"
    print(f"  {label:<34} {seconds:8.2f} s{used}   ({before} -> {load()})", flush=True)
    return seconds, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=40, help="forward passes per cell")
    parser.add_argument("--tasks", type=int, default=200, help="no-op cells for the overhead per task")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {load()}; spinning processes get "
          f"{available_cores(1):.2f} cores (1 process), {available_cores(2):.2f} cores (2 processes)")
    clip = load_clip("zsad-tiny", image_size=112)
    grid = {"shared": {"clip": clip, "repeats": args.repeats}, "threads": 1}
    print(f"12-cell smoke grid ({args.repeats} forward passes of AnomalyCLIP/zsad-tiny per cell, 1 thread each):")
    serial, reference = timed_grid("serial (executor local)", forward_passes, CELLS, **grid)
    seconds = {}
    for workers in (1, 2):
        start = time.perf_counter()
        with local_cluster(workers) as cluster:
            print(f"  local cluster of {workers} worker(s) started in {time.perf_counter() - start:.1f} s")
            seconds[workers], results = timed_grid(f"{workers} worker(s)", forward_passes, CELLS, executor="dask",
                                                   scheduler=cluster.scheduler_address, **grid)
            assert [checksum for checksum, _ in results] == [checksum for checksum, _ in reference], "cells differ"
            if workers == 2:
                cells = [{"index": index} for index in range(args.tasks)]
                stored, _ = timed_grid(f"{args.tasks} no-op cells, serial", nothing, cells)
                dask, _ = timed_grid(f"{args.tasks} no-op cells, 2 workers", nothing, cells, executor="dask",
                                     scheduler=cluster.scheduler_address)
    print(f"speed-up 1 -> 2 workers: {seconds[1] / seconds[2]:.2f}x (target >= 1.6x); "
          f"serial / 2 workers: {serial / seconds[2]:.2f}x")
    print(f"overhead per task: {1000 * dask / args.tasks:.1f} ms on 2 workers (serial, the store alone: "
          f"{1000 * stored / args.tasks:.1f} ms); scheduling: {1000 * (dask - stored) / args.tasks:.1f} ms")


if __name__ == "__main__":
    main()
