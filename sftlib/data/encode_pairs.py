"""Preference pairs to token ids, rendered and masked by the same code as SFT conversations.

    from sftlib.data.encode_pairs import encode_pair, encode_pairs
    row = encode_pair(tokenizer, template, pair, max_length=2048)
    row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]    # what TRL's DPO collator concatenates
    rows, dropped = encode_pairs(pairs, tokenizer, template, max_length=2048)   # a Dataset of such rows

Each side is the conversation prompt + reply encoded by sftlib.data.encode.encode_conversation: the reply's
trained span (its words and the end-of-turn token, as SFT trains them) becomes `chosen_ids`/`rejected_ids`,
everything before it `prompt_ids`. TRL computes the preference loss on exactly these completion tokens, as it
does for the prompt/completion split of its own tokenization; what the template writes after the end-of-turn
token (ChatML's newline) is dropped, as nothing is predicted from it. Both sides must give the same prompt ids
(sftlib.data.boundary cuts tokens at an answer's start, so they do).

Truncation keeps the start, like TRL's `truncation_mode="keep_start"`: when the prompt and the longer reply
pass `max_length`, the replies are cut to fit (`chosen_cut`/`rejected_cut` count the tokens lost). A pair whose
prompt alone fills `max_length` has nothing left to compare: `encode_pair` raises PromptTooLong, and
`encode_pairs` drops the pair and returns its row number (TRL drops such pairs too; pre-flight reports them).
"""

from __future__ import annotations

import datasets

from sftlib.data.encode import IGNORE, EncodeError, encode_conversation

PAIR_ROW_FEATURES = datasets.Features({
    "prompt_ids": datasets.List(datasets.Value("int32")), "chosen_ids": datasets.List(datasets.Value("int32")),
    "rejected_ids": datasets.List(datasets.Value("int32")), "chosen_cut": datasets.Value("int32"),
    "rejected_cut": datasets.Value("int32"),
})


class PromptTooLong(EncodeError):
    """A prompt that leaves no room for a reply within `max_length`."""


def split_reply(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids): the reply is the last run of trained tokens (earlier assistant turns of a
    multi-turn prompt are trained in SFT, but here they are prompt)."""
    end = max((k for k, lab in enumerate(labels) if lab != IGNORE), default=-1)
    if end < 0:
        raise EncodeError("the reply has no trained token")
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return ids[:start], ids[start:end + 1]


def encode_pair(tokenizer, template, pair: dict, *, max_length: int | None = None) -> dict:
    """`pair` ({"prompt": turns, "chosen": [turn], "rejected": [turn]}) as prompt, chosen and rejected ids."""
    out, prompt = {}, None
    for side in ("chosen", "rejected"):
        row = encode_conversation(tokenizer, template, list(pair["prompt"]) + list(pair[side]), train_on="assistant")
        ids, reply = split_reply(row["input_ids"], row["labels"])
        if prompt is not None and ids != prompt:
            raise EncodeError("the chosen and rejected conversations tokenize their prompt differently")
        prompt, out[f"{side}_ids"] = ids, reply
    out["prompt_ids"] = prompt
    for side in ("chosen", "rejected"):
        room = len(out[f"{side}_ids"]) if max_length is None else max_length - len(prompt)
        if room <= 0:
            raise PromptTooLong(f"the prompt alone is {len(prompt)} tokens, `model.max_seq_length` is {max_length}: "
                              "no reply token would be trained; raise `model.max_seq_length` or drop the row")
        out[f"{side}_cut"] = max(0, len(out[f"{side}_ids"]) - room)
        out[f"{side}_ids"] = out[f"{side}_ids"][:room]
    return out


def encode_pairs(pairs: datasets.Dataset, tokenizer, template, *,
                 max_length: int | None = None) -> tuple[datasets.Dataset, list[int]]:
    """(every pair encoded, columns as PAIR_ROW_FEATURES; the row numbers of the pairs dropped because their
    prompt fills `max_length`). An EncodeError names the first rows that cannot be encoded at all, or says that
    every pair was dropped."""
    rows, problems, dropped = {key: [] for key in PAIR_ROW_FEATURES}, [], []
    for i, pair in enumerate(pairs):
        try:
            row = encode_pair(tokenizer, template, pair, max_length=max_length)
        except PromptTooLong:
            dropped.append(i)
            continue
        except EncodeError as e:
            problems.append(f"row {i}: {e}")
            continue
        for key in rows:
            rows[key].append(row[key])
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise EncodeError(f"{len(problems)} of {len(pairs)} preference pairs cannot be encoded with template "
                          f"`{template.name}`:\n  " + "\n  ".join(problems[:10]) + more)
    if pairs and len(dropped) == len(pairs):
        raise EncodeError(f"every one of the {len(pairs)} pairs has a prompt of {max_length} tokens or more, leaving "
                          "no room for a reply within `model.max_seq_length`; raise it")
    return datasets.Dataset.from_dict(rows, features=PAIR_ROW_FEATURES), dropped
