"""The three HeadCLIP notebooks run under papermill on reduced smoke settings and write their outputs, every one of
them marked as a reconstruction."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import papermill

from zsadkit.reproduce import declared_parameters, load_registry, notebook_parameters
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


def test_walkthrough_writes_per_head_maps_head_weight_heatmaps_and_the_joint_score(tmp_path: Path) -> None:
    text = execute("50_headclip_walkthrough", tmp_path, subsample=8, n_figure_samples=2)
    output = tmp_path / "headclip" / "walkthrough"
    for figure in ("per_head_maps.png", "head_weights.png", "maps_and_jas.png"):
        assert (output / figure).stat().st_size > 10_000, figure
    per_head = pd.read_csv(output / "per_head.csv")
    assert list(per_head["head"]) == [1, 2] and (per_head["cls_attention_entropy"] <= per_head["uniform_entropy"]).all()
    weights = pd.read_csv(output / "head_weights.csv")
    assert set(weights["path"]) == {"qk", "vv"} and (weights["before"] == 1.0).all()
    assert (weights["after"] != 1.0).any()  # training moved the head weights
    jas = pd.read_csv(output / "jas.csv")
    expected = jas["beta"] * jas["p_global"] + (1 - jas["beta"]) * jas["pool_max"]
    assert ((jas["jas"] - expected).abs() < 1e-6).all()
    assert set(jas["fidelity"]) == {"reconstructed"} and "RANDOM weights" in text and "reconstructed" in text


def test_tables_notebook_writes_mad_with_its_definition_and_gains_beside_the_claims(tmp_path: Path) -> None:
    execute("51_headclip_tables", tmp_path, subsample=4, mad_image_metrics=[["image", "auroc"]])
    output = tmp_path / "headclip"
    results = pd.read_csv(output / "results.csv")
    assert set(RESULT_COLUMNS) <= set(results.columns)
    assert set(zip(results.method, results.fidelity, strict=True)) == {("headclip", "reconstructed"),
                                                                       ("anomalyclip", "reference")}
    log = pd.read_csv(output / "training_log.csv")
    assert set(zip(log.method, log.fidelity, strict=True)) == {("headclip", "reconstructed"), ("anomalyclip", "reference")}
    industrial = pd.read_csv(output / "headclip_industrial.csv")
    assert set(industrial["dataset"]) == {"synth-target"} and set(industrial["train_set"]) == {"synth-aux"}
    mad = pd.read_csv(output / "mad.csv")
    assert set(mad["metrics"]) == {"image/auroc", "pixel/auroc+pixel/aupro_cflow200"}
    means = results[results.class_name == "mean"].set_index(["method", "level", "metric"])["value"]
    headclip_pixel = mad.query("method == 'headclip' and class_name == 'mean' and level == 'pixel'")["value"].iloc[0]
    assert abs(headclip_pixel - (means[("headclip", "pixel", "auroc")]
                                 + means[("headclip", "pixel", "aupro_cflow200")]) / 2) < 1e-9
    gains = pd.read_csv(output / "gains_vs_claimed.csv").set_index("level")
    assert gains.loc["pixel", "claimed_v2_pp"] == 4.9 and gains.loc["image", "claimed_v2_pp"] == 3.7
    assert set(gains["fidelity"]) == {"reconstructed"}
    assert (output / "mad.png").stat().st_size > 10_000


def test_switches_notebook_runs_a_reduced_grid_with_every_jas_setting(tmp_path: Path) -> None:
    text = execute("52_headclip_switches", tmp_path, subsample=8, last_n=2, parameterisations=["scalar"],
            placements=["both", "vv"], layer_choices=["all"],
            jas_settings={"β=0.5, max": {"jas_beta": 0.5}, "β=1 (global only)": {"jas_beta": 1.0}})
    output = tmp_path / "headclip"
    assert "grid: 4 cells, 4 distinct, 0 stored" in text  # untrained, two trained variants, AnomalyCLIP
    results = pd.read_csv(output / "switches.csv")
    assert set(results["variant"]) == {"untrained (identity head weights)", "scalar / both / all", "scalar / vv / all",
                                       "AnomalyCLIP (trained prompts only)"}
    headclip_rows = results[results.method == "headclip"]
    # the switches in the axes' order, as the serial loop wrote them (grid cells store their keys sorted)
    assert list(results.columns[-3:]) == ["lhw_parameterisation", "lhw_placement", "lhw_layers"]
    assert headclip_rows.overrides.str.startswith('{"lhw_parameterisation"').all()
    assert set(headclip_rows["jas"]) == {"β=0.5, max", "β=1 (global only)"}
    assert set(headclip_rows["fidelity"]) == {"reconstructed"}
    assert set(results.loc[results.variant.str.startswith("untrained"), "train_set"]) == {"none"}
    mad = pd.read_csv(output / "switches_mad.csv")
    assert mad["metrics"].str.len().gt(0).all()
    assert (output / "switches.png").stat().st_size > 10_000


def test_switches_notebook_runs_the_full_grid_in_the_paper_profile_and_one_at_a_time_in_smoke(tmp_path: Path) -> None:
    defaults, entries = load_registry()
    entry = next(entry for entry in entries if entry.name == "52_headclip_switches")
    assert "grid" in declared_parameters(entry)
    grids = {profile: notebook_parameters(entry, defaults, profile, tmp_path, {}).get("grid", "one_at_a_time")
             for profile in ("smoke", "paper")}
    assert grids == {"smoke": "one_at_a_time", "paper": "full"}
