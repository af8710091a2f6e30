# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Your own images: anomaly scores, maps and a yes/no decision
#
# Point `images` at a folder of your images (searched recursively), pick a `method`, and this notebook scores every
# image with `zsadkit.predict.predict`, the function behind `zsadkit predict`. With a calibration folder
# (`calibrate`: `good/` and optionally `bad/` images, the layout of `zsadkit data from-folder`) it also picks the
# threshold that turns a score into a decision: the F1-max threshold, or with `target_fpr` the lowest threshold
# whose false-positive rate on `good/` is at most that rate. Outputs go to `results/<profile>/your_images/<method>/`:
# `scores.csv`, `maps/` (overlays and raw maps), `run.json`, `calibration.json`, and `grid.png` from this notebook.
#
# The folder name becomes the class word of the prompts ("a photo of a damaged [cls]"); set `class_name` when it
# is not a good description of the object. With `images` empty the notebook scores a synthetic example folder and
# calibrates on its normal training images; in the `smoke` profile the backbone has random weights, so the scores
# and decisions check the pipeline only. Opened in JupyterLab or VS Code it shows an upload box and a method
# picker; they wait for clicks without blocking the notebook, so a batch run goes straight past them.

# %% tags=["parameters"]
profile = "smoke"
backbone = "zsad-tiny"
pretrained = ""
image_size = 112
data_root = ""
out_dir = ""
device = "cpu"
backbone_seed = 0
train_seed = 111
batch_size = 8
images = ""  # a folder of your images; empty: a synthetic example folder
method = "clip"  # any of zsadkit.methods.registered_methods()
checkpoint = ""  # trained prompts/projections of learned methods (anomalyclip, coop, vand)
references = ""  # normal reference images of few-shot methods (winclip, vand)
class_name = ""  # the class word of the prompts; empty: the folder's name
calibrate = ""  # a folder with good/ (and bad/) images; empty with the example: its normal training images
target_fpr = 0.1  # with `calibrate`: largest false-positive rate on good/ (None: the F1-max threshold)
threshold = None  # a threshold set by hand instead of `calibrate`
n_grid = 8
interactive = None  # an upload box and a method picker; None: only in JupyterLab/VS Code, never in a batch run

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from zsadkit.data.synthetic import SyntheticConfig, make_synthetic
from zsadkit.experiment import RunConfig, interactive_session
from zsadkit.methods import registered_methods
from zsadkit.paths import SMOKE_DATA_ROOT
from zsadkit.predict import PredictResult, predict

cfg = RunConfig.from_parameters(globals())
print(cfg.banner())
output = cfg.output / "your_images"
output.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## The images
# Without `images`, the example is one synthetic class's test folder (good and defective images in sub-folders),
# calibrated on that class's normal training images, copied into a `from-folder` layout (`good/` only: enough for a
# target false-positive rate).

# %%
if not images:
    example_class = SyntheticConfig().target_classes[-1]
    example = make_synthetic(SMOKE_DATA_ROOT, SyntheticConfig())["synth-target"] / example_class
    images, class_name = str(example / "test"), class_name or example_class
    if not calibrate and threshold is None:
        calibrate = output / "example_calibration"
        for source in sorted((example / "train" / "good").glob("*.png")):
            target = calibrate / "good" / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.link(source, target)
print(f"images: {images}" + (f"; calibration: {calibrate}" if calibrate else ""))

# %% [markdown]
# ## Score
# One call scores every image in batches, writes the maps as it goes and returns the scores as a table; the maps
# stay on disk (`result.maps[path]` reads one when asked for).

# %%
def score(folder: str | Path, method_name: str, word: str) -> PredictResult:
    """`predict` with this notebook's settings into your_images/<method>/ (rescored on every run)."""
    return predict(
        folder, method=method_name, out=output / method_name, backbone=cfg.backbone, pretrained=cfg.pretrained,
        image_size=cfg.image_size, device=cfg.device, batch_size=cfg.batch_size, checkpoint=checkpoint,
        references=references or None, threshold=threshold, calibrate=calibrate or None,
        target_fpr=target_fpr if calibrate else None, class_name=word or None, force=True, progress=False,
        backbone_seed=cfg.backbone_seed, train_seed=cfg.train_seed,
    )


result = score(images, method, class_name)
print(result.summary())
result.scores[["path", "class_name", "score", *(["decision"] if result.threshold is not None else [])]].head(10)

# %% [markdown]
# ## Images, maps and decisions
# A spread of scores from the lowest to the highest: each image, its overlay (the map's colours are scaled per
# image: look at the score for how anomalous it is) and the raw map.

# %%
def show_grid(result: PredictResult, count: int, title: str) -> plt.Figure:
    """Image, overlay and raw map of `count` images spread over the range of scores."""
    ranked = result.scores.sort_values("score").reset_index(drop=True)
    rows = ranked.iloc[np.unique(np.linspace(0, len(ranked) - 1, min(count, len(ranked))).round().astype(int))]
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.4 * len(rows) + 0.5), squeeze=False, layout="constrained")
    for axis_row, (_, row) in zip(axes, rows.iterrows(), strict=True):
        verdict = f" → {row['decision']}" if "decision" in row else ""
        panels = [(Image.open(row["path"]).convert("RGB"), f"{Path(row['path']).parent.name}/{Path(row['path']).name}"),
                  (Image.open(result.out / row["overlay"]), f"score {row['score']:.3f}{verdict}"),
                  (result.maps[row["path"]].astype(np.float32), "raw map")]
        for axis, (panel, label) in zip(axis_row, panels, strict=True):
            axis.imshow(panel, cmap="jet" if label == "raw map" else None)
            axis.set_title(label, fontsize=8)
            axis.axis("off")
    fig.suptitle(title, fontsize=8, wrap=True)
    return fig


threshold_text = "no threshold" if result.threshold is None else f"threshold {result.threshold:.4g}"
figure = show_grid(result, n_grid, f"{method}, {threshold_text}. " + (cfg.banner() if not cfg.pretrained else ""))
figure.savefig(output / "grid.png", dpi=100)

# %% [markdown]
# ## Try your own (interactive sessions only)
# Upload images, pick a method and a class word, press "score". Nothing here waits for input: the widgets only
# react to clicks, so a batch run (papermill, `zsadkit.reproduce`) passes this cell at once.

# %%
if interactive_session(interactive):
    import ipywidgets as widgets
    from IPython.display import display

    upload = widgets.FileUpload(accept="image/*", multiple=True, description="images")
    picker = widgets.Dropdown(options=registered_methods(), value=method, description="method")
    word_box = widgets.Text(value=class_name or "object", description="class word")
    button = widgets.Button(description="score")
    shown = widgets.Output()

    def on_score(_: object) -> None:
        with shown:
            shown.clear_output()
            folder = output / "uploads"
            folder.mkdir(parents=True, exist_ok=True)
            for item in upload.value:
                (folder / Path(item["name"]).name).write_bytes(bytes(item["content"]))
            uploaded = score(folder, picker.value, word_box.value)
            print(uploaded.summary())
            uploaded_grid = show_grid(uploaded, n_grid, f"{picker.value}: your uploads")
            display(uploaded_grid)
            plt.close(uploaded_grid)

    button.on_click(on_score)
    display(widgets.VBox([widgets.HBox([upload, picker, word_box, button]), shown]))
