"""run_grid: grid order, each distinct cell computed once, stored cells read back, failures reported with their
parameters, and on a 2-worker Dask cluster of processes the same bits, a killed worker's cell rerun elsewhere."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import cloudpickle
import pytest
import torch

from zsadkit.grid import GridError, local_cluster, run_grid

distributed = pytest.importorskip("distributed")
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module


def marked_cell(cell: dict, markers: str) -> int:
    """Writes start-<index>-<pid> when it starts and done-<index>-... when it finishes; raises while the file
    broken-<index> exists; sleeps `seconds`."""
    index, folder = cell["index"], Path(markers)
    (folder / f"start-{index}-{os.getpid()}-{uuid.uuid4().hex}").touch()
    time.sleep(cell.get("seconds", 0))
    if (folder / f"broken-{index}").exists():
        raise ValueError(f"cell {index} is broken on purpose")
    (folder / f"done-{index}-{uuid.uuid4().hex}").touch()
    return index * 10


def sum_of_noise(cell: dict) -> float:
    """A float whose last bits depend on torch's thread count (the order of a parallel sum)."""
    noise = torch.randn(2_000_003, generator=torch.Generator().manual_seed(cell["seed"]))
    return noise.sum().item()


def count(markers: Path, prefix: str) -> dict[int, int]:
    found: dict[int, int] = {}
    for path in markers.glob(f"{prefix}-*"):
        index = int(path.name.split("-")[1])
        found[index] = found.get(index, 0) + 1
    return found


@pytest.fixture
def markers(tmp_path: Path) -> Path:
    folder = tmp_path / "markers"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def cluster():
    """A Dask cluster of two single-threaded worker processes (as `--executor dask --workers 2` starts)."""
    with local_cluster(2) as dask_cluster:
        yield dask_cluster


def test_serial_grid_keeps_the_grid_order_computes_each_distinct_cell_once_and_reads_it_back(
    markers: Path, tmp_path: Path
) -> None:
    cells = [{"index": 2}, {"index": 0}, {"index": 1}, {"index": 0}]
    store = tmp_path / "store"
    results = run_grid(marked_cell, cells, store=store, shared={"markers": str(markers)}, progress=False)
    assert results == [20, 0, 10, 0]
    assert count(markers, "done") == {0: 1, 1: 1, 2: 1}
    assert len(list(store.glob("*.pkl"))) == 3 and not list(store.glob(".*"))  # no temporary file left
    again = run_grid(marked_cell, [*cells, {"index": 3}], store=store, shared={"markers": str(markers)},
                     progress=False)
    assert again == [20, 0, 10, 0, 30]
    assert count(markers, "done") == {0: 1, 1: 1, 2: 1, 3: 1}  # only the new cell was computed
    other = run_grid(marked_cell, cells[:1], store=store, context={"epochs": 2}, shared={"markers": str(markers)},
                     progress=False)
    assert other == [20] and count(markers, "done")[2] == 2  # another context is another key


