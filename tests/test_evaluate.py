"""Before/after figures: the table, the JSON a papermill run leaves, the loss plot (matplotlib optional).

    pytest tests/test_evaluate.py -q
"""

from __future__ import annotations

import json
import math
import sys

import pytest

from sftlib.checks.evaluate import figures, figures_of, plot_loss, results_html, results_table, write_figures
from sftlib.steps import RunResult


def _result() -> RunResult:
    return RunResult(before={"loss": 2.5, "perplexity": math.exp(2.5), "tokens": 120},
                     after={"loss": 0.5, "perplexity": math.exp(0.5), "tokens": 120},
                     accuracy_before=0.0, accuracy_after=0.75,
                     train={"steps": 3, "tokens_seen": 900, "runtime_s": 1.5, "tokens_per_s": 600.0,
                            "peak_memory_gib": 0.4, "losses": [[1, 3.0], [2, 2.0], [3, 1.0]]})


def test_figures_table_and_json(tmp_path):
    figs = figures_of(_result())
    assert figs["heldout_loss"] == {"before": 2.5, "after": 0.5, "change": -2.0}
    assert figs["exact_answers"]["change"] == pytest.approx(0.75)
    assert figs["train"]["first_loss"] == 3.0 and figs["train"]["final_loss"] == 1.0
    table = results_table(figs)
    lines = table.splitlines()
    assert lines[0].split() == ["figure", "before", "after", "change"]
    assert "held-out loss" in lines[2] and lines[2].split()[-3:] == ["2.500", "0.500", "-2.000"]
    assert "+75.0 pts" in table and "loss 3.000 -> 1.000" in table
    assert "<td style='padding:2px 10px'>held-out perplexity</td>" in results_html(figs)
    path = write_figures(tmp_path / "out" / "figures.json", figs)
    assert json.loads(path.read_text()) == figs


def test_missing_figures_become_null_not_nan(tmp_path):
    figs = figures({"loss": math.nan, "perplexity": math.nan, "tokens": 0}, {"loss": 1.0, "perplexity": math.e})
    assert figs["heldout_loss"] == {"before": None, "after": 1.0, "change": None}
    assert "exact_answers" not in figs and "train" not in figs
    json.loads(write_figures(tmp_path / "f.json", figs).read_text())  # strict JSON: no NaN
    assert figures({}, {}) == {}


def test_loss_plot_is_a_figure():
    pytest.importorskip("matplotlib")
    result = _result()
    fig = plot_loss(result.train["losses"], heldout=(result.before["loss"], result.after["loss"]))
    ax = fig.axes[0]
    assert list(ax.lines[0].get_ydata()) == [3.0, 2.0, 1.0] and len(ax.lines) == 3  # the curve and two markers
    assert [line.get_label() for line in ax.lines[1:]] == ["held-out loss before", "held-out loss after"]


def test_loss_plot_without_matplotlib_is_none_with_a_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert plot_loss(_result().train["losses"]) is None


def test_training_path_does_not_import_matplotlib():
    import subprocess

    code = ("import sys, sftlib.steps, sftlib.checks.evaluate, sftlib.checks.preflight, sftlib.training.trainer; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
