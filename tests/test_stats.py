"""zsadkit.stats: bootstrap intervals against brute-force resampling, paired differences, Friedman ranks, seeds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from scipy.stats import friedmanchisquare
from sklearn.metrics import average_precision_score, roc_auc_score

from zsadkit import stats
from zsadkit.metrics import (
    ClassSamples,
    Evaluator,
    aupimo,
    aupro,
    aupro_cflow200,
    f1_max,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
)

PIXEL_CONFIG = stats.BootstrapConfig(
    n_resamples=20, seed=5, pro="both", aupimo=True, aupimo_fpr_bounds=(1e-2, 2e-1)
)


def image_class(n_images: int, seed: int, anomalous_share: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores of one class: normal ~ N(0, 1), anomalous ~ N(1.2, 1), rounded (ties)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n_images) < round(anomalous_share * n_images)).astype(int)
    return labels, np.round(rng.normal(size=n_images) + 1.2 * labels, 1)


def pixel_class(seed: int, n_images: int = 14) -> ClassSamples:
    """A class of small maps with 1-2 regions per anomalous image and tied scores."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_images) % 3 != 0
    masks = np.zeros((n_images, 12, 14), dtype=bool)
    for index in np.flatnonzero(labels):
        top, left = rng.integers(0, 8, size=2)
        masks[index, top : top + rng.integers(2, 4), left : left + rng.integers(1, 5)] = True
        if index % 2:
            masks[index, 11, 13] = True
    maps = np.round(rng.normal(size=masks.shape) + 1.3 * masks, 1).astype(np.float32)
    scores = maps.max(axis=(1, 2)) + np.round(rng.normal(scale=0.5, size=n_images), 1)
    ids = np.array([f"img_{index:03d}.png" for index in range(n_images)])
    return ClassSamples("toy", f"class{seed}", ids, labels, scores, masks, maps)


# ---------------------------------------------------------------------------------------------- resampling
def test_resamples_keep_each_class_count_and_are_deterministic_for_a_seed() -> None:
    labels, _ = image_class(30, seed=0)
    indices = stats.resample_indices(labels, 50, seed=3, class_name="bottle")
    assert indices.shape == (50, 30)
    assert (labels[indices] == labels).all()  # normal positions hold normal images, anomalous anomalous
    assert np.array_equal(indices, stats.resample_indices(labels, 50, seed=3, class_name="bottle"))
    assert not np.array_equal(indices, stats.resample_indices(labels, 50, seed=4, class_name="bottle"))
    assert not np.array_equal(indices, stats.resample_indices(labels, 50, seed=3, class_name="cable"))


def test_resampled_images_do_not_depend_on_the_order_the_images_arrived_in() -> None:
    labels, _ = image_class(25, seed=1)
    ids = np.array([f"id{index:02d}" for index in range(25)])
    permutation = np.random.default_rng(0).permutation(25)
    first = ids[stats.resample_indices(labels, 30, 0, "c", ids)]
    second = ids[permutation][stats.resample_indices(labels[permutation], 30, 0, "c", ids[permutation])]
    assert np.array_equal(np.sort(first, axis=1), np.sort(second, axis=1))


def test_repeated_sample_ids_are_an_error() -> None:
    with pytest.raises(ValueError, match="'a' appears more than once"):
        stats.resample_indices([0, 1, 1], 5, 0, "c", ["a", "b", "a"])


# ---------------------------------------------------------------------------------------------- brute force
def test_image_draws_equal_sklearn_on_the_same_resample_indices() -> None:
    labels, scores = image_class(24, seed=2)
    ids = np.array([f"s{index}" for index in range(24)])
    config = stats.BootstrapConfig(n_resamples=40, seed=9, levels=("image",))
    result = stats.bootstrap_class(ClassSamples("toy", "c", ids, labels.astype(bool), scores), config)
    indices = stats.resample_indices(labels, 40, 9, "c", ids)
    brute = {
        "auroc": [roc_auc_score(labels[rows], scores[rows]) for rows in indices],
        "ap": [average_precision_score(labels[rows], scores[rows]) for rows in indices],
        "f1_max": [f1_max(labels[rows], scores[rows]) for rows in indices],
    }
    for metric, values in brute.items():
        np.testing.assert_allclose(result.draws[("image", metric)], values, rtol=0, atol=1e-12)
    assert result.values[("image", "auroc")] == roc_auc_score(labels, scores)


