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
# # HeadCLIP, step by step: attention heads, learnable head weights, the joint anomaly score
#
# **HeadCLIP is a reconstruction** (`fidelity = reconstructed`). Of *Domain Adaptation of Attention Heads for
# Zero-shot Anomaly Detection* (Jeong, Heo, Son, Kang; arXiv 2505.22259) only the abstract could be read; the
# method section, the equations and the official code (kiyoonjeong0305/HeadCLIP) could not. What the abstract
# says, and how `zsadkit/methods/headclip.py` reads it (each reading a switch of `HeadCLIPConfig`, see
# docs/headclip.md):
#
# 1. **Learnable prompts** in the text encoder: AnomalyCLIP's object-agnostic prompts with deep prompts.
# 2. **Learnable head weights (LHW)** that "dynamically adjust the features held by each attention head": a weight
#    w_{l,h} per (layer, head) scales each head's output before the output projection, identity at the start
#    (`lhw_parameterisation`, `lhw_placement` Q-K / V-V / both, `lhw_layers`).
# 3. A **joint anomaly score (JAS)** that uses the pixel-level map for the image score:
#    s = β·p_global + (1 − β)·pool(M) (`jas_*`).
#
# This notebook shows what the heads of one layer attend to, the head weights as a layer × head heatmap before
# and after training, and the anomaly map with the JAS. In the `smoke` profile the CLIP has **random weights** and
# the data are synthetic: every number and map below only shows the mechanics.

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
dataset = ""  # test images; empty: synth-target (smoke) or mvtec (paper)
train_set = ""  # auxiliary training data; empty: synth-aux (smoke) or visa (paper)
options = {}  # HeadCLIPConfig overrides, e.g. {"lhw_parameterisation": "sigmoid", "lhw_placement": "vv"}
checkpoint = ""  # trained prompts and head weights (.safetensors, e.g. from 51_headclip_tables); empty: train here
epochs = 1  # training epochs for the "after" heatmap when no checkpoint is given (paper: 15)
subsample = 1  # keep every n-th training image (smoke speed)
sample_index = 0  # which anomalous test image the head figures show
head_layer = 0  # vision layer of the per-head figures (1-indexed); 0: the last feature layer
n_figure_samples = 4
cache_root = ""  # feature cache of the frozen blocks; empty: .cache/features

# %%
import math

import matplotlib.pyplot as plt
import pandas as pd
import torch

from zsadkit.data import batches
from zsadkit.data.transforms import OPENAI_MEAN, OPENAI_STD
from zsadkit.experiment import RunConfig, load_split
from zsadkit.methods.headclip import FIDELITY, pool_map
from zsadkit.models.attention import project_qkv
from zsadkit.recipes.headclip import fit
from zsadkit.training import TrainConfig

cfg = RunConfig.from_parameters(globals())
print(cfg.banner())
print(f"HeadCLIP fidelity: {FIDELITY} (a reading of the abstract; every unknown is a switch)")
dataset = dataset or ("synth-target" if not cfg.data_root else "mvtec")
train_set = train_set or ("synth-aux" if not cfg.data_root else "visa")
output = cfg.output / "headclip" / "walkthrough"
output.mkdir(parents=True, exist_ok=True)
banner = f"HeadCLIP (fidelity: {FIDELITY}). {cfg.banner()}"

clip = cfg.load_backbone()
model = cfg.build("headclip", clip=clip, **options)
print(model.config)
print("weighted layers per path:", model.lhw_layers, "| frozen (cached) blocks before layer", model.first_weighted_layer)

# %% [markdown]
# ## 1. What each head attends to
# Multi-head self-attention splits the width W into H heads of W/H channels; head h of layer l computes
# o_{l,h} = softmax(q_h k_hᵀ/√d) v_h, and the heads are concatenated and projected: out = W_O·[o_{l,1}; …; o_{l,H}].
# Top row: where the CLS token looks (Q-K attention of each head, CLS → patches). Bottom row: the anomaly map
# when, at that layer of the V-V (DPAM) side stream, only head h is kept (w = H·e_h): what that head contributes to
# the local features. LHW re-weights exactly these per-head outputs.

# %%
samples = load_split(cfg, dataset, split="test")
anomalous = [s for s in samples if s.label == 1]
sample = anomalous[sample_index % len(anomalous)]
batch = next(iter(batches([sample], cfg.image_size, batch_size=1)))
images = batch["image"].to(cfg.device)
layer = head_layer or model.config.feature_layers[-1]
heads, grid = model.visual.num_heads, model.visual.grid_size


