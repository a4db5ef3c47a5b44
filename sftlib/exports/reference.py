"""The model in memory as the reference every written output is held to: its greedy replies and logits.

    from sftlib.exports.reference import hf_reference, config_conversations
    ref = hf_reference(model, tokenizer, template, config_conversations(cfg))   # or a merged folder's path
    ref.prompt_ids, ref.reply_ids, ref.stopped, ref.logits

The replies come from a full-forward greedy loop: `generate()` with its key/value cache was seen to
pick a different token than the full forward on a bfloat16 model, and llama.cpp agreed with the full
forward. Each reply runs until one of the template's stop tokens or `max_new_tokens`. A folder is
loaded in float32 where it fits (a GPU first, else RAM), in bfloat16 when only that fits.
The check prompts come from the run's own data (`config_conversations`): prompts the fine-tuned
model answers, so that stopping can be checked.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from sftlib.exports.report import ExportError

# Strings where tokenizers tend to disagree: leading/trailing/multiple spaces, tabs, newlines, digits, emoji, accents.
TRICKY_STRINGS = [
    "Hello world", " Hello  world ", "\tTabs\tand\nnew\n\nlines\n", "1234567890 3.14 1,000,000",
    "émojis 🙂🚀 and accents: café, naïve, Zürich", "CJK: 我想在apple工作", "   leading spaces",
    "trailing spaces   ", "I've been 'told' he's there, 'RE you sure?", "<html> a=b && c!=d; x->y </html>",
]
STOP_CONFIDENCE = 0.5  # a fine-tuned model that answers ends its turn far more surely than this
DEFAULT_CONVERSATIONS = [
    [{"role": "user", "content": "Hello! Who are you?"}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Give me three tips for writing clear code."}],
]


@dataclass
class Reference:
    """The HF model's side of the comparison, computed once and reused for every file."""

    conversations: list[list[dict]]
    prompt_ids: list[list[int]]  # exactly what training feeds for these prompts
    reply_ids: list[list[int]]  # HF greedy continuation (full forward), stop token included when it stopped
    stopped: list[bool]  # the reply ended with a stop token the model chose with probability >= STOP_CONFIDENCE
    reply_texts: list[str]  # decoded replies without the stop token
    logits: list = field(default_factory=list)  # float32 arrays [len(prompt + reply), vocab]
    strings: list[str] = field(default_factory=list)  # for the token-id check
    dtype: str = "float32"  # of the reference model; bfloat16 when float32 did not fit
    string_ids: list[list[int]] = field(default_factory=list)
    max_new_tokens: int = 0  # the length bound of the replies

    def unchecked_stops(self) -> str | None:
        """A note when replies reached `max_new_tokens` without a stop token: their stops could not be checked."""
        cut = [i for i, r in enumerate(self.reply_ids) if len(r) >= self.max_new_tokens and not self.stopped[i]]
        if not cut:
            return None
        return (f"stopping not checked for prompt{'s' if len(cut) > 1 else ''} {', '.join(map(str, cut))}: the reply "
                f"reached {self.max_new_tokens} tokens without a stop token; raise `export.check_max_new_tokens`")


