"""`zsadkit data ...` commands, `from-folder` manifests and the catalog's lookups."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_datasets_prepare import RawTree, build_br35h, build_headct

from zsadkit.cli import main
from zsadkit.data.catalog import available_datasets, dataset_status, get_dataset_spec, load_dataset
from zsadkit.data.dataset import AnomalyDataset
from zsadkit.data.dataset_spec import ManifestSpecError, parse_dataset_spec
from zsadkit.data.errors import DataError, LayoutError, MaskError
from zsadkit.data.from_folder import manifest_from_folder
from zsadkit.data.records import read_manifest

ANOMALYCLIP_17 = {
    "mvtec",
    "visa",
    "mpdd",
    "btad",
    "sdd",
    "dagm",
    "dtd_synthetic",
    "isic",
    "clinicdb",
    "colondb",
    "kvasir",
    "endo",
    "tn3k",
    "headct",
    "brainmri",
    "br35h",
    "covid19",
}


def test_catalog_lists_every_required_dataset_with_its_protocols() -> None:
    names = set(available_datasets())
    assert (
        ANOMALYCLIP_17
        | {"aitex", "elpv", "mnist", "cifar10", "bmad_brain", "bmad_liver", "bmad_resc", "cvc300"}
        <= names
    )
    assert all("anomalyclip" in get_dataset_spec(n).protocols for n in ANOMALYCLIP_17)
    for name in ("mvtec", "visa", "aitex", "elpv", "mnist", "cifar10", "sdd", "headct", "brainmri"):
        assert "inctrl" in get_dataset_spec(name).protocols, name
    for name in (
        "mvtec",
        "visa",
        "mpdd",
        "btad",
        "bmad_brain",
        "bmad_liver",
        "bmad_resc",
        "clinicdb",
        "colondb",
        "kvasir",
        "cvc300",
    ):
        assert "aaclip" in get_dataset_spec(name).protocols, name


def test_unknown_dataset_and_protocol_errors_list_what_exists() -> None:
    with pytest.raises(DataError, match=r"unknown dataset 'mvtecc'.*'mvtec'"):
        get_dataset_spec("mvtecc")
    with pytest.raises(DataError, match=r"no protocol 'winclip'.*'anomalyclip'"):
        get_dataset_spec("mvtec").protocol("winclip")


def test_manifest_schema_rejects_unknown_keys_and_inconsistent_counts() -> None:
    base = {
        "name": "x",
        "title": "X",
        "homepage": "h",
        "licence": "l",
        "layouts": {"a": {"converter": "mvtec_like", "markers": ["m"]}},
        "protocols": {
            "p": {
                "layout": "a",
                "masks": True,
                "counts_source": "s",
                "test": {"total": [1, 2], "per_class": {"c": [1, 1]}},
            }
        },
    }
    with pytest.raises(ManifestSpecError, match=r"per_class counts sum to \[1, 1\] but total is \[1, 2\]"):
        parse_dataset_spec(base, "x.yaml")
    base["protocols"]["p"]["test"] = {"total": [1, 2]}
    base["layouts"]["a"]["convertr"] = "typo"
    with pytest.raises(ManifestSpecError, match=r"unknown key\(s\) \['convertr'\]"):
        parse_dataset_spec(base, "x.yaml")


def test_load_dataset_of_an_unprepared_dataset_says_how_to_prepare_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"zsadkit data prepare br35h --raw .* --protocol anomalyclip"):
        load_dataset("br35h", "anomalyclip", tmp_path)


def test_cli_prepare_then_check_reports_ready_datasets_and_counts(tmp_path: Path, capsys) -> None:
    raw, root = tmp_path / "raw", tmp_path / "data"
    raw.mkdir()
    build_br35h(raw)
    counts = tmp_path / "counts.yaml"
    counts.write_text(yaml.safe_dump({"anomalyclip": {"test": {"per_class": {"brain": [2, 2]}}}}))
    assert (
        main(
            [
                "data",
                "prepare",
                "br35h",
                "--raw",
                str(raw),
                "--root",
                str(root),
                "--protocol",
                "anomalyclip",
                "--counts",
                str(counts),
            ]
        )
        == 0
    )
    assert "ignored folder" in capsys.readouterr().out  # pred/ is reported, not silently dropped
    assert main(["data", "check", "--root", str(root), "br35h", "headct"]) == 0
    rows = {tuple(line.split()[:3]): line for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert "2 / 2 (!)" in rows[("br35h", "anomalyclip", "ready")]  # differs from the published 1500 / 1500
    assert "overridden" in rows[("br35h", "anomalyclip", "ready")]
    assert ("br35h", "adaclip", "missing") in rows and ("headct", "inctrl", "missing") in rows


def test_cli_prepare_count_mismatch_prints_expected_and_found_and_fails(tmp_path: Path, capsys) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    build_br35h(raw)
    assert main(["data", "prepare", "br35h", "--raw", str(raw), "--root", str(tmp_path / "data")]) == 2
    error = capsys.readouterr().err
    assert "counts differ" in error and "1500 / 1500" in error and "2 / 2" in error


def test_cli_prepare_without_protocol_prepares_every_protocol_found(tmp_path: Path, capsys) -> None:
    raw, root = tmp_path / "raw", tmp_path / "data"
    raw.mkdir()
    miniature = build_headct(raw)
    counts = tmp_path / "counts.yaml"
    counts.write_text(yaml.safe_dump(miniature.counts))
    assert (
        main(["data", "prepare", "headct", "--raw", str(raw), "--root", str(root), "--counts", str(counts)])
        == 0
    )
    statuses = {s.protocol: s for s in dataset_status(root, ["headct"])}
    assert all(s.ready for s in statuses.values())
    assert statuses["inctrl"].test_counts == {"brain": (1, 4)}
    assert statuses["anomalyclip"].test_counts == {"brain": (4, 4)}
    train = load_dataset("headct", "inctrl", root, split="train")
    test_normals = [s for s in load_dataset("headct", "inctrl", root) if s.label == 0]
    assert len(train) == 3 and not {s.image for s in train} & {s.image for s in test_normals}


def test_cli_list_names_every_dataset(capsys) -> None:
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert all(line.split()[0] in available_datasets() for line in out.splitlines())
    assert len(out.splitlines()) == len(available_datasets())


def make_user_folder(folder: Path) -> RawTree:
    tree = RawTree(folder)
    tree.image("good/a.png")
    tree.image("good/b.jpg")
    tree.image("bad/scratch/s1.png", anomalous=True, mask="masks/s1.png")
    tree.image("bad/scratch/s2.png", anomalous=True, mask="masks/s2_mask.png")
    tree.image("bad/dent/d1.png", anomalous=True, mask="masks/d1.png")
    return tree


def test_from_folder_pairs_masks_by_stem_and_the_manifest_loads_in_anomaly_dataset(
    tmp_path: Path, capsys
) -> None:
    make_user_folder(tmp_path / "parts")
    out = tmp_path / "parts" / "manifest.csv"
    assert (
        main(["data", "from-folder", str(tmp_path / "parts"), "--out", str(out), "--class-name", "widget"])
        == 0
    )
    assert "2 normal, 3 anomalous (3 with masks)" in capsys.readouterr().out
    samples = read_manifest(out, root=tmp_path / "parts")
    records = {Path(s.image).name: s for s in samples}
    assert records["s1.png"].mask.endswith("masks/s1.png") and records["s2.png"].mask.endswith(
        "masks/s2_mask.png"
    )
    assert records["d1.png"].label == 1 and records["d1.png"].defect == "dent"
    assert records["a.png"].label == 0 and records["b.jpg"].class_name == "widget"
    assert all(Path(s.image).is_file() for s in records.values())
    assert str(tmp_path) not in out.read_text()
    dataset = AnomalyDataset(samples, 32)
    item = dataset[samples.index(records["s1.png"])]
    assert item["label"] == 1 and item["has_mask"] and item["image"].shape == (3, 32, 32)
    assert 0 < float(item["mask"].sum()) < 32 * 32  # the 4x4 square of a 16x16 image, resized to 32


def test_from_folder_with_masks_requires_a_mask_for_every_anomalous_image(tmp_path: Path, capsys) -> None:
    make_user_folder(tmp_path / "parts")
    (tmp_path / "parts" / "masks" / "d1.png").unlink()
    out = tmp_path / "manifest.csv"
    with pytest.raises(MaskError, match=r"1 anomalous image\(s\) have no mask .*dent/d1\.png.*--image-level-only"):
        manifest_from_folder(tmp_path / "parts", out)
    assert not out.exists()
    argv = ["data", "from-folder", str(tmp_path / "parts"), "--out", str(out)]
    assert main(argv) == 2 and "d1.png" in capsys.readouterr().err
    assert main([*argv, "--image-level-only"]) == 0
    samples = read_manifest(out, root=tmp_path / "parts")
    assert [s.mask for s in samples] == [None] * 5 and sum(s.label for s in samples) == 3
    item = AnomalyDataset(samples, 32)[4]
    assert item["label"] == 1 and not item["has_mask"] and float(item["mask"].sum()) == 0.0


def test_from_folder_rejects_unknown_sub_folders_naming_them(tmp_path: Path) -> None:
    tree = make_user_folder(tmp_path / "parts")
    tree.image("defective/x.png", anomalous=True)
    tree.image("goood/y.png")
    with pytest.raises(LayoutError, match=r"unknown sub-folder\(s\) \['defective', 'goood'\]"):
        manifest_from_folder(tmp_path / "parts")


def test_from_folder_rejects_a_mask_without_an_image_and_a_missing_bad_folder(tmp_path: Path) -> None:
    tree = make_user_folder(tmp_path / "parts")
    tree.image("masks/ghost.png")
    with pytest.raises(MaskError, match=r"ghost\.png: mask matches no anomalous image"):
        manifest_from_folder(tmp_path / "parts")
    RawTree(tmp_path / "only_bad").image("bad/a.png", anomalous=True)
    with pytest.raises(LayoutError, match=r"only_bad/good: folder is missing"):
        manifest_from_folder(tmp_path / "only_bad")


def test_from_folder_with_good_only_is_a_reference_set(tmp_path: Path, capsys) -> None:
    tree = RawTree(tmp_path / "screws")
    tree.image("good/a.png")
    tree.image("good/b.png")
    out = tmp_path / "refs.csv"
    assert main(["data", "from-folder", str(tmp_path / "screws"), "--out", str(out)]) == 0
    assert "2 normal, 0 anomalous (reference set (good/ only)), class word 'screws'" in capsys.readouterr().out
    samples = read_manifest(out, root=tmp_path / "screws")
    assert [(s.label, s.split, s.class_name) for s in samples] == [(0, "train", "screws")] * 2
    assert manifest_from_folder(tmp_path / "screws", class_name="hex bolt")[0].class_name == "hex bolt"


def test_from_folder_decodes_every_image_and_names_each_unreadable_file(tmp_path: Path, capsys) -> None:
    make_user_folder(tmp_path / "parts")
    complete = (tmp_path / "parts" / "good" / "a.png").read_bytes()
    (tmp_path / "parts" / "good" / "cut.png").write_bytes(complete[: len(complete) // 2])
    (tmp_path / "parts" / "bad" / "scratch" / "text.png").write_text("not an image")
    (tmp_path / "parts" / "masks" / "text.png").write_bytes((tmp_path / "parts" / "masks" / "s1.png").read_bytes())
    out = tmp_path / "manifest.csv"
    with pytest.raises(DataError, match=r"2 unreadable file\(s\).*good/cut\.png.*truncated.*scratch/text\.png"):
        manifest_from_folder(tmp_path / "parts", out)
    assert not out.exists()
    assert main(["data", "from-folder", str(tmp_path / "parts"), "--out", str(out)]) == 2
    assert "cut.png" in capsys.readouterr().err


def test_prepare_without_raw_data_names_what_it_looked_for_once(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["data", "prepare", "mvtec", "--raw", str(tmp_path / "empty"), "--root", str(tmp_path / "root")]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("mvtec_anomaly_detection.tar.xz") == 1 and captured.err.count("error:") == 1
    assert str(tmp_path / "empty") in captured.err and "layout 'official'" in captured.err
    assert captured.out == ""


def test_readme_datasets_table_gives_the_prepare_command_of_every_dataset() -> None:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in available_datasets():
        assert f"| `{name}` |" in text and f"zsadkit data prepare {name} --raw DIR --root ROOT" in text, name


def test_cli_check_of_a_missing_root_is_an_error_naming_it(tmp_path: Path, capsys) -> None:
    assert main(["data", "check", "--root", str(tmp_path / "nowhere")]) == 2
    captured = capsys.readouterr()
    assert f"{tmp_path / 'nowhere'}: data root does not exist" in captured.err
    assert "ready" not in captured.out