def test_pixel_draws_equal_the_metric_functions_on_the_resampled_stacks() -> None:
    samples = pixel_class(seed=0)
    result = stats.bootstrap_class(samples, PIXEL_CONFIG)
    indices = stats.resample_indices(samples.labels, 20, 5, samples.class_name, samples.sample_ids)
    masks, maps = samples.masks, samples.maps
    metrics = {
        "auroc": pixel_auroc,
        "ap": pixel_ap,
        "f1_max": pixel_f1_max,
        "aupro": aupro,
        "aupro_cflow200": aupro_cflow200,
        "aupimo": lambda masks, maps: aupimo(masks, maps, (1e-2, 2e-1)),
    }
    for metric, function in metrics.items():
        brute = [function(masks[rows], maps[rows]) for rows in indices]
        np.testing.assert_allclose(result.draws[("pixel", metric)], brute, rtol=0, atol=1e-12, err_msg=metric)
        assert result.values[("pixel", metric)] == function(masks, maps)


def test_bootstrap_values_equal_the_evaluator_rows_and_keep_them_unchanged() -> None:
    samples = [pixel_class(seed) for seed in (1, 2)]
    kept: list[stats.ClassBootstrap] = []

    def evaluate(**options: object) -> pd.DataFrame:
        evaluator = Evaluator("toy", pro="both", aupimo=True, aupimo_fpr_bounds=(1e-2, 2e-1), **options)
        for sample in samples:
            evaluator.update(
                [sample.class_name] * sample.labels.size, sample.labels, sample.scores, sample.masks,
                sample.maps, sample_ids=list(sample.sample_ids),
            )  # fmt: skip
        return evaluator.compute()

    plain = evaluate()
    hooked = evaluate(
        class_hook=lambda class_samples: kept.append(stats.bootstrap_class(class_samples, PIXEL_CONFIG))
    )
    assert hooked.equals(plain)
    intervals = stats.bootstrap_rows(kept)
    keys = ["dataset", "class_name", "level", "metric"]
    merged = plain.merge(intervals, on=keys, suffixes=("", "_boot"), validate="one_to_one")
    assert len(merged) == len(plain)
    np.testing.assert_array_equal(merged["value"], merged["value_boot"])
    assert (merged["ci_low"] <= merged["ci_high"]).all()


def test_keep_samples_gives_the_image_scores_for_a_bootstrap_without_a_second_pass() -> None:
    evaluator = Evaluator("toy", pro=None, keep_samples=True)
    names = []
    for class_name, seed in [("a", 0), ("b", 1)]:
        labels, scores = image_class(20, seed)
        evaluator.update([class_name] * 20, labels, scores)
        names += [class_name] * 20
    rows = evaluator.compute()
    samples = evaluator.samples()
    assert list(samples.columns) == ["dataset", "class_name", "sample_id", "label", "score"]
    assert len(samples) == 40 and list(samples.sample_id[:2]) == ["#0", "#1"]
    intervals = stats.bootstrap(
        samples.class_name, samples.label, samples.score, dataset="toy", sample_ids=samples.sample_id,
        config=stats.BootstrapConfig(n_resamples=200),
    )  # fmt: skip
    np.testing.assert_array_equal(intervals["value"], rows["value"])
    with pytest.raises(ValueError, match="keep_samples=True"):
        Evaluator("toy").samples()


# ---------------------------------------------------------------------------------------------- intervals
def test_intervals_contain_the_point_estimate() -> None:
    names, labels, scores = [], [], []
    for index in range(4):
        class_labels, class_scores = image_class(60, seed=10 + index)
        names += [f"c{index}"] * 60
        labels.append(class_labels)
        scores.append(class_scores)
    rows = stats.bootstrap(names, np.concatenate(labels), np.concatenate(scores), dataset="toy")
    ranking = rows[rows.metric.isin(["auroc", "ap"])]
    assert len(ranking) == 10
    assert ((ranking.ci_low <= ranking.value) & (ranking.value <= ranking.ci_high)).all()
    assert (rows.ci_high > rows.ci_low).all()


def test_intervals_shrink_as_the_sample_grows() -> None:
    widths = {}
    for n_images in (40, 400):
        labels, scores = image_class(n_images, seed=3)
        rows = stats.bootstrap(["c"] * n_images, labels, scores, dataset="toy")
        widths[n_images] = (rows.ci_high - rows.ci_low)[rows.class_name == "c"].to_numpy()
    # Ten times the images: about sqrt(10) ~ 3.2 times narrower.
    assert (widths[400] < 0.5 * widths[40]).all()


