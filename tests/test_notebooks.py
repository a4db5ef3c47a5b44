"""The notebooks: generated from one source, well formed, calling sftlib as it is today, and run headless.

    pytest tests/test_notebooks.py -q                        # static checks, then the runs (about 3 min, 2 cores)
    pytest tests/test_notebooks.py -q -m "not notebooks"     # static checks only (seconds)

The runs execute each notebook with papermill in a real Jupyter kernel ("python3", this environment's
Python), on the CPU demo settings, in one temporary folder: 02_train saves the adapters that
03_inference_and_eval and 04_export load. Each run writes its figures to RESULTS_PATH, which the tests
read. nbval then re-runs the executed notebooks and compares the cells marked `# NBVAL_CHECK_OUTPUT`.
The GGUF cell of 04 runs when llama.cpp's toolchain is built (`make gguf-deps`; `make test` builds it).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
NAMES = [p.stem for p in NOTEBOOKS]
SANITIZE = Path(__file__).with_name("nbval_sanitize.cfg")
sys.path.insert(0, str(REPO / "scripts"))  # make_notebooks: the generator, for its URLs
# A prompt the demo model learns to answer (the bundled data are labelled reviews).
DEMO_PROMPT = "Review: The lamp is great, really wonderful.\nIs this review positive or negative?"


def _read(name: str):
    return nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)


def _code_cells(nb) -> list[str]:
    return ["".join(c.source) for c in nb.cells if c.cell_type == "code"]


def _parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{len(cells)} cells tagged `parameters`"
    return cells[0]


def _parameters(nb) -> dict[str, object]:
    return {t.targets[0].id: ast.literal_eval(t.value) for t in ast.parse(_parameters_cell(nb).source).body}


def _form_keys(nb) -> dict[str, str]:
    """Parameter name -> config key, read from the `ConfigForm(PRESET, {...})` call of the notebook."""
    for src in _code_cells(nb):
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ConfigForm":
                mapping = node.args[1]
                return {v.id: k.value for k, v in zip(mapping.keys, mapping.values) if isinstance(v, ast.Name)}
    raise AssertionError("no ConfigForm(...) call")


# ---- static checks (fast, not marked) -------------------------------------------------------------------


def test_running_the_generator_changes_nothing():
    """The notebooks, colab_badges.md and the README list are exactly what scripts/make_notebooks.py writes."""
    out = subprocess.run([sys.executable, "scripts/make_notebooks.py", "--check"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"run `python scripts/make_notebooks.py`:\n{out.stdout}{out.stderr}"


@pytest.mark.parametrize("name", NAMES)
def test_valid_and_stored_without_outputs(name):
    text = (REPO / "notebooks" / f"{name}.ipynb").read_text(encoding="utf-8")
    json.loads(text)
    nb = _read(name)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"stored output in:\n{cell.source[:200]}"
    assert "widgets" not in nb.metadata  # saved widget state is output too


@pytest.mark.parametrize("name", NAMES)
def test_one_parameters_cell_of_commented_literals(name):
    import papermill

    nb = _read(name)
    cell = _parameters_cell(nb)
    tree = ast.parse(cell.source)
    for stmt in tree.body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name), \
            f"not a plain assignment: {ast.unparse(stmt)}"
        ast.literal_eval(stmt.value)  # literals only: papermill does not recompute derived values
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", stmt.targets[0].id)
    for line in cell.source.splitlines():
        assert re.search(r"\S\s+#\s\S", line), f"no range comment: {line}"
    params = _parameters(nb)
    listed = papermill.inspect_notebook(str(REPO / "notebooks" / f"{name}.ipynb"))
    if "PRESET" in params:  # every preset offered, from the one list of them
        from sftlib.config import PRESET_NAMES

        preset_line = next(line for line in cell.source.splitlines() if line.startswith("PRESET "))
        assert preset_line.split("#", 1)[1].strip() == " | ".join(PRESET_NAMES)
    assert list(listed) == list(params), "papermill --help-notebook must list every parameter"
    assert {"PRESET", "RESULTS_PATH"} <= set(params)
    later = "\n".join(_code_cells(nb)[_code_cells(nb).index(cell.source) + 1:])
    used = {n.id for n in ast.walk(ast.parse(later)) if isinstance(n, ast.Name)}
    assert set(params) <= used, f"parameters never used: {set(params) - used}"


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_works_with_papermill_p(name):
    """`papermill NB out.ipynb -p NAME VALUE` passes VALUE as text; it must reach the config unchanged."""
    from papermill.cli import _resolve_type

    from sftlib.config import PRESETS, RunConfig
    from sftlib.notebook.form import ConfigForm

    nb = _read(name)
    params, keys = _parameters(nb), _form_keys(nb)
    demo = RunConfig.preset("cpu-demo")
    for param, default in params.items():
        if param in keys:
            section, _, field = keys[param].rpartition(".")
            example = default if default is not None else getattr(getattr(demo, section), field)
            text = ",".join(example) if isinstance(example, list) else str(example)
            form = ConfigForm("cpu-demo", {keys[param]: _resolve_type(text)})
            assert form.problems == [], f"-p {param} {text!r}: {form.problems}"
            assert getattr(getattr(form.config(), section), field) == example
        elif param == "PRESET":
            assert default in PRESETS and all(_resolve_type(p) == p for p in PRESETS)
        elif default is not None and default != "":
            assert _resolve_type(str(default)) == default or isinstance(default, str), param
    assert params["PRESET"] == "article", "the defaults reproduce the article"


def _write_source(folder: Path, cells: str) -> Path:
    path = folder / "99_probe.py"
    path.write_text(cells, encoding="utf-8")
    return path


def test_sources_are_python_and_shared_cells_are_written_once(tmp_path):
    """Each source compiles as Python; the generator puts the shared install cell into every notebook, with
    the repository's URL, and the Colab badge under each title."""
    import make_notebooks as mk

    sources = mk.sources()
    assert [p.stem for p in sources] == NAMES  # one source per notebook, and no notebook without one
    install = mk.shared_cells()["install"][1]
    assert f"https://github.com/{mk.REPO}" in install and "{REPO}" not in install
    for path in sources:
        compile(path.read_text(encoding="utf-8"), str(path), "exec")
        nb = _read(path.stem)
        assert install in _code_cells(nb)
        assert nb.cells[0].source.split("\n")[2] == mk.badge(path.stem)


