"""Every registered method is built by name on the offline tiny model and returns scores and maps of the input size."""

from __future__ import annotations

import pytest
import torch

from zsadkit.methods import build_method, registered_methods


def test_all_paper_methods_are_registered() -> None:
    assert {"clip", "clip-ac", "winclip", "vand", "coop", "anomalyclip", "headclip", "inctrl", "aaclip"} <= set(registered_methods())


def test_unknown_method_error_lists_the_registered_ones() -> None:
    with pytest.raises(KeyError, match="registered: .*anomalyclip"):
        build_method("patchcore")


@pytest.mark.parametrize("name", ["clip", "clip-ac", "winclip", "vand", "coop", "anomalyclip", "headclip", "inctrl", "aaclip"])
def test_method_built_by_name_predicts_finite_scores_and_maps(name: str) -> None:
    detector = build_method(name, backbone="zsad-tiny", image_size=64, backbone_seed=0, train_seed=0)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    references = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    if getattr(detector, "requires_references", False):  # few-shot only (InCTRL): K normal references first
        detector.fit_references(references)
    with torch.no_grad():
        prediction = detector.predict(images, ["bottle", "metal_nut"])
    assert prediction.image_scores.shape == (2,)
    assert prediction.anomaly_maps.shape == (2, 64, 64)
    assert torch.isfinite(prediction.image_scores).all() and torch.isfinite(prediction.anomaly_maps).all()
    again = build_method(name, backbone="zsad-tiny", image_size=64, backbone_seed=0, train_seed=0)
    if getattr(again, "requires_references", False):
        again.fit_references(references)
    with torch.no_grad():
        repeated = again.predict(images, ["bottle", "metal_nut"])
    torch.testing.assert_close(repeated.anomaly_maps, prediction.anomaly_maps)  # deterministic for a seed
