"""InCTRL's recipe: balanced episodes, the trainer with checkpoints and epoch selection, the feature cache, the
few-shot protocol (prompt sets, per-(K, seed) evaluation, mean ± std) and the protocol's dataset views."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from zsadkit.data.records import Sample
from zsadkit.engine import draw_reference_sets, evaluate_few_shot, read_reference_sets, write_reference_sets
from zsadkit.methods.inctrl import build_inctrl
from zsadkit.models import load_clip
from zsadkit.recipes import inctrl as recipe
from zsadkit.recipes.inctrl import EpisodeDataset, InCTRLTrainingConfig
from zsadkit.training import CheckpointMismatchError

SIZE = 64
PALETTES = {"warm": ((200, 40, 40), (240, 160, 40), (240, 240, 60), (120, 40, 20)),
            "cool": ((40, 40, 200), (40, 200, 200), (40, 160, 60), (140, 60, 200)),
            "gray": ((30, 30, 30), (100, 100, 100), (170, 170, 170), (240, 240, 240))}


def tiles_image(rng: np.random.Generator, palette: str, anomalous: bool) -> Image.Image:
    """4 × 4 tiles of random palette colours; an anomaly has 12 tiles of one colour (a composition anomaly: each
    tile looks normal, the image does not)."""
    colours = rng.integers(0, 4, 16)
    if anomalous:
        colours[rng.permutation(16)[:12]] = rng.integers(0, 4)
    pixels = np.zeros((SIZE, SIZE, 3))
    for index, colour in enumerate(colours):
        row, column = divmod(index, 4)
        pixels[16 * row:16 * (row + 1), 16 * column:16 * (column + 1)] = PALETTES[palette][colour]
    pixels += rng.normal(0, 12, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_tiles(root: Path, split: str, normal: int, anomalous: int, seed: int) -> list[Sample]:
    samples = []
    for class_index, palette in enumerate(PALETTES):
        rng = np.random.default_rng([seed, class_index])
        for index in range(normal + anomalous):
            label = int(index >= normal)
            path = root / palette / split / f"{'bad' if label else 'good'}_{index:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            tiles_image(rng, palette, bool(label)).save(path)
            samples.append(Sample(str(path), None, label, palette, "composition" if label else "good", "tiles", split))
    return samples


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> dict[str, list[Sample]]:
    root = tmp_path_factory.mktemp("tiles")
    train, test = write_tiles(root, "train", 40, 0, seed=0), write_tiles(root, "test", 40, 40, seed=1)
    return {"train": train, "fit": train + test[0::2], "held_out": test[1::2]}


@pytest.fixture(scope="module")
def clip():
    return load_clip("zsad-tiny", image_size=SIZE)


def auroc(frame: pd.DataFrame) -> float:
    return float(frame.query("class_name == 'mean' and metric == 'auroc'").value.iloc[0])


def test_training_improves_held_out_auroc_over_the_untrained_heads_for_three_seeds(tiles, clip, tmp_path):
    """Composition anomalies (every tile looks normal, the image does not) are what the image-level residual and
    the holistic head learn: trained heads beat the untrained ones on held-out images, for three seeds."""
    sets = draw_reference_sets(tiles["train"], PALETTES, [2], [0])
    gains = []
    for seed in (0, 1, 2):
        model = build_inctrl(image_size=SIZE, clip=clip, train_seed=seed)
        before = recipe.evaluate({2: model}, tiles["held_out"], sets, dataset="tiles", resize="squash")[(2, 0)]
        config = InCTRLTrainingConfig(shots=2, epochs=2, steps_per_epoch=40, seed=seed, select_epoch=None)
        recipe.fit(model, tiles["fit"], config, cache_root=tmp_path, resize="squash")
        after = recipe.evaluate({2: model}, tiles["held_out"], sets, dataset="tiles", resize="squash")[(2, 0)]
        gains.append(auroc(after) - auroc(before))
    assert min(gains) > 0.03 and np.mean(gains) > 0.08, gains


def episode_dataset(tiles, **overrides) -> EpisodeDataset:
    config = InCTRLTrainingConfig(**{"shots": 3, "steps_per_epoch": 5, "normal_per_batch": 4,
                                     "anomalous_per_batch": 4, **overrides})
    return EpisodeDataset(tiles["fit"], config, lambda index: {"value": torch.tensor([float(index)])})


def test_episodes_are_balanced_with_distinct_normal_prompts_of_the_query_class(tiles):
    dataset = episode_dataset(tiles)
    samples = tiles["fit"]
    assert len(dataset) == 40
    for index in range(len(dataset)):
        episode = dataset[index]
        query = samples[episode["index"]]
        assert query.label == int(index % 8 >= 4)  # 4 normal, then 4 anomalous queries per batch
        prompts = dataset.prompt_indices(index)
        assert len(set(prompts)) == 3
        assert all(samples[p].label == 0 and samples[p].class_name == query.class_name for p in prompts)
        assert episode["prompt_value"].flatten().tolist() == [float(p) for p in prompts]
    normals = [q for i, q in enumerate(dataset.queries) if i % 8 < 4]
    assert len(set(normals)) == len(normals)  # a permutation stream: no repeat before every normal is drawn
    again = episode_dataset(tiles)
    assert again.queries == dataset.queries and again.prompt_indices(7) == dataset.prompt_indices(7)
    dataset.set_epoch(2)
    assert dataset.queries != again.queries
    assert set(dataset.queries[:4]).isdisjoint(normals)  # epoch 2 continues the same stream


def test_the_query_is_among_its_prompts_only_when_asked(tiles):
    few = [s for s in tiles["train"] if s.image.endswith(("000.png", "001.png", "002.png"))] + [
        s for s in tiles["fit"] if s.label == 1]
    config = InCTRLTrainingConfig(shots=3, steps_per_epoch=20, normal_per_batch=4, anomalous_per_batch=0)
    with_query = EpisodeDataset(few, config, lambda i: {"value": torch.zeros(1)})
    assert all(with_query.queries[i] in with_query.prompt_indices(i) for i in range(len(with_query)))
    with pytest.raises(ValueError, match="3 prompts per episode need 4"):
        EpisodeDataset(few, InCTRLTrainingConfig(shots=3, query_in_prompts=False), lambda i: {})
    excluded = EpisodeDataset(tiles["fit"], InCTRLTrainingConfig(shots=3, steps_per_epoch=20, query_in_prompts=False),
                              lambda i: {"value": torch.zeros(1)})
    assert all(excluded.queries[i] not in excluded.prompt_indices(i) for i in range(len(excluded)))


def test_cached_and_uncached_training_agree_and_checkpoints_keep_the_selected_epoch(tiles, clip, tmp_path):
    config = InCTRLTrainingConfig(shots=2, epochs=2, steps_per_epoch=3, normal_per_batch=2, anomalous_per_batch=2,
                                  select_epoch=1, checkpoint_dir=str(tmp_path / "checkpoints"))
    cached = build_inctrl(image_size=SIZE, clip=clip, train_seed=0)
    result = recipe.fit(cached, tiles["fit"], config, cache_root=tmp_path / "cache", resize="squash")
    uncached = build_inctrl(image_size=SIZE, clip=clip, train_seed=0)
    reference = recipe.fit(uncached, tiles["fit"], InCTRLTrainingConfig(**{**config.__dict__, "checkpoint_dir": ""}),
                           use_cache=False, resize="squash")
    assert [row["loss"] for row in result.log] == pytest.approx([row["loss"] for row in reference.log], abs=1e-5)
    assert result.selected_epoch == 1 and result.selected_checkpoint.endswith("epoch_001.safetensors")
    assert len(result.checkpoints) == 2
    for name, value in cached.head_state().items():  # the epoch-1 heads, with their BatchNorm statistics
        torch.testing.assert_close(value, uncached.head_state()[name], atol=1e-5, rtol=0)
    assert float(cached.holistic_head.norm1.num_batches_tracked) == 3
    resumed = build_inctrl(image_size=SIZE, clip=clip, train_seed=0)
    again = recipe.fit(resumed, tiles["fit"], config, cache_root=tmp_path / "cache", resize="squash")
    assert again.resumed_from == 2 and again.checkpoints == []
    for name, value in cached.head_state().items():
        assert torch.equal(resumed.head_state()[name], value), name
    with pytest.raises(ValueError, match="select_epoch"):
        InCTRLTrainingConfig(epochs=2, select_epoch=6)


def test_checkpoints_of_edited_training_code_are_not_resumed(tiles, clip, tmp_path, monkeypatch):
    config = InCTRLTrainingConfig(shots=2, epochs=1, steps_per_epoch=2, normal_per_batch=2, anomalous_per_batch=2,
                                  select_epoch=None, checkpoint_dir=str(tmp_path / "checkpoints"))
    recipe.fit(build_inctrl(image_size=SIZE, clip=clip, train_seed=0), tiles["fit"], config, use_cache=False,
               resize="squash")
    real = inspect.getsource
    monkeypatch.setattr(inspect, "getsource",
                        lambda module: real(module) + ("# edited" if module.__name__ == "zsadkit.recipes.inctrl" else ""))
    with pytest.raises(CheckpointMismatchError, match="code"):
        recipe.fit(build_inctrl(image_size=SIZE, clip=clip, train_seed=0), tiles["fit"],
                   InCTRLTrainingConfig(**{**config.__dict__, "epochs": 2}), use_cache=False, resize="squash")


def test_evaluation_per_k_and_seed_equals_the_engine_on_the_same_prompt_sets(tiles, clip, tmp_path):
    models = {k: build_inctrl(image_size=SIZE, clip=clip, train_seed=k) for k in (1, 2)}
    test = [s for s in tiles["held_out"] if s.class_name != "gray"]
    sets = draw_reference_sets(tiles["train"], {s.class_name for s in test}, [1, 2], [0, 1])
    path = write_reference_sets(sets, tmp_path / "prompts.json", dataset="tiles")
    assert read_reference_sets(path, tiles["train"]) == sets
    rows = recipe.evaluate(models, test, sets, dataset="tiles", batch_size=7, resize="squash")
    assert sorted(rows) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    engine = evaluate_few_shot(models[2], test, tiles["train"], 2, dataset="tiles", image_size=SIZE,
                               references=sets[(2, 1)], pro=None)
    ours = rows[(2, 1)].set_index(["class_name", "metric"]).value
    theirs = engine[engine.level == "image"].set_index(["class_name", "metric"]).value
    pd.testing.assert_series_equal(ours.sort_index(), theirs.sort_index(), atol=1e-6)
    assert auroc(rows[(2, 0)]) != auroc(rows[(2, 1)])  # another prompt draw, another score
    data = json.loads(path.read_text())
    assert data["sets"][0]["shots"] == 1 and len(data["sets"][0]["images"]) == 1
    with pytest.raises(ValueError, match="not among the training samples"):
        read_reference_sets(path, tiles["train"][:5])


def test_mean_and_std_over_seeds_per_class_and_dataset():
    frame = pd.DataFrame([dict(method="inctrl", dataset="d", class_name=c, level="image", metric="auroc", shots=2,
                               reference_seed=seed, value=v)
                          for seed, values in enumerate([(0.8, 0.6), (0.9, 0.7), (1.0, 0.8)])
                          for c, v in zip(("a", "mean"), values, strict=True)])
    summary = recipe.mean_std_over_seeds(frame).set_index("class_name")
    assert summary.loc["a", "value"] == pytest.approx(0.9) and summary.loc["mean", "value"] == pytest.approx(0.7)
    assert summary.loc["a", "std"] == pytest.approx(np.std([0.8, 0.9, 1.0])) and summary.loc["a", "n_seeds"] == 3


def one_vs_all(split: str) -> list[Sample]:
    """A miniature one-vs-all set as the data layer writes it: each class's test set holds every test image."""
    images = {str(digit): [f"/d/{split}/{digit}/{i}.png" for i in range(2)] for digit in range(10)}
    if split == "train":
        return [Sample(p, None, 0, c, "good", "mnist", "train") for c, paths in images.items() for p in paths]
    return [Sample(p, None, int(other != c), c, "good" if other == c else other, "mnist", "test")
            for c in images for other, paths in images.items() for p in paths]