def test_mean_row_interval_comes_from_the_per_resample_class_means() -> None:
    results = []
    for index in range(3):
        labels, scores = image_class(30, seed=20 + index)
        samples = ClassSamples("toy", f"c{index}", np.array([f"#{i}" for i in range(30)]), labels, scores)
        results.append(
            stats.bootstrap_class(samples, stats.BootstrapConfig(n_resamples=300, levels=("image",)))
        )
    rows = stats.bootstrap_rows(results, confidence=0.9).set_index(["class_name", "metric"])
    means = np.mean([result.draws[("image", "auroc")] for result in results], axis=0)
    assert rows.loc[("mean", "auroc"), "ci_low"] == np.percentile(means, 5)
    assert rows.loc[("mean", "auroc"), "ci_high"] == np.percentile(means, 95)
    assert rows.loc[("mean", "auroc"), "value"] == np.mean([r.values[("image", "auroc")] for r in results])


def test_class_without_normal_images_has_no_interval_and_the_mean_skips_it() -> None:
    labels, scores = image_class(20, seed=4)
    names = ["ok"] * 20 + ["only_anomalous"] * 5
    rows = stats.bootstrap(names, np.r_[labels, np.ones(5)], np.r_[scores, np.arange(5.0)], dataset="toy")
    undefined = rows[(rows.class_name == "only_anomalous") & (rows.metric == "auroc")].iloc[0]
    assert np.isnan(undefined.value) and np.isnan(undefined.ci_low) and np.isnan(undefined.ci_high)
    assert "no normal images" in undefined.note
    mean = rows[(rows.class_name == "mean") & (rows.metric == "auroc")].iloc[0]
    assert mean.n_classes == 1 and "undefined for only_anomalous" in mean.note
    ok = rows[(rows.class_name == "ok") & (rows.metric == "auroc")].iloc[0]
    assert (mean.value, mean.ci_low, mean.ci_high) == (ok.value, ok.ci_low, ok.ci_high)


def test_bad_settings_are_rejected_naming_the_parameter() -> None:
    with pytest.raises(ValueError, match="n_resamples"):
        stats.BootstrapConfig(n_resamples=0)
    with pytest.raises(ValueError, match="seed"):
        stats.BootstrapConfig(seed=-1)
    with pytest.raises(ValueError, match="levels"):
        stats.BootstrapConfig(levels=("image", "region"))
    with pytest.raises(ValueError, match="metrics"):
        stats.BootstrapConfig(metrics=("auc",))
    with pytest.raises(ValueError, match="fpr_bounds"):
        stats.BootstrapConfig(aupimo_fpr_bounds=(1e-4, 1e-5))
    with pytest.raises(ValueError, match="confidence"):
        stats.bootstrap(["c"] * 4, [0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], dataset="toy", confidence=95)


# ---------------------------------------------------------------------------------------------- paired
def paired_runs(seed: int) -> tuple[list[stats.ClassBootstrap], list[stats.ClassBootstrap]]:
    """Two methods on the same two classes; method b sees the images in another order."""
    config = stats.BootstrapConfig(n_resamples=300, seed=seed, levels=("image",))
    a, b = [], []
    for index in range(2):
        labels, scores_a = image_class(40, seed=30 + index)
        scores_b = scores_a + np.random.default_rng(index).normal(scale=0.8, size=40)
        ids = np.array([f"img{i}" for i in range(40)])
        order = np.random.default_rng(100 + index).permutation(40)
        a.append(stats.bootstrap_class(ClassSamples("toy", f"c{index}", ids, labels, scores_a), config))
        b.append(
            stats.bootstrap_class(
                ClassSamples("toy", f"c{index}", ids[order], labels[order], scores_b[order]), config
            )
        )
    return a, b


def test_paired_difference_of_a_method_with_itself_is_exactly_zero() -> None:
    a, _ = paired_runs(seed=0)
    rows = stats.paired_difference(a, a)
    assert len(rows) == 9  # 2 classes + mean, 3 metrics
    assert (rows.difference == 0).all() and (rows.ci_low == 0).all() and (rows.ci_high == 0).all()


