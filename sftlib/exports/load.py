"""A model to export from a folder: saved adapters (on the base they name) or a merged model.

    from sftlib.exports.load import load_for_export
    model, tokenizer, cfg = load_for_export("outputs/model/lora")      # base and template from the folder
    model, tokenizer, cfg = load_for_export("outputs/model/lora", cfg) # or from a run config
    model, tokenizer, cfg = load_for_export("outputs/model/lora", template="chatml")

The base is the one the adapters name (adapter_config.json), unless the config sets `model.name`
itself (a config file or an override; a preset's or the default's name is only a guess).
"""

from __future__ import annotations

import json
from pathlib import Path

from sftlib.exports.report import ExportError
from sftlib.paths import path_problem
from sftlib.training.model import model_folder_problem, resolve_model_name


def template_of(tokenizer):
    """The sftlib template whose text the tokenizer carries (training sets it), or None."""
    from sftlib.data.templates import TEMPLATES

    text = getattr(tokenizer, "chat_template", None)
    return next((t for t in TEMPLATES.values() if text and t.jinja == text), None)


def _named_explicitly(cfg, key: str) -> bool:
    return cfg is not None and cfg.sources.get(key) in ("file", "override")


def _check_export_folder(folder: Path) -> None:
    """A folder that exists and can be read; a `checkpoint-N` folder only once its saving finished."""
    from sftlib.training.checkpoints import MARKER, checkpoint_problem, is_checkpoint_folder

    problem = path_problem(folder, want="folder")
    if problem:
        raise ExportError(f"--model: {problem}; point it at the `lora` or `merged_16bit` folder a run wrote")
    if is_checkpoint_folder(folder):
        problem = checkpoint_problem(folder)
        if problem:  # what resume refuses, export refuses too: its adapters may be cut short
            raise ExportError(f"--model: checkpoint `{folder}` is incomplete: {problem}; export from a complete "
                              f"checkpoint (one with `{MARKER}`) or from the `lora` folder a finished run wrote")


def load_for_export(folder: str | Path, cfg=None, *, template: str | None = None, device: str | None = None):
    """(model, tokenizer, cfg) from a folder of saved adapters (`adapter_config.json`; the base is the one
    the adapters name unless `cfg` sets `model.name` explicitly) or of a merged model. `template` (a name)
    is the chat template used in training, else the config's (when it sets one) or the one the saved
    tokenizer carries. The returned cfg names the model that was loaded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlib.config import RunConfig
    from sftlib.exports.merged import load_adapters

    folder = Path(folder)
    _check_export_folder(folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if (folder / "adapter_config.json").is_file():
        named = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        base = cfg.model.name if _named_explicitly(cfg, "model.name") or not named else named
        from sftlib.demo import model_folder

        if base and Path(base).resolve() == model_folder().resolve():
            base = "demo"  # the embedded demo model: a name that finds it again on any machine
        if not base:
            raise ExportError(f"`{folder}/adapter_config.json` names no base model; pass --config with `model.name`")
        problem = model_folder_problem(resolve_model_name(base), tokenizer=False)
        if problem:  # a base folder moved or deleted since training
            where = "`model.name`" if base != named else f"`{folder}/adapter_config.json` (`base_model_name_or_path`)"
            raise ExportError(f"the base model that {where} names cannot be loaded: {problem}; give the base the "
                              "adapters were trained on with --set model.name=BASE (a folder or a Hub name)")
        try:
            model, tokenizer = load_adapters(base, folder, dtype=dtype, device=device)
        except Exception as exc:
            if type(exc).__module__.split(".")[0] not in ("safetensors", "json"):
                raise
            # a cut-off copy or a disk that filled while saving: say which folder, not where safetensors failed
            raise ExportError(f"--model: `{folder}` holds a damaged file ({type(exc).__name__}: {exc}); save or "
                              "copy the adapters again") from exc
    elif (folder / "config.json").is_file():
        problem = model_folder_problem(str(folder))
        if problem:
            raise ExportError(f"--model: {problem}")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), device_map={"": device},
                                                     use_safetensors=True)
        base = str(folder)
    else:
        raise ExportError(f"`{folder}` holds neither LoRA adapters (adapter_config.json) nor a model (config.json); "
                          "point --model at the `lora` or `merged_16bit` folder a run wrote")
    if template is None and _named_explicitly(cfg, "model.chat_template"):
        template = cfg.model.chat_template
    if template is None:
        known = template_of(tokenizer)
        template = known.name if known is not None else (cfg.model.chat_template if cfg is not None else None)
        if known is None and not (cfg is not None and cfg.sources.get("model.chat_template", "").startswith("preset")):
            raise ExportError(f"the tokenizer in `{folder}` carries no chat template sftlib knows; pass --template "
                              "(the one used in training) or --config")
    cfg = (cfg or RunConfig()).with_overrides({"model.name": base, "model.chat_template": template})
    model.eval()
    return model, tokenizer, cfg