def test_multi_class_views_and_object_names_follow_the_protocol():
    view = recipe.protocol_samples(lambda dataset, split: one_vs_all(split), "mnist-multiclass", "test")
    assert len(view) == 20 and {s.class_name for s in view} == {"mnist"} and {s.dataset for s in view} == {
        "mnist-multiclass"}
    assert sorted((s.image.split("/")[3], s.label) for s in view)[::2] == [(str(d), d % 2) for d in range(10)]
    train = recipe.protocol_samples(lambda dataset, split: one_vs_all(split), "mnist-multiclass", "train")
    assert {s.image.split("/")[3] for s in train} == {"0", "2", "4", "6", "8"} and all(s.label == 0 for s in train)
    headct = [Sample("/h/1.png", None, 0, "brain", "good", "headct", "test")]
    assert recipe.protocol_samples(lambda d, s: headct, "headct", "test")[0].class_name == "headct"
    assert recipe.protocol_samples(lambda d, s: headct, "brainmri", "test")[0].class_name == "brainmri"
    with pytest.raises(ValueError, match="normal classes"):
        recipe.multi_class_view(one_vs_all("test"), ["cat"], "animal", "x")
    loads = []
    auxiliary = recipe.auxiliary_samples(lambda dataset, split: loads.append((dataset, split)) or [], "mvtec")
    assert auxiliary == [] and loads == [("mvtec", "train"), ("mvtec", "test")]


