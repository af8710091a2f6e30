"""Check zsadkit's AnomalyCLIP against golden outputs of the official code (`python -m zsadkit.verify anomalyclip DIR`).

DIR has the layout of `tests/fixtures/anomalyclip/` (see its README): `run_info.json` (`cfg`), the tiny CLIP
(`state_dict.npz`), the initial prompt learner (`prompt_learner_init.npz` and the checkpoint-format
`prompt_learner_init_ckpt.pth`), `inputs.npz`, and the reference's text, visual, scoring, training, metric and
end-to-end outputs. Everything is recomputed from the configuration in `run_info.json`, so fixture directories
of other sizes, layer lists or seeds work too. The reference outputs of `REFERENCE_FILES` are required (a missing
one is a FAIL line and a non-zero exit); the end-to-end files (`e2e_*`) are optional and reported as skipped
when absent.

Tolerances (fixture README, "Tolerances"): features, maps and scores atol = rtol = 1e-5; losses atol = rtol = 1e-5;
context gradients rtol 1e-5, atol 1e-4; deep-prompt gradients (fp16-rounded per use) rtol 2e-3, atol 1e-2;
parameters after Adam steps atol 1e-6, except the deep prompts after the second and later steps: their
gradients differ by fp16 ulps, which Adam's normalised update turns into differences of a small fraction of
lr = 1e-3 (measured ≤ 1.5e-5), so atol 5e-5 there (the README's "~1e-9" holds for the first step); metrics on the fixture's own maps 1e-9; end-to-end metrics (computed from
our maps, which differ from the reference's by ≤ 1e-5) atol 1e-4.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from zsadkit.methods.anomalyclip import AnomalyCLIP, AnomalyCLIPConfig, import_official_prompt_learner
from zsadkit.models import load_clip
from zsadkit.verify import Comparison, FixtureError, float_setting, floats_setting, int_setting, ints_setting

__all__ = [
    "check_end_to_end",
    "check_metrics",
    "check_scoring",
    "check_text",
    "check_training",
    "check_visual",
    "CONTEXT_GRADIENTS",
    "DEEP_GRADIENTS",
    "DEEP_PARAMETERS_LATER_STEPS",
    "END_TO_END_METRICS",
    "EXACT",
    "FEATURES",
    "FixtureRun",
    "LOSSES",
    "main",
    "METRICS",
    "PARAMETERS",
    "REFERENCE_FILES",
    "REQUIRED_FILES",
]

FEATURES = {"atol": 1e-5, "rtol": 1e-5}
LOSSES = {"atol": 1e-5, "rtol": 1e-5}
CONTEXT_GRADIENTS = {"atol": 1e-4, "rtol": 1e-5}
DEEP_GRADIENTS = {"atol": 1e-2, "rtol": 2e-3}
PARAMETERS = {"atol": 1e-6, "rtol": 0.0}
DEEP_PARAMETERS_LATER_STEPS = {"atol": 5e-5, "rtol": 0.0}
METRICS = {"atol": 1e-9, "rtol": 0.0}
END_TO_END_METRICS = {"atol": 1e-4, "rtol": 0.0}
EXACT = {"atol": 0.0, "rtol": 0.0}

REQUIRED_FILES = ("run_info.json", "state_dict.npz", "prompt_learner_init.npz", "inputs.npz")
#: Reference outputs every fixture directory must hold (the fixture README's list).
REFERENCE_FILES = ("text.npz", "visual_dpam.npz", "visual_nodpam.npz", "visual_dpam_all.npz", "scoring_all.npz",
                   "scoring_top.npz", "train_all.npz", "train_top.npz", "metrics_inputs.npz", "metrics_outputs.json")


def _load(directory: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(directory / name, allow_pickle=False) as arrays:
        return {key: arrays[key] for key in arrays.files}


class FixtureRun:
    """The fixture's tiny CLIP and configuration; builds fresh `AnomalyCLIP` models with the initial prompts."""

    def __init__(self, directory: Path) -> None:
        missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"AnomalyCLIP fixture {directory}: missing {missing} "
                                    "(see tests/fixtures/anomalyclip/README.md for the layout)")
        self.directory = directory
        self.info = json.loads((directory / "run_info.json").read_text())
        self.cfg = self.typed_cfg(directory / "run_info.json", self.info)
        self.state_dict = {key: torch.from_numpy(value) for key, value in _load(directory, "state_dict.npz").items()}
        self.initial_prompts = {k: torch.from_numpy(v) for k, v in _load(directory, "prompt_learner_init.npz").items()}
        self.num_layers = self.cfg["vision_layers"]

    @staticmethod
    def typed_cfg(file: Path, info: object) -> dict[str, object]:
        """`run_info.json` ``cfg`` with every value the checks read converted, or a FixtureError naming the key."""
        if not isinstance(info, dict) or not isinstance(info.get("cfg"), dict):
            raise FixtureError(f"{file}: a JSON object with a 'cfg' object expected")
        cfg, where = info["cfg"], f"{file} cfg"
        missing = [key for key in ("vision_layers", "n_ctx", "depth", "t_n_ctx", "image_size", "temperature", "sigma",
                                   "lam", "lr", "betas", "DPAM_layer", "features_all") if key not in cfg]
        if missing:
            raise FixtureError(f"{where}: missing keys {missing} (see tests/fixtures/anomalyclip/README.md)")
        typed = {**cfg, **{key: int_setting(cfg, key, where)
                           for key in ("vision_layers", "n_ctx", "depth", "t_n_ctx", "image_size")},
                 **{key: float_setting(cfg, key, where) for key in ("temperature", "sigma", "lam", "lr")},
                 "betas": floats_setting(cfg, "betas", where),
                 "DPAM_layer": None if cfg["DPAM_layer"] is None else int_setting(cfg, "DPAM_layer", where)}
        for key in ("features_all", "features_top"):
            if key in cfg:
                typed[key] = list(ints_setting(cfg, key, where))
        return typed

    def first_dpam_layer(self, dpam_layer_argument: int | None) -> int | None:
        """Reference `DAPM_replace(DPAM_layer=n)` replaces the last n − 1 blocks: first = L − n + 2 (None: none)."""
        if dpam_layer_argument is None or dpam_layer_argument <= 1:
            return None
        return self.num_layers - int(dpam_layer_argument) + 2

    def config(self, features: list[int], dpam_layer_argument: int | None) -> AnomalyCLIPConfig:
        return AnomalyCLIPConfig(
            feature_layers=tuple(features),
            dpam_first_layer=self.first_dpam_layer(dpam_layer_argument),
            n_ctx=self.cfg["n_ctx"],
            deep_depth=self.cfg["depth"],
            deep_length=self.cfg["t_n_ctx"],
            temperature=self.cfg["temperature"],
            sigma=self.cfg["sigma"],
            lam=self.cfg["lam"],
        )

    def model(self, features: list[int], dpam_layer_argument: int | None, load_prompts: bool = True) -> AnomalyCLIP:
        clip = load_clip(state_dict=self.state_dict, image_size=self.cfg["image_size"])
        model = AnomalyCLIP(clip, self.config(features, dpam_layer_argument)).eval()
        if load_prompts:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*compound_prompt_projections.*")
                state = import_official_prompt_learner(self.initial_prompts, model, source="prompt_learner_init.npz")
            model.load_prompt_state(state, source="prompt_learner_init.npz")
        return model


