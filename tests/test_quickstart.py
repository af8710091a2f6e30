"""The quickstart notebook runs under papermill on the embedded default and writes a tidy CSV and a figure."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import papermill

from zsadkit.results import RESULT_COLUMNS

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "00_quickstart.ipynb"


def test_quickstart_notebook_writes_results_and_figure_in_smoke_profile(tmp_path: Path) -> None:
    executed = tmp_path / "executed.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK), str(executed), parameters={"out_dir": str(tmp_path)}, kernel_name="python3",
        cwd=str(NOTEBOOK.parent), progress_bar=False,
    )
    results = pd.read_csv(tmp_path / "quickstart" / "results.csv")
    assert set(RESULT_COLUMNS) <= set(results.columns)
    assert set(results["weights"]) == {"random"} and set(results["profile"]) == {"smoke"}
    assert set(results["dataset"]) == {"synth-target"}
    means = results[results["class_name"] == "mean"].set_index(["level", "metric"])["value"]
    for key in [("image", "auroc"), ("image", "ap"), ("pixel", "auroc"), ("pixel", "aupro_cflow200")]:
        assert 0.0 <= means[key] <= 1.0
    per_class = results[(results["class_name"] != "mean") & (results["metric"] == "auroc")]
    assert per_class["class_name"].nunique() >= 2
    assert (tmp_path / "quickstart" / "anomaly_maps.png").stat().st_size > 10_000
    assert "RANDOM weights" in executed.read_text()  # the smoke run says its numbers are a pipeline check
