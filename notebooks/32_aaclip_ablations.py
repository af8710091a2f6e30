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
# # AA-CLIP: the paper-vs-code switches as a grid
#
# Where the official code (Mwxinnn/AA-CLIP @ 53db195) and the paper differ, `AACLIPConfig` has a named option
# whose default is the code's behaviour (`zsadkit/methods/aaclip.py`, "Paper vs code"). Each row of the grid
# changes one switch from the reference configuration, trains both stages with the same protocol (paper: VisA →
# MVTec AD) and tests; every row says which reading it is:
#
# * **code**: the official code's behaviour (the reference row);
# * **paper**: the paper's reading where the code differs (stage-1 classification loss, all levels in stage 1,
#   the disentanglement loss per class before the mean, V-V attention per image, the last epoch);
# * **ablation**: a component switched off (no disentanglement loss, raw class names, a per-image score fusion).
#
# The only published ablation numbers are averages from a third-party summary of the paper (unverified, its
# training regime unstated): "+ text adapter" (no L_dis) and "+ disentangle loss (full AA-CLIP)". They are shown
# beside the closest rows. In the `smoke` profile (random tiny CLIP, synthetic data, a few training images, a
# stage-1 learning rate of 1e-3 so that one step moves the text side) the numbers only check the pipeline.

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
stage1_epochs = 1  # paper: 5
stage2_epochs = 1  # paper: 20
stage1_lr = 1e-5
stage2_lr = 5e-4
train_shots = 4  # training images per class ("full" for the paper's protocol)
variants = []  # names of the grid rows to run; empty: all
runs = []  # [[auxiliary set, [test sets]], ...]; empty: [["visa", ["mvtec"]]] or synthetic
cache_root = ""  # feature cache of stage 1; empty: .cache/features
retrain = False  # True: train from scratch even where checkpoints exist (the runner's --force sets it)
executor = "local"  # "dask": the grid's distinct trainings are tasks on a Dask cluster (zsadkit.grid.run_grid)
scheduler = ""  # Dask scheduler address for executor "dask"; "": a local cluster

# %%
import json
from dataclasses import replace

import matplotlib.pyplot as plt
import pandas as pd

from zsadkit.experiment import RunConfig, load_split
from zsadkit.grid import run_grid
from zsadkit.protocols import beside_published, domain, protocol, published_dataset_name, reported
from zsadkit.recipes.aaclip import STAGE1, STAGE2, choose_epoch, evaluate, fit, load_epoch, training_samples
from zsadkit.results import tidy, write_results

cfg = RunConfig.from_parameters(globals())
print(cfg.banner())
runs = runs or protocol("aaclip").runs_for(cfg.data_root, ablation=True)
output = cfg.output / "aaclip"
output.mkdir(parents=True, exist_ok=True)
clip = cfg.build("aaclip").clip
stage1 = replace(STAGE1, epochs=stage1_epochs, lr=stage1_lr, seed=cfg.train_seed, resume=not retrain)
stage2 = replace(STAGE2, epochs=stage2_epochs, lr=stage2_lr, seed=cfg.train_seed, resume=not retrain)

# %% [markdown]
# ## The grid
# (variant, reading, `AACLIPConfig` overrides, epoch policy, evaluation fusion, published ablation row)

# %%
GRID = [
    ("reference (official code)", "code", {}, "reference", None, "+ disentangle loss (full AA-CLIP)"),
    ("stage-1 classification loss", "paper", {"stage1_cls_loss": True}, "reference", None, None),
    ("stage 1 without the global embedding", "paper", {"stage1_add_global": False, "stage1_cls_loss": True},
     "reference", None, None),
    ("stage 1 on all levels", "paper", {"stage1_levels": "all"}, "reference", None, None),
    ("L_dis: mean of squared cosines", "paper", {"disentangle_reduction": "square_then_mean"}, "reference", None,
     None),
    ("V-V attention per image", "paper", {"vv_batch_mixing": False}, "reference", None, None),
    ("DPAM-style V-V side stream", "paper", {"surgery_path": "dual", "vv_batch_mixing": False}, "reference", None,
     None),
    ("last epoch (not chosen on test)", "paper", {}, "last", None, None),
    ("no disentanglement loss", "ablation", {"disentangle_weight": 0.0}, "reference", None, "+ text adapter"),
    ("raw class names", "ablation", {"class_names": "raw"}, "reference", None, None),
    ("per-image score fusion", "ablation", {}, "reference", "per_image", None),
]
grid = [row for row in GRID if not variants or row[0] in variants]
pd.DataFrame(grid, columns=["variant", "reading", "overrides", "epoch policy", "fusion", "published row"])

# %% [markdown]
# ## Train and test every row
# Rows that differ only in how they are evaluated (the epoch, the fusion) reuse the reference row's training: one
# grid cell per distinct (auxiliary set, overrides) training, which evaluates every row that shares it. Cells run
# serially or as Dask tasks (`executor`, `scheduler`) and are stored under aaclip/grid_cells/ablations/: a rerun
# computes only the missing ones; the rows keep the grid's order.