def check_text(run: FixtureRun, out: Comparison) -> None:
    reference = _load(run.directory, "text.npz")
    model = run.model(run.cfg["features_all"], run.cfg["DPAM_layer"])
    prompts = model.prompt_learner()
    out.check("text.npz:prompts", prompts.embeddings.detach(), reference["prompts"], **FEATURES)
    out.check("text.npz:tokenized_prompts", prompts.token_ids, reference["tokenized_prompts"], **EXACT)
    out.check("text.npz:eot_index", prompts.token_ids.argmax(dim=-1), reference["eot_index"], **EXACT)
    out.check("text.npz:compound_prompts_text", torch.stack(prompts.deep_prompts).detach(),
              reference["compound_prompts_text"], **FEATURES)
    with torch.no_grad():
        for suffix, rounding in (("", True), ("_no_fp16_rounding", False)):
            raw = model.text.encode_embeddings(prompts.embeddings, prompts.token_ids,
                                               deep_prompts=prompts.deep_prompts, deep_prompt_fp16_round=rounding)
            normalised = raw.view(1, 2, -1) / raw.view(1, 2, -1).norm(dim=-1, keepdim=True)
            out.check(f"text.npz:text_features_raw{suffix}", raw, reference[f"text_features_raw{suffix}"], **FEATURES)
            out.check(f"text.npz:text_features{suffix}", normalised, reference[f"text_features{suffix}"], **FEATURES)
    for crop in (True, False):
        model.config = replace(model.config, crop_text_after_eot=crop)
        with torch.no_grad():
            out.check(f"text.npz:text_features (AnomalyCLIP.encode_text, {'tokens 0..EOT' if crop else 'all tokens'})",
                      model.encode_text(), reference["text_features"], **FEATURES)


