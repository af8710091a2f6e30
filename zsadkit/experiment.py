"""The run configuration every notebook's `parameters` cell maps onto, and the datasets of each profile.

A notebook declares the `RunConfig` fields it uses as parameters (plus its own), then:

    cfg = RunConfig.from_parameters(globals())        # the run fields of the parameters cell, nothing copied by hand
    model = cfg.build("anomalyclip")                   # every method through the registry, one RNG behaviour
    rows = tidy(metrics, cfg.provenance("anomalyclip", train_set="visa", train_seed=cfg.train_seed))

Profiles:
    smoke: the embedded offline default. A tiny random-initialised CLIP (`zsad-tiny`) on the synthetic
        MVTec-layout data (`synth-aux` for training, `synth-target` for zero-shot testing). Numbers check the
        pipeline only; they say nothing about the methods.
    cpu: a reading group's laptop. Pretrained ViT-B-16 (OpenAI weights) at 224 px on a few VisA classes
        (`visa-aux` for training, `visa-target` for testing; `zsadkit data prepare visa --download`), on a CPU.
    paper: the papers' setting. Pretrained ViT-L-14-336 (open_clip `openai` weights) at 518 px on the real
        datasets under `data_root` (prepared with `zsadkit data prepare`), on a GPU.

Outputs go to `out_dir`; the runner always sets it (`results/<profile>/`). A notebook run by hand writes to
`results/scratch/<profile>/` instead, so it never overwrites what the runner generated.

Seeds: `backbone_seed` draws random backbone weights (smoke profile; ignored for pretrained weights);
`train_seed` is the seed of what a method learns or draws: the initialisation of its prompts, projections or
adapters, its training data order, its few-shot reference sets. The synthetic data have their own fixed seed
(`zsadkit.data.synthetic.SyntheticConfig.seed`).

Example:
    >>> cfg = RunConfig.from_parameters({"profile": "smoke", "image_size": 112, "epochs": 2})
    >>> cfg.weights_label, cfg.image_size
    ('random', 112)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from torch import nn

from zsadkit.data.records import Sample
from zsadkit.grid import EXECUTORS
from zsadkit.methods import Detector, build_method
from zsadkit.models import load_backbone
from zsadkit.paths import SMOKE_DATA_ROOT, results_dir
from zsadkit.protocols import subset
from zsadkit.results import Provenance

__all__ = ["PROFILES", "RunConfig", "interactive_session", "load_split"]

PROFILES = ("smoke", "cpu", "paper")


@dataclass(frozen=True)
class RunConfig:
    """Backbone, data and output settings shared by every notebook.

    Attributes:
        profile: "smoke" or "paper" (see module docstring).
        backbone: open_clip model name, or "zsad-tiny".
        pretrained: open_clip pretrained tag ("openai"), a checkpoint path, or "" for random weights.
        image_size: input side S in pixels.
        data_root: root of prepared datasets; "" means the synthetic data under `data/synthetic`.
        out_dir: where result CSVs and figures go (the runner: `results/<profile>`; by hand, by default,
            `results/scratch/<profile>`).
        device: "cpu", "cuda", "cuda:1", ...
        backbone_seed: seed of random backbone weights.
        train_seed: seed of a method's initialisation, data order and few-shot draws.
        batch_size: images per forward pass at test time.
        executor: where the notebook's grid runs (`zsadkit.grid.run_grid`): "local" (serially) or "dask".
        scheduler: address of a Dask scheduler for executor "dask"; "" starts a local cluster. Neither changes a
            result: they are not part of `settings()`.
    """

    profile: str = "smoke"
    backbone: str = "zsad-tiny"
    pretrained: str = ""
    image_size: int = 112
    data_root: str = ""
    out_dir: str = ""
    device: str = "cpu"
    backbone_seed: int = 0
    train_seed: int = 111
    batch_size: int = 8
    executor: str = "local"
    scheduler: str = ""

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {self.profile!r}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {self.executor!r}")
        if not self.out_dir:
            object.__setattr__(self, "out_dir", str(results_dir("scratch") / self.profile))

    @classmethod
    def from_parameters(cls, namespace: Mapping[str, Any]) -> RunConfig:
        """The run fields found in a notebook's namespace (`globals()` after the parameters cell); the notebook's
        other parameters are ignored, absent fields keep their defaults."""
        return cls(**{f.name: namespace[f.name] for f in fields(cls) if f.name in namespace})

    def with_backbone(self, backbone: str = "", pretrained: str | None = None, image_size: int = 0) -> RunConfig:
        """A copy on another backbone (e.g. WinCLIP's ViT-B-16-plus-240); empty arguments keep this run's."""
        return replace(self, backbone=backbone or self.backbone,
                       pretrained=self.pretrained if pretrained is None else pretrained,
                       image_size=image_size or self.image_size)

    @property
    def weights_label(self) -> str:
        """What the results' `weights` column says: the tag or file, or "random"."""
        return self.pretrained or "random"

    @property
    def cell_resources(self) -> dict[str, int]:
        """What one grid cell of this run needs on a Dask worker: a GPU when the run is on CUDA."""
        return {"GPU": 1} if self.device.startswith("cuda") else {}

    def settings(self) -> dict[str, Any]:
        """The fields a result can depend on (all but where outputs go and where the grid runs): a grid's context."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("out_dir", "executor", "scheduler")}

    @property
    def output(self) -> Path:
        path = Path(self.out_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def load_backbone(self) -> nn.Module:
        """The CLIP of this run (`zsadkit.models.load_backbone`): `pretrained` is a tag, a weights file or ""."""
        return load_backbone(self.backbone, self.pretrained, self.image_size, self.device, self.backbone_seed)

    def build(self, method: str, **options: Any) -> Detector:
        """`zsadkit.methods.build_method` with this run's backbone, device and seeds; `options` are the method's
        config fields, `checkpoint=`, `clip=` (a loaded backbone to reuse) or a `train_seed=` of its own."""
        settings = {"backbone": self.backbone, "pretrained": self.pretrained, "image_size": self.image_size,
                    "device": self.device, "backbone_seed": self.backbone_seed, "train_seed": self.train_seed}
        return build_method(method, **{**settings, **options})

    def provenance(
        self, method: str, *, train_set: str = "none", shots: int = 0, checkpoint: str = "",
        train_seed: int | None = None, reference_seed: int | None = None,
    ) -> Provenance:
        """What produced a result of `method` in this run; `train_seed` only for methods that learn,
        `reference_seed` only for few-shot rows (the seed of their reference-set draw)."""
        return Provenance(method=method, backbone=self.backbone, weights=self.weights_label,
                          image_size=self.image_size, train_set=train_set, profile=self.profile, shots=shots,
                          backbone_seed=self.backbone_seed, train_seed=train_seed, reference_seed=reference_seed,
                          checkpoint=str(checkpoint))

    def save_figure(self, fig: Any, path: str | Path, dpi: int = 120) -> Path:
        """Save a matplotlib figure with this run's banner on top when the weights are random (a smoke figure must
        never pass for a result), with nothing clipped (`bbox_inches="tight"`); in a Jupyter kernel the figure is
        also shown in the cell's output (so executed notebooks, and the book made of them, hold it); then it is
        closed."""
        import matplotlib.pyplot as plt

        if not self.pretrained:
            title = fig._suptitle.get_text() if fig._suptitle is not None else ""
            banner = self.banner()
            if banner not in title:  # above the axes (the tight bounding box grows to hold it)
                fig.suptitle(f"{title}\n{banner}" if title else banner, fontsize=8, y=1.0, va="bottom")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        if _in_kernel():
            from IPython.display import display

            display(fig)
        plt.close(fig)
        return path

    def banner(self) -> str:
        """A line every notebook prints first, so no reader mistakes a smoke number for a result."""
        if not self.pretrained:
            return (
                f"[{self.profile}] backbone {self.backbone} with RANDOM weights: the numbers below check the "
                "pipeline only and say nothing about the method."
            )
        return f"[{self.profile}] backbone {self.backbone}, weights {self.pretrained}, image size {self.image_size}"


def _in_kernel() -> bool:
    """Whether this code runs in a Jupyter kernel (papermill's included), where a displayed figure becomes a cell
    output; False in a plain interpreter, a terminal IPython or a test."""
    shell_module = sys.modules.get("IPython")
    shell = shell_module.get_ipython() if shell_module is not None else None
    return getattr(shell, "kernel", None) is not None


def interactive_session(requested: bool | None = None) -> bool:
    """Whether a notebook shows ipywidgets: `requested` when given, else only in a Jupyter frontend that renders
    them (JupyterLab/Notebook set `JPY_SESSION_NAME` for their kernels, VS Code `VSCODE_PID`), never in a batch run
    (papermill, nbclient, `python -m zsadkit.reproduce`, which sets `ZSADKIT_BATCH`). Batch clients can wait
    forever on widget messages (an ipywidgets Output widget under nbclient stalled notebook 10 in 3 of 7 runs)."""
    if requested is not None:
        return bool(requested)
    if os.environ.get("ZSADKIT_BATCH"):
        return False
    return bool(os.environ.get("JPY_SESSION_NAME") or os.environ.get("VSCODE_PID"))


def load_split(cfg: RunConfig, dataset: str, split: str = "test", protocol: str = "anomalyclip") -> list[Sample]:
    """Samples (absolute paths) of a dataset by name.

    In the smoke profile the names are "synth-aux" and "synth-target" (generated on first use, a few seconds);
    otherwise the dataset is read from its prepared manifest under `cfg.data_root` for the given protocol. A named
    class subset (`zsadkit.protocols.subset`, e.g. "visa-target") keeps its classes and is named as the subset.
    """
    if not cfg.data_root:
        from zsadkit.data.mvtec import read_mvtec
        from zsadkit.data.synthetic import SyntheticConfig, make_synthetic

        roots = make_synthetic(SMOKE_DATA_ROOT, SyntheticConfig())
        if dataset not in roots:
            raise KeyError(f"without data_root only the synthetic datasets {sorted(roots)} exist, not {dataset!r}")
        return read_mvtec(roots[dataset], dataset=dataset, splits=(split,))
    from zsadkit.data.catalog import load_dataset

    named_subset = subset(dataset)
    if named_subset is None:
        return load_dataset(dataset, protocol, cfg.data_root, split=split)
    source, classes = named_subset
    samples = [s for s in load_dataset(source, protocol, cfg.data_root, split=split) if s.class_name in classes]
    missing = sorted(set(classes) - {s.class_name for s in samples})
    if missing:
        raise KeyError(f"subset {dataset!r}: {source} under {cfg.data_root} has no {split} images of classes {missing}")
    return [replace(s, dataset=dataset) for s in samples]