@pytest.mark.parametrize("body, message", [
    ('# %% tags=["parameters"]\nA = 1  # a=b\n', "cannot parse '='"),
    ('# %% tags=["parameters"]\nA = 1  # x\nA = 2  # y\n', "listed twice"),
    ('# %% tags=["parameters"]\nA = 1\n', "without a comment"),
    ('# %% include="nothing_like_it"\n', "no shared cell named 'nothing_like_it'"),
    ('# %% include="install"\nprint(1)\n', "must be empty"),
])
def test_the_generator_refuses_a_source_papermill_or_the_includes_would_break(tmp_path, body, message):
    import make_notebooks as mk

    path = _write_source(tmp_path, "# %% [markdown]\n# # 99 · probe\n#\n# A probe.\n\n" + body)
    with pytest.raises(mk.SourceError, match=re.escape(message)):
        mk.load(path)


def test_a_source_without_a_title_is_refused(tmp_path):
    import make_notebooks as mk

    with pytest.raises(mk.SourceError, match="title"):
        mk.load(_write_source(tmp_path, "# %%\nprint(1)\n"))


def _sftlib_calls(nb):
    """Yield (call text, callable, positional count, keyword names, has *args/**kwargs) for every call of sftlib."""
    names: dict[str, object] = {}
    instances: dict[str, type] = {}
    dict_kwargs: dict[str, list[str]] = {}
    for src in _code_cells(nb):
        tree = ast.parse(src)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sftlib":
                for alias in node.names:
                    if node.module == "sftlib":
                        obj = importlib.import_module(f"sftlib.{alias.name}")
                    else:
                        obj = getattr(importlib.import_module(node.module), alias.name)  # fails if renamed
                    names[alias.asname or alias.name] = obj
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and len(node.targets) == 1:
                target, call = node.targets[0], node.value
                if isinstance(target, ast.Name) and getattr(call.func, "id", None) == "dict":
                    dict_kwargs[target.id] = [k.arg for k in call.keywords]
                if isinstance(target, ast.Name) and inspect.isclass(names.get(getattr(call.func, "id", None))):
                    instances[target.id] = names[call.func.id]
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func, target = node.func, None
            if isinstance(func, ast.Name) and func.id in names:
                target = names[func.id]
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                owner = func.value.id
                if inspect.ismodule(names.get(owner)):
                    assert hasattr(names[owner], func.attr), f"{ast.unparse(func)} does not exist"
                    target = getattr(names[owner], func.attr)
                elif owner in instances:
                    assert hasattr(instances[owner], func.attr), f"{ast.unparse(func)} does not exist"
                    target = getattr(instances[owner], func.attr)
            if target is None:
                continue
            keywords, starred = [], False
            for kw in node.keywords:
                if kw.arg is not None:
                    keywords.append(kw.arg)
                elif isinstance(kw.value, ast.Name) and kw.value.id in dict_kwargs:
                    keywords += dict_kwargs[kw.value.id]
                else:
                    starred = True
            starred |= any(isinstance(a, ast.Starred) for a in node.args)
            bound_self = 1 if isinstance(func, ast.Attribute) and func.value.id in instances else 0
            yield ast.unparse(node), target, bound_self + len(node.args), keywords, starred


