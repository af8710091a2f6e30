"""Check zsadkit's InCTRL against golden outputs of the official code (`python -m zsadkit.verify inctrl DIR`).

DIR has the layout of `tests/fixtures/inctrl/` (see its README): the tiny CLIP (`clip_state_dict.npz`), the full
initial InCTRL state (`inctrl_state_dict_init.npz`), `inputs.npz`, and the reference's outputs:

* `eval_bs1_query{i}.npz`: test format (K shared prompts), batch 1, every query i: the correct behaviour, checked
  with the default per-sample layout through `fit_references` + `predict`'s path;
* `trainfmt_eval_bs1_query{i}.npz`: train format (each query with its own K prompts), batch 1, eval mode;
* `eval_bs{b}_buggy.npz`, `trainfmt_eval_bs{b}_buggy.npz`: batch b > 1, checked with `batch_reshape="reference"`;
  the per-sample layout at batch b is also checked against the batch-1 references;
* `train_step_bs{b}.npz`: one reference training step (train-mode forward with the reshape, focal losses,
  gradients, AdamW step, BatchNorm statistics);
* `evalmode_loss_grad_bs1.npz`: loss and gradients of one train-format sample in eval mode.

Settings are read from the directory, never assumed: K, the batch sizes and the image size from the arrays'
shapes; the activation from `run_info.json` ``act_layer`` (required); optional `run_info.json` keys
``out_layers`` (1-indexed tapped blocks), ``vision_heads``/``text_heads``, ``test_types`` (one object type, or one
per query) and ``train_types`` (one per query) fall back, with a NOTE, to what the fixture README documents (the
reference's layers for the model's depth, 2 heads, "candle", ["candle", "metal_nut"]). The optimiser is
`zsadkit.recipes.inctrl.InCTRLTrainingConfig`'s (the reference's AdamW). A missing file or key, zero checks, or
any array out of tolerance fails.

Tolerances (fixture README): features atol = rtol = 1e-5; scores, maps and losses atol 1e-6 (rtol 1e-5);
gradients atol 2e-6, rtol 1e-5 (the README measured ≤ 6e-7), except the end-to-end training step's (per array
atol = 2e-3 · max|reference array|, `check_training` says why); parameters after the AdamW step atol 1e-3 (= lr: noise-level gradients become ±lr
in Adam's first step), and atol 1e-5 where |gradient| > 1e-5; BatchNorm statistics atol 1e-6 (the step counter
exactly).
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from zsadkit.methods.base import backbone_defaults
from zsadkit.methods.inctrl import ImageFeatures, InCTRL, InCTRLConfig, InCTRLOutput, official_name
from zsadkit.models import VisualEncoder, VisualFeatures, load_clip
from zsadkit.recipes.inctrl import InCTRLTrainingConfig
from zsadkit.training import make_optimizer
from zsadkit.verify import Comparison, FixtureError, int_setting, ints_setting

__all__ = [
    "ACTIVATIONS",
    "FixtureRun",
    "OUTPUT_ARRAYS",
    "REQUIRED_FILES",
    "check_evaluations",
    "check_features",
    "check_training",
    "load_fixture",
    "main",
    "run_checks",
]

FEATURES = {"atol": 1e-5, "rtol": 1e-5}
SCORES = {"atol": 1e-6, "rtol": 1e-5}
GRADIENTS = {"atol": 2e-6, "rtol": 1e-5}
END_TO_END_GRADIENT_SCALE = 2e-3  # atol per array: this fraction of the array's max |reference|
PARAMETERS = {"atol": 1e-3, "rtol": 0.0}
PARAMETERS_WITH_GRADIENT = {"atol": 1e-5, "rtol": 0.0}
STATISTICS = {"atol": 1e-6, "rtol": 0.0}
EXACT = {"atol": 0.0, "rtol": 0.0}
ACTIVATIONS = {"GELU": False, "QuickGELU": True}
README_HEADS = 2  # tests/fixtures/inctrl/README.md, "Tiny model": 2 heads in both towers
README_TEST_TYPES = ("candle",)
README_TRAIN_TYPES = ("candle", "metal_nut")
REQUIRED_FILES = ("run_info.json", "clip_state_dict.npz", "inctrl_state_dict_init.npz", "inputs.npz",
                  "evalmode_loss_grad_bs1.npz")
#: Reference array → `InCTRLOutput` field (per-sample quantities of every eval file).
OUTPUT_ARRAYS = {"residual_map_per_layer": "layer_residuals", "patch_ref_map": "patch_map",
                 "patch_score": "patch_score", "query_adapter_out": "query_adapted",
                 "prompt_adapter_out": "prompt_adapted", "token_ref": "image_residual", "img_ref_score": "image_score",
                 "text_features": "text_features", "text_score": "text_score", "holistic_map": "holistic_map",
                 "hl_score": "holistic_score", "final_score": "final_score"}
FEATURE_ARRAYS = ("query_adapter_out", "prompt_adapter_out", "token_ref", "text_features")


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as arrays:
        return {key: arrays[key] for key in arrays.files}


def _key(arrays: dict[str, np.ndarray], key: str, path: Path) -> np.ndarray:
    if key not in arrays:
        raise FixtureError(f"{path}: missing key {key!r} (see tests/fixtures/inctrl/README.md)")
    return arrays[key]


@dataclass
class FixtureRun:
    """The fixture's CLIP, initial heads, inputs and settings (see the module docstring)."""

    directory: Path
    clip: torch.nn.Module
    initial: dict[str, np.ndarray]
    query: torch.Tensor
    prompts: torch.Tensor  # (K, B, 3, S, S), prompt s of sample i at [s, i]
    normal_list: torch.Tensor  # (K, 3, S, S)
    labels: torch.Tensor
    layers: tuple[int, ...]
    test_types: list[str]
    train_types: list[str]
    notes: list[str] = field(default_factory=list)
    encoded: dict[str, VisualFeatures] = field(default_factory=dict)
    first_model: InCTRL | None = None

    @property
    def shots(self) -> int:
        return self.normal_list.shape[0]

    def model(self, **overrides: object) -> InCTRL:
        """A fresh `InCTRL` with the fixture's initial adapter, heads and BatchNorm statistics, in eval mode (the
        text embeddings of the fixture's CLIP are shared between the models)."""
        model = InCTRL(self.clip, InCTRLConfig(layers=self.layers, **overrides))
        state = {official_name(k): torch.from_numpy(v.copy()) for k, v in self.initial.items() if official_name(k)}
        model.load_head_state(state, source=str(self.directory / "inctrl_state_dict_init.npz"))
        if self.first_model is None:
            self.first_model = model
        model.share_text_cache(self.first_model)
        return model.eval()

    def encode(self, name: str, images: torch.Tensor) -> VisualFeatures:
        """The tapped raw tokens (CLS included) and pooled embeddings of `images`, computed once per `name`."""
        if name not in self.encoded:
            with torch.no_grad():
                encoder = VisualEncoder(self.clip)
                self.encoded[name] = encoder(images, self.layers, tokens="raw", global_ln_post=True)
        return self.encoded[name]

    def features(self, name: str, images: torch.Tensor, leading: tuple[int, ...]) -> ImageFeatures:
        """`encode` as `ImageFeatures` with leading dims `leading` (e.g. (B, K) for per-sample prompts)."""
        encoded = self.encode(name, images)
        tokens = torch.stack(encoded.patch_tokens, dim=1)  # (n, L, N, W)
        return ImageFeatures(tokens.unflatten(0, leading), encoded.global_embedding.unflatten(0, leading))


