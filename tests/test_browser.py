"""The notebooks in a real browser: JupyterLab with ipywidgets, driven through its UI by Playwright and Chromium.

    make browser-test          # installs chromium when missing (apt-get), then runs this file
    pytest -m browser tests/test_browser.py -q

The cells run one by one (Shift+Enter, waiting for each), as a person runs them, so the browser renders the
form and sends its widgets' state back before the next cell reads it: the case papermill never sees. With
`PRESET = "cpu-demo"` each notebook must train on exactly the preset's values, an edit in the form must
change exactly that field, and a value out of range must show in red and stop `form.config()`.
Screenshots are saved under outputs/browser/. Without chromium or playwright the test fails, saying so.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from sftlib.config import RunConfig

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "outputs" / "browser"
MAX_STEPS = 20
# The parameters cell's own values that override cpu-demo's, plus what this test injects.
PARAMETERS = {
    "00_quickstart": {"lora.r": 16, "lora.alpha": 16, "train.max_steps": MAX_STEPS},
    "02_train": {"lora.r": 16, "lora.alpha": 16, "train.max_steps": MAX_STEPS, "train.save_steps": 200},
}


def _chromium() -> str:
    for path in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium"):
        if path and os.path.exists(path):
            return path
    pytest.fail("no chromium found: install it with `apt-get install -y chromium` (`make browser-test` does)")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on 127.0.0.1 with a token, in a temp folder holding the notebooks with PRESET = cpu-demo;
    its kernels import this checkout."""
    try:
        from papermill.parameterize import parameterize_notebook
    except ImportError as exc:  # pragma: no cover - papermill is in requirements-cpu.txt
        pytest.fail(f"papermill is needed to inject the parameters: {exc}")
    if subprocess.run([sys.executable, "-c", "import jupyterlab"], capture_output=True).returncode != 0:
        pytest.fail("jupyterlab is not installed: `pip install -r requirements-cpu.txt`")
    root = tmp_path_factory.mktemp("lab")
    for name in PARAMETERS:
        nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
        for cell in nb.cells:  # papermill reads every cell's tags and the notebook's papermill record
            cell.metadata.setdefault("tags", [])
        nb.metadata.setdefault("papermill", {})
        nb = parameterize_notebook(nb, {"PRESET": "cpu-demo", "MAX_STEPS": MAX_STEPS,
                                        "RESULTS_PATH": str(root / f"{name}.json")})
        nbformat.write(nb, root / f"{name}.ipynb")
    settings = root / ".settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "JUPYTERLAB_SETTINGS_DIR": str(root / ".settings"), "JUPYTERLAB_WORKSPACES_DIR": str(root / ".workspaces"),
           "JUPYTER_RUNTIME_DIR": str(root / ".runtime")}
    log = open(root / "lab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.news_url=", "--allow-root",
         "--ServerApp.disable_check_xsrf=False"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail(f"JupyterLab did not start:\n{(root / 'lab.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield {"url": url, "token": token, "root": root}
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.fail(f"playwright is not installed (`pip install -r requirements-cpu.txt`): {exc}")
    executable = _chromium()
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture()
def page(browser):
    """A fresh browser context for each notebook: no tab, focus or kernel status left from the one before."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    yield context.new_page()
    context.close()


def _open(page, lab, name: str):
    # a workspace of its own, reset: JupyterLab would otherwise reopen the notebooks of the test before
    page.goto(f"{lab['url']}/lab/workspaces/{name}/tree/{name}.ipynb?reset&token={lab['token']}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
    page.locator(".jp-StatusBar-Widget", has_text="| Idle").first.wait_for(timeout=90_000)  # the kernel is up
    return page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell")


def _wait_done(cell, what: str, timeout: float = 600) -> None:
    """Until the code cell's prompt shows its execution count ([*] while it runs)."""
    prompt = cell.locator(".jp-InputPrompt")
    deadline = time.time() + timeout
    while True:
        text = prompt.inner_text().strip()
        if re.fullmatch(r"\[\d+\]:", text):
            return
        if time.time() > deadline:
            pytest.fail(f"{what} did not finish in {timeout} s (prompt {text!r})")
        time.sleep(0.3)


def _run_one_by_one(page, cells, name: str) -> None:
    """Shift+Enter on each cell in turn, each finishing before the next, failing on the first traceback."""
    count = cells.count()
    cells.first.click(position={"x": 5, "y": 5})  # the margin: selects the cell without editing it
    page.keyboard.press("Escape")
    for i in range(count):
        cell = cells.nth(i)
        page.keyboard.press("Shift+Enter")
        if "jp-CodeCell" not in (cell.get_attribute("class") or ""):
            continue
        _wait_done(cell, f"{name} cell {i}")
        out = cell.locator(".jp-OutputArea").inner_text()
        assert "Traceback (most recent call last)" not in out, f"{name} cell {i} failed:\n{out[-3000:]}"


def _field(form, label: str):
    """The input of the form's widget labelled `label`."""
    return form.locator(".widget-inline-hbox", has=form.page.locator(".widget-label", has_text=label)).filter(
        has=form.page.locator("input")).first.locator("input")


def _yaml_tab(form) -> dict:
    form.locator(".lm-TabBar-tab", has_text="config (YAML)").click()
    text = form.locator("pre").first.inner_text()
    return RunConfig.from_yaml(text).to_dict()


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_notebook_in_a_browser(lab, page, name):
    started = time.time()
    cells = _open(page, lab, name)
    _run_one_by_one(page, cells, name)
    page.screenshot(path=str(SHOTS / f"{name}-ran.png"), full_page=True)

    expected = RunConfig.preset("cpu-demo").with_overrides(PARAMETERS[name]).to_dict()
    results = json.loads((lab["root"] / f"{name}.json").read_text())
    assert results["config"] == expected, "the config that trained differs from the preset's"
    assert results["steps"] == MAX_STEPS

    # The form rendered as widgets (not the text summary), its YAML tab showing what trained.
    form_cell = cells.filter(has_text="form = ConfigForm(PRESET").first
    form = form_cell.locator(".jp-OutputArea .widget-tab").first
    assert form.is_visible(), "the form did not render as widgets"
    assert _yaml_tab(form) == expected
    # The loss plot was drawn.
    train_cell = cells.filter(has_text="live_loss_plot()").first
    assert train_cell.locator(".jp-OutputArea img").count() >= 1, "no loss plot"

    # An edit in the browser changes exactly that field.
    form.locator(".lm-TabBar-tab", has_text="lora").first.click()
    dropout = _field(form, "dropout")
    dropout.fill("0.05")
    dropout.press("Enter")
    page.wait_for_timeout(1000)
    assert _yaml_tab(form) == {**expected, "lora": {**expected["lora"], "dropout": 0.05}}

    # A value out of range stays as typed, shows in red and stops form.config().
    form.locator(".lm-TabBar-tab", has_text="train").first.click()
    lr = _field(form, "learning_rate")
    lr.fill("10")
    lr.press("Enter")
    problem = form_cell.locator(".jp-OutputArea span", has_text="`train.learning_rate` must be in (0, 1]").first
    problem.wait_for(timeout=10_000)
    assert problem.evaluate("e => getComputedStyle(e).color") == "rgb(204, 0, 0)"
    assert float(lr.input_value()) == 10, "the value typed was changed"
    page.screenshot(path=str(SHOTS / f"{name}-problem.png"), full_page=True)
    config_cell = cells.filter(has_text="cfg = form.config()").first
    config_cell.click(position={"x": 5, "y": 5})
    page.keyboard.press("Escape")
    page.keyboard.press("Control+Enter")
    config_cell.locator(".jp-OutputArea", has_text="ConfigError").wait_for(timeout=60_000)
    assert "train.learning_rate" in config_cell.locator(".jp-OutputArea").inner_text()
    print(f"{name}: {time.time() - started:.0f} s in the browser")
