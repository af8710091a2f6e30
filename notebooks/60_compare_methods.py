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
# # Every method under one protocol: a leaderboard with uncertainty, cost and the published numbers beside it
#
# Each paper of the kit reports single numbers, under its own protocol. Here every registered method
# (`zsadkit.methods.registered_methods()`: a method that lands later joins by itself) runs on the **same test
# images, with the same metric code, the same reference (prompt) sets and seeds**:
#
# - the runs (auxiliary set → test sets), the contenders (a registered method run one way: zero-shot, few-shot
#   with K references, or trained through its recipe on the auxiliary set) and the published tables each is put
#   beside are data: `comparison:` in `zsadkit/protocols.yaml`, read by `zsadkit.comparison`;
# - few-shot contenders (WinCLIP+ at K = 1, 2, 4, InCTRL at its K) get one draw of K normal training images per
#   class and prompt seed (`zsadkit.engine.draw_reference_sets`), the same draw for every one of them;
# - **two uncertainties, kept apart**: the bootstrap interval over test images (`ci_low`, `ci_high`: the test set
#   is a sample; 95 % percentile interval, images resampled within each class, stratified by label) and the
#   spread over seeds (`std` over the prompt seeds of few-shot contenders and the training seeds of trained ones);
# - cost from the same run: trainable parameters, training seconds per epoch, test images per second, peak memory;
# - beside each row the published value, the difference, and flags where the protocol behind the published
#   number differs from this one (which epoch was reported, which split, how the class mean was taken).
#
# The `smoke` profile runs a random tiny CLIP on the synthetic sets with one training epoch and few resamples:
# **its numbers come from random weights and only check the pipeline.**

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
train_seed = 111  # the first training seed (train_seeds empty: the only one)
methods = []  # registry names to compare; empty: every registered method
shots = {}  # contender -> the K to run instead of protocols.yaml's, e.g. {"winclip+": [1]}
runs = []  # [[auxiliary set, [test sets]], ...]; empty: protocols.yaml `comparison` (synthetic without data_root)
train_seeds = []  # seeds of every trained contender; empty: [train_seed]
prompt_seeds = [0, 1, 2]  # reference-set draws of every few-shot contender
epochs = 0  # 0: each recipe's published schedule; n: n epochs per stage for every trained contender
steps_per_epoch = 0  # InCTRL's steps per epoch (0: its recipe's 100)
subsample = 1  # keep every n-th auxiliary and test image (1: all)
n_resamples = 1000  # bootstrap resamples per class (0: no intervals)
pixel_resamples = 200  # bootstrap resamples of the pixel metrics (0: none; they cost more)
bootstrap_seed = 0
aupimo = False  # add AUPIMO (per-image overlap) to the pixel metrics
pro = ""  # AU-PRO variant; "": the comparison protocol's (zsadkit/protocols.yaml)
winclip_backbone = ""  # "": the run's backbone; paper: ViT-B-16-plus-240
winclip_pretrained = ""  # paper: laion400m_e31
winclip_image_size = 0  # paper: 240
inctrl_backbone = ""  # paper: ViT-B-16-plus-240
inctrl_pretrained = ""  # paper: laion400m_e32
inctrl_image_size = 0  # paper: 240
cache_dtype = "float32"
retrain = False  # True: train from scratch even where checkpoints exist (the runner's --force sets it)
executor = "local"  # "dask": the (contender, run, seed) cells are tasks on a Dask cluster
scheduler = ""  # Dask scheduler address for executor "dask"; "": a local cluster

# %%
import pandas as pd

from zsadkit import comparison
from zsadkit.engine import draw_reference_sets, write_reference_sets
from zsadkit.experiment import RunConfig, load_split
from zsadkit.grid import run_grid
from zsadkit.results import write_results
from zsadkit.stats import BootstrapConfig, critical_difference_diagram

cfg = RunConfig.from_parameters(globals())
print(cfg.banner())
if not cfg.pretrained:
    print("Random weights: every number below only checks the pipeline; none says anything about a method.")
protocol = comparison.comparison_protocol()
runs = runs or comparison.runs_for(cfg.data_root)
contenders = comparison.contenders(methods, shots)
configs = {"": cfg, "winclip": cfg.with_backbone(winclip_backbone, winclip_pretrained or None, winclip_image_size),
           "inctrl": cfg.with_backbone(inctrl_backbone, inctrl_pretrained or None, inctrl_image_size)}
pro = pro or protocol["pro"]
plan = comparison.Plan(
    output=str(cfg.output / "compare"), data_protocol=protocol["data_protocol"], epochs=epochs,
    steps_per_epoch=steps_per_epoch, subsample=subsample, pro=pro, resize=protocol["resize"], aupimo=aupimo,
    image_bootstrap=BootstrapConfig(n_resamples, bootstrap_seed, levels=("image",)) if n_resamples else None,
    pixel_bootstrap=(BootstrapConfig(pixel_resamples, bootstrap_seed, levels=("pixel",), pro=pro, aupimo=aupimo)
                     if pixel_resamples else None),
    cache_dtype=cache_dtype, retrain=retrain)
output = cfg.output / "compare"
output.mkdir(parents=True, exist_ok=True)
print("runs:", runs)
print(pd.DataFrame([dict(contender=c.name, method=c.method, runner=c.runner, shots=list(c.shots),
                         backbone=configs[c.backbone].backbone, in_protocols_yaml=c.described) for c in contenders])
      .to_string(index=False))

# %% [markdown]
# ## The same reference sets for every few-shot contender
#
# One draw of K normal training images per class, K and prompt seed, from each test set's train split; written
# beside the results (`references_<set>.json`) so another run can read them back.

