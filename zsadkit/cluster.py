"""The registered notebooks as tasks on a Dask cluster: `python -m zsadkit.reproduce --executor dask`.

    python -m zsadkit.reproduce --profile smoke --executor dask --workers 2        # a local cluster, 2 processes
    python -m zsadkit.reproduce --profile paper --data-root /data --executor dask --scheduler tcp://head:8786

Each notebook to run is one task: `zsadkit.reproduce.run_entry` on a worker (papermill there, its kernel a child
of that worker, outputs written to the output folder, which the workers must share). Without `--scheduler` the
runner starts a `zsadkit.grid.local_cluster` (one worker per GPU when a task needs one or the run is on CUDA)
and closes it at the end.

Resources are data in `notebooks/registry.yaml`: `resources: {profile: {NAME: amount}}` at the top, overridden
by a notebook entry's own `resources`. In the paper profile every notebook needs `GPU: 1`, so a worker started
with `--resources GPU=1` runs one at a time.

Grids: a notebook that declares the `executor` and `scheduler` parameters and whose task needs no resource runs as
a coordinator: the runner injects `executor="dask"` and the cluster's address, the task leaves the worker's
thread pool while it waits (`distributed.secede`) and its grid cells run as tasks on the cluster, each with the
notebook's `RunConfig.cell_resources` (a GPU on CUDA). A notebook whose task holds a resource runs its grid inside
that task (it would otherwise hold a GPU while its cells wait for one). Neither parameter is part of the
notebook's completion stamp: where a grid runs does not change what it computes.

Determinism: CPU results depend on torch's thread count. Every notebook kernel gets the runner's thread count
(`OMP_NUM_THREADS`, `MKL_NUM_THREADS`; Dask workers default to 1), and grid cells run with their notebook's
(`zsadkit.grid.run_grid`), so the result CSVs equal a local run's, whatever the number of workers.

Failures: a notebook that fails is an outcome like in a local run; a worker that dies mid-notebook has the
notebook rerun on another worker (its stored grid cells are read, not recomputed), up to
`distributed.scheduler.allowed-failures` times, after which the notebook fails with `KilledWorker`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from zsadkit.experiment import PROFILES
from zsadkit.grid import dask_client
from zsadkit.reproduce import NotebookEntry, Outcome, run_entry

__all__ = ["declares_placement", "run_on_dask", "task_resources"]


def task_resources(registry: Path, profile: str, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """What each notebook's task needs on a worker in `profile`: its own `resources` entry, else the profile's.

    Raises:
        ValueError: a malformed `resources` section (unknown profile, a non-numeric or negative amount); the
            message names the registry file.
    """
    raw = yaml.safe_load(Path(registry).read_text()) or {}

    def checked(section: Any, where: str) -> dict[str, dict[str, float]]:
        if not isinstance(section, dict) or set(section) - set(PROFILES):
            raise ValueError(f"{registry}: {where} must map profiles {PROFILES} to {{NAME: amount}}, got {section!r}")
        for amounts in section.values():
            if not isinstance(amounts, dict) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in amounts.values()
            ):
                raise ValueError(f"{registry}: {where}: amounts must be numbers >= 0, got {amounts!r}")
        return section

    default = checked(raw.get("resources") or {}, "resources").get(profile) or {}
    own = {item["name"]: checked(item["resources"], f"resources of {item['name']!r}")
           for item in raw.get("notebooks", []) if "resources" in item}
    return {name: dict(own[name].get(profile, default) if name in own else default) for name in names}


def declares_placement(entry: NotebookEntry) -> bool:
    """True when the notebook's parameters cell declares `executor` and `scheduler` (its grid can go to Dask)."""
    import papermill

    return {"executor", "scheduler"} <= set(papermill.inspect_notebook(str(entry.path)))


def _notebook_task(
    entry: NotebookEntry, out_dir: Path, parameters: dict, placement: dict | None, threads: int
) -> Outcome:
    """One notebook on a worker: its kernel gets `threads` torch threads; a coordinator leaves the thread pool."""
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(threads)
    if placement:
        from distributed import secede

        secede()  # the notebook waits on its grid's cells: free this worker's slot for them
    return run_entry(entry, out_dir, parameters, progress=False, placement=placement)


def run_on_dask(
    jobs: Sequence[tuple[str, NotebookEntry, dict]],
    out_dir: Path,
    *,
    profile: str,
    registry: Path,
    workers: int | None = None,
    scheduler: str = "",
) -> dict[str, Outcome]:
    """Run `jobs` ((label, entry, parameters) from `zsadkit.reproduce.reproduce`) as Dask tasks; one outcome per
    notebook, never an exception for one. Every kernel gets this process's torch thread count."""
    import torch
    from distributed import as_completed

    if not jobs:
        return {}
    threads = torch.get_num_threads()
    resources = task_resources(registry, profile, [entry.name for _, entry, _ in jobs])
    needed: dict[str, float] = {}
    for amounts in resources.values():
        for name, amount in amounts.items():
            needed[name] = max(needed.get(name, 0), amount)
    if any(str(parameters.get("device", "")).startswith("cuda") for _, _, parameters in jobs):
        needed["GPU"] = max(needed.get("GPU", 0), 1)  # grid cells on CUDA take a GPU (RunConfig.cell_resources)
    outcomes: dict[str, Outcome] = {}
    with dask_client(scheduler, workers=workers, resources=needed) as client:
        address = client.scheduler.address
        futures, run = {}, uuid.uuid4().hex[:8]
        for label, entry, parameters in jobs:
            own = {name: amount for name, amount in resources[entry.name].items() if amount}
            placement = {"executor": "dask", "scheduler": address} if not own and declares_placement(entry) else None
            futures[client.submit(_notebook_task, entry, out_dir, parameters, placement, threads,
                                  key=f"notebook-{entry.name}-{run}", resources=own or None, pure=False)] = entry.name
            role = "coordinator, its grid on the cluster" if placement else f"resources {own}" if own else "task"
            print(f"{label} {entry.name}: submitted to {address} ({role})", flush=True)
        for future in as_completed(futures, loop=client.loop):
            name = futures[future]
            try:
                outcome = future.result()
            except Exception as error:  # the notebook's workers kept dying (KilledWorker) or the cluster went away
                outcome = Outcome(name, "failed", detail=f"{type(error).__name__}: {error}")
            outcomes[name] = outcome
            print(f"{name}: {outcome.status} ({outcome.seconds:.1f} s) {outcome.detail[:200]}".rstrip(), flush=True)
    return outcomes
