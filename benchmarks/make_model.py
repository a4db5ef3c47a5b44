"""Write a random-weight Llama-3.1-8B (the real config) and a tokenizer of the same vocabulary size.

    python benchmarks/make_model.py --out /tmp/llama-8b                 # bf16 safetensors + tokenizer
    python benchmarks/make_model.py --out /tmp/llama-8b --quantize      # + /tmp/llama-8b-bnb-4bit (NF4)
    python benchmarks/make_model.py --out /tmp/llama-2l --layers 2      # same widths, 2 layers (tests)

Weights cannot be downloaded on the benchmark host, and throughput, memory and every code path
depend only on the shapes, so the model is the real config (benchmarks/llama-3.1-8b-config.json)
with random weights (transformers' initialisation, seeded), written once per run in bfloat16. With
`--quantize` it is also loaded in 4-bit NF4 (double quantization, bf16 compute, as in Unsloth's
`-bnb-4bit` uploads that the article starts from) and saved, so that every contender loads the same
pre-quantized folder.

The tokenizer is synthetic: a byte-level BPE trained on sftlib's bundled demo text, padded with
never-produced filler entries to 128,000 ordinary tokens, then Llama 3's 256 special tokens at their
real ids (`<|begin_of_text|>` 128000, `<|end_of_text|>` 128001, `<|finetune_right_pad_id|>` 128004,
`<|start_header_id|>` 128006, `<|end_header_id|>` 128007, `<|eot_id|>` 128009, ...). The benchmark
feeds token ids directly, so only the vocabulary size and the special ids matter to it; the GPU tests
use the tokenizer for real text (chat templates, generation), which this one encodes and decodes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parent / "llama-3.1-8b-config.json"
ORDINARY = 128000
NAMED_SPECIALS = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
                  6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
                  10: "<|python_tag|>"}


def special_tokens() -> list[str]:
    """Llama 3's 256 special tokens in id order (ids 128000-128255)."""
    out, reserved = [], 0
    for i in range(256):
        if i in NAMED_SPECIALS:
            out.append(NAMED_SPECIALS[i])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return out


def build_tokenizer(texts: list[str], trained_vocab: int = 4000):
    """A transformers fast tokenizer with exactly 128,256 ids, Llama 3's specials at their real ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=trained_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), ORDINARY):  # unreachable: no merge produces them
        vocab[f"<filler_{i}>"] = i
    spec["added_tokens"] = [
        {"id": ORDINARY + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True} for i, t in enumerate(special_tokens())]
    tok = Tokenizer.from_str(json.dumps(spec))
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, ORDINARY)]),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|end_of_text|>",
                                   pad_token="<|finetune_right_pad_id|>", model_max_length=131072,
                                   clean_up_tokenization_spaces=False)
    assert len(fast) == ORDINARY + 256, len(fast)
    return fast


def demo_texts() -> list[str]:
    from sftlib import demo

    rows = [json.loads(line) for line in demo.data_path().read_text(encoding="utf-8").splitlines() if line.strip()]
    return [turn["value"] for row in rows for turn in row["conversations"]]


def write_model(out: Path, *, layers: int | None = None, seed: int = 0, device: str | None = None) -> Path:
    """Random bf16 weights for the 8B config (optionally with fewer layers) and the tokenizer, into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    spec = json.loads(CONFIG.read_text())
    if layers:
        spec["num_hidden_layers"] = layers
    marker = out / "sftlib_bench_model.json"
    if marker.exists() and json.loads(marker.read_text()) == {"config": spec, "seed": seed}:
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig.from_dict(spec)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.device(device):  # initialising 8B parameters on the GPU takes a second, on a CPU minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer(demo_texts()).save_pretrained(out)
    del model
    marker.write_text(json.dumps({"config": spec, "seed": seed}))
    print(f"wrote {out} ({sum(p.stat().st_size for p in out.glob('*.safetensors')) / 2**30:.1f} GiB) "
          f"in {time.perf_counter() - start:.0f}s", flush=True)
    return out


def quantize(src: Path, dst: Path) -> Path:
    """Load `src` in 4-bit NF4 (double quantization, bf16 compute) and save it pre-quantized to `dst`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if (dst / "config.json").exists():
        return dst
    start = time.perf_counter()
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model.save_pretrained(dst, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    del model
    torch.cuda.empty_cache()
    print(f"wrote {dst} in {time.perf_counter() - start:.0f}s", flush=True)
    return dst


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for the bf16 model and tokenizer")
    p.add_argument("--layers", type=int, default=None, help="keep the widths, use this many layers")
    p.add_argument("--quantize", action="store_true", help="also write OUT-bnb-4bit, pre-quantized NF4")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    write_model(a.out, layers=a.layers, seed=a.seed)
    if a.quantize:
        quantize(a.out, a.out.with_name(a.out.name + "-bnb-4bit"))


if __name__ == "__main__":
    main()
