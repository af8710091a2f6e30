"""`python -m zsadkit.verify vand DIR` against the reference VAND/April-GAN fixture."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zsadkit.verify import vand as verify_vand

FIXTURE = Path(__file__).parent / "fixtures" / "vand"


@pytest.mark.slow
def test_verification_fails_when_a_reference_map_is_perturbed(tmp_path, capsys):
    copy = tmp_path / "vand"
    shutil.copytree(FIXTURE, copy)
    with np.load(copy / "zero_shot.npz") as data:
        arrays = {key: data[key] for key in data.files}
    arrays["anomaly_map"] = arrays["anomaly_map"] + 1e-3
    np.savez(copy / "zero_shot.npz", **arrays)
    assert verify_vand.main(copy) == 1
    assert "FAIL  anomaly map (sum over layers)" in capsys.readouterr().out


def _copy_fixture(tmp_path: Path, run_info_edits: dict) -> Path:
    copy = tmp_path / "vand"
    shutil.copytree(FIXTURE, copy)
    info = json.loads((copy / "run_info.json").read_text())
    (copy / "run_info.json").write_text(json.dumps({**info, **run_info_edits}))
    return copy


def test_missing_fixture_files_are_an_error_line_and_a_nonzero_exit(tmp_path, capsys):
    assert verify_vand.main(tmp_path) == 1
    out = capsys.readouterr().out
    assert "FAIL  fixture" in out and "state_dict.npz" in out and "run_info.json" in out and "within tolerance" not in out


def test_one_missing_fixture_file_fails_instead_of_being_skipped(tmp_path, capsys):
    copy = tmp_path / "vand"
    shutil.copytree(FIXTURE, copy)
    (copy / "pos_embedding.npz").unlink()
    assert verify_vand.main(copy) == 1
    assert "missing ['pos_embedding.npz']" in capsys.readouterr().out


def test_a_missing_required_run_info_key_is_named(tmp_path, capsys):
    copy = tmp_path / "vand"
    shutil.copytree(FIXTURE, copy)
    info = json.loads((copy / "run_info.json").read_text())
    del info["act_layer"]
    (copy / "run_info.json").write_text(json.dumps(info))
    assert verify_vand.main(copy) == 1
    assert "run_info.json: missing key 'act_layer'" in capsys.readouterr().out


@pytest.mark.parametrize(("edit", "named"), [({"text_heads": [2]}, "'text_heads' must be an integer, got list [2]"),
                                             ({"features_list": 24}, "'features_list' must be a list of integers"),
                                             ({"vision_heads": "two"}, "'vision_heads' must be an integer")])
def test_a_malformed_run_info_value_is_one_fail_line_naming_the_key(tmp_path, edit, named):
    copy = _copy_fixture(tmp_path, edit)
    result = subprocess.run([sys.executable, "-m", "zsadkit.verify", "vand", str(copy)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and fails[0].startswith("FAIL  fixture") and named in fails[0], result.stdout


def test_settings_are_read_from_the_fixture_directory(tmp_path):
    copy = _copy_fixture(tmp_path, {"features_list": [3, 9, 15, 21], "text_heads": 4, "act_layer": "QuickGELU"})
    with np.load(copy / "inputs.npz") as data:
        inputs = {key: data[key] for key in data.files}
    with np.load(copy / "text_prompts.npz") as data:
        prompts = {key: data[key] for key in data.files}
    inputs["cls_name"] = np.array(["bottle", "bottle"])
    prompts["bottle"] = prompts.pop("candle")
    np.savez(copy / "inputs.npz", **inputs)
    np.savez(copy / "text_prompts.npz", **prompts)
    _, _, settings = verify_vand.load_fixture_model(copy)
    assert settings.layers == (3, 9, 15, 21)
    assert settings.text_heads == 4 and settings.quick_gelu is True and settings.vision_heads == 2
    assert settings.class_names == ["bottle", "bottle"]
    assert settings.image_size == 112 and settings.pos_embedding_key == "resized_8x8"
    assert settings.notes == []


def test_a_recorded_layer_list_that_differs_from_the_reference_run_fails(tmp_path, capsys):
    copy = _copy_fixture(tmp_path, {"features_list": [5, 12, 18, 24]})
    assert verify_vand.main(copy) == 1
    assert "FAIL  raw tokens, layers 5/12/18/24" in capsys.readouterr().out


def test_a_class_name_without_reference_text_embeddings_is_named(tmp_path, capsys):
    copy = tmp_path / "vand"
    shutil.copytree(FIXTURE, copy)
    with np.load(copy / "inputs.npz") as data:
        inputs = {key: data[key] for key in data.files}
    inputs["cls_name"] = np.array(["candle", "screw"])
    np.savez(copy / "inputs.npz", **inputs)
    assert verify_vand.main(copy) == 1
    assert "text_prompts.npz: missing key 'screw'" in capsys.readouterr().out


def test_zero_checks_do_not_pass(monkeypatch, capsys):
    monkeypatch.setattr(verify_vand, "run_checks", lambda directory, out: None)
    assert verify_vand.main(FIXTURE) == 1
    assert "nothing was checked" in capsys.readouterr().out


def test_an_array_of_another_format_is_one_fail_line_and_the_other_parts_still_run(tmp_path, capsys):
    copy = tmp_path / "vand"
    shutil.copytree(FIXTURE, copy)
    with np.load(copy / "train.npz") as data:
        arrays = {key: data[key] for key in data.files}
    del arrays["losses"]
    np.savez(copy / "train.npz", **arrays)
    assert verify_vand.main(copy) == 1
    out = capsys.readouterr().out
    assert "FAIL  training steps" in out and "KeyError" in out and "'losses'" in out
    assert "ok    anomaly map (sum over layers)" in out  # the zero-shot part ran after the failed one


def test_python_m_zsadkit_verify_vand_passes_on_the_reference_fixture():
    result = subprocess.run([sys.executable, "-m", "zsadkit.verify", "vand", str(FIXTURE)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all 40 arrays within tolerance" in result.stdout
    assert "FAIL" not in result.stdout
    assert "fixture defect" in result.stdout  # the aliased step-1 snapshot is reported, not hidden
