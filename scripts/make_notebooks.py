"""Write every notebook in notebooks/, colab_badges.md and the README's notebook list from this one file.

    python scripts/make_notebooks.py            # rewrite them (outputs never stored)
    python scripts/make_notebooks.py --check    # exit 1, naming the files, if any would change

The shared cells (title and Colab badge, the install cell, the parameters and form explanations, the
results cell) are written here once; each notebook adds its parameters and its steps. Edit this file,
not the .ipynb files: tests/test_notebooks.py fails when the notebooks differ from what it writes.
The steps themselves live in notebook_steps.py beside this file.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# CHANGE THIS to the GitHub owner/name the repository is published under: the Colab badges, links and
# the install cell's `git clone` all come from it.
REPO = "sftlib/sftlib"
BRANCH = "main"

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
README_START = "<!-- notebooks: written by scripts/make_notebooks.py -->"
README_END = "<!-- /notebooks -->"


def colab_url(name: str) -> str:
    return f"https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/notebooks/{name}.ipynb"


def badge(name: str) -> str:
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(name)})"


@dataclass
class Param:
    name: str            # UPPER_SNAKE, as papermill's -p takes it
    value: Any           # a literal: str, int, float, bool or None
    comment: str         # its range or choices, and what None means
    key: str | None = None  # the RunConfig field it sets through the form; None = used by the notebook itself


@dataclass
class Notebook:
    name: str
    title: str
    summary: str
    imports: str
    params: list[Param]
    steps: list[dict]
    results: str         # the dict literal of figures the last cell records
    sections: tuple[str, ...] = ("model", "lora", "data", "train", "export", "backend")
    derived: dict[str, str] = field(default_factory=dict)  # form keys computed from parameters
    demo_args: str = ""  # extra -p arguments in the headless example


# ---- cells ------------------------------------------------------------------------------------------


def _source(text: str) -> list[str]:
    lines = textwrap.dedent(text).strip("\n").split("\n")
    return [line + "\n" for line in lines[:-1]] + [lines[-1]]


def md(text: str) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": _source(text)}


def code(text: str, *, tags: tuple[str, ...] = ()) -> dict:
    metadata = {"tags": list(tags)} if tags else {}
    return {"cell_type": "code", "execution_count": None, "metadata": metadata, "outputs": [],
            "source": _source(text)}


def _literal(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    raise TypeError(f"parameter values must be literals, got {value!r}")


def header(nb: Notebook) -> dict:
    demo = f"papermill notebooks/{nb.name}.ipynb out.ipynb -p PRESET cpu-demo{nb.demo_args}"
    return md(f"""
        # {nb.title}

        {badge(nb.name)}

        {nb.summary}

        Run it in Colab on a GPU runtime, in Jupyter, or headless with papermill. `PRESET = "cpu-demo"`
        runs it offline on a CPU in minutes, with the tiny model and data bundled with sftlib:

            {demo}
        """)


def install_cell() -> dict:
    return code(f"""
        # Colab: fetch sftlib and install the pinned GPU set from requirements.txt (pip skips what is
        # already installed). Elsewhere this cell changes nothing: use the environment Jupyter runs in
        # (`make install`, or `pip install -r requirements-cpu.txt` and `pip install -e .`).
        import importlib.util
        import os
        import subprocess
        import sys

        if "google.colab" in sys.modules and importlib.util.find_spec("sftlib") is None:
            if not os.path.isdir("sftlib"):
                subprocess.run(["git", "clone", "--depth", "1", "https://github.com/{REPO}", "sftlib"], check=True)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", "sftlib/requirements.txt"], check=True)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", "sftlib"], check=True)
            sys.path.insert(0, os.path.abspath("sftlib"))
        elif importlib.util.find_spec("sftlib") is None and os.path.isdir("../sftlib"):
            sys.path.insert(0, os.path.abspath(".."))  # opened from the notebooks/ folder of a checkout
        """)


PARAMETERS_NOTE = md("""
    ## Parameters

    Literals only, one per line, each with its range; papermill replaces this cell
    (`-p NAME VALUE`). `None` keeps the preset's value. Values derived from these come after the form.
    """)

FORM_NOTE = md("""
    ## Settings

    The form starts from the parameters above and the preset fills the rest; the parameters win over
    the preset, and your edits win over both. Hover a field for its help. Problems show in red before
    anything runs, and the last tab holds the resolved config as YAML, which
    `python -m sftlib train --config` takes as it is. Run without a browser, the form holds exactly
    the parameters.
    """)

RESULTS_NOTE = md("""
    ## Results

    The figures of this run as JSON, for papermill runs and the tests: written to `RESULTS_PATH`
    when it is set.
    """)


def parameters_cell(nb: Notebook) -> dict:
    # papermill skips a line holding two `=` signs, and its names must be unique: check both here.
    names = [p.name for p in nb.params]
    assert len(set(names)) == len(names), f"{nb.name}: a parameter is listed twice"
    for p in nb.params:
        assert "=" not in p.comment, f"{nb.name}: `{p.name}`: papermill cannot parse '=' in the comment"
    width = max(len(f"{p.name} = {_literal(p.value)}") for p in nb.params)
    lines = [f"{f'{p.name} = {_literal(p.value)}':<{width}}  # {p.comment}" for p in nb.params]
    return code("\n".join(lines), tags=("parameters",))


def form_cell(nb: Notebook) -> dict:
    entries = [f'    "{p.key}": {p.name},' for p in nb.params if p.key]
    for key, expr in nb.derived.items():  # "value  # why" -> the comma goes before the comment
        value, _, why = expr.partition("  # ")
        entries.append(f'    "{key}": {value},' + (f"  # {why}" if why else ""))
    sections = "" if nb.sections == Notebook.__dataclass_fields__["sections"].default else f", sections={nb.sections!r}"
    return code("form = ConfigForm(PRESET, {\n" + "\n".join(entries) + "\n}" + sections + ")\nform")


def config_cell() -> dict:
    return code("""
        # NBVAL_CHECK_OUTPUT
        cfg = form.config()  # stops here, listing every problem, when the form shows any
        print(form.describe())
        """)


def results_cell(nb: Notebook) -> dict:
    body = textwrap.indent(textwrap.dedent(nb.results).strip("\n"), "    ")
    return code("results = nb.save_results(RESULTS_PATH, {\n" + body + "\n})\nresults")


def build(nb: Notebook) -> dict:
    cells = [header(nb), install_cell(), code(nb.imports), PARAMETERS_NOTE, parameters_cell(nb), FORM_NOTE,
             form_cell(nb), config_cell(), *nb.steps, RESULTS_NOTE, results_cell(nb)]
    for i, cell in enumerate(cells):
        cell["id"] = f"{nb.name[:2]}-{i:02d}"  # stable ids: regenerating changes nothing
    return {
        "cells": cells,
        "metadata": {
            "accelerator": "GPU",
            "colab": {"provenance": [], "gpuType": "T4"},
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def notebook_json(nb: Notebook) -> str:
    return json.dumps(build(nb), indent=1, ensure_ascii=False) + "\n"


# ---- badges and README --------------------------------------------------------------------------------


def badges_md(notebooks: list[Notebook]) -> str:
    rows = [f"| [`{nb.name}`](notebooks/{nb.name}.ipynb) | {nb.summary.split('. ')[0].rstrip('.')}. | {badge(nb.name)} |"
            for nb in notebooks]
    return "\n".join([
        "# Notebooks",
        "",
        "Written by `scripts/make_notebooks.py` (edit that, then run it). Each opens in Colab; pick a GPU",
        "runtime (T4 or A100). Headless: `papermill notebooks/NAME.ipynb out.ipynb -p PRESET cpu-demo`.",
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
    sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]  # notebook_steps, and sftlib for its presets
    sys.modules.setdefault("make_notebooks", sys.modules[__name__])  # one copy of Param/Notebook when run as a script
    from notebook_steps import NOTEBOOKS as DEFINITIONS

    files = {NOTEBOOKS / f"{nb.name}.ipynb": notebook_json(nb) for nb in DEFINITIONS}
    files[ROOT / "colab_badges.md"] = badges_md(DEFINITIONS)
    readme = ROOT / "README.md"
    files[readme] = readme_text(readme.read_text(encoding="utf-8"), DEFINITIONS)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any file would change")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
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
