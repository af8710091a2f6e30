"""Regenerate `results/<profile>/` by executing every registered notebook with papermill.

    python -m zsadkit.reproduce --profile smoke            # what `make reproduce` runs
    python -m zsadkit.reproduce --profile paper --data-root /data/zsad --device cuda \\
        --pretrained ~/weights/ViT-L-14-336px.pt --set winclip_pretrained=~/weights/vit_b_16_plus_240.pt
    python -m zsadkit.reproduce --profile smoke --only 00_quickstart --force
    python -m zsadkit.reproduce --profile cpu --data-root ~/zsad-data --set epochs=3
    python -m zsadkit.reproduce --profile smoke --executor dask --workers 2        # notebooks as Dask tasks

The registry (`notebooks/registry.yaml`) lists each notebook with the parameters of each profile, the profiles it
belongs to, what data it needs and the files it writes under the profile's output folder.

* Parameters: profile defaults < the notebook's own < the command line. `--set KEY=VALUE` (repeatable, typed as
  papermill's `-p`: True/False/None, numbers, YAML lists and mappings, else text) reaches every selected notebook
  that declares KEY in its parameters cell; a key no selected notebook declares is an error listing the declared
  ones. `--pretrained`, `--backbone`, `--image-size`, `--data-root` and `--device` are shortcuts.
* Pre-flight: before any notebook runs, what the selected notebooks need (data root, datasets prepared for their
  protocol, weights on disk or downloadable, disk for the feature caches) is checked in seconds and reported with
  the command that fixes each item (`zsadkit.preflight`); `--skip-preflight` runs anyway.
* Resume: a notebook whose executed copy and stamp exist, with the same parameters and notebook, and whose outputs
  are unchanged since that run (their sha256 is in the stamp) is skipped, so an interrupted run resumes where it
  stopped; `--force` reruns it and, in notebooks that train (declaring `retrain`), retrains from scratch.
* A failing notebook does not stop the others; the summary lists each failure with its full message and the exit
  status is non-zero. Ctrl-C stops with one line; a rerun resumes.
* `--executor dask` runs the notebooks (and the grids inside them) as tasks on a Dask cluster (`zsadkit.cluster`):
  a local cluster of `--workers` processes, or the running scheduler at `--scheduler`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zsadkit.experiment import PROFILES
from zsadkit.paths import REGISTRY_FILE, default_cache_root, results_dir
from zsadkit.preflight import Needs, Problem, check, report
from zsadkit.protocols import protocol

__all__ = [
    "DEFAULT_REGISTRY",
    "NotebookEntry",
    "Outcome",
    "PreflightError",
    "is_complete",
    "load_registry",
    "main",
    "needs_of",
    "notebook_parameters",
    "parse_assignment",
    "reproduce",
    "run_entry",
    "run_notebook",
    "summary",
]

DEFAULT_REGISTRY = REGISTRY_FILE
#: Command-line settings every selected notebook gets, declared or not (`--data-root`, `--device`).
EVERY_NOTEBOOK = frozenset({"data_root", "device"})
#: Parameters that change how a notebook runs, not what it produces (left out of the completion digest).
RUN_ONLY_PARAMETERS = ("retrain",)


class PreflightError(RuntimeError):
    """The selected notebooks cannot run: the message is the pre-flight report."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(report(problems))
        self.problems = problems


@dataclass
class NotebookEntry:
    """One registered notebook.

    Attributes:
        name / path: its name and .ipynb file.
        parameters: per profile, the parameters it gets on top of the profile defaults.
        outputs: files (under the profile's output folder) that mark it complete.
        profiles: the profiles it runs in.
        paper: the protocol (`zsadkit.protocols`) whose runs name the datasets it needs, unless `runs` is given.
        ablation: it uses the paper's ablation runs.
        datasets: per profile, the datasets it needs, when not derived from `paper`.
        data_protocol: the manifest protocol its datasets are prepared for (default: `paper`, else "anomalyclip").
        cache_gb: per profile, disk its feature caches need.
    """

    name: str
    path: Path
    parameters: dict[str, dict] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    profiles: tuple[str, ...] = PROFILES
    paper: str = ""
    ablation: bool = False
    datasets: dict[str, list[str]] = field(default_factory=dict)
    data_protocol: str = ""
    cache_gb: dict[str, float] = field(default_factory=dict)


@dataclass
class Outcome:
    name: str
    status: str  # "ran", "skipped", "failed"
    seconds: float = 0.0
    detail: str = ""


ENTRY_KEYS = {"name", "parameters", "outputs", "profiles", "paper", "ablation", "datasets", "data_protocol", "resources",
              "cache_gb"}


