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
# # AnomalyCLIP, step by step
#
# A reading-group companion to *AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot Anomaly Detection*
# (Zhou et al., ICLR 2024) and to `zsadkit/methods/anomalyclip.py`, which follows the official code
# (zqhang/AnomalyCLIP @ 45ed4dd) and is checked against its outputs by `python -m zsadkit.verify anomalyclip`.
#
# 1. **Prompts** (Sec. 3.2): two object-agnostic prompts "[V1..VE] object." / "[W1..WE] damaged object." with
#    separate learnable contexts, plus deep prompts that overwrite tokens 1..4 before text layers 2..9 (ViT-L/14;
#    the cell below prints the layers of the backbone in use).
# 2. **DPAM** (Sec. 3.3): a side stream with V-V attention, whose attention maps are diagonally prominent.
# 3. **One training step** (Sec. 3.4): global cross-entropy + λ × (focal + 2 dice) on the local map.
# 4. **Anomaly maps**: softmax(cos / 0.07) per patch, upsampled, summed over layers, Gaussian σ = 4.
#
# In the `smoke` profile the CLIP has **random weights** and the data are synthetic: every number and map below
# only shows the mechanics. Opened in JupyterLab (or VS Code), sliders pick the sample and layer; a batch run
# (papermill, `python -m zsadkit.reproduce`) never shows widgets.

# %% tags=["parameters"]
profile = "smoke"
backbone = "zsad-tiny"
pretrained = ""
image_size = 112
data_root = ""
out_dir = ""
device = "cpu"
backbone_seed = 0
train_seed = 0  # seed of the initial prompts (used when no checkpoint is given)
batch_size = 8
dataset = ""  # test images; empty: synth-target (smoke) or mvtec (paper)
train_set = ""  # auxiliary data of the training step; empty: synth-aux (smoke) or visa (paper)
checkpoint = ""  # trained prompts (.safetensors or the official epoch_15.pth); empty: 11_anomalyclip_tables' own
sample_index = 0  # which anomalous test image the figures show
attention_layer = 0  # vision layer of the attention figure (1-indexed); 0: the last feature layer
n_figure_samples = 4
interactive = None  # widgets to pick a sample / layer; None: only in JupyterLab/VS Code, never in a batch run

# %%
import matplotlib.pyplot as plt
import pandas as pd
import torch

from zsadkit.data import batches
from zsadkit.data.transforms import OPENAI_MEAN, OPENAI_STD
from zsadkit.experiment import RunConfig, interactive_session, load_split
from zsadkit.methods.anomalyclip import AnomalyCLIP
from zsadkit.models.attention import ATTENTION_MODES, project_qkv

cfg = RunConfig.from_parameters(globals())
print(cfg.banner())
dataset = dataset or ("synth-target" if not cfg.data_root else "mvtec")
train_set = train_set or ("synth-aux" if not cfg.data_root else "visa")
output = cfg.output / "anomalyclip" / "walkthrough"
output.mkdir(parents=True, exist_ok=True)

clip = cfg.load_backbone()
trained = cfg.output / "anomalyclip" / f"prompts_{train_set}.safetensors"  # written by 11_anomalyclip_tables
if not checkpoint and trained.is_file():
    checkpoint = str(trained)
model = cfg.build("anomalyclip", clip=clip, checkpoint=checkpoint)
print(f"prompts: {checkpoint}" if checkpoint else
      f"prompts: UNTRAINED (their random initialisation; run 11_anomalyclip_tables first to use the prompts it "
      f"trains on {train_set})")
config = model.config
print(f"this backbone: {model.visual.num_layers} vision layers, {len(model.text.blocks)} text layers; "
      f"features from layer(s) {list(config.feature_layers)}, DPAM from layer {config.dpam_first_layer}, "
      f"deep prompts before text layers 2..{config.deep_depth} (ViT-L/14 as released: layer 24, DPAM from 6, "
      "text layers 2..9)")

# %% [markdown]
# ## 1. Object-agnostic prompts (Sec. 3.2, Eq. 2–3)
# The tokenizer sees E placeholder words "X"; their embeddings are replaced by the learnable contexts. The class
# word is always "object". The end-of-text token, whose feature is the prompt's embedding, is at the argmax of
# the token ids. Deep prompts (length 4) overwrite tokens 1..4 before text layers 2..depth, rounded to fp16 as the
# reference's `.half()` does.

