"""Load a base model, fit its tokenizer to a chat template, and add LoRA.

    from sftlib.model import load_model, prepare_tokenizer, add_lora
    model, tokenizer = load_model(cfg, backend)             # a Hub name or a local folder, same path
    info = prepare_tokenizer(model, tokenizer, template)     # adds missing special tokens, a real pad token
    model = add_lora(model, cfg, backend, train_embeddings=bool(info.added_tokens), new_token_ids=info.added_token_ids)

`model.name: demo` is the embedded demo model: a tiny Llama built offline into the cache folder and
then loaded with `from_pretrained` like any other folder.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]")
NEW_PAD = "<|pad|>"


class ModelLoadError(ValueError):
    """The model or tokenizer could not be loaded; the message says why and what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("SFTLIB_CACHE", Path.home() / ".cache" / "sftlib"))


def demo_model_folder() -> Path:
    """Build (once) and return the embedded demo model: a tiny Llama and a tokenizer trained on the demo data."""
    import json

    from sftlib import demo_data
    from sftlib.tiny import build_tiny_model

    rows = [json.loads(line) for line in demo_data.path().read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [turn["value"] for row in rows for turn in row["conversations"]]
    return build_tiny_model(cache_dir() / "demo-model-v1", texts, vocab_size=1024, hidden_size=128,
                            intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2)


def resolve_model_name(name: str) -> str:
    return str(demo_model_folder()) if name == "demo" else name


def _torch_dtype(name: str, backend):
    import torch

    if name == "auto":
        if not backend.cuda:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        return
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf")]
    if not (path / "config.json").exists():
        raise ModelLoadError(f"`model.name`: folder {path} has no config.json; point it at a saved model folder")
    if not weights:
        raise ModelLoadError(
            f"`model.name`: folder {path} has no weight files (*.safetensors); save the model there first"
        )
    if not any(p.suffix == ".safetensors" for p in weights):
        # .bin/.pt files are pickles, which can run code when loaded; sftlib loads safetensors only.
        names = ", ".join(sorted(p.name for p in weights)[:3])
        raise ModelLoadError(
            f"`model.name`: folder {path} has weights only as {names}, not safetensors; sftlib loads safetensors "
            "only, because pickled weights can run code. If you trust the file, convert it once: `python -c \"from "
            f"transformers import AutoModelForCausalLM as M; M.from_pretrained('{path}', use_safetensors=False)"
            f".save_pretrained('{path}-safetensors')\"` (then copy the tokenizer files) and point `model.name` there"
        )


def load_model(cfg, backend):
    """Load `cfg.model.name` for `backend`; returns (model, tokenizer)."""
    name = resolve_model_name(cfg.model.name)
    local = Path(name)
    _check_folder(local)
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
        if "trust_remote_code" not in str(exc):
            raise
        raise ModelLoadError(
            f"`model.name`: {name!r} ships its own Python code, which sftlib runs only when "
            "`model.trust_remote_code: true`; turn that on only if you trust the code (read the .py files there)"
        ) from exc
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


@dataclass
class TokenizerInfo:
    added_tokens: list[str] = field(default_factory=list)
    pad_token: str = ""
    pad_added: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    added_token_ids: list[int] = field(default_factory=list)  # rows that start untrained: train them

    @property
    def resized(self) -> bool:
        return bool(self.added_tokens) or self.pad_added


def _is_single_token(tokenizer, text: str) -> bool:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1


def stop_token_ids(tokenizer, template) -> list[int]:
    ids = []
    for text in template.stop_strings(tokenizer.eos_token or ""):
        if text and _is_single_token(tokenizer, text):
            ids.append(tokenizer.convert_tokens_to_ids(text))
    return list(dict.fromkeys(ids))


def prepare_tokenizer(model, tokenizer, template) -> TokenizerInfo:
    """Make `tokenizer` (and `model`'s embeddings) able to express `template`, with a pad token that is not EOS.

    Missing special tokens are added as single special tokens, the embeddings are resized (new rows
    start at the mean of the old ones), the template becomes `tokenizer.chat_template`, and generation
    stops at the template's end-of-turn tokens.
    """
    info = TokenizerInfo()
    missing = [t for t in template.special_tokens if not _is_single_token(tokenizer, t)]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
        info.added_tokens = missing
        info.added_token_ids = tokenizer.convert_tokens_to_ids(missing)
    eot = template.end_of_turn_text(tokenizer.eos_token)
    pad = tokenizer.pad_token
    if pad is None or pad in (tokenizer.eos_token, eot):
        # pad = EOS is the classic bug: the collator masks padding, and with it every EOS the model should learn.
        pad = next((c for c in PAD_CANDIDATES if c != eot and c in tokenizer.get_vocab()), None)
        if pad is None:
            tokenizer.add_tokens([NEW_PAD], special_tokens=True)
            pad, info.pad_added = NEW_PAD, True
        tokenizer.pad_token = pad
    info.pad_token = pad
    if model is not None:  # None: only the tokenizer is wanted, e.g. to look at data before loading weights
        old = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > old:
            import torch

            # mean_resizing draws the new rows from torch's global generator, whose start differs per process:
            # a fixed private seed makes the same run give the same weights (and a resumed run match)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    tokenizer.chat_template = template.jinja
    info.stop_token_ids = stop_token_ids(tokenizer, template)
    if not info.stop_token_ids:
        where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise ModelLoadError(
            f"`model.chat_template` = `{template.name}` stops generation at {', '.join(template.stop_tokens)} "
            f"({'{eos}'} = the tokenizer's eos_token, here {tokenizer.eos_token!r}), and none of them is one token of "
            f"the tokenizer of `model.name` ({where}); set `eos_token` in its tokenizer_config.json, or pick a "
            "template with its own end-of-turn token, e.g. chatml"
        )
    if model is None:
        return info
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = info.stop_token_ids
    return info


def linear_module_names(model) -> list[str]:
    import torch

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def add_lora(model, cfg, backend, *, train_embeddings: bool = False, new_token_ids: list[int] | None = None):
    """Wrap `model` with LoRA adapters as `cfg.lora` says; embeddings and LM head are trained too
    when `train_embeddings` (new tokens need trained rows, or the model can never emit them).

    With `lora.train_embeddings: auto` and the ids of the added tokens, only those rows of the input
    embeddings are trained (PEFT's trainable tokens), and an untied LM head is trained whole, instead
    of both matrices with their optimizer states (about 10 GiB for Llama 3.1 8B, which would not fit
    a T4). `always` trains both matrices whole; Unsloth always does.
    """
    lora = cfg.lora
    rows_only = lora.train_embeddings == "auto" and bool(new_token_ids) and backend.name != "unsloth"
    if lora.train_embeddings == "always":
        train_embeddings = True
    elif lora.train_embeddings == "never":
        if train_embeddings:
            warnings.warn("tokens were added but `lora.train_embeddings: never`: the model cannot learn to emit them")
        train_embeddings = False
    missing = [m for m in lora.target_modules if m not in linear_module_names(model)]
    if missing:
        raise ValueError(
            f"`lora.target_modules`: {missing} not found in this model; its linear layers are "
            f"{linear_module_names(model)}"
        )
    saved = ["embed_tokens", "lm_head"] if train_embeddings else None
    plan = None
    if cfg.train.gradient_checkpointing == "auto" or cfg.train.auto_batch:
        from sftlib import autotune  # decided here: Unsloth sets checkpointing up when it adds LoRA

        plan = autotune.plan_for_model(cfg, model, backend)
        autotune.apply(cfg, plan)
    gc = cfg.train.gradient_checkpointing
    if backend.name == "unsloth":
        from unsloth import FastLanguageModel

        targets = list(lora.target_modules) + (saved or [])
        model = FastLanguageModel.get_peft_model(
            model, r=lora.r, target_modules=targets, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            bias=lora.bias, use_gradient_checkpointing={"unsloth": "unsloth", "true": True, "false": False}[gc],
            random_state=cfg.train.seed, use_rslora=lora.use_rslora, use_dora=lora.use_dora,
        )
        model.sftlib_plan = plan
        return model
    from peft import LoraConfig, get_peft_model

    if gc in ("true", "unsloth"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    token_rows = None
    if rows_only and train_embeddings:
        ids = sorted(set(new_token_ids))
        token_rows = {"embed_tokens": ids}
        # An untied head needs its new rows trained too, or the model never predicts the new tokens. TRL's
        # loss multiplies by `lm_head.weight` (and `.bias`) directly, which a row adapter cannot serve, so
        # the head is trained whole: about 3 GiB for Llama 3.1 8B instead of 10 for both matrices.
        saved = None if getattr(model.config, "tie_word_embeddings", False) else ["lm_head"]
    peft_cfg = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        bias=lora.bias, use_rslora=lora.use_rslora, use_dora=lora.use_dora, task_type="CAUSAL_LM",
        modules_to_save=saved, trainable_token_indices=token_rows,
    )
    import torch

    torch.manual_seed(cfg.train.seed)  # LoRA's A matrices are random: same seed, same start
    model = get_peft_model(model, peft_cfg)
    model.sftlib_plan = plan  # the memory plan when `auto` chose the settings, else None
    return model