@pytest.mark.parametrize("name", NAMES)
def test_sftlib_calls_match_the_current_signatures(name):
    """Every sftlib function, class and method a notebook calls exists and accepts the arguments given."""
    checked = 0
    for text, target, n_positional, keywords, starred in _sftlib_calls(_read(name)):
        signature = inspect.signature(target)
        args, kwargs = [object()] * n_positional, {k: object() for k in keywords}
        try:
            signature.bind_partial(*args, **kwargs) if starred else signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise AssertionError(f"{name}: `{text}` does not match {target.__qualname__}{signature}: {exc}") from None
        checked += 1
    assert checked >= 6, f"only {checked} sftlib calls found: the checker is not seeing the notebook"


def test_badges_and_readme_list_every_notebook():
    from make_notebooks import colab_url

    badges = (REPO / "colab_badges.md").read_text(encoding="utf-8")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name in NAMES:
        assert colab_url(name) in badges and f"(notebooks/{name}.ipynb)" in badges
        assert f"(notebooks/{name}.ipynb)" in readme


# ---- runs (marked `notebooks`) --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One folder for all runs (the notebooks' relative `outputs/` land here), sftlib importable in kernels."""
    from jupyter_client.kernelspec import KernelSpecManager

    kernel = KernelSpecManager().get_kernel_spec("python3").argv[0]
    assert kernel in ("python", "python3", sys.executable), \
        f"the python3 kernel runs {kernel}, not this environment's {sys.executable}: the runs would test another"
    folder = tmp_path_factory.mktemp("notebooks")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([old] if old else []))
    yield folder
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def _execute(workdir: Path, name: str, out: str | None = None, **params) -> dict:
    import papermill

    out = out or name
    results = workdir / f"{out}.json"
    papermill.execute_notebook(str(REPO / "notebooks" / f"{name}.ipynb"), str(workdir / f"{out}.ipynb"),
                               parameters={"PRESET": "cpu-demo", **params, "RESULTS_PATH": str(results)},
                               kernel_name="python3", cwd=str(workdir), progress_bar=False, execution_timeout=600)
    return json.loads(results.read_text())


@pytest.fixture(scope="module")
def quickstart(workdir):
    return _execute(workdir, "00_quickstart", MAX_STEPS=30, PROMPT=DEMO_PROMPT, MAX_NEW_TOKENS=32)


