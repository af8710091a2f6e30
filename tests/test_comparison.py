"""The comparison of every registered method (zsadkit.comparison, notebook 60_compare_methods): every method is a
contender, the leaderboard averages seeds, ranks, and puts published values and protocol flags beside ours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import papermill
import pytest

from zsadkit import comparison
from zsadkit.methods import registered_methods
from zsadkit.results import PROVENANCE_COLUMNS, read_results

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SMOKE_LEADERBOARD = Path(__file__).resolve().parent.parent / "results" / "smoke" / "compare" / "leaderboard.csv"
INTERVALS = ["value", "ci_low", "ci_high", "seeds", "std", "rank"]


def test_every_registered_method_is_a_contender() -> None:
    assert {contender.method for contender in comparison.contenders()} == set(registered_methods())
    few_shot = {c.name: c.shots for c in comparison.contenders() if c.shots}
    assert few_shot == {"winclip+": (1, 2, 4), "inctrl": (4,)}


def test_a_method_protocols_yaml_does_not_list_joins_zero_shot(monkeypatch) -> None:
    monkeypatch.setattr(comparison, "registered_methods", lambda: [*registered_methods(), "newmethod"])
    joined = [c for c in comparison.contenders() if c.method == "newmethod"]
    assert [(c.name, c.runner, c.described) for c in joined] == [("newmethod", "zero_shot", False)]


def test_unknown_methods_and_shots_are_named() -> None:
    with pytest.raises(KeyError, match="not registered"):
        comparison.contenders(["nomethod"])
    with pytest.raises(KeyError, match="not contenders"):
        comparison.contenders(shots={"clip+": [1]})


def mean_rows(method: str, dataset: str, values: list[float], train_seeds: list[int | None],
              prompt_seeds: list[int | None], shots: int = 0) -> pd.DataFrame:
    """Class-mean image AUROC rows of `result_rows` shape, one per seed."""
    rows = []
    for value, train_seed, prompt_seed in zip(values, train_seeds, prompt_seeds, strict=True):
        row = {column: "" for column in PROVENANCE_COLUMNS}
        row.update(method=method, dataset=dataset, class_name="mean", level="image", metric="auroc", value=value,
                   note="", ci_low=value - 0.05, ci_high=value + 0.05, confidence=0.95, n_resamples=100,
                   shots=shots, train_seed=train_seed, reference_seed=prompt_seed, image_size=224, backbone_seed=0,
                   train_set="visa" if train_seed is not None else "none", epochs="")
        rows.append(row)
    return pd.DataFrame(rows)


def test_leaderboard_averages_seeds_ranks_and_flags_published_protocols() -> None:
    results = pd.concat([mean_rows("clip", "mvtec", [0.80], [None], [None]),
                         mean_rows("anomalyclip", "mvtec", [0.90, 0.92], [111, 112], [None, None]),
                         mean_rows("winclip+", "mvtec", [0.93, 0.95], [None, None], [0, 1], shots=1)],
                        ignore_index=True)
    board = comparison.leaderboard(results, comparison.contenders()).set_index("method")
    assert list(board.reset_index().columns[:11]) == ["method", "dataset", "class_name", "level", "metric",
                                                      *INTERVALS]
    assert board.loc["anomalyclip", "value"] == pytest.approx(0.91)
    assert board.loc["anomalyclip", "std"] == pytest.approx(np.std([0.90, 0.92], ddof=1))
    assert board.loc["anomalyclip", "seeds"] == "111,112"
    assert (board.loc["anomalyclip", "ci_low"], board.loc["anomalyclip", "ci_high"]) == pytest.approx((0.86, 0.96))
    assert board["rank"].to_dict() == {"winclip+": 1.0, "anomalyclip": 2.0, "clip": 3.0}
    # AnomalyCLIP Table 1 (MVTec AD image AUROC): CLIP 74.1, a baseline it ran without the baseline's code
    assert board.loc["clip", "published"] == pytest.approx(0.741)
    assert board.loc["clip", "diff"] == pytest.approx(0.80 - 0.741)
    assert "without its code" in board.loc["clip", "protocol_flags"]
    assert board.loc["anomalyclip", "published"] == pytest.approx(0.915)
    assert board.loc["anomalyclip", "protocol_flags"] == ""


def run_notebook(tmp_path: Path, **parameters) -> Path:
    papermill.execute_notebook(str(NOTEBOOKS / "60_compare_methods.ipynb"), str(tmp_path / "60.out.ipynb"),
                               parameters=dict(out_dir=str(tmp_path), **parameters), kernel_name="python3",
                               cwd=str(NOTEBOOKS), progress_bar=False)
    return tmp_path / "compare"


def check_leaderboard(board: pd.DataFrame, labels: set[tuple[str, int]]) -> None:
    assert set(comparison.LEADERBOARD_COLUMNS) <= set(board.columns)
    image_auroc = board[(board.level == "image") & (board.metric == "auroc")]
    assert set(zip(image_auroc.method, image_auroc.shots, strict=True)) == labels
    assert image_auroc[["value", "ci_low", "ci_high", "rank"]].notna().all().all()
    assert ((image_auroc.ci_low <= image_auroc.value) & (image_auroc.value <= image_auroc.ci_high)).all()
    few_shot = image_auroc[image_auroc.shots > 0]
    assert (few_shot.n_seeds == 2).all() and few_shot["std"].notna().all()
    pixel_auroc = board[(board.level == "pixel") & (board.metric == "auroc")]  # the synthetic sets have masks
    assert {(m, k) for m, k in zip(pixel_auroc.method, pixel_auroc.shots, strict=True)} == {
        label for label in labels}  # every contender maps pixels
    assert pixel_auroc[["value", "ci_low", "ci_high"]].notna().all().all()
    assert (pixel_auroc.ci_low <= pixel_auroc.ci_high).all()  # a percentile interval of few resamples may miss


def test_compare_notebook_runs_a_reduced_smoke_grid(tmp_path: Path) -> None:
    output = run_notebook(tmp_path, methods=["clip", "anomalyclip", "inctrl"], shots={"inctrl": [2]},
                          image_size=64, subsample=4, epochs=1, steps_per_epoch=1, prompt_seeds=[0, 1],
                          n_resamples=50, pixel_resamples=5)
    board = read_results(output / "leaderboard.csv")
    check_leaderboard(board, {("clip", 0), ("anomalyclip", 0), ("inctrl", 2)})
    paired = pd.read_csv(output / "paired_with_best.csv")
    best = paired[(paired.method == paired.best_method) & (paired.shots == paired.best_shots)]
    assert not best.empty and (best.difference == 0).all()
    cost = pd.read_csv(output / "cost.csv")
    assert cost.set_index("method").loc["anomalyclip", "trainable_parameters"] > 0
    for figure in ("leaderboard_heatmap.png", "critical_difference.png", "cost_vs_accuracy.png"):
        assert (output / figure).stat().st_size > 1000


def test_the_smoke_leaderboard_has_intervals_for_every_registered_method() -> None:
    if not SMOKE_LEADERBOARD.exists():
        pytest.skip(f"{SMOKE_LEADERBOARD} is absent: run `make reproduce` first (CI does)")
    board = read_results(SMOKE_LEADERBOARD)
    board = board[board.shots.isin([0, 1, 4])]  # the smoke profile runs WinCLIP+ at K = 1 and 4 only
    labels = {(c.name, k) for c in comparison.contenders() for k in c.shots or (0,) if k != 2}
    check_leaderboard(board, labels)
