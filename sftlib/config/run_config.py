"""`RunConfig`: the whole run's settings, built from defaults, a preset, files and overrides.

    from sftlib.config import RunConfig
    cfg = RunConfig.preset("colab-t4", {"lora.r": 32})     # the article's recipe, sized for a T4
    cfg = cfg.with_overrides({"data.source": "chats.jsonl", "train.epochs": 2})
    print(cfg.describe())                                  # each value and where it came from
    cfg.to_yaml("run.yaml")
    assert RunConfig.from_yaml("run.yaml") == cfg

Values are named by dotted keys such as `lora.r`, in files, overrides and error messages alike.
`validate()`, `from_dict()` and `with_overrides()` collect every problem and raise one `ConfigError`
listing them all. This module imports only the standard library and PyYAML, so notebooks and the
command line can build and check a config before torch is loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from sftlib.config.coerce import COERCERS, WrongType
from sftlib.config.fields import (FIELDS, SECTION_HELP, SECTIONS, TopLevel, DataConfig, ExportConfig, LoraConfig,
                                  ModelConfig, TrainConfig, get_value, set_value)
from sftlib.config.presets import PRESETS
from sftlib.config.safe_load import MAX_BYTES, ParseError, load_json, load_yaml
from sftlib.config.problems import (TOKEN_ADVICE, ConfigError, Problem, check, did_you_mean, show, unknown_key)
from sftlib.paths import path_problem
from sftlib.tokens import TOKEN_PATTERN


def _section(cls: type) -> Any:
    name = next(k for k, v in SECTIONS.items() if v is cls)
    return field(default_factory=cls, metadata={"help": SECTION_HELP[name]})


@dataclass
class RunConfig:
    model: ModelConfig = _section(ModelConfig)
    lora: LoraConfig = _section(LoraConfig)
    data: DataConfig = _section(DataConfig)
    train: TrainConfig = _section(TrainConfig)
    export: ExportConfig = _section(ExportConfig)
    backend: str = dataclasses.field(default=TopLevel.backend, metadata=FIELDS["backend"].metadata)
    # Not part of the config's value: left out of to_dict() and of ==.
    sources: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False, metadata={
        "help": "Where each dotted key's value came from (preset:<name>, override, file); missing = default."})

    # ---- building ---------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, validate: bool = True, source: str = "override") -> "RunConfig":
        """Build from nested ({"lora": {"r": 32}}) or dotted ({"lora.r": 32}) keys on top of the defaults."""
        return cls().with_overrides(d, validate=validate, source=source)

    @classmethod
    def preset(cls, name: str, overrides: Mapping[str, Any] | None = None, *, validate: bool = True,
               **kw: Any) -> "RunConfig":
        """A named preset (sftlib/config/presets/NAME.yaml), then overrides (dotted keys; as keywords `lora__r=32`)."""
        if name not in PRESETS:
            raise ConfigError(Problem("preset", f"unknown preset `{name}` (known: {', '.join(PRESETS)})"
                                      + did_you_mean(str(name), PRESETS)))
        cfg = cls().with_overrides(PRESETS[name].values, validate=False, source=f"preset:{name}")
        extra = {**(overrides or {}), **{k.replace("__", "."): v for k, v in kw.items()}}
        return cfg.with_overrides(extra, validate=validate)

    def with_overrides(self, overrides: Mapping[str, Any], *, validate: bool = True,
                       source: str = "override") -> "RunConfig":
        """A copy with dotted (or nested) values replaced; type, key and (if validate) range errors raised together."""
        problems: list[Problem] = []
        new = copy.deepcopy(self)
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"a config must be a mapping of section: fields, got {show(overrides)}")
        for key, value in _flatten(overrides, problems).items():
            f = FIELDS.get(key)
            if f is None:
                problems.append(unknown_key(key))
                if isinstance(value, str) and TOKEN_PATTERN.search(value):
                    problems.append(Problem(key, TOKEN_ADVICE.format(key=key)))
                continue
            choices = f.metadata.get("choices", ())
            if isinstance(value, bool) and "true" in choices:  # YAML reads `gradient_checkpointing: false` as a bool
                value = "true" if value else "false"
            coerce = f.metadata.get("coerce") or COERCERS[f.type]
            try:
                value = coerce(value)
            except WrongType as e:
                problems.append(Problem(key, f"`{key}` must be {e.expected}, got {show(value)}"))
                continue
            if isinstance(value, str) and choices:
                value = _normalise_choice(value, choices)
            elif isinstance(value, list) and choices:
                value = [_normalise_choice(x, choices) for x in value]
            set_value(new, key, value)
            new.sources[key] = source
        if validate:
            problems += check(new)
        if problems:
            raise ConfigError(problems)
        return new

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike, *, validate: bool = True) -> "RunConfig":
        """Load a YAML file (a path) or YAML text; missing keys keep their defaults."""
        text, where = _read_path_or_text(path_or_text, (".yaml", ".yml"))
        try:
            d = load_yaml(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}the YAML does not parse: {_yaml_problem(e)}") from None
        except ParseError as e:
            raise ConfigError(f"{where}{e}") from None
        return cls._from_file(d or {}, where, validate)

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike, *, validate: bool = True) -> "RunConfig":
        """Load a JSON file (a path) or JSON text; missing keys keep their defaults."""
        text, where = _read_path_or_text(path_or_text, (".json",))
        try:
            d = load_json(text)
        except ParseError as e:
            raise ConfigError(f"{where}{e}") from None
        return cls._from_file(d, where, validate)

    @classmethod
    def _from_file(cls, d: Any, where: str, validate: bool) -> "RunConfig":
        try:
            return cls.from_dict(d, validate=validate, source="file")
        except ConfigError as e:  # say which file each problem is in
            raise ConfigError([Problem(p.key, where + p.message) for p in e.problems]) from None

    # ---- writing ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict of every value (no provenance)."""
        d = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        d["backend"] = self.backend
        return d

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        """The config as YAML text; also written to `path` when given."""
        text = yaml.dump(self.to_dict(), Dumper=_YamlDumper, sort_keys=False, width=120)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The config as JSON text; also written to `path` when given."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def describe(self) -> str:
        """A table of every value and where it came from: default, preset:<name>, override, file, set in code."""
        defaults, rows = RunConfig(), []
        for key in FIELDS:
            value, default = get_value(self, key), get_value(defaults, key)
            origin = self.sources.get(key) or ("default" if value == default else "set in code")
            rows.append((key, value if isinstance(value, str) and value else json.dumps(value), origin))
        width = [max(len(r[i]) for r in rows + [("field", "value", "source")]) for i in range(2)]
        lines = [f"{'field':<{width[0]}}  {'value':<{width[1]}}  source"]
        lines += [f"{k:<{width[0]}}  {v:<{width[1]}}  {s}" for k, v, s in rows]
        t = self.train
        lines.append(f"effective batch: {t.batch_size} x {t.grad_accum} = {t.batch_size * t.grad_accum} sequences")
        return "\n".join(lines)

    # ---- checking ---------------------------------------------------------------------------------

    def problems(self) -> list[Problem]:
        """Every problem of this config; [] when it can run."""
        return check(self)

    def validate(self) -> "RunConfig":
        """Raise ConfigError listing every problem; returns self so calls can chain."""
        problems = check(self)
        if problems:
            raise ConfigError(problems)
        return self


