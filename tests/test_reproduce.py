"""The papermill runner: registry parsing, resume (skip complete notebooks), failure summary and exit status."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from zsadkit import reproduce


def write_notebook(path: Path, body: str) -> None:
    """A two-cell notebook: a tagged parameters cell, then `body`."""
    params = nbformat.v4.new_code_cell("profile = 'smoke'\nout_dir = ''\nvalue = 1", metadata={"tags": ["parameters"]})
    notebook = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell(body)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(
        notebooks / "ok.ipynb",
        "from pathlib import Path\nPath(out_dir, 'ok.txt').write_text(str(value))",
    )
    write_notebook(notebooks / "broken.ipynb", "raise ValueError('this notebook is broken on purpose')")
    (notebooks / "registry.yaml").write_text(
        "profiles:\n  smoke: {value: 2}\n"
        "notebooks:\n"
        "  - name: ok\n    outputs: [ok.txt]\n    parameters: {smoke: {value: 3}}\n"
        "  - name: broken\n    outputs: [never.txt]\n"
    )
    return notebooks / "registry.yaml"


def test_runner_injects_parameters_and_keeps_going_past_a_failure(registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    outcomes = reproduce.reproduce("smoke", registry=registry, out_dir=out, progress=False)
    assert [(o.name, o.status) for o in outcomes] == [("ok", "ran"), ("broken", "failed")]
    assert (out / "ok.txt").read_text() == "3"  # the notebook's own value overrides the profile default
    assert "broken on purpose" in outcomes[1].detail
    assert (out / "executed" / "ok.ipynb").exists()
    text = reproduce.summary(outcomes)
    assert "2 notebooks: 1 ok, 1 failed" in text


def test_runner_skips_complete_notebooks_and_reruns_on_force_or_changed_parameters(
    registry: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    reproduce.reproduce("smoke", registry=registry, out_dir=out, only=["ok"], progress=False)
    again = reproduce.reproduce("smoke", registry=registry, out_dir=out, only=["ok"], progress=False)
    assert again[0].status == "skipped"
    forced = reproduce.reproduce("smoke", registry=registry, out_dir=out, only=["ok"], force=True, progress=False)
    assert forced[0].status == "ran"
    changed = reproduce.reproduce(
        "smoke", registry=registry, out_dir=out, only=["ok"], overrides={"value": 5}, progress=False
    )
    assert changed[0].status == "ran" and (out / "ok.txt").read_text() == "5"
    (out / "ok.txt").unlink()  # a missing output makes the notebook incomplete
    assert reproduce.reproduce("smoke", registry=registry, out_dir=out, only=["ok"], progress=False)[0].status == "ran"


def test_interrupted_run_is_not_taken_as_complete(registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    reproduce.reproduce("smoke", registry=registry, out_dir=out, only=["ok"], progress=False)
    stamp = out / "executed" / "ok.done.json"
    assert json.loads(stamp.read_text())["parameters"]["value"] == 3
    stamp.unlink()  # as if the kernel died before the stamp was written
    assert reproduce.reproduce("smoke", registry=registry, out_dir=out, only=["ok"], progress=False)[0].status == "ran"


def test_main_exits_nonzero_when_a_notebook_fails(registry: Path, tmp_path: Path, capsys) -> None:
    code = reproduce.main(["--profile", "smoke", "--registry", str(registry), "--out", str(tmp_path / "r")])
    assert code == 1
    assert "1 failed" in capsys.readouterr().out
    assert reproduce.main(
        ["--profile", "smoke", "--registry", str(registry), "--out", str(tmp_path / "r"), "--only", "ok"]
    ) == 0


def test_registry_errors_name_the_file_and_entry(tmp_path: Path) -> None:
    (tmp_path / "registry.yaml").write_text("notebooks:\n  - name: missing\n")
    with pytest.raises(ValueError, match=r"registry.yaml: entry 'missing' names .*missing.ipynb"):
        reproduce.load_registry(tmp_path / "registry.yaml")
    (tmp_path / "registry.yaml").write_text("profiles:\n  nightly: {}\n")
    with pytest.raises(ValueError, match="unknown profiles"):
        reproduce.load_registry(tmp_path / "registry.yaml")


def test_project_registry_lists_existing_notebooks_for_both_profiles() -> None:
    defaults, entries = reproduce.load_registry()
    assert set(defaults) == {"smoke", "paper"}
    assert defaults["paper"]["backbone"] == "ViT-L-14-336" and defaults["paper"]["image_size"] == 518
    assert entries and all(entry.outputs for entry in entries)


@pytest.mark.parametrize("profile", ["smoke", "paper"])
def test_every_parameter_the_runner_injects_is_declared_in_the_notebook(profile: str, tmp_path: Path) -> None:
    import papermill

    defaults, entries = reproduce.load_registry()
    for entry in entries:
        declared = set(papermill.inspect_notebook(str(entry.path)))
        injected = reproduce.notebook_parameters(entry, defaults, profile, tmp_path, {"data_root": "/data"})
        assert set(injected) <= declared, f"{entry.name}: {sorted(set(injected) - declared)} not in its parameters cell"
