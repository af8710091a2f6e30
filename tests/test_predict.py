"""`zsadkit predict` and `zsadkit.predict.predict`: every readable image scored once, unreadable ones listed,
resumable, calibrated thresholds, clear errors before any image is read, equal to the evaluation path."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import zsadkit.data.dataset
from zsadkit import engine
from zsadkit.cli import main
from zsadkit.data.records import Sample
from zsadkit.methods import Prediction, build_method, registered_methods
from zsadkit.methods import base as methods_base
from zsadkit.predict import (
    MapStore,
    PredictError,
    choose_threshold,
    collect_images,
    needs_references,
    predict,
    resolve_backbone,
)
from zsadkit.results import PROVENANCE_COLUMNS

SIZE = 64
TINY = {"backbone": "zsad-tiny", "image_size": SIZE, "progress": False}
TINY_ARGS = ["--backbone", "zsad-tiny", "--image-size", str(SIZE)]


def write_image(path: Path, brightness: int, seed: int = 0) -> Path:
    """A 20x24 RGB image of about `brightness` with a little seeded texture."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).integers(0, 8, size=(20, 24, 3))
    Image.fromarray(np.clip(brightness + noise, 0, 255).astype(np.uint8)).save(path)
    return path


def photo_folder(root: Path) -> Path:
    """parts/: six images in two sub-folders, a truncated PNG, a text file named .png and a notes file."""
    folder = root / "parts"
    for index in range(3):
        write_image(folder / "line_a" / f"{index}.png", 40 + 30 * index, seed=index)
        write_image(folder / "line_b" / f"{index}.png", 150 + 30 * index, seed=10 + index)
    complete = (folder / "line_a" / "0.png").read_bytes()
    (folder / "line_b" / "truncated.png").write_bytes(complete[: len(complete) // 2])
    (folder / "line_b" / "words.png").write_text("not an image\n")
    (folder / "notes.txt").write_text("not an image either\n")
    return folder


class BrightnessDetector:
    """A stand-in method whose score is the image's mean value and whose map is its per-pixel mean: scores that
    separate bright from dark images exactly."""

    def __init__(self, requires: bool = False) -> None:
        self.requires_references = requires
        self.memory: torch.Tensor | None = None

    def fit_references(self, images: torch.Tensor) -> None:
        self.memory = images

    def predict(self, images: torch.Tensor, class_names: Sequence[str]) -> Prediction:
        maps = images.mean(dim=1)
        return Prediction(image_scores=maps.flatten(1).mean(dim=1), anomaly_maps=maps)


@pytest.fixture
def brightness(monkeypatch: pytest.MonkeyPatch) -> str:
    """Register "test-brightness" (and "test-needs-references") for one test."""

    def builder(requires: bool):
        def build(backbone: str = "", pretrained: str = "", image_size: int = SIZE, device: str = "cpu",
                  backbone_seed: int = 0, train_seed: int = 0, checkpoint: str = "", **options: object):
            return BrightnessDetector(requires)
        return build

    monkeypatch.setitem(methods_base._REGISTRY, "test-brightness", builder(False))
    monkeypatch.setitem(methods_base._REGISTRY, "test-needs-references", builder(True))
    return "test-brightness"


@pytest.fixture
def image_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every image the dataset reads, in order."""
    reads: list[str] = []
    original = zsadkit.data.dataset.read_image

    def spy(path, what="image"):
        reads.append(str(path))
        return original(path, what)

    monkeypatch.setattr(zsadkit.data.dataset, "read_image", spy)
    return reads


def test_unreadable_files_are_listed_with_a_reason_every_other_image_scored_once_and_a_rerun_adds_nothing(
    tmp_path: Path, capsys, image_reads: list[str]
) -> None:
    folder = photo_folder(tmp_path)
    out = tmp_path / "out"
    argv = ["predict", str(folder), "--method", "clip", "--out", str(out), *TINY_ARGS]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "2 of 8 input image(s) could not be read" in captured.err
    assert "RANDOM weights" in captured.out and "1 non-image file(s) ignored" in captured.out
    scores = pd.read_csv(out / "scores.csv")
    readable = sorted(str(p) for p in folder.rglob("[0-9].png"))
    assert sorted(scores["path"]) == readable and scores["path"].is_unique
    assert {*PROVENANCE_COLUMNS, "path", "score", "class_name", "method"} <= set(scores.columns)
    assert set(scores["weights"]) == {"random"} and set(scores["class_name"]) == {"parts"}
    errors = pd.read_csv(out / "errors.csv").set_index("path")["reason"]
    assert set(errors.index) == {str(folder / "line_b" / "truncated.png"), str(folder / "line_b" / "words.png")}
    assert "truncated" in errors[str(folder / "line_b" / "truncated.png")]
    assert "cannot identify image" in errors[str(folder / "line_b" / "words.png")]
    for path in readable:  # maps mirror the input's relative paths
        relative = Path(path).relative_to(folder.parent).with_suffix("")
        assert Image.open(out / "maps" / f"{relative}.png").size == (24, 20)
        assert np.load(out / "maps" / f"{relative}.npy").dtype == np.float16
    run = json.loads((out / "run.json").read_text())
    assert run["random_weights"] and run["counts"]["unreadable"] == 2 and run["settings"]["method"] == "clip"

    first = (out / "scores.csv").read_bytes()
    image_reads.clear()
    assert main(argv) == 1
    assert (out / "scores.csv").read_bytes() == first  # nothing new scored
    assert sorted(image_reads) == sorted(errors.index)  # only the failures are tried again
    assert "0 now, 6 already" in capsys.readouterr().out


def test_a_rerun_scores_only_new_images_and_other_settings_need_force(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "parts"
    for index in range(2):
        write_image(folder / f"{index}.png", 100, seed=index)
    out = tmp_path / "out"
    first = predict(folder, method="clip", out=out, maps="none", **TINY)
    assert first.scored_now == 2
    write_image(folder / "2.png", 100, seed=2)
    second = predict(folder, method="clip", out=out, maps="none", batch_size=1, **TINY)  # batch size may change
    assert second.scored_now == 1 and len(second.scores) == 3
    pd.testing.assert_frame_equal(second.scores.iloc[:2], first.scores)
    with pytest.raises(PredictError, match=r"other settings \(method: 'clip' -> 'clip-ac'\).*--force"):
        predict(folder, method="clip-ac", out=out, maps="none", **TINY)
    assert main(["predict", str(folder), "--method", "clip-ac", "--out", str(out), *TINY_ARGS, "--maps", "none"]) == 2
    assert "--force" in capsys.readouterr().err
    forced = predict(folder, method="clip-ac", out=out, maps="none", force=True, **TINY)
    assert forced.scored_now == 3 and set(pd.read_csv(out / "scores.csv")["method"]) == {"clip-ac"}
    assert not (out / "maps").exists()  # maps="none" writes none


def test_a_row_cut_by_an_interrupted_run_is_scored_again(tmp_path: Path) -> None:
    for index in range(2):
        write_image(tmp_path / "parts" / f"{index}.png", 100, seed=index)
    out = tmp_path / "out"
    predict(tmp_path / "parts", method="clip", out=out, maps="none", **TINY)
    complete = (out / "scores.csv").read_bytes()
    (out / "scores.csv").write_bytes(complete[:-40])  # killed while writing the last row
    again = predict(tmp_path / "parts", method="clip", out=out, maps="none", **TINY)
    assert again.scored_now == 1 and (out / "scores.csv").read_bytes() == complete


def test_calibration_on_separable_scores_picks_a_threshold_that_separates_them(tmp_path: Path, brightness: str,
                                                                                capsys) -> None:
    calibration = tmp_path / "cal"
    for index in range(4):
        write_image(calibration / "good" / f"{index}.png", 30 + 10 * index, seed=index)
        write_image(calibration / "bad" / f"{index}.png", 180 + 10 * index, seed=index)
    inputs = tmp_path / "new"
    write_image(inputs / "dark.png", 35)
    write_image(inputs / "bright.png", 200)
    out = tmp_path / "out"
    assert main(["predict", str(inputs), "--method", brightness, "--out", str(out), "--calibrate",
                 str(calibration), *TINY_ARGS]) == 0
    assert "F1-max" in capsys.readouterr().out
    saved = json.loads((out / "calibration.json").read_text())
    table = pd.read_csv(out / "calibration_scores.csv")
    normal, anomalous = table[table.label == 0]["score"], table[table.label == 1]["score"]
    assert normal.max() <= saved["threshold"] < anomalous.min()
    assert (saved["precision"], saved["recall"], saved["fpr"]) == (1.0, 1.0, 0.0)
    assert len(saved["calibration_set_sha256"]) == 64
    decisions = pd.read_csv(out / "scores.csv").set_index("path")["decision"]
    assert decisions[str(inputs / "dark.png")] == "normal" and decisions[str(inputs / "bright.png")] == "anomalous"


def test_target_fpr_zero_gives_no_false_positive_on_the_calibration_normals(tmp_path: Path, brightness: str) -> None:
    calibration = tmp_path / "cal"
    for index, value in enumerate([20, 40, 60, 210]):  # one bright normal among dark ones
        write_image(calibration / "good" / f"{index}.png", value, seed=index)
    for index, value in enumerate([120, 150, 230]):
        write_image(calibration / "bad" / f"{index}.png", value, seed=index)
    write_image(tmp_path / "new" / "x.png", 100)
    f1_max = predict(tmp_path / "new", method=brightness, calibrate=calibration, **TINY).calibration
    assert f1_max.fpr > 0  # F1-max accepts the bright normal as a false positive here
    result = predict(tmp_path / "new", method=brightness, calibrate=calibration, target_fpr=0.0, **TINY)
    table = pd.read_csv(result.out / "calibration_scores.csv")
    assert (table[table.label == 0]["score"] <= result.threshold).all()
    assert result.calibration.fpr == 0.0 and result.calibration.recall == pytest.approx(1 / 3)
    only_good = tmp_path / "cal_good"
    for index, value in enumerate([20, 40, 60, 80]):
        write_image(only_good / "good" / f"{index}.png", value, seed=index)
    quarter = predict(tmp_path / "new", method=brightness, calibrate=only_good, target_fpr=0.25, **TINY)
    assert quarter.calibration.fpr == 0.25 and quarter.calibration.precision is None
    with pytest.raises(PredictError, match="F1-max calibration needs anomalous images"):
        predict(tmp_path / "new", method=brightness, calibrate=only_good, **TINY)


def test_choose_threshold_rules_with_ties() -> None:
    labels, scores = [0, 0, 0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9, 0.6, 0.95]
    assert choose_threshold(labels, scores, target_fpr=0.0).threshold == 0.9
    assert choose_threshold(labels, scores, target_fpr=0.25).threshold == 0.5  # 0.9 above: 1 of 4 normals
    assert choose_threshold(labels, scores, target_fpr=0.49).threshold == 0.5  # ties: 0.5 never above itself
    assert choose_threshold(labels, scores, target_fpr=0.5).threshold == 0.5  # below 0.5: 3 of 4 above
    assert choose_threshold(labels, scores, target_fpr=0.75).threshold == 0.1
    best = choose_threshold(labels, scores)
    assert best.rule == "f1_max" and best.threshold == 0.5 and best.f1 == pytest.approx(0.8)
    every = choose_threshold([0, 1, 1], [0.0, 0.0, 0.0])  # only "everything anomalous" gets an F1 above 0
    assert every.threshold < 0.0 and every.recall == 1.0
    with pytest.raises(PredictError, match=r"\[0, 1\)"):
        choose_threshold(labels, scores, target_fpr=1.0)


@pytest.mark.parametrize("method", ["clip", "winclip"])
def test_scores_and_maps_equal_the_evaluation_path(tmp_path: Path, method: str) -> None:
    folder = photo_folder(tmp_path)
    for bad in ("truncated.png", "words.png"):
        (folder / "line_b" / bad).unlink()
    references = tmp_path / "refs"
    for index in range(2):
        write_image(references / "good" / f"{index}.png", 90, seed=20 + index)
    few_shot = method == "winclip"
    result = predict(folder, method=method, references=references if few_shot else None, class_name="widget",
                     batch_size=4, **TINY)
    detector = build_method(method, backbone="zsad-tiny", image_size=SIZE, train_seed=111)
    if few_shot:
        dataset = zsadkit.data.dataset.AnomalyDataset(
            [Sample(str(p), None, 0, "widget", "good", "r", "train") for p in sorted((references / "good").iterdir())],
            SIZE)
        detector.fit_references(torch.stack([dataset[i]["image"] for i in range(len(dataset))]))
    samples = [Sample(path, None, 0, "widget", "", "mine", "test") for path in result.scores["path"]]
    expected_scores, expected_maps = [], []
    for _, prediction in engine.predict(detector, samples, image_size=SIZE, batch_size=4, progress=False):
        expected_scores += prediction.image_scores.tolist()
        expected_maps += list(prediction.anomaly_maps)
    assert result.scores["score"].tolist() == expected_scores  # exact: written with repr()
    assert isinstance(result.maps, MapStore) and len(result.maps) == len(samples)
    for path, expected in zip(result.scores["path"], expected_maps, strict=True):
        np.testing.assert_array_equal(result.maps[path], expected.numpy().astype(np.float16))
    assert set(result.scores["shots"]) == ({2} if few_shot else {0})


@pytest.mark.parametrize("method", registered_methods())
def test_every_registered_method_predicts_offline_on_the_tiny_backbone(tmp_path: Path, method: str) -> None:
    write_image(tmp_path / "in" / "a.png", 100)
    write_image(tmp_path / "refs" / "r.png", 90)
    detector = build_method(method, backbone="zsad-tiny", image_size=SIZE)
    references = tmp_path / "refs" if needs_references(detector) else None
    result = predict(tmp_path / "in", method=method, maps="raw", references=references, **TINY)
    assert len(result.scores) == 1 and np.isfinite(result.scores["score"]).all()
    assert result.maps[result.scores["path"][0]].shape == (SIZE, SIZE)
    assert any("RANDOM weights" in note for note in result.notes)
    assert hasattr(detector, "trainable_parameters") == any("untrained" in note for note in result.notes)


def test_headclip_scores_and_run_json_say_the_method_is_a_reconstruction_and_verified_methods_say_nothing(
    tmp_path: Path,
) -> None:
    write_image(tmp_path / "in" / "a.png", 100)
    for method, expected in (("headclip", "reconstructed"), ("clip", None)):
        out = tmp_path / method
        result = predict(tmp_path / "in", method=method, maps="none", out=out, **TINY)
        run = json.loads((out / "run.json").read_text())
        scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
        assert run.get("fidelity") == expected
        if expected is None:
            assert "fidelity" not in scores.columns
        else:
            assert scores["fidelity"].tolist() == [expected] == result.scores["fidelity"].tolist()


def test_bad_method_checkpoint_or_missing_references_fail_before_any_image_is_read(
    tmp_path: Path, brightness: str, image_reads: list[str], capsys
) -> None:
    folder = photo_folder(tmp_path)
    out = tmp_path / "out"
    base = ["predict", str(folder), "--out", str(out), *TINY_ARGS]
    assert main([*base, "--method", "patchcore"]) == 2
    error = capsys.readouterr().err
    assert "unknown method 'patchcore'; registered methods: " in error and "anomalyclip, clip, clip-ac" in error
    assert main([*base, "--method", "test-needs-references"]) == 2
    assert "scores against normal reference images: pass --references" in capsys.readouterr().err
    assert main([*base, "--method", "clip", "--references", str(folder)]) == 2
    assert "method 'clip' takes no references" in capsys.readouterr().err

    vand = build_method("vand", backbone="zsad-tiny", image_size=SIZE)
    vand.save_projections(tmp_path / "vand.safetensors")
    anomalyclip = build_method("anomalyclip", backbone="zsad-tiny", image_size=SIZE)
    anomalyclip.save_prompts(tmp_path / "prompts.safetensors")
    save_file({"fc.0.weight": torch.zeros(8, 8)}, str(tmp_path / "other_backbone.safetensors"))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    torch.save({"model_state": datetime.date(2024, 1, 1)}, tmp_path / "pickled_object.pyth")  # not allow-listed
    trained = {"param/contexts": torch.zeros(1)}
    save_file(trained, str(tmp_path / "epoch_001.safetensors"), metadata={"fingerprint": json.dumps({"method": "coop"})})
    for method, checkpoint, expected in [
        ("anomalyclip", "vand.safetensors", "does not fit method 'anomalyclip' on backbone 'zsad-tiny'"),
        ("vand", "prompts.safetensors", "does not fit method 'vand' on backbone 'zsad-tiny'"),
        ("vand", "other_backbone.safetensors", "does not fit method 'vand'"),
        ("anomalyclip", "epoch_001.safetensors", "a checkpoint of method 'coop', not of 'anomalyclip'"),
        ("clip", "vand.safetensors", "takes no checkpoint"),
        ("vand", "garbage.pth", "garbage.pth: "),
        ("inctrl", "pickled_object.pyth", "not a checkpoint of tensors that can be loaded safely"),
    ]:
        assert main([*base, "--method", method, "--checkpoint", str(tmp_path / checkpoint)]) == 2, method
        assert expected in capsys.readouterr().err, (method, checkpoint)
    assert image_reads == [] and not out.exists()


def test_references_from_a_good_only_folder_with_shots_make_winclip_few_shot(tmp_path: Path) -> None:
    write_image(tmp_path / "in" / "a.png", 100)
    references = tmp_path / "refs"
    for index in range(3):
        write_image(references / "good" / f"{index}.png", 90, seed=index)
    write_image(references / "bad" / "x.png", 250)  # of a from-folder layout only good/ is used
    zero_shot = predict(tmp_path / "in", method="winclip", maps="none", **TINY)
    few_shot = predict(tmp_path / "in", method="winclip", references=references, shots=2, maps="none", **TINY)
    assert few_shot.scores["shots"].tolist() == [2] and few_shot.scores["reference_seed"].tolist() == [111]
    assert few_shot.scores["score"][0] != zero_shot.scores["score"][0]
    with pytest.raises(PredictError, match="4 shots asked, but the references of class 'in' hold 3"):
        predict(tmp_path / "in", method="winclip", references=references, shots=4, **TINY)


def test_inputs_from_files_globs_and_a_from_folder_manifest(tmp_path: Path, capsys) -> None:
    parts = tmp_path / "parts"
    write_image(parts / "good" / "a.png", 50)
    write_image(parts / "bad" / "b.png", 200)
    assert main(["data", "from-folder", str(parts), "--out", str(parts / "manifest.csv")]) == 0
    images, ignored = collect_images([parts / "manifest.csv"])
    assert [(i.key, i.class_name) for i in images] == [("parts/good/a", "parts"), ("parts/bad/b", "parts")]
    images, ignored = collect_images([str(parts / "*" / "*.png"), parts / "good" / "a.png"], class_name="bolt")
    assert [(i.key, i.class_name) for i in images] == [("parts/bad/b", "bolt"), ("parts/good/a", "bolt")]
    images, ignored = collect_images([parts / "good"])  # a folder named good/ takes its parent's name
    assert [i.class_name for i in images] == ["parts"] and ignored == []
    images, ignored = collect_images([parts / "good" / "a.png"])
    assert images[0].class_name == "object"
    images, _ = collect_images([parts / "good" / "a.png", parts / "bad" / "b.png"])  # as a shell expands a glob
    assert [i.key for i in images] == ["parts/good/a", "parts/bad/b"]
    with pytest.raises(PredictError, match="matches no file"):
        collect_images([str(parts / "*.jpg")])
    with pytest.raises(PredictError, match="no such input file or folder"):
        collect_images([tmp_path / "missing"])


def test_the_output_folder_inside_an_input_folder_is_not_searched(tmp_path: Path) -> None:
    write_image(tmp_path / "parts" / "a.png", 50)
    out = tmp_path / "parts" / "scored"
    predict(tmp_path / "parts", method="clip", out=out, **TINY)
    again = predict(tmp_path / "parts", method="clip", out=out, **TINY)
    assert again.scores["path"].tolist() == [str(tmp_path / "parts" / "a.png")] and again.ignored == 0


def test_needs_references_is_read_from_the_method_or_its_config() -> None:
    assert needs_references(BrightnessDetector(requires=True))
    assert not needs_references(BrightnessDetector(requires=False))
    for name in ["clip", "clip-ac", "winclip", "vand", "coop", "anomalyclip"]:  # references optional or unused
        assert not needs_references(build_method(name, backbone="zsad-tiny", image_size=SIZE)), name


def test_unset_backbone_settings_are_the_methods_paper_setting() -> None:
    assert resolve_backbone("inctrl") == ("ViT-B-16-plus-240", "laion400m_e32", 240)
    assert resolve_backbone("winclip") == ("ViT-B-16-plus-240", "laion400m_e31", 240)
    assert resolve_backbone("anomalyclip") == ("ViT-L-14-336", "openai", 518)
    assert resolve_backbone("inctrl", "zsad-tiny") == ("zsad-tiny", "", 112)
    assert resolve_backbone("inctrl", "ViT-B-16", image_size=224) == ("ViT-B-16", "openai", 224)
    assert resolve_backbone("vand", pretrained="~/w.pt") == ("ViT-L-14-336", "~/w.pt", 518)
