"""The run configuration every notebook's `parameters` cell maps onto, and the datasets of each profile.

Profiles:
    smoke: the embedded offline default. A tiny random-initialised CLIP (`zsad-tiny`) on the synthetic
        MVTec-layout data (`synth-aux` for training, `synth-target` for zero-shot testing). Numbers check the
        pipeline only; they say nothing about the methods.
    paper: the papers' setting. Pretrained ViT-L-14-336 (open_clip `openai` weights) at 518 px on the real
        datasets under `data_root` (prepared with `zsadkit data prepare`), on a GPU.

Example:
    >>> cfg = RunConfig(profile="smoke")
    >>> cfg.weights_label
    'random'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from zsadkit.data.records import Sample

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOKE_DATA_ROOT = REPO_ROOT / "data" / "synthetic"

PROFILES = ("smoke", "paper")


@dataclass
class RunConfig:
    """Backbone, data and output settings shared by every notebook.

    Attributes:
        profile: "smoke" or "paper" (see module docstring).
        backbone: open_clip model name, or "zsad-tiny".
        pretrained: open_clip pretrained tag ("openai"), a checkpoint path, or "" for random weights.
        image_size: input side S in pixels.
        data_root: root of prepared datasets; "" means the synthetic data under `data/synthetic`.
        out_dir: where result CSVs and figures go (`results/<profile>` by default).
        device: "cpu", "cuda", "cuda:1", ...
        seed: random seed (weights of the tiny model, training, sampling).
        batch_size: images per forward pass at test time.
    """

    profile: str = "smoke"
    backbone: str = "zsad-tiny"
    pretrained: str = ""
    image_size: int = 112
    data_root: str = ""
    out_dir: str = ""
    device: str = "cpu"
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {self.profile!r}")
        if not self.out_dir:
            self.out_dir = str(REPO_ROOT / "results" / self.profile)

    @property
    def weights_label(self) -> str:
        """What the results' `weights` column says: the tag or file, or "random"."""
        return self.pretrained or "random"

    @property
    def output(self) -> Path:
        path = Path(self.out_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def load_backbone(self) -> torch.nn.Module:
        """The CLIP of this run (`zsadkit.models.load_backbone`): `pretrained` is a tag, a weights file or ""."""
        from zsadkit.models import load_backbone

        return load_backbone(self.backbone, self.pretrained, self.image_size, self.device, self.seed)

    def banner(self) -> str:
        """A line every notebook prints first, so no reader mistakes a smoke number for a result."""
        if not self.pretrained:
            return (
                f"[{self.profile}] backbone {self.backbone} with RANDOM weights: the numbers below check the "
                "pipeline only and say nothing about the method."
            )
        return f"[{self.profile}] backbone {self.backbone}, weights {self.pretrained}, image size {self.image_size}"


def load_split(cfg: RunConfig, dataset: str, split: str = "test", protocol: str = "anomalyclip") -> list[Sample]:
    """Samples (absolute paths) of a dataset by name.

    In the smoke profile the names are "synth-aux" and "synth-target" (generated on first use, a few seconds);
    otherwise the dataset is read from its prepared manifest under `cfg.data_root` for the given protocol.
    """
    if not cfg.data_root:
        from zsadkit.data.mvtec import read_mvtec
        from zsadkit.data.synthetic import SyntheticConfig, make_synthetic

        roots = make_synthetic(SMOKE_DATA_ROOT, SyntheticConfig(seed=cfg.seed))
        if dataset not in roots:
            raise KeyError(f"without data_root only the synthetic datasets {sorted(roots)} exist, not {dataset!r}")
        return read_mvtec(roots[dataset], dataset=dataset, splits=(split,))
    from zsadkit.data.catalog import load_dataset

    return load_dataset(dataset, protocol, cfg.data_root, split=split)
