"""`zsadkit data prepare`: from a dataset's raw archives to verified, portable per-protocol manifests.

For a dataset manifest (`data_manifests/<name>.yaml`) and each requested protocol:

1. find the protocol's raw layout: its archives in `--raw` (sha256-verified when a checksum is published,
   then safely extracted into `DATA_ROOT/<name>/.staging/`) or an already extracted folder under `--raw`;
   the layout root is the shallowest folder holding all the layout's `markers`;
2. convert it with the named converter (`zsadkit.data.layouts`), masks paired by name;
3. write the canonical copy `DATA_ROOT/<name>/<layout>/<class>/<split>/<defect>/<key>.<ext>` (images hard
   linked or copied, crops as PNG) with masks as 0/255 PNG in `<class>/ground_truth/<defect>/<key>_mask.png`,
   and the layout's full record list `DATA_ROOT/<name>/<layout>/samples.csv`, first into a partial folder;
4. apply each requested protocol's selection, check its masks and its expected counts per class (a mismatch
   is an error printing expected vs found, and the partial copy is deleted: nothing is left to reuse), move
   the copy into place, and write `DATA_ROOT/<name>/manifest_<protocol>.csv` with paths relative to
   DATA_ROOT, plus `provenance_<protocol>.json`.

Re-running is idempotent: a finished layout (same converter and parameters) is reused, the manifests are
rewritten with identical content.

Example:
    >>> results = prepare_dataset("btad", raw="~/downloads", root="~/data")  # doctest: +SKIP
    >>> results[0].manifest  # doctest: +SKIP
    PosixPath('/home/me/data/btad/manifest_aaclip.csv')
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split

from zsadkit.data.archives import download, safe_extract, verify_sha256
from zsadkit.data.catalog import get_dataset_spec, manifest_path, provenance_path
from zsadkit.data.dataset_spec import (
    CountSpec,
    DatasetSpec,
    LayoutSpec,
    ProtocolSpec,
    count_by_class,
    count_table,
    parse_count_spec,
)
from zsadkit.data.errors import DataError, LayoutError, MaskError
from zsadkit.data.images import check_mask_matches_image, read_image
from zsadkit.data.layouts import RawSample, run_converter
from zsadkit.data.records import Sample, read_manifest, write_manifest

__all__ = [
    "build_layout",
    "check_protocol",
    "CountMismatchError",
    "COUNTS_OVERRIDE_SOURCE",
    "find_layout_root",
    "layout_fingerprint",
    "LAYOUT_FORMAT_VERSION",
    "locate_layout",
    "MAX_SEARCH_DEPTH",
    "prepare_dataset",
    "PreparedProtocol",
    "select_protocol",
    "write_canonical",
]

LAYOUT_FORMAT_VERSION = 1
MAX_SEARCH_DEPTH = 4
Log = Callable[[str], None]
CheckRecords = Callable[[list[Sample]], None]
COUNTS_OVERRIDE_SOURCE = "the expected counts given with --counts (expected_counts)"


class CountMismatchError(DataError):
    """The prepared test set does not have the protocol's expected counts."""


@dataclass(frozen=True)
class PreparedProtocol:
    """Outcome of preparing one protocol.

    Attributes:
        protocol: protocol name.
        manifest: the written manifest, or None when the protocol was skipped.
        counts: split -> class -> (normal, anomalous) of the written manifest.
        skipped: why the protocol was skipped ("" when prepared).
    """

    protocol: str
    manifest: Path | None
    counts: dict[str, dict[str, tuple[int, int]]]
    skipped: str = ""


# ------------------------------------------------------------------------------------ finding the layout


def _subfolders(folder: Path, skip: Path | None) -> list[Path]:
    """Visible, non-link sub-folders except `skip`; an unreadable folder has none (it cannot hold the layout)."""
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return []
    return [
        c
        for c in children
        if c.is_dir() and not c.name.startswith(".") and not c.is_symlink() and c.resolve() != skip
    ]


