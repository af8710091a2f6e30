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
# # HeadCLIP's unknowns as a grid: which readings of the abstract matter
#
# **HeadCLIP is a reconstruction** (`fidelity = reconstructed`): the abstract of arXiv 2505.22259 names learnable
# head weights (LHW) and a joint anomaly score (JAS) but not their form. Each reading is a switch of
# `HeadCLIPConfig`, and this notebook trains and tests the grid of them, so that a reader sees which choices
# change the result:
#
# | switch | values | the abstract's words |
# |---|---|---|
# | `lhw_parameterisation` | scalar w = α; H·softmax_h(α); 2·sigmoid(α); conditional 2·sigmoid(MLP(CLS)) | "dynamically adjust the features held by each attention head" |
# | `lhw_placement` | Q-K residual stream; V-V (DPAM) side stream; both | "learnable head weights to the image encoder" |
# | `lhw_layers` | all; the four tapped blocks (6/12/18/24 of 24); the last N | – |
# | JAS (scoring only) | β, pool max / top-k % mean, per-class min-max, additive / multiplicative | "joint anomaly score that utilizes … pixel-level information for image-level anomaly detection" |
#
# `grid = "one_at_a_time"` varies one switch at a time around the defaults (scalar, both, all); `"full"` trains
# every combination. JAS settings change the image score only, so each trained model is scored once and every
# JAS setting is computed from the same pass. Two references: the untrained model (identity head weights and the
# initial prompts) and AnomalyCLIP trained the same way (prompts only: what LHW adds is the difference).
# Protocol: the `headclip` protocol's two directions (VisA → MVTec AD, MVTec AD → VisA). In the `smoke` profile
# the numbers only check the pipeline.

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
epochs = 1  # paper: 15
train_batch_size = 8
learning_rate = 0.001
train_seed = 111
subsample = 1  # keep every n-th training and test image (smoke speed)
runs = []  # empty: the headclip protocol's ablation runs (zsadkit/protocols.yaml), or synthetic
grid = "one_at_a_time"  # or "full": every combination of the three LHW switches
parameterisations = ["scalar", "softmax", "sigmoid", "conditional"]  # the first of each list is the base
placements = ["both", "qk", "vv"]
layer_choices = ["all", "tapped", "last"]
last_n = 6  # N of "last" (smoke: 2 of the tiny model's 4 layers)
jas_settings = {
    "β=0.5, max": {"jas_beta": 0.5, "jas_pool": "max"},
    "β=0.5, top-1% mean": {"jas_beta": 0.5, "jas_pool": "topk_mean", "jas_topk_percent": 1.0},
    "β=0.5, max, per-class min-max": {"jas_beta": 0.5, "jas_pool": "max", "jas_normalize": "minmax_per_class"},
    "β=0.5, max, multiplicative": {"jas_beta": 0.5, "jas_pool": "max", "jas_mode": "multiplicative"},
    "β=1 (global only)": {"jas_beta": 1.0},
    "β=0 (map only, max)": {"jas_beta": 0.0, "jas_pool": "max"},
}
mad_pixel_metrics = []  # empty: the protocol's (AUROC, PRO)
mad_image_metrics = []  # empty: the protocol's (AUROC, AP)
pro = "cflow200"
cache_root = ""
cache_dtype = "float32"
executor = "local"  # "dask": the (auxiliary set, variant) cells are tasks on a Dask cluster (zsadkit.grid.run_grid)
retrain = False  # True: recompute every grid cell even where stored (the runner's --force sets it)
scheduler = ""  # Dask scheduler address for executor "dask"; "": a local cluster

# %%
import itertools
import json

import matplotlib.pyplot as plt
import pandas as pd

from zsadkit.experiment import RunConfig, load_split
from zsadkit.grid import run_grid
from zsadkit.methods.headclip import FIDELITY
from zsadkit.protocols import protocol
from zsadkit.recipes import anomalyclip as anomalyclip_recipe
from zsadkit.recipes.headclip import evaluate_jas, fidelity_of, fit, mad_metrics, mad_rows
from zsadkit.results import tidy, write_results
from zsadkit.training import TrainConfig

