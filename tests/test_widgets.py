"""The settings form and the notebook helpers, without a browser (as papermill runs them).

    pytest tests/test_widgets.py -q
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import ipywidgets as w
import pytest

from sftlib.config import PRESETS, ConfigError, RunConfig
from sftlib.notebook.form import PARAMETERS, WIDGET, ConfigForm

REPO = Path(__file__).resolve().parents[1]


def test_headless_form_holds_exactly_the_injected_values():
    """What papermill injects is what form.config() returns, even outside the sliders' usual ranges."""
    values = {"lora.r": 256, "lora.alpha": 3, "train.learning_rate": 0.5, "train.batch_size": 128,
              "model.max_seq_length": 300, "lora.dropout": 0.9, "export.formats": "lora,merged_16bit",
              "data.max_rows": 100, "data.mapping": {"messages": "dialog"}, "train.epochs": 0.25}
    form = ConfigForm("cpu-demo", values)
    expected = RunConfig.preset("cpu-demo").with_overrides(values, source=PARAMETERS)
    assert form.config() == expected
    assert form.config().sources == expected.sources
    # The widgets show those values too: sliders were widened, not clamped.
    assert form.widgets["lora.r"].value == 256
    assert form.widgets["train.learning_rate"].value == 0.5
    assert form.widgets["train.batch_size"].value == 128
    assert form.widgets["lora.dropout"].value == 0.9
    assert form.widgets["model.max_seq_length"].value == 300
    assert form.widgets["train.epochs"].value == 0.25
    assert form.widgets["export.formats"].value == "lora, merged_16bit"


def _browser_echo(widget: w.Widget):
    """The value a browser's view sends back after showing `widget.value` (ipywidgets' own rounding).

    Sliders snap to their step (a log slider snaps the exponent), then the value travels as JSON.
    Number boxes, text boxes and selections send back what they were given."""
    value = widget.value
    if isinstance(widget, w.FloatLogSlider):
        exp = widget.min + round((math.log(value, widget.base) - widget.min) / widget.step) * widget.step
        value = widget.base ** exp
    elif isinstance(widget, (w.FloatSlider, w.IntSlider)):
        value = widget.min + round((value - widget.min) / widget.step) * widget.step
    return json.loads(json.dumps(value))


def _echo_all(form: ConfigForm) -> None:
    for widget in form.widgets.values():
        if not isinstance(widget, (w.SelectMultiple, w.SelectionSlider, w.Dropdown)):  # these send an index
            widget.set_state({"value": _browser_echo(widget)})  # as a comm message from the frontend lands


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_showing_the_form_changes_nothing(preset):
    """What the browser sends back after rendering the form is not an edit: every value stays exactly the
    preset's (3e-4 stays 3e-4, not 3.1623e-4; 3 epochs stay 3, not 3.0000000000000004)."""
    form = ConfigForm(preset, {"train.max_steps": 60})
    expected = RunConfig.preset(preset).with_overrides({"train.max_steps": 60}, source=PARAMETERS)
    _echo_all(form)
    _echo_all(form)
    assert form.config() == expected and form.config().to_yaml() == expected.to_yaml()
    assert WIDGET not in form.config().sources.values()
    assert form.yaml() == expected.to_yaml()  # the YAML tab shows what trains


def test_numbers_are_exact_number_boxes_that_never_clamp():
    form = ConfigForm("article")
    for key in ("train.learning_rate", "train.epochs", "lora.dropout", "train.batch_size", "train.warmup_steps"):
        assert isinstance(form.widgets[key], (w.FloatText, w.IntText)), key
    assert form.widgets["train.learning_rate"].value == 3e-4  # exactly, not to a slider's step
    form.widgets["train.learning_rate"].value = 10  # typed: kept as typed and refused, not clamped to 1e-2
    assert form.widgets["train.learning_rate"].value == 10
    assert any(p.key == "train.learning_rate" for p in form.problems)
    assert "color:#c00" in form._problem_labels["train.learning_rate"].value
    with pytest.raises(ConfigError, match="train.learning_rate"):
        form.config()
    form.widgets["train.learning_rate"].value = 5e-4
    form.widgets["train.batch_size"].value = 100  # past any slider's end, and valid
    cfg = form.config()
    assert (cfg.train.learning_rate, cfg.train.batch_size) == (5e-4, 100)


def test_a_float_sent_back_with_its_last_bit_changed_is_not_an_edit():
    form = ConfigForm("cpu-demo")
    form.widgets["train.epochs"].set_state({"value": 3.0000000000000004})
    form.widgets["train.learning_rate"].set_state({"value": 2e-3 * (1 + 1e-15)})
    cfg = form.config()
    assert cfg.train.epochs == 3 and cfg.train.learning_rate == 2e-3
    assert cfg.sources["train.learning_rate"] == "preset:cpu-demo"
    assert form.widgets["train.learning_rate"].value == 2e-3  # the exact value is shown again
    form.widgets["train.learning_rate"].value = 2.5e-3  # a real change is an edit
    assert form.config().sources["train.learning_rate"] == WIDGET


