"""AA-CLIP training and evaluation (`zsadkit.recipes.aaclip`): the stage-1 feature cache changes nothing, the
augmentation, the data regimes, epoch choice and checkpoints, the fused evaluation, and that the two stages help."""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from zsadkit.data.records import Sample, read_manifest
from zsadkit.experiment import RunConfig, load_split
from zsadkit.methods.aaclip import build_aaclip
from zsadkit.recipes.aaclip import (
    NO_AUGMENTATION,
    REFERENCE_EPOCH,
    STAGE1,
    STAGE1_AUGMENTATION,
    STAGE2,
    Augmentation,
    AugmentedDataset,
    TrainingRun,
    best_epoch_on_test,
    choose_epoch,
    epoch_order,
    evaluate,
    fit,
    saved_epoch,
    training_samples,
)
from zsadkit.training import CheckpointMismatchError, TrainResult, learning_rate

SIZE = 112


@pytest.fixture(scope="module")
def splits() -> tuple[list[Sample], list[Sample]]:
    cfg = RunConfig(profile="smoke")
    return load_split(cfg, "synth-aux"), load_split(cfg, "synth-target")


def test_stage1_from_the_feature_cache_equals_stage1_on_images(splits, tmp_path: Path) -> None:
    samples = training_samples(splits[0], 2, seed=0)  # 8 images, 2 batches of 4 per epoch
    config = replace(STAGE1, epochs=2, batch_size=4, lr=1e-3, seed=3)
    cached = build_aaclip("zsad-tiny", "", SIZE, backbone_seed=1, train_seed=1)
    on_images = build_aaclip("zsad-tiny", "", SIZE, backbone_seed=1, train_seed=1)
    log_cached = fit(cached, samples, config, replace(STAGE2, epochs=0), cache_root=tmp_path).log
    log_images = fit(on_images, samples, config, replace(STAGE2, epochs=0), use_cache=False).log
    assert [row["loss"] for row in log_cached] == pytest.approx([row["loss"] for row in log_images], rel=1e-5)
    for name, value in cached.text_parameters().items():
        torch.testing.assert_close(value, on_images.text_parameters()[name], atol=1e-6, rtol=0)
    assert len(list(tmp_path.glob("aaclip-stage1-e*/meta.json"))) == 2  # one cache per augmented epoch
    # a rerun, and a stage-1 loss switch (the text side only), read the same caches
    again = build_aaclip("zsad-tiny", "", SIZE, backbone_seed=1, train_seed=1, disentangle_weight=0.5)
    fit(again, samples, config, replace(STAGE2, epochs=0), cache_root=tmp_path)
    assert len(list(tmp_path.glob("aaclip-stage1-e*"))) == 2


def test_stage1_feature_draws_once_encodes_the_frozen_side_once_and_per_epoch_keeps_the_reference_numbers(
    splits, tmp_path: Path, monkeypatch
) -> None:
    samples = training_samples(splits[0], 2, seed=0)  # 8 images, 2 batches of 4 per epoch
    config = replace(STAGE1, epochs=3, batch_size=4, lr=1e-3, seed=3)
    logs, calls = {}, {}
    for draws in ("per_epoch", "once"):
        model = build_aaclip("zsad-tiny", "", SIZE, backbone_seed=1, train_seed=1)
        encoder, calls[draws] = model.stage1_features, []
        monkeypatch.setattr(model, "stage1_features", lambda images, encoder=encoder, seen=calls[draws]:
                            seen.append(len(images)) or encoder(images))
        logs[draws] = [row["loss"] for row in fit(model, samples, config, replace(STAGE2, epochs=0),
                                                  cache_root=tmp_path / draws, stage1_feature_draws=draws).log]
    assert calls == {"per_epoch": [4, 4] * 3, "once": [4, 4]}  # encoder calls: 2 batches per cache build
    assert len(list((tmp_path / "once").glob("aaclip-stage1-e*"))) == 1
    assert logs["once"][0] == logs["per_epoch"][0] and logs["once"][1:] != logs["per_epoch"][1:]
    # per_epoch is the behaviour before the option existed (measured then, same seeds and settings)
    assert logs["per_epoch"][:2] == pytest.approx([1.1582701802253723, 0.8475782871246338], rel=1e-5)
    with pytest.raises(ValueError, match="stage1_feature_draws"):
        fit(model, samples, config, replace(STAGE2, epochs=0), cache_root=tmp_path, stage1_feature_draws="twice")