def available_ram() -> int:
    try:  # MemAvailable counts the page cache the kernel would give back; SC_AVPHYS_PAGES does not
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def load_reference_model(model_dir):
    """The merged model in float32 where it fits (GPU first), else bfloat16; an error when neither fits."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    on_disk = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    params = on_disk / (4 if "32" in str(config.get("dtype") or config.get("torch_dtype")) else 2)
    places = []
    if torch.cuda.is_available():
        places.append(({"": 0}, torch.cuda.mem_get_info()[0]))
    places.append(({"": "cpu"}, available_ram()))
    for device_map, free in places:
        for dtype, width in ((torch.float32, 4), (torch.bfloat16, 2)):
            if params * width * 1.15 < free:
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device_map)
                return model.eval()
    raise ExportError(
        f"checking the exported files needs the merged model in memory (about {params * 2 / 1e9:.1f} GB in bfloat16) "
        f"and no GPU or RAM here has that much free; run the export on a bigger machine, or pass verify=False "
        "(`--no-verify`) to write the files unchecked"
    )


def greedy(model, ids: list[int], stops: set[int], limit: int) -> list[int]:
    """Greedy continuation of `ids`, the full sequence through the model every step (no key/value cache:
    the reference llama.cpp is held to), up to `limit` tokens or a stop token (kept)."""
    import torch

    device = next(model.parameters()).device
    reply: list[int] = []
    with torch.no_grad():
        for _ in range(limit):
            logits = model(input_ids=torch.tensor([ids + reply], device=device)).logits[0, -1]
            reply.append(int(logits.argmax()))
            if reply[-1] in stops:
                break
    return reply


def hf_reference(model_or_dir, tokenizer, template, conversations=None, *, max_new_tokens: int = 48,
                 strings: list[str] | None = None, text_prefix: str = "") -> Reference:
    """Prompt ids, greedy replies and logits of the HF model (a folder or a loaded model) on `conversations`.

    `text_prefix` (BOS, when the model always sees one first) goes in front of every string of the
    token-id check: SentencePiece tokenizers treat text at the very start differently, and in use
    the text never comes first."""
    import torch

    from sftlib.data.encode import prompt_ids, render
    from sftlib.training.tokenizer import stop_token_ids

    model = load_reference_model(model_or_dir) if isinstance(model_or_dir, (str, Path)) else model_or_dir
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    conversations = [list(c) for c in (conversations or DEFAULT_CONVERSATIONS)]
    stops = set(stop_token_ids(tokenizer, template))
    device = next(model.parameters()).device
    ref = Reference(conversations=conversations, prompt_ids=[], reply_ids=[], stopped=[], reply_texts=[], dtype=dtype,
                    max_new_tokens=max_new_tokens)
    for messages in conversations:
        ids = prompt_ids(tokenizer, template, messages)
        reply = greedy(model, ids, stops, max_new_tokens)
        with torch.no_grad():
            full = model(input_ids=torch.tensor([ids + reply], device=device)).logits[0].float().cpu().numpy()
        ended = bool(reply) and reply[-1] in stops
        # a stop the model barely chose (an untrained model's, say) is no promise to check
        last = torch.tensor(full[len(ids) + len(reply) - 2], dtype=torch.float64) if ended else None
        stopped = ended and float(torch.softmax(last, -1)[reply[-1]]) >= STOP_CONFIDENCE
        ref.prompt_ids.append(ids)
        ref.reply_ids.append(reply)
        ref.stopped.append(stopped)
        ref.reply_texts.append(tokenizer.decode(reply[:-1] if ended else reply, skip_special_tokens=False))
        ref.logits.append(full)
    rendered = [render(template, tokenizer, m + [{"role": "assistant", "content": "Fine."}]) for m in conversations]
    texts = list(strings or TRICKY_STRINGS) + rendered + [t for t in ref.reply_texts if t]
    ref.strings = [t if not text_prefix or t.startswith(text_prefix) else text_prefix + t for t in texts]
    ref.string_ids = [list(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in ref.strings]
    return ref


def log_softmax(x):
    import numpy as np

    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def config_conversations(cfg, limit: int = 3) -> list[list[dict]] | None:
    """Prompts for the checks from the run's own data (held-out rows first): conversations the
    fine-tuned model answers, cut before their first assistant turn (preference pairs: their prompts). None
    when the data cannot be read."""
    pairs = getattr(cfg.train, "method", "sft") != "sft"
    try:
        from sftlib.data import load_dataset
        from sftlib.data.pairs import load_pairs

        train_ds, eval_ds = load_pairs(cfg.data) if pairs else load_dataset(cfg.data)
    except Exception as exc:  # noqa: BLE001 - e.g. a Hub dataset offline: fall back to generic prompts
        warnings.warn(f"export checks use generic prompts: the run's data could not be read ({exc})")
        return None
    out = []
    for ds in (eval_ds, train_ds):
        if pairs and ds is not None:
            out += ds.select(range(min(len(ds), limit - len(out))))["prompt"] if len(out) < limit else []
            continue
        if ds is None or "messages" not in ds.column_names:
            continue
        for messages in ds.select(range(min(len(ds), 50)))["messages"]:
            first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
            if first and len(out) < limit:
                out.append([{"role": m["role"], "content": m["content"]} for m in messages[:first]])
    return out or None
