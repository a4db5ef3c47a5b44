"""A widget form over a `RunConfig`: preset, fields with their help, problems shown as you type.

    from sftlib.notebook.form import ConfigForm
    form = ConfigForm(PRESET, {"lora.r": LORA_R, "train.max_steps": MAX_STEPS})   # from the parameters cell
    form                      # in Jupyter/Colab: preset dropdown, one tab per section, the resolved YAML
    cfg = form.config()       # the RunConfig; raises ConfigError listing every problem

The form holds no value of its own. Its state is a preset name plus overrides (the parameters cell's,
then the widgets'); every value shown is read back from `RunConfig.preset(preset).with_overrides(...)`.
So headless (papermill, no frontend) `form.config()` is exactly the preset with the injected
parameters, and a field the config does not have cannot be added. A parameter left at `None` keeps
the preset's value.

Numbers are typed into number boxes, never sliders: a browser's slider rounds a value to its step and
sends the rounded value back (3e-4 came back as 3.1623e-4), and clamps what is typed to its range. A
number box holds exactly what the preset or the parameters cell said, and a value out of range stays
as typed and is listed as a problem. What the browser sends back of a value the form wrote is not an
edit: only a change to a different value is (a float within 1e-9 of the shown one is the same value).

Precedence, lowest first: the preset; the parameters cell; edits in the widgets. Changing the preset
refills every field that neither the parameters cell nor a widget edit has set. The YAML tab shows
the config `form.config()` returns, which is what trains.

Only notebooks import this module (it needs ipywidgets); the training path never does.
"""

from __future__ import annotations

import copy
import dataclasses
import html
import math
from typing import Any, Mapping

import ipywidgets as w
import yaml

from sftlib.config import FIELDS, PRESETS, ConfigError, Problem, RunConfig, get_value, template_names

PARAMETERS = "parameters cell"  # the source name `describe()` shows for values from the parameters cell
WIDGET = "widget"
SECTIONS = ("model", "lora", "data", "train", "export", "backend")
# Fields picked from usual values: a selection slider sends back the option itself, so it round-trips
# exactly; a value outside the list is added to it, and validation alone decides what is allowed.
_STEPS = {
    "lora.r": (4, 8, 16, 32, 64, 128),
    "lora.alpha": (4, 8, 16, 32, 64, 128),
    "model.max_seq_length": (256, 512, 1024, 2048, 4096, 8192),
}


def _style(widget: w.Widget) -> w.Widget:
    widget.style = {"description_width": "170px"}
    widget.layout = w.Layout(width="440px")
    return widget


def _make_widget(key: str, value: Any, f: dataclasses.Field) -> w.Widget:
    """A widget showing `value` for field `key`, with the field's help as its tooltip."""
    kw = dict(description=key.rpartition(".")[2], tooltip=f.metadata.get("help", ""))
    choices = tuple(f.metadata.get("choices", ())) or (template_names() if key == "model.chat_template" else ())
    if f.type is bool:
        return w.Checkbox(value=value, indent=False, **kw)
    if choices and isinstance(value, list):
        options = list(choices) + [v for v in value if v not in choices]  # an unknown item stays visible
        return _style(w.SelectMultiple(options=options, value=tuple(value), rows=min(6, len(options)), **kw))
    if choices:
        options = list(choices) + ([value] if value not in choices else [])
        return _style(w.Dropdown(options=options, value=value, **kw))
    if key in _STEPS and isinstance(value, int):
        options = sorted(set(_STEPS[key]) | {value})
        return _style(w.SelectionSlider(options=options, value=value, **kw))
    if f.type is int and isinstance(value, int):
        return _style(w.IntText(value=value, **kw))
    if f.type is float and isinstance(value, (int, float)):
        return _style(w.FloatText(value=value, **kw))
    return _style(w.Text(value=_as_text(value), **kw))


def _as_text(value: Any) -> str:
    """How a non-scalar value is typed into a text box: lists as `a, b`, mappings as YAML flow, None as ``."""
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(value)
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip() if value else ""
    return str(value)


def _from_widget(key: str, widget: w.Widget) -> Any:
    """The value a widget holds, in a form `RunConfig.with_overrides` coerces (and reports when it cannot)."""
    value = widget.value
    if isinstance(widget, w.SelectMultiple):
        return list(value)
    if isinstance(widget, w.Text) and FIELDS[key].type is not str:
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            return value  # with_overrides reports the wrong type, naming the field
        return parsed
    return value


