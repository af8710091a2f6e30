"""The three AA-CLIP notebooks run under papermill on a reduced smoke grid and write their outputs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import papermill

from zsadkit.methods.aaclip import build_aaclip
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


def test_walkthrough_writes_the_disentanglement_batch_mixing_features_maps_and_fusion(tmp_path: Path) -> None:
    text = execute("30_aaclip_walkthrough", tmp_path, interactive=False, train_shots=1, stage1_epochs=2)
    output = tmp_path / "aaclip" / "walkthrough"
    for figure in ("anchor_disentanglement.png", "patch_features_2d.png", "level_maps.png"):
        assert (output / figure).stat().st_size > 10_000, figure
    cosines = pd.read_csv(output / "anchor_cosines.csv")
    assert set(cosines["when"]) == {"before stage 1", "after stage 1"} and cosines["cos(T_N, T_A)"].abs().le(1).all()
    mixing = pd.read_csv(output / "vv_batch_mixing.csv").set_index("reading").iloc[:, -1]
    assert mixing["reference code"] > 1e-3 and mixing["per image"] < 1e-5
    fusion = pd.read_csv(output / "fusion.csv")
    assert fusion["fused (transductive, reference)"].between(0, 1).all()
    norms = pd.read_csv(output / "adapter_norms.csv").set_index("quantity")["mean over tokens"]
    assert norms["cos(h, fused)"] > 0.9  # λ = 0.1: the adapter only turns the tokens a little
    assert "RANDOM weights" in text


def test_tables_notebook_trains_tests_and_compares_with_the_authors_log(tmp_path: Path) -> None:
    text = execute("31_aaclip_tables", tmp_path, regimes=[1], stage1_epochs=1, stage2_epochs=1, stage2_batch_size=4)
    output = tmp_path / "aaclip"
    assert "grid: 1 cells, 1 distinct, 0 stored" in text and "synth-aux_1-shot: 4 training images" in text
    table = pd.read_csv(output / "industrial.csv")
    assert set(RESULT_COLUMNS) <= set(table.columns) and {"epoch", "epoch_selected_on_test"} <= set(table.columns)
    assert set(table["dataset"]) == {"synth-target"} and set(table["train_set"]) == {"synth-aux"}
    assert set(zip(table.level, table.metric, strict=True)) == {("image", "auroc"), ("image", "ap"), ("pixel", "auroc"),
                                                                 ("pixel", "ap")}
    assert table["class_name"].nunique() == 5 and not table["epoch_selected_on_test"].any()  # 1 epoch < 15
    assert len(pd.read_csv(output / "medical.csv")) == 0
    assert len(pd.read_csv(output / "train_samples_synth-aux_1-shot.csv")) == 4  # one image per auxiliary class
    comparison = pd.read_csv(output / "tables_vs_published.csv")
    log = comparison.query("source == \"authors' log (means)\" and dataset == 'MVTec AD' and level == 'pixel' "
                           "and metric == 'auroc'")["published"]
    assert list(log) == [91.88]
    retina = comparison.query("source == \"authors' log (per class)\" and dataset == 'Retina OCT / RESC (BMAD)' "
                              "and level == 'image' and metric == 'auroc'")
    assert list(retina["class_name"]) == ["Retina"] and list(retina["published"]) == [81.82]
    quoted = comparison.query("source == 'paper (quoted)' and dataset == 'VisA' and level == 'pixel'")["published"]
    assert list(quoted) == [95.5]
    assert (output / "data_regimes.png").stat().st_size > 10_000
    assert list(pd.read_csv(output / "data_regimes.csv")["train_regime"].astype(str)) == ["1"]

    # loading saved adapters instead of training: the rows carry the epoch recorded in the file's metadata
    saved = build_aaclip("zsad-tiny", "", 112).save_adapters(
        tmp_path / "saved.safetensors", metadata={"epoch": "15", "epoch_selected_on_test": "True"})
    (tmp_path / "loaded").mkdir()
    execute("31_aaclip_tables", tmp_path / "loaded", regimes=["full"], checkpoints={"synth-aux": str(saved)})
    loaded = pd.read_csv(tmp_path / "loaded" / "aaclip" / "industrial.csv")
    assert set(loaded["epoch"]) == {15} and loaded["epoch_selected_on_test"].all()


def test_ablations_notebook_runs_a_reduced_grid_with_readings_and_published_values(tmp_path: Path) -> None:
    variants = ["reference (official code)", "per-image score fusion"]
    text = execute("32_aaclip_ablations", tmp_path, variants=variants, train_shots=1)
    output = tmp_path / "aaclip"
    assert "grid: 1 cells, 1 distinct" in text  # one grid cell: the training both rows share
    assert len(list((output / "grid_cells" / "ablations").glob("*.pkl"))) == 1
    results = pd.read_csv(output / "ablations.csv")
    assert set(results["variant"]) == set(variants)
    assert dict(results.groupby("variant")["reading"].first()) == {"reference (official code)": "code",
                                                                   "per-image score fusion": "ablation"}
    pixel = results.query("level == 'pixel' and metric == 'auroc'").set_index(["variant", "class_name"])["value"]
    # the per-image fusion reuses the reference's training: same maps, other image scores
    pd.testing.assert_series_equal(pixel["reference (official code)"], pixel["per-image score fusion"],
                                   check_names=False)
    comparison = pd.read_csv(output / "ablations_vs_published.csv")
    published = comparison.query("method == '+ disentangle loss (full AA-CLIP)' and level == 'pixel'")["published"]
    assert list(published) == [92.7]
    assert (output / "ablation_figure.png").stat().st_size > 10_000