def check_visual(run: FixtureRun, out: Comparison, images: torch.Tensor) -> None:
    features_all = run.cfg["features_all"]
    variants = {
        "visual_dpam.npz": run.cfg["DPAM_layer"],
        "visual_nodpam.npz": run.info.get("visual_nodpam_DPAM_layer_arg"),
        "visual_dpam_all.npz": run.info.get("visual_dpam_all_DPAM_layer_arg", run.num_layers + 1),
    }
    for name, dpam_argument in variants.items():
        if not out.require(run.directory, name):
            continue
        reference = _load(run.directory, name)
        model = run.model(features_all, dpam_argument, load_prompts=False)
        features = model.encode_image(images)
        out.check(f"{name}:image_features", features.global_embedding, reference["image_features"], **FEATURES)
        if "image_features_normed" in reference:
            normed = features.global_embedding / features.global_embedding.norm(dim=-1, keepdim=True)
            out.check(f"{name}:image_features_normed", normed, reference["image_features_normed"], **FEATURES)
        out.check(f"{name}:patch_tokens", features.layer_tokens[0], reference["patch_tokens"], **FEATURES)
        if "raw_out_tokens" not in reference:
            continue
        visual = model.visual
        all_layers = list(range(1, run.num_layers + 1))
        with torch.no_grad():
            variant = model.attention_variants[0]
            raw = visual(images, features_all, tokens="raw", global_ln_post=False, attention=variant)
            blocks = visual(images, all_layers, tokens="raw", global_ln_post=False, attention=variant)
            plain = visual(images, all_layers, tokens="raw", global_ln_post=False, attention=None)
            out.check(f"{name}:raw_out_tokens", torch.stack(raw.layer_tokens), reference["raw_out_tokens"], **FEATURES)
            out.check(f"{name}:ln_pre_out", visual.embed(images), reference["ln_pre_out"], **FEATURES)
            out.check(f"{name}:final_ori_tokens", raw.final_tokens, reference["final_ori_tokens"], **FEATURES)
            out.check(f"{name}:block_vv", torch.stack(blocks.layer_tokens), reference["block_vv"], **FEATURES)
            out.check(f"{name}:block_ori", torch.stack(plain.layer_tokens), reference["block_ori"], **FEATURES)
        out.check(f"{name}:pos_embedding_state_dict", run.state_dict["visual.positional_embedding"],
                  reference["pos_embedding_state_dict"], **EXACT)
        out.check(f"{name}:pos_embedding_interpolated", visual.visual.positional_embedding.detach(),
                  reference["pos_embedding_interpolated"], **FEATURES)


def check_scoring(run: FixtureRun, out: Comparison, images: torch.Tensor) -> None:
    for part in ("all", "top"):
        name = f"scoring_{part}.npz"
        if not out.require(run.directory, name):
            continue
        reference = _load(run.directory, name)
        model = run.model(run.cfg[f"features_{part}"], run.cfg["DPAM_layer"])
        with torch.no_grad():
            features = model.encode_image(images)
            text = model.encode_text()
            logits = model.image_logits(features.global_embedding, text)
            token_probs = model.token_probabilities(features.layer_tokens, text)
            state_maps = model.state_maps(token_probs)
            layer_maps = (state_maps[..., 1] + 1 - state_maps[..., 0]) / 2
            prediction = model.predict(images, ["object"] * images.shape[0])
        out.check(f"{name}:features_list", list(model.config.feature_layers), reference["features_list"], **EXACT)
        out.check(f"{name}:image_logits", logits * model.config.temperature, reference["image_logits"], **FEATURES)
        out.check(f"{name}:image_probs", logits.softmax(-1), reference["image_probs"], **FEATURES)
        out.check(f"{name}:image_score", prediction.image_scores, reference["image_score"], **FEATURES)
        out.check(f"{name}:similarity", token_probs, reference["similarity"], **FEATURES)
        out.check(f"{name}:similarity_map", state_maps, reference["similarity_map"], **FEATURES)
        out.check(f"{name}:anomaly_map_layers", layer_maps, reference["anomaly_map_layers"], **FEATURES)
        out.check(f"{name}:anomaly_map_sum", model.anomaly_maps(features.layer_tokens, text, smooth=False),
                  reference["anomaly_map_sum"], **FEATURES)
        out.check(f"{name}:anomaly_map_smoothed", prediction.anomaly_maps, reference["anomaly_map_smoothed"],
                  **FEATURES)


