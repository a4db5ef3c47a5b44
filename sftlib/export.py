"""Save what training made: LoRA adapters, and a merged 16-bit model that loads in plain transformers.

    from sftlib.export import save_adapters, save_merged, load_adapters
    save_adapters(model, tokenizer, "model/lora")
    save_merged(cfg, "model/lora", "model/merged_16bit")              # base + adapters, merged, bf16
    model, tokenizer = load_adapters(cfg.model.name, "model/lora")    # base + adapters again

Every folder is written under a temporary name and renamed when complete, so an interrupted save
never leaves a folder that looks finished. The merge reloads the base in 16-bit from `model.name`
rather than merging into the training model, which may be 4-bit and would lose precision.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(target: str | Path):
    """Yield a temporary folder beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def save_adapters(model, tokenizer, folder: str | Path) -> Path:
    """LoRA adapters (and trained embeddings, when tokens were added) plus the fitted tokenizer."""
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # The stop tokens of the chat template live in the generation config; adapters alone would lose them.
        model.generation_config.save_pretrained(tmp)
    return Path(folder)


def _dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_adapters(base_name: str, adapter_folder: str | Path, *, dtype: str = "float32", device: str = "cpu"):
    """Base model + saved adapters, ready for inference; returns (peft_model, tokenizer)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from sftlib.model import resolve_model_name

    tokenizer = AutoTokenizer.from_pretrained(adapter_folder)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_name(base_name), dtype=_dtype(dtype),
                                                device_map={"": device})
    if base.get_input_embeddings().weight.shape[0] != len(tokenizer):
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows come from the adapter
    if (Path(adapter_folder) / "generation_config.json").exists():
        base.generation_config = GenerationConfig.from_pretrained(adapter_folder)
    model = PeftModel.from_pretrained(base, adapter_folder)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def save_merged(base_name: str, adapter_folder: str | Path, folder: str | Path, *, dtype: str = "bfloat16") -> Path:
    """Merge the adapters into a fresh `dtype` copy of the base and save it with the tokenizer."""
    model, tokenizer = load_adapters(base_name, adapter_folder, dtype=dtype)
    merged = model.merge_and_unload()
    with atomic_dir(folder) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(folder)
