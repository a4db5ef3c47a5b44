"""Conversations to token ids and labels: the loss mask, derived from the chat template itself.

    from sftlib.encode import encode_conversation, encode_dataset
    row = encode_conversation(tokenizer, template, messages, train_on="assistant", max_length=2048)
    row["input_ids"], row["labels"]    # labels are -100 where no loss is taken

How the mask is found: the template renders the conversation once. For each assistant turn i, the
text rendered for `messages[:i]` with the generation prompt must be a prefix of it; the trained span
starts right after that prefix and ends after the first end-of-turn token that follows. The text is
tokenized once, with character offsets, and a token is trained when it overlaps a trained span. So
the assistant's words *and* its end-of-turn token are trained (the model learns to stop), and
nothing depends on guessing marker strings or token ids.
"""

from __future__ import annotations

from typing import Any

IGNORE = -100


class EncodeError(ValueError):
    """A conversation that cannot be encoded with the chosen template and tokenizer."""


def _adds_bos(tokenizer) -> bool:
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
    if template.uses_bos or not _adds_bos(tokenizer):
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
    eot = template.end_of_turn_text(tokenizer.eos_token)
    if not eot:
        raise EncodeError(f"template `{template.name}` ends turns with EOS, but the tokenizer has no `eos_token`")
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(template, tokenizer, messages[:i], add_generation_prompt=True)
        if not text.startswith(prefix):
            raise EncodeError(
                f"template `{template.name}` renders turn {i} differently once later turns follow, "
                "so the assistant span cannot be located; use `data.train_on: all` or another template"
            )
        start = len(prefix)
        end = text.find(eot, start)
        if end < 0:
            raise EncodeError(f"turn {i}: the end-of-turn token {eot!r} of template `{template.name}` was not rendered")
        if eot in message["content"]:
            raise EncodeError(
                f"turn {i}: the assistant text contains the end-of-turn token {eot!r}; remove it from the data"
            )
        spans.append((start, end + len(eot)))
    return text, spans


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
        ids = bos_prefix(tokenizer, _NoTemplate) + list(enc["input_ids"]) + [tokenizer.eos_token_id]
        labels = list(ids)
    else:
        rendered, spans = trained_spans(template, tokenizer, messages)
        enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        if train_on == "all":
            labels = list(ids)
        else:
            labels = _mask(ids, enc["offset_mapping"], spans)
        prefix = bos_prefix(tokenizer, template)
        ids = prefix + ids
        labels = [IGNORE] * len(prefix) + labels if train_on != "all" else prefix + labels
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


def _mask(ids: list[int], offsets, spans: list[tuple[int, int]]) -> list[int]:
    """Labels: a token is trained when its characters overlap a span. Offsets and spans both run left
    to right, so one pass with a pointer into the spans does it (this loop is the hot path of encoding)."""
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


class _NoTemplate:
    uses_bos = False


def encode_dataset(dataset, tokenizer, template, *, train_on: str = "assistant", max_length: int | None = None,
                   num_proc: int | None = None):
    """Map a `messages` (or `text`) dataset to `input_ids`, `labels`, `truncated` columns."""
    column = "messages" if "messages" in dataset.column_names else "text"

    def fn(row, index):
        try:
            if column == "messages":
                return encode_conversation(tokenizer, template, row["messages"], train_on=train_on,
                                           max_length=max_length)
            return encode_conversation(tokenizer, template, text=row["text"], max_length=max_length)
        except ValueError as exc:  # the template's or ours: say which row, keep the reason
            raise EncodeError(f"row {index}: {exc}") from exc

    return dataset.map(fn, with_indices=True, remove_columns=dataset.column_names, num_proc=num_proc,
                       desc="Tokenizing")


def prompt_ids(tokenizer, template, messages: list[dict]) -> list[int]:
    """Token ids of a conversation followed by the assistant prefix: what generation starts from."""
    text = render(template, tokenizer, messages, add_generation_prompt=True)
    return bos_prefix(tokenizer, template) + list(tokenizer(text, add_special_tokens=False)["input_ids"])
