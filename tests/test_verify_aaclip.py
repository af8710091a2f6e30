"""`python -m zsadkit.verify aaclip DIR` against the reference AA-CLIP fixture: passes on the copy, fails naming a
perturbed array, reads its settings from the directory, and refuses missing files and runs that check nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zsadkit.verify import aaclip as verify_aaclip

FIXTURE = Path(__file__).parent / "fixtures" / "aaclip"
CONFIG_B = Path(__file__).parent / "fixtures" / "aaclip_config_b"  # another configuration, same format


def _copy(tmp_path: Path, run_info_edits: dict | None = None) -> Path:
    copy = tmp_path / "aaclip"
    shutil.copytree(FIXTURE, copy)
    if run_info_edits:
        info = json.loads((copy / "run_info.json").read_text())
        (copy / "run_info.json").write_text(json.dumps({**info, **run_info_edits}))
    return copy


def _only(monkeypatch, *checks: str) -> None:
    """Run only the named check functions of the verify module (the others become no-ops)."""
    for name in ("check_setup", "check_text", "check_stage1", "check_anchors_after_stage1", "check_stage2",
                 "check_inference"):
        if name not in checks:
            monkeypatch.setattr(verify_aaclip, name, lambda *args, **kwargs: None)


def test_python_m_zsadkit_verify_aaclip_passes_on_the_reference_fixture() -> None:
    result = subprocess.run([sys.executable, "-m", "zsadkit.verify", "aaclip", str(FIXTURE)], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert len(lines) >= 150 and all(line.startswith("ok") for line in lines)
    for expected in ("pos_embedding.npz:resized_8x8", "text_init.npz:candle__text_adapter3_raw",
                     "stage1_bs2.npz:patch_features_plus_cls ", "stage1_bs2.npz:grad__3.fc.0.weight",
                     "stage2_forward.npz:block_out", "stage2_train.npz:param_after_step2__det_proj.fc.weight",
                     "inference.npz:Medical__fused_image_score", "run_info.json:metrics_eval_Industrial"):
        assert any(expected in line for line in lines), expected
    assert "arrays within tolerance" in result.stdout
    assert "param_after_step1__* equal param_after_step2__*" in result.stdout  # the fixture defect is reported


@pytest.mark.slow
def test_verify_passes_on_a_fixture_of_another_configuration(tmp_path: Path) -> None:
    """84 px, levels 4/10/16/24, 2 text and 4 image adapters, λ 0.2/0.15, LeakyReLU projections, V-V from block 10,
    γ = 0.3, batches of 3, MVTec AD classes (tests/fixtures/aaclip_config_b/README.md)."""
    copy = tmp_path / "config_b"
    shutil.copytree(CONFIG_B, copy)
    shutil.copy(FIXTURE / "state_dict.npz", copy / "state_dict.npz")
    result = subprocess.run([sys.executable, "-m", "zsadkit.verify", "aaclip", str(copy)], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stage1_bs3.npz:patch_features_plus_cls " in result.stdout and "param_after_step1__* equal" not in result.stdout
    settings = verify_aaclip.FixtureRun(copy).settings
    assert settings.config.levels == (4, 10, 16, 24) and settings.config.projection_relu
    assert (settings.config.text_adapter_layers, settings.config.image_adapter_layers) == (2, 4)
    assert settings.image_size == 84 and settings.notes == []


def test_a_perturbed_reference_map_fails_naming_the_array(tmp_path: Path, monkeypatch, capsys) -> None:
    copy = _copy(tmp_path)
    arrays = dict(np.load(copy / "inference.npz"))
    arrays["Industrial__anomaly_map"] = arrays["Industrial__anomaly_map"] + 1e-3
    np.savez(copy / "inference.npz", **arrays)
    _only(monkeypatch, "check_inference")
    assert verify_aaclip.main(copy) == 1
    out = capsys.readouterr().out
    assert "FAIL  inference.npz:Industrial__anomaly_map " in out
    assert "ok    inference.npz:Industrial__anomaly_map_per_level" in out  # the other arrays still pass


def test_a_changed_loss_or_gradient_fails(tmp_path: Path, monkeypatch, capsys) -> None:
    copy = _copy(tmp_path)
    arrays = dict(np.load(copy / "stage1_bs1.npz"))
    arrays["grad__1.fc.0.weight"] = arrays["grad__1.fc.0.weight"] * 1.01
    np.savez(copy / "stage1_bs1.npz", **arrays)
    (copy / "stage1_bs2.npz").unlink()
    _only(monkeypatch, "check_stage1")
    assert verify_aaclip.main(copy) == 1
    out = capsys.readouterr().out
    assert "FAIL  stage1_bs1.npz:grad__1.fc.0.weight" in out and "ok    stage1_bs1.npz:loss_recomputed" in out


def test_settings_are_read_from_the_fixture_directory(tmp_path: Path) -> None:
    copy = _copy(tmp_path)
    run = verify_aaclip.FixtureRun(copy)
    config = run.settings.config
    assert config.levels == (6, 12, 18, 24) and config.text_adapter_layers == 3 and config.image_adapter_layers == 6
    assert config.surgery_first_layer == 6 and config.projection_relu is False
    assert run.settings.image_size == 112 and run.settings.quick_gelu is False
    assert run.settings.stage1_files == ["stage1_bs1.npz", "stage1_bs2.npz"]
    assert any("no 'levels'" in note for note in run.settings.notes)
    edited = _copy(tmp_path / "edited", {"levels": [5, 12, 18, 24], "text_adapt_weight": 0.3, "act_layer": "QuickGELU",
                                         "surgery_block_indices_1based": list(range(8, 25))})
    settings = verify_aaclip.FixtureRun(edited).settings
    assert settings.config.levels == (5, 12, 18, 24) and settings.config.text_adapter_weight == 0.3
    assert settings.quick_gelu is True and settings.config.surgery_first_layer == 8
    assert not any("no 'levels'" in note for note in settings.notes)


def test_a_recorded_setting_that_differs_from_the_reference_run_fails(tmp_path: Path, monkeypatch, capsys) -> None:
    copy = _copy(tmp_path, {"image_adapt_weight": 0.2})
    _only(monkeypatch, "check_stage2")
    assert verify_aaclip.main(copy) == 1
    out = capsys.readouterr().out
    assert "FAIL  stage2_forward.npz:seg_tokens" in out
    assert "ok    stage2_forward.npz:epoch_text_feature" in out  # the text side does not depend on λ_image


def test_a_missing_fixture_file_is_an_error_naming_it(tmp_path: Path, capsys) -> None:
    copy = _copy(tmp_path)
    (copy / "stage2_train.npz").unlink()
    assert verify_aaclip.main(copy) == 1
    out = capsys.readouterr().out
    assert "FAIL  fixture" in out and "stage2_train.npz" in out


@pytest.mark.parametrize(("edit", "named"), [
    ({"text_heads": [2]}, "'text_heads' must be an integer, got list [2]"),
    ({"surgery_block_indices_1based": [6.5]}, "'surgery_block_indices_1based' must be a list of integers"),
    ({"image_adapt_weight": "0.1"}, "'image_adapt_weight' must be a number, got str '0.1'"),
])
def test_a_malformed_run_info_value_is_one_fail_line_naming_the_key(tmp_path: Path, edit: dict, named: str) -> None:
    copy = _copy(tmp_path, edit)
    result = subprocess.run([sys.executable, "-m", "zsadkit.verify", "aaclip", str(copy)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and fails[0].startswith("FAIL  fixture") and named in fails[0], result.stdout


def test_a_missing_run_info_key_is_named(tmp_path: Path, capsys) -> None:
    copy = _copy(tmp_path)
    info = json.loads((copy / "run_info.json").read_text())
    del info["act_layer"]
    (copy / "run_info.json").write_text(json.dumps(info))
    assert verify_aaclip.main(copy) == 1
    assert "run_info.json: missing key 'act_layer'" in capsys.readouterr().out


def test_zero_checks_do_not_pass(monkeypatch, capsys) -> None:
    monkeypatch.setattr(verify_aaclip, "run_checks", lambda directory, out: None)
    assert verify_aaclip.main(FIXTURE) == 1
    assert "nothing was checked" in capsys.readouterr().out


def test_an_array_of_another_format_is_one_fail_line_and_the_other_parts_still_run(tmp_path: Path, monkeypatch,
                                                                                   capsys) -> None:
    copy = _copy(tmp_path)
    arrays = dict(np.load(copy / "inference.npz"))
    del arrays["Industrial__image_score"], arrays["Medical__image_score"]
    np.savez(copy / "inference.npz", **arrays)
    _only(monkeypatch, "check_setup", "check_inference")
    assert verify_aaclip.main(copy) == 1
    out = capsys.readouterr().out
    assert "FAIL  inference (inference.npz)" in out and "image_score" in out
    assert "ok    pos_embedding.npz:resized_8x8" in out
