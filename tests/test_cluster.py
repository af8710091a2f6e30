"""`python -m zsadkit.reproduce --executor dask`: notebooks as tasks on a 2-worker local cluster, grids of notebooks
that declare `executor`/`scheduler` on the cluster, the same result CSVs as a local run, resources from the
registry."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nbformat
import pytest

from zsadkit import reproduce
from zsadkit.cluster import task_resources
from zsadkit.grid import local_cluster

pytest.importorskip("distributed")
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
#: Result CSVs that hold wall-clock timings: never byte-identical, even between two local runs.
TIMING_FILES = ("compute_overhead/table8.csv", "compute_overhead/table8_vs_published.csv")
TIMING_COLUMNS = ("seconds",)  # training logs' epoch times


def result_csv_differences(first: Path, second: Path) -> list[str]:
    """The CSVs under `first` and `second` that differ: bytes, except the timing files (skipped) and the timing
    columns (left out of the comparison, every other cell compared as written)."""
    names = {path.relative_to(first).as_posix() for path in first.rglob("*.csv")}
    other = {path.relative_to(second).as_posix() for path in second.rglob("*.csv")}
    differences = [f"{name}: only in one run" for name in sorted(names ^ other)]
    for name in sorted((names & other) - set(TIMING_FILES)):
        rows = [list(csv.reader((root / name).open(newline=""))) for root in (first, second)]
        header = rows[0][0] if rows[0] else []
        if any(column in header for column in TIMING_COLUMNS):
            keep = [i for i, column in enumerate(header) if column not in TIMING_COLUMNS]
            same = [[row[i] for i in keep] for row in rows[0]] == [[row[i] for i in keep] for row in rows[1]]
        else:
            same = (first / name).read_bytes() == (second / name).read_bytes()
        if not same:
            differences.append(name)
    return differences


def notebook(path: Path, parameters: str, body: str) -> None:
    cells = [nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}), nbformat.v4.new_code_cell(body)]
    book = nbformat.v4.new_notebook(cells=cells)
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(book, path)


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    folder = tmp_path / "notebooks"
    folder.mkdir()
    notebook(folder / "plain.ipynb", "profile = 'smoke'\nout_dir = ''",
             "import os\nfrom pathlib import Path\nPath(out_dir, 'plain.txt').write_text(os.environ['OMP_NUM_THREADS'])")
    notebook(folder / "broken.ipynb", "profile = 'smoke'\nout_dir = ''", "raise ValueError('broken on purpose')")
    notebook(folder / "grid.ipynb", "profile = 'smoke'\nout_dir = ''\nexecutor = 'local'\nscheduler = ''",
             "from pathlib import Path\nfrom zsadkit.grid import run_grid\n"
             "def square(cell):\n    import os\n    return cell['x'] ** 2, os.getpid()\n"
             "values = run_grid(square, [{'x': x} for x in range(4)], store=Path(out_dir, 'cells'), "
             "executor=executor, scheduler=scheduler)\n"
             "Path(out_dir, 'grid.txt').write_text(f\"{executor} {[v for v, _ in values]} {len({p for _, p in values})}\")")
    (folder / "registry.yaml").write_text(
        "resources:\n  paper: {GPU: 1}\n"
        "notebooks:\n"
        "  - name: plain\n    outputs: [plain.txt]\n"
        "  - name: broken\n    outputs: [never.txt]\n"
        "  - name: grid\n    outputs: [grid.txt]\n    resources: {paper: {}}\n"
    )
    return folder / "registry.yaml"


def test_dask_runner_runs_notebooks_as_tasks_and_sends_a_declared_grid_to_the_cluster(
    registry: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "results"
    outcomes = reproduce.reproduce("smoke", registry=registry, out_dir=out, executor="dask", workers=2)
    assert [(o.name, o.status) for o in outcomes] == [("plain", "ran"), ("broken", "failed"), ("grid", "ran")]
    assert "broken on purpose" in outcomes[1].detail
    import torch

    assert (out / "plain.txt").read_text() == str(torch.get_num_threads())  # the kernel got the runner's threads
    executor, _, rest = (out / "grid.txt").read_text().partition(" ")
    assert executor == "dask" and rest.startswith("[0, 1, 4, 9] ")  # injected; results in the grid's order
    assert "coordinator, its grid on the cluster" in capsys.readouterr().out
    again = reproduce.reproduce("smoke", registry=registry, out_dir=out, only=["plain", "grid"])
    assert [o.status for o in again] == ["skipped", "skipped"]  # where a grid ran is not part of the stamp


def test_main_takes_the_executor_options_and_rejects_inconsistent_ones(registry: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        reproduce.main(["--registry", str(registry), "--workers", "2"])  # --workers without --executor dask
    with pytest.raises(SystemExit):
        reproduce.main(["--registry", str(registry), "--executor", "dask", "--workers", "2", "--scheduler", "x:1"])
    with pytest.raises(SystemExit):
        reproduce.main(["--registry", str(registry), "--executor", "dask", "--workers", "0"])


def test_task_resources_come_from_the_profile_or_the_notebooks_own_entry(registry: Path, tmp_path: Path) -> None:
    names = ["plain", "grid"]
    assert task_resources(registry, "paper", names) == {"plain": {"GPU": 1}, "grid": {}}
    assert task_resources(registry, "smoke", names) == {"plain": {}, "grid": {}}
    project = task_resources(reproduce.DEFAULT_REGISTRY, "paper", ["20_baselines", "12_anomalyclip_ablations"])
    assert project == {"20_baselines": {"GPU": 1}, "12_anomalyclip_ablations": {}}
    bad = tmp_path / "bad.yaml"
    bad.write_text("resources:\n  paper: {GPU: many}\nnotebooks: []\n")
    with pytest.raises(ValueError, match=r"bad.yaml: resources: amounts must be numbers"):
        task_resources(bad, "paper", [])
    bad.write_text("resources:\n  nightly: {GPU: 1}\nnotebooks: []\n")
    with pytest.raises(ValueError, match="must map profiles"):
        task_resources(bad, "paper", [])


def test_a_local_cluster_refuses_resources_it_cannot_provide(registry: Path, tmp_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            local_cluster(2, {"GPU": 1})
        with pytest.raises(RuntimeError, match="no CUDA device"):  # a run on CUDA: its grid cells need GPUs
            reproduce.reproduce("smoke", registry=registry, out_dir=tmp_path, only=["grid"], executor="dask",
                                overrides={"device": "cuda"})
    with pytest.raises(RuntimeError, match=r"only GPU resources, not \['licence'\]"):
        local_cluster(1, {"licence": 1})


def copy_registry(tmp_path: Path, text: str, names: list[str]) -> Path:
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for name in names:
        shutil.copy(NOTEBOOKS / f"{name}.ipynb", folder / f"{name}.ipynb")
    (folder / "registry.yaml").write_text(text)
    return folder / "registry.yaml"


def local_then_dask(registry: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The registry run locally, then on a local cluster of 2 workers, into the same output folder (result rows
    record checkpoint paths under it), each with its own feature cache; the two output folders."""
    out, local = tmp_path / "results", tmp_path / "local"
    for executor in ("local", "dask"):
        outcomes = reproduce.reproduce("smoke", registry=registry, out_dir=out, executor=executor,
                                       workers=2 if executor == "dask" else None, progress=False,
                                       overrides={"cache_root": str(tmp_path / f"cache_{executor}")})
        assert [o for o in outcomes if o.status != "ran"] == []
        if executor == "local":
            out.rename(local)
    return local, out


