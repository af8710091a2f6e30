"""The Evaluator: batched accumulation equals one-shot metrics, undefined cases, means, mAD and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from zsadkit.metrics import (
    Evaluator,
    aupro,
    aupro_cflow200,
    f1_max,
    image_ap,
    image_auroc,
    mad,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
)


def synthetic_dataset(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Three classes of 7, 5 and 6 images (16x16); class 'c' has only anomalous images (a pixel-only set)."""
    rng = np.random.default_rng(seed)
    classes = {}
    for name, n_images, n_normal in [("a", 7, 3), ("b", 5, 2), ("c", 6, 0)]:
        labels = np.array([0] * n_normal + [1] * (n_images - n_normal))
        masks = np.zeros((n_images, 16, 16), dtype=bool)
        for index in np.flatnonzero(labels):
            top, left = rng.integers(0, 10, size=2)
            masks[index, top : top + rng.integers(2, 6), left : left + rng.integers(2, 6)] = True
        maps = (rng.normal(size=masks.shape) + 1.5 * masks).astype(np.float32)
        scores = maps.reshape(n_images, -1).max(axis=1) + rng.normal(scale=0.3, size=n_images)
        classes[name] = {"labels": labels, "scores": scores, "masks": masks, "maps": maps}
    return classes


def feed(
    evaluator: Evaluator, classes: dict, batch_size: int, order: list[tuple[str, int]] | None = None
) -> None:
    """Feed (class, index) samples in `order` (default: class after class) in batches of `batch_size`."""
    order = order or [(name, index) for name, data in classes.items() for index in range(len(data["labels"]))]
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        evaluator.update(
            [name for name, _ in batch],
            np.array([classes[name]["labels"][index] for name, index in batch]),
            np.array([classes[name]["scores"][index] for name, index in batch]),
            masks=np.stack([classes[name]["masks"][index] for name, index in batch]),
            maps=np.stack([classes[name]["maps"][index] for name, index in batch]),
        )


def value(rows: pd.DataFrame, class_name: str, level: str, metric: str) -> float:
    selected = rows[(rows.class_name == class_name) & (rows.level == level) & (rows.metric == metric)]
    assert len(selected) == 1, f"expected one row for {class_name}/{level}/{metric}, got {len(selected)}"
    return float(selected.value.iloc[0])


@pytest.mark.parametrize(
    ("storage", "streaming", "batch_size"), [("disk", False, 4), ("memory", False, 1), ("disk", True, 5)]
)
def test_batched_rows_equal_the_metric_functions_on_whole_classes(
    storage: str, streaming: bool, batch_size: int
) -> None:
    classes = synthetic_dataset()
    evaluator = Evaluator(dataset="synthetic", pro="both", storage=storage, streaming=streaming)
    feed(evaluator, classes, batch_size)
    rows = evaluator.compute()
    for name in ["a", "b"]:
        data = classes[name]
        assert value(rows, name, "image", "auroc") == image_auroc(data["labels"], data["scores"])
        assert value(rows, name, "image", "ap") == image_ap(data["labels"], data["scores"])
        assert value(rows, name, "image", "f1_max") == f1_max(data["labels"], data["scores"])
    for name, data in classes.items():
        masks, maps = data["masks"], data["maps"]
        assert value(rows, name, "pixel", "auroc") == pixel_auroc(masks, maps)
        assert value(rows, name, "pixel", "ap") == pixel_ap(masks, maps)
        assert value(rows, name, "pixel", "f1_max") == pixel_f1_max(masks, maps)
        assert value(rows, name, "pixel", "aupro") == aupro(masks, maps)
        assert value(rows, name, "pixel", "aupro_cflow200") == aupro_cflow200(masks, maps)


def test_interleaved_classes_give_the_same_rows_as_grouped_classes() -> None:
    classes = synthetic_dataset(1)
    grouped = Evaluator(dataset="synthetic")
    feed(grouped, classes, batch_size=3)
    order = [(name, index) for index in range(7) for name in classes if index < len(classes[name]["labels"])]
    interleaved = Evaluator(dataset="synthetic")
    feed(interleaved, classes, batch_size=4, order=order)
    pd.testing.assert_frame_equal(grouped.compute(), interleaved.compute())


def test_class_without_normal_images_gets_nan_image_metrics_with_a_reason_and_means_skip_it() -> None:
    classes = synthetic_dataset()
    evaluator = Evaluator(dataset="synthetic", pro="cflow200")
    feed(evaluator, classes, batch_size=4)
    rows = evaluator.compute()
    image_c = rows[(rows.class_name == "c") & (rows.level == "image")]
    assert image_c.value.isna().all()
    assert (image_c.note == "no normal images (only 6 anomalous)").all()
    assert np.isfinite(value(rows, "c", "pixel", "auroc"))

    mean_image_auroc = rows[
        (rows.class_name == "mean") & (rows.level == "image") & (rows.metric == "auroc")
    ].iloc[0]
    assert mean_image_auroc.value == pytest.approx(
        np.mean([value(rows, "a", "image", "auroc"), value(rows, "b", "image", "auroc")])
    )
    assert mean_image_auroc.n_classes == 2
    assert "mean over 2 of 3 classes; undefined for c" in mean_image_auroc.note
    mean_pixel_aupro = rows[(rows.class_name == "mean") & (rows.metric == "aupro_cflow200")].iloc[0]
    assert mean_pixel_aupro.n_classes == 3 and mean_pixel_aupro.note == ""
    assert set(rows.metric[rows.level == "pixel"]) == {"auroc", "ap", "f1_max", "aupro_cflow200"}


