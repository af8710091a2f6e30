"""AA-CLIP's protocol as data: its runs, tables and metrics, the printed names (a dataset name with " / " in it, the
reference's class labels), and the comparison of per-class rows with the authors' log."""

from __future__ import annotations

import pandas as pd

from zsadkit.protocols import (
    beside_published,
    domain,
    paper_tables,
    protocol,
    published_class_name,
    published_dataset_name,
    slashed_dataset_names,
)
from zsadkit.results import published_rows


def test_aaclip_protocol_is_visa_to_the_ten_other_sets_and_mvtec_to_visa() -> None:
    aaclip = protocol("aaclip")
    train, tests = aaclip.runs[0]
    assert train == "visa" and len(tests) == 10 and {"bmad_brain", "bmad_liver", "bmad_resc", "cvc300"} <= set(tests)
    assert aaclip.runs[1] == ("mvtec", ("visa",))
    assert aaclip.metrics == (("image", "auroc"), ("image", "ap"), ("pixel", "auroc"), ("pixel", "ap"))
    assert aaclip.runs_for("") == [["synth-aux", ["synth-target"]]]
    assert {domain(name) for name in tests} == {"industrial", "medical"} and domain("bmad_resc") == "medical"


def test_a_published_dataset_name_holding_a_slash_is_kept_whole() -> None:
    assert "Retina OCT / RESC (BMAD)" in slashed_dataset_names()
    naive = published_rows("aaclip_repo_testlog_perclass")
    assert "Retina OCT" in set(naive.dataset)  # the plain split cuts the name
    rows = published_rows("aaclip_repo_testlog_perclass", whole_names=slashed_dataset_names())
    retina = rows[rows.dataset == "Retina OCT / RESC (BMAD)"]
    assert set(retina.class_name) == {"Retina"} and len(retina) == 4
    means = published_rows("aaclip_results", whole_names=slashed_dataset_names())
    assert set(means[means.dataset == "Retina OCT / RESC (BMAD)"].class_name) == {"mean"}


def test_per_class_rows_meet_the_authors_log_under_its_class_labels() -> None:
    assert published_class_name("aaclip", "kvasir", "colon") == "Kvasir"
    assert published_class_name("aaclip", "mvtec", "metal_nut") == "metal_nut"
    assert published_class_name("anomalyclip", "kvasir", "colon") == "colon"
    ours = pd.DataFrame([
        {"variant": "AA-CLIP (official code)", "dataset": dataset, "class_name": class_name, "level": "pixel",
         "metric": "auroc", "value": value, "note": ""}
        for dataset, class_name, value in (("bmad_resc", "retina", 0.95), ("bmad_resc", "mean", 0.95),
                                           ("mvtec", "bottle", 0.93))])
    per_class = beside_published(ours, "aaclip", method_column="variant", per_class=True,
                                 source="aaclip_repo_testlog_perclass")
    joined = per_class.dropna(subset=["ours", "published"]).set_index(["dataset", "class_name"])
    assert joined.loc[("Retina OCT / RESC (BMAD)", "Retina"), "published"] == 95.31
    assert round(joined.loc[("MVTec AD", "bottle"), "diff"], 2) == round(93.0 - 93.56, 2)
    means = beside_published(ours, "aaclip", method_column="variant")
    assert means.dropna(subset=["ours", "published"]).published.tolist() == [95.31]
    assert published_dataset_name("cvc300") == "CVC-300"


def test_tables_split_industrial_and_medical_sets() -> None:
    frame = pd.DataFrame([{"method": "aaclip", "dataset": dataset, "class_name": "mean", "level": level,
                           "metric": metric, "value": 0.5, "note": ""}
                          for dataset in ("mvtec", "kvasir")
                          for level, metric in (("pixel", "auroc"), ("pixel", "ap"), ("pixel", "f1_max"))])
    tables = paper_tables(frame, "aaclip", pro=None)
    assert set(tables) == {"industrial", "medical"}
    assert set(tables["medical"].dataset) == {"kvasir"} and set(tables["industrial"].metric) == {"auroc", "ap"}
