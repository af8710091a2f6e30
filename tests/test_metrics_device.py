"""The Evaluator's device path (maps kept as tensors, pixel metrics sorted where they are) equals the CPU path.

The suite runs it on CPU tensors; on a GPU the same code sorts on the GPU.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from zsadkit.metrics import Evaluator
from zsadkit.metrics.device import DeviceRanked, device_auroc, device_average_precision, device_max_f1
from zsadkit.metrics.ranking import auroc, average_precision, max_f1
from zsadkit.metrics.scores import RankedScores


def _batches(seed: int, dtype: torch.dtype = torch.float32) -> list[tuple[list[str], torch.Tensor, torch.Tensor,
                                                                          torch.Tensor, torch.Tensor]]:
    """Two classes, three batches, ties in the maps (rounded values) and one class without anomalous images."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for class_name, anomalous in (("a", True), ("a", True), ("b", False)):
        masks = torch.zeros(4, 32, 32)
        labels = torch.tensor([0, 1, 0, 1]) if anomalous else torch.zeros(4, dtype=torch.long)
        if anomalous:
            masks[1, 4:12, 4:12] = 1
            masks[3, 20:30, 2:9] = 1
            masks[3, 2:5, 25:30] = 1
        maps = (torch.rand(4, 32, 32, generator=generator) + masks * 0.3).mul(64).round().div(64).to(dtype)
        scores = torch.rand(4, generator=generator) + labels * 0.2
        out.append(([class_name] * 4, labels, scores, masks, maps))
    return out


def _rows(device: str | None, seed: int = 0, **options: object) -> pd.DataFrame:
    evaluator = Evaluator(dataset="toy", device=device, **options)
    for names, labels, scores, masks, maps in _batches(seed):
        evaluator.update(names, labels, scores, masks=masks, maps=maps)
    return evaluator.compute()


@pytest.mark.parametrize("pro", [None, "both"])
def test_device_evaluator_rows_equal_cpu_evaluator_rows(pro: str | None) -> None:
    cpu, device = _rows(None, pro=pro), _rows("cpu", pro=pro)
    pd.testing.assert_frame_equal(device, cpu)
    assert {"auroc", "ap", "f1_max"} <= set(device.query("level == 'pixel'").metric)
    assert device.query("class_name == 'b' and level == 'pixel'").value.isna().all()  # no anomalous pixels


def test_device_evaluator_with_aupimo_and_class_hook_matches_cpu() -> None:
    seen: dict[str | None, list] = {None: [], "cpu": []}
    results = {device: _rows(device, pro="cflow200", aupimo=True, class_hook=seen[device].append)
               for device in (None, "cpu")}
    pd.testing.assert_frame_equal(results["cpu"], results[None])
    for cpu_sample, device_sample in zip(seen[None], seen["cpu"], strict=True):
        np.testing.assert_array_equal(device_sample.maps, cpu_sample.maps)
        np.testing.assert_array_equal(device_sample.masks, cpu_sample.masks)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_device_ranking_metrics_equal_numpy_ranking_metrics(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.rand(5000, generator=generator) < 0.1
    scores = (torch.rand(5000, generator=generator) + labels * 0.1).mul(100).round()  # many ties
    ranked = DeviceRanked.from_labels(labels, scores)
    reference = RankedScores.from_labels(labels.numpy(), scores.numpy(), unit="pixels")
    assert device_auroc(ranked) == auroc(reference)
    assert device_average_precision(ranked) == average_precision(reference)
    assert device_max_f1(ranked) == max_f1(reference)


def test_device_evaluator_rejects_non_finite_maps_naming_the_sample() -> None:
    evaluator = Evaluator(dataset="toy", pro=None, device="cpu")
    maps = torch.zeros(2, 8, 8)
    maps[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="img1"):
        evaluator.update(["a", "a"], [0, 1], [0.1, 0.2], masks=torch.zeros(2, 8, 8), maps=maps,
                         sample_ids=["img0", "img1"])


def test_device_evaluator_rejects_maps_of_another_size_in_one_class() -> None:
    evaluator = Evaluator(dataset="toy", pro=None, device="cpu")
    evaluator.update(["a"], [0], [0.1], masks=torch.zeros(1, 8, 8), maps=torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="one size"):
        evaluator.update(["a"], [1], [0.2], masks=torch.zeros(1, 4, 4), maps=torch.zeros(1, 4, 4))
