"""The `cpu` profile (a reading group's laptop: ViT-B-16 at 224 on a few VisA classes), run end to end with random
weights of the same shapes on a stand-in for the prepared VisA subset (the real one needs the VisA download)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from zsadkit import reproduce
from zsadkit.data.records import Sample, write_manifest
from zsadkit.experiment import RunConfig, load_split
from zsadkit.protocols import subset

CPU_NOTEBOOKS = [e.name for e in reproduce.load_registry()[1] if "cpu" in e.profiles]


def prepared_visa_stand_in(root: Path, per_class: int = 6) -> Path:
    """`root/visa/manifest_anomalyclip.csv` listing synthetic images under the class names of the cpu subsets."""
    synthetic = load_split(RunConfig(), "synth-aux") + load_split(RunConfig(), "synth-target")
    classes = [*subset("visa-aux")[1], *subset("visa-target")[1]]
    records = []
    for target, source in zip(classes, sorted({s.class_name for s in synthetic}), strict=False):
        chosen = [s for s in synthetic if s.class_name == source]
        chosen = [s for s in chosen if s.label == 0][: per_class // 2] + [s for s in chosen if s.label][: per_class // 2]
        for index, sample in enumerate(chosen):
            image = root / "visa" / "official" / target / "test" / sample.defect / f"{index:03d}.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(sample.image, image)
            mask = None
            if sample.mask is not None:
                mask = image.parent.parent.parent / "ground_truth" / sample.defect / f"{index:03d}_mask.png"
                mask.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(sample.mask, mask)
            records.append(Sample(str(image.relative_to(root)), None if mask is None else str(mask.relative_to(root)),
                                  sample.label, target, sample.defect, "visa", "test"))
    write_manifest(records, root / "visa" / "manifest_anomalyclip.csv")
    return root


def test_the_cpu_profile_selects_the_reading_group_notebooks_and_the_visa_subsets() -> None:
    assert {"00_quickstart", "10_anomalyclip_walkthrough", "11_anomalyclip_tables"} <= set(CPU_NOTEBOOKS)
    defaults, _ = reproduce.load_registry()
    assert (defaults["cpu"]["backbone"], defaults["cpu"]["pretrained"], defaults["cpu"]["image_size"]) == (
        "ViT-B-16", "openai", 224)
    assert subset("visa-aux")[0] == subset("visa-target")[0] == "visa"
    assert not set(subset("visa-aux")[1]) & set(subset("visa-target")[1])  # zero-shot: disjoint classes


def test_a_named_subset_keeps_its_classes_and_is_named_as_the_subset(tmp_path: Path) -> None:
    root = prepared_visa_stand_in(tmp_path / "data", per_class=2)
    samples = load_split(RunConfig(profile="cpu", data_root=str(root)), "visa-target")
    assert {s.class_name for s in samples} == set(subset("visa-target")[1])
    assert {s.dataset for s in samples} == {"visa-target"}


@pytest.mark.slow
def test_the_cpu_profile_runs_end_to_end_with_random_weights_of_the_same_shapes(tmp_path: Path) -> None:
    root = prepared_visa_stand_in(tmp_path / "data")
    code = reproduce.main(["--profile", "cpu", "--data-root", str(root), "--pretrained", "", "--out",
                           str(tmp_path / "results"), "--set", "epochs=1", "--set", "cache_root=" + str(tmp_path)])
    assert code == 0
    for name in CPU_NOTEBOOKS:
        assert (tmp_path / "results" / "executed" / f"{name}.done.json").is_file(), name
