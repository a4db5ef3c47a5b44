"""Write notebooks/*.ipynb, colab_badges.md and the README's notebook list from notebooks/src/.

    python scripts/make_notebooks.py            # rewrite them (outputs never stored)
    python scripts/make_notebooks.py --check    # exit 1, naming the files, if any would change

Each notebook's source is a Python file in jupytext's percent format, notebooks/src/NN_name.py: `# %%`
starts a code cell, `# %% [markdown]` a markdown cell (its lines commented), and options on that line
become cell metadata (`tags=["parameters"]` for papermill). Editors, linters and `python -m py_compile`
see real code. Cells every notebook shares (install, the parameter and form notes, the config cell,
the results note) are written once in notebooks/src/_shared.py under `name="..."`, and a source
takes one with an empty cell marked `include="..."`. This script adds the Colab badge under each
title. Edit the sources, never the .ipynb files: tests/test_notebooks.py fails when they differ.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import jupytext

# CHANGE THIS to the GitHub owner/name the repository is published under: the Colab badges, links and
# the install cell's `git clone` all come from it.
REPO = "sftlib/sftlib"
BRANCH = "main"

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SOURCES = NOTEBOOKS / "src"
SHARED = SOURCES / "_shared.py"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
README_START = "<!-- notebooks: written by scripts/make_notebooks.py -->"
README_END = "<!-- /notebooks -->"
METADATA = {
    "accelerator": "GPU",
    "colab": {"provenance": [], "gpuType": "T4"},
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def colab_url(name: str) -> str:
    return f"https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/notebooks/{name}.ipynb"


def badge(name: str) -> str:
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(name)})"


class SourceError(ValueError):
    """A notebook source breaks a rule the notebooks rely on; the message names the file and the cell."""


@dataclass
class Notebook:
    name: str
    cells: list[dict]  # nbformat cells, shared cells included, badge added

    @property
    def title(self) -> str:
        return _text(self.cells[0]).split("\n", 1)[0].lstrip("# ").strip()

    @property
    def summary(self) -> str:
        """The first sentence of the paragraph under the title."""
        paragraphs = [p for p in _text(self.cells[0]).split("\n\n")[1:] if not p.startswith("[![")]
        first = " ".join(paragraphs[0].split()) if paragraphs else ""
        return first.split(". ")[0].rstrip(".") + "."


def _text(cell: dict) -> str:
    return "".join(cell["source"])


def _cell(kind: str, text: str, metadata: dict) -> dict:
    lines = text.split("\n")
    source = [line + "\n" for line in lines[:-1]] + [lines[-1]]
    if kind == "markdown":
        return {"cell_type": "markdown", "metadata": metadata, "source": source}
    return {"cell_type": "code", "execution_count": None, "metadata": metadata, "outputs": [], "source": source}


def _read(path: Path) -> list[tuple[str, str, dict]]:
    """(kind, text, metadata) of each cell of a percent-format file."""
    nb = jupytext.read(path, fmt="py:percent")
    return [(c.cell_type, c.source, dict(c.metadata)) for c in nb.cells]


def shared_cells() -> dict[str, tuple[str, str]]:
    cells = {}
    for kind, text, meta in _read(SHARED):
        if "name" in meta:  # the file's opening comment is a cell without a name
            cells[meta["name"]] = (kind, text.replace("{REPO}", REPO))
    return cells


def _check_parameters(path: Path, text: str) -> None:
    """papermill needs literals, one name per line, unique names; it skips a line holding two `=` signs."""
    names = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        code, _, comment = line.partition("  # ")
        if not comment:
            raise SourceError(f"{path.name}: parameter line without a comment giving its range: {line!r}")
        if "=" in comment:
            raise SourceError(f"{path.name}: papermill cannot parse '=' in the comment of {line!r}")
        name, _, value = code.partition(" = ")
        ast.literal_eval(value.strip())  # raises on anything but a literal
        names.append(name.strip())
    if len(set(names)) != len(names):
        raise SourceError(f"{path.name}: a parameter is listed twice")


def load(path: Path, shared: dict[str, tuple[str, str]] | None = None) -> Notebook:
    shared = shared if shared is not None else shared_cells()
    name = path.stem
    cells = []
    for kind, text, meta in _read(path):
        if "include" in meta:
            if meta["include"] not in shared:
                raise SourceError(f"{path.name}: no shared cell named {meta['include']!r} in {SHARED.name}")
            if text.strip():
                raise SourceError(f"{path.name}: the cell including {meta['include']!r} must be empty")
            kind, text = shared[meta.pop("include")]
        if "parameters" in meta.get("tags", []):
            _check_parameters(path, text)
        cells.append(_cell(kind, text, meta))
    if not cells or cells[0]["cell_type"] != "markdown" or not _text(cells[0]).startswith("# "):
        raise SourceError(f"{path.name}: the first cell must be markdown starting with the `# ` title")
    title, _, rest = _text(cells[0]).partition("\n")
    cells[0] = _cell("markdown", f"{title}\n\n{badge(name)}\n{rest}", {})
    for i, cell in enumerate(cells):
        cell["id"] = f"{name[:2]}-{i:02d}"  # stable ids: regenerating changes nothing
    return Notebook(name, cells)


def sources() -> list[Path]:
    return sorted(p for p in SOURCES.glob("*.py") if not p.name.startswith("_"))


def notebook_json(nb: Notebook) -> str:
    document = {"cells": nb.cells, "metadata": METADATA, "nbformat": 4, "nbformat_minor": 5}
    return json.dumps(document, indent=1, ensure_ascii=False) + "\n"


# ---- badges and README --------------------------------------------------------------------------------


def badges_md(notebooks: list[Notebook]) -> str:
    rows = [f"| [`{nb.name}`](notebooks/{nb.name}.ipynb) | {nb.summary} | {badge(nb.name)} |" for nb in notebooks]
    return "\n".join([
        "# Notebooks",
        "",
        "Written by `scripts/make_notebooks.py` from `notebooks/src/` (edit those, then run it). Each opens in",
        "Colab; pick a GPU runtime (T4 or A100). Headless: `papermill notebooks/NAME.ipynb out.ipynb -p PRESET cpu-demo`.",
        "",
        "| notebook | what it does | Colab |",
        "|---|---|---|",
        *rows,
        "",
    ])


def readme_block(notebooks: list[Notebook]) -> str:
    lines = [README_START]
    lines += [f"- [`{nb.name}`](notebooks/{nb.name}.ipynb): {nb.title.split(': ', 1)[-1]} ({badge(nb.name)})"
              for nb in notebooks]
    lines.append(README_END)
    return "\n".join(lines)


def readme_text(current: str, notebooks: list[Notebook]) -> str:
    """README with its notebook list replaced (added under a `## Notebooks` heading if missing)."""
    block = readme_block(notebooks)
    if README_START in current and README_END in current:
        head, rest = current.split(README_START, 1)
        return head + block + rest.split(README_END, 1)[1]
    section = ("\n## Notebooks\n\nEach notebook sets parameters, shows a form and calls sftlib; the list and "
               "the Colab badges (`colab_badges.md`) are written by `scripts/make_notebooks.py`.\n\n" + block + "\n")
    return current.rstrip("\n") + "\n" + section


# ---- main -----------------------------------------------------------------------------------------------


def outputs() -> dict[Path, str]:
    """Every file this script writes, with its content."""
    shared = shared_cells()
    notebooks = [load(path, shared) for path in sources()]
    files = {NOTEBOOKS / f"{nb.name}.ipynb": notebook_json(nb) for nb in notebooks}
    files[ROOT / "colab_badges.md"] = badges_md(notebooks)
    readme = ROOT / "README.md"
    files[readme] = readme_text(readme.read_text(encoding="utf-8"), notebooks)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any file would change")
    args = parser.parse_args(argv)
    try:
        files = outputs()
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stale = []
    for path, text in files.items():
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    for path in stale:
        print(f"{'would change' if args.check else 'wrote'} {path.relative_to(ROOT)}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