def test_the_batch_mixing_cache_holds_the_features_of_the_training_batches(splits, tmp_path: Path) -> None:
    """With the reference's batch mixing an image's stage-1 features depend on its batch mates: the cache must be
    encoded from each epoch's training batches (its order, its batch size)."""
    samples = training_samples(splits[0], 2, seed=1)
    model = build_aaclip("zsad-tiny", "", SIZE, backbone_seed=2, train_seed=2)
    config = replace(STAGE1, epochs=1, batch_size=4, lr=1e-3, seed=7)
    fit(model, samples, config, replace(STAGE2, epochs=0), cache_root=tmp_path)
    cached = np.load(next(tmp_path.glob("aaclip-stage1-e001-*")) / "patch_features.npy")
    images = AugmentedDataset(samples, SIZE, STAGE1_AUGMENTATION, seed=7)
    images.set_epoch(1, epoch_order(len(samples), 7, 1))
    batches = [torch.stack([images[i]["image"] for i in range(start, start + 4)]) for start in (0, 4)]
    expected = torch.cat([model.stage1_features(batch)["patch_features"] for batch in batches]).numpy()
    np.testing.assert_allclose(cached, expected, atol=1e-5)
    shuffled = torch.cat([model.stage1_features(batches[0][[0, 1]])["patch_features"],
                          model.stage1_features(batches[0][[2, 3]])["patch_features"]]).numpy()
    assert np.abs(shuffled - expected[:4]).max() > 1e-3  # other batch mates, other features