def test_paired_difference_uses_the_same_resamples_for_both_methods() -> None:
    a, b = paired_runs(seed=1)
    rows = stats.paired_difference(a, b).set_index(["class_name", "metric"])
    key = ("image", "auroc")
    difference = a[0].draws[key] - b[0].draws[key]
    assert rows.loc[("c0", "auroc"), "ci_low"] == np.percentile(difference, 2.5)
    assert rows.loc[("c0", "auroc"), "ci_high"] == np.percentile(difference, 97.5)
    assert rows.loc[("c0", "auroc"), "difference"] == a[0].values[key] - b[0].values[key]
    # Method b's resamples are the same images as method a's although b saw them in another order: rerunning
    # a on b's order gives identical draws.
    labels, scores = image_class(40, seed=30)
    order = np.random.default_rng(100).permutation(40)
    ids = np.array([f"img{i}" for i in range(40)])
    reordered = stats.bootstrap_class(
        ClassSamples("toy", "c0", ids[order], labels[order], scores[order]),
        stats.BootstrapConfig(n_resamples=300, seed=1, levels=("image",)),
    )
    np.testing.assert_array_equal(reordered.draws[key], a[0].draws[key])


def test_paired_difference_refuses_different_images_or_settings() -> None:
    a, b = paired_runs(seed=2)
    labels, scores = image_class(40, seed=30)
    other_ids = np.array([f"img{i}" for i in range(39)] + ["other.png"])
    config = stats.BootstrapConfig(n_resamples=300, seed=2, levels=("image",))
    renamed = stats.bootstrap_class(ClassSamples("toy", "c0", other_ids, labels, scores), config)
    with pytest.raises(ValueError, match=r"not scored on the same images: 1 id\(s\) only in a .*'img39'"):
        stats.paired_difference(a, [renamed, b[1]])
    reseeded = stats.bootstrap_class(
        ClassSamples("toy", "c0", np.array([f"img{i}" for i in range(40)]), labels, scores),
        stats.BootstrapConfig(n_resamples=300, seed=3, levels=("image",)),
    )
    with pytest.raises(ValueError, match="same config"):
        stats.paired_difference(a, [reseeded, b[1]])
    with pytest.raises(ValueError, match="different classes"):
        stats.paired_difference(a, b[:1])


# ---------------------------------------------------------------------------------------------- Friedman
HAND_TABLE = pd.DataFrame(
    {"A": [0.90, 0.85, 0.70, 0.95], "B": [0.80, 0.86, 0.70, 0.90], "C": [0.70, 0.60, 0.50, 0.92]},
    index=pd.Index(["d1", "d2", "d3", "d4"], name="dataset"),
)


def test_friedman_ranks_and_statistics_on_a_hand_made_table() -> None:
    result = stats.friedman_test(HAND_TABLE)
    # Ranks (1 = best): d1 A1 B2 C3; d2 B1 A2 C3; d3 A and B tie for 1-2 -> 1.5 each, C3; d4 A1 C2 B3.
    expected_ranks = [[1, 2, 3], [2, 1, 3], [1.5, 1.5, 3], [1, 3, 2]]
    np.testing.assert_array_equal(result.ranks.to_numpy(), expected_ranks)
    # Average ranks A 5.5/4 = 1.375, B 7.5/4 = 1.875, C 11/4 = 2.75, best first.
    assert result.average_ranks.to_dict() == {"A": 1.375, "B": 1.875, "C": 2.75}
    # chi2 = 12 N / (k (k + 1)) (sum R^2 - k (k + 1)^2 / 4) = 12*4/12 * (12.96875 - 12) = 3.875
    assert result.chi2 == pytest.approx(3.875, abs=1e-12)
    # F = (N - 1) chi2 / (N (k - 1) - chi2) = 3 * 3.875 / (8 - 3.875) = 2.8181...
    assert result.iman_davenport == pytest.approx(11.625 / 4.125, abs=1e-12)
    # CD = q_0.05(k = 3) sqrt(k (k + 1) / (6 N)) = 2.3437 * sqrt(0.5)
    assert result.q_alpha == pytest.approx(2.343, abs=1e-3)
    assert result.critical_difference == pytest.approx(result.q_alpha * np.sqrt(0.5), abs=1e-12)
    assert 0 < result.chi2_pvalue < 1 and 0 < result.iman_davenport_pvalue < 1


def test_nemenyi_q_alpha_matches_demsar_table_5() -> None:
    table = {2: 1.960, 3: 2.343, 4: 2.569, 5: 2.728, 6: 2.850, 7: 2.949, 8: 3.031, 9: 3.102, 10: 3.164}
    rng = np.random.default_rng(0)
    for k, q_alpha in table.items():
        scores = pd.DataFrame(rng.random((5, k)), columns=[f"m{j}" for j in range(k)])
        assert stats.friedman_test(scores).q_alpha == pytest.approx(q_alpha, abs=1e-3)