def check_training(run: FixtureRun, out: Comparison, images: torch.Tensor, masks: torch.Tensor,
                   labels: torch.Tensor) -> None:
    for part in ("all", "top"):
        name = f"train_{part}.npz"
        if not out.require(run.directory, name):
            continue
        reference = _load(run.directory, name)
        model = run.model(run.cfg[f"features_{part}"], run.cfg["DPAM_layer"]).train()
        features = model.encode_image(images)
        optimizer = torch.optim.Adam(model.prompt_learner.parameters(), lr=run.cfg["lr"], betas=run.cfg["betas"])
        records: dict[str, list] = {"image": [], "local": [], "loss": [], "per_layer": []}
        for step in range(1, len(reference["losses_total"]) + 1):
            losses = model.losses(features, masks, labels)
            if step == 1:
                out.check(f"{name}:gt_binarized", (masks > 0.5).float(), reference["gt_binarized"], **EXACT)
                text = model.text_for_images([])
                out.check(f"{name}:image_logits_over_T_step1",
                          model.image_logits(features.global_embedding, text).detach(),
                          reference["image_logits_over_T_step1"], **FEATURES)
            for key in records:
                records[key].append(losses[key].detach().numpy())
            optimizer.zero_grad()
            losses["loss"].backward()
            gradients = _reference_named(model, lambda p: p.grad)
            if step == 1:
                for key, gradient in gradients.items():
                    tolerance = CONTEXT_GRADIENTS if key.startswith("ctx_") else DEEP_GRADIENTS
                    out.check(f"{name}:grad_step1__{key}", gradient, reference[f"grad_step1__{key}"], **tolerance)
            optimizer.step()
            if step in (1, len(reference["losses_total"])) and f"param_after_step{step}__ctx_pos" in reference:
                for key, value in _reference_named(model, lambda p: p.detach()).items():
                    later_deep = step > 1 and key.startswith("compound_prompts_text.")
                    out.check(f"{name}:param_after_step{step}__{key}", value,
                              reference[f"param_after_step{step}__{key}"],
                              **(DEEP_PARAMETERS_LATER_STEPS if later_deep else PARAMETERS))
        out.check(f"{name}:losses_image", records["image"], reference["losses_image"], **LOSSES)
        out.check(f"{name}:losses_local_times_lam", records["local"], reference["losses_local_times_lam"], **LOSSES)
        out.check(f"{name}:losses_total", records["loss"], reference["losses_total"], **LOSSES)
        out.check(f"{name}:losses_per_layer_focal_dice1_dice0", records["per_layer"],
                  reference["losses_per_layer_focal_dice1_dice0"], **LOSSES)


def _reference_named(model: AnomalyCLIP, value) -> dict[str, torch.Tensor]:
    """Our prompt parameters (or their gradients) under the reference's names and shapes."""
    learner = model.prompt_learner
    contexts = value(learner.contexts)
    named = {"ctx_pos": contexts[0].reshape(1, 1, *contexts.shape[1:]),
             "ctx_neg": contexts[1].reshape(1, 1, *contexts.shape[1:])}
    for index, prompt in enumerate(learner.deep_prompts):
        named[f"compound_prompts_text.{index}"] = value(prompt)
    return named


def check_metrics(run: FixtureRun, out: Comparison) -> None:
    from zsadkit.metrics import aupro_cflow200, image_ap, image_auroc, pixel_auroc

    if not all([out.require(run.directory, "metrics_inputs.npz"), out.require(run.directory, "metrics_outputs.json")]):
        return
    inputs = _load(run.directory, "metrics_inputs.npz")
    expected = json.loads((run.directory / "metrics_outputs.json").read_text())
    for class_name in sorted({key.split("__")[0] for key in inputs}):
        labels, scores = inputs[f"{class_name}__gt_sp"], inputs[f"{class_name}__pr_sp"]
        masks, maps = inputs[f"{class_name}__masks"][:, 0] > 0.5, inputs[f"{class_name}__amaps"]
        ours = {"image-auroc": image_auroc(labels, scores), "image-ap": image_ap(labels, scores),
                "pixel-auroc": pixel_auroc(masks, maps), "pixel-aupro": aupro_cflow200(masks, maps)}
        for metric, value in ours.items():
            out.check(f"metrics_outputs.json:{class_name}__{metric}", value, expected[f"{class_name}__{metric}"],
                      **METRICS)


