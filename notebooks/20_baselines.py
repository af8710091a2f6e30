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
# # Baselines of AnomalyCLIP's Tables 1 and 2: CLIP, CLIP-AC, WinCLIP, VAND, CoOp (+ WinCLIP+ at K = 1, 2, 4)
#
# AnomalyCLIP compares against five baselines whose code it does not ship (App. A.2). Each is a method in zsadkit,
# run here under AnomalyCLIP's protocol: methods that learn something (VAND's projections, CoOp's context) are
# trained on the **test split** of an auxiliary dataset and tested zero-shot on the others (trained on VisA →
# tested on MVTec AD; trained on MVTec AD → tested on every other dataset). Training-free methods (CLIP,
# CLIP-AC, WinCLIP) are simply tested on every dataset.
#
# | method | module | what is specific |
# |---|---|---|
# | CLIP | `zsadkit.methods.clip_baseline` | "a photo of a normal/an anomalous [cls]", Eq. 1 on global and patch embeddings |
# | CLIP-AC | same | the class embedding averaged over CLIP's 80 ImageNet templates |
# | WinCLIP | `zsadkit.methods.winclip` | compositional prompts, 2×2 and 3×3 masked-token windows, harmonic fusion |
# | VAND | `zsadkit.methods.vand` | trained linear projections of layers 6/12/18/24, focal + dice |
# | CoOp | `zsadkit.methods.coop` | learnable "[V1..V16] normal/anomalous [cls]", trained and scored like AnomalyCLIP |
#
# Assumptions (module docstrings give the details): CLIP/CLIP-AC use last-layer patch tokens through `ln_post` and
# `proj`, τ = 0.07 and AnomalyCLIP's σ = 4 smoothing; WinCLIP keeps its paper settings (ViT-B/16+ at 240 px,
# τ = 0.01, no smoothing); VAND keeps its reference settings (ViT-L/14@336 at 518 px, τ = 0.01, no smoothing).
#
# The `smoke` profile uses a random tiny CLIP and the synthetic datasets (`synth-aux` for training,
# `synth-target` for testing): **its numbers only check the pipeline**.

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
methods = ["clip", "clip-ac", "winclip", "vand", "coop"]
runs = []  # [[auxiliary set, [test sets]], ...]; empty: the paper protocol (zsadkit/protocols.yaml), or synthetic
vand_epochs = {"mvtec": 3, "visa": 15}  # reference train.sh; other training sets use `epochs`
coop_epochs = 2  # paper: 15 (not stated; AnomalyCLIP's schedule)
coop_optimizer = "coop"  # "coop": CoOp's SGD + cosine (AnomalyCLIP App. A.2); "anomalyclip": AnomalyCLIP's Adam
epochs = 2  # VAND epochs on training sets not in vand_epochs (smoke)
train_batch_size = 8
train_seed = 111  # VAND's projections and CoOp's contexts: initialisation and data order
few_shot_seed = 0  # WinCLIP+'s reference draws
retrain = False  # True: train from scratch even where checkpoints exist (the runner's --force sets it)
winclip_backbone = ""  # "": the run's backbone; paper: ViT-B-16-plus-240
winclip_pretrained = ""  # paper: laion400m_e31
winclip_image_size = 0  # 0: the run's image size; paper: 240
winclip_profile = "mala"
shots = [1, 2, 4]  # WinCLIP+ reference images per class
pro = "cflow200"
executor = "local"  # "dask": WinCLIP+'s (test set, K) cells are tasks on a Dask cluster (zsadkit.grid.run_grid)
scheduler = ""  # Dask scheduler address for executor "dask"; "": a local cluster

# %%
import matplotlib.pyplot as plt
import pandas as pd

from zsadkit.engine import evaluate, evaluate_few_shot, predict
from zsadkit.experiment import RunConfig, load_split
from zsadkit.protocols import (
    beside_published,
    paper_tables,
    protocol,
    published_dataset_name,
    published_method_name,
)
from zsadkit.recipes import coop as coop_recipe
from zsadkit.recipes.vand import VandTrainingConfig, train_vand
from zsadkit.results import tidy, wide_table, write_results

cfg = RunConfig.from_parameters(globals())
print(cfg.banner())
runs = runs or protocol("anomalyclip").runs_for(cfg.data_root)
test_sets = sorted({name for _, tests in runs for name in tests})
winclip_cfg = cfg.with_backbone(winclip_backbone, winclip_pretrained or None, winclip_image_size)
output = cfg.output / "baselines"
output.mkdir(parents=True, exist_ok=True)
print("runs:", runs, "| WinCLIP:", winclip_cfg.backbone, winclip_cfg.weights_label, winclip_cfg.image_size)


def score(detector, test_set: str, size: int) -> pd.DataFrame:
    samples = load_split(cfg, test_set, split="test")
    return evaluate(detector, samples, dataset=test_set, image_size=size, batch_size=cfg.batch_size,
                    device=cfg.device, pro=pro)


