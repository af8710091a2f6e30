"""Regenerate `results/<profile>/` by executing every registered notebook with papermill.

    python -m zsadkit.reproduce --profile smoke            # what `make reproduce` runs
    python -m zsadkit.reproduce --profile paper --data-root /data/zsad --device cuda
    python -m zsadkit.reproduce --profile smoke --only 00_quickstart --force
    python -m zsadkit.reproduce --profile smoke --executor dask --workers 2        # notebooks as Dask tasks

The registry (`notebooks/registry.yaml`) lists each notebook with the parameters of each profile and the files
it writes under the profile's output folder. A notebook whose executed copy, outputs and parameters are all
present and unchanged is skipped (so an interrupted run resumes where it stopped) unless `--force`. A failing
notebook does not stop the others; the summary lists it and the exit status is non-zero.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from zsadkit.experiment import PROFILES
from zsadkit.paths import REGISTRY_FILE, results_dir

__all__ = [
    "DEFAULT_REGISTRY",
    "is_complete",
    "load_registry",
    "main",
    "notebook_parameters",
    "NotebookEntry",
    "Outcome",
    "reproduce",
    "run_entry",
    "run_notebook",
    "summary",
]

DEFAULT_REGISTRY = REGISTRY_FILE


@dataclass
class NotebookEntry:
    """One registered notebook: its file, parameters per profile, and the outputs that mark it complete."""

    name: str
    path: Path
    parameters: dict[str, dict] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    name: str
    status: str  # "ran", "skipped", "failed"
    seconds: float = 0.0
    detail: str = ""


def load_registry(path: Path = DEFAULT_REGISTRY) -> tuple[dict[str, dict], list[NotebookEntry]]:
    """Read the registry: per-profile defaults shared by all notebooks, and the notebook entries.

    Raises:
        ValueError: a malformed entry, a notebook file that does not exist, or an unknown profile; the message
            names the registry file and the entry.
    """
    raw = yaml.safe_load(Path(path).read_text()) or {}
    defaults = raw.get("profiles", {})
    unknown = set(defaults) - set(PROFILES)
    if unknown:
        raise ValueError(f"{path}: unknown profiles {sorted(unknown)}; expected {PROFILES}")
    entries = []
    for item in raw.get("notebooks", []):
        if "name" not in item:
            raise ValueError(f"{path}: a notebook entry has no 'name': {item}")
        notebook = Path(path).parent / f"{item['name']}.ipynb"
        if not notebook.exists():
            raise ValueError(f"{path}: entry {item['name']!r} names {notebook}, which does not exist")
        parameters = item.get("parameters", {}) or {}
        unknown = set(parameters) - set(PROFILES)
        if unknown:
            raise ValueError(f"{path}: entry {item['name']!r} has unknown profiles {sorted(unknown)}")
        entries.append(NotebookEntry(item["name"], notebook, parameters, list(item.get("outputs", []))))
    return defaults, entries


def notebook_parameters(
    entry: NotebookEntry, defaults: dict[str, dict], profile: str, out_dir: Path, overrides: dict
) -> dict:
    """Parameters injected into the `parameters` cell: profile defaults < notebook's own < command line."""
    return {
        **defaults.get(profile, {}),
        **entry.parameters.get(profile, {}),
        "profile": profile,
        "out_dir": str(out_dir),
        **overrides,
    }


def _digest(parameters: dict, notebook: Path) -> str:
    payload = json.dumps(parameters, sort_keys=True) + hashlib.sha256(notebook.read_bytes()).hexdigest()
    return hashlib.sha256(payload.encode()).hexdigest()


def is_complete(entry: NotebookEntry, out_dir: Path, parameters: dict) -> bool:
    """True when the last run of this notebook finished with the same parameters and all its outputs exist."""
    stamp = out_dir / "executed" / f"{entry.name}.done.json"
    if not stamp.exists() or not (out_dir / "executed" / f"{entry.name}.ipynb").exists():
        return False
    if json.loads(stamp.read_text()).get("digest") != _digest(parameters, entry.path):
        return False
    return all((out_dir / output).exists() for output in entry.outputs)


def run_notebook(
    entry: NotebookEntry, out_dir: Path, parameters: dict, progress: bool = True, placement: dict | None = None
) -> None:
    """Execute one notebook with papermill (kernel `python3`) and stamp it complete. `placement` (executor,
    scheduler) is injected too but is not part of the stamp: it says where the grid runs, not what it computes."""
    import papermill

    executed = out_dir / "executed"
    executed.mkdir(parents=True, exist_ok=True)
    stamp = executed / f"{entry.name}.done.json"
    stamp.unlink(missing_ok=True)
    papermill.execute_notebook(
        str(entry.path),
        str(executed / f"{entry.name}.ipynb"),
        parameters={**parameters, **(placement or {})},
        kernel_name="python3",
        cwd=str(entry.path.parent),
        progress_bar=progress,
    )
    missing = [output for output in entry.outputs if not (out_dir / output).exists()]
    if missing:
        raise RuntimeError(f"{entry.name} ran but did not write {missing} under {out_dir}")
    stamp.write_text(json.dumps({"digest": _digest(parameters, entry.path), "parameters": parameters}, indent=1))