cfg = RunConfig.from_parameters(globals())
print(cfg.banner())
runs = runs or protocol("headclip").runs_for(cfg.data_root, ablation=True)
output = cfg.output / "headclip"
output.mkdir(parents=True, exist_ok=True)
clip = cfg.load_backbone()
definition = mad_metrics(pro)
definition.update({level: [tuple(pair) for pair in pairs]
                   for level, pairs in (("pixel", mad_pixel_metrics), ("image", mad_image_metrics)) if pairs})
print("mAD definition:", {level: "+".join(f"{lv}/{m}" for lv, m in pairs) for level, pairs in definition.items()})

# %% [markdown]
# ## The grid

# %%
axes_values = {"lhw_parameterisation": parameterisations, "lhw_placement": placements, "lhw_layers": layer_choices}
base = {name: values[0] for name, values in axes_values.items()}
if grid == "full":
    combinations = [dict(zip(axes_values, values, strict=True)) for values in itertools.product(*axes_values.values())]
elif grid == "one_at_a_time":
    combinations = [base] + [{**base, name: value} for name, values in axes_values.items() for value in values[1:]]
else:
    raise ValueError(f"grid must be 'one_at_a_time' or 'full', got {grid!r}")


def label(switches: dict) -> str:
    return " / ".join(str(switches[name]) for name in axes_values)


print(f"{len(combinations)} trained variants × {len(jas_settings)} JAS settings; base: {label(base)}")

# %% [markdown]
# ## Run
# Every variant is trained with the same schedule and seed; the image-encoder blocks before its first weighted
# layer come from the feature cache. One grid cell per (auxiliary set, variant), the untrained model and the
# AnomalyCLIP reference included, computed serially or as Dask tasks (`executor`, `scheduler`) and stored under
# headclip/grid_cells/switches/: a rerun computes only the missing cells; the rows keep the grid's order.

# %%
def train_and_test(cell: dict, clip) -> pd.DataFrame:
    """One variant: train it on the auxiliary set (unless untrained), test it on each test set under every JAS
    setting (HeadCLIP) or with its own score (the AnomalyCLIP reference)."""
    train_samples = load_split(cfg, cell["train_set"], split="test")[::subsample]
    train_config = TrainConfig(epochs=epochs, batch_size=train_batch_size, lr=learning_rate, seed=cfg.train_seed)
    frames = []
    if cell["method"] == "anomalyclip":
        anomalyclip = cfg.build("anomalyclip", clip=clip)
        anomalyclip_recipe.fit(anomalyclip, train_samples, train_config, cache_root=cache_root or None,
                               cache_dtype=cache_dtype, device=cfg.device)
        for test_set in cell["test_sets"]:
            rows = anomalyclip_recipe.evaluate(anomalyclip, load_split(cfg, test_set, split="test")[::subsample],
                                               dataset=test_set, batch_size=cfg.batch_size, device=cfg.device,
                                               pro=pro, cache_root=cache_root or None, cache_dtype=cache_dtype)
            frames.append(tidy(rows, cfg.provenance("anomalyclip", train_set=cell["train_set"],
                                                    train_seed=cfg.train_seed))
                          .assign(variant=cell["variant"], jas="global only (its own score)", overrides="{}",
                                  fidelity=fidelity_of("anomalyclip")))
        return pd.concat(frames, ignore_index=True)
    switches = {name: cell["switches"][name] for name in axes_values}  # the axes' order (cells sort their keys)
    model = cfg.build("headclip", clip=clip, lhw_last_n=last_n, **switches)
    if cell["trained"]:
        fit(model, train_samples, train_config, cache_root=cache_root or None, cache_dtype=cache_dtype,
            device=cfg.device)
    provenance = cfg.provenance("headclip", train_set=cell["train_set"] if cell["trained"] else "none",
                                train_seed=cfg.train_seed)
    for test_set in cell["test_sets"]:
        rows = evaluate_jas(model, load_split(cfg, test_set, split="test")[::subsample], jas_settings,
                            dataset=test_set, batch_size=cfg.batch_size, device=cfg.device, pro=pro,
                            cache_root=cache_root or None, cache_dtype=cache_dtype)
        frames.append(tidy(rows, provenance).assign(variant=cell["variant"], overrides=json.dumps(switches),
                                                    fidelity=FIDELITY, **switches))
    return pd.concat(frames, ignore_index=True)