# %% [markdown]
# ## Training-free baselines: CLIP, CLIP-AC, WinCLIP

# %%
all_rows = []
for method in [m for m in methods if m in ("clip", "clip-ac")]:
    detector = cfg.build(method)
    for test_set in test_sets:
        all_rows.append(tidy(score(detector, test_set, cfg.image_size), cfg.provenance(method)))
        print(f"{method}: {test_set} done")
if "winclip" in methods:
    winclip = winclip_cfg.build("winclip", profile=winclip_profile)
    for test_set in test_sets:
        all_rows.append(tidy(score(winclip, test_set, winclip_cfg.image_size), winclip_cfg.provenance("winclip")))
        print(f"winclip: {test_set} done")

# %% [markdown]
# ## Learned baselines: VAND and CoOp, trained on each auxiliary set's test split

# %%
training_logs = []
for train_set, tests in runs:
    train_samples = load_split(cfg, train_set, split="test")
    if "vand" in methods:
        vand = cfg.build("vand")
        n_epochs = vand_epochs.get(train_set, epochs)
        result = train_vand(vand, train_samples, VandTrainingConfig(
            epochs=n_epochs, batch_size=train_batch_size, seed=cfg.train_seed,
            checkpoint_dir=str(output / "checkpoints" / f"vand_{train_set}"), resume=not retrain))
        checkpoint = vand.save_projections(output / f"vand_projections_{train_set}.safetensors",
                                           metadata={"train_set": train_set, "epochs": str(n_epochs)})
        training_logs += [{"method": "vand", "train_set": train_set, "epoch": row["epoch"], "loss": row["loss"]}
                          for row in result.log]
        for test_set in tests:
            all_rows.append(tidy(score(vand, test_set, cfg.image_size), cfg.provenance(
                "vand", train_set=train_set, checkpoint=checkpoint, train_seed=cfg.train_seed)))
        print(f"vand: {result.describe()} on {train_set}, tested on {tests}")
    if "coop" in methods:
        coop = cfg.build("coop")
        result = coop_recipe.fit(coop, train_samples, coop_recipe.train_config(
            coop_optimizer, epochs=coop_epochs, seed=cfg.train_seed,
            checkpoint_dir=str(output / "checkpoints" / f"coop_{train_set}"), resume=not retrain), device=cfg.device)
        checkpoint = coop.save_prompts(output / f"coop_prompts_{train_set}.safetensors",
                                       metadata={"train_set": train_set, "epochs": str(coop_epochs)})
        training_logs += [{"method": "coop", "train_set": train_set, "epoch": row["epoch"], "loss": row["loss"]}
                          for row in result.log]
        for test_set in tests:
            all_rows.append(tidy(score(coop, test_set, cfg.image_size), cfg.provenance(
                "coop", train_set=train_set, checkpoint=checkpoint, train_seed=cfg.train_seed)))
        print(f"coop: trained {coop_epochs} epochs on {train_set}, tested on {tests}")
results = pd.concat(all_rows, ignore_index=True)
pd.DataFrame(training_logs).to_csv(output / "training_log.csv", index=False)
write_results(results, output / "results.csv")

# %% [markdown]
# ## Tables 1 (industrial) and 2 (medical): the baseline columns

# %%
tables = paper_tables(results, "anomalyclip", pro)
for name, table in tables.items():
    write_results(table, output / f"{name}.csv")
    if not len(table):
        print(f"{name}.csv is empty: none of this run's test sets {test_sets} is "
              f"{protocol('anomalyclip').tables[name]}")
if not cfg.pretrained:
    print("RANDOM weights: these numbers check the pipeline only and say nothing about the methods.")
table = pd.concat(tables.values())
means = table[table.class_name == "mean"]
wide_table(means, ["dataset", "level", "metric"], "method")

# %% [markdown]
# ## Beside the published values (AnomalyCLIP Tables 1 and 2, dataset means in percent)
# Rows present on one side only keep NaN on the other (e.g. the synthetic datasets of the smoke profile).

# %%
comparison = beside_published(results, "anomalyclip", pro=pro)
comparison.to_csv(output / "tables_vs_published.csv", index=False)
comparison.round(1)

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
for axis, level in zip(axes, ("image", "pixel"), strict=True):
    view = means[(means.level == level) & (means.metric == "auroc")]
    view.pivot_table(index="dataset", columns="method", values="value").plot.bar(ax=axis, rot=0)
    axis.set_title(f"{level} AUROC (class mean)")
    axis.axhline(0.5, color="grey", lw=0.8, ls="--")
fig.tight_layout()
cfg.save_figure(fig, output / "baselines_auroc.png")

