"""Shared test fixtures: the AnomalyCLIP reference arrays and the CLIP built from the fixture's state dict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

ANOMALYCLIP_FIXTURES = Path(__file__).parent / "fixtures" / "anomalyclip"


def fixture_arrays(name: str) -> dict[str, torch.Tensor]:
    """The arrays of `tests/fixtures/anomalyclip/<name>` as tensors."""
    with np.load(ANOMALYCLIP_FIXTURES / name) as arrays:
        return {key: torch.from_numpy(arrays[key]) for key in arrays.files}


@pytest.fixture(scope="module")
def clip():
    """The reference's tiny CLIP (OpenAI-format state dict of the fixture) at its test size, 112 px."""
    from zsadkit.models import load_clip

    return load_clip(state_dict=fixture_arrays("state_dict.npz"), image_size=112)
