"""Does a GGUF run like the model it came from? Token ids, prompt, logits, greedy tokens and stopping.

    from sftlib.gguf_verify import hf_reference, check_gguf
    ref = hf_reference("model/merged_16bit", tokenizer, template, conversations)   # once per export
    check = check_gguf("model/gguf/m.Q4_K_M.gguf", ref, tokenizer, template, settings, qtype="q4_k_m")
    check.ok, check.problems, check.max_abs_dlogit, check.top1_agreement, check.mean_kl

The reference is the HF model in float32 where it fits (a GPU first, else RAM; bfloat16 when only
that fits, with a wider tie tolerance), driven by a full-forward greedy loop: `generate()` with its
key/value cache was seen to pick a different token than the full forward on a bfloat16 model, and
the GGUF agreed with the full forward. Each reply runs until one of the template's stop tokens or
`max_new_tokens`.

Checks on every file (a failure makes `ok` false):
- token ids: llama.cpp's tokenizer gives the HF tokenizer's ids for tricky strings (spaces, tabs,
  digits, emoji, accents) and for each rendered conversation, special tokens included;
- prompt: the ids llama-cpp-python's chat completion feeds the model (the GGUF's own chat template,
  its BOS rule) equal the ids training used (`sftlib.encode.prompt_ids`): one BOS, not zero or two;
- metadata: chat template, add_bos_token and end-of-turn id are the ones asked for;
- stopping: where the HF model ends its reply with a stop token it chose with probability >= 0.5,
  chat completion through llama.cpp finishes with `finish_reason == "stop"` (so the GGUF does not
  talk on forever).
Float files (f32, f16, bf16) must also reproduce the HF greedy tokens exactly (a divergence where the
HF model's top two logits are within `tie_margin` is reported as a tie, not a failure). Quantized
files report max |Δlogit|, top-1 agreement and mean KL(HF || GGUF) over all positions of prompt and
reply, and where their greedy path leaves the reference.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass
class GGUFCheck:
    file: str
    qtype: str
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    token_strings: int = 0
    token_mismatches: list[str] = field(default_factory=list)
    prompt_parity: bool | None = None
    positions: int = 0
    max_abs_dlogit: float = 0.0
    top1_agreement: float = 0.0
    mean_kl: float = 0.0
    greedy: list[dict] = field(default_factory=list)  # per prompt: length, first_divergence, hf/gguf token, margin
    greedy_identical: int = 0
    stop_expected: int = 0  # prompts where the HF model stopped
    stopped: int = 0  # ... and llama.cpp's chat completion stopped too
    replies: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _available_ram() -> int:
    try:  # MemAvailable counts the page cache the kernel would give back; SC_AVPHYS_PAGES does not
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _load_reference_model(model_dir):
    """The merged model in float32 where it fits (GPU first), else bfloat16; an error when neither fits."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from sftlib.gguf_convert import GGUFExportError

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    on_disk = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    params = on_disk / (4 if "32" in str(config.get("dtype") or config.get("torch_dtype")) else 2)
    places = []
    if torch.cuda.is_available():
        places.append(({"": 0}, torch.cuda.mem_get_info()[0]))
    places.append(({"": "cpu"}, _available_ram()))
    for device_map, free in places:
        for dtype, width in ((torch.float32, 4), (torch.bfloat16, 2)):
            if params * width * 1.15 < free:
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device_map)
                return model.eval()
    raise GGUFExportError(
        f"checking the GGUF files needs the merged model in memory (about {params * 2 / 1e9:.1f} GB in bfloat16) "
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

    from sftlib.encode import prompt_ids, render
    from sftlib.model import stop_token_ids

    model = _load_reference_model(model_or_dir) if isinstance(model_or_dir, (str, Path)) else model_or_dir
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    conversations = [list(c) for c in (conversations or DEFAULT_CONVERSATIONS)]
    stops = set(stop_token_ids(tokenizer, template))
    device = next(model.parameters()).device
    ref = Reference(conversations=conversations, prompt_ids=[], reply_ids=[], stopped=[], reply_texts=[], dtype=dtype)
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


def _log_softmax(x):
    import numpy as np

    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def check_gguf(path, ref: Reference, tokenizer, template, settings, *, qtype: str, threads: int | None = None,
               tie_margin: float = 0.05) -> GGUFCheck:
    """Run the GGUF at `path` in llama.cpp and compare it with `ref`; see the module docstring for the checks."""
    import numpy as np
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    start = time.time()
    check = GGUFCheck(file=str(path), qtype=qtype)
    longest = max(len(p) + len(r) for p, r in zip(ref.prompt_ids, ref.reply_ids))
    n_ctx = max(512, longest + max(len(r) for r in ref.reply_ids) + 64)
    if threads is None:  # llama.cpp's worker threads spin while they wait: on a tiny model (or a busy
        # machine) several threads are far slower than one; real models need them all
        threads = 1 if Path(path).stat().st_size < 200e6 else os.cpu_count() or 1
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 2048), n_threads=threads, n_threads_batch=threads,
                logits_all=True, verbose=False, seed=0)
    try:
        # metadata: what export_gguf asked the converter to write
        meta = llm.metadata
        if meta.get("tokenizer.chat_template") != settings.chat_template:
            check.problems.append("tokenizer.chat_template is not the training template")
        if meta.get("tokenizer.ggml.add_bos_token", "").lower() != str(settings.add_bos).lower():
            check.problems.append(f"tokenizer.ggml.add_bos_token is {meta.get('tokenizer.ggml.add_bos_token')!r}, "
                                  f"training {'added' if settings.add_bos else 'did not add'} BOS")
        if settings.eot_token_id is not None and meta.get("tokenizer.ggml.eot_token_id") != str(settings.eot_token_id):
            check.problems.append(f"tokenizer.ggml.eot_token_id is {meta.get('tokenizer.ggml.eot_token_id')!r}, "
                                  f"expected {settings.eot_token_id}")
        prefix = meta.get("tokenizer.ggml.add_space_prefix")
        if settings.add_space_prefix is not None and prefix != str(settings.add_space_prefix).lower():
            check.problems.append(f"tokenizer.ggml.add_space_prefix is {prefix!r}, the HF tokenizer "
                                  f"{'adds' if settings.add_space_prefix else 'does not add'} one")

        # token ids
        check.token_strings = len(ref.strings)
        for text, ids in zip(ref.strings, ref.string_ids):
            got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if list(got) != ids:
                check.token_mismatches.append(f"{text[:60]!r}: HF {ids[:12]}... llama.cpp {list(got)[:12]}...")
        if check.token_mismatches:
            check.problems.append(f"llama.cpp tokenizes {len(check.token_mismatches)}/{check.token_strings} strings "
                                  "differently from the HF tokenizer (wrong pre_tokenizer?)")

        # the prompt chat completion builds, as llama-cpp-python builds it
        if llm.chat_format != "chat_template.default":
            check.notes.append(f"llama-cpp-python uses its built-in chat format {llm.chat_format!r}")
        eos_text = llm._model.token_get_text(llm.token_eos()) if llm.token_eos() != -1 else ""
        bos_text = llm._model.token_get_text(llm.token_bos()) if llm.token_bos() != -1 else ""
        formatter = Jinja2ChatFormatter(template=meta.get("tokenizer.chat_template", ""), eos_token=eos_text,
                                        bos_token=bos_text)
        check.prompt_parity = True
        for messages, ids in zip(ref.conversations, ref.prompt_ids):
            out = formatter(messages=messages)
            got = list(llm.tokenize(out.prompt.encode("utf-8"), add_bos=not out.added_special, special=True))
            if got != ids:
                check.prompt_parity = False
                check.problems.append(f"chat prompt ids differ from training: HF {ids[:8]}... llama.cpp {got[:8]}...")
                break

        # logits over prompt + reference reply, and where the greedy path leaves the reference
        dmax, agree, kl, positions = 0.0, 0, 0.0, 0
        for ids, reply, hf in zip(ref.prompt_ids, ref.reply_ids, ref.logits):
            seq = ids + reply
            llm.reset()
            llm.eval(seq)
            gg = np.array(llm.scores[: len(seq)], dtype=np.float32)
            vocab = min(gg.shape[1], hf.shape[1])
            gg, hf = gg[:, :vocab], hf[:, :vocab]
            dmax = max(dmax, float(np.abs(gg - hf).max()))
            agree += int((gg.argmax(-1) == hf.argmax(-1)).sum())
            lp, lq = _log_softmax(hf), _log_softmax(gg)
            kl += float((np.exp(lp) * (lp - lq)).sum())
            positions += len(seq)
            entry = {"reply_tokens": len(reply), "first_divergence": None}
            for k, tok in enumerate(reply):
                pos = len(ids) + k - 1
                mine = int(gg[pos].argmax())
                if mine != tok:
                    margin = float(hf[pos, tok] - hf[pos, mine])
                    entry.update(first_divergence=k, hf_token=tok, gguf_token=mine, hf_margin=margin)
                    break
            check.greedy.append(entry)
        check.positions, check.max_abs_dlogit = positions, dmax
        check.top1_agreement, check.mean_kl = agree / positions, kl / positions
        check.greedy_identical = sum(g["first_divergence"] is None for g in check.greedy)
        if qtype in ("f32", "f16", "bf16"):
            if ref.dtype != "float32":  # a bfloat16 reference is itself off by more than f16 rounding
                tie_margin = max(tie_margin, 0.5)
                check.notes.append(f"reference model in {ref.dtype}: near-ties up to {tie_margin} logits tolerated")
            for i, g in enumerate(check.greedy):
                if g["first_divergence"] is None:
                    continue
                if g["hf_margin"] < tie_margin:
                    check.notes.append(f"prompt {i}: greedy path left the reference at a near-tie "
                                       f"(HF margin {g['hf_margin']:.3f}) after {g['first_divergence']} tokens")
                else:
                    check.problems.append(f"prompt {i}: greedy tokens differ from the HF model after "
                                          f"{g['first_divergence']} tokens (HF margin {g['hf_margin']:.3f})")

        # stopping, through the chat-completion path a user takes
        for i, (messages, reply, stopped, text) in enumerate(
                zip(ref.conversations, ref.reply_ids, ref.stopped, ref.reply_texts)):
            llm.reset()
            out = llm.create_chat_completion(messages=messages, max_tokens=2 * len(reply) + 16, temperature=0.0,
                                             top_k=1, repeat_penalty=1.0, seed=0)
            choice = out["choices"][0]
            content = choice["message"]["content"] or ""
            check.replies.append({"finish_reason": choice["finish_reason"], "text": content, "hf_text": text,
                                  "hf_stopped": stopped})
            if stopped:
                check.stop_expected += 1
                if choice["finish_reason"] == "stop":
                    check.stopped += 1
                else:
                    check.problems.append(f"prompt {i}: the HF model ends its turn after {len(reply)} tokens, "
                                          f"llama.cpp did not stop within {2 * len(reply) + 16}")
        if not check.stop_expected:
            msg = "the HF model ended no reply with a confident stop token, so stopping could not be checked; " \
                  "pass `conversations` the fine-tuned model answers"
            check.notes.append(msg)
            warnings.warn(msg)
    finally:
        llm.close() if hasattr(llm, "close") else None
    check.ok = not check.problems
    check.seconds = time.time() - start
    return check


