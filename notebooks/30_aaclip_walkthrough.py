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
# # AA-CLIP, step by step
#
# A reading-group companion to *AA-CLIP: Enhancing Zero-shot Anomaly Detection via Anomaly-Aware CLIP* (Ma et
# al., CVPR 2025) and to `zsadkit/methods/aaclip.py`, which follows the official code (Mwxinnn/AA-CLIP @ 53db195)
# and is checked against its outputs by `python -m zsadkit.verify aaclip tests/fixtures/aaclip`.
#
# 1. **Residual adapters**: λ·Â(h) + (1 − λ)·h after whole blocks, Â rescaled to the norm of h.
# 2. **Stage 1, anomaly-aware text anchors**: the cosine between the normal and the anomalous anchor of each
#    class before and after training the text adapters with the disentanglement loss.
# 3. **Stage 1's frozen visual side**: V-V "surgery" features, and the reference's batch mixing.
# 4. **Stage 2, patch alignment**: patch features of normal and anomalous regions before and after training the
#    vision adapters (a 2-D projection).
# 5. **Maps and the score fusion**: per-level maps blurred on the patch grid, their sum, and the per-class
#    (transductive) fusion of the map maximum with the image score.
#
# In the `smoke` profile the CLIP has **random weights** and the data are synthetic: every number and figure below
# only shows the mechanics. Opened in JupyterLab or VS Code, a widget browses the maps (never in a batch run).

# %% tags=["parameters"]
profile = "smoke"
backbone = "zsad-tiny"
pretrained = ""
image_size = 112
data_root = ""
out_dir = ""
device = "cpu"
backbone_seed = 0
train_seed = 0
batch_size = 8
dataset = ""  # test images; empty: synth-target (smoke) or mvtec (paper)
train_set = ""  # auxiliary data; empty: synth-aux (smoke) or visa (paper)
train_shots = 4  # training images per class for the walkthrough's short training ("full" for all)
stage1_epochs = 5
stage2_epochs = 1
stage1_lr = 1e-2  # the reference's 1e-5 moves nothing visible in a few steps; the walkthrough exaggerates
stage2_lr = 5e-4
checkpoint = ""  # trained adapters (.safetensors or an official save_path folder) instead of training
sample_index = 0  # which anomalous test image the map figures show
interactive = None  # a widget to browse the maps; None: only in JupyterLab/VS Code, never in a batch run

# %%
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from zsadkit.data import batches
from zsadkit.data.transforms import OPENAI_MEAN, OPENAI_STD
from zsadkit.experiment import RunConfig, interactive_session, load_split
from zsadkit.methods.aaclip import transductive_image_scores
from zsadkit.protocols import domain
from zsadkit.recipes.aaclip import STAGE1, STAGE2, fit, training_samples

cfg = RunConfig.from_parameters(globals())
print(cfg.banner())
dataset = dataset or ("synth-target" if not cfg.data_root else "mvtec")
train_set = train_set or ("synth-aux" if not cfg.data_root else "visa")
output = cfg.output / "aaclip" / "walkthrough"
output.mkdir(parents=True, exist_ok=True)
model = cfg.build("aaclip", checkpoint=checkpoint)
clip = model.clip
print(model.config)

# %% [markdown]
# ## 1. Residual adapters (`model/adapter.py:91-99, 128-136`)
# A(h) = LeakyReLU(W h) is rescaled token by token to the norm of h, then mixed in with weight λ = 0.1. So an
# adapter can only turn a token, never blow it up, and 90 % of the frozen block's output passes through. Text
# adapters follow blocks 1–3 (of 12), vision adapters blocks 1–6 (of 24); this backbone's choice is scaled.

# %%
adapter = model.image_adapters[0]
with torch.no_grad():
    tokens = model.visual.blocks[0](model.visual.embed(torch.zeros(1, 3, cfg.image_size, cfg.image_size)))
    raw = adapter.adapt(tokens)
    fused = adapter(tokens)
