"""Save what training made: LoRA adapters, and a merged 16-bit model that loads in plain transformers.

    from sftlib.exports.merged import save_adapters, save_merged, save_merged_4bit, load_adapters
    save_adapters(model, tokenizer, "model/lora")
    save_merged(cfg.model.name, "model/lora", "model/merged_16bit")  # base + adapters, merged, bf16
    save_merged_4bit("model/merged_16bit", "model/merged_4bit")      # that, quantized to NF4 (bitsandbytes)
    model, tokenizer = load_adapters(cfg.model.name, "model/lora")    # base + adapters again

Every folder is written under a temporary name and renamed when complete, so an interrupted save
never leaves a folder that looks finished; the next save clears what a killed one left behind (and
puts back the previous complete folder if the kill came between the two renames). Free disk space is
checked against an estimate before each write, so a full disk fails at once with the sizes, not
halfway through a multi-gigabyte file. Weights load as safetensors only. The merge reloads the base
in 16-bit from `model.name` rather than merging into the training model, which may be 4-bit and
would lose precision. A base that is stored 4-bit (`unsloth/...-bnb-4bit`) is dequantized first, so
`merged_16bit` is a plain 16-bit model either way (not a 4-bit one re-quantized around the merge).
`merged_4bit` is the merged 16-bit model quantized by bitsandbytes to NF4 with double quantization,
as QLoRA loads a base: it loads with plain transformers where bitsandbytes is installed.

Every folder gets the tokenizer through `save_tokenizer`: transformers 5 writes only tokenizer.json, so a
tokenizer loaded from a SentencePiece `tokenizer.model` (Llama 2, Mistral, Gemma, Phi-3 bases) gets that
file copied beside it, with the tokens added after it listed in tokenizer_config.json; llama.cpp's converter needs
it for Gemma and Phi-3 and takes SentencePiece's own piece scores from it for the others.
"""

from __future__ import annotations

from pathlib import Path

from sftlib.errors import SftlibError
from sftlib.files import atomic_dir, check_free_space


def tensor_bytes(tensors) -> int:
    """Bytes the tensors take on disk; shared storage (tied embeddings) counted once."""
    unique = {(t.data_ptr(), t.numel(), t.dtype): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """`tokenizer.save_pretrained(folder)`, plus the SentencePiece model it was loaded from (see the module
    docstring). The copy is made only when that model's pieces are the tokenizer's first ids, one for one;
    ids after them (tokens added by a chat template) are listed in tokenizer_config.json's
    `added_tokens_decoder`, which transformers 5 leaves out and the converter reads (special ones become
    control tokens, as in the HF tokenizer)."""
    import json
    import shutil

    tokenizer.save_pretrained(folder)
    source = Path(getattr(tokenizer, "vocab_file", None) or "")
    if source.name != "tokenizer.model" or not source.is_file():
        return
    try:
        import sentencepiece
    except ImportError:  # without it the pieces cannot be checked: tokenizer.json alone, as transformers writes
        return
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(source))
    except (RuntimeError, OSError):  # not a SentencePiece model (Llama 3's tokenizer.model is tiktoken's)
        return
    pieces = sp.get_piece_size()
    if tokenizer.convert_ids_to_tokens(list(range(pieces))) != [sp.id_to_piece(i) for i in range(pieces)]:
        return  # the vocabulary was rebuilt around it: tokenizer.json is the truth
    folder = Path(folder)
    if source.resolve() != (folder / "tokenizer.model").resolve():
        shutil.copyfile(source, folder / "tokenizer.model")
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items() if i >= pieces}
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if added and not config.get("added_tokens_decoder"):
        config["added_tokens_decoder"] = {str(i): {
            "content": t.content, "special": t.special, "lstrip": t.lstrip, "rstrip": t.rstrip,
            "normalized": t.normalized, "single_word": t.single_word} for i, t in sorted(added.items())}
        config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")


def save_adapters(model, tokenizer, folder: str | Path) -> Path:
    """LoRA adapters (and trained embeddings, when tokens were added) plus the fitted tokenizer."""
    trained = [p for p in model.parameters() if p.requires_grad]
    check_free_space(folder, tensor_bytes(trained), "the LoRA adapters")
    # Rows trained as PEFT trainable tokens are saved as rows; left to itself PEFT also writes both embedding
    # matrices whole (2 GiB for Llama 3 8B) whenever the vocabulary grew, e.g. for adapters loaded back.
    rows = any("trainable_tokens_delta" in name for name, _ in model.named_parameters())
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **({"save_embedding_layers": False} if rows else {}))
        save_tokenizer(tokenizer, tmp)
        # The stop tokens of the chat template live in the generation config; adapters alone would lose them.
        model.generation_config.save_pretrained(tmp)
    return Path(folder)


