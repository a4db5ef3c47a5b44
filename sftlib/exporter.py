"""Every output in one call, each one reloaded and checked against the model in memory.

    import sftlib
    report = sftlib.export(model, tokenizer, cfg, formats=["lora", "merged_16bit", "gguf:q4_k_m", "gguf:q8_0"])
    print(report.table())          # format, file or folder, size, seconds, verification
    report.ok, report.paths["merged_16bit"], report.items[0].check

    python -m sftlib export --model outputs/model/lora --formats lora,merged_16bit,gguf:q4_k_m --out exported

Formats: `lora` (the adapters), `merged_16bit` (base + adapters merged, bfloat16), `merged_4bit`
(that, quantized to NF4 by bitsandbytes), `gguf` (every type in `export.gguf_quantizations`) and
`gguf:TYPE` for single llama.cpp types (f16, bf16, q8_0, q4_k_m, ...). GGUF files are converted from
the merged model, so asking for them writes `merged_16bit` too.

The reference is the model in memory: its greedy replies (a full forward per token, as in
sftlib.gguf_verify) to the check prompts, and its logits along them. Each written format is loaded
back the way a user loads it and held to:

| format | loaded back as | must hold |
|---|---|---|
| lora | base + adapters (peft), the base quantized as in training | the same greedy tokens (near-ties of < 0.05 logits tolerated in float32, < 0.5 in 16-bit); max abs logit difference <= 1e-3 when both are float32; every confident stop kept |
| merged_16bit | transformers, bfloat16 | the same greedy tokens (near-ties of < 0.5 logits tolerated: bfloat16 rounds weights to 8 bits of mantissa); every stop kept. When the model in memory computes on a 4-bit base, the merge (into the 16-bit weights) is a different model: greedy tokens are then reported, not required |
| merged_4bit | transformers + bitsandbytes | every confident stop kept; top-1 agreement, KL and greedy tokens reported |
| GGUF | llama.cpp | as sftlib.gguf_verify says (f16/bf16 the same greedy tokens, quantized types report) |

A format that cannot be loaded back beside the model in memory (an 8B merged in 16-bit next to the
training model on a 15 GB T4) is written and reported "not verified", with the sizes, and a warning.

"Every confident stop kept": where the reference ends its reply with a stop token it chose with
probability >= 0.5, the reloaded model's own greedy reply (up to twice as long, plus 16 tokens) must
end with a stop token too. A failed check raises ExportVerifyError after everything else is written;
the failed folder is renamed NAME.failed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

HF_FORMATS = ("lora", "merged_16bit", "merged_4bit")
LORA_MAX_ABS = 1e-3  # float32 reload of the same adapters on the same base: only summation order differs
TIE_MARGIN = {"lora": 0.05, "merged_16bit": 0.5}  # lora in 16-bit or on a 4-bit base: 0.5 (kernels round differently)
REPORT_NAME = "export_report.json"


class ExportError(ValueError):
    """Formats that cannot be written as asked; the message names each one and what to do."""


class ExportVerifyError(ExportError):
    """A written format did not pass its check; details are in the report."""


@dataclass
class Written:
    format: str
    path: str
    bytes: int = 0
    seconds: float = 0.0
    ok: bool | None = None  # None: not verified
    summary: str = ""
    check: dict = field(default_factory=dict)


@dataclass
class ExportReport:
    out_dir: str
    items: list[Written] = field(default_factory=list)
    seconds: float = 0.0
    report_path: str | None = None

    @property
    def ok(self) -> bool:
        return all(w.ok is not False for w in self.items)

    @property
    def paths(self) -> dict[str, str]:
        """{format: file or folder}, one entry per GGUF type (`gguf:q4_k_m`)."""
        return {w.format: w.path for w in self.items}

    @property
    def outputs(self) -> dict[str, str]:
        """{output: folder}: `lora`, `merged_16bit`, `merged_4bit`, and `gguf` for the GGUF folder."""
        found = {}
        for w in self.items:
            kind = "gguf" if w.format.startswith("gguf:") else w.format
            found[kind] = str(Path(w.path).parent) if kind == "gguf" else w.path
        return found

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    def table(self) -> str:
        rows = [f"{'format':<13} {'written':<36} {'size':>10} {'s':>7}  verification"]
        for w in self.items:
            verdict = "not verified" if w.ok is None else ("ok" if w.ok else "FAILED")
            size = f"{w.bytes / 1e9:.2f} GB" if w.bytes >= 1e8 else f"{w.bytes / 1e6:.1f} MB"
            name = Path(w.path).name if w.format.startswith("gguf") else w.path
            rows.append(f"{w.format:<13} {name[-36:]:<36} {size:>10} {w.seconds:>7.1f}  {verdict}  {w.summary}")
        return "\n".join(rows)


def parse_formats(formats, gguf_default=()) -> tuple[list[str], list[str]]:
    """(HF formats, GGUF types) from `lora`, `merged_16bit`, `merged_4bit`, `gguf`, `gguf:TYPE` entries
    (a list, or one comma-separated string); ExportError lists every entry it cannot take."""
    from sftlib.gguf_convert import check_types

    if isinstance(formats, str):
        formats = [f for f in formats.split(",") if f.strip()]
    hf, types, problems = [], [], []
    for entry in formats or []:
        name = str(entry).strip().lower()
        kind, _, qtype = name.partition(":")
        if name in HF_FORMATS:
            hf.append(name)
        elif name == "gguf":
            types += list(gguf_default)
        elif kind == "gguf" and qtype:
            types.append(qtype)
        else:
            problems.append(f"unknown format `{entry}`; use {', '.join(HF_FORMATS)}, gguf, or gguf:TYPE (e.g. gguf:q4_k_m)")
    if "gguf" in [str(f).strip().lower() for f in formats or []] and not gguf_default:
        problems.append("`gguf` asks for the types in `export.gguf_quantizations`, which is empty; name them as gguf:TYPE")
    hf, types = list(dict.fromkeys(hf)), list(dict.fromkeys(types))  # asked twice: written once
    if types:
        try:
            types = check_types(types)
        except ValueError as exc:
            problems.append(str(exc))
    if not hf and not types and not problems:
        problems.append("no format asked for; e.g. --formats lora,merged_16bit,gguf:q4_k_m")
    if problems:
        raise ExportError("cannot export as asked:\n" + "\n".join(f"  - {p}" for p in problems))
    return hf, types


def _quantization_config(model):
    """The bitsandbytes settings the (base) model was loaded with, or None when it is not quantized."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config, "quantization_config", None)