# %%
prompts = model.prompt_learner()
texts = model.prompt_learner.prompt_texts([])
token_table = pd.DataFrame(
    {"prompt": ["normal g_n", "abnormal g_a"], "text": texts,
     "first ids": [prompts.token_ids[i, :18].tolist() for i in range(2)],
     "EOT position": prompts.token_ids.argmax(-1).tolist()}
)
n_trainable = sum(p.numel() for p in model.prompt_learner.parameters())
print(f"learnable contexts {tuple(model.prompt_learner.contexts.shape)}, "
      f"{len(prompts.deep_prompts)} deep prompts of shape {tuple(prompts.deep_prompts[0].shape) if prompts.deep_prompts else ()}"
      f": {n_trainable} trainable numbers (ViT-L/14: 43 008)")
token_table

# %% [markdown]
# ## 2. DPAM: diagonally prominent attention (Sec. 3.3)
# CLIP's Q-K attention lets every patch attend to a few global "register-like" tokens, which blurs local
# semantics. Q-Q, K-K and V-V attention compare a token with tokens *like itself*, so the attention matrix is
# diagonally prominent and local features keep their own content. AnomalyCLIP adds a V-V side stream from layer
# 6 of 24 on (no MLP; the original stream is untouched) and reads the local tokens from it; the figure uses the
# layers of the backbone in use (printed above).

# %%
samples = load_split(cfg, dataset, split="test")
anomalous = [s for s in samples if s.label == 1]
sample = anomalous[sample_index % len(anomalous)]
batch = next(iter(batches([sample], cfg.image_size, batch_size=1)))
images = batch["image"].to(cfg.device)
layer = attention_layer or model.config.feature_layers[-1]