def test_the_ablation_grid_on_two_dask_workers_writes_the_local_runs_csvs_byte_for_byte(tmp_path: Path) -> None:
    registry = copy_registry(tmp_path, (
        "profiles:\n  smoke: {backbone: zsad-tiny, pretrained: '', image_size: 112, device: cpu}\n"
        "notebooks:\n  - name: 12_anomalyclip_ablations\n    outputs: [anomalyclip/ablations.csv]\n"
        "    parameters:\n      smoke: {epochs: 1, tables: [Table 5]}\n"),
        ["12_anomalyclip_ablations"])
    local, dask = local_then_dask(registry, tmp_path)
    assert (dask / "anomalyclip" / "ablations.csv").stat().st_size > 10_000
    assert result_csv_differences(local, dask) == []
    executed = (dask / "executed" / "12_anomalyclip_ablations.ipynb").read_text()
    assert "to compute on Dask" in executed  # the cells ran on the cluster, not in the notebook's kernel


@pytest.mark.slow
def test_the_smoke_profile_on_two_dask_workers_writes_the_local_runs_csvs(tmp_path: Path) -> None:
    """Every registered notebook, smoke profile: local run vs `--executor dask --workers 2`."""
    _, entries = reproduce.load_registry()
    registry = copy_registry(tmp_path, reproduce.DEFAULT_REGISTRY.read_text(), [entry.name for entry in entries])
    local, dask = local_then_dask(registry, tmp_path)
    assert len(list(local.rglob("*.csv"))) >= 20
    assert result_csv_differences(local, dask) == []