def _dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def dequantized(model):
    """`model` (loaded from a 4-bit/8-bit bitsandbytes checkpoint) with plain Linear layers in its dtype,
    and nothing left that would make `save_pretrained` write it as quantized again."""
    model = model.dequantize()
    # transformers remembers how the quantized checkpoint was read, to write it back the same way; those
    # conversions have no inverse once the weights are plain, so forget them
    kept = []
    for conversion in getattr(model, "_weight_conversions", None) or []:
        try:
            conversion.reverse_transform()
        except NotImplementedError:
            continue
        kept.append(conversion)
    model._weight_conversions = kept
    return model


def _quantization_for(base: str, wanted):
    """What to pass as `quantization_config` for `base`: nothing when its checkpoint is stored quantized (it loads
    as saved, and transformers refuses a second config beside it), else `wanted` as a BitsAndBytesConfig
    (a model's config can hold it as a plain dict, as under Unsloth)."""
    if wanted is None:
        return None
    from transformers import AutoConfig, BitsAndBytesConfig

    if getattr(AutoConfig.from_pretrained(base), "quantization_config", None):
        return None
    return BitsAndBytesConfig.from_dict(dict(wanted)) if isinstance(wanted, dict) else wanted


def load_adapters(base_name: str, adapter_folder: str | Path, *, dtype: str = "float32", device: str = "cpu",
                  dequantize: bool = False, quantization_config=None):
    """Base model + saved adapters, ready for inference; returns (peft_model, tokenizer).

    A base stored quantized loads quantized (as it trained), unless `dequantize` asks for plain
    `dtype` weights (what a merge needs); `quantization_config` quantizes a 16-bit base as it loads
    (the one training used, to reproduce the trained model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from sftlib.training.model import resolve_model_name

    tokenizer = AutoTokenizer.from_pretrained(adapter_folder)
    quantization_config = _quantization_for(resolve_model_name(base_name), quantization_config)
    extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
    base = AutoModelForCausalLM.from_pretrained(resolve_model_name(base_name), dtype=_dtype(dtype),
                                                device_map={"": device}, use_safetensors=True, **extra)
    if dequantize and getattr(base, "is_quantized", False):
        base = dequantized(base)
    # Training only ever grows the matrix (prepare_tokenizer); many models carry spare rows beyond the
    # tokenizer (Llama 3.1: 128256 rows), and shrinking to len(tokenizer) would cut them off.
    if base.get_input_embeddings().weight.shape[0] < len(tokenizer):
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows come from the adapter
    if (Path(adapter_folder) / "generation_config.json").exists():
        base.generation_config = GenerationConfig.from_pretrained(adapter_folder)
    model = PeftModel.from_pretrained(base, adapter_folder)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def save_merged(base_name: str, adapter_folder: str | Path, folder: str | Path, *, dtype: str = "bfloat16") -> Path:
    """Merge the adapters into a fresh `dtype` copy of the base and save it with the tokenizer."""
    model, tokenizer = load_adapters(base_name, adapter_folder, dtype=dtype, dequantize=True)
    merged = model.merge_and_unload()
    check_free_space(folder, tensor_bytes(merged.state_dict().values()), f"the merged {dtype} model")
    with atomic_dir(folder) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
    return Path(folder)


def save_merged_4bit(merged_folder: str | Path, folder: str | Path, *, compute_dtype: str | None = None,
                     device: str | None = None) -> Path:
    """Quantize a merged 16-bit model folder to NF4 (bitsandbytes, double quantization) and save it with
    its tokenizer. `compute_dtype`: the dtype the 4-bit layers compute in (default bfloat16 on a GPU,
    float32 on the CPU). Needs `bitsandbytes`; on the CPU it needs 0.48 or newer."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise SftlibError(f"`merged_4bit` needs bitsandbytes ({exc}); `pip install bitsandbytes`, or leave "
                          "`merged_4bit` out of `export.formats`") from exc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GenerationConfig

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    compute = _dtype(compute_dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=torch.uint8)
    merged_folder = Path(merged_folder)
    model = AutoModelForCausalLM.from_pretrained(merged_folder, quantization_config=quant, dtype=compute,
                                                 device_map={"": device}, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(merged_folder)
    # NF4: half a byte a weight, plus a float32 scale per 64 weights (itself 8-bit with double quantization)
    check_free_space(folder, tensor_bytes(p for p in model.parameters()), "the merged 4-bit model")
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        if (merged_folder / "generation_config.json").exists():
            GenerationConfig.from_pretrained(merged_folder).save_pretrained(tmp)
    del model
    return Path(folder)
