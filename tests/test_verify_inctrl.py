"""`python -m zsadkit.verify inctrl DIR` against the official InCTRL code's fixture (tests/fixtures/inctrl)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zsadkit.verify import inctrl as verify_inctrl

FIXTURE = Path(__file__).parent / "fixtures" / "inctrl"


def edit_npz(path: Path, **changes) -> None:
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value(arrays[key]) if callable(value) else value
    np.savez(path, **arrays)


def test_python_m_zsadkit_verify_inctrl_passes_on_the_reference_fixture():
    result = subprocess.run([sys.executable, "-m", "zsadkit.verify", "inctrl", str(FIXTURE)], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all 261 arrays within tolerance" in result.stdout and "FAIL" not in result.stdout
    for checked in ("test format bs2 reference reshape: final_score", "train format bs2 per-sample layout vs reference",
                    "train step bs2 given the reference's M_p, s_a: grad__diff_head.projection1.weight",
                    "eval-mode bs1: grad__adapter.fc.0.weight"):
        assert checked in result.stdout


def test_perturbed_arrays_other_layers_and_missing_data_fail_by_name_and_the_other_parts_still_run(tmp_path, capsys):
    copy = tmp_path / "inctrl"
    shutil.copytree(FIXTURE, copy, ignore=shutil.ignore_patterns("eval_bs1_query1.npz"))
    edit_npz(copy / "eval_bs2_buggy.npz", final_score=lambda value: value + 1e-4)
    edit_npz(copy / "trainfmt_eval_bs1_query1.npz", holistic_map=None)
    # a wrong gradient whose values are all far below the old absolute 1e-3 fails at its own scale
    edit_npz(copy / "train_step_bs2.npz", **{"grad__diff_head_ref.bn2.bias": lambda value: value * 0 + 4e-5})
    info = json.loads((copy / "run_info.json").read_text())
    (copy / "run_info.json").write_text(json.dumps({**info, "out_layers": [6, 9, 11]}))
    assert verify_inctrl.main(copy) == 1
    out = capsys.readouterr().out
    assert "FAIL  test format bs2 reference reshape: final_score" in out
    assert "FAIL  train step bs2 (end to end): grad__diff_head_ref.bn2.bias" in out
    assert "FAIL  train format, batch 1, query 1" in out and "'holistic_map'" in out
    assert "FAIL  test format bs1 q0: query_layer_tokens" in out  # block 6 is not what the reference tapped
    assert "FAIL  eval_bs1_query1.npz" in out and "required file absent" in out
    assert "eval-mode bs1: loss " in out and "train step bs2: focal_final" in out  # the later parts ran


def test_missing_files_are_an_error_and_a_nonzero_exit(tmp_path, capsys):
    assert verify_inctrl.main(tmp_path) == 1
    out = capsys.readouterr().out
    assert "FAIL  fixture" in out and "clip_state_dict.npz" in out and "inputs.npz" in out
    copy = tmp_path / "inctrl"
    shutil.copytree(FIXTURE, copy, ignore=shutil.ignore_patterns("inctrl_state_dict_init.npz"))
    assert verify_inctrl.main(copy) == 1
    out = capsys.readouterr().out
    assert "missing ['inctrl_state_dict_init.npz']" in out and "within tolerance" not in out


@pytest.mark.parametrize(("edit", "named"), [({"vision_heads": [2]}, "'vision_heads' must be an integer, got list"),
                                             ({"train_types": [1, 2]}, "'train_types' must be an object type")])
def test_a_malformed_run_info_value_is_one_fail_line_naming_the_key(tmp_path, edit, named):
    copy = tmp_path / "inctrl"
    shutil.copytree(FIXTURE, copy)
    info = json.loads((copy / "run_info.json").read_text())
    (copy / "run_info.json").write_text(json.dumps({**info, **edit}))
    result = subprocess.run([sys.executable, "-m", "zsadkit.verify", "inctrl", str(copy)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and fails[0].startswith("FAIL  fixture") and named in fails[0], result.stdout


def test_settings_are_read_from_the_fixture_directory(tmp_path):
    copy = tmp_path / "inctrl"
    shutil.copytree(FIXTURE, copy, ignore=shutil.ignore_patterns("*query*.npz", "*buggy.npz", "train_step_*.npz"))
    info = json.loads((copy / "run_info.json").read_text())
    (copy / "run_info.json").write_text(json.dumps({**info, "out_layers": [3, 6, 9], "vision_heads": 4,
                                                    "test_types": "bottle", "train_types": ["screw", "cat"]}))
    edit_npz(copy / "inputs.npz", normal_list=lambda value: np.concatenate([value, value[:1]]))
    run = verify_inctrl.load_fixture(copy)
    assert run.layers == (3, 6, 9) and run.shots == 3 and run.notes == [
        "run_info.json has no 'text_heads': using 2, as the fixture README documents"]
    assert run.test_types == ["bottle", "bottle"] and run.train_types == ["screw", "cat"]
    assert run.clip.visual.transformer.resblocks[0].attn.num_heads == 4
    (copy / "run_info.json").write_text(json.dumps({**info, "train_types": ["candle"]}))
    try:
        verify_inctrl.load_fixture(copy)
    except verify_inctrl.FixtureError as error:
        assert "train_types must name 2 object types" in str(error)
    else:
        raise AssertionError("one train type for two queries was accepted")


def test_zero_checks_do_not_pass(monkeypatch, capsys):
    monkeypatch.setattr(verify_inctrl, "run_checks", lambda directory, out: None)
    assert verify_inctrl.main(FIXTURE) == 1
    assert "nothing was checked" in capsys.readouterr().out