@pytest.fixture(scope="module")
def data_report(workdir):
    """01 through papermill's command line, as a user runs it with -p."""
    results = workdir / "01_data_and_templates.json"
    out = subprocess.run(
        [sys.executable, "-m", "papermill", str(REPO / "notebooks" / "01_data_and_templates.ipynb"),
         str(workdir / "01_data_and_templates.ipynb"), "-k", "python3", "--cwd", str(workdir),
         "-p", "PRESET", "cpu-demo", "-p", "MAX_ROWS", "600", "-p", "SAMPLES", "2",
         "-p", "RESULTS_PATH", str(results)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(results.read_text())


@pytest.fixture(scope="module")
def trained(workdir):
    return _execute(workdir, "02_train", MAX_STEPS=30, SAVE_STEPS=10)


@pytest.mark.notebooks
def test_00_quickstart_trains_answers_and_saves(quickstart, workdir):
    losses = [loss for _, loss in quickstart["losses"]]
    assert quickstart["backend"] == "cpu" and quickstart["steps"] == 30
    assert losses[-1] < 0.5 * losses[0], losses
    assert quickstart["logged_this_run"] == quickstart["losses"]  # the live plot saw every logged loss
    assert quickstart["heldout_after"]["loss"] < 0.5 * quickstart["heldout_before"]["loss"]
    assert quickstart["preflight_ok"] is True
    assert quickstart["stopped"], f"generation did not stop at <|im_end|>: {quickstart['reply']!r}"
    assert quickstart["reply"] in ("The review is positive.", "The review is negative.")
    assert (workdir / quickstart["outputs"]["lora"] / "adapter_model.safetensors").exists()
    assert (workdir / quickstart["outputs"]["merged_16bit"] / "model.safetensors").exists()


@pytest.mark.notebooks
def test_01_data_and_templates_shows_format_mask_and_lengths(data_report):
    assert data_report["rows"] == 600 and data_report["format"] == "sharegpt"
    assert 0 < data_report["train_rows"] < 600  # cpu-demo holds some rows out: the report is on the others
    assert data_report["template"] == "chatml" and data_report["added_tokens"] == ["<|im_start|>", "<|im_end|>"]
    report = data_report["preflight"]
    assert report["ok"] and report["rows_checked"] == data_report["train_rows"]
    codes = [f["code"] for f in report["findings"]]
    assert "end_of_turn_not_trained" not in codes and "no_trained_tokens" not in codes
    assert 0.05 < report["trained_share"] < 0.5  # assistant replies only: short answers, longer prompts
    assert report["truncated_rows"] == 0 and sum(c for _, _, c in report["histogram"]) == data_report["train_rows"]


@pytest.mark.notebooks
def test_02_train_loss_falls_and_checkpoints_are_written(trained, workdir):
    from sftlib.config import RunConfig

    # In a real kernel, the form held exactly what papermill injected, on top of the preset.
    injected = {"train.max_steps": 30, "train.save_steps": 10, "lora.r": 16, "lora.alpha": 16}
    assert RunConfig.from_dict(trained["config"]) == RunConfig.preset("cpu-demo", injected)
    assert trained["steps"] == 30 and trained["resumed_from"] == "" and trained["preflight_ok"] is True
    assert trained["final_loss"] < 0.5 * trained["first_loss"], trained["losses"]
    assert trained["logged_this_run"] == trained["losses"]  # the live plot saw every logged loss
    assert [Path(p).name for p in trained["checkpoints"]] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert (workdir / trained["adapters"] / "adapter_model.safetensors").exists()


@pytest.fixture(scope="module")
def preferred(trained, workdir):
    """05 on the CPU demo: the bundled pairs, starting from the adapters 02_train saved (its SFT demo)."""
    return _execute(workdir, "05_preference", DATA_SOURCE="demo", DATA_SPLIT="train", EVAL_SIZE=40,
                    START_FROM=trained["adapters"], LEARNING_RATE=3e-4, EPOCHS=3.0, SFT_WEIGHT=1.0)


@pytest.mark.notebooks
def test_05_preference_raises_held_out_preference_accuracy(preferred, trained, workdir):
    """After the SFT demo the model ends its reply after the label; the pairs prefer "..., I think.": the
    held-out preference accuracy starts low and rises, the reward margin climbs, the card records it."""
    figs = preferred["preference"]
    assert preferred["backend"] == "cpu" and preferred["method"] == "dpo" and preferred["preflight_ok"] is True
    assert preferred["config"]["lora"]["start_from"] == trained["adapters"]
    assert figs["pairs"] == 40 and figs["accuracy_before"] <= 0.5, figs
    assert figs["accuracy_after"] >= 0.8 and figs["accuracy_after"] >= figs["accuracy_before"] + 0.3, figs
    assert figs["reward_margin"] > 0 and figs["logp_margin_after"] > figs["logp_margin_before"], figs
    assert preferred["logged_this_run"] == preferred["losses"]  # the live plot saw every logged loss
    assert preferred["margins"] and preferred["margins"][-1][1] > 0
    card = (workdir / preferred["outputs"]["lora"]).parent / "README.md"
    assert (f"| preference accuracy (chosen scored above rejected) | {figs['accuracy_before']:.0%} | "
            f"{figs['accuracy_after']:.0%} |") in card.read_text()


@pytest.mark.notebooks
def test_02_train_run_again_after_a_crash_resumes(trained, workdir):
    """The session died while checkpoint-30 was being saved: running the notebook again (same settings)
    continues from checkpoint-20 and ends where the uninterrupted run ended."""
    from sftlib.training.checkpoints import MARKER

    (workdir / "outputs" / "demo" / "checkpoint-30" / MARKER).unlink()
    resumed = _execute(workdir, "02_train", "02_train_resumed", MAX_STEPS=30, SAVE_STEPS=10,
                       EXPORT_DIR="outputs/resumed")
    assert Path(resumed["resumed_from"]).name == "checkpoint-20"
    assert resumed["steps"] == 30
    assert resumed["losses"][:2] == trained["losses"][:2]  # the history up to the checkpoint came along
    assert [step for step, _ in resumed["logged_this_run"]] == [30]  # only steps 21-30 ran
    assert resumed["final_loss"] == pytest.approx(trained["final_loss"], rel=1e-3)


@pytest.mark.notebooks
def test_02_train_step_by_step_trains_what_run_trains(trained, tmp_path):
    """The notebook's cells (one step each) and `sftlib.run()` on the same config: the same parameters
    trained, the same losses. A cell that called a step differently would show here."""
    import sftlib

    cfg = sftlib.RunConfig.from_dict(trained["config"])
    cfg.train.output_dir, cfg.export.output_dir = str(tmp_path / "run"), str(tmp_path / "run-export")
    cfg.export.formats = []  # the notebook saved only the adapters; training is what is compared
    result = sftlib.run(cfg, log=lambda _: None)
    assert result.trainable_parameters == trained["trainable_parameters"]
    assert len(trained["trainable_parameters"]) > 4
    # The same seeds, data order and kernels: equal but for float summation order across processes.
    ran = [loss for _, loss in result.train["losses"]]
    notebook = [loss for _, loss in trained["losses"]]
    assert ran[:3] == pytest.approx(notebook[:3], rel=1e-4)
    assert ran[-1] == pytest.approx(notebook[-1], rel=1e-2)


@pytest.fixture(scope="module")
def evaluated(trained, workdir):
    return _execute(workdir, "03_inference_and_eval", PROMPT=DEMO_PROMPT, MAX_NEW_TOKENS=32, SAMPLES=6)


@pytest.mark.notebooks
def test_03_inference_and_eval_beats_the_base(evaluated):
    assert evaluated["stopped"], f"generation did not stop at <|im_end|>: {evaluated['reply']!r}"
    assert evaluated["loss_tuned"] < 0.5 * evaluated["loss_base"]
    assert evaluated["perplexity_tuned"] < evaluated["perplexity_base"]
    assert evaluated["accuracy_base"] == 0.0 and evaluated["accuracy_tuned"] >= 0.5


@pytest.fixture(scope="module")
def exported(trained, workdir):
    return _execute(workdir, "04_export", PROMPT=DEMO_PROMPT, MAX_NEW_TOKENS=32)


@pytest.mark.notebooks
def test_04_export_writes_a_merged_model_that_stops(exported, workdir):
    assert set(exported["written"]) == {"lora", "merged_16bit"}  # the cpu-demo preset: no GGUF, no upload
    assert (workdir / exported["written"]["lora"] / "adapter_model.safetensors").exists()
    assert (workdir / exported["written"]["merged_16bit"] / "model.safetensors").exists()
    assert exported["merged_stopped"], exported["merged_reply"]


def _gguf_toolchain_missing() -> str | None:
    from sftlib.exports.gguf.setup import find_toolchain

    try:
        find_toolchain()
        import llama_cpp  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any reason it is unusable is the skip reason
        return f"GGUF toolchain not built (`make gguf-deps`): {exc}"
    return None


@pytest.mark.notebooks
def test_04_export_gguf_and_modelfile(exported, workdir):
    """The GGUF cell for real: q8_0 of the demo model, verified in llama.cpp, with its Ollama Modelfile."""
    missing = _gguf_toolchain_missing()
    assert missing is None, missing  # `make test` builds it; a missing toolchain is a failure, not a skip
    result = _execute(workdir, "04_export", "04_export_gguf", EXPORT_FORMATS="lora,merged_16bit,gguf",
                      GGUF_QUANTIZATIONS="q8_0", EXPORT_DIR="outputs/gguf-export",
                      ADAPTERS="outputs/demo/model/lora", PROMPT=DEMO_PROMPT,
                      MAX_NEW_TOKENS=32)
    gguf = workdir / result["written"]["gguf"]
    assert sorted(p.name for p in gguf.iterdir()) == ["Modelfile", "gguf_report.json", "sftlib-demo-sft.Q8_0.gguf"]
    report = json.loads((gguf / "gguf_report.json").read_text())
    assert [(o["format"], o["ok"]) for o in report["items"]] == [("gguf:q8_0", True)]
    assert "<|im_end|>" in (gguf / "Modelfile").read_text()


@pytest.mark.notebooks
def test_nbval_reruns_the_notebooks_and_the_checked_cells_agree(data_report, evaluated, exported, workdir):
    """nbval --nbval-lax re-runs the executed 01, 03 and 04 in the folder of their runs and compares the
    cells marked `# NBVAL_CHECK_OUTPUT` (sanitized as tests/nbval_sanitize.cfg says).

    00, 02 and 05 are not re-run: their marked cells hold the config and the file list, which their papermill
    runs above already check, and re-running them would double the training time of this file."""
    order = ["01_data_and_templates", "03_inference_and_eval", "04_export"]
    marked = sum(src.startswith("# NBVAL_CHECK_OUTPUT") for n in order for src in _code_cells(_read(n)))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", "--nbval-current-env",
         "--sanitize-with", str(SANITIZE), *[f"{n}.ipynb" for n in order]],
        cwd=workdir, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-6000:]
    passed = int(re.search(r"(\d+) passed", out.stdout).group(1))
    assert passed >= marked >= 8