def test_image_level_only_data_gives_only_image_rows() -> None:
    evaluator = Evaluator(dataset="headct", pro=None)
    evaluator.update(["brain"] * 4, torch.tensor([0, 0, 1, 1]), torch.tensor([0.1, 0.4, 0.35, 0.8]))
    rows = evaluator.compute()
    assert set(rows.level) == {"image"}
    assert value(rows, "brain", "image", "auroc") == 0.75
    assert value(rows, "mean", "image", "auroc") == 0.75


def test_torch_batches_with_a_channel_axis_are_accepted() -> None:
    classes = synthetic_dataset()
    data = classes["a"]
    evaluator = Evaluator(dataset="synthetic", pro="exact")
    evaluator.update(
        ["a"] * 7,
        torch.from_numpy(data["labels"]),
        torch.from_numpy(data["scores"]),
        masks=torch.from_numpy(data["masks"][:, None]).float(),
        maps=torch.from_numpy(data["maps"][:, None]),
    )
    rows = evaluator.compute()
    assert value(rows, "a", "pixel", "aupro") == aupro(data["masks"], data["maps"])


def test_finish_class_frees_its_temporary_files(tmp_path: Path) -> None:
    classes = synthetic_dataset()
    evaluator = Evaluator(dataset="synthetic", storage="disk", workdir=tmp_path)
    feed(evaluator, {"a": classes["a"]}, batch_size=3)
    assert len(list(tmp_path.rglob("*.bin"))) == 2  # maps and masks of class 'a'
    rows = evaluator.finish_class("a")
    assert list(tmp_path.rglob("*.bin")) == []
    assert value(rows, "a", "pixel", "auroc") == pixel_auroc(classes["a"]["masks"], classes["a"]["maps"])
    evaluator.close()


def test_streaming_rejects_a_class_that_comes_back() -> None:
    classes = synthetic_dataset()
    evaluator = Evaluator(dataset="synthetic", streaming=True)
    order = [("a", 0), ("a", 1), ("b", 0), ("a", 2)]
    with pytest.raises(ValueError, match="class 'a' was already computed"):
        feed(evaluator, classes, batch_size=1, order=order)


def test_non_finite_map_is_an_error_naming_the_sample() -> None:
    evaluator = Evaluator(dataset="synthetic")
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    maps[1, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"sample 1 \('bottle/003.png'\) has 1 non-finite"):
        evaluator.update(
            ["bottle"] * 2,
            [0, 1],
            [0.1, 0.2],
            masks=np.zeros((2, 4, 4)),
            maps=maps,
            sample_ids=["bottle/002.png", "bottle/003.png"],
        )


def test_map_size_change_within_a_class_is_an_error() -> None:
    evaluator = Evaluator(dataset="synthetic")
    evaluator.update(["a"], [0], [0.1], masks=np.zeros((1, 4, 4)), maps=np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match=r"maps of class 'a' are \(5, 5\), earlier ones \(4, 4\)"):
        evaluator.update(["a"], [1], [0.2], masks=np.zeros((1, 5, 5)), maps=np.zeros((1, 5, 5)))
    with pytest.raises(ValueError, match="with and without masks/maps"):
        evaluator.update(["a"], [1], [0.2])


def test_mad_averages_the_listed_metrics_and_records_them() -> None:
    classes = synthetic_dataset()
    evaluator = Evaluator(dataset="synthetic", pro="cflow200")
    feed(evaluator, classes, batch_size=4)
    rows = evaluator.compute()
    pixel_mad = mad(rows, [("pixel", "auroc"), ("pixel", "aupro_cflow200")])
    mean_row = pixel_mad[pixel_mad.class_name == "mean"].iloc[0]
    expected = (value(rows, "mean", "pixel", "auroc") + value(rows, "mean", "pixel", "aupro_cflow200")) / 2
    assert mean_row.value == pytest.approx(expected)
    assert mean_row.metrics == "pixel/auroc+pixel/aupro_cflow200"
    assert mean_row.level == "pixel" and mean_row.metric == "mad"

    image_mad = mad(rows, [("image", "auroc"), ("image", "ap")])
    c_row = image_mad[image_mad.class_name == "c"].iloc[0]
    assert np.isnan(c_row.value) and c_row.note == "undefined: image/auroc, image/ap"
    with pytest.raises(ValueError, match=r"no rows for \[\('pixel', 'aupro'\)\]"):
        mad(rows, [("pixel", "aupro")])