def _object_types(info: dict, key: str, path: Path, default: tuple[str, ...]) -> list[str]:
    """`info[key]`: one object type or a list of them (`default` when absent)."""
    value = info.get(key, list(default))
    types = [value] if isinstance(value, str) else value
    if not isinstance(types, list) or not types or not all(isinstance(name, str) for name in types):
        raise FixtureError(f"{path}: {key!r} must be an object type or a list of them, got {type(value).__name__} "
                           f"{value!r}")
    return list(types)


def load_fixture(directory: Path) -> FixtureRun:
    """Read the settings and inputs of a fixture directory."""
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise FixtureError(f"InCTRL fixture {directory}: missing {missing} (see tests/fixtures/inctrl/README.md)")
    info_path = directory / "run_info.json"
    info = json.loads(info_path.read_text())
    if not isinstance(info, dict):
        raise FixtureError(f"{info_path}: a JSON object expected, got {type(info).__name__}")
    notes = []
    activation = _key(info, "act_layer", info_path)
    if activation not in ACTIVATIONS:
        raise FixtureError(f"{info_path}: act_layer must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    heads = {}
    for tower in ("vision_heads", "text_heads"):
        heads[tower] = int_setting(info, tower, info_path) if tower in info else README_HEADS
        if tower not in info:
            notes.append(f"run_info.json has no {tower!r}: using {README_HEADS}, as the fixture README documents")
    clip = load_clip(checkpoint=directory / "clip_state_dict.npz", quick_gelu=ACTIVATIONS[activation], **heads)
    inputs_path = directory / "inputs.npz"
    inputs = _load(inputs_path)
    query = torch.from_numpy(_key(inputs, "query", inputs_path))
    prompts = torch.from_numpy(_key(inputs, "prompts_train_format", inputs_path))
    normal_list = torch.from_numpy(_key(inputs, "normal_list", inputs_path))
    labels = torch.from_numpy(_key(inputs, "labels", inputs_path))
    batch = query.shape[0]
    if query.ndim != 4 or prompts.shape[1] != batch or prompts.shape[2:] != query.shape[1:] or labels.shape != (batch,):
        raise FixtureError(f"{inputs_path}: expected query (B, 3, S, S), prompts_train_format (K, B, 3, S, S), "
                           f"labels (B,); got {tuple(query.shape)}, {tuple(prompts.shape)}, {tuple(labels.shape)}")
    if "out_layers" in info:
        layers = ints_setting(info, "out_layers", info_path)
    else:
        layers = backbone_defaults(clip).inctrl_layers
        notes.append(f"run_info.json has no 'out_layers': using {list(layers)}, the reference's blocks for "
                     f"{len(clip.visual.transformer.resblocks)} layers")
    test_types = _object_types(info, "test_types", info_path, README_TEST_TYPES)
    if len(test_types) == 1:
        test_types = test_types * batch
    train_types = _object_types(info, "train_types", info_path, README_TRAIN_TYPES)
    for key, value in (("test_types", test_types), ("train_types", train_types)):
        if key not in info:
            notes.append(f"run_info.json has no {key!r}: using {sorted(set(value))}, as the fixture README documents")
        if len(value) != batch:
            raise FixtureError(f"{info_path}: {key} must name {batch} object types (one per query), got {value}")
    return FixtureRun(directory, clip, _load(directory / "inctrl_state_dict_init.npz"), query, prompts, normal_list,
                      labels, layers, test_types, train_types, notes)


def check_features(out: Comparison, name: str, run: FixtureRun, images: dict[str, tuple[str, torch.Tensor]],
                   reference: dict[str, np.ndarray], path: Path) -> None:
    """The tapped tokens (CLS included) and pooled embeddings: "query" (b, ...) and shot-major "prompt" (K·b, ...)
    images, each given as (memo name, images)."""
    for label, (key, tensor) in images.items():
        features = run.encode(key, tensor)
        out.check(f"{name}: {label}_layer_tokens", torch.stack(features.layer_tokens),
                  _key(reference, f"{label}_layer_tokens", path), **FEATURES)
        out.check(f"{name}: {label}_pooled", features.global_embedding, _key(reference, f"{label}_pooled", path),
                  **FEATURES)


def check_output(out: Comparison, name: str, output: InCTRLOutput, reference: dict[str, np.ndarray],
                 path: Path) -> None:
    for key, attribute in OUTPUT_ARRAYS.items():
        out.check(f"{name}: {key}", getattr(output, attribute), _key(reference, key, path),
                  **(FEATURES if key in FEATURE_ARRAYS else SCORES))


def _score_test_format(model: InCTRL, run: FixtureRun, start: int, stop: int) -> InCTRLOutput:
    """The reference's test loop: queries start..stop−1 against the K shared prompts (`normal_list`), eval mode."""
    model.memory = run.features("normal_list", run.normal_list, (run.shots,))
    query = run.features(f"query[{start}:{stop}]", run.query[start:stop], (stop - start,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the reference-reshape warning is the point here
        return model.score_features(query, run.test_types[start:stop])


def _score_train_format(model: InCTRL, run: FixtureRun, start: int, stop: int) -> InCTRLOutput:
    """Train format: queries start..stop−1, each with its own K prompts, eval mode."""
    size = stop - start
    query = run.features(f"query[{start}:{stop}]", run.query[start:stop], (size,))
    prompts = run.features(f"prompts[:, {start}:{stop}]", run.prompts[:, start:stop].transpose(0, 1).flatten(0, 1),
                           (size, run.shots))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return model.score(query, prompts, run.train_types[start:stop])


def check_evaluations(out: Comparison, run: FixtureRun) -> None:
    """Batch-1 files with the per-sample layout, batch-b files with the reference reshape."""
    directory, batch = run.directory, run.query.shape[0]
    per_sample = run.model()
    for form, prefix in (("test format", "eval"), ("train format", "trainfmt_eval")):
        bs1_scores = []
        for index in range(batch):
            file = f"{prefix}_bs1_query{index}.npz"
            with out.section(f"{form}, batch 1, query {index}"):
                if not out.require(directory, file):
                    continue
                reference, path = _load(directory / file), directory / file
                name, query = f"{form} bs1 q{index}", (f"query[{index}:{index + 1}]", run.query[index:index + 1])
                if form == "test format":
                    check_features(out, name, run, {"query": query, "prompt": ("normal_list", run.normal_list)},
                                   reference, path)
                    output = _score_test_format(per_sample, run, index, index + 1)
                else:
                    prompts = (f"prompts[:, {index}:{index + 1}]", run.prompts[:, index])  # K prompts, b = 1
                    check_features(out, name, run, {"query": query, "prompt": prompts}, reference, path)
                    output = _score_train_format(per_sample, run, index, index + 1)
                check_output(out, name, output, reference, path)
                bs1_scores.append(_key(reference, "final_score", path))
        buggy_files = sorted(directory.glob(f"{prefix}_bs*_buggy.npz"))
        if not buggy_files:
            out.require(directory, f"{prefix}_bs2_buggy.npz")
        for path in buggy_files:
            with out.section(f"{form}, {path.name}"):
                reference = _load(path)
                size = int(_key(reference, "final_score", path).shape[0])
                if not 1 < size <= batch or f"_bs{size}_" not in path.name:
                    raise FixtureError(f"{path}: batch {size} in a file named {path.name}, with {batch} queries")
                scrambled = run.model(batch_reshape="reference")
                name, query = f"{form} bs{size} reference reshape", (f"query[0:{size}]", run.query[:size])
                if form == "test format":
                    # the reference repeats normal_list over the batch, shot-major: prompt s·b + i = normal_list[s]
                    prompts = (f"normal_list x{size}", run.normal_list.repeat_interleave(size, dim=0))
                    score = _score_test_format
                else:
                    prompts = (f"prompts[:, 0:{size}] shot-major", run.prompts[:, :size].flatten(0, 1))
                    score = _score_train_format
                check_features(out, name, run, {"query": query, "prompt": prompts}, reference, path)
                check_output(out, name, score(scrambled, run, 0, size), reference, path)
                if len(bs1_scores) >= size:
                    out.check(f"{form} bs{size} per-sample layout vs reference bs1 final_score",
                              score(per_sample, run, 0, size).final_score, np.concatenate(bs1_scores[:size]), **SCORES)


def _gradient_checks(out: Comparison, name: str, model: InCTRL, reference: dict[str, np.ndarray], path: Path,
                     scale: float | None = None) -> None:
    """Every grad__* array at `GRADIENTS`, or with `scale` at atol = scale · max|reference array| (a zero or
    wrong-scale gradient fails in every array, however small its values)."""
    keys = [key for key in reference if key.startswith("grad__")]
    if not keys:
        raise FixtureError(f"{path}: no grad__* arrays")
    own = model.trainable_parameters()
    for key in keys:
        ours = official_name(key.removeprefix("grad__"))
        if ours not in own:
            raise FixtureError(f"{path}: {key} names no trained parameter of the model")
        tolerance = GRADIENTS if scale is None else {
            "atol": scale * float(np.abs(reference[key]).max(initial=0.0)) + GRADIENTS["atol"], "rtol": 0.0}
        out.check(f"{name}: {key}", own[ours].grad, reference[key], **tolerance)


def _check_after_step(out: Comparison, name: str, run: FixtureRun, model: InCTRL, gradients: dict[str, torch.Tensor],
                      reference: dict[str, np.ndarray], path: Path, parameters: bool) -> None:
    """BatchNorm statistics after the train-mode forward (and, with `parameters`, the parameters after AdamW)."""
    state = model.head_state()
    for key in sorted(k for k in reference if k.startswith("after_step__")):
        official = key.removeprefix("after_step__")
        ours = official_name(official)
        if ours is None:  # the unused bn1: the reference never touches it
            out.check(f"{name}: {key} (unused, unchanged)", reference[key], _key(run.initial, official, path), **EXACT)
        elif ours.endswith("num_batches_tracked"):
            out.check(f"{name}: {key}", state[ours], reference[key], **EXACT)
        elif ours not in gradients:
            out.check(f"{name}: {key}", state[ours], reference[key], **STATISTICS)
        elif parameters:
            out.check(f"{name}: {key}", state[ours], reference[key], **PARAMETERS)
            mask = gradients[ours].abs().numpy() > PARAMETERS_WITH_GRADIENT["atol"]
            out.check(f"{name}: {key} where |grad| > 1e-5", state[ours].detach().numpy()[mask], reference[key][mask],
                      **PARAMETERS_WITH_GRADIENT)


def _training_step(run: FixtureRun, size: int, residuals: dict[str, np.ndarray] | None = None
                   ) -> tuple[InCTRL, InCTRLOutput, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One reference training step (train mode, reference reshape, AdamW of `InCTRLTrainingConfig`), optionally
    with M_p, s_p and s_a replaced by the reference's `residuals`; returns the model after the step, the output,
    the losses and the gradients."""
    model = run.model(batch_reshape="reference")
    optimizer = make_optimizer(InCTRLTrainingConfig().train_config(), list(model.trainable_parameters().values()))
    model.train()
    query = run.features(f"query[0:{size}]", run.query[:size], (size,))
    prompts = run.features(f"prompts[:, 0:{size}]", run.prompts[:, :size].transpose(0, 1).flatten(0, 1),
                           (size, run.shots))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        output = model.residuals(query, prompts, run.train_types[:size])
    if residuals is not None:
        output = replace(output, patch_map=torch.from_numpy(residuals["patch_ref_map"]),
                         patch_score=torch.from_numpy(residuals["patch_score"]),
                         text_score=torch.from_numpy(residuals["text_score"]))
    output = model.holistic(output)
    losses = model.losses(output, run.labels[:size])
    optimizer.zero_grad()
    losses["loss"].backward()
    gradients = {key: value.grad.detach().clone() for key, value in model.trainable_parameters().items()}
    optimizer.step()
    model.eval()
    return model, output, losses, gradients


def check_training(out: Comparison, run: FixtureRun) -> None:
    """The reference training step(s) and the eval-mode loss and gradients.

    The step is checked twice. End to end, the scores, losses and BatchNorm statistics agree to 1e-6, but the
    gradients only to ~8.5e-4 of each array's largest value (atol = 2e-3 · max|reference| per array): BatchNorm over a batch of 2 in train mode divides by the two samples' spread, which
    turns the ~2e-7 differences of M_p and s_a (vectorised residuals, cropped text encoding) into gradient
    differences up to ~5e-4. Given the reference's own M_p, s_p and s_a (from `trainfmt_eval_bs{b}_buggy.npz`:
    they do not depend on the mode), the head, loss and backward path is checked at the gradient tolerance, and
    the parameters after the AdamW step with it.
    """
    directory = run.directory
    files = sorted(directory.glob("train_step_bs*.npz"))
    if not files:
        out.require(directory, "train_step_bs2.npz")
    for path in files:
        with out.section(f"training step, {path.name}"):
            reference = _load(path)
            size = int(_key(reference, "train_mode_final_score", path).shape[0])
            if f"_bs{size}." not in path.name or size > run.query.shape[0]:
                raise FixtureError(f"{path}: batch {size} in a file named {path.name}")
            model, output, losses, gradients = _training_step(run, size)
            name = f"train step bs{size}"
            for key, ours in (("train_mode_final_score", output.final_score),
                              ("train_mode_img_ref_score", output.image_score), ("focal_final", losses["final"]),
                              ("focal_img_ref", losses["image"]), ("loss_train_epoch", losses["loss"])):
                out.check(f"{name}: {key}", ours, _key(reference, key, path), **SCORES)
            _gradient_checks(out, f"{name} (end to end)", model, reference, path, END_TO_END_GRADIENT_SCALE)
            _check_after_step(out, name, run, model, gradients, reference, path, parameters=False)
            residuals_file = directory / f"trainfmt_eval_bs{size}_buggy.npz"
            if not out.require(directory, residuals_file.name):
                continue
            residuals = _load(residuals_file)
            model, output, _, gradients = _training_step(run, size, residuals)
            name = f"train step bs{size} given the reference's M_p, s_a"
            out.check(f"{name}: train_mode_final_score", output.final_score,
                      _key(reference, "train_mode_final_score", path), **SCORES)
            _gradient_checks(out, name, model, reference, path)
            _check_after_step(out, name, run, model, gradients, reference, path, parameters=True)

    path = directory / "evalmode_loss_grad_bs1.npz"
    with out.section("eval-mode loss and gradients"):
        reference = _load(path)
        model = run.model()
        output = model.score(run.features("query[0:1]", run.query[:1], (1,)),
                             run.features("prompts[:, 0:1]", run.prompts[:, 0], (1, run.shots)), run.train_types[:1])
        losses = model.losses(output, run.labels[:1])
        name = "eval-mode bs1"
        out.check(f"{name}: final_score", output.final_score, _key(reference, "final_score", path), **SCORES)
        out.check(f"{name}: img_ref_score", output.image_score, _key(reference, "img_ref_score", path), **SCORES)
        out.check(f"{name}: loss", losses["loss"], _key(reference, "loss", path), **SCORES)
        losses["loss"].backward()
        _gradient_checks(out, name, model, reference, path)


def run_checks(directory: str | Path, out: Comparison) -> None:
    """All comparisons against the fixture in `directory`, printed and tallied by `out` (a fixture that cannot be
    read is one FAIL line; a part that cannot run is one FAIL line and the other parts still run)."""
    run = None
    with out.section("fixture (run_info.json, CLIP, initial state, inputs.npz)"):
        run = load_fixture(Path(directory))
    if run is None:
        return
    for note in run.notes:
        out.note(note)
    out.note(f"K = {run.shots}, {run.query.shape[0]} queries of {run.query.shape[-1]} px, layers {list(run.layers)}")
    with out.section("evaluations"):
        check_evaluations(out, run)
    with out.section("training"):
        check_training(out, run)


def main(directory: str | Path) -> int:
    """Print every check and a summary; 0 when all pass, 1 otherwise (a missing file or key, or nothing checked)."""
    out = Comparison()
    run_checks(directory, out)
    return out.summary()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/inctrl"))