# ---- helpers ----------------------------------------------------------------------------------------


def _flatten(d: Mapping[str, Any], problems: list[Problem]) -> dict[str, Any]:
    """{"lora": {"r": 8}, "train.seed": 1} -> {"lora.r": 8, "train.seed": 1}; only section names nest."""
    flat = {}
    for key, value in d.items():
        key = str(key)
        if key not in SECTIONS:
            flat[key] = value
        elif value is None:  # an empty `lora:` block in YAML
            continue
        elif isinstance(value, Mapping):
            flat.update({f"{key}.{sub}": v for sub, v in value.items()})
        else:
            names = ", ".join(f.name for f in dataclasses.fields(SECTIONS[key]))
            problems.append(Problem(key, f"`{key}` must be a mapping of its fields ({names}), got {show(value)}"))
    return flat


def _normalise_choice(value: str, choices: tuple[str, ...]) -> str:
    """Case only: `Q4_K_M` -> `q4_k_m`. Other near-misses are reported by validate, not guessed."""
    lowered = value.lower()
    return lowered if value not in choices and lowered in choices else value


def _read_path_or_text(path_or_text: str | os.PathLike, suffixes: tuple[str, ...]) -> tuple[str, str]:
    """(text, "`file`: " to put in front of each problem, or "" for text given directly)."""
    if isinstance(path_or_text, os.PathLike) or (
            "\n" not in path_or_text and (os.path.isfile(path_or_text) or path_or_text.endswith(suffixes))):
        path = Path(path_or_text)
        problem = path_problem(path, want="file")
        if problem:  # never opened when it is a pipe or a device: reading it could wait forever
            raise ConfigError(f"config {problem}")
        if path.stat().st_size > MAX_BYTES:
            raise ConfigError(f"config `{path}` is {path.stat().st_size:,} bytes; a config is a few hundred lines at "
                              "most: is this the right file?")
        try:
            return path.read_text(encoding="utf-8"), f"`{path}`: "
        except PermissionError:
            raise ConfigError(f"config `{path}` cannot be read (permission denied)") from None
        except OSError as e:  # a symlink loop, an I/O error
            raise ConfigError(f"config `{path}` cannot be read: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"`{path}` is not UTF-8 text (byte {e.start}); save the config as UTF-8 YAML or JSON") \
                from None
    return path_or_text, ""


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's message in one line, with the line and column (1-based) and the usual cause of a tab error."""
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    if "'\\t'" in what:
        what += " (YAML indents with spaces, never tabs)"
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None else what


class _YamlDumper(yaml.SafeDumper):
    """Sections as blocks, lists on one line: `formats: [lora, gguf]`."""


_YamlDumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True))
