"""RunConfig: profiles, the weights label and banner, and loading the backbone from a tag, a file or nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from zsadkit.experiment import RunConfig, load_split
from zsadkit.models import load_clip


def test_unknown_profile_is_rejected_with_the_allowed_names() -> None:
    with pytest.raises(ValueError, match="profile must be one of"):
        RunConfig(profile="nightly")


def test_smoke_banner_says_the_weights_are_random() -> None:
    cfg = RunConfig()
    assert cfg.weights_label == "random"
    assert "RANDOM weights" in cfg.banner()
    assert "RANDOM" not in RunConfig(pretrained="openai").banner()


def test_backbone_from_a_weights_file_has_the_file_weights(tmp_path: Path) -> None:
    reference = load_clip("zsad-tiny", image_size=64, seed=3)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    cfg = RunConfig(backbone="zsad-tiny", pretrained=str(path), image_size=64, backbone_seed=0)
    loaded = cfg.load_backbone()
    assert loaded.zsad_source.checkpoint == str(path) and not loaded.zsad_source.random_init
    for name, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    different_seed = RunConfig(backbone="zsad-tiny", image_size=64, backbone_seed=0).load_backbone()
    assert not torch.equal(different_seed.visual.proj, reference.visual.proj)


def test_missing_weights_file_is_named_instead_of_read_as_a_tag(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pt.* does not exist"):
        RunConfig(backbone="zsad-tiny", pretrained=str(tmp_path / "nope.pt")).load_backbone()


def test_smoke_datasets_are_the_synthetic_aux_and_target_groups() -> None:
    cfg = RunConfig()
    aux, target = load_split(cfg, "synth-aux"), load_split(cfg, "synth-target")
    assert {s.class_name for s in aux}.isdisjoint({s.class_name for s in target})
    assert {s.label for s in target} == {0, 1}
    with pytest.raises(KeyError, match="only the synthetic datasets"):
        load_split(cfg, "mvtec")


def test_a_notebook_namespace_maps_onto_the_run_fields_and_ignores_the_rest() -> None:
    namespace = {"profile": "smoke", "image_size": 64, "backbone_seed": 3, "train_seed": 9, "epochs": 2,
                 "methods": ["clip"], "torch": torch}
    cfg = RunConfig.from_parameters(namespace)
    assert (cfg.image_size, cfg.backbone_seed, cfg.train_seed, cfg.backbone) == (64, 3, 9, "zsad-tiny")
    assert cfg.out_dir.endswith("results/scratch/smoke")  # by hand: never over the runner's results/smoke


def test_provenance_records_the_two_seeds_separately() -> None:
    cfg = RunConfig(image_size=64, backbone_seed=3, train_seed=9)
    trained = cfg.provenance("coop", train_set="synth-aux", train_seed=cfg.train_seed, checkpoint=Path("c.st"))
    assert (trained.backbone_seed, trained.train_seed, trained.checkpoint, trained.weights) == (3, 9, "c.st", "random")
    assert cfg.provenance("clip").train_seed is None  # a method that draws nothing has no train seed
    winclip = cfg.with_backbone("zsad-tiny", None, 80).provenance("winclip")
    assert (winclip.image_size, winclip.backbone) == (80, "zsad-tiny")


def test_every_method_of_a_run_is_built_on_the_same_random_backbone() -> None:
    cfg = RunConfig(image_size=64, backbone_seed=0, train_seed=111)
    backbones = {name: cfg.build(name) for name in ("clip", "vand", "coop", "anomalyclip")}
    reference = backbones["clip"].clip.state_dict()
    for name in ("vand", "coop", "anomalyclip"):
        model = backbones[name]
        clip = model.clip if name == "vand" else model.text.clip
        for key, value in reference.items():
            assert torch.equal(clip.state_dict()[key], value), (name, key)
    # the train seed initialises CoOp's contexts, not its backbone (the smoke rows used to say seed=0 while CoOp's
    # backbone was drawn with the train seed)
    assert not torch.equal(cfg.build("coop", train_seed=5).trainable_parameters()["contexts"],
                           backbones["coop"].trainable_parameters()["contexts"])


def test_executor_and_scheduler_say_where_a_grid_runs_and_are_not_settings_of_a_result() -> None:
    with pytest.raises(ValueError, match="executor must be one of"):
        RunConfig(executor="slurm")
    local = RunConfig(out_dir="/tmp/a")
    remote = RunConfig(out_dir="/tmp/b", executor="dask", scheduler="tcp://head:8786")
    assert local.settings() == remote.settings() and "executor" not in local.settings()
    assert local.settings()["image_size"] == 112
    assert RunConfig(device="cuda:1").cell_resources == {"GPU": 1} and local.cell_resources == {}