def cls_attention(layer: int) -> torch.Tensor:
    """(H, G, G) Q-K attention of the CLS token over the patches at `layer`, per head."""
    with torch.no_grad():
        hidden = model.visual.stream_state(images, layer).hidden
        block = model.visual.blocks[layer - 1]
        q, k, _ = project_qkv(block.attn, block.ln_1(hidden))
        weights = (q[:, :, :1] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)  # (1, H, 1, 1+N)
    return weights[0, :, 0, 1:].reshape(heads, grid, grid).cpu()


def single_head_maps(layer: int) -> torch.Tensor:
    """(H, S, S) anomaly maps with only head h of `layer` kept (scaled by H) in the V-V side stream."""
    weightings = {path: module.weightings() for path, module in model.head_weights.items()}
    text = model.frozen_text_for_images([sample.class_name])
    maps = []
    with torch.no_grad():
        for head in range(heads):
            keep = torch.zeros(heads, device=images.device)
            keep[head] = heads
            side = {**weightings.get("vv", {}), layer: keep}
            passes = [model.visual(images, model.config.feature_layers, tokens="projected", attention=variant,
                                   head_weights=weightings.get("qk"), side_head_weights=side, return_global=False)
                      for variant in model.attention_variants]
            tokens = torch.stack([torch.stack(features.layer_tokens) for features in passes])
            maps.append(model.anomaly_maps(tokens, text)[0].cpu())
    return torch.stack(maps)


attention = cls_attention(layer)
head_maps = single_head_maps(layer)
mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
image_rgb = (batch["image"][0] * std + mean).clamp(0, 1).permute(1, 2, 0)
mask = batch["mask"][0] > 0.5
fig, axes = plt.subplots(2, heads + 1, figsize=(2.3 * (heads + 1), 5.2), squeeze=False)
axes[0, 0].imshow(image_rgb)
axes[0, 0].set_title(f"{sample.class_name}/{sample.defect}", fontsize=8)
axes[1, 0].imshow(mask, cmap="gray")
axes[1, 0].set_title("ground truth", fontsize=8)
for head in range(heads):
    axes[0, head + 1].imshow(attention[head], cmap="viridis")
    axes[0, head + 1].set_title(f"head {head + 1}: CLS attention", fontsize=8)
    axes[1, head + 1].imshow(head_maps[head], cmap="jet")
    axes[1, head + 1].set_title(f"head {head + 1} alone (V-V)", fontsize=8)
for axis in axes.flat:
    axis.set_xticks([])
    axis.set_yticks([])
axes[0, 1].set_ylabel("patch row")
axes[1, 1].set_ylabel("pixel row")
fig.suptitle(f"layer {layer}: per-head attention and contribution. {banner}", fontsize=7, wrap=True)
fig.tight_layout()
fig.savefig(output / "per_head_maps.png", dpi=100)

entropy = -(attention.flatten(1) * attention.flatten(1).clamp_min(1e-12).log()).sum(1)
per_head = pd.DataFrame({
    "layer": layer, "head": range(1, heads + 1),
    "cls_attention_entropy": entropy.numpy(), "uniform_entropy": math.log(grid * grid),
    "map_inside_minus_outside": [float(m[mask].mean() - m[~mask].mean()) if mask.any() else float("nan")
                                 for m in head_maps],
    "fidelity": FIDELITY,
})
per_head.to_csv(output / "per_head.csv", index=False)
per_head

# %% [markdown]
# ## 2. Learnable head weights, before and after training
# Training follows AnomalyCLIP's protocol (auxiliary test split, glocal loss; the HeadCLIP schedule is unknown).
# Only the prompts and the head weights learn; the blocks before the first weighted layer are read from the
# feature cache. Every parameterisation starts at w = 1 (identity); a NaN cell is a layer without weights on that
# path (the V-V stream starts at DPAM's first layer).

# %%
def weight_matrices() -> dict[str, torch.Tensor]:
    return {path: model.head_weight_matrix(path, images) for path in model.head_weights}


before = weight_matrices()
if checkpoint:
    model.load_prompts(checkpoint)
    print(f"prompts and head weights loaded from {checkpoint}")
else:
    train_samples = load_split(cfg, train_set, split="test")[::subsample]
    result = fit(model, train_samples, TrainConfig(epochs=epochs, batch_size=cfg.batch_size, seed=cfg.train_seed),
                 cache_root=cache_root or None, device=cfg.device)
    print(f"trained {epochs} epoch(s) on {len(train_samples)} images of {train_set}: loss",
          [round(row["loss"], 3) for row in result.log])
after = weight_matrices()

paths = list(before)
fig, axes = plt.subplots(len(paths), 2, figsize=(2.0 + 0.5 * heads * 2, 1.2 + 0.35 * model.visual.num_layers * len(paths)),
                         squeeze=False)
spread = max(float((torch.nan_to_num(matrix, nan=1.0) - 1).abs().max()) for matrix in (*before.values(),
                                                                                       *after.values()))
