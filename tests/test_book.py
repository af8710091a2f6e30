"""The book (zsadkit.book, `make book`): one self-contained HTML page per executed notebook and an index.
CI runs `make reproduce` before `make test`, so the smoke book is built from results/smoke/executed/."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import nbformat
import pytest

from zsadkit.book import build_book, notebook_title, registered_figures, section_of
from zsadkit.reproduce import load_registry

EXECUTED = Path(__file__).resolve().parent.parent / "results" / "smoke" / "executed"
PNG = base64.b64encode(bytes.fromhex("89504e470d0a1a0a")).decode()
FIGURE = re.compile(r"""<img[^>]*src=["']data:image/png;base64,""")
LINK = re.compile(r"""(?:src|href)=["']([^"']+)["']""")


def local_links_outside(page: Path, book: Path) -> list[str]:
    """Links of a page that are neither inline data, web addresses, anchors, nor files inside the book."""
    outside = []
    for link in LINK.findall(page.read_text(encoding="utf-8")):
        if link.startswith(("data:", "http://", "https://", "#")):
            continue
        target = (page.parent / link.split("#")[0]).resolve()
        if not (target.is_relative_to(book.resolve()) and target.exists()):
            outside.append(link)
    return outside


def write_notebook(path: Path, heading: str, with_figure: bool) -> None:
    notebook = nbformat.v4.new_notebook()
    code = nbformat.v4.new_code_cell("fig")
    if with_figure:
        code.outputs = [nbformat.v4.new_output("display_data", data={"image/png": PNG, "text/plain": "<Figure>"})]
    notebook.cells = [nbformat.v4.new_markdown_cell(f"Intro\n\n# {heading}\n\ntext"), code]
    nbformat.write(notebook, path)


def test_titles_come_from_the_first_heading_and_sections_from_the_name() -> None:
    notebook = {"cells": [{"cell_type": "code", "source": "# not a heading"},
                          {"cell_type": "markdown", "source": ["text\n", "## Tables of *X*\n", "# later"]}]}
    assert notebook_title(notebook, "fallback") == "Tables of *X*"
    assert notebook_title({"cells": []}, "fallback") == "fallback"
    assert [section_of(n) for n in ("00_quickstart", "30_aaclip_walkthrough", "60_compare_methods",
                                    "41_inctrl_tables")] == ["Getting started", "Method walkthroughs",
                                                             "Comparison of every method", "Tables and ablations"]


def test_the_book_has_an_index_and_pages_with_their_figures_inline(tmp_path: Path) -> None:
    executed = tmp_path / "executed"
    executed.mkdir()
    write_notebook(executed / "10_x_walkthrough.ipynb", "A walkthrough", with_figure=True)
    write_notebook(executed / "11_x_tables.ipynb", "Tables", with_figure=False)
    pages = build_book(executed, tmp_path / "book", "smoke", note="random weights")
    assert [(p.name, p.title, p.section) for p in pages] == [
        ("10_x_walkthrough", "A walkthrough", "Method walkthroughs"), ("11_x_tables", "Tables", "Tables and ablations")]
    index = (tmp_path / "book" / "index.html").read_text()
    assert 'href="10_x_walkthrough.html">A walkthrough</a>' in index and "random weights" in index
    page = (tmp_path / "book" / "10_x_walkthrough.html").read_text()
    assert FIGURE.search(page) and f"base64,{PNG}" in page and 'href="index.html"' in page
    assert not FIGURE.search((tmp_path / "book" / "11_x_tables.html").read_text())
    assert local_links_outside(tmp_path / "book" / "10_x_walkthrough.html", tmp_path / "book") == []
    saved = tmp_path / "saved.png"
    saved.write_bytes(base64.b64decode(PNG))
    build_book(executed, tmp_path / "book", "smoke", figures={"11_x_tables": [saved, tmp_path / "absent.png"]})
    assert FIGURE.search((tmp_path / "book" / "11_x_tables.html").read_text())  # saved, not shown: appended
    assert len(FIGURE.findall((tmp_path / "book" / "10_x_walkthrough.html").read_text())) == 1
    with pytest.raises(FileNotFoundError, match="make reproduce"):
        build_book(tmp_path / "empty", tmp_path / "book2")


def test_the_smoke_book_has_a_page_per_registered_notebook_with_its_figures(tmp_path: Path) -> None:
    if not sorted(EXECUTED.glob("*.ipynb")):
        pytest.skip(f"no executed notebooks under {EXECUTED}: run `make reproduce` first (CI does)")
    _, entries = load_registry()
    smoke = [entry for entry in entries if "smoke" in entry.profiles]
    book = tmp_path / "book"
    pages = {page.name: page for page in build_book(EXECUTED, book, "smoke",
                                                    figures=registered_figures(EXECUTED.parent))}
    assert {entry.name for entry in smoke} <= set(pages)
    index = (book / "index.html").read_text()
    without_figures, outside = [], {}
    for entry in smoke:
        page = book / pages[entry.name].file
        assert f'href="{page.name}"' in index
        if any(str(output).endswith(".png") for output in entry.outputs):
            if not FIGURE.search(page.read_text(encoding="utf-8")):
                without_figures.append(entry.name)
        outside[entry.name] = local_links_outside(page, book)
    assert not without_figures, f"pages without inline figures: {without_figures}"
    assert not {name: links for name, links in outside.items() if links}
    assert json.loads((book / "pages.json").read_text())