class ConfigForm:
    """A preset dropdown and one widget per config field, over a preset plus overrides (see the module doc)."""

    def __init__(self, preset: str = "article", values: Mapping[str, Any] | None = None, *,
                 sections: tuple[str, ...] = SECTIONS, source: str = PARAMETERS):
        if preset not in PRESETS:
            RunConfig.preset(preset)  # raises ConfigError with the known names and a "did you mean"
        unknown = [k for k in (values or {}) if k not in FIELDS]
        if unknown:
            raise ConfigError([f"form value for unknown key `{k}`" + _close(k) for k in unknown])
        bad_sections = [s for s in sections if s not in SECTIONS]
        if bad_sections:
            raise ConfigError(f"`sections` has unknown names {bad_sections}; known: {', '.join(SECTIONS)}")
        self.preset = preset
        # Insertion-ordered key -> (value, source); None means "the preset's value" and is not stored.
        self._overrides: dict[str, tuple[Any, str]] = {
            k: (v, source) for k, v in (values or {}).items() if v is not None}
        self._syncing = False  # True while the form writes into its own widgets: not a user edit
        self._shown: dict[str, Any] = {}  # key -> the value the form last wrote into its widget
        self.problems: list[Problem] = []
        self._cfg = RunConfig()
        self._resolve()
        self.widgets: dict[str, w.Widget] = {}
        self._source_labels: dict[str, w.HTML] = {}
        self._problem_labels: dict[str, w.HTML] = {}
        self._build(sections)
        self._refresh()

    # ---- state --------------------------------------------------------------------------------------

    def _resolve(self) -> None:
        """Recompute the config and its problems from the preset and the overrides."""
        cfg, problems = RunConfig.preset(self.preset, validate=False), []
        for key, (value, source) in self._overrides.items():
            try:  # one key at a time, so one wrong value does not hide the others
                cfg = cfg.with_overrides({key: value}, validate=False, source=source)
            except ConfigError as exc:
                problems += exc.problems
        try:
            cfg.validate()
        except ConfigError as exc:
            problems += exc.problems
        self._cfg, self.problems = cfg, problems

    def set(self, key: str, value: Any) -> None:
        """Set one field as if it were edited in its widget (`None` = back to the preset's value)."""
        if key not in FIELDS:
            raise ConfigError(f"unknown key `{key}`" + _close(key))
        if value is None:
            self._overrides.pop(key, None)
        else:
            self._overrides.pop(key, None)  # re-inserted last: a later edit wins over an earlier one
            self._overrides[key] = (value, WIDGET)
        self._resolve()
        self._refresh()

    def set_preset(self, name: str) -> None:
        """Switch presets; fields set in the parameters cell or in a widget keep their values."""
        if name not in PRESETS:
            RunConfig.preset(name)
        self.preset = name
        self._resolve()
        self._refresh()

    def config(self) -> RunConfig:
        """The resolved RunConfig; raises ConfigError listing every problem the form shows."""
        if self.problems:
            raise ConfigError(self.problems)
        # A copy: later steps adapt their config to the backend in place, and the form must not follow.
        return copy.deepcopy(self._cfg)

    def yaml(self) -> str:
        """The resolved config as YAML, as `python -m sftlib train --config` reads it."""
        return self._cfg.to_yaml()

    def describe(self) -> str:
        """Every value and where it came from, then the problems if any."""
        text = f"preset: {self.preset}\n" + self._cfg.describe()
        if self.problems:
            text += "\n" + str(ConfigError(self.problems))
        return text

    # ---- widgets ------------------------------------------------------------------------------------

    def _build(self, sections: tuple[str, ...]) -> None:
        options = [(preset.label, name) for name, preset in PRESETS.items()]
        self.preset_widget = _style(w.Dropdown(options=options, value=self.preset, description="preset",
                                               tooltip="Fills every field that the parameters cell and your "
                                                       "edits leave unset."))
        self.preset_widget.observe(self._on_preset, names="value")
        self.preset_help = w.HTML()
        self.status = w.HTML()
        self.yaml_view = w.HTML()
        pages, titles = [], []
        for section in sections:
            rows = []
            for key, f in FIELDS.items():
                if key.partition(".")[0] != section and key != section:
                    continue
                widget = _make_widget(key, get_value(self._cfg, key), f)
                widget.observe(lambda change, key=key: self._on_edit(key), names="value")
                self.widgets[key] = widget
                self._source_labels[key] = w.HTML()
                self._problem_labels[key] = w.HTML()
                rows.append(w.HBox([widget, self._source_labels[key], self._problem_labels[key]]))
            pages.append(w.VBox(rows))
            titles.append(section)
        pages.append(self.yaml_view)
        titles.append("config (YAML)")
        self.tabs = w.Tab(children=pages)
        self.tabs.titles = tuple(titles)
        self.widget = w.VBox([w.HBox([self.preset_widget, self.preset_help]), self.status, self.tabs])

    def _on_preset(self, change: dict) -> None:
        if not self._syncing:
            self.set_preset(change["new"])

    def _on_edit(self, key: str) -> None:
        if self._syncing:
            return
        if key in self._shown and _same(self.widgets[key].value, self._shown[key]):
            # The browser sending back what the form wrote (a float's last bit may differ): not an edit.
            self._syncing = True
            try:
                self.widgets[key].value = self._shown[key]
            finally:
                self._syncing = False
            return
        self._shown[key] = self.widgets[key].value  # what the browser may now send back
        self._overrides.pop(key, None)
        self._overrides[key] = (_from_widget(key, self.widgets[key]), WIDGET)
        self._resolve()
        self._refresh()

    def _refresh(self) -> None:
        """Write the resolved values, sources and problems into the widgets (without counting as edits)."""
        if not hasattr(self, "widget"):
            return
        self._syncing = True
        try:
            self.preset_widget.value = self.preset
            self.preset_help.value = f"<i>{html.escape(PRESETS[self.preset].about)}</i>"
            for key, widget in self.widgets.items():
                self._show_value(key, widget)
                source = self._cfg.sources.get(key, "default")
                if key in self._overrides and self._overrides[key][1] == WIDGET:
                    source = WIDGET
                self._source_labels[key].value = f"<span style='color:#888'>{html.escape(source)}</span>"
                mine = [p for p in self.problems if p.key == key]
                self._problem_labels[key].value = "".join(
                    f"<span style='color:#c00'>{html.escape(str(p))}</span><br>" for p in mine)
            if self.problems:
                items = "".join(f"<li>{html.escape(str(p))}</li>" for p in self.problems)
                self.status.value = (f"<div style='color:#c00'><b>{len(self.problems)} problem(s); "
                                     f"<code>form.config()</code> will refuse to run:</b><ul>{items}</ul></div>")
            else:
                self.status.value = "<div style='color:#080'>config is valid</div>"
            self.yaml_view.value = f"<pre>{html.escape(self.yaml())}</pre>"
        finally:
            self._syncing = False

    def _show_value(self, key: str, widget: w.Widget) -> None:
        if key in self._overrides and self._overrides[key][1] == WIDGET:
            return  # keep what the user typed, even where it does not parse
        value = get_value(self._cfg, key)
        if key in self._overrides:
            value = self._overrides[key][0] if _wrong_type(self.problems, key) else value
        try:
            if isinstance(widget, w.SelectMultiple):
                missing = [v for v in value if v not in widget.options]
                if missing:
                    widget.options = list(widget.options) + missing
                widget.value = tuple(value)
            elif isinstance(widget, (w.Dropdown, w.SelectionSlider)):
                if value not in widget.options:
                    widget.options = sorted([*widget.options, value]) if isinstance(widget, w.SelectionSlider) \
                        else [*widget.options, value]
                widget.value = value
            elif isinstance(widget, w.Text):
                widget.value = _as_text(value)
            else:
                widget.value = value
            self._shown[key] = widget.value
        except Exception:  # noqa: BLE001 - a value this widget cannot show is already listed as a problem
            self._shown.pop(key, None)

    def _repr_mimebundle_(self, **kwargs: Any) -> dict:
        bundle = self.widget._repr_mimebundle_(**kwargs) or {}
        bundle["text/plain"] = self.describe()  # what papermill and plain consoles show
        return bundle


def _same(a: Any, b: Any) -> bool:
    """Whether a value sent back by the browser is the one the form wrote (floats to 1e-9, relative)."""
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _wrong_type(problems: list[Problem], key: str) -> bool:
    return any(p.key == key and p.message.startswith(f"`{key}` must be") for p in problems)


def _close(key: str) -> str:
    import difflib

    match = difflib.get_close_matches(key, list(FIELDS), n=1, cutoff=0.6)
    return f"; did you mean `{match[0]}`?" if match else ""
