"""Conversations to token ids and labels: the loss mask, derived from the chat template itself.

    from sftlib.data.encode import encode_conversation
    row = encode_conversation(tokenizer, template, messages, train_on="assistant", max_length=2048)
    row["input_ids"], row["labels"]    # labels are -100 where no loss is taken

How the mask is found: the template renders the conversation once. For each assistant turn i, the
text rendered for `messages[:i]` with the generation prompt (`ChatTemplate.turn_prompt`) must be a prefix of it; the trained span
starts right after that prefix and ends after the first end-of-turn token that follows. The text is
tokenized once, with character offsets (cut apart at an answer's start where a token would cross it,
see sftlib.data.boundary; with `train_on="all"` too, so that each prompt's ids start the training ids
there as well), and a token is trained when it overlaps a trained span. So
the assistant's words *and* its end-of-turn token are trained (the model learns to stop), and
nothing depends on guessing marker strings or token ids.

`encode_conversation` is the definition, one row at a time; sftlib.data.encode_batch.encode_dataset
gives the same rows for a whole dataset, fast, and is held to this one by the tests.
"""

from __future__ import annotations

from typing import Any

from sftlib.data.boundary import tokenize_cut
from sftlib.errors import SftlibError

IGNORE = -100


class EncodeError(SftlibError):
    """A conversation that cannot be encoded with the chosen template and tokenizer."""


def adds_bos(tokenizer) -> bool:
    """Does `tokenizer(text)` put BOS in front by itself (as Llama tokenizers do)?"""
    cached = getattr(tokenizer, "_sftlib_adds_bos", None)
    if cached is None:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
        cached = tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id
        try:
            tokenizer._sftlib_adds_bos = cached
        except AttributeError:  # pragma: no cover - exotic tokenizer classes
            pass
    return cached


def bos_prefix(tokenizer, template) -> list[int]:
    """The BOS id to put in front of a rendered text: only when the template does not write one itself
    and the model's own tokenizer would (so the model sees BOS as in pre-training, and never twice)."""
    if template.uses_bos or not adds_bos(tokenizer):
        return []
    return [tokenizer.bos_token_id]


def render(template, tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return template.render(
        messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token or "",
    )


def trained_spans(template, tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of every assistant turn, end-of-turn token included."""
    text = render(template, tokenizer, messages)
    eot = require_eot(template, template.end_of_turn_text(tokenizer.eos_token))
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = template.turn_prompt(messages, i, bos_token=tokenizer.bos_token or "",
                                      eos_token=tokenizer.eos_token or "")
        if not text.startswith(prefix):
            raise EncodeError(
                f"template `{template.name}` renders turn {i} differently once later turns follow, "
                "so the assistant span cannot be located; use `data.train_on: all` or another template"
            )
        start = len(prefix)
        end = text.find(eot, start)
        if end < 0:
            raise EncodeError(f"turn {i}: the end-of-turn token {eot!r} of template `{template.name}` was not rendered")
        check_content(i, message, eot)
        spans.append((start, end + len(eot)))
    return text, spans


def require_eot(template, eot: str) -> str:
    if not eot:
        raise EncodeError(f"template `{template.name}` ends turns with EOS, but the tokenizer has no `eos_token`")
    return eot


def check_content(i: int, message: dict, eot: str) -> None:
    if eot in message["content"]:
        raise EncodeError(
            f"turn {i}: the assistant text contains the end-of-turn token {eot!r}; remove it from the data"
        )


def render_whole(template, messages: list[dict], bos: str, eos: str, eot: str) -> str:
    """`trained_spans(...)[0]` for a built-in template, with the same errors, rendering once
    (`bos`, `eos`: the tokenizer's texts or ""; `eot`: the template's end-of-turn text).

    Why the prefix renders can be skipped: for every conversation `check()` accepts (the full render
    runs it first), a built-in template renders each prompt `messages[:i]` as a prefix of the whole
    text (tests/test_templates.py holds them to it) and writes the end-of-turn text right after each
    assistant message. So of trained_spans' checks only the ones below can fail, in this order."""
    text = template.render(messages, bos_token=bos, eos_token=eos)  # = render(template, tokenizer, messages)
    require_eot(template, eot)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            check_content(i, message, eot)
    return text


def encode_conversation(
    tokenizer,
    template,
    messages: list[dict] | None = None,
    *,
    text: str | None = None,
    train_on: str = "assistant",
    max_length: int | None = None,
) -> dict[str, Any]:
    """Token ids and labels for one conversation (`messages`) or one raw text (`text`).

    `train_on="assistant"` trains the assistant turns and their end-of-turn tokens only;
    `"all"` trains every token (the article's setting). Raw text is always trained whole and ends with EOS.
    Over-long rows are cut to `max_length` (keeping the start); `truncated` says so.
    """
    if text is not None:
        enc = tokenizer(text, add_special_tokens=False)
        ids = bos_prefix(tokenizer, NoTemplate) + list(enc["input_ids"]) + [tokenizer.eos_token_id]
        labels = list(ids)
    else:
        rendered, spans = trained_spans(template, tokenizer, messages)
        # no token across an answer's start: training ids start with each prompt's ids (boundary.py), with
        # either setting; `all` trains every token (the article's setting)
        ids, offsets = tokenize_cut(tokenizer, rendered, [s for s, _ in spans])
        labels = list(ids) if train_on == "all" else mask_labels(ids, offsets, spans)
        prefix = bos_prefix(tokenizer, template)
        ids = prefix + ids
        labels = [IGNORE] * len(prefix) + labels if train_on != "all" else prefix + labels
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


def mask_labels(ids: list[int], offsets, spans: list[tuple[int, int]]) -> list[int]:
    """Labels: a token is trained when its characters overlap a span. Offsets and spans both run left
    to right, so one pass with a pointer into the spans does it. The definition: `_mask_batch` gives
    the same labels for a whole batch at once."""
    labels = [IGNORE] * len(ids)
    k, n = 0, len(spans)
    for i, (s, e) in enumerate(offsets):
        while k < n and spans[k][1] <= s:
            k += 1
        if k == n:
            break
        if e > spans[k][0] and s < spans[k][1]:
            labels[i] = ids[i]
    return labels


class NoTemplate:
    uses_bos = False


def prompt_ids(tokenizer, template, messages: list[dict]) -> list[int]:
    """Token ids of a conversation followed by the assistant prefix: what generation starts from.

    Tokenized as training tokenizes it (either `train_on`): no token across the start of an earlier
    answer, so these ids are a prefix of the training ids of `messages` plus the answer."""
    text = render(template, tokenizer, messages, add_generation_prompt=True)
    kw = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    cuts = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prefix = template.turn_prompt(messages, i, **kw)
            if text.startswith(prefix):
                cuts.append(len(prefix))
    return bos_prefix(tokenizer, template) + tokenize_cut(tokenizer, text, cuts)[0]