def test_recompute_computes_every_cell_again_and_a_source_edit_changes_the_keys(
    markers: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zsadkit.grid

    cells, store = [{"index": 0}, {"index": 1}], tmp_path / "store"
    run_grid(marked_cell, cells, store=store, shared={"markers": str(markers)}, progress=False)
    assert run_grid(marked_cell, cells, store=store, shared={"markers": str(markers)}, progress=False,
                    recompute=True) == [0, 10]
    assert count(markers, "done") == {0: 2, 1: 2} and len(list(store.glob("*.pkl"))) == 2  # overwritten
    monkeypatch.setattr(zsadkit.grid, "source_digest", lambda: "edited")
    run_grid(marked_cell, cells, store=store, shared={"markers": str(markers)}, progress=False)
    assert count(markers, "done") == {0: 3, 1: 3} and len(list(store.glob("*.pkl"))) == 4


def test_a_cell_that_raises_is_reported_with_its_parameters_and_the_others_finish(
    markers: Path, tmp_path: Path
) -> None:
    (markers / "broken-1").touch()
    cells = [{"index": index} for index in range(4)]
    with pytest.raises(GridError) as raised:
        run_grid(marked_cell, cells, store=tmp_path / "store", shared={"markers": str(markers)}, progress=False)
    error = raised.value
    assert [(f.index, f.cell) for f in error.failures] == [(1, {"index": 1})]
    assert 'cell 1 {"index": 1}: ValueError: cell 1 is broken on purpose' in str(error)
    assert "Traceback" in error.failures[0].traceback and "marked_cell" in error.failures[0].traceback
    assert error.results == [0, None, 20, 30]
    (markers / "broken-1").unlink()
    assert run_grid(marked_cell, cells, store=tmp_path / "store", shared={"markers": str(markers)},
                    progress=False) == [0, 10, 20, 30]
    assert count(markers, "done") == {0: 1, 1: 1, 2: 1, 3: 1}  # the rerun computed only the failed cell


def test_cells_must_be_json_and_the_executor_known(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="grid cell 1 must be JSON-serialisable"):
        run_grid(marked_cell, [{"index": 0}, {"index": object()}], store=tmp_path, progress=False)
    with pytest.raises(ValueError, match="executor must be one of"):
        run_grid(marked_cell, [{"index": 0}], store=tmp_path, executor="slurm", progress=False)


def test_dask_cells_give_the_serial_bits_whatever_the_workers_thread_count(cluster, tmp_path: Path) -> None:
    cells = [{"seed": seed} for seed in range(3)]
    serial = run_grid(sum_of_noise, cells, store=tmp_path / "serial", threads=2, progress=False)
    on_dask = run_grid(sum_of_noise, cells, store=tmp_path / "dask", threads=2, executor="dask",
                       scheduler=cluster.scheduler_address, progress=False)
    assert on_dask == serial
    torch_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = sum_of_noise(cells[0])
    finally:
        torch.set_num_threads(torch_threads)
    assert single != serial[0]  # the premise: the thread count changes the bits (the workers run 1 thread)


def sum_with_shared(cell: dict, data: dict, items: list) -> int:
    return cell["index"] + sum(data["a"]) + len(items)


def test_dask_cells_get_shared_lists_and_dicts_whole(cluster, tmp_path: Path) -> None:
    cells = [{"index": index} for index in range(3)]
    shared = {"data": {"a": [1, 2]}, "items": ["x", "y"]}
    assert run_grid(sum_with_shared, cells, store=tmp_path / "store", shared=shared, executor="dask",
                    scheduler=cluster.scheduler_address, progress=False) == [5, 6, 7]


def test_dask_grid_reports_a_failing_cell_with_its_parameters_while_the_others_finish(
    cluster, markers: Path, tmp_path: Path
) -> None:
    (markers / "broken-4").touch()
    cells = [{"index": index, "seconds": 0.2} for index in range(6)]
    with pytest.raises(GridError) as raised:
        run_grid(marked_cell, cells, store=tmp_path / "store", shared={"markers": str(markers)}, executor="dask",
                 scheduler=cluster.scheduler_address, progress=False)
    assert [(f.index, f.cell) for f in raised.value.failures] == [(4, {"index": 4, "seconds": 0.2})]
    assert "ValueError: cell 4 is broken on purpose" in str(raised.value)
    assert raised.value.results == [0, 10, 20, 30, None, 50]
    assert count(markers, "done") == {0: 1, 1: 1, 2: 1, 3: 1, 5: 1}


def test_a_worker_killed_mid_cell_has_its_cell_rerun_elsewhere_and_every_cell_computed_once(
    cluster, markers: Path, tmp_path: Path
) -> None:
    client = distributed.Client(cluster, set_as_default=False)
    client.wait_for_workers(2, timeout=60)
    client.close()
    cells = [{"index": index, "seconds": 1.5} for index in range(6)]
    outcome: dict = {}

    def grid() -> None:
        try:
            outcome["results"] = run_grid(marked_cell, cells, store=tmp_path / "store", progress=False,
                                          shared={"markers": str(markers)}, executor="dask",
                                          scheduler=cluster.scheduler_address)
        except Exception as error:  # asserted below
            outcome["error"] = error

    runner = threading.Thread(target=grid)
    runner.start()
    deadline = time.monotonic() + 60
    while not (started := sorted(markers.glob("start-*"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started, "no cell started within 60 s"
    _, victim, pid, _ = started[0].name.split("-")
    os.kill(int(pid), signal.SIGKILL)  # the worker process dies in the middle of cell `victim`
    runner.join(timeout=120)
    assert not runner.is_alive() and "error" not in outcome, outcome.get("error")
    assert outcome["results"] == [0, 10, 20, 30, 40, 50]
    assert count(markers, "done") == {index: 1 for index in range(6)}  # each cell computed exactly once
    starts = [path.name.split("-")[2] for path in markers.glob(f"start-{victim}-*")]
    assert len(starts) == 2 and pid in starts and len(set(starts)) == 2  # started again, in another process
    assert len(list((tmp_path / "store").glob("*.pkl"))) == 6