def load_registry(path: Path = DEFAULT_REGISTRY) -> tuple[dict[str, dict], list[NotebookEntry]]:
    """Read the registry: per-profile defaults shared by all notebooks, and the notebook entries.

    Raises:
        ValueError: a malformed entry, a notebook file that does not exist, or an unknown profile or key; the
            message names the registry file and the entry.
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
        name = item["name"]
        notebook = Path(path).parent / f"{name}.ipynb"
        if not notebook.exists():
            raise ValueError(f"{path}: entry {name!r} names {notebook}, which does not exist")
        extra = set(item) - ENTRY_KEYS
        if extra:
            raise ValueError(f"{path}: entry {name!r} has unknown keys {sorted(extra)}; known: {sorted(ENTRY_KEYS)}")
        parameters = item.get("parameters", {}) or {}
        profiles = tuple(item.get("profiles", PROFILES))
        unknown = (set(parameters) | set(profiles) | set(item.get("datasets", {})) | set(item.get("cache_gb", {}))) \
            - set(PROFILES)
        if unknown:
            raise ValueError(f"{path}: entry {name!r} has unknown profiles {sorted(unknown)}")
        entries.append(NotebookEntry(name, notebook, parameters, list(item.get("outputs", [])), profiles,
                                     item.get("paper", ""), bool(item.get("ablation", False)),
                                     item.get("datasets", {}) or {}, item.get("data_protocol", ""),
                                     item.get("cache_gb", {}) or {}))
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


def declared_parameters(entry: NotebookEntry) -> set[str]:
    """The names the notebook's parameters cell declares (papermill's own parser)."""
    import papermill

    return set(papermill.inspect_notebook(str(entry.path)))


def parse_assignment(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` → (KEY, typed value): True/False/None, int, float, a YAML list or mapping, else the text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set expects KEY=VALUE, got {text!r}")
    value = value.strip()
    if value in ("True", "False"):
        return key.strip(), value == "True"
    if value == "None":
        return key.strip(), None
    for number in (int, float):
        try:
            return key.strip(), number(value)
        except ValueError:
            pass
    if value[:1] in "[{":
        try:
            return key.strip(), yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ValueError(f"--set {key}: {value!r} is not a valid YAML list/mapping ({error})") from error
    return key.strip(), value


def _run_digest(parameters: dict, notebook: Path) -> str:
    kept = {key: value for key, value in parameters.items() if key not in RUN_ONLY_PARAMETERS}
    payload = json.dumps(kept, sort_keys=True) + hashlib.sha256(notebook.read_bytes()).hexdigest()
    return hashlib.sha256(payload.encode()).hexdigest()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_complete(entry: NotebookEntry, out_dir: Path, parameters: dict) -> bool:
    """True when the last run of this notebook finished with the same parameters and notebook, and each of its
    outputs exists unchanged since (a notebook run by hand that rewrote one makes it incomplete)."""
    stamp = out_dir / "executed" / f"{entry.name}.done.json"
    if not stamp.exists() or not (out_dir / "executed" / f"{entry.name}.ipynb").exists():
        return False
    recorded = json.loads(stamp.read_text())
    if recorded.get("digest") != _run_digest(parameters, entry.path):
        return False
    digests = recorded.get("outputs", {})
    return all((out_dir / output).is_file() and digests.get(output) == _file_digest(out_dir / output)
               for output in entry.outputs)


def run_notebook(
    entry: NotebookEntry, out_dir: Path, parameters: dict, progress: bool = True, placement: dict | None = None
) -> None:
    """Execute one notebook with papermill (kernel `python3`) and stamp it complete with its outputs' digests.
    `placement` (executor, scheduler) is injected too but is not part of the stamp: it says where the notebook's
    grid runs, not what it computes."""
    import papermill

    executed = out_dir / "executed"
    executed.mkdir(parents=True, exist_ok=True)
    stamp = executed / f"{entry.name}.done.json"
    stamp.unlink(missing_ok=True)
    os.environ["ZSADKIT_BATCH"] = "1"  # the kernels inherit it: no widgets (`zsadkit.experiment.interactive_session`)
    papermill.execute_notebook(
        str(entry.path),
        str(executed / f"{entry.name}.ipynb"),
        parameters={**parameters, **(placement or {})},
        kernel_name="python3",
        cwd=str(entry.path.parent),
        progress_bar=progress,
    )
    missing = [output for output in entry.outputs if not (out_dir / output).is_file()]
    if missing:
        raise RuntimeError(f"{entry.name} ran but did not write {missing} under {out_dir}")
    stamp.write_text(json.dumps({"digest": _run_digest(parameters, entry.path), "parameters": parameters,
                                 "outputs": {output: _file_digest(out_dir / output) for output in entry.outputs}},
                                indent=1))


def needs_of(entry: NotebookEntry, profile: str, parameters: dict) -> Needs:
    """What one notebook needs in `profile` with `parameters` (see `zsadkit.preflight`)."""
    data_root = str(parameters.get("data_root", "") or "")
    data_protocol = entry.data_protocol or entry.paper or "anomalyclip"
    names: list[str] = list(entry.datasets.get(profile, []))
    runs = parameters.get("runs") or []
    if not names and runs:
        names = [name for train, tests in runs for name in (train, *tests)]
    elif not names and entry.paper and data_root:
        names = [name for train, tests in protocol(entry.paper).runs_for(data_root, entry.ablation)
                 for name in (train, *tests)]
    main = (str(parameters.get("backbone", "")), str(parameters.get("pretrained", "") or ""))
    weights, parameter_names = [main], {main: "pretrained"}
    backbones = {key.removesuffix("backbone"): str(value) for key, value in parameters.items()
                 if key.endswith("_backbone") and value}
    for prefix in sorted({*backbones, *(key.removesuffix("pretrained") for key, value in parameters.items()
                                         if key.endswith("_pretrained") and value)}):
        # a second backbone (winclip_backbone + winclip_pretrained); weights without a backbone of their own
        # (notebook 41's winclip_pretrained) go on the one other backbone, else on the main one
        backbone = backbones.get(prefix) or (next(iter(backbones.values())) if len(backbones) == 1 else "") or main[0]
        pair = (backbone, str(parameters.get(f"{prefix}pretrained", "") or main[1]))
        weights.append(pair)
        parameter_names.setdefault(pair, f"{prefix}pretrained")
    cache_root = parameters.get("cache_root")
    return Needs(data_root=data_root, datasets=tuple((name, data_protocol) for name in names),
                 weights=tuple(weights), cache_gb=float(entry.cache_gb.get(profile, 0.0)),
                 weight_parameters=parameter_names,
                 **({"cache_root": Path(str(cache_root)).expanduser()} if cache_root else {}))


def _merge_needs(all_needs: list[Needs]) -> Needs:
    merged = Needs()
    for needs in all_needs:
        merged.data_root = merged.data_root or needs.data_root
        merged.datasets += needs.datasets
        merged.weights += needs.weights
        merged.cache_gb += needs.cache_gb
        if needs.cache_root != default_cache_root():  # a notebook's own cache_root
            merged.cache_root = needs.cache_root
        merged.weight_parameters = {**needs.weight_parameters, **merged.weight_parameters}
    return merged


def reproduce(
    profile: str,
    *,
    registry: Path = DEFAULT_REGISTRY,
    out_dir: Path | None = None,
    only: list[str] | None = None,
    force: bool = False,
    overrides: dict | None = None,
    progress: bool = True,
    preflight: bool = True,
    executor: str = "local",
    workers: int | None = None,
    scheduler: str = "",
) -> list[Outcome]:
    """Run the registered notebooks of `profile`; returns one outcome per notebook, never raises for one.

    `executor` "local" runs them one after another here; "dask" runs them as tasks on a Dask cluster
    (`zsadkit.cluster.run_on_dask`: the scheduler at `scheduler`, or a local cluster of `workers` processes).

    Raises:
        ValueError: an unknown notebook in `only`, or an override no selected notebook declares.
        PreflightError: a requirement is missing (unless `preflight=False`).
    """
    defaults, entries = load_registry(registry)
    if only:
        unknown = set(only) - {e.name for e in entries}
        if unknown:
            raise ValueError(f"--only names unknown notebooks {sorted(unknown)}; known: {[e.name for e in entries]}")
        entries = [e for e in entries if e.name in only]
    entries = [e for e in entries if profile in e.profiles]
    out_dir = Path(out_dir) if out_dir else results_dir(profile)
    overrides = dict(overrides or {})
    declared = {entry.name: declared_parameters(entry) for entry in entries}
    every_declared = set().union(*declared.values()) if declared else set()
    unknown = sorted(set(overrides) - every_declared - EVERY_NOTEBOOK)
    if unknown:
        raise ValueError(f"--set {unknown}: no selected notebook declares {'it' if len(unknown) == 1 else 'them'}; "
                         f"declared parameters: {sorted(every_declared)}")
    plans = []
    for entry in entries:
        own = {key: value for key, value in overrides.items() if key in declared[entry.name] | EVERY_NOTEBOOK}
        parameters = notebook_parameters(entry, defaults, profile, out_dir, own)
        if force and "retrain" in declared[entry.name]:
            parameters["retrain"] = True
        plans.append((entry, parameters))
    if preflight:
        problems = check(_merge_needs([needs_of(entry, profile, parameters) for entry, parameters in plans]))
        if problems:
            raise PreflightError(problems)
    outcomes: dict[str, Outcome] = {}
    jobs = []
    for index, (entry, parameters) in enumerate(plans, 1):
        if not force and is_complete(entry, out_dir, parameters):
            print(f"[{index}/{len(plans)}] {entry.name}: outputs complete, skipped (use --force to rerun)")
            outcomes[entry.name] = Outcome(entry.name, "skipped")
            continue
        jobs.append((f"[{index}/{len(plans)}]", entry, parameters))
    if executor == "dask":  # the one dispatch point: the same run_entry, as tasks on a Dask cluster
        from zsadkit.cluster import run_on_dask

        outcomes |= run_on_dask(jobs, out_dir, profile=profile, registry=registry, workers=workers,
                                scheduler=scheduler)
    else:
        for label, entry, parameters in jobs:
            print(f"{label} {entry.name}: running", flush=True)
            outcomes[entry.name] = run_entry(entry, out_dir, parameters, progress=progress)
    return [outcomes[entry.name] for entry, _ in plans]


def run_entry(
    entry: NotebookEntry, out_dir: Path, parameters: dict, *, progress: bool = True, placement: dict | None = None
) -> Outcome:
    """Run one notebook; its outcome, never an exception (one broken notebook must not hide the others' results)."""
    start = time.perf_counter()
    try:
        run_notebook(entry, out_dir, parameters, progress=progress, placement=placement)
        return Outcome(entry.name, "ran", time.perf_counter() - start)
    except Exception as error:
        return Outcome(entry.name, "failed", time.perf_counter() - start, _failure_message(error))


def _failure_message(error: Exception) -> str:
    """The whole error message of a failed notebook (papermill's error name and value, untruncated)."""
    name, value = getattr(error, "ename", None), getattr(error, "evalue", None)
    if name is not None:
        return f"{name}: {value}"
    return f"{type(error).__name__}: {error}"


def summary(outcomes: list[Outcome]) -> str:
    """A table of outcomes, then every failure with its full message."""
    lines = ["", "notebook                         status    seconds"]
    for outcome in outcomes:
        lines.append(f"{outcome.name:<32} {outcome.status:<9} {outcome.seconds:7.1f}")
    failed = [o for o in outcomes if o.status == "failed"]
    lines.append(f"{len(outcomes)} notebooks: {len(outcomes) - len(failed)} ok, {len(failed)} failed")
    for outcome in failed:
        lines += ["", f"{outcome.name} failed:", outcome.detail]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zsadkit.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=PROFILES, default="smoke")
    parser.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="run only these registered notebooks")
    parser.add_argument("--force", action="store_true", help="rerun complete notebooks and retrain from scratch")
    parser.add_argument("--out", type=Path, help="output folder (default results/<profile>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a notebook parameter for every notebook that declares it (repeatable)")
    parser.add_argument("--data-root", help="root of prepared datasets (cpu and paper profiles)")
    parser.add_argument("--device", help="torch device for every notebook, e.g. cuda")
    parser.add_argument("--pretrained", help="weights of the main backbone: an open_clip tag or a local file")
    parser.add_argument("--backbone", help="the main backbone (an open_clip model name)")
    parser.add_argument("--image-size", type=int, help="input side of the main backbone")
    parser.add_argument("--skip-preflight", action="store_true", help="run without checking data and weights first")
    parser.add_argument("--executor", choices=("local", "dask"), default="local",
                        help="local: one notebook after another here; dask: notebooks (and their grids) as Dask tasks")
    parser.add_argument("--workers", type=int, metavar="N", help="dask without --scheduler: worker processes of "
                        "the local cluster (default: one per CPU core, or per GPU when the tasks need GPUs)")
    parser.add_argument("--scheduler", default="", metavar="ADDRESS",
                        help="dask: address of a running scheduler, e.g. tcp://node:8786 (default: a local cluster)")
    parser.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY)
    args = parser.parse_args(argv)
    if args.executor == "local" and (args.workers or args.scheduler):
        parser.error("--workers and --scheduler need --executor dask")
    if args.workers and args.scheduler:
        parser.error("--workers sizes the local cluster; with --scheduler the cluster's own workers run the tasks")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    try:
        overrides = dict(parse_assignment(text) for text in args.set)
    except ValueError as error:
        parser.error(str(error))
    for key, value in (("data_root", args.data_root), ("device", args.device), ("pretrained", args.pretrained),
                       ("backbone", args.backbone), ("image_size", args.image_size)):
        if value is not None:
            overrides[key] = value
    if args.profile != "smoke" and not overrides.get("data_root"):
        parser.error(f"the {args.profile} profile needs --data-root (datasets prepared with `zsadkit data prepare`)")
    try:
        outcomes = reproduce(args.profile, registry=args.registry, out_dir=args.out, only=args.only, force=args.force,
                             overrides=overrides, preflight=not args.skip_preflight, executor=args.executor,
                             workers=args.workers, scheduler=args.scheduler)
    except (ValueError, PreflightError) as error:
        print(error)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume")
        return 130
    print(summary(outcomes))
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
