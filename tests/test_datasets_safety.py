"""Safety of `prepare`: archives that escape, wrong checksums, missing or misplaced masks, wrong counts."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import shutil
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_datasets_prepare import (
    RawTree,
    build_br35h,
    build_btad,
    build_isic,
    build_mvtec,
    build_sdd_kolektor,
    mvtec_like_classes,
    spec_with_miniature_checksums,
)

from zsadkit.data.archives import ChecksumError, UnsafeArchiveError, download, safe_extract, verify_sha256
from zsadkit.data.catalog import get_dataset_spec, load_dataset
from zsadkit.data.errors import DataError, LayoutError, MaskError
from zsadkit.data.layouts import run_converter
from zsadkit.data.prepare import CountMismatchError, find_layout_root, prepare_dataset


def quiet(_: str) -> None:
    pass


def tar_with(path: Path, *members: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w") as bundle:
        for member in members:
            data = b"payload" if member.isfile() else None
            if data is not None:
                member.size = len(data)
            bundle.addfile(member, None if data is None else io.BytesIO(data))
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (member("data/../../escaped.txt"), "outside"),
        (member("/tmp/zsadkit_absolute_member.txt"), "absolute"),
        (member("data/link", tarfile.SYMTYPE, "../../escaped.txt"), "symbolic link"),
        (member("data/abs_link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
        (member("data/hard", tarfile.LNKTYPE, "../escaped.txt"), "hard link"),
    ],
    ids=["dotdot", "absolute", "symlink-out", "symlink-absolute", "hardlink-out"],
)
def test_tar_members_escaping_the_target_are_refused_before_anything_is_written(
    tmp_path: Path, entry: tarfile.TarInfo, reason: str
) -> None:
    archive = tar_with(tmp_path / "evil.tar", member("data/ok.txt"), entry)
    target = tmp_path / "a" / "b"
    with pytest.raises(UnsafeArchiveError, match=reason) as error:
        safe_extract(archive, target)
    assert entry.name in str(error.value)
    assert not (target / "data" / "ok.txt").exists()  # checked before extraction
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize(
    "name", ["../escaped.txt", "/tmp/zsadkit_absolute_zip.txt"], ids=["dotdot", "absolute"]
)
def test_zip_members_escaping_the_target_are_refused(tmp_path: Path, name: str) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("ok.txt", "fine")
        bundle.writestr(name, "bad")
    with pytest.raises(UnsafeArchiveError, match=r"absolute|outside"):
        safe_extract(archive, tmp_path / "target")
    assert not (tmp_path / "target" / "ok.txt").exists()
    assert not (tmp_path / "escaped.txt").exists()


def test_safe_extract_keeps_links_that_stay_inside(tmp_path: Path) -> None:
    archive = tar_with(
        tmp_path / "ok.tar", member("data/a.txt"), member("data/b.txt", tarfile.SYMTYPE, "a.txt")
    )
    target = safe_extract(archive, tmp_path / "out")
    assert (target / "data" / "b.txt").read_bytes() == b"payload"


def test_checksum_mismatch_is_refused_printing_both_digests(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    build_btad(raw)  # a miniature btad.zip: its digest differs from the published one
    found = hashlib.sha256((raw / "btad.zip").read_bytes()).hexdigest()
    published = "461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a"
    with pytest.raises(ChecksumError) as error:
        prepare_dataset("btad", raw, tmp_path / "data", "aaclip", log=quiet)
    assert published in str(error.value) and found in str(error.value)
    assert not (tmp_path / "data" / "btad" / ".staging" / "official" / "BTech_Dataset_transformed").exists()
    assert verify_sha256(raw / "btad.zip", found) == found


def test_a_missing_mask_is_an_error_naming_the_image(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    build_isic(raw)
    with zipfile.ZipFile(raw / "ISBI2016_ISIC_Part1_Test_GroundTruth.zip") as bundle:
        kept = [(n, bundle.read(n)) for n in bundle.namelist() if "0000012" not in n]
    with zipfile.ZipFile(raw / "ISBI2016_ISIC_Part1_Test_GroundTruth.zip", "w") as bundle:
        for name, data in kept:
            bundle.writestr(name, data)
    with pytest.raises(
        MaskError, match=r"ISIC_0000012\.jpg: anomalous image has no mask.*ISIC_0000012_Segmentation"
    ):
        prepare_dataset("isic", raw, tmp_path / "data", "anomalyclip", log=quiet)


def test_a_missing_kolektor_label_is_an_error_naming_the_image(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    build_sdd_kolektor(raw)
    with zipfile.ZipFile(raw / "KolektorSDD.zip") as bundle:
        bundle.extractall(raw / "KolektorSDD")
    (raw / "KolektorSDD.zip").unlink()
    (raw / "KolektorSDD" / "kos02" / "Part1_label.bmp").unlink()
    with pytest.raises(MaskError, match=r"kos02/Part1\.jpg: image has no label mask"):
        prepare_dataset("sdd", raw, tmp_path / "data", "inctrl", log=quiet)


def test_masks_are_paired_by_name_even_when_sorted_listings_disagree(tmp_path: Path) -> None:
    """Images 1, 10, 2 sort as 1 < 10 < 2 but their masks as 10_mask < 1_mask < 2_mask."""
    tree = RawTree(tmp_path / "raw" / "MPDD")
    for stem in ("1", "2", "10"):
        tree.image(
            f"bracket_black/test/hole/{stem}.png",
            anomalous=True,
            mask=f"bracket_black/ground_truth/hole/{stem}_mask.png",
        )
    tree.image("bracket_black/test/good/000.png")
    tree.image("bracket_black/train/good/000.png")
    counts = {"anomalyclip": {"test": {"per_class": {"bracket_black": [1, 3]}}}}
    prepare_dataset(
        "mpdd", tmp_path / "raw", tmp_path / "data", "anomalyclip", expected_counts=counts, log=quiet
    )
    for record in load_dataset("mpdd", "anomalyclip", tmp_path / "data"):
        if record.label:
            assert Path(record.mask).name == f"{Path(record.image).stem}_mask.png"
            image = np.asarray(Image.open(record.image).convert("L")) > 128
            assert np.array_equal(image, np.asarray(Image.open(record.mask)) > 0)


def test_a_mask_of_another_size_than_its_image_is_an_error(tmp_path: Path) -> None:
    tree = RawTree(tmp_path / "raw" / "MPDD")
    mvtec_like_classes(tree, "", {"bracket_black": {"good": 1, "hole": 1}})
    mask = tmp_path / "raw/MPDD/bracket_black/ground_truth/hole/000_mask.png"
    Image.new("L", (8, 8)).save(mask)
    with pytest.raises(
        MaskError, match=r"000_mask\.png: mask is 8x8 \(WxH\) but its image .*000\.png is 16x16"
    ):
        prepare_dataset("mpdd", tmp_path / "raw", tmp_path / "data", "anomalyclip", log=quiet)


def test_count_mismatch_is_an_error_printing_expected_and_found_per_class(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    build_mvtec(raw)
    spec = spec_with_miniature_checksums("mvtec", raw)
    with pytest.raises(CountMismatchError) as error:
        prepare_dataset(spec, raw, tmp_path / "data", "anomalyclip", log=quiet)
    message = str(error.value)
    assert "mvtec, protocol anomalyclip: test counts differ" in message
    lines = {line.split()[0]: line for line in message.splitlines()[2:]}
    assert lines["bottle"].split()[1:8] == ["20", "/", "63", "2", "/", "3", "<-"]
    assert lines["cable"].split()[1:5] == ["58", "/", "92", "missing"]
    assert lines["TOTAL"].split()[1:7] == ["467", "/", "1258", "3", "/", "5"]
    assert not (tmp_path / "data" / "mvtec" / "manifest_anomalyclip.csv").exists()


def test_an_unlisted_folder_is_an_error_not_silently_skipped(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    build_br35h(raw)
    RawTree(raw / "Br35H").image("maybe/m0.jpg")
    with pytest.raises(LayoutError, match=r"\['maybe'\].*not listed in the manifest"):
        prepare_dataset("br35h", raw, tmp_path / "data", "anomalyclip", log=quiet)


def test_missing_raw_data_for_a_requested_protocol_names_the_expected_archive(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"btad\.zip.*BTech|btad\.zip"):
        prepare_dataset("btad", tmp_path, tmp_path / "data", "aaclip", log=quiet)


def test_two_copies_of_a_layout_are_ambiguous(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    build_br35h(raw)
    shutil.copytree(raw / "Br35H", raw / "Br35H-copy")
    with pytest.raises(LayoutError, match="several folders hold the layout"):
        prepare_dataset("br35h", raw, tmp_path / "data", "anomalyclip", log=quiet)


def test_prepare_reuses_a_finished_layout_without_the_raw_data(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    build_br35h(raw)
    counts = {"anomalyclip": {"test": {"per_class": {"brain": [2, 2]}}}}
    prepare_dataset("br35h", raw, tmp_path / "data", "anomalyclip", expected_counts=counts, log=quiet)
    shutil.rmtree(raw / "Br35H")
    results = prepare_dataset(
        "br35h", raw, tmp_path / "data", "anomalyclip", expected_counts=counts, log=quiet
    )
    assert results[0].counts["test"] == {"brain": (2, 2)}


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves one payload, honouring `Range: bytes=N-` when `ranges` is set; records the bytes sent."""

    payload = b""
    ranges = True
    sent: list[int] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        start = 0
        header = self.headers.get("Range")
        if self.ranges and header:
            start = int(header.removeprefix("bytes=").rstrip("-"))
        body = self.payload[start:]
        self.sent.append(len(body))  # before writing: the client may return as soon as it has the body
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("ranges", [True, False], ids=["server-resumes", "server-ignores-range"])
def test_download_resumes_a_partial_file_and_verifies_the_checksum(tmp_path: Path, ranges: bool) -> None:
    payload = bytes(range(256)) * 64
    handler = type("Handler", (_RangeHandler,), {"payload": payload, "ranges": ranges, "sent": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/archive.zip"
    try:
        destination = tmp_path / "archive.zip"
        (tmp_path / "archive.zip.part").write_bytes(payload[:1000])  # an interrupted earlier download
        assert download(url, destination, hashlib.sha256(payload).hexdigest()).read_bytes() == payload
        assert handler.sent == [len(payload) - 1000 if ranges else len(payload)]
        assert not (tmp_path / "archive.zip.part").exists()
        with pytest.raises(ChecksumError, match="sha256 mismatch"):
            download(url, tmp_path / "other.zip", "0" * 64)
        assert not (tmp_path / "other.zip").exists() and not (tmp_path / "other.zip.part").exists()
    finally:
        server.shutdown()


def test_a_prepared_copy_inside_the_raw_folder_is_not_taken_for_raw_data(tmp_path: Path) -> None:
    raw_mpdd = tmp_path / "downloads" / "mpdd_v1" / "MPDD"  # deeper than the prepared copy ROOT/mpdd/official
    mvtec_like_classes(RawTree(raw_mpdd), "", {"bracket_black": {"good": 1, "hole": 1}})
    counts = {"anomalyclip": {"test": {"per_class": {"bracket_black": [1, 1]}}}}
    prepare_dataset("mpdd", tmp_path, tmp_path, "anomalyclip", expected_counts=counts, log=quiet)
    layout = get_dataset_spec("mpdd").layout("official")
    assert find_layout_root(tmp_path, layout) == tmp_path / "mpdd" / "official"  # what a naive search finds
    assert find_layout_root(tmp_path, layout, skip=(tmp_path / "mpdd").resolve()) == raw_mpdd
    prepare_dataset("mpdd", tmp_path, tmp_path, "anomalyclip", expected_counts=counts, force=True, log=quiet)
    info = json.loads((tmp_path / "mpdd" / "official" / "layout.json").read_text())
    assert info["source"] == str(raw_mpdd)


def test_images_and_masks_pairs_by_name_even_when_sorted_listings_disagree(tmp_path: Path) -> None:
    """ISIC_1 < ISIC_10 as images but ISIC_10_Segmentation < ISIC_1_Segmentation as masks."""
    tree = RawTree(tmp_path)
    for stem in ("ISIC_1", "ISIC_2", "ISIC_10"):
        tree.image(f"images/{stem}.jpg", anomalous=True, mask=f"gt/{stem}_Segmentation.png")
    params = {
        "class_name": "skin",
        "image_dirs": ["images"],
        "mask_dir": "gt",
        "mask_patterns": ["{stem}_Segmentation.png"],
    }
    samples = run_converter("images_and_masks", tmp_path, params, "isic").samples
    assert [(s.image.name, s.mask.name) for s in samples] == [
        ("ISIC_1.jpg", "ISIC_1_Segmentation.png"),
        ("ISIC_10.jpg", "ISIC_10_Segmentation.png"),
        ("ISIC_2.jpg", "ISIC_2_Segmentation.png"),
    ]
    assert sorted(p.name for p in (tmp_path / "gt").iterdir())[0] == "ISIC_10_Segmentation.png"


def test_a_count_mismatch_leaves_no_layout_so_fixed_raw_data_is_reread(tmp_path: Path) -> None:
    raw, root = tmp_path / "raw", tmp_path / "data"
    raw.mkdir()
    build_br35h(raw)  # 2 normal / 2 anomalous
    counts = {"anomalyclip": {"test": {"per_class": {"brain": [3, 2]}}}}
    with pytest.raises(CountMismatchError) as error:
        prepare_dataset("br35h", raw, root, "anomalyclip", expected_counts=counts, log=quiet)
    message = str(error.value)
    assert "source: the expected counts given with --counts" in message
    assert "Table 6" not in message  # the published source is not what was checked
    assert message.splitlines()[-1].startswith("Fix the raw data")
    assert not (root / "br35h" / "kaggle").exists() and not (root / "br35h" / ".kaggle.partial").exists()
    assert not (root / "br35h" / "manifest_anomalyclip.csv").exists()
    RawTree(raw / "Br35H").image("no/no2.jpg")  # the user fixes the raw data and reruns
    results = prepare_dataset("br35h", raw, root, "anomalyclip", expected_counts=counts, log=quiet)
    assert results[0].counts["test"] == {"brain": (3, 2)}


def test_a_count_mismatch_against_published_counts_cites_the_source_and_suggests_counts_file(
    tmp_path: Path,
) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    build_br35h(raw)
    with pytest.raises(CountMismatchError) as error:
        prepare_dataset("br35h", raw, tmp_path / "data", "anomalyclip", log=quiet)
    message = str(error.value)
    assert "(source: AnomalyCLIP Table 6 (1500 / 1500))" in message
    assert "--counts FILE" in message.splitlines()[-1]
    assert not (tmp_path / "data" / "br35h" / "kaggle").exists()


def test_a_count_mismatch_on_a_reused_layout_says_to_rerun_with_force(tmp_path: Path) -> None:
    raw, root = tmp_path / "raw", tmp_path / "data"
    raw.mkdir()
    build_br35h(raw)
    counts = {"anomalyclip": {"test": {"per_class": {"brain": [2, 2]}}}}
    prepare_dataset("br35h", raw, root, "anomalyclip", expected_counts=counts, log=quiet)
    wrong = {"anomalyclip": {"test": {"per_class": {"brain": [3, 2]}}}}
    with pytest.raises(CountMismatchError, match=r"(?s)reused from an earlier prepare.*--force"):
        prepare_dataset("br35h", raw, root, "anomalyclip", expected_counts=wrong, log=quiet)
    assert (root / "br35h" / "kaggle" / "layout.json").is_file()  # a checked layout stays (other manifests)


@pytest.mark.parametrize("broken", ["mask", "image"])
def test_a_truncated_raw_file_is_a_clean_cli_error_naming_it(tmp_path: Path, capsys, broken: str) -> None:
    from zsadkit.cli import main

    tree = RawTree(tmp_path / "raw" / "MPDD")
    mvtec_like_classes(tree, "", {"bracket_black": {"good": 1, "hole": 1}})
    hole = tmp_path / "raw/MPDD/bracket_black"
    path = hole / ("ground_truth/hole/000_mask.png" if broken == "mask" else "test/hole/000.png")
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    counts = tmp_path / "counts.yaml"
    counts.write_text("anomalyclip: {test: {per_class: {bracket_black: [1, 1]}}}\n")
    argv = ["data", "prepare", "mpdd", "--raw", str(tmp_path / "raw"), "--root", str(tmp_path / "data")]
    assert main([*argv, "--protocol", "anomalyclip", "--counts", str(counts)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {path}: cannot read {broken}") and "Traceback" not in error