def find_layout_root(base: Path, layout: LayoutSpec, skip: Path | None = None) -> Path | None:
    """The shallowest folder under `base` (depth <= 4) holding every marker of `layout`, or None.

    `skip` (the dataset's output folder `ROOT/<name>`, should it lie inside `--raw`) is not searched, so
    a prepared copy is never mistaken for raw data.

    Raises:
        LayoutError: several folders at the same depth match (ambiguous).
    """
    level = [base]
    for _ in range(MAX_SEARCH_DEPTH + 1):
        matches = [
            folder
            for folder in level
            if (not layout.root_names or folder.name in layout.root_names)
            and all(next(folder.glob(marker), None) is not None for marker in layout.markers)
        ]
        if len(matches) > 1:
            raise LayoutError(
                f"{base}: several folders hold the layout {layout.name!r} "
                f"(markers {list(layout.markers)}): {[str(m) for m in matches]}; keep only one"
            )
        if matches:
            return matches[0]
        level = [child for folder in level for child in _subfolders(folder, skip)]
    return None


def _where_to_get(spec: DatasetSpec, layout: LayoutSpec) -> str:
    archives = ", ".join(layout.archives) if layout.archives else "(no archive: manual copy)"
    return (
        f"layout {layout.name!r} of {spec.name}: expected archive(s) {archives} in the --raw folder, or an "
        f"extracted folder holding {list(layout.markers)}"
        + (f" named one of {list(layout.root_names)}" if layout.root_names else "")
        + (f". {layout.description}" if layout.description else "")
        + f" (get it from {spec.homepage})"
    )


def locate_layout(
    spec: DatasetSpec, layout: LayoutSpec, raw: Path, staging: Path, *, fetch: bool, log: Log
) -> tuple[Path, dict[str, str]] | None:
    """Find (extracting its archives if needed) the root folder of `layout`.

    Returns:
        `(root, {archive: sha256 or "unverified"})`, or None when neither the archives nor an extracted
        folder are in `raw`.

    Raises:
        ChecksumError: an archive differs from its published sha256.
        UnsafeArchiveError: an archive member would escape the extraction folder.
    """
    archives = [spec.archive(name) for name in layout.archives]
    if fetch:
        for archive in archives:
            if not (raw / archive.file).is_file():
                if archive.url is None:
                    raise DataError(
                        f"{archive.file}: no stable public link is known; download it by hand from "
                        f"{spec.homepage} into {raw}"
                    )
                log(f"downloading {archive.url}")
                download(archive.url, raw / archive.file, archive.sha256)
    present = [a for a in archives if (raw / a.file).is_file()]
    if present and len(present) < len(archives):
        missing = [a.file for a in archives if a not in present]
        raise DataError(
            f"{raw}: archive(s) {missing} of layout {layout.name!r} are missing "
            f"(found {[a.file for a in present]})"
        )
    digests: dict[str, str] = {}
    if present:
        target = staging / layout.name
        for archive in archives:
            done = target / f".{archive.file}.extracted"
            if archive.sha256 is not None:
                log(f"verifying sha256 of {raw / archive.file}")
                digests[archive.file] = verify_sha256(raw / archive.file, archive.sha256)
            else:
                digests[archive.file] = "unverified (no published sha256)"
            if not done.is_file():
                log(f"extracting {raw / archive.file} into {target}")
                safe_extract(raw / archive.file, target)
                done.write_text(digests[archive.file])
        search = target
    else:
        search = raw
    root = find_layout_root(search, layout, skip=staging.parent.resolve())
    if root is None:
        if present:
            raise LayoutError(f"{search}: the extracted archives do not hold {_where_to_get(spec, layout)}")
        return None
    return root, digests