@pytest.mark.notebooks
def test_nbval_catches_a_changed_output(tmp_path):
    """The comparison above can fail: a marked cell whose stored output differs is reported."""
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    checked = nbformat.v4.new_code_cell('# NBVAL_CHECK_OUTPUT\nprint("detected format: sharegpt")', execution_count=1)
    checked.outputs = [nbformat.v4.new_output("stream", name="stdout", text="detected format: alpaca\n")]
    unchecked = nbformat.v4.new_code_cell('print("anything")', execution_count=2)
    unchecked.outputs = [nbformat.v4.new_output("stream", name="stdout", text="something else\n")]
    nb.cells = [checked, unchecked]
    nbformat.write(nb, tmp_path / "tampered.ipynb")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                          "--nbval-current-env", "--sanitize-with", str(SANITIZE), "tampered.ipynb"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert "1 failed, 1 passed" in out.stdout and "alpaca" in out.stdout, out.stdout[-3000:]


@pytest.mark.notebooks
def test_a_dummy_token_never_reaches_outputs_or_files(exported, workdir, monkeypatch):
    """04 with a Hub repo and a token in the environment: the upload fails here (no Hub), and the token
    appears in no cell output of the executed notebook and in no file the runs wrote."""
    import papermill

    token = "hf_sftlibDummyTokenNeverShown0123456789"
    monkeypatch.setenv("HF_TOKEN", token)  # the kernel inherits this environment
    out = workdir / "04_secret.ipynb"
    with pytest.raises(papermill.PapermillExecutionError):
        papermill.execute_notebook(str(REPO / "notebooks" / "04_export.ipynb"), str(out),
                                   parameters={"PRESET": "cpu-demo", "EXPORT_FORMATS": "lora",
                                               "ADAPTERS": "outputs/demo/model/lora",
                                               "EXPORT_DIR": "outputs/secret-export", "HUB_REPO": "someone/demo",
                                               "PROMPT": DEMO_PROMPT, "MAX_NEW_TOKENS": 8},
                                   kernel_name="python3", cwd=str(workdir), progress_bar=False,
                                   execution_timeout=600)
    assert out.exists() and "someone/demo" in out.read_text()  # it did get as far as the upload
    scanned = 0
    for path in workdir.rglob("*"):
        if path.is_file() and path.stat().st_size < 200 * 2 ** 20:
            assert token.encode() not in path.read_bytes(), path
            scanned += 1
    assert scanned > 20
