"""A static HTML book of a profile's executed notebooks: `results/<profile>/executed/*.ipynb` -> `results/<profile>/book/`.

    python -m zsadkit.book --profile smoke        # what `make book` runs (after `make reproduce`)
    python -m zsadkit.book --executed DIR --out DIR

One page per executed notebook (its code, text, tables and figures) and an `index.html` that lists them in
sections (getting started, method walkthroughs, tables and ablations, comparison), each titled by the notebook's
first heading. Figures are inline: the images a notebook shows, and, where it shows fewer than it saved (the
registry's PNG outputs), the saved files at the end of its page. Open `index.html` in a browser: no server, no
Jupyter.

Tool: nbconvert's `HTMLExporter` (the "lab" template). It is the Jupyter project's own converter, maintained with
the notebook format, already in the pinned environment (no new dependency), and it writes figure outputs into the
page as `data:image/png;base64` URIs, so a page is one self-contained file. Site generators that build on it
(Jupyter Book, Quarto, MkDocs with mkdocs-jupyter) add a dependency stack, a configuration and a build step of
their own for what is here a list of pages and one index.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from zsadkit.paths import results_dir
from zsadkit.reproduce import load_registry

__all__ = ["SECTIONS", "Page", "build_book", "main", "notebook_title", "registered_figures", "section_of"]

#: Index sections in order: (title, test on the notebook name).
SECTIONS: tuple[tuple[str, str], ...] = (
    ("Getting started", r"^0\d_"),
    ("Method walkthroughs", r"walkthrough"),
    ("Comparison of every method", r"compare"),
    ("Tables and ablations", r"."),
)
_NAV_STYLE = ("font-family:sans-serif;padding:0.6em 1em;border-bottom:1px solid #ccc;background:#f7f7f7;"
              "position:sticky;top:0;z-index:10")


@dataclass(frozen=True)
class Page:
    """A page of the book: the notebook's name, its title, its section and the HTML file (relative to the book)."""

    name: str
    title: str
    section: str
    file: str


def notebook_title(notebook: dict, default: str) -> str:
    """The text of the first Markdown heading of a notebook (`default` when it has none)."""
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        source = "".join(cell.get("source", ""))
        match = re.search(r"^\s*#{1,6}\s+(.+?)\s*#*\s*$", source, flags=re.MULTILINE)
        if match:
            return match.group(1)
    return default


def section_of(name: str) -> str:
    """The index section of a notebook, by its name (`SECTIONS`)."""
    return next(title for title, pattern in SECTIONS if re.search(pattern, name))


def _nav(profile: str) -> str:
    return (f'<nav style="{_NAV_STYLE}"><a href="index.html">zsadkit book</a> &middot; profile '
            f"<code>{html.escape(profile)}</code></nav>")


_INLINE_FIGURE = re.compile(r"""<img[^>]*src=["']data:image/png;base64,""")


def _gallery(figures: Sequence[Path]) -> str:
    """The saved figures of a notebook as inline images (for notebooks that save figures without showing them)."""
    images = "".join(f'<figure><img alt="{html.escape(path.name)}" style="max-width:100%" '
                     f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'
                     f"<figcaption><code>{html.escape(path.name)}</code></figcaption></figure>"
                     for path in figures if path.exists())
    return f'<section style="padding:1em"><h2>Figures this notebook wrote</h2>{images}</section>' if images else ""


def _render(path: Path, profile: str, figures: Sequence[Path] = ()) -> tuple[str, str]:
    """(title, HTML page) of an executed notebook; its saved `figures` are appended when the page shows fewer
    figures than it saved."""
    import nbformat
    from nbconvert import HTMLExporter

    notebook = nbformat.read(path, as_version=4)
    title = notebook_title(notebook, path.stem)
    exporter = HTMLExporter(template_name="lab", embed_images=True)
    body, _ = exporter.from_notebook_node(notebook, resources={"metadata": {"name": title}})
    body = re.sub(r"(<body[^>]*>)", lambda match: match.group(1) + _nav(profile), body, count=1)
    saved = [figure for figure in figures if figure.exists()]
    if len(_INLINE_FIGURE.findall(body)) < len(saved):
        body = body.replace("</body>", _gallery(saved) + "</body>", 1)
    return title, body


