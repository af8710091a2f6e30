"""`python -m zsadkit.verify anomalyclip DIR` passes on the fixture copy and fails when an array is changed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from zsadkit.verify import Comparison
from zsadkit.verify.anomalyclip import REFERENCE_FILES

FIXTURES = Path(__file__).parent / "fixtures" / "anomalyclip"


def run_verify(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zsadkit.verify", "anomalyclip", str(directory)],
                          capture_output=True, text=True, timeout=600)


def test_verify_passes_on_the_reference_fixture() -> None:
    result = run_verify(FIXTURES)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert len(lines) >= 100 and all(line.startswith("ok") for line in lines)
    for expected in ("text.npz:text_features ", "visual_dpam.npz:patch_tokens", "scoring_top.npz:anomaly_map_smoothed",
                     "train_all.npz:grad_step1__ctx_pos", "metrics_outputs.json:clsB__pixel-aupro",
                     "e2e_test_py_metrics.json:top:03__pixel-auroc"):
        assert any(expected in line for line in lines), expected
    assert "arrays within tolerance" in result.stdout


def test_verify_fails_and_names_the_array_when_a_reference_value_is_changed(tmp_path: Path) -> None:
    for name in ("run_info.json", "state_dict.npz", "prompt_learner_init.npz", "inputs.npz"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    text = dict(np.load(FIXTURES / "text.npz"))
    text["text_features"] = text["text_features"] + 1e-3
    np.savez(tmp_path / "text.npz", **text)
    result = run_verify(tmp_path)
    assert result.returncode == 1
    assert any(line.startswith("FAIL") and "text.npz:text_features " in line for line in result.stdout.splitlines())
    assert any(line.startswith("ok") and "text.npz:prompts" in line for line in result.stdout.splitlines())


def test_verify_reports_missing_fixture_files(tmp_path: Path) -> None:
    result = run_verify(tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and "state_dict.npz" in fails[0] and "missing" in fails[0]


def test_a_malformed_config_value_is_one_fail_line_naming_the_key(tmp_path: Path) -> None:
    for name in ("state_dict.npz", "prompt_learner_init.npz", "inputs.npz"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    info = json.loads((FIXTURES / "run_info.json").read_text())
    info["cfg"]["n_ctx"] = [12]
    (tmp_path / "run_info.json").write_text(json.dumps(info))
    result = run_verify(tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and fails[0].startswith("FAIL  fixture"), result.stdout
    assert "run_info.json cfg: 'n_ctx' must be an integer, got list [12]" in fails[0]


def test_verify_fails_naming_every_missing_reference_file(tmp_path: Path) -> None:
    for name in ("run_info.json", "state_dict.npz", "prompt_learner_init.npz", "inputs.npz"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    result = run_verify(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in REFERENCE_FILES:
        assert any(line.startswith("FAIL") and name in line and "required file absent" in line for line in lines), name
    assert not any(line.startswith("ok") for line in lines)
    for name in ("e2e_btad_synth", "e2e_test_py_metrics.json"):
        assert f"skipped: {name} absent" in lines
    assert f"{len(REFERENCE_FILES)} required files missing" in result.stdout


def test_verify_skips_absent_end_to_end_files_and_passes(tmp_path: Path) -> None:
    for path in FIXTURES.iterdir():
        if path.is_file() and not path.name.startswith("e2e_"):
            shutil.copy(path, tmp_path / path.name)
    result = run_verify(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped: e2e_btad_synth absent" in result.stdout.splitlines()
    assert "e2e_test_py_metrics.json:" not in result.stdout


def test_comparison_with_nothing_checked_is_a_failure(capsys) -> None:
    empty = Comparison()
    assert empty.summary() == 1
    assert "nothing was checked" in capsys.readouterr().out
    one = Comparison()
    one.check("x", [1.0], [1.0], atol=0.0)
    assert one.summary() == 0


def test_an_unexpected_fixture_format_is_one_fail_line_and_the_other_checks_go_on(tmp_path: Path) -> None:
    copy = tmp_path / "anomalyclip"
    shutil.copytree(FIXTURES, copy)
    expected = json.loads((copy / "e2e_test_py_metrics.json").read_text())
    expected["transform_samples"]["img_extra"] = ["e2e_btad_synth/01/test/ok/000.png"]  # a list, not a path
    (copy / "e2e_test_py_metrics.json").write_text(json.dumps(expected))
    result = run_verify(copy)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and "e2e_transform_samples img_extra" in fails[0]
    assert "transform_samples.img_extra must be an image path" in fails[0] and "got list" in fails[0]
    assert any(line.startswith("ok") and "e2e_test_py_metrics.json:top:03__pixel-auroc" in line
               for line in result.stdout.splitlines())  # the checks after it still ran