def test_the_inctrl_protocol_is_data_tables_per_metric_names_and_published_shots():
    from zsadkit.protocols import domain, paper_tables, protocol, published_method_name
    from zsadkit.results import published_rows

    inctrl = protocol("inctrl")
    assert inctrl.runs[0] == ("visa", ("mvtec",)) and len(inctrl.runs[1][1]) == 10
    assert inctrl.train_splits == ("train", "test") and inctrl.resize == "shorter_side_crop"
    assert published_method_name("winclip+", "inctrl") == "WinCLIP" and published_method_name("winclip+") == "WinCLIP+"
    assert domain("cifar10-multiclass") == "semantic" and domain("elpv") == "industrial"
    frame = pd.DataFrame([dict(method="inctrl", dataset=d, class_name="mean", level="image", metric=m, value=0.5)
                          for d in ("mvtec", "headct", "mnist") for m in ("auroc", "ap", "f1_max")])
    tables = paper_tables(frame, "inctrl")
    assert set(tables["table1"].metric) == {"auroc"} and set(tables["table2"].metric) == {"ap"}
    assert set(tables["table1"].dataset) == {"mvtec", "headct", "mnist"}
    grid = published_rows("inctrl_main_grid_todo")
    visa = grid.query("method == 'InCTRL' and dataset == 'VisA' and metric == 'auroc'")
    assert dict(zip(visa.shots, visa.published, strict=True)) == {2.0: 85.8, 4.0: 87.7, 8.0: 88.7}


def test_reference_sets_record_the_official_prompt_files_that_replaced_a_draw(tiles, tmp_path):
    classes = sorted({s.class_name for s in tiles["train"]})
    sets = draw_reference_sets(tiles["train"], set(classes), [2], [0, 1])
    sets[(2, 0)] = {name: torch.zeros(2, 3, SIZE, SIZE) for name in classes}  # the official files replace seed 0
    with pytest.raises(ValueError, match="name its file in official_files"):
        write_reference_sets(sets, tmp_path / "prompts.json")
    files = {(2, 0): {name: f"official/{name}.pt" for name in classes}}
    path = write_reference_sets(sets, tmp_path / "prompts.json", dataset="tiles", official_files=files)
    rows = {(row["seed"], row["class_name"]): row for row in json.loads(path.read_text())["sets"]}
    for name in classes:
        assert rows[(0, name)] == {"shots": 2, "seed": 0, "class_name": name, "official_file": f"official/{name}.pt"}
        assert rows[(1, name)]["images"] == [sample.image for sample in sets[(2, 1)][name]]
    with pytest.raises(ValueError, match="official prompt file"):
        read_reference_sets(path, tiles["train"])