adapter_table = pd.DataFrame({
    "quantity": ["‖h‖ (block output)", "‖A(h)‖ (raw adapter)", "‖λ·Â(h) + (1 − λ)·h‖", "cos(h, fused)"],
    "mean over tokens": [float(tokens.norm(dim=-1).mean()), float(raw.norm(dim=-1).mean()),
                         float(fused.norm(dim=-1).mean()),
                         float(torch.nn.functional.cosine_similarity(tokens, fused, dim=-1).mean())]})
adapter_table.to_csv(output / "adapter_norms.csv", index=False)
print(f"{len(model.text_adapters)} text and {len(model.image_adapters)} vision adapters; "
      f"{sum(p.numel() for p in model.text_parameters().values())} text and "
      f"{sum(p.numel() for p in model.image_parameters().values())} vision parameters (ViT-L: 2.36 M and 10.2 M)")
adapter_table

# %% [markdown]
# ## 2. Stage 1: anomaly-aware text anchors and the disentanglement loss
# Anchors: 6 normal and 10 anomalous sentences per class (e.g. "a photo of a damaged {}."), with the class's
# hand-written description, encoded by the adapted text tower and its new projection (LeakyReLU), averaged per
# state. Stage 1 trains only the text side: the segmentation loss of the (frozen) V-V patch features against the
# anchors plus γ·L_dis, L_dis = (mean_b ⟨T_N, T_A⟩)². The cosine between a class's two anchors is what L_dis
# pushes towards 0 ("disentangled" anchors, Fig. 2 of the paper).

# %%
train_samples = training_samples(load_split(cfg, train_set, split="test", protocol="aaclip"),
                                 train_shots if train_shots == "full" else int(train_shots), seed=cfg.train_seed,
                                 write_to=output / "train_samples.csv")
test_samples = load_split(cfg, dataset, split="test", protocol="aaclip")
classes = sorted({s.class_name for s in train_samples}) + sorted({s.class_name for s in test_samples})


def anchor_cosines(label: str) -> pd.DataFrame:
    with torch.no_grad():
        anchors = model.text_anchors(classes)
    return pd.DataFrame({"class": classes, "seen in training": [c in {s.class_name for s in train_samples}
                                                               for c in classes],
                         "when": label, "cos(T_N, T_A)": (anchors[:, 0] * anchors[:, 1]).sum(-1).tolist()})


before = anchor_cosines("before stage 1")
stage1 = replace(STAGE1, epochs=stage1_epochs, lr=stage1_lr, seed=cfg.train_seed)
stage2 = replace(STAGE2, epochs=stage2_epochs, lr=stage2_lr, seed=cfg.train_seed)
if not checkpoint:
    first = fit(model, train_samples, stage1, replace(stage2, epochs=0), device=cfg.device)
    print("stage 1 log:", [{k: round(v, 4) for k, v in row.items()} for row in first.stage1.log])
after = anchor_cosines("after stage 1" if not checkpoint else "loaded adapters")
cosines = pd.concat([before, after], ignore_index=True)
cosines.to_csv(output / "anchor_cosines.csv", index=False)
fig, axis = plt.subplots(figsize=(7, 3.2))
width = 0.4
for offset, (label, frame) in zip((-width / 2, width / 2), cosines.groupby("when", sort=False), strict=True):
    axis.bar(np.arange(len(classes)) + offset, frame["cos(T_N, T_A)"], width, label=label)
axis.set_xticks(range(len(classes)), [f"{c}{'*' if c in {s.class_name for s in train_samples} else ''}"
                                      for c in classes], rotation=30, fontsize=7)
