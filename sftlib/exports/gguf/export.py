"""Merged model -> GGUF files for llama.cpp, Ollama and LM Studio, each one checked before it is kept.

    from sftlib.exports.gguf.export import export_gguf
    report = export_gguf("model/merged_16bit", "model/gguf", ["q4_k_m", "q8_0"], template="chatml",
                         model_name="my-model")
    print(report.table())          # file, type, size, seconds, verification (an sftlib.exports.report.ExportReport)
    report.items[0].path, report.items[0].check["mean_kl"], report.extra["modelfile"], report.report_path

One conversion with llama.cpp's own `convert_hf_to_gguf.py` to a 16-bit file (f16, or bf16 when only
bf16 is asked for), then one `llama_model_quantize` call per type from that file (a `llama-quantize`
on PATH when the Python binding is missing). The toolchain comes from `python -m sftlib gguf-setup`.

What the files carry beyond the converter's defaults, from the chat template used in training:
- `tokenizer.chat_template`: the template, with `{{ bos_token }}` in front when training put BOS
  before a template that does not write it (llama.cpp renders the template and then tokenizes it
  without adding BOS; llama-server strips a leading BOS before adding its own, so there is one BOS);
- `tokenizer.ggml.add_bos_token`: whether training put BOS first (sftlib.data.encode.bos_prefix's rule);
  without the key llama.cpp guesses from the vocab type and adds BOS where training did not;
- `tokenizer.ggml.eot_token_id`: the template's end-of-turn token, so llama.cpp ends the turn there;
- `tokenizer.ggml.add_space_prefix` (SentencePiece vocabularies): whether a word right after a special
  token starts with "▁", as the HF tokenizer does it (llama.cpp's default differs from transformers').
  Chat prompts then tokenize as in training; raw text at the very start of a completion prompt may not.
`general.name` is always set (`model_name`): left out, the converter uses the folder name, and names
with an architecture word in them change llama.cpp's vocab handling.

BPE tokenizers are identified by a hash of how they split a fixed text; a custom or modified one is
unknown to the converter. Then `pre_tokenizer` names the llama.cpp split rule to use ("llama-bpe"
for the Llama 3 regex, "qwen2", "gpt-2", ... or "auto" to take the one read from tokenizer.json);
without it the export stops with the suggestion. A wrong name converts fine and tokenizes
differently, which is why every file's token ids are compared with the HF tokenizer afterwards.

Safety: free disk space is checked first; each file is written under a hidden temporary name and
renamed only after its verification passes (a failed one is kept as `NAME.gguf.failed`, and the
export raises GGUFVerifyError); an interrupted export leaves no file that looks complete.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from sftlib.exports.gguf.convert import (FLOAT_TYPES, GGUFExportError, GGUFVerifyError, check_types, convert,
                                         estimate_bytes, gguf_settings, quantize)
from sftlib.exports.report import ExportReport, Output, check_summary
from sftlib.files import check_free_space, human_size, pid_alive

REPORT_NAME = "gguf_report.json"


def _remove_dead_partials(out_dir: Path, stem: str) -> None:
    """Delete temporary files a killed export of `stem` left in `out_dir` (those of live processes stay)."""
    for stale in out_dir.glob(f".{stem}.*.gguf.partial-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            stale.unlink(missing_ok=True)


def export_gguf(
    merged_dir: str | Path,
    out_dir: str | Path,
    quantizations=("q4_k_m",),
    *,
    template,
    tokenizer=None,
    model_name: str = "sftlib-model",
    pre_tokenizer: str | None = None,
    add_bos: bool | None = None,
    base_type: str = "f16",
    verify: bool = True,
    conversations: list[list[dict]] | None = None,
    max_new_tokens: int = 48,
    system: str | None = None,
    modelfile: bool = True,
    threads: int | None = None,
    log: Callable[[str], None] = print,
    raise_on_failure: bool = True,
) -> ExportReport:
    """Convert `merged_dir` once and write one verified GGUF per type in `quantizations` to `out_dir`.

    `template`: the ChatTemplate (or name) used in training. `tokenizer`: the fitted tokenizer
    (default: the one saved in `merged_dir`). `add_bos`: override the BOS rule (default: what training
    did). `base_type`: the 16-bit file quantized from (kept only when it is in `quantizations`).
    `conversations`: prompts (message lists ending with a user turn) for the checks, ideally ones the
    fine-tuned model answers; `max_new_tokens` bounds the reference replies. When a file fails its
    checks, it is kept as NAME.gguf.failed and, after everything else is written, GGUFVerifyError is
    raised (unless `raise_on_failure=False`: then the report says so and the caller decides).
    """
    from sftlib.data.templates import get_template
    from sftlib.exports.gguf.setup import find_toolchain

    start = time.time()
    template = get_template(template)
    types, base_type = _types(quantizations, base_type)
    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    if not (merged_dir / "config.json").is_file():
        raise GGUFExportError(f"`merged_dir` {merged_dir} has no config.json; save the merged model there first")
    toolchain = find_toolchain()
    _require_llama_cpp(toolchain, verify, need_quantizer=any(t != base_type for t in types))
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    settings = gguf_settings(tokenizer, template, add_bos)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_free_space(out_dir, estimate_bytes(merged_dir, types, base_type), f"GGUF files ({', '.join(types)})")
    _warn_k_quant_widths(merged_dir, types)

    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in model_name).strip("-.") or "model"
    final = {t: out_dir / f"{stem}.{t.upper()}.gguf" for t in types}
    base_path = final.get(base_type, out_dir / f"{stem}.{base_type.upper()}.gguf")
    partial = {t: p.with_name(f".{p.name}.partial-{os.getpid()}") for t, p in {**final, base_type: base_path}.items()}
    _remove_dead_partials(out_dir, stem)
    report = ExportReport(out_dir=str(out_dir), extra={"model_name": model_name, "settings": asdict(settings)})
    eot = template.end_of_turn_text(settings.eos_token)
    log(f"gguf: BOS {'added' if settings.add_bos else 'not added'}, end of turn {eot!r} (id {settings.eot_token_id}), "
        f"stop tokens {settings.stop_strings}")
    try:
        written = _write_files(merged_dir, types, base_type, partial, final, base_path, settings, model_name,
                               pre_tokenizer, toolchain, threads, log)
        report.items = [written[t] for t in types]
        if verify:
            _verify_files(report, partial, merged_dir, tokenizer, template, settings, conversations, max_new_tokens,
                          threads, log)
        for f in report.items:  # only now do files get names that look finished
            target = Path(f.path) if f.ok is not False else Path(f.path + ".failed")
            os.replace(partial[f.format.partition(":")[2]], target)
            f.path = str(target)
            stale = Path(f.path[: -len(".failed")]) if f.ok is False else Path(f.path + ".failed")
            stale.unlink(missing_ok=True)
    finally:
        for p in partial.values():
            p.unlink(missing_ok=True)
    if modelfile:
        _modelfile(report, out_dir, template, settings, system, log)
    report.seconds = time.time() - start
    report.write(out_dir / REPORT_NAME)
    log(report.table())
    if raise_on_failure and not report.ok:
        failed = [f"{Path(f.path).name}: {'; '.join(f.check['problems'])}" for f in report.failures()]
        raise GGUFVerifyError("GGUF verification failed (files kept aside as *.gguf.failed, details in "
                              f"{report.report_path}):\n" + "\n".join(f"  - {x}" for x in failed), report=report)
    return report


def _types(quantizations, base_type: str) -> tuple[list[str], str]:
    """The checked types to write, and the 16-bit (or 32-bit) type to convert to first."""
    types = check_types(quantizations)
    if base_type not in ("f16", "bf16", "f32"):
        raise GGUFExportError(f"`base_type` must be f16, bf16 or f32, got `{base_type}`")
    floats = [t for t in types if t in FLOAT_TYPES]
    if "bf16" in floats:  # merged checkpoints are bfloat16: convert to bf16 losslessly, round to f16 from it
        base_type = "bf16"
    elif floats and base_type not in floats:
        base_type = floats[0]  # convert straight to the float type asked for
    return types, base_type


def _require_llama_cpp(toolchain, verify: bool, *, need_quantizer: bool) -> None:
    """llama.cpp's library checks the files and quantizes them (the `llama-quantize` binary can do the latter)."""
    if not (verify or need_quantizer):
        return
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        if verify or not toolchain.quantize_binary:
            raise GGUFExportError(f"`llama_cpp` cannot be imported ({exc}); run `python -m sftlib gguf-setup`"
                                  + (" or pass verify=False" if verify else "")) from exc