def test_augmentation_moves_image_and_mask_together_and_depends_on_seed_epoch_and_index(tmp_path: Path) -> None:
    pixels = np.full((64, 64, 3), 40, dtype=np.uint8)
    pixels[8:24, 30:50] = 250
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[8:24, 30:50] = 255
    Image.fromarray(pixels).save(tmp_path / "image.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    sample = Sample(str(tmp_path / "image.png"), str(tmp_path / "mask.png"), 1, "thing", "spot", "toy", "test")
    augmentation = Augmentation(rotation_p=1.0, translate_p=1.0, hflip_p=1.0, vflip_p=0.0)
    dataset = AugmentedDataset([sample] * 3, 64, augmentation, seed=0)
    first, again, other_index = dataset[0], dataset[0], dataset[1]
    torch.testing.assert_close(first["image"], again["image"])
    assert not torch.equal(first["image"], other_index["image"])
    dataset.set_epoch(2)
    assert not torch.equal(dataset[0]["image"], first["image"])
    for item in (first, other_index):
        inside, outside = item["mask"] > 0.5, item["mask"] < 0.5
        assert inside.sum() > 100 and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        brightness = item["image"].mean(0)
        assert brightness[inside].min() > brightness[outside].max() - 1e-6  # the bright square moved with its mask
    plain = AugmentedDataset([sample], 64, NO_AUGMENTATION, seed=0)[0]
    torch.testing.assert_close(plain["mask"][8:24, 30:50], torch.ones(16, 20))


def test_colour_jitter_of_stage_two_changes_the_image_only(tmp_path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    sample = Sample(str(tmp_path / "a.png"), None, 0, "thing", "good", "toy", "test")
    geometric_off = {"rotation_p": 0.0, "translate_p": 0.0, "hflip_p": 0.0, "vflip_p": 0.0}
    jittered = AugmentedDataset([sample], 32, Augmentation(color_jitter=0.5, color_jitter_p=1.0, **geometric_off), 0)[0]
    plain = AugmentedDataset([sample], 32, Augmentation(**geometric_off), 0)[0]
    assert not torch.allclose(jittered["image"], plain["image"]) and torch.equal(jittered["mask"], plain["mask"])


def test_training_samples_draw_k_per_class_with_a_seed_and_write_the_list(splits, tmp_path: Path) -> None:
    chosen = training_samples(splits[0], 2, seed=5, write_to=tmp_path / "list.csv")
    assert len(chosen) == 8 and {s.class_name for s in chosen} == {s.class_name for s in splits[0]}
    assert [s.image for s in read_manifest(tmp_path / "list.csv")] == [s.image for s in chosen]
    assert [s.image for s in training_samples(splits[0], 2, seed=5)] == [s.image for s in chosen]
    assert [s.image for s in training_samples(splits[0], 2, seed=6)] != [s.image for s in chosen]
    anomalous = training_samples(splits[0], 3, seed=5, composition="anomalous")
    assert all(s.label == 1 for s in anomalous)
    assert training_samples(splits[0], "full") == list(splits[0])
    with pytest.raises(ValueError, match="has 20 training images, 64 shots asked"):
        training_samples(splits[0], 64)


def test_the_reference_epoch_is_flagged_as_chosen_on_test_results() -> None:
    assert choose_epoch("reference", 20) == choose_epoch("reference", 20)
    reference = choose_epoch("reference", 20)
    assert reference.epoch == REFERENCE_EPOCH == 15 and reference.selected_on_test
    assert choose_epoch("last", 20).epoch == 20 and not choose_epoch("last", 20).selected_on_test
    assert choose_epoch("reference", 3).epoch == 3 and not choose_epoch("reference", 3).selected_on_test
    assert choose_epoch(7, 20).epoch == 7
    with pytest.raises(ValueError, match="epoch policy"):
        choose_epoch(21, 20)


def test_the_epoch_saved_with_adapters_is_read_back_from_their_metadata(splits, tmp_path: Path) -> None:
    model = build_aaclip("zsad-tiny", "", SIZE, backbone_seed=3, train_seed=3)
    chosen = model.save_adapters(tmp_path / "chosen.safetensors",
                                 metadata={"epoch": "15", "epoch_selected_on_test": "True"})
    assert saved_epoch(chosen).epoch == 15 and saved_epoch(chosen).selected_on_test
    assert saved_epoch(model.save_adapters(tmp_path / "plain.safetensors")) is None
    run = fit(model, training_samples(splits[0], 1, seed=0), replace(STAGE1, epochs=0),
              replace(STAGE2, epochs=1, batch_size=2), checkpoint_dir=tmp_path / "run", use_cache=False)
    epoch_file = Path(run.stage2_dir) / "epoch_001.safetensors"
    assert (saved_epoch(epoch_file).epoch, saved_epoch(epoch_file).selected_on_test) == (1, False)
    bad = model.save_adapters(tmp_path / "bad.safetensors", metadata={"epoch": "15", "epoch_selected_on_test": "yes"})
    with pytest.raises(ValueError, match="epoch_selected_on_test"):
        saved_epoch(bad)


def test_stage_two_steps_the_multistep_schedule_per_iteration() -> None:
    assert STAGE2.schedule_unit == "iteration" and STAGE2.milestones == (16000, 32000)
    assert learning_rate(STAGE2, 0, 15999) == 5e-4
    assert learning_rate(STAGE2, 14, 16000) == 2.5e-4 and learning_rate(STAGE2, 19, 32000) == 1.25e-4


def test_stage_two_writes_a_checkpoint_per_epoch_and_resumes(splits, tmp_path: Path) -> None:
    samples = training_samples(splits[0], 1, seed=0)
    small = {"batch_size": 2, "lr": 1e-3}
    model = build_aaclip("zsad-tiny", "", SIZE, backbone_seed=3, train_seed=3)
    run = fit(model, samples, replace(STAGE1, epochs=1, batch_size=4), replace(STAGE2, epochs=2, **small),
              checkpoint_dir=tmp_path / "run", use_cache=False)
    assert sorted(p.name for p in (tmp_path / "run" / "stage2").glob("epoch_*.safetensors")) == [
        "epoch_001.safetensors", "epoch_002.safetensors"]
    assert [row["stage"] for row in run.log] == [1, 2, 2]
    resumed = build_aaclip("zsad-tiny", "", SIZE, backbone_seed=3, train_seed=3)
    again = fit(resumed, samples, replace(STAGE1, epochs=1, batch_size=4), replace(STAGE2, epochs=3, **small),
                checkpoint_dir=tmp_path / "run", use_cache=False)
    assert again.stage1.resumed_from == 1 and again.stage2.resumed_from == 2
    for name, value in model.text_parameters().items():
        assert torch.equal(resumed.text_parameters()[name], value)
    loaded = build_aaclip("zsad-tiny", "", SIZE, backbone_seed=3, train_seed=3,
                          checkpoint=str(tmp_path / "run" / "stage2" / "epoch_003.safetensors"))
    for name, value in resumed.image_parameters().items():
        assert torch.equal(loaded.image_parameters()[name], value)


@pytest.mark.parametrize("edited", ["zsadkit.recipes.aaclip", "zsadkit.methods.aaclip"])
def test_checkpoints_of_edited_training_code_are_not_resumed(splits, tmp_path: Path, monkeypatch, edited: str) -> None:
    samples = training_samples(splits[0], 1, seed=0)
    stages = (replace(STAGE1, epochs=1, batch_size=4), replace(STAGE2, epochs=0))
    model = build_aaclip("zsad-tiny", "", SIZE, backbone_seed=3, train_seed=3)
    fit(model, samples, *stages, checkpoint_dir=tmp_path, use_cache=False)
    real = inspect.getsource
    monkeypatch.setattr(inspect, "getsource",
                        lambda module: real(module) + ("# edited" if module.__name__ == edited else ""))
    with pytest.raises(CheckpointMismatchError, match="code"):
        fit(model, samples, replace(stages[0], epochs=2), stages[1], checkpoint_dir=tmp_path, use_cache=False)


def test_transductive_and_per_image_evaluation_share_pixel_rows_and_differ_in_image_scores(splits) -> None:
    model = build_aaclip("zsad-tiny", "", SIZE, backbone_seed=4, train_seed=4)
    target = [s for s in splits[1] if s.class_name in ("bolt", "mesh")]
    reference = evaluate(model, target, dataset="t", domain="industrial", batch_size=16)
    per_image = evaluate(model, target, dataset="t", domain="industrial", batch_size=16, fusion="per_image")
    assert set(zip(reference.level, reference.metric, strict=True)) >= {("image", "auroc"), ("pixel", "ap")}
    pixel = [frame.query("level == 'pixel'").set_index(["class_name", "metric"])["value"] for frame in
             (reference, per_image)]
    pd.testing.assert_series_equal(pixel[0], pixel[1])
    image = [frame.query("level == 'image' and metric == 'auroc'")["value"].to_numpy() for frame in
             (reference, per_image)]
    assert not np.allclose(image[0], image[1])
    medical = evaluate(model, target, dataset="t", domain="medical", batch_size=16)
    assert not np.allclose(medical.query("level == 'pixel' and metric == 'auroc'")["value"],
                           reference.query("level == 'pixel' and metric == 'auroc'")["value"])  # the 9/1.5 blur


def test_the_test_set_sweep_picks_the_best_epoch_and_flags_it(splits, tmp_path: Path) -> None:
    model = build_aaclip("zsad-tiny", "", SIZE, backbone_seed=5, train_seed=5)
    samples = training_samples(splits[0], 1, seed=0)
    run = fit(model, samples, replace(STAGE1, epochs=0), replace(STAGE2, epochs=3, batch_size=2),
              checkpoint_dir=tmp_path, use_cache=False)
    scores = {1: 0.6, 2: 0.9, 3: 0.7}
    epochs_seen = []

    def fake_evaluate(model, samples, *, dataset, domain, batch_size, device):
        epoch = len(epochs_seen) + 1
        epochs_seen.append(epoch)
        return pd.DataFrame([{"dataset": dataset, "class_name": "mean", "level": "image", "metric": "auroc",
                              "value": scores[epoch]}])

    choice, rows = best_epoch_on_test(model, run, {"t": (samples, "industrial")}, evaluate_fn=fake_evaluate)
    assert choice.epoch == 2 and choice.selected_on_test and list(rows["epoch"]) == [1, 2, 3]
    empty = TrainingRun(TrainResult(), TrainResult(), "", "")
    with pytest.raises(ValueError, match="no checkpoints"):
        best_epoch_on_test(model, replace(empty, stage2=run.stage2), {"t": (samples, "industrial")},
                           evaluate_fn=fake_evaluate)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_two_stages_improve_pixel_auroc_on_held_out_images_of_the_training_classes(splits, seed: int) -> None:
    """What this shows: trained on the even-numbered test images of the auxiliary classes, AA-CLIP scores the
    odd-numbered (held-out) images **of the same classes** better than the untrained model, for three seeds. What it
    does not show: zero-shot transfer to unseen classes (the issue's synth-aux → synth-target), which these random
    tiny-CLIP weights do not give reliably: with these settings, trained on all of synth-aux and scored on
    synth-target, seed 0 drops (0.646 → 0.586 after 2 stage-2 epochs, 0.573 after 4), seeds 1 and 2 rise
    (0.555 → 0.624, 0.453 → 0.637). Settings differ from the reference's to learn in two epochs: no augmentation,
    stage-2 lr 1e-3, and the blur scaled to the tiny model's patch grid (the reference's 7×7-patch kernel is a fifth
    of its 37×37 grid but would cover the whole 7×7 grid here; σ = 1 patch of 37 ≈ 0.2 patch of 7, i.e. no blur)."""
    auxiliary = splits[0]
    train = [s for class_name in sorted({s.class_name for s in auxiliary})
             for s in [s for s in auxiliary if s.class_name == class_name][0::2]]
    held_out = [s for s in auxiliary if s not in set(train)]
    assert len(train) == len(held_out) == 40 and not {s.image for s in train} & {s.image for s in held_out}

    def pixel_auroc(model) -> float:
        rows = evaluate(model, held_out, dataset="held-out", domain="industrial", batch_size=20)
        return float(rows.query("class_name == 'mean' and level == 'pixel' and metric == 'auroc'")["value"].iloc[0])

    model = build_aaclip("zsad-tiny", "", SIZE, backbone_seed=seed, train_seed=seed, industrial_blur=(1, 1.0))
    before = pixel_auroc(model)
    fit(model, train, replace(STAGE1, epochs=1, seed=seed), replace(STAGE2, epochs=2, lr=1e-3, seed=seed),
        stage1_augmentation=NO_AUGMENTATION, stage2_augmentation=NO_AUGMENTATION, use_cache=False)
    after = pixel_auroc(model)
    # measured (before → after): seed 0 0.691 → 0.745, seed 1 0.695 → 0.772, seed 2 0.316 → 0.692
    assert after > before + 0.03, (before, after)
