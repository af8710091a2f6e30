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
# # InCTRL ablations: components (Table 3), the residual operation, and the reference code's options
#
# Every variant is a set of `InCTRLConfig` overrides (and, for two of them, training options), trained and tested
# with the protocol of the main tables at one K, over the same prompt sets, beside the published Table 3 where it
# has values (it is untranscribed so far: its structure is in `results/published/inctrl_ablation.csv`).
#
# * **T, P, I** (Table 3): the text prior s_a, the patch residual M_p (and s_p in the final score), the image
#   residual s_i (and its loss term). A variant keeps the components it names; the holistic head scores M_h built
#   from them (`text_prior`, `patch_residual`, `image_residual`).
# * **residual → concatenation / average** (Table 3): the image-level residual replaced by [ψ(f_x), prototype]
#   or their average. The patch-level counterpart is not defined in the material available here: only the
#   image branch changes (`image_residual_op`).
# * **no holistic head** (ours): s(x) = the mean of s_p, s_i, s_a.
# * **reference batch reshape** (the reference code's layout at training batch 16: samples and layers mixed),
#   trained scrambled and tested with the per-sample layout, as the reference tests (at batch 1: its heads are
#   copied into a model with `batch_reshape="per_sample"`, so the test batch of 8 does not scramble),
#   **textbook focal loss** (instead of focal on sigmoid outputs), **query excluded from its prompts**.
#
# Table 3's dataset columns and K are unverified; the default K is 2. In the `smoke` profile (random tiny CLIP,
# synthetic data, a few steps) the numbers only check the pipeline.

# %% tags=["parameters"]
profile = "smoke"
backbone = "zsad-tiny"
pretrained = ""
image_size = 112
data_root = ""
out_dir = ""
device = "cpu"
backbone_seed = 0
train_seed = 10
batch_size = 8
inctrl_backbone = ""  # "": the run's backbone; paper: ViT-B-16-plus-240
inctrl_pretrained = ""  # paper: laion400m_e32
inctrl_image_size = 0  # 0: the run's image size; paper: 240
shots = 2  # K of the ablation (unverified)
prompt_seeds = [0, 1]  # paper: [0, 1, 2]
epochs = 1  # paper: 10
steps_per_epoch = 5  # paper: 100
select_epoch = None  # paper: 6
runs = []  # empty: the protocol's ablation runs, or the synthetic sets
variants = []  # names from the grid below; empty: all
cache_root = ""
cache_dtype = "float32"
executor = "local"  # "dask": the (auxiliary set, variant) cells are tasks on a Dask cluster (zsadkit.grid.run_grid)
retrain = False  # True: recompute every grid cell even where stored (the runner's --force sets it)
scheduler = ""  # Dask scheduler address for executor "dask"; "": a local cluster

# %%
import warnings

import matplotlib.pyplot as plt
import pandas as pd

from zsadkit.engine import draw_reference_sets, write_reference_sets
from zsadkit.experiment import RunConfig, load_split
from zsadkit.grid import run_grid
from zsadkit.protocols import beside_published, protocol, published_dataset_name
from zsadkit.recipes import inctrl as inctrl_recipe
from zsadkit.results import tidy, write_results

cfg = RunConfig.from_parameters(globals())
print(cfg.banner())
inctrl_cfg = cfg.with_backbone(inctrl_backbone, inctrl_pretrained or None, inctrl_image_size)
inctrl_protocol = protocol("inctrl")
runs = runs or inctrl_protocol.runs_for(cfg.data_root, ablation=True)
resize = inctrl_protocol.resize if cfg.data_root else "squash"
output = cfg.output / "inctrl"
(output / "ablation_prompt_sets").mkdir(parents=True, exist_ok=True)
clip = inctrl_cfg.load_backbone()


def load(dataset: str, split: str):
    return inctrl_recipe.protocol_samples(lambda d, s: load_split(cfg, d, s, protocol="inctrl"), dataset, split)


# %% [markdown]
# ## The grid: variant → (model overrides, training overrides)

# %%
grid = {
    "T only": ({"patch_residual": False, "image_residual": False}, {}),
    "P only": ({"text_prior": False, "image_residual": False}, {}),
    "I only": ({"text_prior": False, "patch_residual": False}, {}),
    "T+P": ({"image_residual": False}, {}),
    "T+I": ({"patch_residual": False}, {}),
    "P+I": ({"text_prior": False}, {}),
    "T+P+I (full InCTRL)": ({}, {}),
    "residual->concatenation": ({"image_residual_op": "concatenation"}, {}),
    "residual->average": ({"image_residual_op": "average"}, {}),
    "no holistic head": ({"holistic_head": False}, {}),
    "reference batch reshape": ({"batch_reshape": "reference"}, {}),
    "textbook focal loss": ({"focal_loss": "textbook"}, {}),
    "query excluded from its prompts": ({}, {"query_in_prompts": False}),
}
unknown = sorted(set(variants) - set(grid))
if unknown:
    raise ValueError(f"unknown variants {unknown}; the grid has {list(grid)}")
chosen = {name: grid[name] for name in (variants or grid)}
pd.DataFrame([{"variant": name, "model": overrides, "training": training}
              for name, (overrides, training) in chosen.items()])

# %% [markdown]
# ## Train each variant on the auxiliary set, test on the same prompt sets
# One grid cell per (auxiliary set, variant), computed serially or as Dask tasks (`executor`, `scheduler`) and
# stored as it finishes under inctrl/grid_cells/ablations/: a rerun computes only the missing cells, and the rows
# are written in the grid's order.

