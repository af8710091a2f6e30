"""The schema of a dataset manifest (`data_manifests/<name>.yaml`) and its loader.

A manifest is data, not code: it names the dataset, where to get it and under which licence, the
archives (with sha256 where a public source gives one), one or more raw *layouts* (each converted by a
named converter of `zsadkit.data.layouts` with its parameters), and per *protocol* (the test set a paper
used) the layout it is built from, an optional selection step and the expected counts per class.

    name: btad
    title: BTAD (beanTech Anomaly Detection)
    homepage: https://avires.dimi.uniud.it/papers/btad/btad.zip
    licence: CC BY-NC-SA 4.0
    archives:
      - {file: btad.zip, sha256: 461c93..., url: https://avires.dimi.uniud.it/papers/btad/btad.zip}
    layouts:
      official:
        archives: [btad.zip]
        markers: ["01/test", "02/test", "03/test"]
        converter: mvtec_like
        params: {normal_dir: ok, mask_suffix: ""}
    protocols:
      anomalyclip:
        layout: official
        masks: true
        counts_source: AA-CLIP full-shot.jsonl; AnomalyCLIP Table 6
        test:
          total: [451, 290]
          per_class: {"01": [21, 49], "02": [30, 200], "03": [400, 41]}
      aaclip: {same_as: anomalyclip}

Counts are `[normal, anomalous]`. `per_class` may be omitted where only the total is published.

Example:
    >>> spec = load_dataset_spec("data_manifests/btad.yaml")  # doctest: +SKIP
    >>> spec.protocol("aaclip").test.total  # doctest: +SKIP
    (451, 290)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from zsadkit.data.errors import DataError
from zsadkit.data.records import Sample

__all__ = [
    "ArchiveSpec",
    "count_by_class",
    "count_table",
    "CountSpec",
    "DatasetSpec",
    "LayoutSpec",
    "load_dataset_spec",
    "ManifestSpecError",
    "NAME_PATTERN",
    "parse_count_spec",
    "parse_dataset_spec",
    "ProtocolSpec",
    "SelectSpec",
]

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_]*$")
Counts = tuple[int, int]


class ManifestSpecError(DataError):
    """A dataset manifest (YAML) does not follow the schema."""


@dataclass(frozen=True)
class ArchiveSpec:
    """One raw archive of a dataset.

    Attributes:
        file: the archive's file name as distributed ("btad.zip").
        sha256: published sha256 (64 hex digits), or None where no public source gives one.
        url: a stable public direct link for `--download`, or None (manual download).
    """

    file: str
    sha256: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class LayoutSpec:
    """One raw layout of a dataset and the converter that turns it into records.

    Attributes:
        name: layout name ("official", "first_release", "anomalyclip_copy").
        converter: name of a converter in `zsadkit.data.layouts.CONVERTERS`.
        params: the converter's parameters (checked by the converter's dataclass).
        archives: archive files (of `DatasetSpec.archives`) extracted for this layout; empty = manual only.
        markers: paths (relative to the layout root, globs allowed) that must all exist there; they are
            how the layout root is found inside an extracted archive or a user's folder.
        root_names: when not empty, the layout root folder must have one of these names.
        mask_threshold: a mask pixel is anomalous when its grey value is > this (0 for 0/255 and
            label-valued masks, as the reference loaders do); canonical masks are written as 0/255 PNG.
        description: what the user must have (for error messages and docs).
    """

    name: str
    converter: str
    params: dict[str, Any]
    archives: tuple[str, ...]
    markers: tuple[str, ...]
    root_names: tuple[str, ...] = ()
    mask_threshold: int = 0
    description: str = ""


@dataclass(frozen=True)
class CountSpec:
    """Expected `(normal, anomalous)` counts of one split: the total and, where known, per class."""

    total: Counts | None
    per_class: dict[str, Counts] | None


@dataclass(frozen=True)
class SelectSpec:
    """How a protocol derives its split from a layout.

    Attributes:
        normal_test_fraction: keep this fraction of each class's normal test images in test and move the
            rest to train, drawn as `sklearn.model_selection.train_test_split(test_size=fraction,
            random_state=seed)` over the normals in the converter's order (InCTRL/DRA scripts).
        seed: the `random_state` of that split.
        one_vs_all: every class becomes a test class whose normals are its own images and whose anomalies
            are the images of every other class (semantic AD on MNIST, CIFAR-10).
        splits: the raw splits the protocol keeps ("test" only for most zero-shot protocols).
    """

    normal_test_fraction: float | None = None
    seed: int = 42
    one_vs_all: bool = False
    splits: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True)
class ProtocolSpec:
    """The test set one paper used.

    Attributes:
        name: protocol name ("anomalyclip", "inctrl", "aaclip", ...).
        layout: the layout it is built from.
        masks: True if every anomalous test image must have a pixel mask, False if none may.
        test: expected test counts, or None where no source gives them (found counts are then reported).
        train: expected train counts, or None.
        counts_source: where the expected counts come from (paper table, shipped manifest, derivation).
        select: the selection step from the layout's records.
        note: anything a user must know (differences between papers, unverified parts).
    """

    name: str
    layout: str
    masks: bool
    test: CountSpec | None
    train: CountSpec | None
    counts_source: str
    select: SelectSpec = field(default_factory=SelectSpec)
    note: str = ""


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset manifest: identity, sources, layouts and protocols."""

    name: str
    title: str
    homepage: str
    licence: str
    citation: str
    archives: tuple[ArchiveSpec, ...]
    layouts: dict[str, LayoutSpec]
    protocols: dict[str, ProtocolSpec]
    notes: str = ""
    path: str = ""

    def protocol(self, name: str) -> ProtocolSpec:
        if name not in self.protocols:
            raise ManifestSpecError(
                f"dataset {self.name!r} has no protocol {name!r}; available: {sorted(self.protocols)}"
            )
        return self.protocols[name]

    def layout(self, name: str) -> LayoutSpec:
        return self.layouts[name]

    def archive(self, file: str) -> ArchiveSpec:
        for archive in self.archives:
            if archive.file == file:
                return archive
        raise ManifestSpecError(f"dataset {self.name!r}: no archive {file!r} declared")


