"""No token across the prompt/answer boundary: tokenize so that inference's prompt is a prefix of training's ids.

    from sftlib.data.boundary import tokenize_cut
    ids, offsets = tokenize_cut(tokenizer, text, cuts=[start of each assistant turn])

Both `train_on` settings go through it (`assistant` and `all` give the same ids; only the labels differ).

Why: byte-level BPE (Llama 3, Qwen, GPT-2 style) merges runs of newlines and some punctuation with a
newline into one token. A reply that starts with "\\n" after a prompt that ends with "\\n" (ChatML's
"<|im_start|>assistant\\n", Alpaca's "### Response:\\n") then tokenizes as one "\\n\\n" token that holds
the prompt's last character and the answer's first: it is trained (so the model is taught to write part
of its own prompt), and the prompt inference builds ("...assistant\\n", ending in a lone "\\n" token) is
no longer a prefix of the training ids, so the model never saw at training the position it starts from.

What is done: where a token of the whole text straddles a cut, the text is cut there and each part is
tokenized alone, the first exactly as inference tokenizes its prompt, so the training ids start with the
prompt's ids and the reply's leading "\\n" is a token of its own, trained as part of the reply. Rows
without such a token keep the ids of the whole text. Tokenizers that add a space in front of every text
(SentencePiece's "▁" prefix) are left as they are: a part tokenized alone would gain a space, and they
keep whitespace out of their merges across a marker anyway.

The batch encoder (sftlib.data.encode_batch) finds the few rows to cut without asking for every token's
offsets: `crosses` asks the tokenizer's encoding only about the token at each cut, and with a built-in
template the candidate cuts are the ends of its `assistant_prefix` in the text (`marker_ends`), a superset
of the answers' starts that needs no prompt render.
"""

from __future__ import annotations

import bisect
import json


def straddled(offsets, cuts) -> list[int]:
    """The cuts that some token crosses: it starts before the cut and ends after it. Token starts run
    left to right, so a cut is crossed when the furthest end of the tokens starting before it lies past it."""
    starts = [s for s, _ in offsets]
    reach, furthest = [], 0
    for _, e in offsets:
        furthest = max(furthest, e)
        reach.append(furthest)
    out = []
    for c in cuts:
        k = bisect.bisect_left(starts, c) - 1  # the last token starting before the cut
        if k >= 0 and reach[k] > c:
            out.append(c)
    return out


def crosses(encoding, text: str, cuts) -> bool:
    """`bool(straddled(encoding.offsets, cuts))` for a `tokenizers.Encoding` of `text`, asking only about the
    token holding the character before each cut. A character below U+0080 is one byte, so exactly one token
    holds it, and a token crosses the cut exactly when that one ends past it; for any other character (or
    one no token holds, where offsets are trimmed) every offset is read as `straddled` reads them."""
    cuts = [c for c in cuts if 0 < c < len(text)]
    for c in cuts:
        t = encoding.char_to_token(c - 1) if ord(text[c - 1]) < 0x80 else None
        if t is None:
            return bool(straddled(encoding.offsets, cuts))
        if encoding.token_to_chars(t)[1] > c:
            return True
    return False


def marker_ends(text: str, marker: str) -> list[int]:
    """Where each occurrence of `marker` in `text` ends, left to right (overlapping ones too)."""
    out, i = [], text.find(marker) if marker else -1
    while i >= 0:
        out.append(i + len(marker))
        i = text.find(marker, i + 1)
    return out


def prepends_space(tokenizer) -> bool:
    """Does the tokenizer put a space ("▁" or "Ġ") in front of every text it is given? Then a text cut
    in two does not tokenize as its parts do, and `tokenize_cut` leaves such tokenizers alone."""
    cached = getattr(tokenizer, "_sftlib_prepends_space", None)
    if cached is not None:
        return cached
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:  # a slow tokenizer: no offsets to find straddling tokens with either
        cached = True
    else:
        spec = json.loads(backend.to_str())

        def walk(node) -> bool:
            if isinstance(node, dict):
                if node.get("type") == "Prepend" or node.get("add_prefix_space") is True:
                    return True
                if node.get("prepend_scheme") in ("first", "always"):
                    return True
                return any(walk(v) for v in node.values())
            if isinstance(node, list):
                return any(walk(v) for v in node)
            return False

        cached = walk(spec.get("normalizer")) or walk(spec.get("pre_tokenizer"))
    try:
        tokenizer._sftlib_prepends_space = cached
    except AttributeError:  # pragma: no cover - exotic tokenizer classes
        pass
    return cached


def tokenize_cut(tokenizer, text: str, cuts, enc=None) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, character offsets) of `text` with no token across any of `cuts` (character positions, sorted),
    as `tokenizer(text, add_special_tokens=False)` gives them where no token crosses a cut. `enc`: that
    call's result with offsets, if the caller has it already."""
    if enc is None:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    cuts = [c for c in cuts if 0 < c < len(text)]
    at = straddled(offsets, cuts)
    if not at or prepends_space(tokenizer):
        return ids, offsets
    chosen: set[int] = set()
    while at:  # a part tokenized alone can (rarely) cross another cut inside it: cut there too, until none does
        chosen.update(at)
        bounds = [0, *sorted(chosen), len(text)]
        parts = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        out = tokenizer(parts, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = [], []
        for a, part_ids, part_offsets in zip(bounds, out["input_ids"], out["offset_mapping"]):
            ids += part_ids
            offsets += [(s + a, e + a) for s, e in part_offsets]
        at = straddled(offsets, [c for c in cuts if c not in chosen])
    return ids, offsets
