"""The 01_your_images notebook scores a synthetic folder under papermill, with its widgets on: they never block."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import papermill

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "01_your_images.ipynb"


def test_your_images_notebook_scores_calibrates_and_draws_the_grid_with_widgets_on(tmp_path: Path) -> None:
    executed = tmp_path / "executed.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK), str(executed), kernel_name="python3", cwd=str(NOTEBOOK.parent), progress_bar=False,
        parameters={"out_dir": str(tmp_path), "image_size": 64, "n_grid": 3, "interactive": True},
        execution_timeout=300,
    )
    scores = pd.read_csv(tmp_path / "your_images" / "clip" / "scores.csv")
    assert len(scores) == 20 and set(scores["weights"]) == {"random"}
    assert set(scores["decision"]) <= {"normal", "anomalous"} and scores["threshold"].nunique() == 1
    calibration = json.loads((tmp_path / "your_images" / "clip" / "calibration.json").read_text())
    assert calibration["rule"] == "target_fpr" and calibration["fpr"] <= 0.1
    assert (tmp_path / "your_images" / "grid.png").stat().st_size > 10_000
    text = executed.read_text()
    assert "RANDOM weights" in text and "application/vnd.jupyter.widget-view+json" in text