# %%
all_shots = sorted({k for c in contenders for k in c.shots})
test_sets = sorted({name for _, tests in runs for name in tests})
reference_sets = {}
if all_shots:
    for test_set in test_sets:
        train_split = load_split(cfg, test_set, "train", protocol=plan.data_protocol)
        classes = {sample.class_name for sample in load_split(cfg, test_set, "test", protocol=plan.data_protocol)}
        reference_sets[test_set] = draw_reference_sets(train_split, classes, all_shots, prompt_seeds)
        write_reference_sets(reference_sets[test_set], output / f"references_{test_set}.json", dataset=test_set)
print(f"K = {all_shots}, prompt seeds {list(prompt_seeds)}, test sets {test_sets}")

# %% [markdown]
# ## The grid: each contender on each run, once per training seed
#
# A cell trains its contender on the auxiliary set (trained contenders; training-free ones run once) and scores
# it on every test set of the run, with every K and prompt seed; the bootstrap runs in the same pass, while each
# class's scores and maps are in memory. Cells are stored: a rerun computes only missing ones.

# %%
seeds = list(train_seeds) or [cfg.train_seed]
cells = []
for contender in contenders:
    trained = contender.runner not in ("zero_shot", "few_shot")
    for train_set, tests in runs:
        for seed in seeds if trained else [None]:
            cells.append({"contender": contender.name, "train_set": train_set if trained else "none",
                          "test_sets": list(tests), "train_seed": seed})
cells = list({repr(sorted(cell.items())): cell for cell in cells}.values())  # training-free: once per test sets
by_name = {contender.name: contender for contender in contenders}


def run_cell(cell: dict) -> comparison.CellResult:
    return comparison.run_cell(cell, contenders=by_name, configs=configs, plan=plan, reference_sets=reference_sets)


results_cells = run_grid(run_cell, cells, store=output / "grid_cells",
                         context={**cfg.settings(), "plan": repr(plan), "prompt_seeds": list(prompt_seeds),
                                  "configs": {k: v.settings() for k, v in configs.items()}},
                         executor=cfg.executor, scheduler=cfg.scheduler, resources=cfg.cell_resources)
results = comparison.result_rows(results_cells)
write_results(results, output / "results.csv")
pd.DataFrame([{"contender": cell.contender, "train_set": cell.train_set, "train_seed": cell.train_seed, **row}
              for cell in results_cells for row in cell.log]).to_csv(output / "training_log.csv", index=False)
print(f"{len(results)} rows from {len(cells)} cells")

# %% [markdown]
# ## The leaderboard
#
# One row per contender (and K), test set, level and metric: `value` is the class mean (mean over the seeds),
# `ci_low`/`ci_high` the 95 % bootstrap interval over test images (mean over seeds of each run's interval),
# `std` the spread over `seeds`, `rank` within (test set, level, metric). `published`/`diff` put the paper's number
# beside ours where one exists; `protocol_flags` say how its protocol differs from this one.

# %%
board = comparison.leaderboard(results, contenders, plan.data_protocol)
write_results(board, output / "leaderboard.csv")
shown = board[(board.level == "image") & (board.metric == "auroc")]
print(shown[["method", "shots", "dataset", "value", "ci_low", "ci_high", "seeds", "std", "rank", "published",
             "diff"]].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
flagged = board[board.protocol_flags != ""]
print(f"\n{board.published.notna().sum()} rows have a published value, {len(flagged)} of them a protocol flag")
for row in flagged.drop_duplicates(subset=["method"]).itertuples():
    print(f"- {row.method} ({row.dataset} {row.level} {row.metric}): {row.protocol_flags}")

# %% [markdown]
# The protocol differences each contender's published numbers carry (`comparison.flags` in protocols.yaml; a flag
# with `datasets` applies only to those test sets):

# %%
print(comparison.published_sources(contenders).to_string(index=False, max_colwidth=90))

# %%
fig = comparison.heatmap_figure(board)
cfg.save_figure(fig, output / "leaderboard_heatmap.png")

# %% [markdown]
# ## Each score against the best: the paired bootstrap of the difference
#
# Both scores are recomputed on the same resampled test images, so the interval of their difference is narrower
# than the two intervals suggest; `significant` when it excludes 0.

# %%
paired = comparison.paired_with_best(results_cells, board)
paired.to_csv(output / "paired_with_best.csv", index=False)
print(paired[(paired.level == "image") & (paired.metric == "auroc")].drop(columns=["note", "confidence"])
      .to_string(index=False, float_format=lambda v: f"{v:.3f}"))

# %% [markdown]
# ## Average ranks and the critical difference (Friedman, Nemenyi; Demšar 2006)
#
# Ranked over blocks: every class of every test set (with two test sets, ranking the class means would give two
# blocks only). Scores joined by a bar are not significantly different.

# %%
friedman, what = comparison.friedman_blocks(results, "image", "auroc", blocks="class")
print(what)
if friedman is not None:
    print(f"Friedman chi2 = {friedman.chi2:.2f}, p = {friedman.chi2_pvalue:.3g}, "
          f"critical difference {friedman.critical_difference:.2f}")
    cfg.save_figure(critical_difference_diagram(friedman, title="image AUROC: average rank over classes"),
                    output / "critical_difference.png")

# %% [markdown]
# ## Cost against accuracy, from the same run
#
# Peak memory on CPU is the process's peak resident set (VmHWM, reset when the cell starts) above its size when
# the cell started, on CUDA torch's peak allocation. Training time per epoch counts every stage's epochs.

# %%
cost = comparison.cost_table(results_cells)
cost.to_csv(output / "cost.csv", index=False)
print(cost.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
cfg.save_figure(comparison.cost_figure(cost, board), output / "cost_vs_accuracy.png")