def _warn_k_quant_widths(merged_dir: Path, types: list[str]) -> None:
    config = json.loads((merged_dir / "config.json").read_text())
    widths = {config.get(k) for k in ("hidden_size", "intermediate_size") if config.get(k)}
    if any("_k" in t for t in types) and any(w % 256 for w in widths):
        warnings.warn(f"K-quants work on rows of 256 values and this model has widths {sorted(widths)}: llama.cpp "
                      "writes q5_0/q8_0 instead for those tensors (files are larger and named after the K type)")


def _write_files(merged_dir, types, base_type, partial, final, base_path, settings, model_name, pre_tokenizer,
                 toolchain, threads, log) -> dict[str, Output]:
    """One conversion to `base_type`, then one quantization per other type, each to its partial name."""
    t0 = time.time()
    log(f"gguf: converting {merged_dir} to {base_type} with llama.cpp's converter ({toolchain.version})")
    convert(merged_dir, partial[base_type], base_type, settings=settings, model_name=model_name,
            pre_tokenizer=pre_tokenizer, toolchain=toolchain)
    written = {base_type: Output(f"gguf:{base_type}", str(final.get(base_type, base_path)),
                                 partial[base_type].stat().st_size, time.time() - t0)}
    log(f"gguf: {base_type} written, {human_size(written[base_type].bytes)} in {written[base_type].seconds:.1f}s")
    for t in types:
        if t == base_type:
            continue
        t0 = time.time()
        quantize(partial[base_type], partial[t], t, threads=threads, toolchain=toolchain)
        written[t] = Output(f"gguf:{t}", str(final[t]), partial[t].stat().st_size, time.time() - t0)
        log(f"gguf: {t} written, {human_size(written[t].bytes)} in {written[t].seconds:.1f}s")
    return written