def _index(pages: Sequence[Page], profile: str, note: str) -> str:
    parts = [f"<h1>zsadkit: executed notebooks of the <code>{html.escape(profile)}</code> profile</h1>"]
    if note:
        parts.append(f"<p><strong>{html.escape(note)}</strong></p>")
    for section, _ in SECTIONS:
        listed = [page for page in pages if page.section == section]
        if listed:
            items = "".join(f'<li><a href="{html.escape(page.file)}">{html.escape(page.title)}</a> '
                            f"<small>({html.escape(page.name)})</small></li>" for page in listed)
            parts.append(f"<h2>{html.escape(section)}</h2><ul>{items}</ul>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>zsadkit book</title></head>"
            f"<body style='font-family:sans-serif;max-width:60em;margin:2em auto'>{''.join(parts)}</body></html>")


def registered_figures(results: str | Path) -> dict[str, list[Path]]:
    """Notebook name -> the PNG files the registry says it writes, under the profile's `results` folder."""
    _, entries = load_registry()
    return {entry.name: [Path(results) / output for output in entry.outputs if str(output).endswith(".png")]
            for entry in entries}


def build_book(executed: str | Path, out: str | Path, profile: str = "", note: str = "",
               figures: Mapping[str, Sequence[Path]] | None = None) -> list[Page]:
    """Render every `*.ipynb` of `executed` to `out/<name>.html` and write `out/index.html`.

    Args:
        executed: folder of executed notebooks (`results/<profile>/executed`).
        out: the book's folder (created; its pages are overwritten).
        profile: named in the pages' header (default: the name of `executed`'s parent folder).
        note: a line on the index page (e.g. that the smoke profile's numbers come from random weights).
        figures: notebook name -> the figure files it saved (`registered_figures`); a page that shows fewer
            figures than its notebook saved gets them inline at its end.

    Returns:
        The pages, in the index's order.

    Raises:
        FileNotFoundError: `executed` holds no notebook.
    """
    executed, out = Path(executed), Path(out)
    notebooks = sorted(executed.glob("*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no executed notebooks in {executed}: run `make reproduce` (or "
                                "`python -m zsadkit.reproduce --profile <profile>`) first")
    profile = profile or executed.parent.name
    out.mkdir(parents=True, exist_ok=True)
    pages = []
    for path in notebooks:
        title, body = _render(path, profile, (figures or {}).get(path.stem, ()))
        page = Page(path.stem, title, section_of(path.stem), f"{path.stem}.html")
        (out / page.file).write_text(body, encoding="utf-8")
        pages.append(page)
    order = {section: index for index, (section, _) in enumerate(SECTIONS)}
    pages.sort(key=lambda page: (order[page.section], page.name))
    (out / "index.html").write_text(_index(pages, profile, note), encoding="utf-8")
    (out / "pages.json").write_text(json.dumps([page.__dict__ for page in pages], indent=1))
    return pages


def _profile_note(profile: str) -> str:
    settings, _ = load_registry()
    if profile in settings and not settings[profile].get("pretrained"):
        return (f"The {profile} profile runs a CLIP with random weights on synthetic images: its numbers check the "
                "pipeline and say nothing about any method.")
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smoke", help="results/<profile>/executed -> results/<profile>/book")
    parser.add_argument("--executed", default="", help="folder of executed notebooks (default: the profile's)")
    parser.add_argument("--out", default="", help="the book's folder (default: results/<profile>/book)")
    args = parser.parse_args(argv)
    root = results_dir(args.profile)
    executed = Path(args.executed) if args.executed else root / "executed"
    out = Path(args.out) if args.out else root / "book"
    try:
        pages = build_book(executed, out, args.profile, _profile_note(args.profile), registered_figures(executed.parent))
    except FileNotFoundError as missing:
        print(missing)
        return 1
    print(f"{len(pages)} pages: open {out / 'index.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