def compare(model, ref, stops: set[int], *, kind: str, strict: bool = True, quantized: bool = False) -> dict:
    """Hold `model` (a reloaded format) to the reference `ref` (sftlib.gguf_verify.Reference); see the table above."""
    import numpy as np
    import torch

    from sftlib.gguf_verify import _log_softmax, greedy

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
        lp, lq = _log_softmax(theirs), _log_softmax(mine)
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
    if not out["stop_expected"]:
        out["notes"].append("the model in memory ended no reply with a confident stop token: stopping not checked")
    return out


def _summary(check: dict) -> str:
    n = len(check.get("greedy", [])) or None
    return (f"max|dlogit| {check['max_abs_dlogit']:.2g}  top-1 {check['top1_agreement']:.1%}  KL {check['mean_kl']:.1e}  "
            f"greedy {check['greedy_identical']}/{n or check.get('prompts', '?')}  "
            f"stops {check['stopped']}/{check['stop_expected']}")


def _room_to_reload(w: Written, device: str, dtype, cfg, quantized: bool) -> str | None:
    """None when `w` can be loaded back beside the model in memory; else why not (sizes in GB)."""
    import torch

    from sftlib.gguf_verify import _available_ram
    from sftlib.save import disk_bytes

    width = torch.finfo(dtype).bits / 8
    need = w.bytes * (width / 2 if w.format == "merged_16bit" else 1)  # merged_16bit files are bfloat16
    if w.format == "lora":  # the base comes back too, as it trained
        from sftlib.model import resolve_model_name

        base = Path(resolve_model_name(cfg.model.name))
        if base.is_dir():
            stored_4bit = "quantization_config" in json.loads((base / "config.json").read_text())
            need += disk_bytes(base) * (1 if stored_4bit else 0.3 if quantized else width / 2)
    need *= 1.15
    free = torch.cuda.mem_get_info()[0] if device.startswith("cuda") else _available_ram()
    if need <= free:
        return None
    where = "GPU" if device.startswith("cuda") else "RAM"
    return f"loading it back needs about {need / 1e9:.1f} GB and the {where} has {free / 1e9:.1f} GB free"


def _reload(fmt: str, path: Path, cfg, device: str, dtype, quantization=None):
    from transformers import AutoModelForCausalLM

    from sftlib.save import load_adapters

    if fmt == "lora":  # on the base as it trained: 4-bit when training quantized it
        model, _ = load_adapters(cfg.model.name, path, dtype=str(dtype).replace("torch.", ""), device=device,
                                 quantization_config=quantization)
        return model
    if fmt == "merged_16bit":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device}, use_safetensors=True)
    return AutoModelForCausalLM.from_pretrained(path, device_map={"": device}, use_safetensors=True)


def _fail(path: Path) -> Path:
    failed = path.with_name(path.name + ".failed")
    shutil.rmtree(failed, ignore_errors=True)
    path.rename(failed)
    return failed