# %% [markdown]
# ## WinCLIP+ with K = 1, 2, 4 normal reference images per class
# References: K normal images of the class's **train** split, drawn without replacement with a seeded generator
# (`sample_references`). Image score ½·(ascore₀ + max M_W); map ½·(zero-shot map + M_W).

# %%
# One grid cell per (test set, K), computed serially or as Dask tasks (`executor`, `scheduler`) and stored as it
# finishes under baselines/grid_cells/; rows in the grid's order.
from zsadkit.grid import run_grid


def winclip_plus(cell: dict, winclip) -> pd.DataFrame:
    """WinCLIP+ with K = cell["shots"] references per class, on one test set; the references are cleared after."""
    try:
        rows = evaluate_few_shot(winclip, load_split(cfg, cell["dataset"], split="test"),
                                 load_split(cfg, cell["dataset"], split="train"), cell["shots"],
                                 dataset=cell["dataset"], image_size=winclip_cfg.image_size,
                                 batch_size=cfg.batch_size, device=cfg.device, seed=few_shot_seed, pro=pro)
    finally:
        winclip.clear_references()
    return tidy(rows, winclip_cfg.provenance("winclip+", shots=cell["shots"], reference_seed=few_shot_seed))


few_shot_rows = []
if "winclip" in methods and shots:
    few_shot_rows = run_grid(
        winclip_plus, [{"dataset": test_set, "shots": k} for test_set in test_sets for k in shots],
        store=output / "grid_cells" / "winclip_few_shot", shared={"winclip": winclip},
        context={**winclip_cfg.settings(), "winclip_profile": winclip_profile, "few_shot_seed": few_shot_seed,
                 "pro": pro},
        executor=cfg.executor, scheduler=cfg.scheduler, resources=cfg.cell_resources)
few_shot = pd.concat(few_shot_rows, ignore_index=True) if few_shot_rows else pd.DataFrame()
if len(few_shot):
    write_results(few_shot, output / "winclip_few_shot.csv")
    few_comparison = beside_published(few_shot, "anomalyclip", pro=pro, source="baselines_reported_reference",
                                      on=["method", "dataset", "class_name", "level", "metric", "shots"],
                                      reported_only=False)
    few_comparison.to_csv(output / "winclip_few_shot_vs_published.csv", index=False)
    fig, axis = plt.subplots(figsize=(5, 3.4))
    ours_few = few_shot[(few_shot.class_name == "mean") & (few_shot.metric == "auroc")]
    for (dataset, level), group in ours_few.groupby(["dataset", "level"]):
        axis.plot(group.shots, group.value * 100, marker="o", label=f"{published_dataset_name(dataset)} {level}")
    axis.set_xlabel("K (reference images per class)")
    axis.set_ylabel("AUROC (%)")
    axis.set_xticks(shots)
    axis.legend(fontsize=7)
    axis.set_title("WinCLIP+", fontsize=9)
    fig.tight_layout()
    cfg.save_figure(fig, output / "winclip_few_shot.png")
    display_frame = few_comparison.dropna(subset=["ours"]).round(1)
else:
    display_frame = pd.DataFrame()
display_frame

# %% [markdown]
# ## What the maps look like
# One anomalous test image per method (min-max scaled per image).

# %%
example_set = test_sets[0]
samples = [s for s in load_split(cfg, example_set, split="test") if s.label == 1][:1]
detectors = {}
if "clip" in methods or "clip-ac" in methods:
    for name in [m for m in methods if m in ("clip", "clip-ac")]:
        detectors[name] = cfg.build(name)
if "winclip" in methods:
    detectors["winclip"] = winclip
if "vand" in methods:
    detectors["vand"] = vand
if "coop" in methods:
    detectors["coop"] = coop
fig, axes = plt.subplots(1, len(detectors) + 2, figsize=(2.2 * (len(detectors) + 2), 2.4))
for index, (name, detector) in enumerate(detectors.items()):
    size = winclip_cfg.image_size if name == "winclip" else cfg.image_size
    batch, prediction = next(predict(detector, samples, image_size=size, batch_size=1, device=cfg.device,
                                     progress=False))
    if index == 0:
        image = batch["image"][0].permute(1, 2, 0)
        axes[0].imshow(((image - image.min()) / (image.max() - image.min())).numpy())
        axes[0].set_title(samples[0].class_name, fontsize=8)
        axes[1].imshow(batch["mask"][0].numpy(), cmap="gray")
        axes[1].set_title("ground truth", fontsize=8)
    axes[index + 2].imshow(prediction.anomaly_maps[0].numpy(), cmap="jet")
    axes[index + 2].set_title(published_method_name(name), fontsize=8)
for axis in axes:
    axis.axis("off")
fig.tight_layout()
cfg.save_figure(fig, output / "example_maps.png")
print(f"outputs in {output}: {sorted(p.name for p in output.iterdir() if p.is_file())}")
