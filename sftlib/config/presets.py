"""Named presets: YAML files in `presets/` beside this module, each a partial run config with a header.

    from sftlib.config.presets import PRESETS, PRESET_NAMES
    PRESET_NAMES                        # ("article", "colab-t4", ...): the one list every other one comes from
    PRESETS["colab-t4"].values          # {"model.dtype": "float16", ...}: dotted keys
    PRESETS["colab-t4"].gpu, .label, .about

A preset file holds `order` (its place in lists), `label` (the form's dropdown), `about` (one line of
help), `gpu` (the card the memory estimate checks against, when it is for one) and `values`: the
settings it changes, nested by section as in a run config file. Add a preset by adding a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftlib.config.safe_load import load_yaml

FOLDER = Path(__file__).with_name("presets")


@dataclass(frozen=True)
class Preset:
    name: str
    label: str
    about: str
    values: dict[str, Any] = field(default_factory=dict)  # dotted keys
    gpu: str | None = None
    path: str = ""


def _flat(values: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and not prefix and key != "backend":
            out.update(_flat(value, f"{key}."))
        else:
            out[prefix + key] = value
    return out


def _load() -> dict[str, Preset]:
    found = []
    for path in FOLDER.glob("*.yaml"):
        spec = load_yaml(path.read_text(encoding="utf-8"))  # a key twice in a preset is an error, as in a config
        preset = Preset(name=path.stem, label=spec.get("label", path.stem), about=spec.get("about", ""),
                        values=_flat(spec.get("values") or {}), gpu=spec.get("gpu"), path=str(path))
        found.append((spec.get("order", 99), path.stem, preset))
    return {name: preset for _, name, preset in sorted(found)}


PRESETS: dict[str, Preset] = _load()
PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)