def config_conversations(cfg, limit: int = 3) -> list[list[dict]] | None:
    """Prompts for the checks from the run's own data (held-out rows first): conversations the
    fine-tuned model answers, cut before their first assistant turn. None when the data cannot be read."""
    try:
        from sftlib.data import load_dataset

        train_ds, eval_ds = load_dataset(cfg.data)
    except Exception as exc:  # noqa: BLE001 - e.g. a Hub dataset offline: fall back to generic prompts
        warnings.warn(f"GGUF checks use generic prompts: the run's data could not be read ({exc})")
        return None
    out = []
    for ds in (eval_ds, train_ds):
        if ds is None or "messages" not in ds.column_names:
            continue
        for messages in ds.select(range(min(len(ds), 50)))["messages"]:
            first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
            if first and len(out) < limit:
                out.append([{"role": m["role"], "content": m["content"]} for m in messages[:first]])
    return out or None


def verify_gguf(gguf_path, model_dir, template, *, tokenizer=None, conversations=None, qtype: str | None = None,
                add_bos: bool | None = None, max_new_tokens: int = 48, threads: int | None = None) -> GGUFCheck:
    """Check one GGUF against the HF model in `model_dir` (the merged folder it was converted from)."""
    from sftlib.gguf_convert import gguf_settings
    from sftlib.templates import get_template

    template = get_template(template)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings = gguf_settings(tokenizer, template, add_bos)
    ref = hf_reference(model_dir, tokenizer, template, conversations, max_new_tokens=max_new_tokens,
                       text_prefix=settings.bos_token if settings.add_bos else "")
    qtype = qtype or Path(gguf_path).name.rsplit(".gguf", 1)[0].rsplit(".", 1)[-1].lower()
    return check_gguf(gguf_path, ref, tokenizer, template, settings, qtype=qtype, threads=threads)
