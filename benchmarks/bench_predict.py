"""Prediction throughput of every method beside its own image tower, the plain open_clip tower and a port of the
reference's inference loop; bf16 agreement; the `zsadkit predict` command against `engine.predict`.

Usage:
    python benchmarks/bench_predict.py                                          # every method, zsad-tiny @112, CPU
    python benchmarks/bench_predict.py --backbone ViT-B-16 --image-size 224 --images 2
    python benchmarks/bench_predict.py --backbone ViT-L-14-336 --image-size 518 --images 2 \\
        --methods anomalyclip vand aaclip --batch-sizes 1 2 --repeats 2
    python benchmarks/bench_predict.py --device cuda --precision fp32 bf16 --backbone ViT-L-14-336 --image-size 518

Random weights (no download, said in the output); the images are the synthetic target classes (`synth-target`,
generated on first use). Per (method, backbone, precision, batch) one line, best of `--repeats` runs (the model
is built and warmed outside the timing; `--repeats` alternates the measured paths so that noise from other
processes on a shared machine hits them alike):

* `predict`: images/s of `zsadkit.engine.predict` (decode, resize, tower, text similarities, upsampling,
  smoothing, maps back on the CPU) at `batch`, in `precision`, with loader workers (`--workers`, default 0 on CPU
  and 4 on CUDA);
* `encode`: images/s of the method's own image-tower calls (exactly the `VisualEncoder` calls its `predict` makes,
  attention variant, adapters and head weights included, recorded once and replayed) on images already in memory;
* `tower`: images/s of the plain open_clip image tower (`clip.visual`) at the same batch and precision;
* `ref`: images/s of the reference-loop port (`reference_loop`): batch 1 (AA-CLIP: its 32), fp32, no
  `inference_mode`, attention written out with its N × N weights as the references' CLIP code computes it, text
  encoded per sample where the reference does (InCTRL) and otherwise once before the loop;
* `peak`: peak memory of the `predict` phase (RSS high-water mark on CPU, `torch.cuda.max_memory_allocated` on GPU);
* `ratio=R`: predict / encode (target on CPU: ≥ 0.9, i.e. ≤ 10 % overhead), and `vs_ref`: predict / ref (target ≥ 1).

With `--agreement` a second line per method and reduced precision: max |Δ| of the maps and scores against fp32
and the image and pixel AUROC of both on the synthetic set (target: within 0.2 points; random weights score at
chance with nearly tied image scores, so expect image AUROC to move more than it would with trained weights).
With `--cli` the `zsadkit predict` command (`zsadkit.predict.predict`, maps none/raw/both) against
`engine.predict` on the same model and batches.

On a shared CPU the timings are noisy: the best of `--repeats` is printed, with the median beside it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch.utils.data import DataLoader

from zsadkit import engine
from zsadkit import predict as predict_module
from zsadkit.data.dataset import AnomalyDataset
from zsadkit.data.records import Sample
from zsadkit.experiment import RunConfig, load_split
from zsadkit.methods import build_method, registered_methods
from zsadkit.metrics.ranking import image_auroc, pixel_auroc
from zsadkit.models.runtime import (
    inference,
    peak_memory_mib,
    reset_peak_memory,
    run_settings,
    synchronize,
    tower_autocast,
)

ALL_METHODS = registered_methods()

#: How each reference runs inference: (batch size, text encoded per sample?, where it says so).
REFERENCE_LOOPS: dict[str, tuple[int, bool, str]] = {
    "anomalyclip": (1, False, "zqhang/AnomalyCLIP test.py:48,73-90"),
    "vand": (1, False, "ByChelsea/VAND-APRIL-GAN test.py:132,141-160"),
    "aaclip": (32, False, "Mwxinnn/AA-CLIP test.py:116,192-215"),
    "inctrl": (1, True, "mala-lab/InCTRL open_clip/model.py (text re-encoded in every forward)"),
    "winclip": (1, False, "anomalib WinCLIP (batch 1 in the kit's reference runs)"),
}
DEFAULT_LOOP = (1, False, "no public reference loop: batch 1, fp32")


# ----------------------------------------------------------------------------------------------- measurement
def timed(device: torch.device, run: Callable[[], Any]) -> float:
    """Seconds of one `run()`, the GPU synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def alternate(device: torch.device, runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Every run once as a warm-up, then `repeats` rounds of every run in turn: {name: seconds per round}."""
    for run in runs.values():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            seconds[name].append(timed(device, run))
    return seconds


# ----------------------------------------------------------------------------------------------- the paths
def record_tower_calls(detector: Any, images: torch.Tensor, classes: list[str]) -> Callable[[], None]:
    """The method's own image-tower work: record the `VisualEncoder` calls one `predict` makes, replay them."""
    visual = detector.visual
    calls: list[tuple[Callable, tuple, dict]] = []
    names = ("forward", "stream_state", "encode_windows")
    originals = {name: getattr(visual, name) for name in names}

    def recorder(function: Callable) -> Callable:
        def record(*args: Any, **kwargs: Any) -> Any:
            calls.append((function, args, kwargs))
            return function(*args, **kwargs)
        return record

    for name in names:
        setattr(visual, name, recorder(originals[name]))
    try:
        with inference("fp32"):
            detector.predict(images, classes)
    finally:
        for name in names:
            delattr(visual, name)

    def replay() -> None:
        for function, args, kwargs in calls:
            function(*args, **kwargs)
    return replay


def clear_text_caches(detector: Any) -> None:
    """Forget every cached text embedding of a detector (the reference port encodes text itself)."""
    for holder in (detector, getattr(detector, "class_text", None), getattr(detector, "semantic_text", None)):
        for attribute in ("cache", "_text_feature_cache", "_anchor_cache"):
            cache = getattr(holder, attribute, None) if holder is not None else None
            if isinstance(cache, dict):
                cache.clear()


def reference_loop(method: str, detector: Any, samples: list[Sample], image_size: int,
                   device: torch.device) -> Callable[[], None]:
    """A port of the reference's test loop built from the method's own modules: its batch size (1 for most), fp32,
    `torch.no_grad` (no inference mode), the plain blocks through open_clip's `nn.MultiheadAttention` (the
    references' blocks; the "module" kernel) and the variant attentions (DPAM, V-V) through SDPA, no loader
    workers, text encoded per sample where the reference does so (InCTRL) and once before the loop otherwise."""
    batch_size, text_per_sample, _ = REFERENCE_LOOPS.get(method, DEFAULT_LOOP)
    loader = DataLoader(AnomalyDataset(samples, image_size=image_size), batch_size=batch_size, shuffle=False)

    def run() -> None:
        clear_text_caches(detector)
        with torch.no_grad(), run_settings(precision="fp32", attention="module"):
            for batch in loader:
                if text_per_sample:
                    clear_text_caches(detector)
                prediction = detector.predict(batch["image"].to(device), list(batch["class_name"]))
                prediction.anomaly_maps.cpu(), prediction.image_scores.cpu()
    return run


def plain_tower(tower: torch.nn.Module, images: torch.Tensor) -> Callable[[], None]:
    """open_clip's own image tower (`clip.visual`) on `images`, in the current precision."""
    def run() -> None:
        with tower_autocast(images.device):
            tower(images)
    return run


# ----------------------------------------------------------------------------------------------- the report
def images_per_second(n_images: int, seconds: list[float]) -> tuple[float, float]:
    return n_images / min(seconds), n_images / statistics.median(seconds)


def bench_method(method: str, args: argparse.Namespace, samples: list[Sample], device: torch.device) -> None:
    settings = dict(backbone=args.backbone, pretrained="", image_size=args.image_size, device=str(device),
                    backbone_seed=0, train_seed=0)
    detector = build_method(method, **settings)
    loaded = next(iter(DataLoader(AnomalyDataset(samples, image_size=args.image_size), batch_size=len(samples))))
    images, classes = loaded["image"].to(device), list(loaded["class_name"])
    if getattr(detector, "requires_references", False):
        detector.fit_references(images[:2])
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    open_clip_tower = detector.visual.visual
    ref_runs = {"ref": reference_loop(method, detector, samples, args.image_size, device)} if args.reference else {}
    ref_batch, text_per_sample, ref_source = REFERENCE_LOOPS.get(method, DEFAULT_LOOP)
    reference_rate = None
    for precision in args.precision:
        for batch in args.batch_sizes:
            batch = min(batch, len(samples))
            batch_images = images[:batch]

            def run_predict(batch: int = batch, precision: str = precision) -> None:
                for _ in engine.predict(detector, samples, image_size=args.image_size, batch_size=batch,
                                        device=device, precision=precision, num_workers=workers):
                    pass

            replay = record_tower_calls(detector, batch_images, classes[:batch])
            encode_passes = -(-len(samples) // batch)

            def run_encode(replay: Callable = replay, passes: int = encode_passes, precision: str = precision) -> None:
                with inference(precision):
                    for _ in range(passes):
                        replay()

            def run_tower(batch_images: torch.Tensor = batch_images, passes: int = encode_passes,
                          precision: str = precision) -> None:
                tower = plain_tower(open_clip_tower, batch_images)
                with inference(precision):
                    for _ in range(passes):
                        tower()

            reset_peak_memory(device)
            run_predict()
            peak = peak_memory_mib(device)
            runs = {"predict": run_predict, "encode": run_encode, "tower": run_tower}
            runs.update(ref_runs)  # the reference loop in every round, so each vs_ref is measured side by side
            seconds = alternate(device, runs, args.repeats)
            n = len(samples)
            rates = {name: images_per_second(n, times) for name, times in seconds.items()}
            if "ref" in rates:
                reference_rate = rates["ref"][0]
            line = (f"{method:<12} {args.backbone}@{args.image_size} {precision:<4} batch={batch:<3} "
                    + " ".join(f"{name}={best:7.3f}/{median:<7.3f}" for name, (best, median) in rates.items())
                    + f" img/s  peak={peak:8.0f}MiB")
            if reference_rate is not None:
                line += f"  vs_ref={rates['predict'][0] / reference_rate:5.2f}"
            print(line + f"  ratio={rates['predict'][0] / rates['encode'][0]:.2f}", flush=True)
    if args.reference:
        print(f"{'':<12} ref: batch {ref_batch}, fp32, text {'per sample' if text_per_sample else 'once'} "
              f"({ref_source})", flush=True)
    if args.agreement:
        agreement(method, detector, loaded, device, [p for p in args.precision if p != "fp32"] or ["bf16"])


def agreement(method: str, detector: Any, loaded: dict, device: torch.device, precisions: list[str]) -> None:
    """max |Δ| of maps and scores of a reduced precision against fp32, and both precisions' AUROC."""
    images, classes, masks = loaded["image"].to(device), list(loaded["class_name"]), loaded["mask"] > 0.5
    with inference("fp32"):
        full = detector.predict(images, classes)
    for precision in precisions:
        with inference(precision):
            reduced = detector.predict(images, classes)
        print(f"{method:<12} {precision} vs fp32: max|Δmap|={float((reduced.anomaly_maps - full.anomaly_maps).abs().max()):.2e} "
              f"max|Δscore|={float((reduced.image_scores - full.image_scores).abs().max()):.2e} "
              f"image AUROC {image_auroc(loaded['label'], full.image_scores.cpu()):.4f}->"
              f"{image_auroc(loaded['label'], reduced.image_scores.cpu()):.4f} "
              f"pixel AUROC {pixel_auroc(masks, full.anomaly_maps.cpu()):.4f}->"
              f"{pixel_auroc(masks, reduced.anomaly_maps.cpu()):.4f}", flush=True)


def bench_cli(method: str, args: argparse.Namespace, samples: list[Sample], device: torch.device) -> None:
    """`zsadkit predict` (maps none, raw, both) against `engine.predict` on the same model and batches."""
    settings = dict(backbone=args.backbone, pretrained="", image_size=args.image_size, device=str(device))
    detector = build_method(method, **settings)
    if getattr(detector, "requires_references", False):
        print(f"{method:<12} cli: skipped (the command needs reference images)", flush=True)
        return
    batch = args.batch_sizes[-1]
    paths = [sample.image for sample in samples]

    def run_engine() -> None:
        for _ in engine.predict(detector, samples, image_size=args.image_size, batch_size=batch, device=device):
            pass

    def run_command(maps: str) -> None:
        with tempfile.TemporaryDirectory() as out, mock.patch.object(predict_module, "build_method",
                                                                     return_value=detector):
            predict_module.predict(paths, method=method, out=Path(out), maps=maps, batch_size=batch, progress=False,
                                   **settings)

    runs = {"engine.predict": run_engine, **{f"predict maps={m}": (lambda m=m: run_command(m))
                                             for m in ("none", "raw", "both")}}
    seconds = alternate(device, runs, args.repeats)
    for name, times in seconds.items():
        print(f"{method:<12} cli: {name:<18} {len(paths) / min(times):7.2f} images/s (batch {batch})", flush=True)


def synthetic_samples(n_images: int) -> list[Sample]:
    """`n_images` of the synthetic target set, normal and anomalous alternating (cycling when more are asked)."""
    samples = sorted(load_split(RunConfig(), "synth-target"), key=lambda sample: (sample.label, sample.image))
    normal = [s for s in samples if s.label == 0]
    anomalous = [s for s in samples if s.label == 1]
    mixed = [sample for pair in zip(normal, anomalous, strict=False) for sample in pair]
    return [mixed[i % len(mixed)] for i in range(n_images)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=ALL_METHODS)
    parser.add_argument("--backbone", default="zsad-tiny")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--images", type=int, default=8, help="images per measured pass")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--workers", type=int, default=None, help="loader workers of predict (default 0 CPU, 4 GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-reference", dest="reference", action="store_false", help="skip the reference port")
    parser.add_argument("--agreement", action="store_true", help="bf16/fp16 against fp32 on the synthetic set")
    parser.add_argument("--cli", action="store_true", help="also time the zsadkit predict command")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if any(batch < 1 for batch in args.batch_sizes) or args.images < 1 or args.repeats < 1:
        parser.error("--batch-sizes, --images and --repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    samples = synthetic_samples(args.images)
    print(f"# random weights; {args.backbone}@{args.image_size} on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}); "
          f"{len(samples)} synthetic images; best/median of {args.repeats}; torch {torch.__version__}", flush=True)
    for method in args.methods:
        bench_method(method, args, samples, device)
        if args.cli:
            bench_cli(method, args, samples, device)



if __name__ == "__main__":
    main()
