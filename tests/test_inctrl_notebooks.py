"""The three InCTRL notebooks run under papermill on reduced smoke grids and write their outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import papermill
import pytest
import torch

from zsadkit.data.synthetic import SyntheticConfig
from zsadkit.results import RESULT_COLUMNS, read_results

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str, tmp_path: Path, **parameters) -> str:
    executed = tmp_path / f"{name}.executed.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOKS / f"{name}.ipynb"), str(executed),
        parameters={"out_dir": str(tmp_path), **parameters}, kernel_name="python3", cwd=str(NOTEBOOKS),
        progress_bar=False,
    )
    return executed.read_text()


def test_walkthrough_writes_the_residual_maps_and_shows_the_reshape_scrambling(tmp_path):
    text = execute("40_inctrl_walkthrough", tmp_path, interactive=False, image_size=64)
    output = tmp_path / "inctrl" / "walkthrough"
    for figure in ("residual_maps.png", "batch_reshape.png"):
        assert (output / figure).stat().st_size > 10_000, figure
    scores = pd.read_csv(output / "scores.csv").set_index("score").value
    assert set(scores.index) == {"s_p", "s_i", "s_a", "s_h", "s(x)"}
    assert scores["s(x)"] == pytest.approx((scores["s_h"] + scores["s_p"]) / 2, abs=1e-6)
    layout = pd.read_csv(output / "batch_reshape.csv")
    reference = layout[(layout.layout == "reference") & (layout["sample"] == 0)]
    assert list(reference["query tokens from (sample, layer)"]) == ["(0, 0)", "(1, 0)", "(0, 1)"]
    scores_by_layout = pd.read_csv(output / "batch_layout_scores.csv").groupby("layout")["|difference|"].max()
    assert scores_by_layout["per_sample"] < 1e-6 < scores_by_layout["reference"]
    assert "RANDOM weights" in text


def test_tables_notebook_writes_mean_and_std_over_seeds_beside_the_published_grid(tmp_path):
    official = tmp_path / "official_prompts"  # official prompt files replace the draw of seed 0
    official.mkdir()
    classes = SyntheticConfig().target_classes
    for name in classes:
        torch.save([torch.rand(3, 64, 64) for _ in range(2)], official / f"{name}.pt")
    text = execute("41_inctrl_tables", tmp_path, image_size=64, shots=[2], prompt_seeds=[0, 1], steps_per_epoch=2,
                   baselines=["winclip+", "vand"], official_prompt_sets={"synth-target/2": str(official)},
                   cache_root=str(tmp_path / "cache"))
    output = tmp_path / "inctrl" / "tables"
    results = read_results(output / "results.csv")
    assert set(RESULT_COLUMNS) <= set(results.columns)
    assert set(results.method) == {"inctrl", "winclip+", "vand"}
    assert dict(results.groupby("method").reference_seed.unique().map(sorted)) == {
        "inctrl": [0, 1], "winclip+": [0, 1], "vand": [1]}  # VAND skips the official tensors ...
    assert "vand few-shot: synth-target, K = 2, seed 0 skipped" in text  # ... and says so
    n_seeds = pd.read_csv(output / "summary.csv").groupby("method").n_seeds.unique().map(list)
    assert dict(n_seeds) == {"inctrl": [2], "vand": [1], "winclip+": [2]}
    assert set(results.level) == {"image"} and (results.weights == "random").all()
    summary = pd.read_csv(output / "summary.csv")
    mean = summary.query("method == 'inctrl' and class_name == 'mean' and metric == 'auroc'").iloc[0]
    per_seed = results.query("method == 'inctrl' and class_name == 'mean' and metric == 'auroc'").value
    assert mean.value == pytest.approx(per_seed.mean()) and mean["std"] == pytest.approx(per_seed.std(ddof=0))
    assert mean.n_seeds == 2
    assert set(pd.read_csv(output / "table1.csv").metric) == {"auroc"}
    assert set(pd.read_csv(output / "table2.csv").metric) == {"ap"}
    comparison = pd.read_csv(output / "tables_vs_published.csv")
    visa = comparison.query("method == 'InCTRL' and dataset == 'VisA' and metric == 'auroc' and shots == 2")
    assert list(visa.published) == [85.8]
    sets = json.loads((output / "prompt_sets" / "synth-target.json").read_text())
    assert {(row["shots"], row["seed"]) for row in sets["sets"]} == {(2, 0), (2, 1)}
    assert {row["class_name"]: row["official_file"] for row in sets["sets"] if row["seed"] == 0} == {
        name: f"{official}/{name}.pt" for name in classes}  # the files used, not the draw they replaced
    assert all(len(row["images"]) == 2 for row in sets["sets"] if row["seed"] == 1)
    selection = pd.read_csv(output / "epoch_selection.csv")
    assert list(selection.selected_epoch) == [1] and selection.checkpoint[0].endswith("epoch_001.safetensors")
    assert (output / "auroc_auprc_by_k.png").stat().st_size > 10_000


def test_ablations_notebook_runs_a_reduced_grid_and_a_rerun_computes_no_cell(tmp_path):
    variants = ["T+P+I (full InCTRL)", "P only", "reference batch reshape"]
    parameters = dict(image_size=64, prompt_seeds=[0], steps_per_epoch=2, variants=variants,
                      cache_root=str(tmp_path / "cache"))
    text = execute("42_inctrl_ablations", tmp_path, **parameters)
    output = tmp_path / "inctrl"
    results = read_results(output / "ablations.csv")
    assert set(results.variant) == set(variants)
    comparison = pd.read_csv(output / "ablations_vs_published.csv")
    assert {"T+P+I (full InCTRL)", "P only"} <= set(comparison.method)  # the published (untranscribed) rows beside
    assert (output / "ablation_grid.png").stat().st_size > 10_000
    assert "grid: 3 cells, 3 distinct, 0 stored" in text
    # trained with the reference's scrambling (batch 16), tested per sample (no warning at the test batch of 8)
    assert set(re.findall(r"batch_reshape='reference' at batch (\d+)", text)) == {"16"}
    assert "reference batch reshape: trained 1 epoch" in text and "with the per-sample layout" in text
    first = {name: (output / name).read_bytes() for name in ("ablations.csv", "ablations_summary.csv")}
    again = execute("42_inctrl_ablations", tmp_path, **parameters)
    assert "3 stored in" in again and "0 to compute serially" in again
    assert "trained 1 epoch" not in again  # nothing trained: the cells were read from the store
    assert {name: (output / name).read_bytes() for name in first} == first


@pytest.mark.slow
def test_tables_and_ablation_notebooks_run_their_full_smoke_grids(tmp_path):
    execute("41_inctrl_tables", tmp_path, image_size=64, steps_per_epoch=5, prompt_seeds=[0, 1],
            cache_root=str(tmp_path / "cache"))
    results = read_results(tmp_path / "inctrl" / "tables" / "results.csv")
    assert set(results.method) == {"inctrl", "winclip+", "vand"} and set(results.shots) == {2, 4}
    execute("42_inctrl_ablations", tmp_path, image_size=64, cache_root=str(tmp_path / "cache"))
    assert len(set(read_results(tmp_path / "inctrl" / "ablations.csv").variant)) == 13
