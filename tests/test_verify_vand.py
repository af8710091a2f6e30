"""`python -m zsadkit.verify vand DIR` against the reference VAND/April-GAN fixture."""

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
    assert "FAIL anomaly map (sum over layers)" in capsys.readouterr().out


def test_missing_fixture_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="state_dict.npz"):
        verify_vand.main(tmp_path)


def test_python_m_zsadkit_verify_vand_passes_on_the_reference_fixture():
    result = subprocess.run([sys.executable, "-m", "zsadkit.verify", "vand", str(FIXTURE)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "40/40 checks passed" in result.stdout
    assert "FAIL" not in result.stdout
    assert "fixture defect" in result.stdout  # the aliased step-1 snapshot is reported, not hidden