# %%
def train_and_test(cell: dict, clip, samples: dict) -> dict:
    """One training (the cell's overrides on its auxiliary set), then every grid row that shares it, on each test
    set: {variant: rows}."""
    train_set, overrides = cell["train_set"], cell["overrides"]
    model = cfg.build("aaclip", clip=clip, **overrides)
    folder = output / "ablation_checkpoints" / train_set / (
        "-".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "reference")
    run = fit(model, samples[train_set], stage1, stage2, checkpoint_dir=folder, cache_root=cache_root or None,
              device=cfg.device)
    frames = {}
    for row in cell["rows"]:
        choice = choose_epoch(row["policy"], stage2.epochs)
        checkpoint = load_epoch(model, run, choice.epoch)
        frames[row["variant"]] = []
        for test_set in cell["test_sets"]:
            result = evaluate(model, load_split(cfg, test_set, split="test", protocol="aaclip"), dataset=test_set,
                              domain=domain(test_set), batch_size=cfg.batch_size, device=cfg.device,
                              fusion=row["fusion"])
            result = result.assign(variant=row["variant"], reading=row["reading"], overrides=json.dumps(overrides),
                                   fusion=row["fusion"] or model.config.image_score_fusion, epoch=choice.epoch,
                                   epoch_selected_on_test=choice.selected_on_test)
            frames[row["variant"]].append(tidy(result, cfg.provenance(
                "aaclip", train_set=train_set, checkpoint=str(checkpoint), train_seed=cfg.train_seed)))
    return frames


samples, trainings = {}, {}
for train_set, test_sets in runs:
    samples[train_set] = training_samples(
        load_split(cfg, train_set, split="test", protocol="aaclip"),
        train_shots if train_shots == "full" else int(train_shots), seed=cfg.train_seed,
        write_to=output / f"ablation_train_samples_{train_set}.csv")
    for variant, reading, overrides, policy, fusion, _ in grid:
        cell = trainings.setdefault((train_set, json.dumps(overrides, sort_keys=True)),
                                    {"train_set": train_set, "test_sets": list(test_sets), "overrides": overrides,
                                     "rows": []})
        cell["rows"].append({"variant": variant, "reading": reading, "policy": policy, "fusion": fusion})
outcomes = run_grid(train_and_test, list(trainings.values()), store=output / "grid_cells" / "ablations",
                    shared={"clip": clip, "samples": samples},
                    context={**cfg.settings(), "stage1_epochs": stage1_epochs, "stage2_epochs": stage2_epochs,
                             "stage1_lr": stage1_lr, "stage2_lr": stage2_lr, "train_shots": train_shots},
                    executor=cfg.executor, scheduler=cfg.scheduler, resources=cfg.cell_resources, recompute=retrain)
frames = {(cell["train_set"], variant): rows for cell, outcome in zip(trainings.values(), outcomes, strict=True)
          for variant, rows in outcome.items()}
rows = [frame for train_set, _ in runs for variant, *_ in grid for frame in frames[(train_set, variant)]]
results = pd.concat(rows, ignore_index=True)
write_results(results, output / "ablations.csv")
table = reported(results[results.class_name == "mean"], "aaclip", pro=None)
(table.pivot_table(index=["variant", "reading"], columns=["dataset", "level", "metric"], values="value", sort=False)
 * 100).round(1)

# %% [markdown]
# ## Beside the published ablation (secondary source, averages over unstated sets)

# %%
published_names = {variant: name for variant, _, _, _, _, name in grid if name}
named = results[results.variant.isin(published_names)]
ours = (named[(named.class_name == "mean") & (named.metric == "auroc")]
        .groupby(["variant", "level"], as_index=False)["value"].mean())
ours = ours.assign(method=ours.variant.map(published_names), dataset="average", class_name="mean", metric="auroc",
                   note="")
comparison = beside_published(ours, "aaclip", reported_only=False)
comparison = comparison[comparison.dataset == "average"]
comparison.to_csv(output / "ablations_vs_published.csv", index=False)
comparison.round(1)

# %%
means = table[table.metric == "auroc"].assign(name=lambda f: f.variant + " (" + f.reading + ")")
fig, axis = plt.subplots(figsize=(8, 0.35 * len(grid) + 1.5))
for offset, level in ((-0.2, "pixel"), (0.2, "image")):
    values = means[means.level == level].groupby("name", sort=False)["value"].mean() * 100
    axis.barh([i + offset for i in range(len(values))], values.to_numpy(), height=0.4, label=f"{level} AUROC")
    axis.set_yticks(range(len(values)), values.index, fontsize=7)
axis.invert_yaxis()  # the grid's order, reference first
axis.set_xlabel(f"class-mean AUROC (%) on {', '.join(published_dataset_name(t) for _, tests in runs for t in tests)}")
axis.set_title("AA-CLIP paper-vs-code switches" + ("" if cfg.pretrained else "\n(random weights: pipeline check only)"),
               fontsize=9)
axis.legend(fontsize=7)
fig.tight_layout()
fig.savefig(output / "ablation_figure.png", dpi=100)
