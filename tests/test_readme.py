"""README's layout section names every module and package of zsadkit/, and nothing that is not there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def layout_names() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    names = set()
    for line in block.splitlines():
        for token in re.findall(r"(?:^|\s)([a-z_]+(?:\.py(?:/\.yaml)?|/))(?=\s|$|:)", line):
            names.add(token.split("/.yaml")[0])
    return names


def test_the_layout_section_matches_the_package_tree() -> None:
    listed = {name for name in layout_names() if not name.endswith("/") or name[:-1] in
              {p.name for p in (ROOT / "zsadkit").iterdir() if p.is_dir()}}
    actual = {p.name for p in (ROOT / "zsadkit").glob("*.py") if p.name != "__init__.py"}
    actual |= {f"{p.name}/" for p in (ROOT / "zsadkit").iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert actual - listed == set(), f"in zsadkit/ but not in README's layout: {sorted(actual - listed)}"
    anywhere = {p.name for p in (ROOT / "zsadkit").rglob("*.py")}
    assert {name for name in listed if name.endswith(".py")} <= anywhere  # no module that does not exist
    top = {"notebooks/", "data_manifests/", "docs/", "tests/", "benchmarks/"}
    assert top <= layout_names()
