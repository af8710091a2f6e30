"""Sample records and CSV/JSONL manifests (zsadkit/data/records.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from zsadkit.data.records import MANIFEST_COLUMNS, Sample, read_manifest, write_manifest


def _samples() -> list[Sample]:
    return [
        Sample("bottle/test/good/000.png", None, 0, "bottle", "good", "mvtec", "test"),
        Sample(
            "bottle/test/broken_large/000.png",
            "bottle/ground_truth/broken_large/000_mask.png",
            1,
            "bottle",
            "broken_large",
            "mvtec",
            "test",
        ),
        Sample("bottle/train/good/000.png", None, 0, "bottle", "good", "mvtec", "train"),
    ]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_manifest_round_trip_keeps_every_field(tmp_path: Path, suffix: str) -> None:
    path = write_manifest(_samples(), tmp_path / f"manifest{suffix}")
    assert read_manifest(path) == _samples()


def test_csv_manifest_header_is_the_documented_columns(tmp_path: Path) -> None:
    path = write_manifest(_samples(), tmp_path / "m.csv")
    assert path.read_text().splitlines()[0] == ",".join(MANIFEST_COLUMNS)


def test_read_manifest_with_root_resolves_image_and_mask_paths(tmp_path: Path) -> None:
    path = write_manifest(_samples(), tmp_path / "m.csv")
    resolved = read_manifest(path, root="/data/mvtec")
    assert resolved[1].image == "/data/mvtec/bottle/test/broken_large/000.png"
    assert resolved[1].mask == "/data/mvtec/bottle/ground_truth/broken_large/000_mask.png"
    assert resolved[0].mask is None


def test_relative_to_inverts_resolve(tmp_path: Path) -> None:
    sample = _samples()[1]
    assert sample.resolve(tmp_path).relative_to(tmp_path) == sample


def test_relative_to_rejects_paths_outside_the_root(tmp_path: Path) -> None:
    sample = Sample("/elsewhere/x.png", None, 0, "c", "good", "d", "test")
    with pytest.raises(ValueError, match="not inside the data root"):
        sample.relative_to(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("label", 2, "label must be 0 or 1"),
        ("split", "val", "split must be one of"),
        ("class_name", "", "class_name is empty"),
    ],
)
def test_sample_rejects_invalid_fields(field: str, value, message: str) -> None:
    fields = dict(image="x.png", mask=None, label=0, class_name="c", defect="good", dataset="d", split="test")
    fields[field] = value
    with pytest.raises(ValueError, match=message):
        Sample(**fields)


def test_manifest_with_missing_column_names_the_file_and_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("image,label\nx.png,0\n")
    with pytest.raises(ValueError, match=r"m\.csv:2: missing columns"):
        read_manifest(path)


def test_manifest_with_bad_label_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    good = '{"image": "a.png", "mask": null, "label": 0, "class_name": "c", "defect": "good", "dataset": "d", "split": "test"}'
    path.write_text(good + "\n" + good.replace('"label": 0', '"label": "x"') + "\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:2: label must be 0 or 1"):
        read_manifest(path)


def test_manifest_value_errors_short_rows_and_non_records_name_the_file_and_line(tmp_path: Path) -> None:
    header = ",".join(MANIFEST_COLUMNS)
    csv_path = tmp_path / "m.csv"
    csv_path.write_text(f"{header}\na.png,,2,c,good,d,test\n")
    with pytest.raises(ValueError, match=r"m\.csv:2: .*label must be 0 or 1, got 2"):
        read_manifest(csv_path)
    csv_path.write_text(f"{header}\na.png,,0,c\n")
    with pytest.raises(ValueError, match=r"m\.csv:2: the row has 4 fields, expected 7"):
        read_manifest(csv_path)
    csv_path.write_text(f"{header}\na.png,,0,c,good,d,test,extra\n")
    with pytest.raises(ValueError, match=r"m\.csv:2: the row has 8 fields, expected 7"):
        read_manifest(csv_path)
    jsonl_path = tmp_path / "m.jsonl"
    jsonl_path.write_text("5\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:1: expected a record"):
        read_manifest(jsonl_path)


def test_empty_manifest_and_unknown_extension_are_errors(tmp_path: Path) -> None:
    empty = tmp_path / "m.csv"
    empty.write_text(",".join(MANIFEST_COLUMNS) + "\n")
    with pytest.raises(ValueError, match="lists no samples"):
        read_manifest(empty)
    with pytest.raises(ValueError, match=r"must be \.csv or \.jsonl"):
        read_manifest(tmp_path / "m.txt")
