"""The papers' protocols as data (`protocols.yaml`): training and test sets, tables, reported metrics, names.

    >>> anomalyclip = protocol("anomalyclip")
    >>> anomalyclip.runs[0], published_dataset_name("mvtec"), domain("synth-target")
    (('visa', ('mvtec',)), 'MVTec AD', 'industrial')

`paper_tables` shapes a tidy results frame into a paper's tables (a table holds a domain, or a metric, or both);
`beside_published` puts its class means next to the published numbers under the names the paper prints.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pandas as pd
import yaml

from zsadkit.metrics.evaluator import PRO_METRICS
from zsadkit.results import KEY_COLUMNS, compare_with_published, published_rows

__all__ = [
    "Protocol",
    "beside_published",
    "comparison_protocol",
    "domain",
    "method_backbone",
    "paper_tables",
    "paper_setting",
    "protocol",
    "published_class_name",
    "published_dataset_name",
    "published_method_name",
    "reported",
    "slashed_dataset_names",
    "subset",
]

PROTOCOLS_FILE = Path(__file__).with_name("protocols.yaml")
Runs = tuple[tuple[str, tuple[str, ...]], ...]
#: A table's content: a domain name, or {"domain": ..., "metric": ...} with either key optional.
TableSpec = str | Mapping[str, str]


@cache
def _data() -> dict:
    return yaml.safe_load(PROTOCOLS_FILE.read_text())


def _runs(raw: Sequence) -> Runs:
    return tuple((str(train), tuple(str(test) for test in tests)) for train, tests in raw)


@dataclass(frozen=True)
class Protocol:
    """One paper's protocol.

    Attributes:
        paper: its name in `protocols.yaml`.
        runs: (auxiliary training set, test sets) pairs of the main tables.
        smoke_runs: the same on the synthetic data of the smoke profile.
        ablation_runs: the runs of the ablation tables.
        metrics: (level, metric) pairs the tables report; "pro" is the run's AU-PRO variant.
        tables: table file stem → the domain of the datasets it holds, or {"domain", "metric"} (either optional).
        published: the `results/published/` table of its main numbers.
        train_splits: the splits of the auxiliary set a method learns on ("test" for AnomalyCLIP; "train" and
            "test" for InCTRL).
        resize: how the protocol brings images to S × S (`zsadkit.data.transforms.image_transform`).
        ablation_published: the `results/published/` table of its ablations ("" = none).
    """

    paper: str
    runs: Runs
    smoke_runs: Runs
    ablation_runs: Runs
    metrics: tuple[tuple[str, str], ...]
    tables: Mapping[str, TableSpec]
    published: str
    train_splits: tuple[str, ...] = ("test",)
    resize: str = "squash"
    ablation_published: str = ""

    def runs_for(self, data_root: str, ablation: bool = False) -> list[list]:
        """The runs of a notebook as [train set, [test sets]] lists: the synthetic ones without a data root."""
        runs = self.smoke_runs if not data_root else self.ablation_runs if ablation else self.runs
        return [[train, list(tests)] for train, tests in runs]


def protocol(paper: str) -> Protocol:
    """The protocol of `paper` ("anomalyclip", ...); an unknown name lists the known ones."""
    papers = _data()["papers"]
    if paper not in papers:
        raise KeyError(f"no protocol for {paper!r} in {PROTOCOLS_FILE}; known: {sorted(papers)}")
    raw = papers[paper]
    return Protocol(paper, _runs(raw["runs"]), _runs(raw.get("smoke_runs", [])), _runs(raw.get("ablation_runs", [])),
                    tuple((level, metric) for level, metric in raw["metrics"]), dict(raw["tables"]),
                    raw["published"], tuple(raw.get("train_splits", ["test"])), raw.get("resize", "squash"),
                    raw.get("ablation_published", ""))


def paper_setting(paper: str, key: str, default: object = None) -> object:
    """A paper-specific entry of its `protocols.yaml` section (e.g. InCTRL's "object_names", "multi_class")."""
    protocol(paper)
    return _data()["papers"][paper].get(key, default)


def method_backbone(method: str) -> tuple[str, str, int]:
    """(backbone, pretrained tag, image size) of `method`'s paper setting (`method_backbones:` in protocols.yaml)."""
    table = _data()["method_backbones"]
    backbone, pretrained, image_size = table.get(method, table["default"])
    return str(backbone), str(pretrained), int(image_size)


def comparison_protocol() -> dict:
    """A copy of the `comparison:` section of `protocols.yaml`: the runs, contenders, published sources and protocol
    flags of the comparison of every method (parsed by `zsadkit.comparison`)."""
    return copy.deepcopy(_data()["comparison"])


def subset(name: str) -> tuple[str, tuple[str, ...]] | None:
    """(dataset, classes) of a named class subset (`subsets:` in protocols.yaml), or None for a plain dataset."""
    entry = _data().get("subsets", {}).get(name)
    return None if entry is None else (str(entry["dataset"]), tuple(str(c) for c in entry["classes"]))


def published_dataset_name(dataset: str) -> str:
    """The name a paper prints for our dataset name (unchanged when no paper uses it, e.g. "synth-target")."""
    return _data()["dataset_names"].get(dataset, dataset)


def published_class_name(paper: str, dataset: str, class_name: str) -> str:
    """The name `paper`'s per-class tables print for one of our classes (`published_class_names` in
    `protocols.yaml`; unchanged when not listed, and "mean" stays "mean")."""
    names = _data()["papers"].get(paper, {}).get("published_class_names", {})
    return str(names.get(dataset, {}).get(class_name, class_name))


def slashed_dataset_names() -> tuple[str, ...]:
    """Printed dataset names that contain " / " themselves (kept whole when published cells are split)."""
    return tuple(name for name in _data()["dataset_names"].values() if " / " in name)


def published_method_name(method: str, paper: str | None = None) -> str:
    """The name a paper prints for our method name (unchanged when not listed, e.g. an ablation variant); a
    paper's own `method_names` come first (InCTRL prints WinCLIP+ as "WinCLIP")."""
    if paper is not None and method in (paper_setting(paper, "method_names") or {}):
        return paper_setting(paper, "method_names")[method]
    return _data()["method_names"].get(method, method)


def domain(dataset: str) -> str:
    """"industrial" or "medical"; a dataset no table lists is an error naming the file to extend."""
    for name, members in _data()["domains"].items():
        if dataset in members:
            return name
    raise KeyError(f"dataset {dataset!r} has no domain in {PROTOCOLS_FILE} (`domains:`)")


def reported(results: pd.DataFrame, paper: str, pro: str | None = "cflow200") -> pd.DataFrame:
    """The rows of the (level, metric) pairs `paper`'s tables report, with "pro" read as `pro`'s AU-PRO metric."""
    pairs = set()
    for level, metric in protocol(paper).metrics:
        pairs.update((level, name) for name in PRO_METRICS[pro]) if metric == "pro" else pairs.add((level, metric))
    keep = [(level, metric) in pairs for level, metric in zip(results.level, results.metric, strict=True)]
    return results[keep]


def paper_tables(results: pd.DataFrame, paper: str, pro: str | None = "cflow200") -> dict[str, pd.DataFrame]:
    """`results` shaped into `paper`'s tables: table file stem → the reported rows of that table's datasets (and
    metric, for papers with one table per metric)."""
    rows = reported(results, paper, pro)
    domains = rows.dataset.map(domain)
    tables = {}
    for table, spec in protocol(paper).tables.items():
        spec = {"domain": spec} if isinstance(spec, str) else dict(spec)
        keep = pd.Series(True, index=rows.index)
        if "domain" in spec:
            keep &= domains == spec["domain"]
        if "metric" in spec:
            keep &= rows.metric == spec["metric"]
        tables[table] = rows[keep]
    return tables


def beside_published(
    results: pd.DataFrame,
    paper: str,
    *,
    pro: str | None = "cflow200",
    source: str | None = None,
    method_column: str = "method",
    on: Sequence[str] = KEY_COLUMNS,
    published_filters: Mapping[str, Sequence] | None = None,
    only_our_methods: bool = True,
    reported_only: bool = True,
    per_class: bool = False,
) -> pd.DataFrame:
    """Our class means (or, with `per_class`, our classes too) of the reported metrics beside the published
    numbers (percent), with the difference.

    Args:
        results: tidy rows (a `method_column` column names the method or variant).
        paper: whose metrics and names.
        pro: the AU-PRO variant of the run.
        source: the published table (`results/published/<source>.csv`; default the paper's main table).
        method_column: the column naming what is compared (e.g. "variant" for ablations).
        on: join columns present on both sides (the key columns, plus e.g. "table" or "shots").
        published_filters: {column: allowed values} applied to the published rows.
        only_our_methods: keep published rows of the methods we ran only (else all, e.g. every variant).
        reported_only: compare the metrics `paper`'s tables report only (else every metric of `results`).
        per_class: keep every class row, named as `paper` prints it (`published_class_name`), not only the means.

    Returns:
        `zsadkit.results.compare_with_published` on `on`.
    """
    means = reported(results, paper, pro) if reported_only else results
    if not per_class:
        means = means[means.class_name == "mean"]
    classes = [published_class_name(paper, dataset, name) for dataset, name in zip(means.dataset, means.class_name,
                                                                                     strict=True)]
    ours = means.assign(method=means[method_column].map(lambda method: published_method_name(method, paper)),
                        dataset=means.dataset.map(published_dataset_name), class_name=classes)
    published = published_rows(source or protocol(paper).published, whole_names=slashed_dataset_names())
    for column, allowed in (published_filters or {}).items():
        published = published[published[column].isin(list(allowed))]
    if only_our_methods:
        published = published[published.method.isin(set(ours.method))]
    return compare_with_published(ours, published, on=list(on))
