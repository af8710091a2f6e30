"""`prepare` on a miniature of every dataset, built in its real raw layout (names, folders, quirks).

Every anomalous raw image carries one bright square at a position unique to it and every normal image
none; masks mark exactly that square. So a record's label must equal "its image has a bright square",
and a record's mask must sit where its image's square is: a mask paired with the wrong image fails.
The miniatures' counts are their own, passed as `expected_counts` so the manifests keep the published
ones; archives with a published sha256 get the miniature's digest in a copy of the spec.
"""

from __future__ import annotations

import csv
import dataclasses
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import train_test_split

from zsadkit.data.archives import sha256_of
from zsadkit.data.catalog import available_datasets, get_dataset_spec, load_dataset, manifest_path
from zsadkit.data.dataset_spec import count_by_class
from zsadkit.data.errors import LayoutError
from zsadkit.data.layouts import run_converter
from zsadkit.data.prepare import prepare_dataset
from zsadkit.data.records import read_manifest

BACKGROUND, SQUARE, SIDE = 30, 230, 4


class RawTree:
    """Writes a dataset's raw files; each anomalous image gets a square at its own position."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.drawn = 0

    def _next_square(self, width: int, height: int) -> tuple[int, int]:
        spots = [(x, y) for y in range(1, height - SIDE, 3) for x in range(1, width - SIDE, 3)]
        self.drawn += 1
        return spots[(self.drawn * 7) % len(spots)]

    def image(
        self,
        rel: str,
        anomalous: bool = False,
        size: tuple[int, int] = (16, 16),
        at: tuple[int, int] | None = None,
        mask: str | None = None,
        mask_value: int = 255,
        grey: bool = False,
    ) -> None:
        """Write image `rel` (format by suffix); with `mask`, write the mask of its square too."""
        width, height = size
        pixels = np.full((height, width), BACKGROUND, np.uint8)
        if anomalous:
            x, y = at if at is not None else self._next_square(width, height)
            pixels[y : y + SIDE, x : x + SIDE] = SQUARE
            if mask is not None:
                label = np.zeros((height, width), np.uint8)
                label[y : y + SIDE, x : x + SIDE] = mask_value
                self._save(label, mask)
        elif mask is not None:
            self._save(np.zeros((height, width), np.uint8), mask)
        self._save(pixels if grey else np.stack([pixels] * 3, axis=-1), rel)

    def _save(self, pixels: np.ndarray, rel: str) -> None:
        path = self.base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        options = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
        Image.fromarray(pixels).save(path, format=_format(path), **options)

    def text(self, rel: str, content: str) -> None:
        path = self.base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


def _format(path: Path) -> str:
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP"}[path.suffix.lower()]


def pack(source: Path, archive: Path) -> None:
    """Pack every file under `source` into a tar (.tar, .tar.xz, .tar.gz) or zip archive, then delete it."""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as bundle:
            for file in files:
                bundle.write(file, file.relative_to(source).as_posix())
    else:
        mode = {".xz": "w:xz", ".gz": "w:gz", ".tar": "w"}[archive.suffix]
        with tarfile.open(archive, mode) as bundle:
            for file in files:
                bundle.add(file, file.relative_to(source).as_posix())
    shutil.rmtree(source)


@dataclass
class Miniature:
    """A built miniature: its own expected counts per protocol and the protocol to prepare (None = all)."""

    counts: dict[str, dict]
    protocol: str | None = None
    one_vs_all: bool = False
    jpeg_masks: bool = False
    archives: list[str] = field(default_factory=list)


def mvtec_like_classes(
    tree: RawTree,
    prefix: str,
    classes: dict[str, dict[str, int]],
    *,
    normal: str = "good",
    suffix: str = "_mask",
    ext: str = ".png",
    mask_ext: str = ".png",
    train: int = 2,
) -> None:
    """`<prefix>/<cls>/{train,test}/<defect>/NNN<ext>` with masks `ground_truth/<defect>/NNN<suffix><mask_ext>`."""
    for cls, defects in classes.items():
        for i in range(train):
            tree.image(f"{prefix}{cls}/train/{normal}/{i:03d}{ext}")
        for defect, n in defects.items():
            for i in range(n):
                if defect == normal:
                    tree.image(f"{prefix}{cls}/test/{normal}/{i:03d}{ext}")
                else:
                    tree.image(
                        f"{prefix}{cls}/test/{defect}/{i:03d}{ext}",
                        anomalous=True,
                        mask=f"{prefix}{cls}/ground_truth/{defect}/{i:03d}{suffix}{mask_ext}",
                    )


# --------------------------------------------------------------------------------------------- builders


def build_mvtec(raw: Path) -> Miniature:
    tree = RawTree(raw / "src")
    mvtec_like_classes(
        tree,
        "",
        {
            "bottle": {"good": 2, "broken_large": 2, "contamination": 1},
            "zipper": {"good": 1, "broken_teeth": 2},
        },
    )
    pack(raw / "src", raw / "mvtec_anomaly_detection.tar.xz")
    counts = {
        "test": {"per_class": {"bottle": [2, 3], "zipper": [1, 2]}},
        "train": {"per_class": {"bottle": [2, 0], "zipper": [2, 0]}},
    }
    return Miniature(
        {"anomalyclip": counts}, protocol="anomalyclip", archives=["mvtec_anomaly_detection.tar.xz"]
    )


def build_visa(raw: Path) -> Miniature:
    tree = RawTree(raw / "src")
    rows = [("object", "split", "label", "image", "mask")]
    for cls, n_train, n_test_normal, n_anomaly in (("candle", 2, 1, 2), ("capsules", 1, 2, 1)):
        for i in range(n_train + n_test_normal):
            tree.image(f"VisA/{cls}/Data/Images/Normal/{i:04d}.JPG")
            rows.append(
                (
                    cls,
                    "train" if i < n_train else "test",
                    "normal",
                    f"{cls}/Data/Images/Normal/{i:04d}.JPG",
                    "",
                )
            )
        for i in range(n_anomaly):  # label-valued masks: region i has value i + 1
            tree.image(
                f"VisA/{cls}/Data/Images/Anomaly/{i:03d}.JPG",
                anomalous=True,
                mask=f"VisA/{cls}/Data/Masks/Anomaly/{i:03d}.png",
                mask_value=i + 1,
            )
            rows.append(
                (
                    cls,
                    "test",
                    "anomaly",
                    f"{cls}/Data/Images/Anomaly/{i:03d}.JPG",
                    f"{cls}/Data/Masks/Anomaly/{i:03d}.png",
                )
            )
        tree.text(f"VisA/{cls}/image_anno.csv", "image,label,mask\n")
    tree.text("VisA/split_csv/1cls.csv", "\n".join(",".join(r) for r in rows) + "\n")
    tree.text("VisA/split_csv/2cls_fewshot.csv", "object,split,label,image,mask\n")
    pack(raw / "src", raw / "VisA_20220922.tar")
    counts = {
        "test": {"per_class": {"candle": [1, 2], "capsules": [2, 1]}},
        "train": {"per_class": {"candle": [2, 0], "capsules": [1, 0]}},
    }
    return Miniature({"aaclip": counts}, protocol="aaclip", archives=["VisA_20220922.tar"])


def build_mpdd(raw: Path) -> Miniature:
    mvtec_like_classes(
        RawTree(raw / "MPDD"),
        "",
        {"bracket_black": {"good": 1, "hole": 2}, "tubes": {"good": 2, "anomalous": 1}},
    )
    return Miniature(
        {"anomalyclip": {"test": {"per_class": {"bracket_black": [1, 2], "tubes": [2, 1]}}}},
        protocol="anomalyclip",
    )


def build_btad(raw: Path) -> Miniature:
    tree = RawTree(raw / "src")
    prefix = "BTech_Dataset_transformed/"
    # 01: bmp images / png masks, 02: png / png, 03: bmp / bmp; normal = ok, anomalous = ko, mask stem = image stem
    mvtec_like_classes(tree, prefix, {"01": {"ok": 2, "ko": 1}}, normal="ok", suffix="", ext=".bmp")
    mvtec_like_classes(tree, prefix, {"02": {"ok": 1, "ko": 2}}, normal="ok", suffix="")
    mvtec_like_classes(
        tree, prefix, {"03": {"ok": 1, "ko": 1}}, normal="ok", suffix="", ext=".bmp", mask_ext=".bmp"
    )
    pack(raw / "src", raw / "btad.zip")
    return Miniature(
        {"aaclip": {"test": {"per_class": {"01": [2, 1], "02": [1, 2], "03": [1, 1]}}}},
        protocol="aaclip",
        archives=["btad.zip"],
    )


def build_dtd_synthetic(raw: Path) -> Miniature:
    mvtec_like_classes(
        RawTree(raw / "DTD-Synthetic"),
        "",
        {"Woven_001": {"good": 2, "bad": 2}, "Blotchy_099": {"good": 1, "bad": 1}},
    )
    return Miniature({"anomalyclip": {"test": {"total": [3, 3]}}}, protocol="anomalyclip")


def build_sdd_kolektor(raw: Path) -> Miniature:
    """KolektorSDD: kosNN/PartK.jpg (8x24) + PartK_label.bmp; the defect lies in one vertical third."""
    tree = RawTree(raw / "src")
    defects = {("kos01", 1): 0, ("kos02", 0): 2}  # (folder, part) -> third holding the defect
    for folder in ("kos01", "kos02"):
        for part in range(2):
            third = defects.get((folder, part))
            at = None if third is None else (2, 8 * third + 2)
            tree.image(
                f"{folder}/Part{part}.jpg",
                anomalous=third is not None,
                size=(8, 24),
                at=at,
                mask=f"{folder}/Part{part}_label.bmp",
                grey=True,
            )
    pack(raw / "src", raw / "KolektorSDD.zip")
    # 4 images x 3 thirds = 12 crops, 2 defective; ceil(0.25 * 10) = 3 normal crops stay in test
    counts = {
        "test": {"per_class": {"electrical commutators": [3, 2]}},
        "train": {"per_class": {"electrical commutators": [7, 0]}},
    }
    return Miniature({"inctrl": counts}, protocol="inctrl", archives=["KolektorSDD.zip"])


def build_sdd_anomalyclip_copy(raw: Path) -> Miniature:
    tree = RawTree(raw / "SDD")
    for i in range(3):
        tree.image(f"electrical commutators/test/good/{i:03d}.png")
    for i in range(2):
        tree.image(
            f"electrical commutators/test/defect/{i:03d}.png",
            anomalous=True,
            mask=f"electrical commutators/ground_truth/defect/{i:03d}_mask.png",
        )
    return Miniature(
        {"anomalyclip": {"test": {"per_class": {"electrical commutators": [3, 2]}}}}, protocol="anomalyclip"
    )


def build_dagm(raw: Path) -> Miniature:
    """Kaggle DAGM: ClassN/{Train,Test}/NNNN.PNG, defects marked by Label/NNNN_label.PNG (+ Labels.txt)."""
    tree = RawTree(raw / "DAGM_KaggleUpload")
    defective = {
        ("Class1", "Test"): {1},
        ("Class1", "Train"): {0, 2},
        ("Class10", "Test"): {0, 3},
        ("Class10", "Train"): set(),
    }
    for (cls, split), bad in defective.items():
        lines = ["4"]
        for i in range(4):
            name = f"{i + 1:04d}.PNG"
            tree.image(
                f"{cls}/{split}/{name}",
                anomalous=i in bad,
                grey=True,
                mask=f"{cls}/{split}/Label/{i + 1:04d}_label.PNG" if i in bad else None,
            )
            lines.append(
                f"{i + 1}\t{int(i in bad)}\t{name}\t0\t" + (f"{i + 1:04d}_label.PNG" if i in bad else "")
            )
        tree.text(f"{cls}/{split}/Label/Labels.txt", "\n".join(lines) + "\n")
    return Miniature(
        {"anomalyclip": {"test": {"per_class": {"Class1": [3, 1], "Class10": [2, 2]}}}},
        protocol="anomalyclip",
    )


def build_isic(raw: Path) -> Miniature:
    tree = RawTree(raw / "data")
    for i in (3, 12, 101):
        tree.image(
            f"ISBI2016_ISIC_Part1_Test_Data/ISIC_{i:07d}.jpg",
            anomalous=True,
            mask=f"../gt/ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_{i:07d}_Segmentation.png",
        )
    pack(raw / "data", raw / "ISBI2016_ISIC_Part1_Test_Data.zip")
    pack(raw / "gt", raw / "ISBI2016_ISIC_Part1_Test_GroundTruth.zip")  # the ground truth is a second archive
    return Miniature({"anomalyclip": {"test": {"per_class": {"skin": [0, 3]}}}}, protocol="anomalyclip")


def _polyp(folder: str, n: int, ext: str = ".png", mask_ext: str = ".png") -> Callable[[Path], Miniature]:
    def build(raw: Path) -> Miniature:
        tree = RawTree(raw / "Polyp_DataSet")
        for other in ("CVC-ClinicDB", "CVC-ColonDB", "CVC-300", "ETIS-LaribPolypDB"):
            for i in range(1, n + 1):  # stems 1, 2, ..., 10: sorted order differs from numeric order
                tree.image(
                    f"TestDataset/{other}/images/{i}{ext}",
                    anomalous=True,
                    mask=f"TestDataset/{other}/masks/{i}{mask_ext}",
                )
        return Miniature({"aaclip": {"test": {"per_class": {"colon": [0, n]}}}}, protocol="aaclip")

    return build


def build_kvasir(raw: Path) -> Miniature:
    tree = RawTree(raw / "src")
    for stem in ("cju0qkwl35piu0993l0dewei2", "cju0qoxqj9q6s0835b43399p4", "cju0roawvklrq0799vmjorwfv"):
        tree.image(f"Kvasir-SEG/images/{stem}.jpg", anomalous=True, mask=f"Kvasir-SEG/masks/{stem}.jpg")
    pack(raw / "src", raw / "kvasir-seg.zip")
    return Miniature(
        {"anomalyclip": {"test": {"per_class": {"colon": [0, 3]}}}}, protocol="anomalyclip", jpeg_masks=True
    )


def build_endo(raw: Path) -> Miniature:
    tree = RawTree(raw / "EndoTect_2020_Segmentation_Test_Dataset")
    for i in range(3):
        tree.image(f"images/{i:03d}.jpg", anomalous=True, mask=f"masks/{i:03d}.png")
    return Miniature({"anomalyclip": {"test": {"per_class": {"colon": [0, 3]}}}}, protocol="anomalyclip")


def build_tn3k(raw: Path) -> Miniature:
    tree = RawTree(raw / "tn3k")
    for i in range(3):
        tree.image(f"test-image/{i:04d}.jpg", anomalous=True, mask=f"test-mask/{i:04d}.jpg")
        tree.image(f"trainval-image/{i:04d}.jpg", anomalous=True, mask=f"trainval-mask/{i:04d}.jpg")
    return Miniature(
        {"anomalyclip": {"test": {"per_class": {"thyroid": [0, 3]}}}}, protocol="anomalyclip", jpeg_masks=True
    )


def build_headct(raw: Path) -> Miniature:
    tree = RawTree(raw / "head-ct")
    labels = [0, 1, 0, 0, 1, 1, 0, 1]
    for i, label in enumerate(labels):
        tree.image(f"head_ct/head_ct/{i:03d}.png", anomalous=bool(label), grey=True)
    tree.text("labels.csv", "id, hemorrhage\n" + "".join(f"{i},{label}\n" for i, label in enumerate(labels)))
    all_test = {"test": {"per_class": {"brain": [4, 4]}}}
    inctrl = {"test": {"per_class": {"brain": [1, 4]}}, "train": {"per_class": {"brain": [3, 0]}}}
    return Miniature({"anomalyclip": all_test, "adaclip": all_test, "headclip": all_test, "inctrl": inctrl})


def build_brainmri(raw: Path) -> Miniature:
    tree = RawTree(raw / "archive")
    for name in ("no/1 no.jpeg", "no/N17.jpg", "no/no 923.JPG"):
        tree.image(f"brain_tumor_dataset/{name}")
    for name in ("yes/Y1.jpg", "yes/Y20.JPG"):
        tree.image(f"brain_tumor_dataset/{name}", anomalous=True)
    tree.image("no/1 no.jpeg")  # the Kaggle zip repeats the folders at its root
    counts = {"test": {"per_class": {"brain": [1, 2]}}, "train": {"per_class": {"brain": [2, 0]}}}
    return Miniature({"inctrl": counts}, protocol="inctrl")


def build_br35h(raw: Path) -> Miniature:
    tree = RawTree(raw / "Br35H")
    for i in range(2):
        tree.image(f"no/no{i}.jpg")
        tree.image(f"yes/y{i}.jpg", anomalous=True)
    for i in range(3):  # unlabelled images that must not count
        tree.image(f"pred/pred{i}.jpg", anomalous=True)
    return Miniature({"anomalyclip": {"test": {"per_class": {"brain": [2, 2]}}}}, protocol="anomalyclip")


def build_covid19_first_release(raw: Path) -> Miniature:
    tree = RawTree(raw / "COVID-19 Radiography Database")
    for i in range(3):
        tree.image(f"NORMAL/NORMAL ({i + 1}).png", grey=True)
        tree.image(f"Viral Pneumonia/Viral Pneumonia ({i + 1}).png", anomalous=True, grey=True)
    for i in range(2):
        tree.image(f"COVID-19/COVID-19 ({i + 1}).png", anomalous=True, grey=True)
    tree.text("README.md.txt", "COVID-19 Radiography Database\n")
    return Miniature({"anomalyclip": {"test": {"per_class": {"chest": [3, 2]}}}}, protocol="anomalyclip")


def build_covid19_current(raw: Path) -> Miniature:
    tree = RawTree(raw / "COVID-19_Radiography_Dataset")
    for folder, n, anomalous in (
        ("Normal", 2, False),
        ("COVID", 1, True),
        ("Lung_Opacity", 2, True),
        ("Viral Pneumonia", 1, True),
    ):
        for i in range(n):
            tree.image(
                f"{folder}/images/{folder}-{i + 1}.png",
                anomalous=anomalous,
                grey=True,
                mask=f"{folder}/masks/{folder}-{i + 1}.png",
            )  # lung masks, unused
    tree.text("COVID.metadata.xlsx", "not really a spreadsheet")
    return Miniature({"current": {"test": {"per_class": {"chest": [2, 1]}}}}, protocol="current")


def build_aitex(raw: Path) -> Miniature:
    """AITEX: 512x256 images (two 256 tiles), the defect in the first tile; the second tile is left out."""
    tree = RawTree(raw / "AITEX")
    for fabric, stem in (("2311694-2040n7u", "0001_000_05"), ("2608691-2040n7u", "0002_000_05")):
        tree.image(f"NODefect_images/{fabric}/{stem}.png", size=(512, 256), grey=True)
    for stem, x in (("0001_002_00", 100), ("0003_019_04", 40)):
        tree.image(
            f"Defect_images/Defect_images/{stem}.png",
            anomalous=True,
            size=(512, 256),
            at=(x, 120),
            mask=f"Mask_images/Mask_images/{stem}_mask.png",
            grey=True,
        )
    counts = {"test": {"per_class": {"fabric": [1, 2]}}, "train": {"per_class": {"fabric": [3, 0]}}}
    return Miniature({"inctrl": counts}, protocol="inctrl")


def build_elpv(raw: Path) -> Miniature:
    tree = RawTree(raw / "elpv-dataset")
    rows = [
        ("0", "mono"),
        ("1.0", "mono"),
        ("0.0", "poly"),
        ("0.3333333333333333", "mono"),
        ("1.0", "poly"),
        ("0.0", "poly"),
        ("0.6666666666666666", "poly"),
        ("0.0", "mono"),
    ]
    lines = []
    for i, (probability, kind) in enumerate(rows):
        tree.image(f"data/images/cell{i + 1:04d}.png", anomalous=float(probability) > 0, grey=True)
        lines.append(f"images/cell{i + 1:04d}.png  {probability}  {kind}")
    tree.text("data/labels.csv", "\n".join(lines) + "\n")
    counts = {"test": {"per_class": {"solar cell": [1, 2]}}, "train": {"per_class": {"solar cell": [3, 0]}}}
    return Miniature({"inctrl": counts}, protocol="inctrl")


def build_mnist(raw: Path) -> Miniature:
    tree = RawTree(raw / "mnist_png")
    sizes = {"0": (2, 1), "1": (1, 2), "2": (1, 1)}  # digit -> (train, test)
    for digit, (n_train, n_test) in sizes.items():
        for i in range(n_train):
            tree.image(f"training/{digit}/{i}.png", grey=True)
        for i in range(n_test):
            tree.image(f"testing/{digit}/{i + 100}.png", grey=True)
    counts = {
        "test": {"per_class": {"0": [1, 3], "1": [2, 2], "2": [1, 3]}},
        "train": {"per_class": {"0": [2, 0], "1": [1, 0], "2": [1, 0]}},
    }
    return Miniature({"inctrl": counts}, protocol="inctrl", one_vs_all=True)


def build_cifar10(raw: Path) -> Miniature:
    tree = RawTree(raw / "cifar10")
    for cls, (n_train, n_test) in {"airplane": (1, 2), "cat": (1, 1)}.items():
        for i in range(n_train):
            tree.image(f"train/{cls}/{i:04d}.png")
        for i in range(n_test):
            tree.image(f"test/{cls}/{i:04d}.png")
    counts = {
        "test": {"per_class": {"airplane": [2, 1], "cat": [1, 2]}},
        "train": {"per_class": {"airplane": [1, 0], "cat": [1, 0]}},
    }
    return Miniature({"inctrl": counts}, protocol="inctrl", one_vs_all=True)


def _bmad(folder: str, class_name: str) -> Callable[[Path], Miniature]:
    def build(raw: Path) -> Miniature:
        tree = RawTree(raw / "src")
        for name in ("Brain_AD", "Liver_AD", "RESC_AD"):
            for i in range(2):
                tree.image(
                    f"{name}/test/good/img/{i:05d}.png", grey=True, mask=f"{name}/test/good/label/{i:05d}.png"
                )
                tree.image(f"{name}/train/good/{i:05d}.png", grey=True)
            for i in range(3):
                tree.image(
                    f"{name}/test/Ungood/img/{i:05d}.png",
                    anomalous=True,
                    grey=True,
                    mask=f"{name}/test/Ungood/label/{i:05d}.png",
                )
        pack(raw / "src", raw / "bmad.zip")
        return Miniature(
            {"aaclip": {"test": {"per_class": {class_name: [2, 3]}}}},
            protocol="aaclip",
            archives=["bmad.zip"],
        )

    return build


BUILDERS: dict[str, dict[str, Callable[[Path], Miniature]]] = {
    "mvtec": {"official": build_mvtec},
    "visa": {"official": build_visa},
    "mpdd": {"official": build_mpdd},
    "btad": {"official": build_btad},
    "dtd_synthetic": {"official": build_dtd_synthetic},
    "sdd": {"kolektor_crops": build_sdd_kolektor, "anomalyclip_copy": build_sdd_anomalyclip_copy},
    "dagm": {"kaggle": build_dagm},
    "isic": {"official": build_isic},
    "clinicdb": {"official": _polyp("CVC-ClinicDB", 10)},
    "colondb": {"official": _polyp("CVC-ColonDB", 3)},
    "cvc300": {"official": _polyp("CVC-300", 2)},
    "kvasir": {"official": build_kvasir},
    "endo": {"official": build_endo},
    "tn3k": {"official": build_tn3k},
    "headct": {"kaggle": build_headct},
    "brainmri": {"kaggle": build_brainmri},
    "br35h": {"kaggle": build_br35h},
    "covid19": {"first_release": build_covid19_first_release, "current": build_covid19_current},
    "aitex": {"tiles": build_aitex},
    "elpv": {"official": build_elpv},
    "mnist": {"png_folders": build_mnist},
    "cifar10": {"png_folders": build_cifar10},
    "bmad_brain": {"official": _bmad("Brain_AD", "brain")},
    "bmad_liver": {"official": _bmad("Liver_AD", "liver")},
    "bmad_resc": {"official": _bmad("RESC_AD", "retina")},
}
CASES = [(name, layout) for name, layouts in BUILDERS.items() for layout in layouts]


# ---------------------------------------------------------------------------------------------- checks


def spec_with_miniature_checksums(name: str, raw: Path):
    """The dataset's spec with each published sha256 replaced by the miniature archive's digest."""
    spec = get_dataset_spec(name)
    archives = tuple(
        dataclasses.replace(a, sha256=sha256_of(raw / a.file)) if a.sha256 and (raw / a.file).is_file() else a
        for a in spec.archives
    )
    return dataclasses.replace(spec, archives=archives)


def bright_centroid(pixels: np.ndarray) -> tuple[float, float] | None:
    ys, xs = np.nonzero(pixels)
    return None if len(ys) == 0 else (float(ys.mean()), float(xs.mean()))


def grey(path: str) -> np.ndarray:
    with Image.open(path) as opened:
        return np.asarray(opened.convert("L"))


def test_every_manifest_has_a_miniature_builder() -> None:
    assert sorted(BUILDERS) == available_datasets()
    for name, layouts in BUILDERS.items():
        assert set(layouts) == set(get_dataset_spec(name).layouts), name


@pytest.mark.parametrize(("name", "layout"), CASES, ids=[f"{n}-{lay}" for n, lay in CASES])
def test_prepare_builds_each_protocol_from_a_miniature_in_the_real_layout(
    name: str, layout: str, tmp_path: Path
) -> None:
    raw, root = tmp_path / "raw", tmp_path / "data"
    raw.mkdir()
    miniature = BUILDERS[name][layout](raw)
    spec = spec_with_miniature_checksums(name, raw)
    results = spec_prepare(spec, raw, root, miniature)
    prepared = {r.protocol for r in results if r.manifest is not None}
    assert set(miniature.counts) <= prepared

    for protocol, expected in miniature.counts.items():
        csv_text = manifest_path(root, name, protocol).read_text()
        assert str(tmp_path) not in csv_text  # portable: paths relative to the data root
        relative = read_manifest(manifest_path(root, name, protocol))
        assert all(
            not Path(s.image).is_absolute() and s.image.startswith(f"{name}/{layout}/") for s in relative
        )
        for split, want in expected.items():
            records = load_dataset(name, protocol, root, split=split)
            found = {c: list(v) for c, v in count_by_class(records, split).items()}
            if "per_class" in want:
                assert found == want["per_class"]
            else:
                assert [sum(v[0] for v in found.values()), sum(v[1] for v in found.values())] == want["total"]
            for record in records:
                image = grey(record.image)
                assert Path(record.image).is_file()
                if not miniature.one_vs_all:  # a bright square marks every anomalous raw image
                    assert bool((image > 128).any()) == bool(record.label), record.image
                if record.mask is None:
                    assert not (record.label and spec.protocol(protocol).masks), record.image
                    continue
                mask = grey(record.mask)
                assert set(np.unique(mask)) <= {0, 255} and mask.shape == image.shape
                assert mask[image > 128].all(), (record.image, record.mask)  # the mask covers the square
                if (
                    not miniature.jpeg_masks
                ):  # and nothing else (JPEG noise > 0 widens it: reference threshold)
                    spots = bright_centroid(image > 128), bright_centroid(mask > 0)
                    assert np.allclose(*spots, atol=1.0), (record.image, record.mask)

    first = {p: manifest_path(root, name, p).read_bytes() for p in miniature.counts}
    spec_prepare(spec, raw, root, miniature)  # idempotent: same manifests, layout reused
    assert {p: manifest_path(root, name, p).read_bytes() for p in miniature.counts} == first
    assert not (root / name / ".staging").exists()


def spec_prepare(spec, raw: Path, root: Path, miniature: Miniature):
    return prepare_dataset(
        spec, raw, root, miniature.protocol, expected_counts=miniature.counts, log=lambda _: None
    )


def test_manifest_published_counts_are_kept_when_a_miniature_overrides_them() -> None:
    assert get_dataset_spec("mvtec").protocol("anomalyclip").test.total == (467, 1258)
    assert get_dataset_spec("sdd").protocol("anomalyclip").test.per_class == {
        "electrical commutators": (181, 74)
    }
    assert get_dataset_spec("sdd").protocol("inctrl").test.per_class == {"electrical commutators": (286, 54)}
    assert get_dataset_spec("headct").protocol("inctrl").test.per_class == {"brain": (25, 100)}
    assert get_dataset_spec("covid19").protocol("anomalyclip").layout == "first_release"


def test_published_totals_match_anomalyclip_table6() -> None:
    table6 = {  # AnomalyCLIP Table 6: dataset -> (test normal, test anomalous)
        "mvtec": (467, 1258),
        "visa": (962, 1200),
        "mpdd": (176, 282),
        "btad": (451, 290),
        "sdd": (181, 74),
        "dagm": (6996, 1054),
        "dtd_synthetic": (357, 947),
        "isic": (0, 379),
        "clinicdb": (0, 612),
        "colondb": (0, 380),
        "kvasir": (0, 1000),
        "endo": (0, 200),
        "tn3k": (0, 614),
        "headct": (100, 100),
        "brainmri": (98, 155),
        "br35h": (1500, 1500),
        "covid19": (1341, 219),
    }
    for name, total in table6.items():
        counts = get_dataset_spec(name).protocol("anomalyclip").test
        found = (
            counts.total
            if counts.total is not None
            else tuple(map(sum, zip(*counts.per_class.values(), strict=True)))
        )
        assert found == total, name


def test_visa_csv_split_is_honoured_not_the_folder_contents(tmp_path: Path) -> None:
    raw, root = tmp_path / "raw", tmp_path / "data"
    raw.mkdir()
    build_visa(raw)
    with tarfile.open(raw / "VisA_20220922.tar") as bundle:
        bundle.extractall(raw / "x", filter="data")
    (raw / "VisA_20220922.tar").unlink()
    table = raw / "x/VisA/split_csv/1cls.csv"
    rows = list(csv.reader(table.read_text().splitlines()))
    table.write_text(
        "\n".join(",".join(r) for r in rows if r[3] != "candle/Data/Images/Normal/0002.JPG") + "\n"
    )
    counts = {
        "aaclip": {"test": {"per_class": {"candle": [0, 2], "capsules": [2, 1]}}, "train": {"total": [3, 0]}}
    }
    prepare_dataset("visa", raw, root, "aaclip", expected_counts=counts, log=lambda _: None)
    images = [Path(s.image).relative_to(root).as_posix() for s in load_dataset("visa", "aaclip", root)]
    assert len(images) == 5
    assert "visa/official/candle/test/good/0002.JPG" not in images
    assert "visa/official/capsules/test/good/0002.JPG" in images


def test_dagm_labels_txt_flags_agree_with_the_label_files(tmp_path: Path) -> None:
    build_dagm(tmp_path)
    root = tmp_path / "DAGM_KaggleUpload"
    by_files = run_converter("dagm", root, {"anomalous_by": "label_files"}, "dagm").samples
    by_table = run_converter("dagm", root, {"anomalous_by": "labels_txt"}, "dagm").samples
    assert by_files == by_table
    assert sum(s.label for s in by_files) == 5 and all(
        (s.mask is not None) == bool(s.label) for s in by_files
    )
    labels = root / "Class1" / "Test" / "Label" / "Labels.txt"
    labels.write_text("\n".join(labels.read_text().splitlines()[:-1]) + "\n")  # drop the last image
    with pytest.raises(LayoutError, match=r"Class1/Test/0004\.PNG: image not listed in .*Labels\.txt"):
        run_converter("dagm", root, {"anomalous_by": "labels_txt"}, "dagm")


def test_inctrl_headct_test_normals_are_those_of_its_convert_script(tmp_path: Path) -> None:
    """InCTRL's convert_HeadCT.py: train_test_split(normal ids in labels.csv order, test_size=0.25, seed 42)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    tree = RawTree(raw / "head-ct")
    labels = [1, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0]  # nine normals: ceil(2.25) = 3 stay in test
    for i, label in enumerate(labels):
        tree.image(f"head_ct/head_ct/{i:03d}.png", anomalous=bool(label), grey=True)
    tree.text("labels.csv", "id, hemorrhage\n" + "".join(f"{i},{v}\n" for i, v in enumerate(labels)))
    counts = {"inctrl": {"test": {"per_class": {"brain": [3, 3]}}, "train": {"per_class": {"brain": [6, 0]}}}}
    prepare_dataset("headct", raw, tmp_path / "data", "inctrl", expected_counts=counts, log=lambda _: None)

    normal_ids = np.array([i for i, v in enumerate(labels) if v == 0])
    _, reference_test, _, _ = train_test_split(normal_ids, normal_ids, test_size=0.25, random_state=42)
    test_normals = {
        int(Path(s.image).stem) for s in load_dataset("headct", "inctrl", tmp_path / "data") if not s.label
    }
    assert test_normals == set(reference_test.tolist())
    assert test_normals != set(normal_ids[:3].tolist())  # a real draw, not the first three
