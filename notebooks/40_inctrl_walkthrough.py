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
# # InCTRL, step by step
#
# A reading-group companion to *Toward Generalist Anomaly Detection via In-context Residual Learning with Few-shot
# Sample Prompts* (Zhu & Pang, CVPR 2024) and to `zsadkit/methods/inctrl.py`, which follows the official code
# (mala-lab/InCTRL @ cc535d0) and is checked against its outputs by `python -m zsadkit.verify inctrl`.
#
# One query image x and K normal images of its class (the *sample prompts*) go through the frozen CLIP:
#
# 1. **Multi-layer patch residual**: per tapped block (7, 9, 11 of ViT-B/16+), each query patch's distance
#    ½(1 − cos) to its nearest prompt patch; M_p = mean over blocks; s_p = max_j M_p(j).
# 2. **Image residual**: F_I = mean_k ψ(f_k) − ψ(f_x) through the trained adapter ψ; s_i = η(F_I).
# 3. **Text prior**: s_a = softmax(100 · cos(f_x, [t_normal, t_anomalous]))[anomalous], WinCLIP's prompt ensemble.
# 4. **Holistic head**: s_h = φ(M_p + s_i + s_a); the score s(x) = (s_h + s_p) / 2.
#
# Then the reference code's **batch reshape**: at batch > 1 it mixes samples and layers (a figure tags them).
#
# In the `smoke` profile the CLIP has **random weights**, the heads are untrained (unless `checkpoint` is given)
# and the data are synthetic: every number and map below only shows the mechanics. Opened in JupyterLab or
# VS Code, widgets pick the query and K (never in a batch run).

# %% tags=["parameters"]
profile = "smoke"
backbone = "zsad-tiny"
pretrained = ""
image_size = 112
data_root = ""
out_dir = ""
device = "cpu"
backbone_seed = 0
train_seed = 0  # seed of the untrained heads and of the prompt draw
batch_size = 4  # batch of the layout comparison
inctrl_backbone = ""  # "": the run's backbone; paper: ViT-B-16-plus-240
inctrl_pretrained = ""  # paper: laion400m_e32
inctrl_image_size = 0  # 0: the run's image size; paper: 240
dataset = ""  # test images; empty: synth-target (smoke) or visa (paper)
checkpoint = ""  # trained heads (.safetensors, or an official checkpoint_N.pyth); empty: untrained heads
shots = 2  # K
query_index = 0  # which anomalous test image is the query
interactive = None  # widgets to pick the query and K; None: only in JupyterLab/VS Code, never in a batch run

# %%
import warnings

import matplotlib.pyplot as plt
import pandas as pd
import torch

from zsadkit.data import batches
from zsadkit.data.transforms import OPENAI_MEAN, OPENAI_STD
from zsadkit.engine import sample_references
from zsadkit.experiment import RunConfig, interactive_session, load_split
from zsadkit.methods.inctrl import arrange_tokens
from zsadkit.protocols import protocol
from zsadkit.recipes.inctrl import protocol_samples

cfg = RunConfig.from_parameters(globals())
print(cfg.banner())
inctrl_cfg = cfg.with_backbone(inctrl_backbone, inctrl_pretrained or None, inctrl_image_size)
dataset = dataset or ("synth-target" if not cfg.data_root else "visa")
resize = protocol("inctrl").resize if cfg.data_root else "squash"  # the synthetic images are square
output = cfg.output / "inctrl" / "walkthrough"
output.mkdir(parents=True, exist_ok=True)


def load(name: str, split: str):
    return protocol_samples(lambda d, s: load_split(cfg, d, s, protocol="inctrl"), name, split)


clip = inctrl_cfg.load_backbone()
model = inctrl_cfg.build("inctrl", clip=clip, checkpoint=checkpoint)
print(inctrl_cfg.banner(), "|", model.config)
test, train = load(dataset, "test"), load(dataset, "train")
anomalous = [s for s in test if s.label == 1]
size = model.image_size