def _require(mapping: dict, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if key not in mapping:
        raise ManifestSpecError(f"{where}: missing key {key!r}")
    value = mapping[key]
    if not isinstance(value, kind):
        raise ManifestSpecError(f"{where}: {key!r} must be {kind}, got {value!r}")
    return value


def _check_keys(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise ManifestSpecError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _counts(value: Any, where: str) -> Counts:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and v >= 0 for v in value)
    ):
        raise ManifestSpecError(
            f"{where}: counts must be [normal, anomalous] (two integers >= 0), got {value!r}"
        )
    return (value[0], value[1])


def parse_count_spec(raw: Any, where: str) -> CountSpec | None:
    """Parse `{total: [n, a], per_class: {cls: [n, a]}}`; None stays None (counts unknown)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ManifestSpecError(f"{where}: expected a mapping with 'total' and/or 'per_class', got {raw!r}")
    _check_keys(raw, {"total", "per_class"}, where)
    total = _counts(raw["total"], f"{where}.total") if "total" in raw else None
    per_class = None
    if "per_class" in raw:
        if not isinstance(raw["per_class"], dict) or not raw["per_class"]:
            raise ManifestSpecError(
                f"{where}.per_class: expected a non-empty mapping class -> [normal, anomalous]"
            )
        per_class = {str(cls): _counts(v, f"{where}.per_class.{cls}") for cls, v in raw["per_class"].items()}
    if total is None and per_class is None:
        raise ManifestSpecError(f"{where}: give 'total', 'per_class' or both")
    if total is not None and per_class is not None:
        summed = (sum(c[0] for c in per_class.values()), sum(c[1] for c in per_class.values()))
        if summed != total:
            raise ManifestSpecError(
                f"{where}: per_class counts sum to {list(summed)} but total is {list(total)}"
            )
    return CountSpec(total=total, per_class=per_class)


def _parse_layout(name: str, raw: Any, where: str, archive_files: set[str]) -> LayoutSpec:
    if not isinstance(raw, dict):
        raise ManifestSpecError(f"{where}: expected a mapping")
    _check_keys(
        raw,
        {"converter", "params", "archives", "markers", "root_names", "mask_threshold", "description"},
        where,
    )
    archives = tuple(raw.get("archives") or ())
    unknown = [a for a in archives if a not in archive_files]
    if unknown:
        raise ManifestSpecError(f"{where}: archives {unknown} are not declared under 'archives'")
    markers = tuple(_require(raw, "markers", where, list))
    if not markers:
        raise ManifestSpecError(f"{where}: 'markers' must name at least one path")
    return LayoutSpec(
        name=name,
        converter=_require(raw, "converter", where, str),
        params=dict(raw.get("params") or {}),
        archives=archives,
        markers=markers,
        root_names=tuple(raw.get("root_names") or ()),
        mask_threshold=int(raw.get("mask_threshold", 0)),
        description=str(raw.get("description", "")),
    )


def _parse_select(raw: Any, where: str) -> SelectSpec:
    if raw is None:
        return SelectSpec()
    if not isinstance(raw, dict):
        raise ManifestSpecError(f"{where}: expected a mapping")
    _check_keys(raw, {"normal_test_fraction", "seed", "one_vs_all", "splits"}, where)
    fraction = raw.get("normal_test_fraction")
    if fraction is not None and not (isinstance(fraction, float) and 0.0 < fraction < 1.0):
        raise ManifestSpecError(
            f"{where}.normal_test_fraction: expected a number in (0, 1), got {fraction!r}"
        )
    splits = tuple(raw.get("splits", ("train", "test")))
    if not splits or any(s not in ("train", "test") for s in splits):
        raise ManifestSpecError(
            f"{where}.splits: expected a list drawn from ['train', 'test'], got {list(splits)}"
        )
    return SelectSpec(
        normal_test_fraction=fraction,
        seed=int(raw.get("seed", 42)),
        one_vs_all=bool(raw.get("one_vs_all", False)),
        splits=splits,
    )


def _parse_protocol(name: str, raw: Any, where: str, layouts: dict[str, LayoutSpec]) -> ProtocolSpec:
    if not isinstance(raw, dict):
        raise ManifestSpecError(f"{where}: expected a mapping")
    _check_keys(raw, {"layout", "masks", "test", "train", "counts_source", "select", "note"}, where)
    layout = _require(raw, "layout", where, str)
    if layout not in layouts:
        raise ManifestSpecError(f"{where}: layout {layout!r} is not declared; declared: {sorted(layouts)}")
    if "test" not in raw:
        raise ManifestSpecError(f"{where}: missing key 'test' (write `test: null` where counts are unknown)")
    return ProtocolSpec(
        name=name,
        layout=layout,
        masks=_require(raw, "masks", where, bool),
        test=parse_count_spec(raw["test"], f"{where}.test"),
        train=parse_count_spec(raw.get("train"), f"{where}.train"),
        counts_source=_require(raw, "counts_source", where, str),
        select=_parse_select(raw.get("select"), f"{where}.select"),
        note=str(raw.get("note", "")),
    )


def parse_dataset_spec(raw: Any, where: str) -> DatasetSpec:
    """Build a `DatasetSpec` from the parsed YAML mapping; `where` names the file in errors."""
    if not isinstance(raw, dict):
        raise ManifestSpecError(f"{where}: expected a YAML mapping at the top level")
    _check_keys(
        raw,
        {"name", "title", "homepage", "licence", "citation", "archives", "layouts", "protocols", "notes"},
        where,
    )
    name = _require(raw, "name", where, str)
    if not NAME_PATTERN.match(name):
        raise ManifestSpecError(f"{where}: name {name!r} must be lower-case letters, digits and '_'")
    archives = []
    for i, entry in enumerate(raw.get("archives") or []):
        at = f"{where}: archives[{i}]"
        if not isinstance(entry, dict):
            raise ManifestSpecError(f"{at}: expected a mapping with 'file', 'sha256', 'url'")
        _check_keys(entry, {"file", "sha256", "url"}, at)
        sha256 = entry.get("sha256")
        if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", str(sha256)):
            raise ManifestSpecError(f"{at}: sha256 must be 64 lower-case hex digits, got {sha256!r}")
        archives.append(
            ArchiveSpec(file=_require(entry, "file", at, str), sha256=sha256, url=entry.get("url"))
        )
    archive_files = {a.file for a in archives}
    raw_layouts = _require(raw, "layouts", where, dict)
    layouts = {
        str(k): _parse_layout(str(k), v, f"{where}: layouts.{k}", archive_files)
        for k, v in raw_layouts.items()
    }
    raw_protocols = _require(raw, "protocols", where, dict)
    protocols: dict[str, ProtocolSpec] = {}
    aliases: dict[str, str] = {}
    for key, value in raw_protocols.items():
        if isinstance(value, dict) and set(value) == {"same_as"}:
            aliases[str(key)] = str(value["same_as"])
        else:
            protocols[str(key)] = _parse_protocol(str(key), value, f"{where}: protocols.{key}", layouts)
    for alias, target in aliases.items():
        if target not in protocols:
            raise ManifestSpecError(f"{where}: protocols.{alias}: same_as {target!r} names no full protocol")
        protocols[alias] = replace(protocols[target], name=alias)
    if not protocols:
        raise ManifestSpecError(f"{where}: declares no protocol")
    return DatasetSpec(
        name=name,
        title=_require(raw, "title", where, str),
        homepage=_require(raw, "homepage", where, str),
        licence=_require(raw, "licence", where, str),
        citation=str(raw.get("citation", "")),
        archives=tuple(archives),
        layouts=layouts,
        protocols=dict(sorted(protocols.items())),
        notes=str(raw.get("notes", "")),
        path=where,
    )


def load_dataset_spec(path: str | Path) -> DatasetSpec:
    """Read and validate one `data_manifests/<name>.yaml`; the file stem must equal its `name`."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ManifestSpecError(f"{path}: not valid YAML ({err})") from err
    spec = parse_dataset_spec(raw, str(path))
    if spec.name != path.stem:
        raise ManifestSpecError(f"{path}: name {spec.name!r} differs from the file name {path.stem!r}")
    return spec


