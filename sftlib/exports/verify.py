"""Each written format loaded back the way a user loads it, and held to the model in memory.

    from sftlib.exports.verify import compare, reload, room_to_reload
    check = compare(reloaded_model, reference, stops, kind="merged_16bit")
    check["problems"], check["max_abs_dlogit"], check["greedy_identical"], check["stopped"]

| format | loaded back as | must hold |
|---|---|---|
| lora | base + adapters (peft), the base quantized as in training | the same greedy tokens (near-ties of < 0.05 logits tolerated in float32, < 0.5 in 16-bit); max abs logit difference <= 1e-3 when both are float32; every confident stop kept |
| merged_16bit | transformers, bfloat16 | the same greedy tokens (near-ties of < 0.5 logits tolerated: bfloat16 rounds weights to 8 bits of mantissa); every stop kept. When the model in memory computes on a 4-bit base, the merge (into the 16-bit weights) is a different model: greedy tokens are then reported, not required |
| merged_4bit | transformers + bitsandbytes | every confident stop kept; top-1 agreement, KL and greedy tokens reported |
| GGUF | llama.cpp | as sftlib.exports.gguf.verify says (f16/bf16 the same greedy tokens, quantized types report) |

"Every confident stop kept": where the reference ends its reply with a stop token it chose with
probability >= 0.5, the reloaded model's own greedy reply (up to twice as long, plus 16 tokens) must
end with a stop token too. A format that cannot be loaded back beside the model in memory (an 8B
merged in 16-bit next to the training model on a 15 GB T4) is reported "not verified", with the sizes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sftlib.exports.reference import available_ram, greedy, log_softmax
from sftlib.files import disk_bytes

LORA_MAX_ABS = 1e-3  # float32 reload of the same adapters on the same base: only summation order differs
TIE_MARGIN = {"lora": 0.05, "merged_16bit": 0.5}  # lora in 16-bit or on a 4-bit base: 0.5 (kernels round differently)


def quantization_config(model):
    """The bitsandbytes settings the (base) model was loaded with, or None when it is not quantized."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config, "quantization_config", None)


def compare(model, ref, stops: set[int], *, kind: str, strict: bool = True, quantized: bool = False) -> dict:
    """Hold `model` (a reloaded format) to the reference `ref` (sftlib.exports.reference.Reference); see the table above."""
    import numpy as np
    import torch

    model.eval()
    device = next(model.parameters()).device
    out = {"kind": kind, "positions": 0, "max_abs_dlogit": 0.0, "top1_agreement": 0.0, "mean_kl": 0.0,
           "greedy_identical": 0, "stop_expected": 0, "stopped": 0, "problems": [], "notes": []}
    agree, kl = 0, 0.0
    for i, (ids, reply, hf, stopped) in enumerate(zip(ref.prompt_ids, ref.reply_ids, ref.logits, ref.stopped)):
        with torch.no_grad():
            mine = model(input_ids=torch.tensor([ids + reply], device=device)).logits[0].float().cpu().numpy()
        vocab = min(mine.shape[1], hf.shape[1])
        mine, theirs = mine[:, :vocab], hf[:, :vocab]
        out["max_abs_dlogit"] = max(out["max_abs_dlogit"], float(np.abs(mine - theirs).max()))
        agree += int((mine.argmax(-1) == theirs.argmax(-1)).sum())
        lp, lq = log_softmax(theirs), log_softmax(mine)
        kl += float((np.exp(lp) * (lp - lq)).sum())
        out["positions"] += len(ids) + len(reply)
        diverged = None
        for k, tok in enumerate(reply):
            pos = len(ids) + k - 1
            got = int(mine[pos].argmax())
            if got != tok:
                diverged = (k, float(theirs[pos, tok] - theirs[pos, got]))
                break
        if diverged is None:
            out["greedy_identical"] += 1
        elif kind in TIE_MARGIN and strict:
            k, margin = diverged
            tie = TIE_MARGIN[kind] if kind != "lora" or (ref.dtype == "float32" and not quantized) \
                else TIE_MARGIN["merged_16bit"]
            if margin < tie:
                out["notes"].append(f"prompt {i}: greedy path left the reference at a near-tie (margin {margin:.3f}) "
                                    f"after {k} tokens")
            else:
                out["problems"].append(f"prompt {i}: greedy tokens differ from the model in memory after {k} tokens "
                                       f"(its margin {margin:.3f} logits)")
        if stopped:
            out["stop_expected"] += 1
            own = reply if diverged is None else greedy(model, ids, stops, 2 * len(reply) + 16)
            if own and own[-1] in stops:
                out["stopped"] += 1
            else:
                out["problems"].append(f"prompt {i}: the model in memory ends its turn after {len(reply)} tokens; "
                                       f"reloaded, it did not stop within {len(own)}")
    out["top1_agreement"] = agree / max(out["positions"], 1)
    out["mean_kl"] = kl / max(out["positions"], 1)
    # float32 on both sides and no 4-bit base (whose layers compute in 16-bit whatever the other weights are)
    both_fp32 = ref.dtype == "float32" and next(model.parameters()).dtype == torch.float32 and not quantized
    if kind == "lora" and both_fp32 and out["max_abs_dlogit"] > LORA_MAX_ABS:
        out["problems"].append(f"logits differ by up to {out['max_abs_dlogit']:.2e} (allowed {LORA_MAX_ABS:g} in float32)")
    if ref.unchecked_stops():
        out["notes"].append(ref.unchecked_stops())
    if not out["stop_expected"]:
        out["notes"].append("the model in memory ended no reply with a confident stop token: stopping not checked")
    return out


def room_to_reload(w, device: str, dtype, cfg, quantized: bool) -> str | None:
    """None when `w` can be loaded back beside the model in memory; else why not (sizes in GB)."""
    import torch

    width = torch.finfo(dtype).bits / 8
    need = w.bytes * (width / 2 if w.format == "merged_16bit" else 1)  # merged_16bit files are bfloat16
    if w.format == "lora":  # the base comes back too, as it trained
        from sftlib.training.model import resolve_model_name

        base = Path(resolve_model_name(cfg.model.name))
        if base.is_dir():
            stored_4bit = "quantization_config" in json.loads((base / "config.json").read_text())
            need += disk_bytes(base) * (1 if stored_4bit else 0.3 if quantized else width / 2)
    need *= 1.15
    free = torch.cuda.mem_get_info()[0] if device.startswith("cuda") else available_ram()
    if need <= free:
        return None
    where = "GPU" if device.startswith("cuda") else "RAM"
    return f"loading it back needs about {need / 1e9:.1f} GB and the {where} has {free / 1e9:.1f} GB free"


def reload(fmt: str, path: Path, cfg, device: str, dtype, quantization=None):
    from transformers import AutoModelForCausalLM

    from sftlib.exports.merged import load_adapters

    if fmt == "lora":  # on the base as it trained: 4-bit when training quantized it
        model, _ = load_adapters(cfg.model.name, path, dtype=str(dtype).replace("torch.", ""), device=device,
                                 quantization_config=quantization)
        return model
    if fmt == "merged_16bit":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device}, use_safetensors=True)
    return AutoModelForCausalLM.from_pretrained(path, device_map={"": device}, use_safetensors=True)


def set_aside(path: Path) -> Path:
    failed = path.with_name(path.name + ".failed")
    shutil.rmtree(failed, ignore_errors=True)
    path.rename(failed)
    return failed
