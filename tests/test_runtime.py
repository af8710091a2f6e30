"""Run-time switches (`zsadkit.models.runtime`): the SDPA and explicit attention paths agree, bf16 autocast keeps
the metrics, `engine.predict` takes the switches and hands back ordinary tensors."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from zsadkit import engine
from zsadkit.data.dataset import batches
from zsadkit.experiment import RunConfig, load_split
from zsadkit.methods import build_method
from zsadkit.metrics.ranking import image_auroc, pixel_auroc
from zsadkit.models.runtime import (
    attention_kernel,
    cpu_has_bf16,
    current_precision,
    explicit_attention,
    inference,
    run_settings,
)

METHODS = ["clip", "clip-ac", "winclip", "vand", "coop", "anomalyclip", "headclip", "inctrl", "aaclip"]


def _detector(name: str, image_size: int, references: torch.Tensor):
    detector = build_method(name, backbone="zsad-tiny", image_size=image_size, backbone_seed=0, train_seed=0)
    if getattr(detector, "requires_references", False):
        detector.fit_references(references)
    return detector


@pytest.mark.parametrize("name", METHODS)
def test_sdpa_predictions_equal_explicit_attention_predictions(name: str) -> None:
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    detector = _detector(name, 64, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    classes = ["bottle", "metal_nut", "bottle"]
    with inference("fp32"):
        fast = detector.predict(images, classes)
    with explicit_attention(), inference("fp32"):
        assert attention_kernel() == "explicit"
        explicit = detector.predict(images, classes)
    torch.testing.assert_close(fast.anomaly_maps, explicit.anomaly_maps, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.image_scores, explicit.image_scores, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16 arithmetic")
@pytest.mark.parametrize("name", METHODS)
def test_bf16_autocast_keeps_auroc_on_the_synthetic_set(name: str) -> None:
    samples = load_split(RunConfig(), "synth-target")
    batch = next(iter(batches(samples, 64, len(samples))))
    detector = _detector(name, 64, batch["image"][:2])
    with inference("fp32"):
        full = detector.predict(batch["image"], list(batch["class_name"]))
    with inference("bf16"):
        half = detector.predict(batch["image"], list(batch["class_name"]))
    assert half.anomaly_maps.dtype == torch.float32  # the tower's autocast stays inside the tower
    masks = batch["mask"] > 0.5
    assert abs(pixel_auroc(masks, half.anomaly_maps) - pixel_auroc(masks, full.anomaly_maps)) <= 0.002
    # Random weights score images at chance with nearly tied scores, so a rank can flip: 0.5 points measured
    # at most 0.37 over these methods (docs/performance.md).
    assert abs(image_auroc(batch["label"], half.image_scores) - image_auroc(batch["label"], full.image_scores)) <= 0.005


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_changes_the_tower_and_stays_close(precision: str) -> None:
    """A quick default-suite check that `engine.predict(precision=...)` reaches the tower (the maps change: no
    silent fp32 fall-back) and keeps the maps close; the AUROC tolerances are the slow test's."""
    samples = load_split(RunConfig(), "synth-target")[:4]
    detector = build_method("anomalyclip", backbone="zsad-tiny", image_size=64, backbone_seed=0, train_seed=0)
    full = torch.cat([p.anomaly_maps for _, p in engine.predict(detector, samples, image_size=64, batch_size=4)])
    reduced = torch.cat([p.anomaly_maps for _, p in engine.predict(detector, samples, image_size=64, batch_size=4,
                                                                   precision=precision)])
    assert reduced.dtype == torch.float32 and not torch.equal(reduced, full)
    assert (reduced - full).abs().max() < 0.05


def test_run_settings_restore_and_reject_unknown_values() -> None:
    with run_settings(precision="bf16", attention="explicit"):
        assert (current_precision(), attention_kernel()) == ("bf16", "explicit")
    assert (current_precision(), attention_kernel()) == ("fp32", "sdpa")
    with pytest.raises(ValueError, match="precision must be one of"):
        inference("fp8").__enter__()
    with pytest.raises(ValueError, match="attention must be one of"):
        run_settings(attention="flash").__enter__()


def test_engine_predict_gives_ordinary_tensors_and_leaves_text_cache_trainable() -> None:
    samples = load_split(RunConfig(), "synth-target")[:4]
    detector = build_method("vand", backbone="zsad-tiny", image_size=64, backbone_seed=0, train_seed=0)
    pairs = list(engine.predict(detector, samples, image_size=64, batch_size=2))
    assert not torch.is_inference_mode_enabled()  # the mode does not leak past the yield
    prediction = pairs[0][1]
    assert not prediction.anomaly_maps.is_inference()
    prediction.anomaly_maps.add_(1.0)  # callers may modify in place
    text = detector.batch_text_features([samples[0].class_name])
    assert not text.is_inference()
    weight = torch.ones(text.shape[-1], requires_grad=True)
    (text * weight).sum().backward()  # a text cache filled inside inference mode still trains
    assert weight.grad is not None


def test_engine_predict_batch_size_changes_nothing_and_bad_settings_are_named() -> None:
    samples = load_split(RunConfig(), "synth-target")[:4]
    detector = build_method("clip", backbone="zsad-tiny", image_size=64, backbone_seed=0)
    fp32 = [p for _, p in engine.predict(detector, samples, image_size=64, batch_size=4)][0]
    one = torch.cat([p.anomaly_maps for _, p in engine.predict(detector, samples, image_size=64, batch_size=1)])
    torch.testing.assert_close(one, fp32.anomaly_maps, rtol=0, atol=1e-5)  # batch size changes nothing
    with pytest.raises(ValueError, match="precision must be one of"):
        next(engine.predict(detector, samples, image_size=64, precision="half"))
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        next(engine.predict(detector, samples, image_size=64, batch_size=0))


def test_evaluate_with_metrics_on_device_gives_the_cpu_rows() -> None:
    samples = load_split(RunConfig(), "synth-target")[:12]
    detector = build_method("clip", backbone="zsad-tiny", image_size=64, backbone_seed=0)
    options = dict(dataset="synth-target", image_size=64, batch_size=4, pro="cflow200")
    on_device = engine.evaluate(detector, samples, metrics_on_device=True, **options)
    on_cpu = engine.evaluate(detector, samples, **options)
    assert set(on_cpu.level) == {"image", "pixel"}
    pd.testing.assert_frame_equal(on_device, on_cpu)


def test_peak_memory_of_a_block_counts_what_it_allocated() -> None:
    from zsadkit.models.runtime import PeakMemory

    with PeakMemory("cpu") as memory:
        block = torch.ones(50 * 2**20 // 4 * 4)  # 200 MiB of float32, touched
        del block
    assert memory.kind.startswith("process RSS peak")
    assert memory.above_start >= 190 and memory.mib >= memory.above_start
