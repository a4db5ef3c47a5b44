"""Load a base model and its tokenizer: a Hub name or a local folder, the same `from_pretrained` path.

    from sftlib.training.model import load_model
    model, tokenizer = load_model(cfg, backend)     # Unsloth's loader on the unsloth backend, transformers otherwise

`model.name: demo` is the embedded demo model: a tiny Llama built offline into the cache folder (see
sftlib.demo) and then loaded with `from_pretrained` like any other folder. Weights load from
safetensors only; model code shipped with a model runs only with `model.trust_remote_code: true`.
"""

from __future__ import annotations

import os
from pathlib import Path

from sftlib.errors import SftlibError
from sftlib.paths import path_problem


class ModelLoadError(SftlibError):
    """The model or tokenizer could not be loaded; the message says why and what to do."""


def resolve_model_name(name: str) -> str:
    """`name`, or the folder of the embedded demo model for `demo`."""
    if name != "demo":
        return name
    from sftlib.demo import model_folder

    return str(model_folder())


def load_tokenizer(cfg):
    """The tokenizer of `model.name` alone, without any weights (enough to look at data before training)."""
    from transformers import AutoTokenizer

    name = resolve_model_name(cfg.model.name)
    _check_folder(name, weights=False)
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code)
    except OSError as exc:
        raise ModelLoadError(f"`model.name`: could not load the tokenizer of {name!r}: {exc}. Without internet "
                             "access, download the model once and point `model.name` at its local folder") from exc


def _torch_dtype(name: str, backend):
    import torch

    if name == "auto":
        if not backend.cuda:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def remote_code_error(name: str, exc: ValueError) -> ModelLoadError | None:
    """The error for a model that ships its own code while `model.trust_remote_code` is off, else None."""
    if "trust_remote_code" not in str(exc):
        return None
    return ModelLoadError(
        f"`model.name`: {name!r} ships its own Python code, which sftlib runs only when "
        "`model.trust_remote_code: true`; turn that on only if you trust the code (read the .py files there)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tekken.json")


def looks_local(name: str) -> bool:
    """Whether a model name can only be a path on this machine (a Hub id is `name` or `owner/name`)."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or os.path.lexists(name)


def model_folder_problem(name: str, *, weights: bool = True, tokenizer: bool = True) -> str | None:
    """Why the local model folder `name` cannot be loaded, naming it and the fix; None when it can (or when
    `name` is a Hub id, which the Hub answers for). `weights`/`tokenizer`: whether those files must be there."""
    if not looks_local(name):
        return None
    path = Path(name).expanduser()
    problem = path_problem(path, want="folder")
    if problem:
        return problem
    config = path / "config.json"
    if not config.exists():
        return f"folder {path} has no config.json; point it at a saved model folder"
    if not config.is_file():
        return f"folder {path}: its config.json is not a file; save the model there again (`save_pretrained`)"
    problem = path_problem(config, want="file") or _model_type_problem(path)
    if problem:
        return problem
    found = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf") and p.is_file()]
    if weights and not found:
        return f"folder {path} has no weight files (*.safetensors); save the model there first"
    if weights and not any(p.suffix == ".safetensors" for p in found):
        # .bin/.pt files are pickles, which can run code when loaded; sftlib loads safetensors only.
        names = ", ".join(sorted(p.name for p in found)[:3])
        return (
            f"folder {path} has weights only as {names}, not safetensors; sftlib loads safetensors "
            "only, because pickled weights can run code. If you trust the file, convert it once: `python -c \"from "
            f"transformers import AutoModelForCausalLM as M; M.from_pretrained('{path}', use_safetensors=False)"
            f".save_pretrained('{path}-safetensors')\"` (then copy the tokenizer files) and point `model.name` there"
        )
    if tokenizer and not any((path / n).is_file() for n in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        return (f"folder {path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); copy them from the "
                "model the weights came from, or save them there with `tokenizer.save_pretrained(folder)`")
    return None


def _model_type_problem(path: Path) -> str | None:
    """An architecture this transformers does not know, said before transformers says it in a traceback."""
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # transformers' own message names the broken file
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or "auto_map" in config:
        return None  # no type to look up, or the model ships its own code (see `model.trust_remote_code`)
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type in CONFIG_MAPPING:
        return None
    return (f"folder {path}: its config.json says `model_type` is {model_type!r}, which transformers "
            f"{transformers.__version__} does not know; upgrade transformers (`pip install -U transformers`) if the "
            "model is newer, or correct `model_type` in config.json (e.g. `llama`)")


def _check_folder(name: str, *, weights: bool = True) -> None:
    problem = model_folder_problem(name, weights=weights)
    if problem:
        raise ModelLoadError(f"`model.name`: {problem}")


def load_model(cfg, backend):
    """Load `cfg.model.name` for `backend`; returns (model, tokenizer)."""
    name = resolve_model_name(cfg.model.name)
    local = Path(name)
    _check_folder(name)
    dtype = _torch_dtype(cfg.model.dtype, backend)
    try:
        if backend.name == "unsloth":
            from unsloth import FastLanguageModel

            model, tokenizer = FastLanguageModel.from_pretrained(
                model_name=name,
                max_seq_length=cfg.model.max_seq_length,
                dtype=None if cfg.model.dtype == "auto" else dtype,
                load_in_4bit=cfg.model.load_in_4bit,
                trust_remote_code=cfg.model.trust_remote_code,
            )
            return model, tokenizer
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = dict(dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
        if cfg.model.attn_implementation != "auto":
            kwargs["attn_implementation"] = cfg.model.attn_implementation
        fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if backend.cuda:
            if not fsdp:
                # one whole model per process: under `accelerate launch` (DDP) each rank uses its own GPU
                kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
            if cfg.model.load_in_4bit:
                from transformers import BitsAndBytesConfig

                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=dtype,
                    # FSDP shards flat tensors of one dtype: 4-bit weights must sit in dtype-sized storage
                    bnb_4bit_quant_storage=dtype if fsdp else None,
                )
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name, use_safetensors=True, **kwargs)
    except ModelLoadError:
        raise
    except ValueError as exc:
        error = remote_code_error(name, exc)
        if error is None:
            raise
        raise error from exc
    except OSError as exc:
        where = "folder" if local.exists() else "Hub model"
        raise ModelLoadError(
            f"`model.name`: could not load {where} {name!r}: {exc}. "
            "Without internet access, download the model once and point `model.name` at its local folder."
        ) from exc
    except Exception as exc:
        if not local.is_dir() or type(exc).__module__.split(".")[0] not in ("safetensors", "json", "pickle", "_pickle"):
            raise
        # A damaged file in a local folder (cut-off download, disk full while saving): say which folder.
        raise ModelLoadError(
            f"`model.name`: folder {name!r} holds a damaged file ({type(exc).__name__}: {exc}); download or save "
            "the model again"
        ) from exc
    if backend.cuda and cfg.model.load_in_4bit and not fsdp:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, tokenizer

