"""Does a GGUF run like the model it came from? Token ids, prompt, logits, greedy tokens and stopping.

    from sftlib.exports.gguf.verify import check_gguf
    from sftlib.exports.reference import hf_reference
    ref = hf_reference("model/merged_16bit", tokenizer, template, conversations)   # once per export
    check = check_gguf("model/gguf/m.Q4_K_M.gguf", ref, tokenizer, template, settings, qtype="q4_k_m")
    check.ok, check.problems, check.max_abs_dlogit, check.top1_agreement, check.mean_kl

The reference (sftlib.exports.reference) is the HF model's greedy replies and logits, in float32
where it fits (bfloat16 otherwise, with a wider tie tolerance).

Checks on every file (a failure makes `ok` false):
- token ids: llama.cpp's tokenizer gives the HF tokenizer's ids for tricky strings (spaces, tabs,
  digits, emoji, accents) and for each rendered conversation, special tokens included;
- prompt: the ids llama-cpp-python's chat completion feeds the model (the GGUF's own chat template,
  its BOS rule) equal the ids training used (`sftlib.data.encode.prompt_ids`): one BOS, not zero or two;
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

from sftlib.exports.reference import Reference, hf_reference, log_softmax


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


def check_gguf(path, ref: Reference, tokenizer, template, settings, *, qtype: str, threads: int | None = None,
               tie_margin: float = 0.05) -> GGUFCheck:
    """Run the GGUF at `path` in llama.cpp and compare it with `ref`; see the module docstring for the checks."""
    from llama_cpp import Llama

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
        _check_metadata(llm, settings, check)
        _check_tokens(llm, ref, tokenizer, check)
        _check_prompts(llm, ref, tokenizer, check)
        _check_logits(llm, ref, check, qtype=qtype, tie_margin=tie_margin)
        _check_stops(llm, ref, check)
    finally:
        llm.close() if hasattr(llm, "close") else None
    check.ok = not check.problems
    check.seconds = time.time() - start
    return check


def _check_metadata(llm, settings, check: GGUFCheck) -> None:
    """What export_gguf asked the converter to write."""
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


def _check_tokens(llm, ref: Reference, tokenizer, check: GGUFCheck) -> None:
    """The reference strings' token ids, llama.cpp's against the HF tokenizer's."""
    meta = llm.metadata
    check.token_strings = len(ref.strings)
    for text, ids in zip(ref.strings, ref.string_ids):
        got = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
        if got != ids:
            check.token_mismatches.append(describe_mismatch(text, ids, got, tokenizer))
    if check.token_mismatches:
        kind = meta.get("tokenizer.ggml.model")
        why = ("SentencePiece pieces merged in another order: the GGUF's piece scores are not the tokenizer's"
               if kind == "llama" else f"the GGUF's pre-tokenizer is {meta.get('tokenizer.ggml.pre')!r}: "
               "pass the `pre_tokenizer` whose split rule is the tokenizer's" if kind == "gpt2" else
               f"tokenizer model {kind!r}")
        check.problems.append(f"llama.cpp tokenizes {len(check.token_mismatches)}/{check.token_strings} strings "
                              f"differently from the HF tokenizer ({why}); first: {check.token_mismatches[0]}")


def _check_prompts(llm, ref: Reference, tokenizer, check: GGUFCheck) -> None:
    """The chat prompt that llama-cpp-python's chat completion builds, against the ids training used."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    meta = llm.metadata
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
            check.problems.append("chat prompt ids differ from training: "
                                  + describe_mismatch(out.prompt, ids, got, tokenizer))
            break


def _check_logits(llm, ref: Reference, check: GGUFCheck, *, qtype: str, tie_margin: float) -> None:
    """Logits over prompt + reference reply, and where llama.cpp's greedy path leaves the reference."""
    import numpy as np

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
        lp, lq = log_softmax(hf), log_softmax(gg)
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


def _check_stops(llm, ref: Reference, check: GGUFCheck) -> None:
    """Stopping, through the chat-completion path a user takes."""
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
    if ref.unchecked_stops():
        check.notes.append(ref.unchecked_stops())
    if not check.stop_expected:
        msg = "the HF model ended no reply with a confident stop token, so stopping could not be checked; " \
              "pass `conversations` the fine-tuned model answers"
        check.notes.append(msg)
        warnings.warn(msg)


def describe_mismatch(text: str, hf_ids: list[int], gguf_ids: list[int], tokenizer, context: int = 3) -> str:
    """Where two tokenizations of `text` part: the first differing position and a few ids (with their
    pieces, named by the HF vocabulary both sides share) around it from each side."""
    at = next((i for i, (a, b) in enumerate(zip(hf_ids, gguf_ids)) if a != b), min(len(hf_ids), len(gguf_ids)))
    lo = max(0, at - context)

    def window(ids: list[int]) -> str:
        part = ids[lo: at + context + 1]
        pieces = tokenizer.convert_ids_to_tokens([i for i in part if 0 <= i < len(tokenizer)])
        named = iter(pieces)
        shown = ", ".join(f"{i} {next(named)!r}" if 0 <= i < len(tokenizer) else str(i) for i in part)
        return ("... " if lo else "") + f"[{shown}]" + (" ..." if at + context + 1 < len(ids) else "")

    shown_text = text if len(text) <= 80 else text[:77] + "..."
    return (f"{shown_text!r}: ids differ from position {at} (HF {len(hf_ids)} ids, llama.cpp {len(gguf_ids)}): "
            f"HF {window(hf_ids)}, llama.cpp {window(gguf_ids)}")


def verify_gguf(gguf_path, model_dir, template, *, tokenizer=None, conversations=None, qtype: str | None = None,
                add_bos: bool | None = None, max_new_tokens: int = 48, threads: int | None = None) -> GGUFCheck:
    """Check one GGUF against the HF model in `model_dir` (the merged folder it was converted from)."""
    from sftlib.exports.gguf.convert import gguf_settings
    from sftlib.data.templates import get_template

    template = get_template(template)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings = gguf_settings(tokenizer, template, add_bos)
    ref = hf_reference(model_dir, tokenizer, template, conversations, max_new_tokens=max_new_tokens,
                       text_prefix=settings.bos_token if settings.add_bos else "")
    qtype = qtype or Path(gguf_path).name.rsplit(".gguf", 1)[0].rsplit(".", 1)[-1].lower()
    return check_gguf(gguf_path, ref, tokenizer, template, settings, qtype=qtype, threads=threads)