def count_by_class(samples: list[Sample], split: str) -> dict[str, tuple[int, int]]:
    """class -> (normal, anomalous) for one split, classes in order of appearance."""
    counts: dict[str, list[int]] = {}
    for sample in samples:
        if sample.split == split:
            counts.setdefault(sample.class_name, [0, 0])[sample.label] += 1
    return {name: (n, a) for name, (n, a) in counts.items()}


def count_table(expected: CountSpec, found: dict[str, tuple[int, int]]) -> tuple[str, bool]:
    """A text table of expected vs found counts per class and in total, and whether they all agree."""
    rows, ok = [], True

    def fmt(counts: tuple[int, int] | None) -> str:
        return "missing" if counts is None else f"{counts[0]} / {counts[1]}"

    if expected.per_class is not None:
        for name in [*expected.per_class, *[c for c in found if c not in expected.per_class]]:
            want, got = expected.per_class.get(name), found.get(name)
            same = want == got
            ok &= same
            rows.append(
                (name, "not expected" if want is None else fmt(want), fmt(got), "" if same else "<- differs")
            )
    total = (sum(c[0] for c in found.values()), sum(c[1] for c in found.values()))
    if expected.total is not None:
        ok &= expected.total == total
        rows.append(
            ("TOTAL", fmt(expected.total), fmt(total), "" if expected.total == total else "<- differs")
        )
    width = max(len(r[0]) for r in rows + [("class", "", "", "")])
    lines = [f"  {'class':<{width}}  {'expected normal / anomalous':<28}  found normal / anomalous"]
    lines += [f"  {r[0]:<{width}}  {r[1]:<28}  {r[2]:<24} {r[3]}".rstrip() for r in rows]
    return "\n".join(lines), ok
