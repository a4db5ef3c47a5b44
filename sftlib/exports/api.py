"""Every output in one call, each one reloaded and checked against the model in memory.

    import sftlib
    report = sftlib.export(model, tokenizer, cfg, formats=["lora", "merged_16bit", "gguf:q4_k_m", "gguf:q8_0"])
    print(report.table())          # format, file or folder, size, seconds, verification
    report.ok, report.paths["merged_16bit"], report.items[0].check

    python -m sftlib export --model outputs/model/lora --formats lora,merged_16bit,gguf:q4_k_m --out exported

Formats: `lora` (the adapters), `merged_16bit` (base + adapters merged, bfloat16), `merged_4bit`
(that, quantized to NF4 by bitsandbytes), `gguf` (every type in `export.gguf_quantizations`) and
`gguf:TYPE` for single llama.cpp types (f16, bf16, q8_0, q4_k_m, ...). GGUF files are converted from
the merged model, so asking for them writes `merged_16bit` too (in a scratch folder when not asked for).

The reference is the model in memory (sftlib.exports.reference); each written format is loaded back
and held to it as sftlib.exports.verify (and sftlib.exports.gguf.verify for GGUF files) says. A
failed check renames the output NAME.failed and raises ExportVerifyError after everything else is
written; `export_report.json` in the output folder holds every figure.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

from sftlib.exports.report import ExportError, ExportReport, Output, check_summary
from sftlib.files import disk_bytes

HF_FORMATS = ("lora", "merged_16bit", "merged_4bit")
REPORT_NAME = "export_report.json"


def parse_formats(formats, gguf_default=()) -> tuple[list[str], list[str]]:
    """(HF formats, GGUF types) from `lora`, `merged_16bit`, `merged_4bit`, `gguf`, `gguf:TYPE` entries
    (a list, or one comma-separated string); ExportError lists every entry it cannot take."""
    from sftlib.exports.gguf.convert import check_types

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


def export(model, tokenizer, cfg, formats=None, *, out: str | Path | None = None, template=None, verify: bool = True,
           conversations=None, pre_tokenizer: str | None = None, max_new_tokens: int | None = None,
           model_name: str | None = None,
           log: Callable[[str], None] = print) -> ExportReport:
    """Write `formats` (default `cfg.export.formats`) of `model` (a peft model with adapters, or a merged
    model) to `out` (default `cfg.export.output_dir`), verify each, print and return the table.

    `conversations`: check prompts (message lists ending with a user turn; default: from the run's data,
    else generic ones); `max_new_tokens`: length bound of the reference replies (default
    `export.check_max_new_tokens`); `model_name`: the GGUF's general.name and file stem (default: the
    model exported, `<name>-sft`)."""
    from sftlib.data.templates import get_template
    from sftlib.exports.reference import config_conversations, hf_reference
    from sftlib.exports.verify import quantization_config
    from sftlib.training.tokenizer import stop_token_ids

    start = time.time()
    max_new_tokens = max_new_tokens or cfg.export.check_max_new_tokens
    hf_formats, types = parse_formats(cfg.export.formats if formats is None else formats,
                                      cfg.export.gguf_quantizations)
    _refuse_what_cannot_be_written(model, hf_formats, types)
    template = get_template(template or cfg.model.chat_template)
    out = Path(out or cfg.export.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = ExportReport(out_dir=str(out))
    ref = stops = None
    if verify and conversations is None:  # prompts the fine-tuned model answers: from its own data
        conversations = config_conversations(cfg)
    if verify and hf_formats:
        log("export: reference replies of the model in memory (greedy, full forward) on the check prompts")
        was_training = model.training
        model.eval()
        ref = hf_reference(model, tokenizer, template, conversations, max_new_tokens=max_new_tokens)
        model.train(was_training)
        if ref.unchecked_stops():
            log(f"export: {ref.unchecked_stops()}")
        stops = set(stop_token_ids(tokenizer, template))
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=out))  # steps towards other formats, never kept
    try:
        merged_dir = _write_hf(model, tokenizer, cfg, hf_formats, bool(types), out, scratch, report, log)
        if ref is not None:
            _verify_hf(model, cfg, ref, stops, report, quantized=quantization_config(model) is not None, log=log)
        if types:
            from sftlib.exports.gguf.export import export_gguf

            base = "sftlib-demo" if cfg.model.name == "demo" else Path(str(cfg.model.name).rstrip("/")).name
            model_name = model_name or f"{base}-sft"
            pre = pre_tokenizer or getattr(cfg.export, "gguf_pre_tokenizer", "") or None
            if pre is None and cfg.model.name == "demo":
                pre = "gpt-2"  # the demo's tokenizer is sftlib.demo.tiny's: byte-level BPE with GPT-2's split
            gguf = export_gguf(merged_dir, out / "gguf", types, template=template, tokenizer=tokenizer,
                               model_name=model_name, pre_tokenizer=pre, verify=verify, conversations=conversations,
                               max_new_tokens=max_new_tokens, log=log, raise_on_failure=False)
            report.items += gguf.items
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report.seconds = time.time() - start
    report.write(out / REPORT_NAME)
    log(report.table())
    return report.raise_if_failed()


def _refuse_what_cannot_be_written(model, hf_formats: list[str], types: list[str]) -> None:
    """ExportError listing every asked-for format this model or machine cannot produce, before writing any."""
    problems = []
    if not hasattr(model, "peft_config") and "lora" in hf_formats:
        problems.append("`lora`: this model has no LoRA adapters (it is merged already); leave `lora` out")
    if "merged_4bit" in hf_formats:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            problems.append(f"`merged_4bit` needs bitsandbytes ({exc}): `pip install bitsandbytes`")
    if types:
        from sftlib.exports.gguf.setup import find_toolchain

        try:
            find_toolchain()
        except Exception as exc:  # noqa: BLE001 - its message says how to install it
            problems.append(f"`gguf`: {exc}")
    if problems:
        raise ExportError("cannot export as asked:\n" + "\n".join(f"  - {p}" for p in problems))


def _write_hf(model, tokenizer, cfg, hf_formats: list[str], gguf: bool, out: Path, scratch: Path,
              report: ExportReport, log) -> Path | None:
    """Write the adapters and merged models asked for (and the merged 16-bit model GGUF needs) into `out`,
    or into `scratch` when only needed as a step; returns the merged 16-bit folder (None if not written)."""
    import torch

    from sftlib.exports.merged import save_adapters, save_merged, save_merged_4bit, save_tokenizer

    def written(fmt: str, path: Path, t0: float) -> None:
        report.items.append(Output(fmt, str(path), disk_bytes(path), time.time() - t0))
        log(f"export: {fmt} written to {path} ({time.time() - t0:.1f}s)")

    has_adapters = hasattr(model, "peft_config")
    merged_needed = "merged_16bit" in hf_formats or "merged_4bit" in hf_formats or gguf
    adapter_dir = None
    if has_adapters and ("lora" in hf_formats or merged_needed):
        adapter_dir = (out if "lora" in hf_formats else scratch) / "lora"
        t0 = time.time()
        save_adapters(model, tokenizer, adapter_dir)
        if "lora" in hf_formats:
            written("lora", adapter_dir, t0)
    if not merged_needed:
        return None
    merged_dir = (out if "merged_16bit" in hf_formats else scratch) / "merged_16bit"
    t0 = time.time()
    if has_adapters:
        save_merged(cfg.model.name, adapter_dir, merged_dir)
    else:  # a merged model already: written in bfloat16 (a float32 one goes back to float32 after)
        from sftlib.files import atomic_dir

        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        with atomic_dir(merged_dir) as tmp:
            model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
            save_tokenizer(tokenizer, tmp)
        model.to(dtype)
    if "merged_16bit" in hf_formats:
        written("merged_16bit", merged_dir, t0)
    if "merged_4bit" in hf_formats:
        t0 = time.time()
        written("merged_4bit", save_merged_4bit(merged_dir, out / "merged_4bit"), t0)
    return merged_dir


def _verify_hf(model, cfg, ref, stops: set[int], report: ExportReport, *, quantized: bool, log) -> None:
    """Load each written output back and hold it to the reference; a failed one is renamed NAME.failed."""
    import torch

    from sftlib.exports.verify import compare, quantization_config, reload, room_to_reload, set_aside

    device = str(next(model.parameters()).device)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        dtype = torch.bfloat16
    for item in report.items:
        short = room_to_reload(item, device, dtype, cfg, quantized)
        if short:  # e.g. an 8B merged in 16-bit beside the training model on a 15 GB T4
            item.summary = f"not verified: {short}"
            log(f"export: {item.format} {item.summary}")
            warnings.warn(f"{item.format} was written but not checked: {short}")
            continue
        log(f"export: verifying {item.format}: loading it back")
        t0 = time.time()
        other = reload(item.format, Path(item.path), cfg, device, dtype, quantization_config(model))
        strict = not (item.format == "merged_16bit" and quantized)
        item.check = compare(other, ref, stops, kind=item.format, strict=strict, quantized=quantized)
        item.check["seconds"] = time.time() - t0
        item.check["prompts"] = len(ref.prompt_ids)
        del other
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        item.ok = not item.check["problems"]
        item.summary = check_summary(item.check)
        for problem in item.check["problems"]:
            log(f"export:   {item.format}: {problem}")
        if not item.ok:
            item.path = str(set_aside(Path(item.path)))