def export(model, tokenizer, cfg, formats=None, *, out: str | Path | None = None, template=None, verify: bool = True,
           conversations=None, pre_tokenizer: str | None = None, max_new_tokens: int = 48,
           log: Callable[[str], None] = print) -> ExportReport:
    """Write `formats` (default `cfg.export.formats`) of `model` (a peft model with adapters, or a merged
    model) to `out` (default `cfg.export.output_dir`), verify each, print and return the table.

    `conversations`: check prompts (message lists ending with a user turn; default: from the run's data,
    else generic ones); `max_new_tokens`: length bound of the reference replies."""
    import torch

    from sftlib.gguf_verify import config_conversations, hf_reference
    from sftlib.model import stop_token_ids
    from sftlib.save import disk_bytes, save_adapters, save_merged, save_merged_4bit
    from sftlib.templates import get_template

    start = time.time()
    hf_formats, types = parse_formats(cfg.export.formats if formats is None else formats,
                                      cfg.export.gguf_quantizations)
    has_adapters = hasattr(model, "peft_config")
    problems = []
    if not has_adapters and "lora" in hf_formats:
        problems.append("`lora`: this model has no LoRA adapters (it is merged already); leave `lora` out")
    if "merged_4bit" in hf_formats:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            problems.append(f"`merged_4bit` needs bitsandbytes ({exc}): `pip install bitsandbytes`")
    if types:
        from sftlib.gguf_setup import find_toolchain

        try:
            find_toolchain()
        except Exception as exc:  # noqa: BLE001 - its message says how to install it
            problems.append(f"`gguf`: {exc}")
    if problems:
        raise ExportError("cannot export as asked:\n" + "\n".join(f"  - {p}" for p in problems))

    template = get_template(template or cfg.model.chat_template)
    out = Path(out or cfg.export.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = ExportReport(out_dir=str(out))
    device = str(next(model.parameters()).device)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        dtype = torch.bfloat16
    ref = stops = None
    if verify and conversations is None:  # prompts the fine-tuned model answers: from its own data
        conversations = config_conversations(cfg)
    if verify and hf_formats:
        log("export: reference replies of the model in memory (greedy, full forward) on the check prompts")
        was_training = model.training
        model.eval()
        ref = hf_reference(model, tokenizer, template, conversations, max_new_tokens=max_new_tokens)
        model.train(was_training)
        stops = set(stop_token_ids(tokenizer, template))
    quantized = _quantization_config(model) is not None
    scratch = None  # adapters / merged model needed only as a step towards another format
    try:
        adapter_dir = None
        if has_adapters and ("lora" in hf_formats or "merged_16bit" in hf_formats or "merged_4bit" in hf_formats or types):
            if "lora" in hf_formats:
                adapter_dir = out / "lora"
            else:
                scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
                adapter_dir = scratch / "lora"
            t0 = time.time()
            save_adapters(model, tokenizer, adapter_dir)
            if "lora" in hf_formats:
                report.items.append(Written("lora", str(adapter_dir), disk_bytes(adapter_dir), time.time() - t0))
                log(f"export: lora written to {adapter_dir} ({time.time() - t0:.1f}s)")
        merged_dir = None
        if "merged_16bit" in hf_formats or "merged_4bit" in hf_formats or types:
            if "merged_16bit" in hf_formats:
                merged_dir = out / "merged_16bit"
            else:
                scratch = scratch or Path(tempfile.mkdtemp(prefix=".export-", dir=out))
                merged_dir = scratch / "merged_16bit"
            t0 = time.time()
            if has_adapters:
                save_merged(cfg.model.name, adapter_dir, merged_dir)
            else:  # a merged model already: written in bfloat16 (a float32 one goes back to float32 after)
                from sftlib.save import atomic_dir

                with atomic_dir(merged_dir) as tmp:
                    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
                    tokenizer.save_pretrained(tmp)
                model.to(dtype)
            if "merged_16bit" in hf_formats:
                report.items.append(Written("merged_16bit", str(merged_dir), disk_bytes(merged_dir), time.time() - t0))
                log(f"export: merged_16bit written to {merged_dir} ({time.time() - t0:.1f}s)")
        if "merged_4bit" in hf_formats:
            t0 = time.time()
            folder = save_merged_4bit(merged_dir, out / "merged_4bit")
            report.items.append(Written("merged_4bit", str(folder), disk_bytes(folder), time.time() - t0))
            log(f"export: merged_4bit written to {folder} ({time.time() - t0:.1f}s)")

        if ref is not None:
            for w in report.items:
                short = _room_to_reload(w, device, dtype, cfg, quantized)
                if short:  # e.g. an 8B merged in 16-bit beside the training model on a 15 GB T4
                    w.summary = f"not verified: {short}"
                    log(f"export: {w.format} {w.summary}")
                    warnings.warn(f"{w.format} was written but not checked: {short}")
                    continue
                log(f"export: verifying {w.format}: loading it back")
                t0 = time.time()
                other = _reload(w.format, Path(w.path), cfg, device, dtype, _quantization_config(model))
                strict = not (w.format == "merged_16bit" and quantized)
                w.check = compare(other, ref, stops, kind=w.format, strict=strict, quantized=quantized)
                w.check["seconds"] = time.time() - t0
                w.check["prompts"] = len(ref.prompt_ids)
                del other
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
                w.ok = not w.check["problems"]
                w.summary = _summary(w.check)
                for problem in w.check["problems"]:
                    log(f"export:   {w.format}: {problem}")
                if not w.ok:
                    w.path = str(_fail(Path(w.path)))

        if types:
            from sftlib.gguf import export_gguf

            base = "sftlib-demo" if cfg.model.name == "demo" else Path(str(cfg.model.name).rstrip("/")).name
            pre = pre_tokenizer or getattr(cfg.export, "gguf_pre_tokenizer", "") or None
            if pre is None and cfg.model.name == "demo":
                pre = "gpt-2"  # the demo's tokenizer is sftlib.tiny's: byte-level BPE with GPT-2's split
            from sftlib.gguf_convert import GGUFVerifyError

            try:
                result = export_gguf(merged_dir, out / "gguf", types, template=template, tokenizer=tokenizer,
                                     model_name=f"{base}-sft", pre_tokenizer=pre, verify=verify,
                                     conversations=conversations, max_new_tokens=max_new_tokens, log=log)
                files = result.files
            except GGUFVerifyError:
                files = json.loads((out / "gguf" / "gguf_report.json").read_text())["files"]
                from sftlib.gguf import GGUFFile

                files = [GGUFFile(**f) for f in files]
            for f in files:
                w = Written(f"gguf:{f.type}", f.path, f.bytes, f.seconds, f.ok, check=f.check or {})
                if f.check:
                    w.summary = _summary({**f.check, "prompts": len(f.check.get("greedy", []))})
                report.items.append(w)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    report.seconds = time.time() - start
    report.report_path = str(out / REPORT_NAME)
    tmp = out / f".{REPORT_NAME}.tmp-{os.getpid()}"
    tmp.write_text(report.to_json())
    os.replace(tmp, out / REPORT_NAME)
    log(report.table())
    if not report.ok:
        failed = [f"{w.format} ({Path(w.path).name}): {'; '.join(w.check.get('problems', []))}"
                  for w in report.items if w.ok is False]
        raise ExportVerifyError(f"verification failed (kept aside as *.failed; details in {report.report_path}):\n"
                                + "\n".join(f"  - {x}" for x in failed))
    return report


def template_of(tokenizer):
    """The sftlib template whose text the tokenizer carries (training sets it), or None."""
    from sftlib.templates import TEMPLATES

    text = getattr(tokenizer, "chat_template", None)
    return next((t for t in TEMPLATES.values() if text and t.jinja == text), None)


def load_for_export(folder: str | Path, cfg=None, *, device: str | None = None):
    """(model, tokenizer, cfg) from a folder of saved adapters (`adapter_config.json`; the base is
    `cfg.model.name` when a config is given, else the one the adapters name) or of a merged model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlib.config import RunConfig
    from sftlib.save import load_adapters

    folder = Path(folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if (folder / "adapter_config.json").is_file():
        base = cfg.model.name if cfg is not None else \
            json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        from sftlib.model import demo_model_folder

        if base and Path(base).resolve() == demo_model_folder().resolve():
            base = "demo"  # the embedded demo model: a name that finds it again on any machine
        if not base:
            raise ExportError(f"`{folder}/adapter_config.json` names no base model; pass --config with `model.name`")
        model, tokenizer = load_adapters(base, folder, dtype=dtype, device=device)
    elif (folder / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), device_map={"": device},
                                                     use_safetensors=True)
        base = str(folder)
    else:
        raise ExportError(f"`{folder}` holds neither LoRA adapters (adapter_config.json) nor a model (config.json); "
                          "point --model at the `lora` or `merged_16bit` folder a run wrote")
    if cfg is None:
        template = template_of(tokenizer)
        if template is None:
            raise ExportError(f"the tokenizer in `{folder}` carries no chat template sftlib knows; pass --template "
                              "(the one used in training) or --config")
        cfg = RunConfig().with_overrides({"model.name": base, "model.chat_template": template.name})
    model.eval()
    return model, tokenizer, cfg