# ------------------------------------------------------------------------------------- canonical layout


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _write_mask(raw: RawSample, destination: Path, threshold: int) -> None:
    grey = read_image(raw.mask, "mask").convert("L")
    check_mask_matches_image(read_image(raw.image), grey, str(raw.image), str(raw.mask))
    if raw.crop is not None:
        grey = grey.crop(raw.crop)
    binary = (np.asarray(grey) > threshold).astype(np.uint8) * 255
    Image.fromarray(binary).save(destination)  # (H, W) uint8 -> mode "L"


def write_canonical(
    raw_samples: list[RawSample], spec: DatasetSpec, layout: LayoutSpec, build_dir: Path, relative_prefix: str
) -> list[Sample]:
    """Copy the raw records into the canonical tree under `build_dir`; records are relative to DATA_ROOT.

    Raises:
        LayoutError: two different raw files would get the same canonical name.
        MaskError: a mask's size differs from its image's.
        ImageReadError: an image that is cropped or has a mask, or a mask, is unreadable or truncated.
    """
    written: dict[str, tuple[Path, Any]] = {}
    samples = []
    for raw in raw_samples:
        group = raw.group or raw.class_name
        suffix = ".png" if raw.crop is not None else raw.image.suffix
        image_rel = f"{group}/{raw.split}/{raw.defect}/{raw.key}{suffix}"
        mask_rel = None if raw.mask is None else f"{group}/ground_truth/{raw.defect}/{raw.key}_mask.png"
        source = (raw.image, raw.crop)
        if image_rel in written:
            if written[image_rel] != source:
                raise LayoutError(
                    f"{raw.image} and {written[image_rel][0]}: both map to {image_rel} in the canonical "
                    "layout; the converter's keys must be unique"
                )
        else:
            written[image_rel] = source
            destination = build_dir / image_rel
            destination.parent.mkdir(parents=True, exist_ok=True)
            if raw.crop is None:
                _link_or_copy(raw.image, destination)
            else:
                read_image(raw.image).crop(raw.crop).save(destination)
            if mask_rel is not None:
                (build_dir / mask_rel).parent.mkdir(parents=True, exist_ok=True)
                _write_mask(raw, build_dir / mask_rel, layout.mask_threshold)
        samples.append(
            Sample(
                image=f"{relative_prefix}/{image_rel}",
                mask=None if mask_rel is None else f"{relative_prefix}/{mask_rel}",
                label=raw.label,
                class_name=raw.class_name,
                defect=raw.defect,
                dataset=spec.name,
                split=raw.split,
            )
        )
    return samples