# %%
test_sets = sorted({name for _, tests in runs for name in tests})
data = {name: (load(name, "test"), load(name, "train")) for name in test_sets}
prompt_sets = {}
for name, (test, train) in data.items():
    prompt_sets[name] = draw_reference_sets(train, {s.class_name for s in test}, [shots], prompt_seeds)
    write_reference_sets(prompt_sets[name], output / "ablation_prompt_sets" / f"{name}.json", dataset=name)
test_data = {name: test for name, (test, _) in data.items()}


def train_and_test(cell: dict, text_source, test_data: dict, prompt_sets: dict) -> pd.DataFrame:
    """One variant: train on the auxiliary set, test on each test set over the prompt seeds. It prints what it
    did when it runs (a cell read from the store prints nothing: the grid's line counts it as stored).
    `text_source`: a model on the run's CLIP, whose cache of class embeddings every variant shares (encoded once
    per process: a cache, the results do not depend on it)."""
    clip = text_source.text.clip
    model = inctrl_cfg.build("inctrl", clip=clip, train_seed=cfg.train_seed, **cell["model"])
    model.share_text_cache(text_source)
    config = inctrl_recipe.InCTRLTrainingConfig(shots=shots, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                                seed=cfg.train_seed, select_epoch=select_epoch, **cell["training"])
    with warnings.catch_warnings(record=True) as caught:  # the "reference batch reshape" variant warns by design
        warnings.simplefilter("always")
        result = inctrl_recipe.fit(model, inctrl_recipe.auxiliary_samples(load, cell["train_set"]), config,
                                   cache_root=cache_root or None, cache_dtype=cache_dtype, resize=resize,
                                   device=cfg.device)
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"{cell['variant']}, as expected: {message}")
    scorer = model
    if model.config.batch_reshape == "reference":  # trained scrambled, tested per sample (the reference: batch 1)
        scorer = inctrl_cfg.build("inctrl", clip=clip, train_seed=cfg.train_seed,
                                  **{**cell["model"], "batch_reshape": "per_sample"})
        scorer.load_head_state(model.head_state(), source="of the reference-reshape training")
        scorer.share_text_cache(text_source)
    frames = []
    for test_set in cell["test_sets"]:
        rows = inctrl_recipe.evaluate({shots: scorer}, test_data[test_set], prompt_sets[test_set], dataset=test_set,
                                      batch_size=cfg.batch_size, device=cfg.device, resize=resize)
        frames += [tidy(frame, inctrl_cfg.provenance("inctrl", train_set=cell["train_set"], shots=k,
                                                     train_seed=cfg.train_seed, reference_seed=seed))
                   for (k, seed), frame in rows.items()]
    print(f"{cell['variant']}: {result.describe()} on {cell['train_set']} ({result.log[-1]['loss']:.3f} last loss), "
          f"tested on {cell['test_sets']}" + (" with the per-sample layout" if scorer is not model else ""))
    return pd.concat(frames, ignore_index=True).assign(variant=cell["variant"])


cells = [{"train_set": train_set, "test_sets": list(tests), "variant": variant, "model": overrides,
          "training": training} for train_set, tests in runs for variant, (overrides, training) in chosen.items()]
frames = run_grid(train_and_test, cells, store=output / "grid_cells" / "ablations",
                  shared={"text_source": inctrl_cfg.build("inctrl", clip=clip, train_seed=cfg.train_seed),
                          "test_data": test_data, "prompt_sets": prompt_sets},
                  context={**inctrl_cfg.settings(), "shots": shots, "prompt_seeds": prompt_seeds, "epochs": epochs,
                           "steps_per_epoch": steps_per_epoch, "select_epoch": select_epoch, "resize": resize,
                           "cache_dtype": cache_dtype},
                  executor=cfg.executor, scheduler=cfg.scheduler, resources=cfg.cell_resources, recompute=retrain)
results = pd.concat(frames, ignore_index=True)
write_results(results, output / "ablations.csv")

# %% [markdown]
# ## The grid's results: image AUROC, mean over prompt seeds (class means)

# %%
summary = inctrl_recipe.mean_std_over_seeds(results.assign(method=results.variant))
summary.to_csv(output / "ablations_summary.csv", index=False)
if not inctrl_cfg.pretrained:
    print("RANDOM weights: these numbers check the pipeline only and say nothing about the method.")
auroc = summary[(summary.class_name == "mean") & (summary.metric == "auroc")]
(auroc.pivot_table(index="method", columns="dataset", values="value") * 100).round(1).reindex(list(chosen))

# %%
comparison = beside_published(summary.assign(variant=summary.method), "inctrl", method_column="variant",
                              source=inctrl_protocol.ablation_published, only_our_methods=True)
comparison.to_csv(output / "ablations_vs_published.csv", index=False)
comparison.dropna(subset=["ours"]).round(1)

# %%
fig, axis = plt.subplots(figsize=(8, 0.45 * len(chosen) + 1.5))
pivot = auroc.pivot_table(index="method", columns="dataset", values="value").reindex(list(chosen)[::-1]) * 100
errors = auroc.pivot_table(index="method", columns="dataset", values="std").reindex(list(chosen)[::-1]) * 100
pivot.rename(columns=published_dataset_name).plot.barh(ax=axis, xerr=errors.values.T, capsize=2)
axis.legend(title="dataset", fontsize=7, loc="lower right")
axis.axvline(50, color="grey", lw=0.8, ls="--")
axis.set_xlabel(f"image AUROC (%), K = {shots}, mean ± std over {len(prompt_seeds)} prompt seeds")
axis.set_ylabel("variant")
axis.set_title("InCTRL ablations", fontsize=9)
fig.suptitle(inctrl_cfg.banner(), fontsize=7, wrap=True)
fig.tight_layout()
fig.savefig(output / "ablation_grid.png", dpi=110)
print(f"outputs in {output}: ablations.csv, ablations_summary.csv, ablations_vs_published.csv, ablation_grid.png")
