"""The three AnomalyCLIP notebooks run under papermill in the smoke profile and write their outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import papermill
import pytest

from zsadkit.results import RESULT_COLUMNS

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str, tmp_path: Path, **parameters) -> str:
    executed = tmp_path / f"{name}.executed.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOKS / f"{name}.ipynb"), str(executed),
        parameters={"out_dir": str(tmp_path), "cache_root": str(tmp_path / "cache"), **parameters},
        kernel_name="python3", cwd=str(NOTEBOOKS), progress_bar=False,
    )
    return executed.read_text()


def test_walkthrough_writes_attention_training_step_and_map_figures(tmp_path: Path) -> None:
    # `interactive` left at its default under papermill: no widgets (they could stall nbclient), the run completes
    text = execute("10_anomalyclip_walkthrough", tmp_path, sample_index=3, attention_layer=2)
    output = tmp_path / "anomalyclip" / "walkthrough"
    for figure in ("dpam_attention.png", "local_features_qk_vs_vv.png", "anomaly_maps.png"):
        assert (output / figure).stat().st_size > 10_000, figure
    diagonal = pd.read_csv(output / "attention_diagonal.csv").set_index("variant")["diagonal_mass"]
    # DPAM's point: Q-Q, K-K and V-V attention put more mass on the diagonal than Q-K
    assert min(diagonal["Q-Q"], diagonal["K-K"], diagonal["V-V"]) > diagonal["Q-K"]
    step = pd.read_csv(output / "training_step.csv")
    assert list(step["step"]) == [0, 1] and step["total"].iloc[1] < step["total"].iloc[0]
    assert "RANDOM weights" in text


def test_tables_notebook_trains_and_writes_tables_and_published_comparison(tmp_path: Path) -> None:
    execute("11_anomalyclip_tables", tmp_path, epochs=1)
    output = tmp_path / "anomalyclip"
    table1 = pd.read_csv(output / "table1.csv")
    assert set(RESULT_COLUMNS) <= set(table1.columns)
    assert set(table1["dataset"]) == {"synth-target"} and set(table1["train_set"]) == {"synth-aux"}
    assert set(zip(table1.level, table1.metric, strict=True)) == {("image", "auroc"), ("image", "ap"), ("pixel", "auroc"),
                                                      ("pixel", "aupro_cflow200")}
    assert table1["class_name"].nunique() == 5  # 4 classes + mean
    defined = table1["value"].notna()
    assert table1.loc[defined, "value"].between(0, 1).all() and defined.mean() > 0.9
    assert table1.loc[~defined, "note"].str.len().gt(0).all()  # an undefined metric says why
    assert len(pd.read_csv(output / "table2.csv")) == 0
    comparison = pd.read_csv(output / "tables_vs_published.csv")
    mvtec = comparison.query("dataset == 'MVTec AD' and level == 'pixel' and metric == 'auroc'")["published"]
    assert list(mvtec) == [91.1]
    assert comparison.query("dataset == 'synth-target'")["ours"].notna().all()
    assert (output / "checkpoints" / "synth-aux" / "epoch_001.safetensors").is_file()
    assert (output / "prompts_synth-aux.safetensors").is_file()


def test_ablations_notebook_runs_a_reduced_grid_with_published_values_beside(tmp_path: Path) -> None:
    execute("12_anomalyclip_ablations", tmp_path, tables=["Table 5", "Fig. 8"],
            fig8_values={"n_ctx": [4], "n_layers": [2]})
    output = tmp_path / "anomalyclip"
    results = pd.read_csv(output / "ablations.csv")
    assert set(results["table"]) == {"Table 5", "Fig. 8"}
    assert set(results["variant"]) == {"no local, no global loss", "global loss only", "local loss only",
                                       "local + global (full)", "E = 4", "N (layers) = 2"}
    assert json.loads(results.query("variant == 'E = 4'")["overrides"].iloc[0]) == {"n_ctx": 4}
    untrained = results.query("variant == 'no local, no global loss'")["train_set"]
    assert set(untrained) == {"none"}
    comparison = pd.read_csv(output / "ablations_vs_published.csv")
    published = comparison.query("table == 'Table 5' and method == 'local loss only' and dataset == 'VisA' "
                                 "and level == 'pixel' and metric == 'auroc'")["published"]
    assert list(published) == [95.2]
    assert (output / "ablation_figures.png").stat().st_size > 10_000


@pytest.mark.slow
def test_ablations_notebook_runs_the_full_smoke_grid(tmp_path: Path) -> None:
    execute("12_anomalyclip_ablations", tmp_path,
            fig8_values={"n_ctx": [4, 12], "deep_depth": [1, 3], "deep_length": [1, 4], "n_layers": [1, 4]})
    results = pd.read_csv(tmp_path / "anomalyclip" / "ablations.csv")
    assert {"Table 4", "Table 5", "Table 7", "Table 9", "Table 10", "Table 11", "Table 13", "Fig. 6", "Fig. 8"} == set(
        results["table"])


def test_force_retrains_the_prompts_and_a_plain_rerun_resumes_and_says_so(tmp_path: Path) -> None:
    from zsadkit import reproduce

    out = tmp_path / "results"
    overrides = {"epochs": 1, "cache_root": str(tmp_path / "cache")}
    checkpoint = out / "anomalyclip" / "checkpoints" / "synth-aux" / "epoch_001.safetensors"
    reproduce.reproduce("smoke", out_dir=out, only=["11_anomalyclip_tables"], overrides=overrides, progress=False)
    first = checkpoint.stat().st_mtime_ns
    executed = out / "executed" / "11_anomalyclip_tables.ipynb"

    def printed() -> str:
        cells = json.loads(executed.read_text())["cells"]
        return "".join("".join(o.get("text", "")) for c in cells for o in c.get("outputs", []))

    assert "synth-aux: trained 1 epochs" in printed()
    (out / "anomalyclip" / "table1.csv").unlink()  # incomplete: a plain rerun resumes the trained epoch
    reproduce.reproduce("smoke", out_dir=out, only=["11_anomalyclip_tables"], overrides=overrides, progress=False)
    assert checkpoint.stat().st_mtime_ns == first and "synth-aux: resumed from epoch 1" in printed()
    reproduce.reproduce("smoke", out_dir=out, only=["11_anomalyclip_tables"], overrides=overrides, force=True,
                        progress=False)
    assert checkpoint.stat().st_mtime_ns > first  # --force rewrote the checkpoint: it trained again
    assert "synth-aux: trained 1 epochs" in printed() and "resumed from" not in printed()


@pytest.mark.slow
def test_walkthrough_with_a_chosen_sample_and_layer_completes_five_times_in_five(tmp_path: Path) -> None:
    for run in range(5):
        (tmp_path / str(run)).mkdir()
        execute("10_anomalyclip_walkthrough", tmp_path / str(run), sample_index=3, attention_layer=2)
        assert (tmp_path / str(run) / "anomalyclip" / "walkthrough" / "anomaly_maps.png").is_file()


def test_widgets_only_in_a_jupyter_frontend_never_in_a_batch_run(monkeypatch) -> None:
    from zsadkit.experiment import interactive_session

    for name in ("JPY_SESSION_NAME", "VSCODE_PID", "ZSADKIT_BATCH"):
        monkeypatch.delenv(name, raising=False)
    assert not interactive_session()  # papermill by hand: no frontend
    monkeypatch.setenv("JPY_SESSION_NAME", "/home/me/10_anomalyclip_walkthrough.ipynb")  # set by Jupyter Server
    assert interactive_session()
    monkeypatch.setenv("ZSADKIT_BATCH", "1")  # the runner, even when started from a notebook's terminal
    assert not interactive_session() and interactive_session(True) and not interactive_session(False)