entries = [("untrained (identity head weights)", base, False)] + [(label(c), c, True) for c in combinations]
cells = [cell for train_set, test_sets in runs for cell in (
    [{"train_set": train_set, "test_sets": list(test_sets), "method": "headclip", "variant": variant,
      "switches": switches, "trained": trained} for variant, switches, trained in entries]
    + [{"train_set": train_set, "test_sets": list(test_sets), "method": "anomalyclip",
        "variant": "AnomalyCLIP (trained prompts only)"}])]
all_rows = run_grid(train_and_test, cells, store=output / "grid_cells" / "switches", shared={"clip": clip},
                    context={**cfg.settings(), "epochs": epochs, "train_batch_size": train_batch_size,
                             "learning_rate": learning_rate, "subsample": subsample, "last_n": last_n,
                             "jas_settings": jas_settings, "pro": pro, "cache_dtype": cache_dtype},
                    executor=cfg.executor, scheduler=cfg.scheduler, resources=cfg.cell_resources, recompute=retrain)
results = pd.concat(all_rows, ignore_index=True)
write_results(results, output / "switches.csv")
print(f"wrote {output / 'switches.csv'}" + ("; random weights: pipeline check only" if not cfg.pretrained else ""))

# %% [markdown]
# ## mAD per level for every variant (definition beside every value)
# Pixel mAD does not depend on the JAS setting; image mAD does.

# %%
mad_frame = mad_rows(results, definition, by=("variant", "jas", "train_set", "method", "fidelity"))
mad_frame.to_csv(output / "switches_mad.csv", index=False)
means = mad_frame[mad_frame.class_name == "mean"]
(means.pivot_table(index=["variant"], columns=["level", "jas"], values="value", sort=False) * 100).round(1)

# %%
summary = means.groupby(["level", "variant", "jas"], sort=False)["value"].mean().mul(100).reset_index()
variants = list(dict.fromkeys(summary.variant))
fig, axes = plt.subplots(1, 2, figsize=(13, 0.4 * len(variants) + 3.2), sharey=True)
for axis, level in zip(axes, ("pixel", "image"), strict=True):
    part = summary[summary.level == level]
    if level == "pixel":  # the same for every JAS setting
        part = part.groupby("variant", sort=False)["value"].first().reset_index().assign(jas="any JAS setting")
    for setting in dict.fromkeys(part.jas):
        points = part[part.jas == setting].set_index("variant").reindex(variants)
        axis.plot(points.value, range(len(variants)), marker="o", linestyle="none", alpha=0.8, label=setting)
    axis.set_yticks(range(len(variants)), variants, fontsize=7)
    definition_text = sorted(set(means[means.level == level].metrics))
    axis.set_xlabel(f"{level} mAD (%), mean over test sets: {definition_text[0] if definition_text else ''}", fontsize=8)
    axis.set_title(f"{level} level", fontsize=9)
    axis.grid(axis="x", alpha=0.3)
    axis.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, title="JAS setting",
                title_fontsize=7)
axes[0].invert_yaxis()  # the y axis is shared: invert it once
axes[0].set_ylabel("variant (parameterisation / placement / layers)")
fig.suptitle(f"HeadCLIP switches (fidelity: {FIDELITY}). {cfg.banner()}", fontsize=7, wrap=True)
fig.tight_layout()
fig.savefig(output / "switches.png", dpi=100)