def test_friedman_statistic_equals_scipy_without_ties() -> None:
    scores = pd.DataFrame(np.random.default_rng(1).random((8, 4)), columns=list("abcd"))
    expected = friedmanchisquare(*scores.to_numpy().T)
    result = stats.friedman_test(scores)
    assert result.chi2 == pytest.approx(expected.statistic, abs=1e-12)
    assert result.chi2_pvalue == pytest.approx(expected.pvalue, abs=1e-12)


def test_friedman_refuses_missing_values() -> None:
    table = HAND_TABLE.copy()
    table.loc["d3", "B"] = np.nan
    with pytest.raises(ValueError, match="block 'd3', method 'B'"):
        stats.friedman_test(table)


def test_critical_difference_diagram_shows_every_method_and_the_cd() -> None:
    figure = stats.critical_difference_diagram(stats.friedman_test(HAND_TABLE), title="toy")
    assert isinstance(figure, Figure)
    texts = [text.get_text() for text in figure.axes[0].texts]
    assert {"A (1.38)", "B (1.88)", "C (2.75)"} <= set(texts)
    assert any(text.startswith("CD = 1.66") for text in texts)


# ---------------------------------------------------------------------------------------------- seeds
SEED_ROWS = pd.DataFrame(
    {
        "method": ["winclip+"] * 6,
        "dataset": ["mvtec"] * 6,
        "metric": ["auroc"] * 3 + ["ap"] * 3,
        "seed": [0, 1, 2] * 2,
        "value": [0.90, 0.92, 0.94, 0.80, 0.84, np.nan],
        "ci_low": [0.85, 0.88, 0.90, 0.70, 0.76, np.nan],
        "ci_high": [0.95, 0.96, 0.98, 0.90, 0.92, np.nan],
        "confidence": [0.95] * 6,
    }
)


def test_mean_and_std_over_seeds_on_a_hand_table() -> None:
    summary = stats.seed_summary(SEED_ROWS, ("seed",))
    # Grouped by every column but the seed and the per-run results (value, ci_low, ci_high).
    assert list(summary.columns) == [
        "method",
        "dataset",
        "metric",
        "confidence",
        "mean",
        "std",
        "n_seeds",
        "seeds",
    ]
    summary = summary.set_index("metric")
    # auroc: mean 0.92, sample std sqrt(((-0.02)^2 + 0 + 0.02^2) / 2) = 0.02
    assert summary.loc["auroc", "mean"] == pytest.approx(0.92, abs=1e-12)
    assert summary.loc["auroc", "std"] == pytest.approx(0.02, abs=1e-12)
    assert summary.loc["auroc", "n_seeds"] == 3 and summary.loc["auroc", "seeds"] == "0,1,2"
    # ap: seed 2 undefined; mean 0.82, std sqrt((0.02^2 + 0.02^2) / 1) = 0.0283
    assert summary.loc["ap", "mean"] == pytest.approx(0.82, abs=1e-12)
    assert summary.loc["ap", "std"] == pytest.approx(np.sqrt(0.0008), abs=1e-12)
    assert summary.loc["ap", "n_seeds"] == 2


def test_uncertainty_table_reports_seed_spread_beside_the_bootstrap_interval() -> None:
    table = stats.uncertainty_table(SEED_ROWS, ("seed",)).set_index("metric")
    assert table.loc["auroc", "ci_low"] == pytest.approx(0.8766666666666667, abs=1e-12)
    assert table.loc["auroc", "ci_high"] == pytest.approx(0.9633333333333334, abs=1e-12)
    assert table.loc["auroc", "summary"] == "0.920 ± 0.020 (3 seeds), 95 % CI [0.877, 0.963]"


def test_the_default_seed_columns_are_the_provenance_seeds_present() -> None:
    rows = SEED_ROWS.rename(columns={"seed": "reference_seed"})
    assert stats.seed_summary(rows).equals(stats.seed_summary(SEED_ROWS, ("seed",)))
    with pytest.raises(ValueError, match="none of the seed columns"):
        stats.seed_summary(SEED_ROWS)


def test_repeated_seed_within_a_group_is_an_error() -> None:
    rows = pd.concat([SEED_ROWS, SEED_ROWS.iloc[:1]])
    with pytest.raises(ValueError, match="repeat a seed"):
        stats.seed_summary(rows, ("seed",))
