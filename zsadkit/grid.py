"""Map a function over a grid of parameter cells, serially or as tasks on a Dask cluster, storing each cell's
result the moment it finishes, so a rerun computes only the missing cells.

A grid is a list of cells, each a JSON-serialisable dict of the parameters that vary (an ablation's configuration,
a sweep value, a few-shot K and seed, a data regime). `run_grid(function, cells, ...)` calls
`function(cell, **shared)` once per distinct cell and returns the results in the grid's order, whatever order the
cells finished in. Every notebook grid uses it (`docs/cluster.md` lists the cells); e.g. notebook 12:

    # parameters cell: the two placement parameters; the runner injects them (`--executor dask`)
    executor = "local"  # "dask": the grid's cells run as tasks on a Dask cluster
    scheduler = ""      # address of a running Dask scheduler; "" with executor="dask": a LocalCluster

    cfg = RunConfig.from_parameters(globals())          # cfg.executor, cfg.scheduler, cfg.cell_resources

    def train_and_test(cell, clip):                      # cell parameters (+ shared objects) -> a picklable result
        model = cfg.build("anomalyclip", clip=clip, **cell["config"])
        ...
        return tidy(metrics, cfg.provenance("anomalyclip", ...))

    cells = [{"train_set": "visa", "config": {...}, "trained": True}, ...]
    frames = run_grid(train_and_test, cells, store=output / "grid_cells" / "ablations",
                      context={**cfg.settings(), "epochs": epochs}, shared={"clip": clip},
                      executor=cfg.executor, scheduler=cfg.scheduler, resources=cfg.cell_resources)
    results = pd.concat(frames, ignore_index=True)      # grid order: byte-identical CSVs on any executor

Rules a cell function follows:
- Its result depends only on the cell, `context` and `shared`: it seeds whatever it draws (`cfg.build` does) and
  does not rely on cells that ran before it in the same process.
- Large objects (a backbone, a detector) go in `shared`: on Dask they are sent once to each worker
  (`Client.scatter(broadcast=True)`), not with every task. The function's own globals travel with it (cloudpickle),
  so keep them small. The function may change a shared object only in ways the next cell undoes or overwrites
  (e.g. WinCLIP+ references, cleared after the cell).
- `context` holds every other setting the results depend on (the run configuration, epochs, ...): the key of a
  cell is a digest of the cell, `context`, the function's source, the torch thread count and the package's code
  (`zsadkit.results.source_digest`: any edit of `zsadkit/`, committed or not, makes new cells). `recompute=True`
  (the runner's `--force`) computes every cell again and overwrites the stored ones.

Storage: `store/<digest>.pkl` (pickle of the cell and its result), written to a temporary file and renamed, so
a cell is either complete or absent. The store must be on a filesystem that the workers share with the notebook.

Failures: a cell that raises is reported with its parameters and traceback after the other cells have finished
and been stored (`GridError`). A worker that dies mid-cell (a killed process) has the cell rerun on another worker
by Dask (up to `distributed.scheduler.allowed-failures` times, then the cell fails with `KilledWorker`); a cell
whose result is already stored is read, never recomputed, wherever it is rerun.

Determinism: CPU results depend on the number of torch threads (the order of float sums). Each cell runs with
`threads` torch threads (default: the calling process's count, what the serial run uses), so a cell computed on
any worker equals the serial result.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import pickle
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zsadkit
from zsadkit.results import source_digest

__all__ = ["CellFailure", "EXECUTORS", "GridError", "cell_digest", "dask_client", "local_cluster", "run_grid"]

EXECUTORS = ("local", "dask")
STORE_FORMAT = "zsadkit-grid-cell/1"


@dataclass(frozen=True)
class CellFailure:
    """A cell that did not finish: its position in the grid, its parameters, the error and the traceback (empty
    when the worker process died)."""

    index: int
    cell: dict
    error: str
    traceback: str = ""

    def __str__(self) -> str:
        text = f"cell {self.index} {json.dumps(self.cell, sort_keys=True)}: {self.error}"
        return text + ("\n" + self.traceback.rstrip() if self.traceback else "")


class GridError(RuntimeError):
    """Some cells failed; every other cell finished and is stored. `results` is in grid order (None where a
    cell failed), `failures` lists the failed cells."""

    def __init__(self, failures: Sequence[CellFailure], results: list[Any]) -> None:
        self.failures = list(failures)
        self.results = results
        header = (f"{len(self.failures)} of {len(results)} grid cells failed; the other cells are stored and a "
                  "rerun computes only the failed ones:")
        super().__init__("\n".join([header, *(str(failure) for failure in self.failures)]))


@dataclass(frozen=True)
class _Computed:
    """What one cell task returns: the result, or the error and traceback of a cell that raised."""

    result: Any = None
    computed: bool = False
    seconds: float = 0.0
    error: str = ""
    traceback: str = ""


def _canonical(value: Any, what: str) -> Any:
    """`value` as JSON types (tuples become lists), or a ValueError naming `what`."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must be JSON-serialisable (str, int, float, bool, None, lists, dicts): "
                         f"{error}") from error


