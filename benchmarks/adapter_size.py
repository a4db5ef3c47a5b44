"""Size of a LoRA folder when a chat template adds tokens: whole matrices (before) against trained rows (now).

    python benchmarks/adapter_size.py                         # Llama-3.1-8B widths, 1 layer, bf16, on the CPU
    python benchmarks/adapter_size.py --layers 2 --out benchmarks/results/adapter_size.json

Builds a random-weight Llama with the 8B's vocabulary (128,256) and widths (benchmarks/llama-3.1-8b-config.json)
but `--layers` layers, in bfloat16 on the CPU (about 3 GB for one layer), grows the vocabulary by the two
tokens ChatML adds (Llama 3 has a pad token), wraps it with LoRA (r=16 on all seven projections, sftlib's
defaults) and saves it the way a run saves adapters and checkpoints (`model.save_pretrained`):

- before: the input rows as trainable tokens, the untied LM head trained whole (`modules_to_save`), and
  PEFT's default of saving the resized embedding matrix whole;
- now: sftlib.training.lora.add_lora under `lora.train_embeddings: auto`: the new rows of the embeddings
  and of the head as trainable tokens, nothing else.

LoRA grows with the layers and the rest does not, so the 32-layer size is estimated as the measured size
plus the LoRA bytes of the missing layers. Prints a table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parent / "llama-3.1-8b-config.json"
ADDED = 2  # <|im_start|>, <|im_end|>


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def saved_summary(folder: Path) -> dict:
    from safetensors import safe_open

    out = {"lora_tensors": 0, "lora_bytes": 0, "other": {}}
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            size = t.numel() * t.element_size()
            if "lora_" in key:
                out["lora_tensors"] += 1
                out["lora_bytes"] += size
            else:
                out["other"][key] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "bytes": size}
    return out


def build(layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**json.loads(CONFIG.read_text()), "num_hidden_layers": layers})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    vocab = config.vocab_size
    model.resize_token_embeddings(vocab + ADDED, mean_resizing=False)
    return model, vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/adapter_size.json")
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model

    from sftlib.config import RunConfig
    from sftlib.training.backend import choose_backend
    from sftlib.training.lora import add_lora, trainable_parameters
    from sftlib.training.tokenizer import TokenizerInfo

    cfg = RunConfig().with_overrides({"lora.train_embeddings": "auto", "train.gradient_checkpointing": "false",
                                      "train.auto_batch": False})
    rows = []
    for name in ("before", "now"):
        t0 = time.time()
        model, vocab = build(args.layers)
        ids = list(range(vocab, vocab + ADDED))
        if name == "before":
            lo = cfg.lora
            model = get_peft_model(model, LoraConfig(
                r=lo.r, lora_alpha=lo.alpha, target_modules=list(lo.target_modules), use_rslora=lo.use_rslora,
                task_type="CAUSAL_LM", trainable_token_indices={"embed_tokens": ids}, modules_to_save=["lm_head"]))
            save = dict(save_embedding_layers=True)  # what PEFT's `auto` chose once the vocabulary had grown
        else:
            info = TokenizerInfo(added_tokens=["<|im_start|>", "<|im_end|>"], added_token_ids=ids, new_row_ids=ids)
            model = add_lora(model, cfg, choose_backend("cpu"), info)
            save = {}
        trainable = sum(trainable_parameters(model).values())
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, **save)
            size, summary = folder_bytes(Path(tmp)), saved_summary(Path(tmp))
        per_layer = summary["lora_bytes"] / args.layers
        rows.append({"variant": name, "layers": args.layers, "trainable_parameters": trainable, "folder_bytes": size,
                     "lora_bytes": summary["lora_bytes"], "other_tensors": summary["other"],
                     "estimate_32_layers_bytes": int(size + per_layer * (32 - args.layers)),
                     "seconds": round(time.time() - t0, 1)})
        del model

    print(f"Llama-3.1-8B widths, {args.layers} layer(s), bf16, chatml adds {ADDED} tokens")
    print(f"{'variant':<8} {'trainable':>14} {'folder':>12} {'LoRA':>10} {'rest':>12} {'8B (32 layers) est.':>20}")
    for r in rows:
        rest = r["folder_bytes"] - r["lora_bytes"]
        print(f"{r['variant']:<8} {r['trainable_parameters']:>14,} {r['folder_bytes'] / 1e6:>10.2f}MB "
              f"{r['lora_bytes'] / 1e6:>8.2f}MB {rest / 1e6:>10.2f}MB {r['estimate_32_layers_bytes'] / 1e9:>18.3f}GB")
        for key, t in r["other_tensors"].items():
            print(f"         {key}: {t['shape']} {t['dtype']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": f"python benchmarks/adapter_size.py --layers {args.layers}",
                                          "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