axis.set_xlabel("class (* = seen in stage-1 training)")
axis.set_ylabel("cos(T_N, T_A)")
axis.set_title("normal vs anomalous anchor, before and after stage 1\n" + cfg.banner(), fontsize=7, wrap=True)
axis.set_ylim(min(0.0, float(cosines["cos(T_N, T_A)"].min()) - 0.05), 1.25)
axis.legend(fontsize=7, loc="upper left", ncols=2)
fig.tight_layout()
fig.savefig(output / "anchor_disentanglement.png", dpi=100)
cosines.pivot_table(index="class", columns="when", values="cos(T_N, T_A)", sort=False).round(3)

# %% [markdown]
# ## 3. Stage 1's visual side: V-V surgery, and the batch mixing of the reference
# From block 6 of 24 the surgery copy replaces Q-K attention by V-V attention in the residual stream (MLP kept).
# The reference's replacement module reads the (tokens, batch, width) tensor as (batch, tokens, width), so each
# token position attends over **the same position in the other images of the batch**: an image's stage-1
# features depend on its batch mates. `vv_batch_mixing=False` runs V-V per image.

# %%
probe = next(iter(batches(test_samples[:4], cfg.image_size, batch_size=4)))["image"].to(cfg.device)
mixing_rows = []
for batch_mixing in (True, False):
    surgery = cfg.build("aaclip", clip=clip, vv_batch_mixing=batch_mixing)
    in_batch = surgery.stage1_features(probe)["patch_features"][0]
    alone = surgery.stage1_features(probe[:1])["patch_features"][0]
    mixing_rows.append({"vv_batch_mixing": batch_mixing, "reading": "reference code" if batch_mixing else "per image",
                        "max |image 0 in a batch of 4 − image 0 alone|": float((in_batch - alone).abs().max())})
mixing = pd.DataFrame(mixing_rows)
mixing.to_csv(output / "vv_batch_mixing.csv", index=False)
mixing

# %% [markdown]
# ## 4. Stage 2: aligning patch features with the anchors
# The anchors are frozen; the vision adapters (blocks 1–6) and the per-level projections P_l (W → E, no bias)
# learn with CE on the det vector + the segmentation loss per level. Below: the level-1 patch features V_1 of
# test images, split into normal and anomalous patches by the ground truth, projected on their two principal
# directions, before and after stage 2 (the anchors T_N, T_A projected too).

# %%
figure_batch = next(iter(batches([s for s in test_samples if s.label == 1][:8] + [s for s in test_samples
                                                                                   if s.label == 0][:4],
                                 cfg.image_size, batch_size=12)))
grid = model.visual.grid_size
patch_labels = torch.nn.functional.adaptive_max_pool2d(figure_batch["mask"][:, None], grid).flatten(1).bool()


def level_features() -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        features = model.encode_image(figure_batch["image"].to(cfg.device)).seg_tokens[0].reshape(-1, model.text.embed_dim)
        anchors = model.frozen_anchors([figure_batch["class_name"][0]])[0]
    return features.cpu().numpy(), anchors.cpu().numpy()


snapshots = {"before stage 2": level_features()}
if not checkpoint:
    second = fit(model, train_samples, replace(stage1, epochs=0), stage2, device=cfg.device)
    print("stage 2 log:", [{k: round(v, 4) for k, v in row.items()} for row in second.stage2.log])
snapshots["after stage 2" if not checkpoint else "loaded adapters"] = level_features()
fig, axes = plt.subplots(1, 2, figsize=(9, 4))
labels = patch_labels.flatten().numpy()
for axis, (title, (features, anchors)) in zip(axes, snapshots.items(), strict=True):
    centred = features - features.mean(0)
    _, _, directions = np.linalg.svd(centred, full_matrices=False)
    points, anchor_points = centred @ directions[:2].T, (anchors - features.mean(0)) @ directions[:2].T
    axis.scatter(*points[~labels].T, s=6, alpha=0.4, label="normal patches")
    axis.scatter(*points[labels].T, s=10, alpha=0.8, label="anomalous patches")
    axis.scatter(*anchor_points.T, marker="*", s=150, c=["green", "red"], label="T_N (green), T_A (red)")
    axis.set_title(title, fontsize=9)
    axis.set_xlabel("principal direction 1")
    axis.set_ylabel("principal direction 2")
    axis.legend(fontsize=7)
