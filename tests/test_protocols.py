"""The papers' protocols as data: runs, table shaping, published names, comparison with the published numbers."""

from __future__ import annotations

import pandas as pd
import pytest

from zsadkit.protocols import (
    beside_published,
    domain,
    paper_tables,
    protocol,
    published_dataset_name,
    published_method_name,
    reported,
)


def rows(method: str, dataset: str, values: dict[tuple[str, str], float], class_name: str = "mean") -> list[dict]:
    return [dict(method=method, dataset=dataset, class_name=class_name, level=level, metric=metric, value=value,
                 note="") for (level, metric), value in values.items()]


METRICS = {("image", "auroc"): 0.9, ("image", "ap"): 0.8, ("image", "f1_max"): 0.7, ("pixel", "auroc"): 0.95,
           ("pixel", "aupro_cflow200"): 0.6, ("pixel", "aupro"): 0.5}


def test_anomalyclip_protocol_is_visa_to_mvtec_and_mvtec_to_the_other_sixteen() -> None:
    anomalyclip = protocol("anomalyclip")
    assert anomalyclip.runs[0] == ("visa", ("mvtec",))
    train, tests = anomalyclip.runs[1]
    assert train == "mvtec" and len(tests) == 16 and "mvtec" not in tests
    assert anomalyclip.runs_for("") == [["synth-aux", ["synth-target"]]]
    assert anomalyclip.runs_for("/data", ablation=True) == [["visa", ["mvtec"]], ["mvtec", ["visa"]]]
    with pytest.raises(KeyError, match="known: .*anomalyclip"):
        protocol("patchcore")


def test_names_and_domains() -> None:
    assert published_dataset_name("dtd_synthetic") == "DTD-Synthetic" and published_dataset_name("x") == "x"
    assert published_method_name("clip-ac") == "CLIP-AC" and published_method_name("a variant") == "a variant"
    assert domain("kvasir") == "medical" and domain("synth-target") == "industrial"
    with pytest.raises(KeyError, match="no domain"):
        domain("my_parts")


def test_tables_keep_the_reported_metrics_of_each_domain() -> None:
    frame = pd.DataFrame(rows("anomalyclip", "mvtec", METRICS) + rows("anomalyclip", "kvasir", METRICS))
    tables = paper_tables(frame, "anomalyclip")
    assert set(tables) == {"table1", "table2"}
    assert set(tables["table1"].dataset) == {"mvtec"} and set(tables["table2"].dataset) == {"kvasir"}
    assert set(zip(tables["table1"].level, tables["table1"].metric, strict=True)) == {
        ("image", "auroc"), ("image", "ap"), ("pixel", "auroc"), ("pixel", "aupro_cflow200")}
    exact = reported(frame, "anomalyclip", pro="exact")
    assert ("pixel", "aupro") in set(zip(exact.level, exact.metric, strict=True))
    assert "aupro_cflow200" not in set(exact.metric)


def test_our_means_sit_beside_the_published_values_under_the_papers_names() -> None:
    frame = pd.DataFrame(rows("anomalyclip", "mvtec", METRICS) + rows("anomalyclip", "mvtec", METRICS, "bottle"))
    comparison = beside_published(frame, "anomalyclip")
    mvtec = comparison[(comparison.dataset == "MVTec AD") & (comparison.method == "AnomalyCLIP")]
    image_auroc = mvtec[(mvtec.level == "image") & (mvtec.metric == "auroc")].iloc[0]
    assert image_auroc.ours == pytest.approx(90.0) and image_auroc.published == pytest.approx(91.5)
    assert image_auroc["diff"] == pytest.approx(-1.5)
    assert set(comparison.method) == {"AnomalyCLIP"}  # only the methods we ran
    assert "bottle" not in set(comparison.class_name)  # class means only
    assert "f1_max" not in set(comparison.metric)  # AnomalyCLIP's tables do not report F1-max