def reproduce(
    profile: str,
    *,
    registry: Path = DEFAULT_REGISTRY,
    out_dir: Path | None = None,
    only: list[str] | None = None,
    force: bool = False,
    overrides: dict | None = None,
    progress: bool = True,
    executor: str = "local",
    workers: int | None = None,
    scheduler: str = "",
) -> list[Outcome]:
    """Run the registered notebooks of `profile`; returns one outcome per notebook, never raises for one.

    `executor` "local" runs them one after another here; "dask" runs them as tasks on a Dask cluster
    (`zsadkit.cluster.run_on_dask`: the scheduler at `scheduler`, or a local cluster of `workers` processes)."""
    defaults, entries = load_registry(registry)
    if only:
        unknown = set(only) - {e.name for e in entries}
        if unknown:
            raise ValueError(f"--only names unknown notebooks {sorted(unknown)}; known: {[e.name for e in entries]}")
        entries = [e for e in entries if e.name in only]
    out_dir = Path(out_dir) if out_dir else results_dir(profile)
    outcomes: dict[str, Outcome] = {}
    jobs = []
    for index, entry in enumerate(entries, 1):
        parameters = notebook_parameters(entry, defaults, profile, out_dir, overrides or {})
        if not force and is_complete(entry, out_dir, parameters):
            print(f"[{index}/{len(entries)}] {entry.name}: outputs complete, skipped (use --force to rerun)")
            outcomes[entry.name] = Outcome(entry.name, "skipped")
            continue
        jobs.append((f"[{index}/{len(entries)}]", entry, parameters))
    if executor == "dask":  # the one dispatch point: the same run_entry, as tasks on a Dask cluster
        from zsadkit.cluster import run_on_dask

        outcomes |= run_on_dask(jobs, out_dir, profile=profile, registry=registry, workers=workers,
                                scheduler=scheduler)
    else:
        for label, entry, parameters in jobs:
            print(f"{label} {entry.name}: running", flush=True)
            outcomes[entry.name] = run_entry(entry, out_dir, parameters, progress=progress)
    return [outcomes[entry.name] for entry in entries]


def run_entry(
    entry: NotebookEntry, out_dir: Path, parameters: dict, *, progress: bool = True, placement: dict | None = None
) -> Outcome:
    """Run one notebook; its outcome, never an exception (one broken notebook must not hide the others' results)."""
    start = time.perf_counter()
    try:
        run_notebook(entry, out_dir, parameters, progress=progress, placement=placement)
        return Outcome(entry.name, "ran", time.perf_counter() - start)
    except Exception as error:
        detail = "".join(traceback.format_exception_only(type(error), error)).strip().splitlines()
        return Outcome(entry.name, "failed", time.perf_counter() - start, detail[-1] if detail else "")


def summary(outcomes: list[Outcome]) -> str:
    lines = ["", "notebook                         status    seconds  detail"]
    for outcome in outcomes:
        lines.append(f"{outcome.name:<32} {outcome.status:<9} {outcome.seconds:7.1f}  {outcome.detail[:200]}")
    failed = sum(o.status == "failed" for o in outcomes)
    lines.append(f"{len(outcomes)} notebooks: {len(outcomes) - failed} ok, {failed} failed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zsadkit.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=PROFILES, default="smoke")
    parser.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="run only these registered notebooks")
    parser.add_argument("--force", action="store_true", help="rerun notebooks whose outputs are complete")
    parser.add_argument("--out", type=Path, help="output folder (default results/<profile>)")
    parser.add_argument("--data-root", help="root of prepared datasets (paper profile)")
    parser.add_argument("--device", help="torch device for every notebook, e.g. cuda")
    parser.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY)
    parser.add_argument("--executor", choices=("local", "dask"), default="local",
                        help="local: one notebook after another here; dask: notebooks (and their grids) as Dask tasks")
    parser.add_argument("--workers", type=int, metavar="N", help="dask without --scheduler: worker processes of "
                        "the local cluster (default: one per CPU core, or per GPU when the tasks need GPUs)")
    parser.add_argument("--scheduler", default="", metavar="ADDRESS",
                        help="dask: address of a running scheduler, e.g. tcp://node:8786 (default: a local cluster)")
    args = parser.parse_args(argv)
    if args.executor == "local" and (args.workers or args.scheduler):
        parser.error("--workers and --scheduler need --executor dask")
    if args.workers and args.scheduler:
        parser.error("--workers sizes the local cluster; with --scheduler the cluster's own workers run the tasks")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    overrides = {k: v for k, v in (("data_root", args.data_root), ("device", args.device)) if v}
    if args.profile == "paper" and "data_root" not in overrides:
        parser.error("the paper profile needs --data-root (datasets prepared with `zsadkit data prepare`)")
    outcomes = reproduce(
        args.profile, registry=args.registry, out_dir=args.out, only=args.only, force=args.force,
        overrides=overrides, executor=args.executor, workers=args.workers, scheduler=args.scheduler,
    )
    print(summary(outcomes))
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