def images_of(samples):
    return next(iter(batches(samples, size, len(samples), resize=resize)))["image"].to(cfg.device)


def show(image: torch.Tensor):
    mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
    return (image.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def episode(index: int, k: int):
    query = anomalous[index % len(anomalous)]
    prompts = sample_references(train, query.class_name, k, seed=cfg.train_seed)
    model.fit_references(images_of(prompts))
    query_images = images_of([query])
    output_ = model.score_features(model.encode_image(query_images), [query.class_name])
    return query, prompts, query_images, output_


query, prompts, query_images, result = episode(query_index, shots)
print(f"query {query.image} ({query.class_name}, {query.defect}); prompts: {[p.image for p in prompts]}")

# %% [markdown]
# ## 1–4. The residual maps, the scores and the final score
# Top: the query and its K prompts. Bottom: r_l per tapped block, M_p (their mean) and M_h (M_p + s_i + s_a, the
# holistic head's input), on the patch grid. Right: the scalar scores.

# %%
grid = model.visual.grid_size


def plot_episode(query, prompts, query_images, result):
    layers = model.config.layers
    columns = max(len(prompts) + 1, len(layers) + 2) + 1
    fig, axes = plt.subplots(2, columns, figsize=(2.3 * columns, 4.9))
    axes[0, 0].imshow(show(query_images[0]))
    axes[0, 0].set_title(f"query ({query.defect})", fontsize=8)
    for index, image in enumerate(images_of(prompts)):
        axes[0, index + 1].imshow(show(image))
        axes[0, index + 1].set_title(f"prompt {index + 1}", fontsize=8)
    maps = [(f"r (block {layer})", result.layer_residuals[0, i]) for i, layer in enumerate(layers)]
    maps += [("M_p", result.patch_map[0]), ("M_h", result.holistic_map[0])]
    for index, (title, values) in enumerate(maps):
        shown = axes[1, index].imshow(values.reshape(grid, grid).cpu(), cmap="magma")
        axes[1, index].set_title(title, fontsize=8)
        fig.colorbar(shown, ax=axes[1, index], fraction=0.046)
    for axis in axes.flat:
        axis.axis("off")
    scores = {"s_p": result.patch_score, "s_i": result.image_score, "s_a": result.text_score,
              "s_h": result.holistic_score, "s(x)": result.final_score}
    bar_axis = axes[0, -1]
    bar_axis.axis("on")
    bar_axis.barh(list(scores), [float(value[0]) for value in scores.values()], color="tab:blue")
    bar_axis.set_xlim(0, 1)
    bar_axis.set_xlabel("score", fontsize=8)
    bar_axis.set_title("scores", fontsize=8)
    bar_axis.tick_params(labelsize=7)
    fig.suptitle(f"{inctrl_cfg.banner()}\nK = {len(prompts)}, class {query.class_name}", fontsize=7)
    fig.tight_layout()
    return fig, scores


figure, scores = plot_episode(query, prompts, query_images, result)
figure.savefig(output / "residual_maps.png", dpi=100)
score_table = pd.DataFrame({"score": list(scores), "value": [float(v[0]) for v in scores.values()]})
score_table.to_csv(output / "scores.csv", index=False)
score_table

# %% [markdown]
# ## The reference's batch reshape
# The reference stacks the per-layer query tokens as (layers, batch, ...) and the prompt tokens shot-major, then
# **reshapes** them to (batch, layers, ...) (model.py:521-524). Below, every token carries the tag of the sample
# and layer it came from; each cell shows the tags a (sample, layer) slot receives. At batch 1 both layouts agree.

# %%
batch_for_tags, shots_for_tags = 2, 2
tag_query = torch.zeros(batch_for_tags, 3, 1, 1)
tag_prompts = torch.zeros(batch_for_tags, shots_for_tags, 3, 1, 1)
for b in range(batch_for_tags):
    for layer in range(3):
        tag_query[b, layer] = 10 * b + layer
        for s in range(shots_for_tags):
            tag_prompts[b, s, layer] = 10 * b + layer
tag_embeddings = torch.arange(batch_for_tags * shots_for_tags, dtype=torch.float32).view(batch_for_tags,
                                                                                         shots_for_tags, 1)
rows = []
for layout in ("per_sample", "reference"):
    queries, pools, embeddings = arrange_tokens(tag_query, tag_prompts, tag_embeddings, layout)
    for b in range(batch_for_tags):
        for layer in range(3):
            rows.append({"layout": layout, "sample": b, "slot (layer)": layer,
                         "query tokens from (sample, layer)": f"({int(queries[b, layer, 0, 0]) // 10}, "
                                                              f"{int(queries[b, layer, 0, 0]) % 10})",
                         "prompt pool from (sample, layer)": sorted({(int(v) // 10, int(v) % 10)
                                                                     for v in pools[b, layer].flatten()})})
layout_table = pd.DataFrame(rows)
layout_table.to_csv(output / "batch_reshape.csv", index=False)

fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
for axis, layout in zip(axes, ("per_sample", "reference"), strict=True):
    queries, _, _ = arrange_tokens(tag_query, tag_prompts, tag_embeddings, layout)
    values = queries[:, :, 0, 0]
    axis.imshow((values.numpy() // 10) * 3 + values.numpy() % 10, cmap="tab10", vmin=0, vmax=9)
    for b in range(batch_for_tags):
        for layer in range(3):
            tag = int(values[b, layer])
            axis.text(layer, b, f"sample {tag // 10}\nblock {tag % 10 + 1} of 3", ha="center", va="center",
                      fontsize=8, color="white")
    axis.set_xticks(range(3), [f"slot {i}" for i in range(3)])
    axis.set_yticks(range(batch_for_tags), [f"sample {b}" for b in range(batch_for_tags)])
    axis.set_xlabel("layer slot the code uses")
    axis.set_ylabel("batch position")
    axis.set_title(f"query tokens, {layout} layout", fontsize=9)
fig.suptitle("Which (sample, tapped block) each slot receives at batch 2 (index bookkeeping: no weights involved)",
             fontsize=9)
fig.tight_layout()
fig.savefig(output / "batch_reshape.png", dpi=100)
layout_table

# %% [markdown]
# The consequence on scores: at batch > 1 the reference layout changes every sample's score, the per-sample layout
# does not (BatchNorm in eval mode is per sample).

# %%
queries = [s for s in test if s.class_name == query.class_name][:batch_size]
reference_model = inctrl_cfg.build("inctrl", clip=clip, checkpoint=checkpoint, batch_reshape="reference")
score_rows = []
for name, detector in (("per_sample", model), ("reference", reference_model)):
    detector.fit_references(images_of(sample_references(train, queries[0].class_name, shots, seed=cfg.train_seed)))
    names = [queries[0].class_name] * len(queries)
    with warnings.catch_warnings(record=True) as caught:  # the reference layout warns at batch > 1, on purpose here
        warnings.simplefilter("always")
        batched = detector.predict(images_of(queries), names).image_scores
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"{name} layout, as expected: {message}")
    single = torch.cat([detector.predict(images_of([q]), names[:1]).image_scores for q in queries])
    score_rows += [{"layout": name, "query": i, "batch 1": float(single[i]), f"batch {len(queries)}": float(batched[i]),
                    "|difference|": float((batched[i] - single[i]).abs())} for i in range(len(queries))]
layout_scores = pd.DataFrame(score_rows)
layout_scores.to_csv(output / "batch_layout_scores.csv", index=False)
layout_scores.round(5)

# %% [markdown]
# ## Explore (interactive sessions only)
# Pick the query and K.

# %%
if interactive_session(interactive):
    import ipywidgets as widgets

    def explore(query_number: int, k: int) -> None:
        plot_episode(*episode(query_number, k))
        plt.show()

    widgets.interact(explore, query_number=widgets.IntSlider(query_index, 0, len(anomalous) - 1),
                     k=widgets.IntSlider(shots, 1, 8))
print(f"outputs in {output}: {sorted(p.name for p in output.iterdir())}")
