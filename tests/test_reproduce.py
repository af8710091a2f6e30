"""The papermill runner: registry parsing, resume (skip complete notebooks), failure summary and exit status."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nbformat
import pytest

from zsadkit import reproduce
from zsadkit.preflight import check


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


def test_project_registry_lists_existing_notebooks_for_every_profile() -> None:
    defaults, entries = reproduce.load_registry()
    assert set(defaults) == {"smoke", "cpu", "paper"}
    assert defaults["cpu"]["backbone"] == "ViT-B-16" and defaults["cpu"]["image_size"] == 224
    assert defaults["paper"]["backbone"] == "ViT-L-14-336" and defaults["paper"]["image_size"] == 518
    assert entries and all(entry.outputs for entry in entries)


@pytest.mark.parametrize("profile", ["smoke", "cpu", "paper"])
def test_every_parameter_the_runner_injects_is_declared_in_the_notebook(profile: str, tmp_path: Path) -> None:
    import papermill

    defaults, entries = reproduce.load_registry()
    for entry in [entry for entry in entries if profile in entry.profiles]:
        declared = set(papermill.inspect_notebook(str(entry.path)))
        injected = reproduce.notebook_parameters(entry, defaults, profile, tmp_path, {"data_root": "/data"})
        assert set(injected) <= declared, f"{entry.name}: {sorted(set(injected) - declared)} not in its parameters cell"


def registry_of(tmp_path: Path, notebooks: dict[str, tuple[str, str]], entries: str) -> Path:
    """A registry over notebooks {name: (parameters cell, body)}."""
    folder = tmp_path / "notebooks"
    folder.mkdir(exist_ok=True)
    for name, (params, body) in notebooks.items():
        cell = nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]})
        notebook = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_code_cell(body)])
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(notebook, folder / f"{name}.ipynb")
    (folder / "registry.yaml").write_text(entries)
    return folder / "registry.yaml"


WRITE_PRETRAINED = "from pathlib import Path\nPath(out_dir, NAME + '.txt').write_text(repr(pretrained))"


def test_set_reaches_every_notebook_that_declares_the_key_and_only_those(tmp_path: Path) -> None:
    params = "profile = 'smoke'\nout_dir = ''\npretrained = ''"
    registry = registry_of(tmp_path, {
        "a": (params, WRITE_PRETRAINED.replace("NAME", "'a'")),
        "b": (params + "\nepochs = 1", WRITE_PRETRAINED.replace("NAME", "'b'")),
        "c": ("profile = 'smoke'\nout_dir = ''", "from pathlib import Path\nPath(out_dir, 'c.txt').write_text("
              "repr(globals().get('pretrained')))"),
    }, "notebooks:\n  - {name: a, outputs: [a.txt]}\n  - {name: b, outputs: [b.txt]}\n  - {name: c, outputs: [c.txt]}\n")
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"w")
    out = tmp_path / "out"
    code = reproduce.main(["--registry", str(registry), "--out", str(out), "--set", f"pretrained={weights}",
                           "--set", "epochs=3"])
    assert code == 0
    assert (out / "a.txt").read_text() == (out / "b.txt").read_text() == repr(str(weights))
    assert (out / "c.txt").read_text() == "None"  # c does not declare `pretrained`: nothing injected
    with pytest.raises(ValueError, match=r"--set \['epoch'\]: no selected notebook declares it; declared "
                                         r"parameters: \['epochs', 'out_dir', 'pretrained', 'profile'\]"):
        reproduce.reproduce("smoke", registry=registry, out_dir=out, overrides={"epoch": 3}, progress=False)
    assert reproduce.parse_assignment("x=True") == ("x", True)
    assert reproduce.parse_assignment("x=2") == ("x", 2) and reproduce.parse_assignment("x=0.5") == ("x", 0.5)
    assert reproduce.parse_assignment("runs=[[a, [b]]]") == ("runs", [["a", ["b"]]])
    assert reproduce.parse_assignment("p=/w/ViT.pt") == ("p", "/w/ViT.pt")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        reproduce.parse_assignment("epochs")


def test_preflight_on_a_missing_data_root_names_it_and_the_prepare_commands_in_seconds(
    tmp_path: Path, capsys
) -> None:
    registry = registry_of(tmp_path, {"t": ("profile = 'smoke'\nout_dir = ''\ndata_root = ''\nbackbone = ''\n"
                                            "pretrained = ''\nruns = []", "raise RuntimeError('must not run')")},
                           "notebooks:\n  - {name: t, outputs: [t.txt], paper: anomalyclip}\n")
    started = time.perf_counter()
    code = reproduce.main(["--profile", "paper", "--registry", str(registry), "--out", str(tmp_path / "o"),
                           "--data-root", str(tmp_path / "no-such-root"), "--set", "backbone=zsad-tiny"])
    out = capsys.readouterr().out
    assert code == 2 and time.perf_counter() - started < 30
    assert f"data root {tmp_path / 'no-such-root'} does not exist" in out
    assert f"zsadkit data prepare mvtec --raw <downloads> --root {tmp_path / 'no-such-root'} --protocol anomalyclip" \
        in out and "zsadkit data prepare visa" in out
    assert not (tmp_path / "o" / "executed").exists()  # nothing ran


def test_preflight_names_a_missing_weights_file_and_the_parameter_that_sets_it(tmp_path: Path) -> None:
    entry = reproduce.NotebookEntry("n", tmp_path / "n.ipynb")
    needs = reproduce.needs_of(entry, "smoke", {"backbone": "zsad-tiny", "pretrained": "",
                                                "winclip_backbone": "zsad-tiny",
                                                "winclip_pretrained": str(tmp_path / "nope.pt")})
    problems = check(needs)
    assert len(problems) == 1 and "nope.pt (parameter `winclip_pretrained`) does not exist" in problems[0].what
    assert "--set winclip_pretrained=" in problems[0].fix
    inctrl = reproduce.needs_of(entry, "smoke", {"backbone": "zsad-tiny", "pretrained": "",  # notebook 41's shape
                                                 "inctrl_backbone": "zsad-tiny", "inctrl_pretrained": "",
                                                 "winclip_pretrained": str(tmp_path / "laion.pt")})
    assert ("zsad-tiny", str(tmp_path / "laion.pt")) in inctrl.weights
    assert "laion.pt (parameter `winclip_pretrained`) does not exist" in check(inctrl)[0].what


def test_preflight_checks_disk_where_a_notebooks_cache_root_points(tmp_path: Path) -> None:
    entry = reproduce.NotebookEntry("n", tmp_path / "n.ipynb", cache_gb={"smoke": 1e9})
    needs = reproduce.needs_of(entry, "smoke", {"backbone": "zsad-tiny", "cache_root": str(tmp_path / "caches")})
    assert needs.cache_root == tmp_path / "caches"
    merged = reproduce._merge_needs([reproduce.needs_of(entry, "smoke", {}), needs])
    assert merged.cache_root == tmp_path / "caches"
    assert any(f"under {tmp_path}" in problem.what for problem in check(merged))  # the probe is the existing parent


def test_a_changed_output_makes_the_runner_rerun_the_notebook(registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    reproduce.reproduce("smoke", registry=registry, out_dir=out, only=["ok"], progress=False)
    (out / "ok.txt").write_text("edited by hand")  # e.g. the notebook run by hand with other parameters
    again = reproduce.reproduce("smoke", registry=registry, out_dir=out, only=["ok"], progress=False)
    assert again[0].status == "ran" and (out / "ok.txt").read_text() == "3"


def test_force_injects_retrain_into_notebooks_that_declare_it_without_changing_their_digest(tmp_path: Path) -> None:
    registry = registry_of(tmp_path, {"t": ("profile = 'smoke'\nout_dir = ''\nretrain = False",
                                            "from pathlib import Path\nPath(out_dir, 't.txt').write_text(str(retrain))")},
                           "notebooks:\n  - {name: t, outputs: [t.txt]}\n")
    out = tmp_path / "out"
    reproduce.reproduce("smoke", registry=registry, out_dir=out, progress=False)
    assert (out / "t.txt").read_text() == "False"
    reproduce.reproduce("smoke", registry=registry, out_dir=out, force=True, progress=False)
    assert (out / "t.txt").read_text() == "True"
    # `retrain` is left out of the completion digest: a plain rerun after a forced one skips the notebook
    assert reproduce.reproduce("smoke", registry=registry, out_dir=out, progress=False)[0].status == "skipped"


def test_unknown_notebook_and_ctrl_c_are_one_line_without_a_traceback(registry: Path, tmp_path: Path,
                                                                     capsys, monkeypatch) -> None:
    assert reproduce.main(["--registry", str(registry), "--only", "nope", "--out", str(tmp_path)]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["--only names unknown notebooks ['nope']; known: ['ok', 'broken']"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reproduce, "run_notebook", interrupted)
    assert reproduce.main(["--registry", str(registry), "--only", "ok", "--out", str(tmp_path / "i")]) == 130
    assert capsys.readouterr().out.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"


def test_the_summary_prints_each_failure_whole(tmp_path: Path) -> None:
    message = "Two ways out: (1) run once with internet access so the weights are downloaded; " * 4
    registry = registry_of(tmp_path, {"bad": ("profile = 'smoke'\nout_dir = ''", f"raise RuntimeError({message!r})")},
                           "notebooks:\n  - {name: bad, outputs: [x.txt]}\n")
    outcomes = reproduce.reproduce("smoke", registry=registry, out_dir=tmp_path / "o", progress=False)
    assert f"RuntimeError: {message}" in reproduce.summary(outcomes)