def attention_maps(model: AnomalyCLIP, images: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """Head-averaged attention probabilities (N+1, N+1) of every variant at `layer`, on the original stream."""
    visual = model.visual
    with torch.no_grad():
        hidden = visual.embed(images) if layer == 1 else visual(
            images, [layer - 1], tokens="raw", return_global=False).layer_tokens[0]
        block = visual.blocks[layer - 1]
        q, k, v = project_qkv(block.attn, block.ln_1(hidden))
        operands = {"q": q, "k": k, "v": v}
        scale = q.shape[-1] ** -0.5
        return {mode: (operands[mode[0]] @ operands[mode[1]].transpose(-1, -2) * scale).softmax(-1).mean(1)[0].cpu()
                for mode in ATTENTION_MODES}


def plot_attention(layer: int):
    maps = attention_maps(model, images, layer)
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
    for axis, (mode, matrix) in zip(axes, maps.items(), strict=True):
        axis.imshow(matrix, cmap="viridis")
        axis.set_title(f"{mode[0].upper()}-{mode[1].upper()} (layer {layer}): diagonal mass {matrix.diag().mean():.2f}",
                       fontsize=8)
        axis.set_xlabel("key token")
        axis.set_ylabel("query token")
    fig.suptitle("attention probabilities, averaged over heads (token 0 = CLS)", fontsize=9)
    fig.tight_layout()
    return fig, maps


fig, maps = plot_attention(layer)
cfg.save_figure(fig, output / "dpam_attention.png", dpi=100)
diagonal = pd.DataFrame(
    [{"layer": layer, "variant": f"{m[0].upper()}-{m[1].upper()}", "diagonal_mass": float(a.diag().mean()),
      "uniform_would_be": 1 / a.shape[0]} for m, a in maps.items()]
)
diagonal.to_csv(output / "attention_diagonal.csv", index=False)
diagonal

# %% [markdown]
# ## 3. Local features with and without DPAM
# The same prompts score the patch tokens of the original stream (Q-K) and of the V-V side stream.

# %%
no_dpam = cfg.build("anomalyclip", clip=clip, dpam_first_layer=None)
no_dpam.load_prompt_state(model.trainable_parameters())
with torch.no_grad():
    maps_by_variant = {"Q-K (no DPAM)": no_dpam.predict(images, [sample.class_name]).anomaly_maps[0].cpu(),
                       "V-V (DPAM)": model.predict(images, [sample.class_name]).anomaly_maps[0].cpu()}
mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
image_rgb = (batch["image"][0] * std + mean).clamp(0, 1).permute(1, 2, 0)
fig, axes = plt.subplots(1, 4, figsize=(12, 3))
panels = [(image_rgb, f"{sample.class_name}/{sample.defect}", None), (batch["mask"][0], "ground truth", "gray"),
          *[(m, name, "jet") for name, m in maps_by_variant.items()]]
for axis, (panel, title, cmap) in zip(axes, panels, strict=True):
    axis.imshow(panel, cmap=cmap)
    axis.set_title(title, fontsize=8)
    axis.axis("off")
fig.tight_layout()
cfg.save_figure(fig, output / "local_features_qk_vs_vv.png", dpi=100)

# %% [markdown]
# ## 4. One training step (Sec. 3.4, Eq. 4)
# L = CE(softmax(⟨f, g⟩/τ), label) + λ Σ_layers [Focal([S_n, S_a], S) + Dice(S_a, S) + Dice(S_n, 1 − S)] with
# λ = 4 on the top layer (the released setting), Adam(lr 1e-3, betas (0.5, 0.999)). Only the prompts learn;
# the image features are frozen (the training loop reads them from an on-disk cache).

# %%
train_samples = load_split(cfg, train_set, split="test")  # the reference trains on the auxiliary test split
train_batch = next(iter(batches(train_samples[:: max(1, len(train_samples) // cfg.batch_size)][: cfg.batch_size],
                                cfg.image_size, batch_size=cfg.batch_size)))
step_model = cfg.build("anomalyclip", clip=clip).train()
step_model.load_prompt_state(model.trainable_parameters())
optimizer = torch.optim.Adam(step_model.prompt_learner.parameters(), lr=1e-3, betas=(0.5, 0.999))
features = step_model.encode_image(train_batch["image"].to(cfg.device))
records = []
for step in range(2):
    losses = step_model.losses(features, train_batch["mask"], train_batch["label"], list(train_batch["class_name"]))
    records.append({"step": step, "total": float(losses["loss"].detach()), "global CE": float(losses["image"].detach()),
                    "λ·local": float(losses["local"].detach()),
                    **{f"layer {number} {term}": float(v.detach())
                       for number, row in zip(model.config.feature_layers, losses["per_layer"], strict=True)
                       for term, v in zip(("focal", "dice(S_a,S)", "dice(S_n,1-S)"), row, strict=True)}})
    if step == 0:
        optimizer.zero_grad()
        losses["loss"].backward()
        gradient_norms = {name: float(p.grad.norm()) for name, p in step_model.prompt_learner.named_parameters()}
        optimizer.step()
step_table = pd.DataFrame(records)
step_table.to_csv(output / "training_step.csv", index=False)
print("gradient norms:", {k: round(v, 4) for k, v in gradient_norms.items()})
step_table.T

# %% [markdown]
# ## 5. Anomaly maps
# Per layer: P = softmax(⟨tokens, [g_n, g_a]⟩ / 0.07), CLS dropped, the patch grid upsampled bilinearly,
# (P_a + 1 − P_n)/2; summed over the feature layers; then `gaussian_filter(σ = 4)`. The image score is
# P(g_a | global embedding) alone.

# %%
shown = [anomalous[(sample_index + i * max(1, len(anomalous) // n_figure_samples)) % len(anomalous)]
         for i in range(n_figure_samples)]
figure_batch = next(iter(batches(shown, cfg.image_size, batch_size=len(shown))))
with torch.no_grad():
    figure_features = model.encode_image(figure_batch["image"].to(cfg.device))
    text = model.encode_text()
    unsmoothed = model.anomaly_maps(figure_features.layer_tokens, text, smooth=False).cpu()
    prediction = model.score(figure_features, text)


def plot_maps(rows: list[int]):
    fig, axes = plt.subplots(len(rows), 4, figsize=(10, 2.6 * len(rows)), squeeze=False)
    for r, index in enumerate(rows):
        image = (figure_batch["image"][index] * std + mean).clamp(0, 1).permute(1, 2, 0)
        panels = [(image, f"{shown[index].class_name}/{shown[index].defect}", None),
                  (figure_batch["mask"][index], "ground truth", "gray"),
                  (unsmoothed[index], "Σ layers, before smoothing", "jet"),
                  (prediction.anomaly_maps[index].cpu(), f"σ=4, image score {prediction.image_scores[index]:.2f}", "jet")]
        for c, (panel, title, cmap) in enumerate(panels):
            axes[r, c].imshow(panel, cmap=cmap)
            axes[r, c].set_title(title, fontsize=8)
            axes[r, c].axis("off")
    fig.tight_layout()
    return fig


cfg.save_figure(plot_maps(list(range(len(shown)))), output / "anomaly_maps.png", dpi=100)

# %% [markdown]
# ## Explore (interactive sessions only)
# Pick a test image and the layer of the attention figure.

# %%
if interactive_session(interactive):
    import ipywidgets as widgets

    def explore(sample_number: int, layer_number: int) -> None:
        global images
        chosen = anomalous[sample_number % len(anomalous)]
        images = next(iter(batches([chosen], cfg.image_size, batch_size=1)))["image"].to(cfg.device)
        plot_attention(layer_number)
        plt.show()

    widgets.interact(explore, sample_number=widgets.IntSlider(0, 0, len(anomalous) - 1),
                     layer_number=widgets.IntSlider(layer, 1, model.visual.num_layers))