def test_a_preset_switch_resets_every_field_not_edited():
    form = ConfigForm("article")
    _echo_all(form)
    form.widgets["lora.dropout"].value = 0.1  # the one edit
    form.preset_widget.value = "cpu-demo"
    _echo_all(form)
    assert form.config() == RunConfig.preset("cpu-demo", {"lora.dropout": 0.1})
    assert form.config().sources["lora.dropout"] == WIDGET
    form.widgets["lora.dropout"].value = 0.0  # typed back to the preset's value: still the user's choice
    form.preset_widget.value = "article"
    assert form.config() == RunConfig.preset("article", {"lora.dropout": 0.0})


def test_the_config_is_a_copy_that_later_steps_may_change():
    form = ConfigForm("article")
    cfg = form.config()
    cfg.train.optim = "adamw_torch"  # what sftlib.training.backend.resolve does on a CPU
    assert form.config().train.optim == "adamw_8bit" and form.widgets["train.optim"].value == "adamw_8bit"


def test_none_keeps_the_preset_value_and_the_preset_fills_the_rest():
    form = ConfigForm("cpu-demo", {"model.name": None, "lora.r": 32})
    cfg = form.config()
    assert cfg.model.name == "demo" and cfg.lora.r == 32
    assert cfg.sources["model.name"] == "preset:cpu-demo" and cfg.sources["lora.r"] == PARAMETERS
    assert cfg.train.batch_size == PRESETS["cpu-demo"].values["train.batch_size"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_a_valid_form(preset):
    form = ConfigForm(preset)
    assert form.config() == RunConfig.preset(preset)
    assert form.problems == []


def test_editing_a_widget_changes_the_config_and_says_so():
    form = ConfigForm("cpu-demo", {"lora.r": 16})
    form.widgets["lora.r"].value = 64
    form.widgets["model.chat_template"].value = "llama-3.1"
    form.widgets["train.packing"].value = False
    form.widgets["lora.target_modules"].value = "q_proj, v_proj"
    form.widgets["data.mapping"].value = "{messages: dialog, user: human}"
    cfg = form.config()
    assert (cfg.lora.r, cfg.model.chat_template, cfg.train.packing) == (64, "llama-3.1", False)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.mapping == {"messages": "dialog", "user": "human"}
    assert cfg.sources["lora.r"] == WIDGET
    assert "widget" in form._source_labels["lora.r"].value
    assert "lora:\n  r: 64" in form.yaml_view.value  # the YAML view follows


def test_a_bad_value_is_shown_inline_and_config_refuses():
    form = ConfigForm("cpu-demo")
    form.widgets["train.max_steps"].value = 0
    assert any(p.key == "train.max_steps" for p in form.problems)
    assert "train.max_steps" in form._problem_labels["train.max_steps"].value
    assert "problem" in form.status.value and "color:#c00" in form.status.value
    with pytest.raises(ConfigError, match="train.max_steps"):
        form.config()
    form.widgets["train.max_steps"].value = 5  # fixed: the message goes away
    assert form.problems == [] and form._problem_labels["train.max_steps"].value == ""
    assert form.config().train.max_steps == 5


def test_wrong_types_from_text_boxes_and_parameters_are_named():
    form = ConfigForm("cpu-demo", {"train.learning_rate": "fast"})
    assert any(p.message.startswith("`train.learning_rate` must be a finite number") for p in form.problems)
    form.widgets["data.max_rows"].value = "many"
    assert any(p.message.startswith("`data.max_rows` must be an integer or null") for p in form.problems)
    form.widgets["data.max_rows"].value = ""  # empty text box = null
    form.set("train.learning_rate", 1e-3)
    cfg = form.config()
    assert cfg.data.max_rows is None and cfg.train.learning_rate == 1e-3


def test_several_problems_are_listed_together():
    form = ConfigForm("cpu-demo", {"lora.r": -1, "train.batch_size": 0, "export.push_to_hub": True})
    assert len(form.problems) == 3
    with pytest.raises(ConfigError) as err:
        form.config()
    assert len(err.value.problems) == 3


def test_changing_the_preset_keeps_parameters_and_edits():
    form = ConfigForm("cpu-demo", {"train.max_steps": 7})
    form.widgets["lora.r"].value = 32
    form.preset_widget.value = "h100"
    cfg = form.config()
    assert cfg.model.name == RunConfig().model.name and cfg.train.batch_size == 16  # from the preset
    assert cfg.train.max_steps == 7 and cfg.lora.r == 32  # kept
    assert form.widgets["train.batch_size"].value == 16 and form.widgets["model.name"].value == cfg.model.name


def test_unknown_keys_and_presets_fail_at_once():
    with pytest.raises(ConfigError, match="did you mean `lora.r`"):
        ConfigForm("cpu-demo", {"lora.rr": 8})
    with pytest.raises(ConfigError, match="did you mean `cpu-demo`"):
        ConfigForm("cpu_demo")


def test_every_field_has_a_widget_with_its_help_as_tooltip():
    from sftlib.config import FIELDS as _FIELDS

    form = ConfigForm("article")
    assert set(form.widgets) == set(_FIELDS)
    for key, widget in form.widgets.items():
        assert widget.tooltip == _FIELDS[key].metadata["help"] and widget.tooltip
    assert isinstance(form.widgets["lora.r"], w.SelectionSlider)
    assert isinstance(form.widgets["train.optim"], w.Dropdown)
    assert isinstance(form.widgets["export.gguf_quantizations"], w.SelectMultiple)
    assert isinstance(form.widgets["train.packing"], w.Checkbox)


def test_sections_limit_the_widgets_not_the_config():
    form = ConfigForm("cpu-demo", {"lora.r": 8}, sections=("data",))
    assert all(k.startswith("data.") for k in form.widgets)
    assert form.config().lora.r == 8


def test_yaml_view_round_trips():
    form = ConfigForm("colab-t4", {"lora.r": 32, "data.split": "train[:100]"})
    assert RunConfig.from_yaml(form.yaml()) == form.config()


def test_display_bundle_has_a_text_summary():
    bundle = ConfigForm("cpu-demo")._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"].startswith("preset: cpu-demo")


def test_the_training_path_never_imports_widgets():
    """Only notebooks import ipywidgets/IPython: a run from the command line must not need them."""
    allowed = {"widgets.py", "notebook.py"}
    for path in (REPO / "sftlib").glob("*.py"):
        if path.name in allowed:
            continue
        text = path.read_text(encoding="utf-8")
        for name in ("ipywidgets", "IPython", "sftlib.notebook.form", "sftlib.notebook.helpers"):
            assert f"import {name}" not in text and f"from {name}" not in text, f"{path.name} imports {name}"
    code = ("import sys, sftlib.steps, sftlib.training.trainer, sftlib.training.model, sftlib.exports.merged, sftlib.infer, "
            "sftlib.checks.evaluate, sftlib.cli, sftlib.config; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ipywidgets', 'IPython', 'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- notebook helpers -------------------------------------------------------------------------------


def test_raw_rows_are_the_stored_rows_cut_to_max_rows():
    from sftlib import notebook as nb

    raw = nb.raw_rows(RunConfig.preset("cpu-demo", {"data.max_rows": 7}).data)
    assert len(raw) == 7 and raw.column_names == ["conversations"]


def test_adapters_folder_says_what_to_run_when_missing(tmp_path):
    from sftlib import notebook as nb

    cfg = RunConfig.preset("cpu-demo", {"export.output_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="run 02_train"):
        nb.adapters_folder("", cfg)
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")
    assert nb.adapters_folder("", cfg) == tmp_path / "lora"
    assert nb.adapters_folder(str(tmp_path / "lora"), cfg) == tmp_path / "lora"


def test_live_loss_plot_records_and_redraws(monkeypatch):
    """The callback as the Trainer calls it: every logged loss kept, redraws throttled, one at the end."""
    from types import SimpleNamespace

    import matplotlib

    matplotlib.use("Agg")
    from sftlib import notebook as nb

    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, display_id=None: shown.append(obj) or
                        SimpleNamespace(update=shown.append))
    plot = nb.live_loss_plot(every_s=3600)
    for step, loss in ((1, 3.0), (2, 2.0), (3, 1.5)):
        plot.on_log(None, SimpleNamespace(global_step=step, max_steps=3), None, logs={"loss": loss})
    plot.on_log(None, SimpleNamespace(global_step=3, max_steps=3), None, logs={"eval_loss": 9.0})
    plot.on_train_end(None, SimpleNamespace(global_step=3, max_steps=3), None)
    assert plot.losses == [(1, 3.0), (2, 2.0), (3, 1.5)]
    assert plot.draws == 2 and len(shown) == 2  # the first log, then the end; the rest were throttled
    assert len(shown[-1].axes) == 1 and plot.margins == []

    pref = nb.live_preference_plot(every_s=3600)  # preference tuning: TRL's reward margin in a second panel
    for step, loss, margin in ((1, 0.69, 0.0), (2, 0.6, 0.4)):
        pref.on_log(None, SimpleNamespace(global_step=step, max_steps=2), None,
                    logs={"loss": loss, "rewards/margins": margin})
    pref.on_train_end(None, SimpleNamespace(global_step=2, max_steps=2), None)
    assert pref.losses == [(1, 0.69), (2, 0.6)] and pref.margins == [(1, 0.0), (2, 0.4)]
    assert [ax.get_title() for ax in shown[-1].axes] == ["step 2: loss 0.600", "step 2: margin 0.400"]


def test_save_results_writes_plain_json(tmp_path):
    from sftlib import notebook as nb

    path = tmp_path / "sub" / "results.json"
    plain = nb.save_results(path, {"loss": math.nan, "path": tmp_path, "pairs": [(1, 2.5)], "ok": True})
    assert json.loads(path.read_text()) == plain == {"loss": None, "path": str(tmp_path), "pairs": [[1, 2.5]],
                                                    "ok": True}
    assert nb.save_results("", {"a": 1}) == {"a": 1}  # no path: nothing written