limit = max(spread, 1e-3)
for row, path in enumerate(paths):
    for column, (label, matrices) in enumerate((("before training", before), ("after training", after))):
        axis = axes[row, column]
        shown = axis.imshow(matrices[path].numpy(), cmap="coolwarm", vmin=1 - limit, vmax=1 + limit, aspect="auto")
        axis.set_title(f"{path.upper()} path, {label}", fontsize=8)
        axis.set_xlabel("head")
        axis.set_ylabel("layer")
        axis.set_xticks(range(heads), [str(h + 1) for h in range(heads)], fontsize=7)
        axis.set_yticks(range(model.visual.num_layers), [str(layer + 1) for layer in range(model.visual.num_layers)],
                        fontsize=7)
        fig.colorbar(shown, ax=axis, label="w (1 = identity)")
fig.suptitle(f"head weights ({model.config.lhw_parameterisation}). {banner}", fontsize=7, wrap=True)
fig.tight_layout()
fig.savefig(output / "head_weights.png", dpi=100)
weights_table = pd.concat([
    pd.DataFrame([{"path": path, "layer": layer + 1, "head": head + 1, "before": float(before[path][layer, head]),
                   "after": float(after[path][layer, head])}
                  for layer in range(model.visual.num_layers) for head in range(heads)])
    for path in paths
]).dropna().assign(parameterisation=model.config.lhw_parameterisation, fidelity=FIDELITY)
weights_table.to_csv(output / "head_weights.csv", index=False)
weights_table.head(12)

# %% [markdown]
# ## 3. The anomaly map and the joint anomaly score
# The map is AnomalyCLIP's: per feature layer softmax(⟨tokens, [g_n, g_a]⟩/0.07), upsampled, (P_a + 1 − P_n)/2,
# summed over the layers, Gaussian σ = 4. JAS pools the map (divided by the number of layers, so in [0, 1]) and
# fuses it with the global score: s = β·p_global + (1 − β)·pool(M).

# %%
normals = [s for s in samples if s.label == 0]
shown = ([anomalous[(sample_index + i) % len(anomalous)] for i in range(max(1, n_figure_samples - 1))]
         + normals[:1])[:n_figure_samples]
figure_batch = next(iter(batches(shown, cfg.image_size, batch_size=len(shown))))
with torch.no_grad():
    features = model.encode_image(figure_batch["image"].to(cfg.device))
    parts = model.score_parts(features, model.frozen_text_for_images([s.class_name for s in shown]))
    prediction = model.score(features, model.frozen_text_for_images([s.class_name for s in shown]))
config = model.config
pooled = parts.pooled(config.jas_pool, config.jas_topk_percent, config.jas_map)
jas = pd.DataFrame({
    "image": [f"{s.class_name}/{s.defect}" for s in shown], "label": [s.label for s in shown],
    "p_global": parts.global_scores.cpu().numpy(), f"pool_{config.jas_pool}": pooled.cpu().numpy(),
    "max_of_map": pool_map(parts.maps / parts.map_scale, "max").cpu().numpy(),
    "jas": prediction.image_scores.cpu().numpy(), "beta": config.jas_beta, "mode": config.jas_mode,
    "fidelity": FIDELITY,
})
jas.to_csv(output / "jas.csv", index=False)

fig, axes = plt.subplots(len(shown), 4, figsize=(11, 2.6 * len(shown)), squeeze=False)
for row, sample_shown in enumerate(shown):
    image = (figure_batch["image"][row] * std + mean).clamp(0, 1).permute(1, 2, 0)
    panels = [(image, f"{sample_shown.class_name}/{sample_shown.defect}", None),
              (figure_batch["mask"][row], "ground truth", "gray"),
              (prediction.anomaly_maps[row].cpu(), "anomaly map M", "jet")]
    for column, (panel, title, cmap) in enumerate(panels):
        axes[row, column].imshow(panel, cmap=cmap)
        axes[row, column].set_title(title, fontsize=8)
        axes[row, column].axis("off")
    values = [float(jas.loc[row, "p_global"]), float(jas.loc[row, f"pool_{config.jas_pool}"]),
              float(jas.loc[row, "jas"])]
    axes[row, 3].barh(["p_global", f"pool(M): {config.jas_pool}", f"JAS (β={config.jas_beta})"], values,
                      color=["tab:blue", "tab:orange", "tab:green"])
    axes[row, 3].set_xlim(0, 1)
    axes[row, 3].set_xlabel("score")
    axes[row, 3].tick_params(labelsize=7)
    axes[row, 3].set_title("image-level scores", fontsize=8)
fig.suptitle(banner, fontsize=7, wrap=True)
fig.tight_layout()
fig.savefig(output / "maps_and_jas.png", dpi=100)
jas
