"""The model card: a README.md beside the exports that says how they were made, so a run can be repeated.

    from sftlib.exports.card import write_card
    write_card("model", cfg, result, train_ds=train_ds)     # model/README.md

It holds the resolved config (as YAML), the base model, the chat template (name, SHA-256 of its text,
stop tokens), the dataset (source, split, rows, `datasets` fingerprint), the held-out figures before
and after (for preference tuning: the preference accuracy and reward margin), training throughput,
every output folder with its size, the GGUF files with their checks
when `gguf_report.json` is there, and the package versions. Every line passes through
`sftlib.tokens.redact`, so a token can never end up in it.
"""

from __future__ import annotations

import hashlib
import os
from importlib import metadata
from pathlib import Path

from sftlib.exports.report import ExportReport
from sftlib.files import atomic_write_text, disk_bytes, human_size

PACKAGES = ("sftlib", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "unsloth", "bitsandbytes",
            "llama_cpp_python")


def _versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def card_text(cfg, result, *, train_ds=None, template=None) -> str:
    """The card's markdown for a finished `pipeline.RunResult` (or anything with the same fields)."""
    from sftlib.tokens import redact
    from sftlib.data.templates import get_template

    template = template or get_template(cfg.model.chat_template)
    method = getattr(result, "method", "sft")
    what = {"sft": "a LoRA fine-tune", "dpo": "a LoRA preference tune (DPO)", "orpo": "a LoRA preference tune (ORPO)"}
    lines = [f"# {Path(cfg.export.output_dir).name}: {what.get(method, method)} of {cfg.model.name}", "",
             "Made with sftlib. Everything below was recorded by the run itself.", "",
             "## Model and template", "",
             f"- base model: `{cfg.model.name}` (max sequence length {cfg.model.max_seq_length})",
             f"- chat template: `{template.name}`, SHA-256 of its text "
             f"`{hashlib.sha256(template.jinja.encode()).hexdigest()[:16]}`; "
             f"stop tokens: {', '.join('EOS' if t == '{eos}' else f'`{t}`' for t in template.stop_tokens)}",
             f"- tokens added to the vocabulary: {', '.join(f'`{t}`' for t in result.added_tokens) or 'none'}; "
             f"pad token `{result.pad_token}`",
             f"- LoRA: r={cfg.lora.r}, alpha={cfg.lora.alpha}, rsLoRA={cfg.lora.use_rslora}, "
             f"DoRA={cfg.lora.use_dora}, modules {', '.join(cfg.lora.target_modules)}"
             + (f"; continued from the adapters in `{cfg.lora.start_from}`" if cfg.lora.start_from else ""), "",
             "## Data", "",
             f"- source `{cfg.data.source}`, split `{cfg.data.split}`, loss on `{cfg.data.train_on}` tokens"
             if method == "sft" else
             f"- source `{cfg.data.source}`, split `{cfg.data.split}`: preference pairs (prompt, chosen, rejected), "
             f"`train.method: {method}`, beta {cfg.train.beta}"
             + (f", loss `{cfg.train.loss_type}`" + (f" + {cfg.train.sft_weight} x SFT on the chosen replies"
                                                     if cfg.train.sft_weight else "") if method == "dpo" else ""),
             f"- {result.train_rows} training {'rows' if method == 'sft' else 'pairs'}, {result.eval_rows} held out, "
             f"{result.truncated_rows} cut at the maximum length; {result.trained_token_share:.1%} of training tokens "
             f"{'trained' if method == 'sft' else 'in the replies'}"]
    fingerprint = getattr(train_ds, "_fingerprint", None)
    if fingerprint:
        lines.append(f"- `datasets` fingerprint of the training rows: `{fingerprint}`")
    lines += ["", "## Results", ""]
    if result.before and result.after:
        lines += ["| held-out | before | after |", "|---|---:|---:|",
                  f"| loss | {result.before['loss']:.4f} | {result.after['loss']:.4f} |",
                  f"| perplexity | {result.before['perplexity']:.3f} | {result.after['perplexity']:.3f} |"]
        if result.accuracy_after is not None:
            lines.append(f"| exact answers | {result.accuracy_before:.0%} | {result.accuracy_after:.0%} |")
        lines.append("")
    figs = getattr(result, "preference", None) or {}
    if "accuracy_after" in figs:
        lines += [f"| held-out pairs ({figs['pairs']}) | before | after |", "|---|---:|---:|",
                  f"| preference accuracy (chosen scored above rejected) | {figs['accuracy_before']:.0%} | "
                  f"{figs['accuracy_after']:.0%} |",
                  f"| mean log-probability margin, chosen - rejected | {figs['logp_margin_before']:.3f} | "
                  f"{figs['logp_margin_after']:.3f} |",
                  f"| reward margin against the model before training (beta {cfg.train.beta}) | 0 | "
                  f"{figs['reward_margin']:.3f} |"]
        if result.accuracy_after is not None:
            lines.append(f"| replies equal to the chosen ones | {result.accuracy_before:.0%} | "
                         f"{result.accuracy_after:.0%} |")
        lines.append("")
    train = result.train or {}
    if train:
        lines.append(f"Training: {train.get('steps')} steps, {train.get('tokens_seen'):,} tokens, "
                     f"{train.get('tokens_per_s', 0):,.0f} tokens/s, peak memory {train.get('peak_memory_gib', 0):.2f} "
                     f"GiB ({train.get('memory_kind')}), backend `{result.backend}`.")
    lines += ["", "## Files", "", "| output | folder | size |", "|---|---|---:|"]
    for name, folder in result.outputs.items():
        path = Path(folder)
        if path.exists():
            lines.append(f"| {name} | `{path.name}` | {human_size(disk_bytes(path))} |")
    gguf = Path(result.outputs.get("gguf", "")) / "gguf_report.json" if result.outputs.get("gguf") else None
    if gguf is not None and gguf.exists():
        report = ExportReport.from_json(gguf.read_text())
        lines += ["", "| GGUF file | type | size | checked in llama.cpp | max abs dlogit | top-1 | stops |",
                  "|---|---|---:|---|---:|---:|---:|"]
        for f in report.items:
            c = f.check or {}
            verdict = "not checked" if f.ok is None else "passed" if f.ok else "FAILED"
            lines.append(f"| `{Path(f.path).name}` | {f.format.partition(':')[2]} | {human_size(f.bytes)} | {verdict} | "
                         f"{c.get('max_abs_dlogit', float('nan')):.3g} | {c.get('top1_agreement', float('nan')):.1%} | "
                         f"{c.get('stopped', '-')}/{c.get('stop_expected', '-')} |")
    lines += ["", "## Config", "", "```yaml", cfg.to_yaml().rstrip(), "```", "", "## Versions", "",
              ", ".join(f"{k} {v}" for k, v in _versions().items()), ""]
    return redact("\n".join(lines))


def write_card(folder: str | os.PathLike, cfg, result, *, train_ds=None, template=None) -> Path:
    """Write `folder`/README.md (under a temporary name first, then renamed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(folder / "README.md", card_text(cfg, result, train_ds=train_ds, template=template))
