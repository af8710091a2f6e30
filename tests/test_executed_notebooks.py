"""The executed notebooks of `make reproduce` (results/smoke/executed/) hold no warning, traceback or stale
progress bar. CI runs `make reproduce` before `make test`; without a smoke run there is nothing to scan."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from zsadkit.experiment import RunConfig  # noqa: E402
from zsadkit.reproduce import load_registry  # noqa: E402

EXECUTED = Path(__file__).resolve().parent.parent / "results" / "smoke" / "executed"
PROBLEM = re.compile(r"Warning\b|Traceback|\d+%\|")


def problems_in(notebook: Path) -> list[str]:
    """Outputs that are warnings (stderr or text), tracebacks or progress-bar remnants like "0%| 0/10"."""
    found = []
    for index, cell in enumerate(json.loads(notebook.read_text())["cells"]):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                found.append(f"cell {index}: {output.get('ename')}: {output.get('evalue')}")
                continue
            text = "".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", ""))
            if PROBLEM.search(text) or output.get("name") == "stderr":
                found.append(f"cell {index}: {text.strip()[:200]}")
    return found


def test_the_scan_finds_warnings_tracebacks_and_stale_progress_bars(tmp_path: Path) -> None:
    cells = [{"cell_type": "code", "outputs": [{"output_type": "stream", "name": "stderr",
                                                "text": "UserWarning: something"}]},
             {"cell_type": "code", "outputs": [{"output_type": "display_data",
                                                "data": {"text/plain": "predict:   0%|   | 0/10"}}]},
             {"cell_type": "code", "outputs": [{"output_type": "error", "ename": "ValueError", "evalue": "x"}]},
             {"cell_type": "code", "outputs": [{"output_type": "stream", "name": "stdout", "text": "AUROC 91%"}]}]
    path = tmp_path / "n.ipynb"
    path.write_text(json.dumps({"cells": cells}))
    assert len(problems_in(path)) == 3


def test_executed_smoke_notebooks_are_clean() -> None:
    executed = sorted(EXECUTED.glob("*.ipynb"))
    if not executed:
        pytest.skip(f"no executed notebooks under {EXECUTED}: run `make reproduce` first (CI does)")
    _, entries = load_registry()
    assert {path.stem for path in executed} >= {e.name for e in entries if "smoke" in e.profiles}
    found = {path.name: problems_in(path) for path in executed}
    assert not {name: lines for name, lines in found.items() if lines}


def test_smoke_figures_carry_the_random_weights_banner_and_keep_their_title(tmp_path: Path) -> None:
    fig, axis = plt.subplots()
    fig.suptitle("AnomalyCLIP Table 8")
    RunConfig().save_figure(fig, tmp_path / "f.png")
    assert "AnomalyCLIP Table 8" in fig._suptitle.get_text() and "RANDOM weights" in fig._suptitle.get_text()
    fig, axis = plt.subplots()
    RunConfig(pretrained="openai").save_figure(fig, tmp_path / "g.png")
    assert fig._suptitle is None  # pretrained weights: no banner
    assert (tmp_path / "f.png").stat().st_size > 1000