fig.suptitle("level-1 patch features V_1 of test images\n" + cfg.banner(), fontsize=7, wrap=True)
fig.tight_layout()
fig.savefig(output / "patch_features_2d.png", dpi=100)

# %% [markdown]
# ## 5. Maps and the score fusion
# Per level: (100·V_l·T_A + 1 − 100·V_l·T_N)/2 on the patch grid, Gaussian-blurred **there** (kernel 7, σ 1 on
# industrial sets; 9, 1.5 on medical sets), upsampled bilinearly; summed over levels. The image score is
# s = (d·T_A + 1)/2. The reference then min-max normalises, per class over the whole test set, the maps and the
# scores and fuses 0.5·max(map) + 0.5·s (industrial) or max(map) (medical): a transductive score, since one
# image's score depends on the others. `image_score_fusion="per_image"` scales the map maximum by its fixed range
# instead.

# %%
model.set_domain(domain(dataset))
class_name = sorted({s.class_name for s in test_samples})[0]
class_samples = [s for s in test_samples if s.class_name == class_name]
class_batch = next(iter(batches(class_samples, cfg.image_size, batch_size=len(class_samples))))
scores = model.score(class_batch["image"].to(cfg.device), list(class_batch["class_name"]))
fusion = pd.DataFrame({
    "image": ["/".join(s.image.rsplit("/", 2)[-2:]) for s in class_samples], "label": class_batch["label"].tolist(),
    "image score s": scores.image_scores.tolist(), "map max": scores.anomaly_maps.flatten(1).amax(1).tolist(),
    "fused (transductive, reference)": transductive_image_scores(
        scores.image_scores, scores.anomaly_maps.flatten(1).amax(1), float(scores.anomaly_maps.min()),
        model.map_weight()).tolist(),
    "fused (per image)": model.per_image_image_scores(scores).tolist()})
fusion.to_csv(output / "fusion.csv", index=False)
mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
anomalous = [s for s in test_samples if s.label == 1]


def plot_maps(index: int):
    chosen = anomalous[index % len(anomalous)]
    item = next(iter(batches([chosen], cfg.image_size, batch_size=1)))
    result = model.score(item["image"].to(cfg.device), [chosen.class_name])
    levels = model.config.levels
    fig, axes = plt.subplots(1, 3 + len(levels), figsize=(2.4 * (3 + len(levels)), 2.8))
    panels = [((item["image"][0] * std + mean).clamp(0, 1).permute(1, 2, 0), f"{chosen.class_name}/{chosen.defect}",
               None), (item["mask"][0], "ground truth", "gray"),
              *[(result.level_maps[i, 0].cpu(), f"level {level} (block {level})", "jet")
                for i, level in enumerate(levels)],
              (result.anomaly_maps[0].cpu(), f"Σ levels, s = {float(result.image_scores[0]):.3f}", "jet")]
    for axis, (panel, title, cmap) in zip(axes, panels, strict=True):
        axis.imshow(panel, cmap=cmap)
        axis.set_title(title, fontsize=8)
        axis.axis("off")
    fig.suptitle(cfg.banner(), fontsize=7, wrap=True)
    fig.tight_layout()
    return fig


plot_maps(sample_index).savefig(output / "level_maps.png", dpi=100)
fusion.round(3)

# %% [markdown]
# ## Explore (interactive sessions only)

# %%
if interactive_session(interactive):
    import ipywidgets as widgets

    widgets.interact(lambda sample_number: plot_maps(sample_number) and plt.show(),
                     sample_number=widgets.IntSlider(0, 0, len(anomalous) - 1))