def _verify_files(report, partial, merged_dir, tokenizer, template, settings, conversations, max_new_tokens,
                  threads, log) -> None:
    """Each written file against transformers' replies on the check prompts; results go into the report's items."""
    from sftlib.exports.gguf.verify import check_gguf
    from sftlib.exports.reference import hf_reference

    log("gguf: verifying: HF reference (full-forward greedy) on the check prompts")
    ref = hf_reference(merged_dir, tokenizer, template, conversations, max_new_tokens=max_new_tokens,
                       text_prefix=settings.bos_token if settings.add_bos else "")
    for f in report.items:
        qtype = f.format.partition(":")[2]
        log(f"gguf: verifying {qtype} in llama.cpp")
        check = check_gguf(partial[qtype], ref, tokenizer, template, settings, qtype=qtype, threads=threads)
        f.ok, f.check = check.ok, asdict(check)
        f.summary = check_summary(f.check)
        for problem in check.problems:
            log(f"gguf:   {qtype}: {problem}")


def _modelfile(report, out_dir: Path, template, settings, system, log) -> None:
    """Ollama's Modelfile for the best file that passed (q4_k_m, q8_0, f16, else the first); none if all failed."""
    from sftlib.exports.modelfile import write_modelfile

    good = [f for f in report.items if f.ok is not False]
    if not good:
        (out_dir / "Modelfile").unlink(missing_ok=True)  # it would name a file that failed
        return
    preferred = next((f for t in ("q4_k_m", "q8_0", "f16") for f in good if f.format == f"gguf:{t}"), good[0])
    path = write_modelfile(out_dir / "Modelfile", Path(preferred.path).name, template,
                           eos_token=settings.eos_token or "", system=system)
    report.extra["modelfile"] = str(path)
    log(f"gguf: Ollama Modelfile {path} (FROM {Path(preferred.path).name})")

