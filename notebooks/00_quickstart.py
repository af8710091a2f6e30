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
# # Quickstart: zero-shot anomaly detection with plain CLIP
#
# The thinnest path through the kit: load a CLIP backbone, read a dataset, score every image with the plain CLIP
# baseline (prompts "a photo of a normal [cls]" / "a photo of an anomalous [cls]"), compute the shared metrics,
# and write a tidy results CSV and a figure of anomaly maps under `results/<profile>/quickstart/`.
#
# In the `smoke` profile (the default) the backbone is `zsad-tiny`, a tiny CLIP with **random weights**, and the
# data are the synthetic MVTec-layout classes generated on first use: the numbers check that the pipeline runs,
# nothing more. The `paper` profile runs the pretrained ViT-L-14-336 at 518 px on MVTec AD.

# %% tags=["parameters"]
profile = "smoke"
backbone = "zsad-tiny"
pretrained = ""
image_size = 112
data_root = ""
out_dir = ""
device = "cpu"
backbone_seed = 0
batch_size = 8
dataset = ""  # empty: synth-target in the smoke profile, mvtec in the paper profile
n_figure_samples = 4

# %%
import matplotlib.pyplot as plt
import torch

from zsadkit.data import batches
from zsadkit.data.transforms import OPENAI_MEAN, OPENAI_STD
from zsadkit.engine import evaluate
from zsadkit.experiment import RunConfig, load_split
from zsadkit.results import tidy, wide_table, write_results

cfg = RunConfig.from_parameters(globals())
print(cfg.banner())
dataset = dataset or ("synth-target" if not cfg.data_root else "mvtec")
output = cfg.output / "quickstart"
output.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## Data and backbone

# %%
samples = load_split(cfg, dataset, split="test")
classes = sorted({s.class_name for s in samples})
print(f"{dataset}: {len(samples)} test images, {sum(s.label for s in samples)} anomalous, classes {classes}")

detector = cfg.build("clip")  # the backbone of this run, with plain CLIP's prompts (zsadkit.methods.clip_baseline)

# %% [markdown]
# ## Score and evaluate
# Image score: softmax over the two prompts of the global image embedding's cosine similarities. Anomaly map:
# the same softmax per patch token, upsampled to the image size. Metrics: image AUROC/AP, pixel AUROC and the
# AU-PRO that AnomalyCLIP reports, per class and as the unweighted mean over classes.

# %%
rows = evaluate(
    detector, samples, dataset=dataset, image_size=cfg.image_size, batch_size=cfg.batch_size, device=cfg.device
)
results = tidy(rows, cfg.provenance("clip"))
write_results(results, output / "results.csv")
table = wide_table(results, "class_name", ["level", "metric"])
print(f"wrote {output / 'results.csv'}" + (" (random weights: pipeline check only)" if not cfg.pretrained else ""))
table

# %% [markdown]
# ## Anomaly maps
# Image, ground truth and anomaly map for a few anomalous test images, one class after the other.

# %%
by_class = [[s for s in samples if s.label == 1 and s.class_name == name] for name in classes]
anomalous = [group[i] for i in range(max(map(len, by_class))) for group in by_class if i < len(group)]
anomalous = anomalous[:n_figure_samples]
batch = next(iter(batches(anomalous, cfg.image_size, batch_size=len(anomalous))))
with torch.no_grad():
    prediction = detector.predict(batch["image"].to(cfg.device), list(batch["class_name"]))
mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
std = torch.tensor(OPENAI_STD).view(3, 1, 1)
fig, axes = plt.subplots(len(anomalous), 3, figsize=(7.5, 2.5 * len(anomalous)), squeeze=False)
for row, sample in enumerate(anomalous):
    image = (batch["image"][row] * std + mean).clamp(0, 1).permute(1, 2, 0)
    panels = [(image, "image"), (batch["mask"][row], "ground truth"),
              (prediction.anomaly_maps[row].cpu(), f"anomaly map, score {prediction.image_scores[row]:.2f}")]
    for col, (panel, title) in enumerate(panels):
        axes[row, col].imshow(panel, cmap=None if col == 0 else "jet" if col == 2 else "gray")
        axes[row, col].set_title(f"{sample.class_name}/{sample.defect}: {title}" if col == 0 else title, fontsize=8)
        axes[row, col].axis("off")
fig.suptitle(f"CLIP zero-shot, {cfg.backbone}", fontsize=9)
fig.tight_layout()
cfg.save_figure(fig, output / "anomaly_maps.png", dpi=100)