def check_end_to_end(run: FixtureRun, out: Comparison) -> None:
    """The reference `test.py` on the synthetic BTAD folder: transforms, then per-class and mean metrics."""
    from zsadkit.data.dataset import AnomalyDataset
    from zsadkit.data.mvtec import read_mvtec
    from zsadkit.engine import evaluate

    root, expected_file = run.directory / "e2e_btad_synth", run.directory / "e2e_test_py_metrics.json"
    if not all([out.optional(run.directory, "e2e_btad_synth"), out.optional(run.directory, "e2e_test_py_metrics.json")]):
        return
    expected = json.loads(expected_file.read_text())
    samples = read_mvtec(root, dataset="btad", normal_defect="ok", mask_suffix="")
    size = run.cfg["image_size"]
    if out.optional(run.directory, "e2e_transform_samples.npz") and "transform_samples" in expected:
        reference = _load(run.directory, "e2e_transform_samples.npz")
        soft_masks = AnomalyDataset(samples, image_size=size, mask_threshold=None)
        for kind, relative in expected["transform_samples"].items():
            with out.section(f"e2e_transform_samples {kind}"):
                if not isinstance(relative, str):
                    raise FixtureError(f"{expected_file}: transform_samples.{kind} must be an image path relative to "
                                       f"{run.directory} (a string), got {type(relative).__name__} {relative!r}")
                index = next((i for i, s in enumerate(samples) if Path(s.image) == (run.directory / relative).resolve()),
                             None)
                if index is None:
                    raise FixtureError(f"{expected_file}: transform_samples.{kind} names {relative}, which is not an "
                                       f"image of {root}")
                item = soft_masks[index]
                kind = kind.removeprefix("img_")
                out.check(f"e2e_transform_samples.npz:img_{kind}", item["image"], reference[f"img_{kind}"], **FEATURES)
                out.check(f"e2e_transform_samples.npz:mask_{kind}", item["mask"][None], reference[f"mask_{kind}"],
                          **FEATURES)
    names = {"image-auroc": ("image", "auroc"), "image-ap": ("image", "ap"), "pixel-auroc": ("pixel", "auroc"),
             "pixel-aupro": ("pixel", "aupro_cflow200")}
    for part in ("all", "top"):
        if part not in expected:
            continue
        model = run.model(run.cfg[f"features_{part}"], run.cfg["DPAM_layer"], load_prompts=False)
        checkpoint = run.directory / "prompt_learner_init_ckpt.pth"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compound_prompt_projections.*")
            model.load_prompts(checkpoint)
        rows = evaluate(model, samples, dataset="btad", image_size=size, batch_size=4, progress=False)
        value = {(r.class_name, r.level, r.metric): r.value for r in rows.itertuples()}
        for key, reference_value in expected[part].items():
            if "__" not in key:
                continue
            class_name, metric = key.split("__")
            out.check(f"e2e_test_py_metrics.json:{part}:{class_name}__{metric}",
                      value[(class_name, *names[metric])], reference_value, **END_TO_END_METRICS)
        printed_mean = re.search(r"\|\s*mean\s*\|(.*)\|", expected[part]["table"])
        if printed_mean:
            # Printed table: pixel_auroc | pixel_aupro | image_auroc | image_ap, ×100 rounded to 1 decimal.
            printed = [float(cell) for cell in printed_mean.group(1).split("|")]
            ours = [100 * value[("mean", *names[m])] for m in ("pixel-auroc", "pixel-aupro", "image-auroc", "image-ap")]
            out.check(f"e2e_test_py_metrics.json:{part}:mean row (printed, 1 decimal)", np.round(ours, 1), printed,
                      atol=0.05 + 1e-9)


def main(directory: Path) -> int:
    """Recompute every array of the fixture directory; 0 if all are within tolerance."""
    torch.set_num_threads(1)
    out = Comparison()
    print(f"AnomalyCLIP parity against {directory}")
    run = None
    with out.section("fixture (run_info.json, state dict, initial prompts, inputs.npz)"):
        fixture = FixtureRun(Path(directory))
        inputs = _load(fixture.directory, "inputs.npz")
        images = torch.from_numpy(inputs["images"])
        masks = torch.from_numpy(inputs["masks_raw"])[:, 0]
        labels = torch.from_numpy(inputs["labels"])
        run = fixture
    if run is None:
        return out.summary()
    print(f"reference {run.info.get('reference_commit', '?')}")
    if out.require(run.directory, "text.npz"):
        with out.section("text"):
            check_text(run, out)
    with out.section("visual"):
        check_visual(run, out, images)
    with out.section("scoring"):
        check_scoring(run, out, images)
    with out.section("training"):
        check_training(run, out, images, masks, labels)
    with out.section("metrics"):
        check_metrics(run, out)
    with out.section("end to end"):
        check_end_to_end(run, out)
    return out.summary()
