"""Anomaly scores, maps and a yes/no decision on your own images, for every registered method.

    >>> from zsadkit.predict import predict
    >>> result = predict("my_parts/", method="clip", out="scored/")           # doctest: +SKIP
    >>> result.scores[["path", "score"]]                                        # doctest: +SKIP
    >>> result.maps[result.scores.path[0]]        # (S, S) float16, read from scored/maps/ when asked for

`zsadkit predict INPUT... --method NAME --out DIR` (`zsadkit.cli`) is this function on the command line.

Inputs: image files, folders (searched recursively for `IMAGE_EXTENSIONS`; other files, hidden files and the
masks/ folder of a `from-folder` layout are ignored and counted; the output folder is never searched), glob
patterns, and `.csv`/`.jsonl` manifests (`zsadkit data from-folder`; paths relative to the manifest's folder).

Class word (the "[cls]" of the prompts): `class_name` for every image when given; else a manifest row's
`class_name`, a folder's name (the parent's name for a folder called good/ or bad/), and "object" for files and
globs. Calibration and reference images take `class_name`, else the inputs' word when they share one, else their
own folder's name.

References (few-shot methods): normal images (files, folders, globs, a manifest's label-0 rows; of a `from-folder`
layout only good/), fitted with the method's `fit_references(images)` per class word (one set of one class serves
every input). A method *needs* references when it has `fit_references` and sets `requires_references = True` on
itself or its `config` (`requires_references`); a method *takes* them when it has `fit_references`. `shots` draws
K of each class's references with `zsadkit.engine.sample_references` (seed `train_seed`).

Threshold: an image is "anomalous" when its score is **greater than** the threshold. `threshold` sets it by hand;
`calibrate` (a folder in the `from-folder` layout) scores good/ and bad/ with the same model and picks the F1-max
threshold, or with `target_fpr` F the lowest threshold whose false-positive rate on good/ is at most F (good/
alone is enough then). The threshold is a calibration score: the highest one still called normal.

Outputs in `out`: `scores.csv` (path, class word, score, decision and threshold when set, map files, method and
`zsadkit.results.PROVENANCE_COLUMNS`, and `fidelity` when the method declares one, e.g. HeadCLIP's
"reconstructed"), `maps/<input path>.png` (overlay at the image's size, longer side at most
1024 px, colours scaled per image) and/or `.npy` (raw S×S float16 map), `errors.csv` (unreadable inputs and why),
`run.json` (settings, versions, checkpoint digest, the method's `fidelity` when declared), `calibration.json` and `calibration_scores.csv`. Rows are
appended batch by batch, so an interrupted run resumes: images already in scores.csv are not scored again. The
settings that change scores, maps or decisions (not `device`, `batch_size`, `progress`) must equal those of
run.json, else `force=True` starts the folder afresh.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import math
import os
import pickle
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

import zsadkit
from zsadkit.data.dataset import AnomalyDataset
from zsadkit.data.from_folder import ANOMALOUS_DIR, MASK_DIR, NORMAL_DIR, manifest_from_folder
from zsadkit.data.images import IMAGE_EXTENSIONS, is_image_file, read_image
from zsadkit.data.records import Sample, read_manifest
from zsadkit.engine import sample_references
from zsadkit.methods import Detector, build_method, registered_methods
from zsadkit.models import BUILTIN_RANDOM_MODELS, PretrainedWeightsUnavailableError
from zsadkit.models.runtime import PRECISIONS, inference, run_settings
from zsadkit.protocols import method_backbone
from zsadkit.results import PROVENANCE_COLUMNS, Provenance, code_commit

__all__ = [
    "Calibration",
    "InputImage",
    "MAP_MODES",
    "MapStore",
    "PredictError",
    "PredictResult",
    "choose_threshold",
    "collect_images",
    "method_fidelity",
    "needs_references",
    "predict",
    "resolve_backbone",
]

MAP_MODES = ("overlay", "raw", "both", "none")
DEFAULT_CLASS_WORD = "object"
MANIFEST_SUFFIXES = (".csv", ".jsonl")
OVERLAY_MAX_SIDE = 1024


class PredictError(ValueError):
    """Bad settings or inputs of `predict`, found before any image is scored; the message says what to change."""


# ----------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputImage:
    """One image to score.

    Attributes:
        path: absolute path.
        key: where its maps go under maps/ (the input's relative path, without suffix).
        class_name: the class word of its prompts.
    """

    path: Path
    key: str
    class_name: str


def _as_typed(path: Path) -> bool:
    """Whether maps/ can mirror the path as typed: relative, without ".."."""
    return not path.is_absolute() and ".." not in path.parts


def _shown_as(folder: Path) -> Path:
    """How a folder is named under maps/: as typed when it can be, else by its name."""
    return folder if _as_typed(folder) else Path(folder.resolve().name)


def _folder_word(folder: Path) -> str:
    folder = folder.resolve()
    return folder.parent.name if folder.name in (NORMAL_DIR, ANOMALOUS_DIR) else folder.name


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _search_folder(folder: Path, exclude: Path | None, normal_only: bool) -> tuple[list[Path], list[Path]]:
    """(images, ignored files) under `folder`, sorted; `exclude` (the output folder) is not searched.

    In a `from-folder` layout (a good/ sub-folder), masks/ is ignored, and with `normal_only` everything but good/.
    """
    layout = (folder / NORMAL_DIR).is_dir()
    images, ignored = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()):
        if exclude is not None and path.resolve().is_relative_to(exclude):
            continue
        relative = path.relative_to(folder)
        top = relative.parts[0]
        skipped_part = layout and (top == MASK_DIR or (normal_only and top != NORMAL_DIR))
        if skipped_part or _is_hidden(relative) or not is_image_file(path):
            ignored.append(path)
        else:
            images.append(path)
    return images, ignored


def _glob_base(pattern: str) -> Path:
    """The folder part of a glob pattern before its first wildcard."""
    parts = Path(pattern).parts
    fixed = [part for part in parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]]
    return Path(*fixed) if fixed else Path(".")


def collect_images(
    inputs: str | Path | Sequence[str | Path],
    *,
    class_name: str | None = None,
    exclude: str | Path | None = None,
    normal_only: bool = False,
    what: str = "input",
) -> tuple[list[InputImage], list[Path]]:
    """The images named by files, folders, globs and manifests, without reading them (see the module docstring).

    Args:
        inputs: one or several inputs.
        class_name: class word of every image (default: per input, see the module docstring).
        exclude: a folder never searched (the output folder).
        normal_only: references: of a `from-folder` layout only good/, of a manifest only label-0 rows.
        what: "input", "reference", for messages.

    Returns:
        (images in input order, each path once; ignored non-image files).

    Raises:
        PredictError: an input that is no file, folder, glob match or manifest; two images with the same map
            path; no image at all.
    """
    inputs = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    excluded = None if exclude is None else Path(exclude).expanduser().resolve()
    found: dict[Path, InputImage] = {}
    ignored: list[Path] = []
    # image files given by absolute paths (a shell-expanded glob) are shown relative to their common folder
    loose = [Path(i).expanduser().resolve() for i in inputs if Path(i).expanduser().is_file()
             and Path(i).suffix.lower() not in MANIFEST_SUFFIXES and not _as_typed(Path(i).expanduser())]
    loose_root = Path(os.path.commonpath([path.parent for path in loose])) if loose else None

    def add(path: Path, shown: Path, word: str) -> None:
        path = path.resolve()
        if path not in found:
            found[path] = InputImage(path, shown.with_suffix("").as_posix(), class_name or word)

    for item in inputs:
        typed = Path(item).expanduser()
        if typed.is_dir():
            images, skipped = _search_folder(typed, excluded, normal_only)
            ignored += skipped
            for image in images:
                add(image, _shown_as(typed) / image.relative_to(typed), _folder_word(typed))
        elif typed.is_file() and typed.suffix.lower() in MANIFEST_SUFFIXES:
            root = typed.resolve().parent
            for record in read_manifest(typed, root=root):
                if normal_only and record.label != 0:
                    continue
                image = Path(record.image)
                shown = _shown_as(typed.parent) / image.relative_to(root) if image.is_relative_to(root) else image.name
                add(image, Path(shown), record.class_name)
        elif typed.is_file():
            if not is_image_file(typed):
                raise PredictError(f"{item}: {what} file is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a "
                                   f"manifest ({', '.join(MANIFEST_SUFFIXES)})")
            resolved = typed.resolve()
            shown = typed if _as_typed(typed) else Path(loose_root.name) / resolved.relative_to(loose_root)
            add(typed, shown, DEFAULT_CLASS_WORD)
        elif glob.has_magic(str(item)):
            matches = sorted(Path(m) for m in glob.glob(str(typed), recursive=True))
            if not matches:
                raise PredictError(f"{item}: the {what} pattern matches no file")
            base = _glob_base(str(typed))
            for match in matches:
                if match.is_file() and is_image_file(match):
                    add(match, _shown_as(base) / match.relative_to(base), DEFAULT_CLASS_WORD)
                elif match.is_file():
                    ignored.append(match)
        else:
            raise PredictError(f"{item}: no such {what} file or folder (expected image files, folders, glob "
                               "patterns or a manifest .csv/.jsonl)")
    images = list(found.values())
    if not images:
        raise PredictError(f"no image found in the {what}s {[str(i) for i in inputs]} ({len(ignored)} other "
                           f"file(s) ignored); expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
    by_key: dict[str, Path] = {}
    for image in images:
        if image.key in by_key:
            raise PredictError(f"{image.path} and {by_key[image.key]} would write the same map maps/{image.key}.*; "
                               "rename one, or score them into separate --out folders")
        by_key[image.key] = image.path
    return images, ignored


# -------------------------------------------------------------------------------------------- settings


def resolve_backbone(
    method: str, backbone: str | None = None, pretrained: str | None = None, image_size: int | None = None
) -> tuple[str, str, int]:
    """(backbone, pretrained, image size) with the unset ones filled in: the method's paper backbone, tag and size
    (`zsadkit.protocols.method_backbone`: ViT-L-14-336, openai, 518, or ViT-B-16-plus-240 with its LAION tag at
    240 for WinCLIP and InCTRL); random weights at 112 px for the built-in random models; for another backbone the
    "openai" tag and the default size (518)."""
    paper_backbone, paper_pretrained, paper_size = method_backbone(method)
    default_backbone, default_pretrained, default_size = method_backbone("default")
    backbone = backbone or paper_backbone
    if backbone in BUILTIN_RANDOM_MODELS:
        defaults = ("", 112)
    elif backbone == paper_backbone:
        defaults = (paper_pretrained, paper_size)
    else:
        defaults = (default_pretrained, default_size)
    return (backbone, defaults[0] if pretrained is None else str(pretrained),
            defaults[1] if image_size is None else int(image_size))


def needs_references(detector: Detector) -> bool:
    """True when the method cannot score without references: it has `fit_references` and sets
    `requires_references = True` on itself or on its `config`."""
    if not callable(getattr(detector, "fit_references", None)):
        return False
    config = getattr(detector, "config", None)
    return bool(getattr(detector, "requires_references", False) or getattr(config, "requires_references", False))


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _set_digest(entries: Sequence[tuple[str, Path]]) -> str:
    """sha256 over sorted (label, content sha256) pairs: the identity of an image set, wherever it lies."""
    digest = hashlib.sha256()
    for label, content in sorted((label, _file_digest(path)) for label, path in entries):
        digest.update(f"{label}:{content}\n".encode())
    return digest.hexdigest()


def _checkpoint_method(path: Path) -> str | None:
    """The method a zsadkit training checkpoint was trained for (its fingerprint's "method"), if it says."""
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise PredictError(f"{path}: not a readable safetensors checkpoint ({err})") from err
    try:
        fingerprint = json.loads(metadata.get("fingerprint", "{}"))
    except json.JSONDecodeError:
        return None
    method = fingerprint.get("method") if isinstance(fingerprint, dict) else None
    return method if isinstance(method, str) else None


def _build(method: str, settings: dict[str, Any], checkpoint: str) -> Detector:
    """`build_method` with its errors turned into `PredictError`s that name the method, backbone and checkpoint."""
    if method not in registered_methods():
        raise PredictError(f"unknown method {method!r}; registered methods: {', '.join(registered_methods())}")
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise PredictError(f"{checkpoint}: checkpoint file does not exist")
        trained_for = _checkpoint_method(path)
        if trained_for is not None and trained_for != method:
            raise PredictError(f"{checkpoint}: a checkpoint of method {trained_for!r}, not of {method!r}")
    try:
        return build_method(method, **settings)
    except PretrainedWeightsUnavailableError:
        raise
    except TypeError as err:  # check_options: unknown method options
        raise PredictError(str(err)) from err
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) of a file that is no plain checkpoint
        raise PredictError(f"{checkpoint}: not a checkpoint of tensors that can be loaded safely "
                           f"(torch.load with weights_only=True failed: {str(err).splitlines()[0]})") from err
    except (ValueError, RuntimeError, KeyError) as err:
        if not checkpoint:
            raise
        raise PredictError(f"{checkpoint}: does not fit method {method!r} on backbone {settings['backbone']!r} at "
                           f"{settings['image_size']} px (a checkpoint of another method or backbone?): {err}") from err


# ------------------------------------------------------------------------------------------ threshold


@dataclass(frozen=True)
class Calibration:
    """A threshold picked on labelled calibration images ("anomalous" = score > threshold).

    Attributes:
        threshold: the chosen threshold (a calibration score).
        rule: "f1_max" or "target_fpr".
        target_fpr: the false-positive rate asked for (rule "target_fpr").
        precision / recall / f1: on the calibration images at the threshold (None without anomalous images).
        fpr: false-positive rate on the calibration normals.
        n_normal / n_anomalous: calibration images.
    """

    threshold: float
    rule: str
    target_fpr: float | None
    precision: float | None
    recall: float | None
    f1: float | None
    fpr: float
    n_normal: int
    n_anomalous: int


def choose_threshold(labels: Sequence[int], scores: Sequence[float], target_fpr: float | None = None) -> Calibration:
    """The F1-max threshold, or with `target_fpr` F the lowest threshold whose FPR on the normals is at most F.

    The threshold is one of the scores (with F1-max, just below the lowest score when calling every image
    anomalous is best); ties in F1 go to the higher threshold (fewer alarms).

    Raises:
        PredictError: no normal image; F1-max without anomalous images; F outside [0, 1).
    """
    labels_array = np.asarray(labels, dtype=np.int64)
    scores_array = np.asarray(scores, dtype=np.float64)
    normal, anomalous = scores_array[labels_array == 0], scores_array[labels_array == 1]
    if normal.size == 0:
        raise PredictError("calibration needs normal images (good/)")
    if target_fpr is not None:
        if not 0.0 <= target_fpr < 1.0:
            raise PredictError(f"target FPR must be in [0, 1), got {target_fpr}")
        allowed = math.floor(target_fpr * normal.size + 1e-9)  # normals that may score above the threshold
        threshold = float(np.sort(normal)[::-1][allowed])
        rule = "target_fpr"
    else:
        if anomalous.size == 0:
            raise PredictError("F1-max calibration needs anomalous images (bad/); with good/ only, pass a "
                               "target false-positive rate (--target-fpr)")
        candidates = np.r_[np.nextafter(scores_array.min(), -np.inf), np.unique(scores_array)]
        true_positives = (anomalous[None, :] > candidates[:, None]).sum(axis=1)
        false_positives = (normal[None, :] > candidates[:, None]).sum(axis=1)
        f1 = 2 * true_positives / (2 * true_positives + false_positives + (anomalous.size - true_positives))
        best = np.flatnonzero(f1 == f1.max())[-1]
        threshold = float(candidates[best])
        rule = "f1_max"
    true_positives, false_positives = int((anomalous > threshold).sum()), int((normal > threshold).sum())
    precision = recall = f1_value = None
    if anomalous.size:
        recall = true_positives / anomalous.size
        precision = true_positives / (true_positives + false_positives) if true_positives + false_positives else None
        f1_value = 2 * true_positives / (2 * true_positives + false_positives + anomalous.size - true_positives)
    return Calibration(threshold, rule, target_fpr, precision, recall, f1_value, false_positives / normal.size,
                       int(normal.size), int(anomalous.size))


# ---------------------------------------------------------------------------------------------- maps


def _overlay(image_path: Path, anomaly_map: torch.Tensor) -> Image.Image:
    """The image (longer side at most `OVERLAY_MAX_SIDE`) with the map, min-max scaled, in the jet colours."""
    image = read_image(image_path).convert("RGB")
    scale = min(1.0, OVERLAY_MAX_SIDE / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    resized = F.interpolate(anomaly_map[None, None].float(), size=(size[1], size[0]), mode="bilinear",
                            align_corners=False)[0, 0].numpy()
    spread = float(resized.max() - resized.min())
    normalised = (resized - resized.min()) / spread if spread > 0 else np.zeros_like(resized)
    from matplotlib import colormaps  # here: scoring without overlays needs no matplotlib (benchmarks/gpu.sh)

    heat = (colormaps["jet"](normalised)[..., :3] * 255).astype(np.uint8)
    return Image.fromarray((0.5 * np.asarray(image) + 0.5 * heat).astype(np.uint8))


class MapStore(Mapping):
    """The raw maps of a `predict` result by image path, each read from its `.npy` file when asked for (nothing
    is held in memory). Images whose raw map was not saved (`maps="overlay"` or `"none"`) are not in it."""

    def __init__(self, out: Path, scores: pd.DataFrame, keep_alive: object = None) -> None:
        self.out = out
        column = scores["raw_map"] if "raw_map" in scores else pd.Series(dtype=str)
        self.files = {str(path): out / str(rel) for path, rel in zip(scores["path"], column, strict=False)
                      if isinstance(rel, str) and rel}
        self._keep_alive = keep_alive  # a temporary output folder lives as long as its maps

    def __getitem__(self, path: str | Path) -> np.ndarray:
        key = str(Path(path).resolve()) if str(path) not in self.files else str(path)
        if key not in self.files:
            raise KeyError(f"{path}: no raw map (not among the scored images, or maps were not saved as raw "
                           "arrays: use maps='raw' or 'both')")
        return np.load(self.files[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


# ------------------------------------------------------------------------------------------ scoring


class _ReadableImages(Dataset):
    """`AnomalyDataset` items; an unreadable image gives {"index", "error"} instead of stopping the loader."""

    def __init__(self, samples: Sequence[Sample], image_size: int) -> None:
        self.dataset = AnomalyDataset(samples, image_size)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            return self.dataset[index]
        except (OSError, ValueError) as err:  # ImageReadError (a ValueError) and what PIL raises while converting
            return {"index": index, "error": str(err)}


def _collate(items: list[dict]) -> tuple[dict | None, list[dict]]:
    readable = [item for item in items if "error" not in item]
    return (default_collate(readable) if readable else None), [item for item in items if "error" in item]


def _as_samples(images: Sequence[InputImage], label: int = 0) -> list[Sample]:
    return [Sample(str(i.path), None, label, i.class_name, "", "predict", "test") for i in images]


@dataclass
class _Scorer:
    """Runs the detector batch by batch, fitting the references of each class group first."""

    detector: Detector
    image_size: int
    batch_size: int
    device: str
    references: dict[str | None, torch.Tensor]  # class word (None: every class) -> (K, 3, S, S)
    precision: str = "fp32"
    fitted: tuple[str | None] | None = field(default=None, init=False)  # (class word,) of the fitted references

    def groups(self, samples: list[Sample]) -> list[tuple[str | None, list[int]]]:
        if not self.references or None in self.references:
            return [(None, list(range(len(samples))))]
        words = list(dict.fromkeys(s.class_name for s in samples))
        return [(word, [i for i, s in enumerate(samples) if s.class_name == word]) for word in words]

    @torch.no_grad()
    def __call__(self, samples: list[Sample], progress: bool) -> Iterator[tuple[list[int], torch.Tensor,
                                                                               torch.Tensor, list[tuple[int, str]]]]:
        """Yield (sample indices, scores (B,), maps (B, S, S), [(index, reason) of unreadable images]) per batch."""
        if not samples:
            return
        with tqdm(total=len(samples), desc="predict", disable=not progress, file=sys.stderr) as bar:
            for word, indices in self.groups(samples):
                if self.references and self.fitted != (word,):
                    with run_settings(precision=self.precision):  # the references in the images' precision
                        self.detector.fit_references(self.references[word].to(self.device))
                    self.fitted = (word,)
                group = [samples[i] for i in indices]
                loader = DataLoader(_ReadableImages(group, self.image_size), batch_size=self.batch_size,
                                    shuffle=False, collate_fn=_collate)
                for batch, failures in loader:
                    errors = [(indices[item["index"]], item["error"]) for item in failures]
                    if batch is None:
                        bar.update(len(failures))
                        yield [], torch.empty(0), torch.empty(0), errors
                        continue
                    with inference(self.precision):
                        prediction = self.detector.predict(batch["image"].to(self.device),
                                                           list(batch["class_name"]))
                    bar.update(len(failures) + len(batch["index"]))
                    yield ([indices[int(i)] for i in batch["index"]], prediction.image_scores.float().cpu().clone(),
                           prediction.anomaly_maps.float().cpu().clone(), errors)


def _load_references(references: Any, class_name: str | None, shots: int | None, seed: int, image_size: int,
                     exclude: Path) -> tuple[dict[str | None, torch.Tensor], list[InputImage]]:
    """Reference tensors by class word (key None when one set serves every class) and the images used."""
    images, _ = collect_images(references, class_name=class_name, exclude=exclude, normal_only=True,
                               what="reference")
    words = list(dict.fromkeys(image.class_name for image in images))
    chosen: dict[str | None, list[Sample]] = {}
    for word in words:
        group = _as_samples([image for image in images if image.class_name == word])
        if shots is not None:
            if shots > len(group):
                raise PredictError(f"{shots} shots asked, but the references of class {word!r} hold {len(group)} "
                                   "image(s)")
            group = sample_references(group, word, shots, seed)
        chosen[None if len(words) == 1 else word] = group
    tensors = {}
    for key, group in chosen.items():
        dataset = AnomalyDataset(group, image_size)
        tensors[key] = torch.stack([dataset[i]["image"] for i in range(len(dataset))])  # unreadable: an error
    used = {Path(s.image) for group in chosen.values() for s in group}
    return tensors, [image for image in images if image.path in used]


# ------------------------------------------------------------------------------------------- result


@dataclass
class PredictResult:
    """What `predict` returns.

    Attributes:
        scores: one row per input image (input order): path, class_name, score, [decision, threshold],
            [overlay, raw_map] (files relative to `out`), method and the provenance columns.
        errors: path, reason of each unreadable input of this call.
        maps: the raw maps by path, read from disk on demand (`MapStore`).
        out: the output folder.
        threshold: the threshold in use, or None.
        calibration: how it was calibrated, or None.
        scored_now: images scored by this call (the others were in scores.csv already).
        ignored: non-image files found in the input folders and globs.
        notes: what to know about these numbers (random weights, untrained parameters).
    """

    scores: pd.DataFrame
    errors: pd.DataFrame
    maps: MapStore
    out: Path
    threshold: float | None
    calibration: Calibration | None
    scored_now: int
    ignored: int
    notes: list[str]

    def summary(self) -> str:
        """Lines for the command line: what was scored, what failed, the decisions and where the files are."""
        lines = [*(f"note: {note}" for note in self.notes)]
        lines.append(f"{len(self.scores)} image(s) scored ({self.scored_now} now, {len(self.scores) - self.scored_now} "
                     f"already in {self.out / 'scores.csv'}); {self.ignored} non-image file(s) ignored")
        if self.threshold is not None:
            anomalous = int((self.scores["decision"] == "anomalous").sum())
            how = "set by hand"
            if self.calibration is not None:
                c = self.calibration
                rule = "F1-max" if c.rule == "f1_max" else f"target FPR {c.target_fpr}"
                figures = f"FPR {c.fpr:.3f}" + ("" if c.recall is None else
                                                 f", recall {c.recall:.3f}, precision {_fmt(c.precision)}")
                how = (f"calibrated by {rule} on {c.n_normal} normal and {c.n_anomalous} anomalous images, where "
                       f"it gives {figures}")
            lines.append(f"threshold {self.threshold:.6g}, {how}; decisions (anomalous when score > threshold): "
                         f"{anomalous} anomalous, {len(self.scores) - anomalous} normal")
        if len(self.errors):
            lines.append(f"{len(self.errors)} input(s) could not be read, listed with the reason in "
                         f"{self.out / 'errors.csv'}")
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# ---------------------------------------------------------------------------------------- predict


def _versions() -> dict[str, str]:
    return {"zsadkit": zsadkit.__version__, "commit": code_commit(), "python": platform.python_version(),
            "torch": torch.__version__, "open_clip": open_clip.__version__}


def _prepare_out(out: Path, settings: dict[str, Any], force: bool) -> None:
    """Check that `out` holds nothing or a run of the same settings; with `force`, clear the previous run."""
    run_file = out / "run.json"
    ours = ["scores.csv", "errors.csv", "calibration.json", "calibration_scores.csv", "maps"]
    if force:
        for name in ours:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        run_file.unlink(missing_ok=True)
    elif run_file.is_file():
        stored = json.loads(run_file.read_text()).get("settings", {})
        changed = [f"{key}: {stored.get(key)!r} -> {settings.get(key)!r}" for key in sorted(set(stored) | set(settings))
                   if stored.get(key) != settings.get(key)]
        if changed:
            raise PredictError(f"{out} holds a run with other settings ({'; '.join(changed)}); use another --out "
                               "folder, or --force to replace it")
    elif (out / "scores.csv").exists():
        raise PredictError(f"{out / 'scores.csv'} exists without {run_file}; use another --out folder or --force")
    out.mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")


def _calibration_set(folder: Path, word: str | None) -> tuple[list[Sample], str]:
    """The calibration images (every one decoded by `manifest_from_folder`) and the set's digest."""
    records = [s.resolve(folder) for s in manifest_from_folder(folder, class_name=word, image_level_only=True)]
    samples = [Sample(s.image, None, s.label, s.class_name, "", "calibration", "test") for s in records]
    return samples, _set_digest([(str(s.label), Path(s.image)) for s in samples])


def _calibrate(scorer: _Scorer, folder: Path, samples: list[Sample], digest: str, target_fpr: float | None,
               out: Path, progress: bool) -> Calibration:
    """Score the calibration images and pick the threshold; write calibration.json and calibration_scores.csv
    (a calibration.json of this run, same set and rule, is read instead)."""
    stored = out / "calibration.json"
    if stored.is_file():
        previous = json.loads(stored.read_text())
        if previous.get("calibration_set_sha256") == digest and previous.get("target_fpr") == target_fpr:
            return Calibration(**{k: previous[k] for k in Calibration.__dataclass_fields__})
    scores = np.zeros(len(samples))
    for indices, batch_scores, _, errors in scorer(samples, progress):
        if errors:  # decoded by manifest_from_folder: cannot happen unless the files change meanwhile
            raise PredictError(f"calibration image unreadable: {errors[0][1]}")
        scores[indices] = batch_scores.double().numpy()
    calibration = choose_threshold([s.label for s in samples], scores, target_fpr)
    pd.DataFrame({"path": [s.image for s in samples], "label": [s.label for s in samples],
                  "class_name": [s.class_name for s in samples], "score": scores}).to_csv(
        out / "calibration_scores.csv", index=False, float_format="%.17g")
    _write_json(stored, {**asdict(calibration), "calibration_folder": str(folder), "calibration_set_sha256": digest,
                         "decision": "anomalous when score > threshold"})
    return calibration


def _drop_partial_line(path: Path) -> None:
    """Cut a row that an interrupted run left half-written at the end of a CSV file."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def method_fidelity(detector: Detector) -> str | None:
    """What a method's outputs claim to be, from its ``fidelity`` attribute (HeadCLIP: "reconstructed", a reading
    of its abstract); None when the method declares none."""
    fidelity = getattr(detector, "fidelity", None)
    return None if fidelity is None else str(fidelity)


def _score_into(out: Path, scorer: _Scorer, images: list[InputImage], provenance: dict[str, dict],
                threshold: float | None, maps: str, progress: bool,
                fidelity: str | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Score the images not yet in out/scores.csv, appending their rows and writing their maps batch by batch.

    Returns:
        (how many images were tried, [(path, reason) of each unreadable one]).
    """
    columns = ["path", "class_name", "score", *(["decision", "threshold"] if threshold is not None else []),
               *(["overlay"] if maps in ("overlay", "both") else []), *(["raw_map"] if maps in ("raw", "both") else []),
               "method", *(["fidelity"] if fidelity is not None else []), *PROVENANCE_COLUMNS]
    scores_file = out / "scores.csv"
    done: set[str] = set()
    if scores_file.is_file():
        _drop_partial_line(scores_file)
        with scores_file.open(newline="") as handle:
            header = next(csv.reader(handle), [])
        if header and header != columns:
            raise PredictError(f"{scores_file} has columns {header}, this run writes {columns} (a run of another "
                               "zsadkit version); use another --out folder, or --force to replace it")
        if header:
            done = set(pd.read_csv(scores_file, usecols=["path"], dtype=str, keep_default_na=False)["path"])
    todo = [image for image in images if str(image.path) not in done]
    failures: list[tuple[str, str]] = []
    new_file = not scores_file.is_file() or scores_file.stat().st_size == 0
    with scores_file.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new_file:
            writer.writerow(columns)
        for indices, batch_scores, batch_maps, errors in scorer(_as_samples(todo), progress):
            failures += [(str(todo[index].path), reason) for index, reason in errors]
            for position, index in enumerate(indices):
                image, score = todo[index], float(batch_scores[position])
                row = {"path": str(image.path), "class_name": image.class_name, "score": repr(score),
                       "fidelity": fidelity, **provenance[image.class_name]}
                if threshold is not None:
                    row |= {"decision": "anomalous" if score > threshold else "normal", "threshold": repr(threshold)}
                target = out / "maps" / image.key
                if maps != "none":
                    target.parent.mkdir(parents=True, exist_ok=True)
                if "overlay" in columns:
                    _overlay(image.path, batch_maps[position]).save(target.with_name(target.name + ".png"))
                    row["overlay"] = f"maps/{image.key}.png"
                if "raw_map" in columns:
                    np.save(target.with_name(target.name + ".npy"), batch_maps[position].numpy().astype(np.float16))
                    row["raw_map"] = f"maps/{image.key}.npy"
                writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
            handle.flush()
    return len(todo), failures


def _read_scores(scores_file: Path, images: list[InputImage]) -> pd.DataFrame:
    """The rows of `images` in scores.csv, in their order (unreadable images have none)."""
    every = pd.read_csv(scores_file, keep_default_na=False, na_values=[""],
                        dtype={"path": str, "class_name": str, "checkpoint": str, "commit": str})
    every = every.fillna({c: "" for c in ("checkpoint", "overlay", "raw_map") if c in every}).set_index("path")
    return every.loc[[str(image.path) for image in images if str(image.path) in every.index]].reset_index()


def predict(
    inputs: str | Path | Sequence[str | Path],
    *,
    method: str,
    out: str | Path | None = None,
    backbone: str | None = None,
    pretrained: str | None = None,
    image_size: int | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    checkpoint: str | Path = "",
    references: str | Path | Sequence[str | Path] | None = None,
    shots: int | None = None,
    threshold: float | None = None,
    calibrate: str | Path | None = None,
    target_fpr: float | None = None,
    maps: str = "both",
    class_name: str | None = None,
    force: bool = False,
    progress: bool = True,
    backbone_seed: int = 0,
    train_seed: int = 111,
    method_options: Mapping[str, Any] | None = None,
    precision: str = "fp32",
) -> PredictResult:
    """Score images with a registered method; write scores, maps and decisions to `out` (see the module docstring).

    Args:
        inputs: image files, folders, glob patterns, manifests.
        method: a registered method name (`zsadkit.methods.registered_methods()`).
        out: output folder; None writes into a temporary folder that lives as long as the result.
        backbone: open_clip model name, or "zsad-tiny" (random weights, offline); None: the method's paper
            backbone (`resolve_backbone`).
        pretrained: open_clip tag or a weights file; None: see `resolve_backbone`.
        image_size: input side S; None: see `resolve_backbone`.
        device: torch device.
        batch_size: images per forward pass.
        checkpoint: the method's trained parameters (zsadkit's files or the official ones).
        references: normal reference images of few-shot methods.
        shots: how many references per class to draw (default: all).
        threshold: decision threshold set by hand (anomalous when score > threshold).
        calibrate: a `from-folder` folder (good/, bad/) to pick the threshold on.
        target_fpr: with `calibrate`, the largest false-positive rate allowed on good/ (else F1-max).
        maps: "overlay" (PNG), "raw" (float16 .npy), "both" or "none".
        class_name: the class word of every image's prompts.
        force: start `out` afresh (needed when a previous run there had other settings).
        progress: a progress bar on stderr.
        backbone_seed: seed of random backbone weights.
        train_seed: seed of untrained learnable parameters and of the `shots` draw.
        method_options: fields of the method's config (`build_method(name, **options)`).
        precision: the image tower's precision, "fp32", "bf16" or "fp16" (`zsadkit.models.runtime`); a run-time
            setting like `device` (bf16 moves scores by about 1e-2 at most, docs/performance.md).

    Raises:
        PredictError: an unknown method, a checkpoint of another method or backbone, a method that needs
            references without them, bad inputs or settings, another run in `out`; all before any image is read.
    """
    if maps not in MAP_MODES:
        raise PredictError(f"maps must be one of {MAP_MODES}, got {maps!r}")
    if threshold is not None and calibrate is not None:
        raise PredictError("give either a threshold or a calibration folder, not both")
    if target_fpr is not None and calibrate is None:
        raise PredictError("a target false-positive rate needs a calibration folder (--calibrate)")
    if target_fpr is not None and not 0.0 <= target_fpr < 1.0:
        raise PredictError(f"target FPR must be in [0, 1), got {target_fpr}")
    if shots is not None and (references is None or shots < 1):
        raise PredictError("shots needs references and must be at least 1")
    if batch_size < 1:
        raise PredictError(f"batch size must be at least 1, got {batch_size}")
    if precision not in PRECISIONS:
        raise PredictError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    backbone, pretrained, image_size = resolve_backbone(method, backbone, pretrained, image_size)
    checkpoint = str(Path(checkpoint).expanduser().resolve()) if checkpoint else ""
    temporary = tempfile.TemporaryDirectory(prefix="zsadkit-predict-") if out is None else None
    out = Path(temporary.name if temporary is not None else out).expanduser().resolve()
    calibration_folder = None if calibrate is None else Path(calibrate).expanduser().resolve()
    if calibration_folder is not None and not calibration_folder.is_dir():
        raise PredictError(f"{calibrate}: calibration folder does not exist (expected good/ and bad/ folders)")

    images, ignored = collect_images(inputs, class_name=class_name, exclude=out)
    detector = _build(method, {"backbone": backbone, "pretrained": pretrained, "image_size": image_size,
                               "device": device, "backbone_seed": backbone_seed, "train_seed": train_seed,
                               "checkpoint": checkpoint, **dict(method_options or {})}, checkpoint)
    takes_references = callable(getattr(detector, "fit_references", None))
    if references is not None and not takes_references:
        raise PredictError(f"method {method!r} takes no references (it has no fit_references); drop --references")
    if references is None and needs_references(detector):
        raise PredictError(f"method {method!r} scores against normal reference images: pass --references "
                           "(files, a folder, a glob or a manifest of normal images) [--shots K]")
    words = list(dict.fromkeys(image.class_name for image in images))
    reference_tensors, reference_images = ({}, []) if references is None else _load_references(
        references, class_name or (words[0] if len(words) == 1 else None), shots, train_seed, image_size, out)
    calibration_word = class_name or (words[0] if len(words) == 1 else None)
    calibration_samples, calibration_digest = ([], "") if calibration_folder is None else _calibration_set(
        calibration_folder, calibration_word)
    needed = set(words) | {s.class_name for s in calibration_samples}
    missing = sorted(needed - set(reference_tensors)) if reference_tensors and None not in reference_tensors else []
    if missing:
        raise PredictError(f"no references of class(es) {missing} (references hold {sorted(reference_tensors)}); "
                           "pass references of every class, or one set for all with --class-name")

    trainable = callable(getattr(detector, "trainable_parameters", None))
    drawn = shots is not None
    notes = []
    if not pretrained:
        notes.append(f"backbone {backbone} with RANDOM weights: the scores check the pipeline only and say nothing "
                     "about your images")
    if trainable and not checkpoint:
        notes.append(f"{method} learns parameters and no --checkpoint was given: they are untrained (initialised "
                     f"from train_seed {train_seed})")
    settings = {
        "method": method, "backbone": backbone, "pretrained": pretrained, "image_size": image_size,
        "checkpoint": checkpoint, "checkpoint_sha256": _file_digest(Path(checkpoint)) if checkpoint else "",
        "references_sha256": _set_digest([(i.class_name, i.path) for i in reference_images]) if references else "",
        "shots": shots, "class_name": class_name, "threshold": threshold,
        "calibration_folder": str(calibration_folder or ""), "calibration_set_sha256": calibration_digest,
        "target_fpr": target_fpr, "maps": maps, "backbone_seed": backbone_seed, "train_seed": train_seed,
        "method_options": dict(method_options or {}),
    }
    settings = json.loads(json.dumps(settings))  # as run.json stores them (tuples become lists)
    _prepare_out(out, settings, force)
    fidelity = method_fidelity(detector)
    run = {"settings": settings, "runtime": {"device": device, "batch_size": batch_size, "precision": precision},
           **({"fidelity": fidelity} if fidelity is not None else {}),
           "random_weights": not pretrained, "notes": notes, "versions": _versions()}
    _write_json(out / "run.json", run)

    scorer = _Scorer(detector, image_size, batch_size, device, reference_tensors, precision)
    calibration = None
    if calibration_folder is not None:
        calibration = _calibrate(scorer, calibration_folder, calibration_samples, calibration_digest, target_fpr,
                                 out, progress)
        threshold = calibration.threshold

    per_class_shots = {key: len(value) for key, value in reference_tensors.items()}
    provenance = {
        word: asdict(Provenance(
            method=method, backbone=backbone, weights=pretrained or "random", image_size=image_size,
            train_set="unknown" if checkpoint else ("untrained" if trainable else "none"), profile="predict",
            shots=per_class_shots.get(word, per_class_shots.get(None, 0)), backbone_seed=backbone_seed,
            train_seed=train_seed if trainable and not checkpoint else None,
            reference_seed=train_seed if drawn else None, checkpoint=checkpoint))
        for word in words
    }
    tried, failures = _score_into(out, scorer, images, provenance, threshold, maps, progress, fidelity)
    errors = pd.DataFrame(failures, columns=["path", "reason"])
    if failures:
        errors.to_csv(out / "errors.csv", index=False)
    else:
        (out / "errors.csv").unlink(missing_ok=True)
    frame = _read_scores(out / "scores.csv", images)
    run["counts"] = {"inputs": len(images), "scored_now": tried - len(failures), "unreadable": len(failures),
                     "ignored_files": len(ignored)}
    _write_json(out / "run.json", run)
    return PredictResult(frame, errors, MapStore(out, frame, keep_alive=temporary), out, threshold, calibration,
                         tried - len(failures), len(ignored), notes)