def _function_identity(function: Callable) -> str:
    """The function's source text (a notebook function's too); its qualified name when the source is unknown."""
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', repr(type(function)))}"


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys: {"config": {"n_ctx": 4}} -> {"config.n_ctx": 4}."""
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    return {key: item for name, child in value.items()
            for key, item in _flat(child, f"{prefix}.{name}" if prefix else str(name)).items()}


def _labels(grid: Sequence[dict]) -> list[str]:
    """A short label per cell: only the (dotted) parameters whose values differ between the grid's cells."""
    flat = [_flat(cell) for cell in grid]
    keys = sorted({key for cell in flat for key in cell})
    varying = [key for key in keys if len({json.dumps(cell.get(key), sort_keys=True) for cell in flat}) > 1]
    return [json.dumps({key: cell.get(key) for key in varying} or grid[index], sort_keys=True)
            for index, cell in enumerate(flat)]


def cell_digest(cell: Mapping[str, Any], key: Mapping[str, Any]) -> str:
    """The store key of a cell: sha256 of the cell and the grid's key (context, function, threads, code)."""
    payload = json.dumps({"cell": cell, **key}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _load(path: Path) -> Any:
    stored = pickle.loads(path.read_bytes())
    if not isinstance(stored, dict) or stored.get("format") != STORE_FORMAT:
        raise ValueError(f"{path} is not a zsadkit grid cell ({STORE_FORMAT}); delete it to recompute the cell")
    return stored["result"]


def _store(path: Path, cell: Mapping[str, Any], result: Any) -> None:
    """Write atomically: a temporary file beside `path`, then a rename."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")
    try:
        temporary.write_bytes(pickle.dumps({"format": STORE_FORMAT, "cell": dict(cell), "result": result},
                                           protocol=pickle.HIGHEST_PROTOCOL))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _compute_cell(function: Callable, cell: dict, path: str, threads: int, shared: Mapping[str, Any],
                  reuse: bool = True) -> _Computed:
    """One cell, where it runs (this process or a Dask worker): read it from the store (`reuse`), or compute and
    store it."""
    import torch

    store_path = Path(path)
    if reuse and store_path.exists():
        return _Computed(_load(store_path))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        result = function(cell, **shared)
    except Exception as error:  # reported with the cell's parameters; the other cells go on
        return _Computed(error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
    finally:
        torch.set_num_threads(previous)
    _store(store_path, cell, result)
    return _Computed(result, computed=True, seconds=time.perf_counter() - start)


def local_cluster(workers: int | None = None, resources: Mapping[str, float] | None = None) -> Any:
    """A Dask cluster of single-threaded worker processes on this machine (`distributed.SpecCluster`).

    Without resources: `workers` processes (default: one per CPU core). With `{"GPU": n}`: one worker per GPU
    (`workers` of them, default all), each seeing only its GPU (`CUDA_VISIBLE_DEVICES`) and advertising `GPU: 1`.
    The memory limit is off (a cell may need most of the machine's memory). The workers keep this process's
    environment: Dask's `distributed.nanny.pre-spawn-environ` (OMP_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_=65536) is
    not applied, because a fixed malloc trim threshold makes torch's CPU code about 2x slower (cells set their
    thread count themselves, `run_grid(threads=)`). Dask's INFO messages are silenced (the `distributed` logger is
    set to WARNING), so that they do not bury the runner's and the notebooks' output.

    Raises:
        RuntimeError: GPUs are asked for and this machine has none (or fewer than `workers`), or a resource other
            than GPU is asked for (start workers with `dask worker --resources` instead).
    """
    import dask
    from distributed import Nanny, Scheduler, SpecCluster

    resources = {name: amount for name, amount in (resources or {}).items() if amount}
    other = sorted(set(resources) - {"GPU"})
    if other:
        raise RuntimeError(f"a local cluster provides only GPU resources, not {other}; start a scheduler and "
                           "workers with `dask worker ADDRESS --resources NAME=AMOUNT` and pass its address")
    if resources:
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise RuntimeError(f"the tasks ask for {resources} but this machine has no CUDA device; pass the "
                               "address of a scheduler whose workers have GPUs (--scheduler / scheduler=)")
        workers = workers or gpus
        if workers > gpus:
            raise RuntimeError(f"{workers} workers asked for, one per GPU, but this machine has {gpus} GPUs")
        environments = [({"CUDA_VISIBLE_DEVICES": str(gpu)}, {"GPU": 1}) for gpu in range(workers)]
    else:
        environments = [({}, {})] * (workers or os.cpu_count() or 1)
    specs = {index: {"cls": Nanny, "options": {"nthreads": 1, "memory_limit": 0, "env": env, "resources": worker,
                                                "silence_logs": logging.WARNING}}
             for index, (env, worker) in enumerate(environments)}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard": False, "dashboard_address": None}}
    logging.getLogger("distributed").setLevel(logging.WARNING)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": {}}):  # read by each Nanny when it is created
        return SpecCluster(workers=specs, scheduler=scheduler, silence_logs=logging.WARNING, name="zsadkit")


@contextlib.contextmanager
def dask_client(
    scheduler: str = "", *, workers: int | None = None, resources: Mapping[str, float] | None = None
) -> Iterator[Any]:
    """A `distributed.Client`: connected to `scheduler` when given; else this process's current client, if any;
    else on a `local_cluster(workers, resources)` started here and closed on exit.

    Raises:
        ImportError: Dask distributed is not installed (the `cluster` extra).
    """
    try:
        import distributed
    except ImportError as error:
        raise ImportError("the dask executor needs Dask distributed: pip install -e '.[cluster]'") from error
    if scheduler:
        client = distributed.Client(scheduler, set_as_default=False)
        try:
            _warn_missing_resources(client, resources)
            yield client
        finally:
            client.close()
        return
    try:
        current = distributed.default_client()
    except ValueError:  # no client in this process
        current = None
    if current is not None:
        _warn_missing_resources(current, resources)
        yield current
        return
    cluster = local_cluster(workers, resources)
    client = distributed.Client(cluster, set_as_default=False)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _warn_missing_resources(client: Any, resources: Mapping[str, float] | None) -> None:
    needed = {name: amount for name, amount in (resources or {}).items() if amount}
    if not needed:
        return
    workers = client.scheduler_info().get("workers", {}).values()
    if not any(all(worker.get("resources", {}).get(name, 0) >= amount for name, amount in needed.items())
               for worker in workers):
        print(f"note: no worker of {client.scheduler.address} offers {needed} yet; the tasks wait until one does "
              "(start workers with `dask worker ADDRESS --resources GPU=1`)", flush=True)


def run_grid(
    function: Callable[..., Any],
    cells: Sequence[Mapping[str, Any]],
    *,
    store: str | Path,
    context: Mapping[str, Any] | None = None,
    shared: Mapping[str, Any] | None = None,
    executor: str = "local",
    scheduler: str = "",
    workers: int | None = None,
    resources: Mapping[str, float] | None = None,
    threads: int | None = None,
    progress: bool = True,
    recompute: bool = False,
) -> list[Any]:
    """`function(cell, **shared)` for every cell, in the grid's order; identical cells are computed once.

    Args:
        function: cell parameters (and the `shared` objects as keyword arguments) -> a picklable result.
        cells: JSON-serialisable dicts, one per grid point.
        store: folder of the stored cells (created); a stored cell is read instead of computed.
        context: the settings shared by all cells that the results depend on (part of each cell's key).
        shared: large objects passed to every call (sent once per Dask worker).
        executor: "local" (serially, in this process) or "dask".
        scheduler: address of a Dask scheduler (executor "dask"); "" uses this process's current client or
            starts a `local_cluster(workers, resources)` for this grid.
        workers: size of that local cluster.
        resources: what one cell needs on a Dask worker, e.g. {"GPU": 1} (`RunConfig.cell_resources`).
        threads: torch threads per cell (default: this process's count, so every executor gives the same bits).
        progress: print a line per cell.
        recompute: compute every cell, ignoring (and then overwriting) the stored ones.

    Raises:
        ValueError: an unknown executor, or a cell or context that is not JSON-serialisable.
        GridError: cells failed; raised after every other cell has finished and been stored.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    import torch

    threads = threads or torch.get_num_threads()
    grid = [_canonical(cell, f"grid cell {index}") for index, cell in enumerate(cells)]
    key = {"format": STORE_FORMAT, "context": _canonical(dict(context or {}), "the grid's context"),
           "function": _function_identity(function), "threads": threads, "code": [zsadkit.__version__, source_digest()]}
    digests = [cell_digest(cell, key) for cell in grid]
    first: dict[str, int] = {}
    for index, digest in enumerate(digests):
        first.setdefault(digest, index)
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    paths = {digest: store / f"{digest}.pkl" for digest in first}
    results: dict[str, Any] = {digest: _load(paths[digest]) for digest in first if paths[digest].exists() and not recompute}
    pending = [digest for digest in first if digest not in results]
    where = "serially" if executor == "local" else f"on Dask ({scheduler or 'current client or a local cluster'})"
    if progress:
        print(f"grid: {len(grid)} cells, {len(first)} distinct, {len(results)} stored in {store}, "
              f"{len(pending)} to compute {where}", flush=True)
    failures: list[CellFailure] = []
    labels = _labels(grid)
    count = iter(range(1, len(pending) + 1))

    def finished(digest: str, outcome: _Computed) -> None:
        index = first[digest]
        if outcome.error:
            failures.append(CellFailure(index, grid[index], outcome.error, outcome.traceback))
        else:
            results[digest] = outcome.result
        if progress:
            state = (f"FAILED: {outcome.error}" if outcome.error
                     else f"computed in {outcome.seconds:.1f} s" if outcome.computed else "read from the store")
            print(f"[{next(count)}/{len(pending)}] {labels[index][:200]}: {state}", flush=True)

    if pending and executor == "local":
        for digest in pending:
            finished(digest, _compute_cell(function, grid[first[digest]], str(paths[digest]), threads, shared or {},
                                           reuse=not recompute))
    elif pending:
        _run_on_dask(function, {d: grid[first[d]] for d in pending}, paths, threads, shared or {}, finished,
                     scheduler=scheduler, workers=workers, resources=resources, reuse=not recompute)
    ordered = [results.get(digest) for digest in digests]
    if failures:
        raise GridError(sorted(failures, key=lambda failure: failure.index), ordered)
    return ordered


def _run_on_dask(
    function: Callable,
    cells: Mapping[str, dict],
    paths: Mapping[str, Path],
    threads: int,
    shared: Mapping[str, Any],
    finished: Callable[[str, _Computed], None],
    *,
    scheduler: str,
    workers: int | None,
    resources: Mapping[str, float] | None,
    reuse: bool = True,
) -> None:
    """Submit every pending cell; report each as it completes (results are ordered by the caller)."""
    from distributed import as_completed

    needed = {name: amount for name, amount in (resources or {}).items() if amount} or None
    with dask_client(scheduler, workers=workers, resources=needed) as client:
        # one future per shared object, whatever its type (scattering a list or dict itself gives one per item)
        scattered = {name: client.scatter([value], broadcast=True, hash=False)[0] for name, value in shared.items()}
        run = uuid.uuid4().hex[:8]
        futures = {client.submit(_compute_cell, function, cell, str(paths[digest]), threads, scattered, reuse,
                                 key=f"cell-{digest[:12]}-{run}", resources=needed): digest
                   for digest, cell in cells.items()}
        for future in as_completed(futures, loop=client.loop):
            digest = futures[future]
            try:
                outcome = future.result()
            except Exception as error:  # the cell's workers kept dying (KilledWorker) or the cluster went away
                outcome = _Computed(error=f"{type(error).__name__}: {error}")
            finished(digest, outcome)
            future.release()
        for future in scattered.values():
            future.release()
