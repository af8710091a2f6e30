"""pyproject.toml (dependencies and every extra) and environment.yml pin the same packages at the same versions."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements: list[str]) -> dict[str, str]:
    result = {}
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        assert version, f"{requirement!r} is not pinned with =="
        result[normalise(name)] = version
    return result


def test_pyproject_and_environment_yml_pin_the_same_versions() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = pins(project["dependencies"] + [requirement for extra in project["optional-dependencies"].values()
                                               for requirement in extra])
    conda = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert pins([r for r in pip_section if not r.startswith("-e")]) == declared


def test_torch_and_torchvision_pins_are_a_compatible_pair() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = pins(project["dependencies"])
    # torchvision 0.(N+15) is built against torch 2.N; a mismatched pair fails at import time.
    torch_minor = int(declared["torch"].split(".")[1])
    assert int(declared["torchvision"].split(".")[1]) == torch_minor + 15