def layout_fingerprint(layout: LayoutSpec) -> str:
    """A hash of what determines a layout's canonical copy (converter, parameters, mask threshold)."""
    payload = json.dumps(
        {
            "version": LAYOUT_FORMAT_VERSION,
            "converter": layout.converter,
            "params": layout.params,
            "mask_threshold": layout.mask_threshold,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _check_files_exist(samples: list[Sample], root: Path, where: Path) -> None:
    for sample in samples:
        for path in (sample.image, sample.mask):
            if path is not None and not (root / path).is_file():
                raise LayoutError(f"{root / path}: listed in {where} but missing; rerun prepare with --force")


def build_layout(
    spec: DatasetSpec,
    layout: LayoutSpec,
    raw: Path,
    root: Path,
    *,
    fetch: bool,
    force: bool,
    keep_raw: bool,
    log: Log,
    check: CheckRecords,
) -> list[Sample] | None:
    """The records of one layout's canonical copy, building it unless a finished one exists.

    `check` (the requested protocols' mask and count checks) runs on the records before a new build is
    moved into place; when it raises, the build (and, unless `keep_raw`, the extracted archives) is
    deleted, so the next run reads `raw` again. On a reused layout a count mismatch says to rerun with
    --force, which rereads `raw`.

    Returns:
        Records relative to `root`, or None when the raw data of this layout is not in `raw`.
    """
    dataset_dir = root / spec.name
    final = dataset_dir / layout.name
    info_file = final / "layout.json"
    fingerprint = layout_fingerprint(layout)
    if final.exists() and not force:
        if not info_file.is_file():
            raise LayoutError(
                f"{final} exists but is not a finished zsadkit layout (no layout.json); "
                "move it away or rerun with --force"
            )
        info = json.loads(info_file.read_text())
        if info.get("fingerprint") != fingerprint:
            raise LayoutError(
                f"{final} was prepared with other converter parameters "
                f"(fingerprint {info.get('fingerprint')} != {fingerprint}); rerun with --force"
            )
        samples = read_manifest(final / "samples.csv")
        _check_files_exist(samples, root, final / "samples.csv")
        log(f"{spec.name}/{layout.name}: reusing the prepared layout ({len(samples)} records)")
        try:
            check(samples)
        except CountMismatchError as err:
            raise CountMismatchError(
                f"{err}\nThe canonical copy {final} was reused from an earlier prepare without reading "
                "--raw again; if you changed the raw data, rerun with --force."
            ) from err
        return samples
    staging = dataset_dir / ".staging"
    located = locate_layout(spec, layout, raw, staging, fetch=fetch, log=log)
    if located is None:
        return None
    layout_root, digests = located
    log(f"{spec.name}/{layout.name}: converting {layout_root} with {layout.converter!r}")
    conversion = run_converter(layout.converter, layout_root, layout.params, spec.name)
    for note in conversion.notes:
        log(f"  note: {note}")
    if not conversion.samples:
        raise LayoutError(f"{layout_root}: the converter {layout.converter!r} found no images")
    build_dir = dataset_dir / f".{layout.name}.partial"
    if build_dir.exists():
        shutil.rmtree(build_dir)
    build_dir.mkdir(parents=True)
    samples = write_canonical(conversion.samples, spec, layout, build_dir, f"{spec.name}/{layout.name}")
    write_manifest(samples, build_dir / "samples.csv")
    info = {
        "dataset": spec.name,
        "layout": layout.name,
        "converter": layout.converter,
        "params": layout.params,
        "mask_threshold": layout.mask_threshold,
        "fingerprint": fingerprint,
        "archives": digests,
        "source": str(layout_root),
        "notes": conversion.notes,
    }
    (build_dir / "layout.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    try:
        check(samples)
    except DataError:
        shutil.rmtree(build_dir)
        if not keep_raw and staging.exists():
            shutil.rmtree(staging)
        raise
    if final.exists():
        shutil.rmtree(final)
    build_dir.rename(final)
    if not keep_raw and staging.exists():
        shutil.rmtree(staging)
    return samples


# ------------------------------------------------------------------------------- protocols and counts


def select_protocol(samples: list[Sample], protocol: ProtocolSpec) -> list[Sample]:
    """Apply a protocol's selection (`SelectSpec`) to a layout's records."""
    select = protocol.select
    kept = [s for s in samples if s.split in select.splits]
    if select.one_vs_all:
        classes = sorted({s.class_name for s in kept})
        kept = [
            replace(
                s,
                class_name=normal_class,
                label=int(s.class_name != normal_class),
                defect="good" if s.class_name == normal_class else s.class_name,
            )
            for normal_class in classes
            for s in kept
            if s.split == "test" or s.class_name == normal_class
        ]
    if select.normal_test_fraction is not None:
        for class_name in dict.fromkeys(s.class_name for s in kept):
            normals = [
                i
                for i, s in enumerate(kept)
                if s.class_name == class_name and s.split == "test" and s.label == 0
            ]
            if len(normals) < 2:
                raise DataError(
                    f"protocol {protocol.name}: class {class_name!r} has {len(normals)} normal test "
                    "image(s); cannot split off a test fraction"
                )
            to_train, _ = train_test_split(
                np.arange(len(normals)), test_size=select.normal_test_fraction, random_state=select.seed
            )
            for index in to_train:
                kept[normals[index]] = replace(kept[normals[index]], split="train")
    return kept


def check_protocol(
    samples: list[Sample],
    spec: DatasetSpec,
    protocol: ProtocolSpec,
    expected: Mapping[str, tuple[CountSpec | None, str]],
    log: Log,
) -> None:
    """Check masks and counts of a protocol's records; `expected` is split -> (counts, their source).

    Raises:
        MaskError: an anomalous test image lacks a mask although the protocol has masks (or has one
            although it has none).
        CountMismatchError: counts differ from `expected`; the message prints expected vs found per class
            and ends with what to do.
    """
    anomalous = [s for s in samples if s.split == "test" and s.label == 1]
    if protocol.masks:
        unmasked = [s.image for s in anomalous if s.mask is None]
        if unmasked:
            raise MaskError(
                f"{spec.name}/{protocol.name}: {len(unmasked)} anomalous test image(s) have no mask, "
                f"e.g. {unmasked[0]}"
            )
    elif any(s.mask is not None for s in samples):
        raise MaskError(
            f"{spec.name}/{protocol.name}: the protocol has no pixel masks but the layout gave some"
        )
    for split in ("test", "train"):
        found = count_by_class(samples, split)
        want, source = expected.get(split, (None, ""))
        if want is None:
            if split == "test":
                table, _ = count_table(CountSpec(total=None, per_class=found), found)
                log(f"{spec.name}/{protocol.name}: no published test counts; found\n{table}")
            continue
        table, ok = count_table(want, found)
        if not ok:
            remedy = (
                "Fix the raw data or your --counts file and rerun."
                if source == COUNTS_OVERRIDE_SOURCE
                else "Fix the raw data under --raw and rerun; to prepare a subset, give its expected counts "
                "with --counts FILE."
            )
            raise CountMismatchError(
                f"{spec.name}, protocol {protocol.name}: {split} counts differ from the expected ones "
                f"(source: {source})\n{table}\n{remedy}"
            )


def _expected_counts(
    protocol: ProtocolSpec, override: Mapping[str, Any] | None
) -> dict[str, tuple[CountSpec | None, str]]:
    """split -> (expected counts, where they come from): the manifest's, or the caller's override."""
    expected: dict[str, tuple[CountSpec | None, str]] = {
        "test": (protocol.test, protocol.counts_source),
        "train": (protocol.train, protocol.counts_source),
    }
    if override is not None:
        unknown = set(override) - {"test", "train"}
        if unknown:
            raise DataError(
                f"expected counts override for {protocol.name}: unknown split(s) {sorted(unknown)}"
            )
        for split, raw in override.items():
            expected[split] = (
                parse_count_spec(raw, f"expected counts override {protocol.name}.{split}"),
                COUNTS_OVERRIDE_SOURCE,
            )
    return expected


def _protocol_checks(
    spec: DatasetSpec,
    protocols: list[ProtocolSpec],
    expected: Mapping[str, Mapping[str, tuple[CountSpec | None, str]]],
    selected: dict[str, list[Sample]],
    log: Log,
) -> CheckRecords:
    """A check of a layout's records for `protocols`; it stores each protocol's selection in `selected`."""

    def check(samples: list[Sample]) -> None:
        for proto in protocols:
            chosen = select_protocol(samples, proto)
            check_protocol(chosen, spec, proto, expected[proto.name], log)
            selected[proto.name] = chosen

    return check


def prepare_dataset(
    name: str | DatasetSpec,
    raw: str | Path,
    root: str | Path,
    protocol: str | None = None,
    *,
    fetch: bool = False,
    force: bool = False,
    keep_raw: bool = False,
    expected_counts: Mapping[str, Mapping[str, Any]] | None = None,
    log: Log = print,
) -> list[PreparedProtocol]:
    """Prepare one dataset's protocols from its raw archives or folders.

    Args:
        name: dataset name (a manifest in `data_manifests/`) or a loaded `DatasetSpec`.
        raw: folder holding the downloaded archives (or the extracted data).
        root: the data root; everything is written under `root/<name>/`.
        protocol: one protocol; None prepares every protocol whose raw layout is present in `raw`.
        fetch: download missing archives that have a stable public link (`--download`).
        force: rebuild the canonical layout even if a finished one exists.
        keep_raw: keep the extracted archives in `root/<name>/.staging/`.
        expected_counts: protocol -> {"test": counts, "train": counts} replacing the manifest's expected
            counts (same YAML shape: `{total: [n, a], per_class: {...}}`); for subsets and miniatures.
        log: where progress lines go.

    Returns:
        One `PreparedProtocol` per protocol (skipped ones say why).

    Raises:
        DataError: missing raw data for an explicitly requested protocol, checksum mismatch, unsafe
            archive, layout or mask errors, count mismatch.
    """
    spec = name if isinstance(name, DatasetSpec) else get_dataset_spec(name)
    raw, root = Path(raw).expanduser().resolve(), Path(root).expanduser().resolve()
    if not raw.is_dir():
        raise DataError(f"{raw}: --raw must be a folder holding the archives (or the extracted data)")
    unknown = set(expected_counts or {}) - set(spec.protocols)
    if unknown:
        raise DataError(f"expected counts given for unknown protocol(s) {sorted(unknown)} of {spec.name}")
    protocols = [spec.protocol(protocol)] if protocol is not None else list(spec.protocols.values())
    expected = {p.name: _expected_counts(p, (expected_counts or {}).get(p.name)) for p in protocols}
    selected: dict[str, list[Sample]] = {}
    found: dict[str, bool] = {}  # layout -> its raw data (or a finished copy) was found
    results = []
    for proto in protocols:
        layout = spec.layout(proto.layout)
        if layout.name not in found:
            users = [p for p in protocols if p.layout == layout.name]
            check = _protocol_checks(spec, users, expected, selected, log)
            layout_records = build_layout(
                spec, layout, raw, root, fetch=fetch, force=force, keep_raw=keep_raw, log=log, check=check
            )
            found[layout.name] = layout_records is not None
        if not found[layout.name]:
            if protocol is not None:
                raise DataError(
                    f"{raw}: raw data not found for {spec.name}/{proto.name}: {_where_to_get(spec, layout)}"
                )
            reason = f"looked in {raw} for {_where_to_get(spec, layout)}"
            results.append(PreparedProtocol(proto.name, None, {}, skipped=reason))
            continue
        records = selected[proto.name]
        manifest = write_manifest(records, manifest_path(root, spec.name, proto.name))
        counts = {split: count_by_class(records, split) for split in ("test", "train")}
        provenance = {
            "dataset": spec.name,
            "protocol": proto.name,
            "layout": layout.name,
            "counts_source": proto.counts_source,
            "expected_counts_overridden": proto.name in (expected_counts or {}),
            "counts": {
                split: {c: list(v) for c, v in per_class.items()} for split, per_class in counts.items()
            },
            "layout_info": json.loads((root / spec.name / layout.name / "layout.json").read_text()),
            "select": asdict(proto.select),
        }
        provenance_path(root, spec.name, proto.name).write_text(json.dumps(provenance, indent=2) + "\n")
        n_test = sum(n + a for n, a in counts["test"].values())
        has_test_counts = expected[proto.name]["test"][0] is not None
        verified = "counts verified" if has_test_counts else "no published counts to verify"
        log(f"{spec.name}/{proto.name}: {n_test} test records, {verified} -> {manifest}")
        results.append(PreparedProtocol(proto.name, manifest, counts))
    skipped = [r for r in results if r.skipped]
    if skipped and len(skipped) < len(results):  # when nothing was found, the caller reports it once
        for reason in dict.fromkeys(r.skipped for r in skipped):
            names = ", ".join(r.protocol for r in skipped if r.skipped == reason)
            log(f"{spec.name}: skipped protocol(s) {names}, raw data not found: {reason}")
    return results
