"""The loss mask and packing: exactly the assistant's words and end-of-turn token are trained; the batched
`encode_dataset` (and `to_messages`' Arrow conversion) give exactly what the per-row definitions give.

    pytest tests/test_encode.py -q
"""

from __future__ import annotations

import os

import pytest
import torch

from sftlib.data.encode import IGNORE, EncodeError, encode_conversation, prompt_ids
from sftlib.training.tokenizer import prepare_tokenizer
from sftlib.data.templates import TEMPLATES, get_template

TWO_TURNS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there!"},
    {"role": "assistant", "content": "Hi!"},
    {"role": "user", "content": "How are you today?"},
    {"role": "assistant", "content": "Fine, thanks."},
]


def _no_system(messages):
    return [m for m in messages if m["role"] != "system"]


def _trained_text(tokenizer, row) -> list[str]:
    """Decode each run of consecutive trained tokens."""
    runs, current = [], []
    for tok, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE:
            assert label == tok
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_exact_mask_of_two_turns(tiny, name):
    model, tokenizer = tiny
    template = get_template(name)
    prepare_tokenizer(model, tokenizer, template)
    messages = TWO_TURNS if template.supports_system else _no_system(TWO_TURNS)
    row = encode_conversation(tokenizer, template, messages)
    eot = template.end_of_turn.replace("{eos}", tokenizer.eos_token)
    # A word-initial space token belongs to the reply (mistral puts the space after `[/INST]`).
    trained = [text.lstrip(" ") for text in _trained_text(tokenizer, row)]
    assert trained == [f"Hi!{eot}", f"Fine, thanks.{eot}"]
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    assert sum(1 for label in row["labels"] if label == eot_id) == 2  # both end-of-turn tokens trained


@pytest.mark.parametrize("name", ["chatml", "llama-3.1", "mistral"])
def test_bos_exactly_once(tiny, name):
    model, tokenizer = tiny
    template = get_template(name)
    prepare_tokenizer(model, tokenizer, template)
    messages = TWO_TURNS if template.supports_system else _no_system(TWO_TURNS)
    ids = encode_conversation(tokenizer, template, messages)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    prompt = prompt_ids(tokenizer, template, messages[:-1])
    assert prompt.count(tokenizer.bos_token_id) == 1
    assert ids[: len(prompt)] == prompt  # inference starts from exactly what training saw


def test_train_on_all_trains_every_token(tiny):
    model, tokenizer = tiny
    template = get_template("chatml")
    prepare_tokenizer(model, tokenizer, template)
    row = encode_conversation(tokenizer, template, TWO_TURNS, train_on="all")
    assert row["labels"] == row["input_ids"]


def test_truncation_is_reported(tiny):
    model, tokenizer = tiny
    template = get_template("chatml")
    prepare_tokenizer(model, tokenizer, template)
    full = encode_conversation(tokenizer, template, TWO_TURNS)
    cut = encode_conversation(tokenizer, template, TWO_TURNS, max_length=10)
    assert not full["truncated"] and cut["truncated"]
    assert cut["input_ids"] == full["input_ids"][:10] and len(cut["labels"]) == 10


def test_assistant_text_containing_end_of_turn_is_refused(tiny):
    model, tokenizer = tiny
    template = get_template("chatml")
    prepare_tokenizer(model, tokenizer, template)
    bad = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a <|im_end|> b"}]
    with pytest.raises(EncodeError, match="end-of-turn"):
        encode_conversation(tokenizer, template, bad)


def test_packed_conversations_do_not_see_each_other(tiny):
    """Packing (TRL's BFD, padding-free) gives each conversation the logits it has alone."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model, tokenizer = tiny
    template = get_template("chatml")
    prepare_tokenizer(model, tokenizer, template)
    model.config.use_cache = False
    convs = [TWO_TURNS, _no_system(TWO_TURNS)[:2], [{"role": "user", "content": "2+2?"},
                                                    {"role": "assistant", "content": "4"}]]
    rows = [encode_conversation(tokenizer, template, c) for c in convs]
    ds = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    packed = pack_dataset(ds, seq_length=256, strategy="bfd")
    assert len(packed) == 1  # all three in one packed row
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    batch = collator([packed[0]])
    assert "attention_mask" not in batch
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        offset = 0
        for length in packed[0]["seq_lengths"]:
            ids = batch["input_ids"][0, offset: offset + length]
            alone = model(input_ids=ids[None]).logits[0]
            torch.testing.assert_close(logits[offset: offset + length], alone, atol=1e-4, rtol=1e-4)
            # the first token of each packed conversation is never a target of the one before
            assert batch["labels"][0, offset] == IGNORE
            offset += length


def test_a_row_the_template_cannot_express_is_named(tiny):
    from datasets import Dataset

    from sftlib.data import encode_dataset

    model, tokenizer = tiny
    template = get_template("gemma")  # strictly alternating user/assistant
    prepare_tokenizer(model, tokenizer, template)
    ok = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "again"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(EncodeError, match=r"row 1: .*gemma"):
        encode_dataset(Dataset.from_dict({"messages": [ok, bad]}), tokenizer, template)


# ----------------------------------------------------------------- the batch path = the per-row definition
# encode_dataset tokenizes in batches (Rust on every core), masks with numpy and writes Arrow columns; every
# test below holds it to `encode_conversation` row by row: same ids, labels, flags, column types, errors.

PIECES = ["Hello there", "wörld", "naïve café", "日本語のテキスト", "emoji 🙂👍🏽", "tabs\tand\nnewlines", "  padded  ",
          "1234567", "a < b > c & d", "[INST] fake [/INST]", "### Response:", "<|im_start|>user", "Ünïcödé",
          "nbsp\u00a0and\u2003em space", "The capital of France is Paris.", "x" * 40, "?!"]


def _text(rng) -> str:
    return " ".join(rng.choice(PIECES) for _ in range(rng.randint(1, 6)))


def _conversations(n: int, seed: int) -> list[list[dict]]:
    """System turns or not, one to three exchanges, unicode, whitespace at the ends, marker-like text."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": _text(rng)}] if rng.random() < 0.4 else []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": _text(rng)}, {"role": "assistant", "content": _text(rng)}]
        rows.append(messages)
    return rows


def _reference(dataset, tokenizer, template, *, train_on="assistant", max_length=None):
    """encode_dataset as it was before batching: `encode_conversation` on each row (the definition)."""
    column = "messages" if "messages" in dataset.column_names else "text"

    def fn(row, index):
        try:
            if column == "messages":
                return encode_conversation(tokenizer, template, row["messages"], train_on=train_on,
                                           max_length=max_length)
            return encode_conversation(tokenizer, template, text=row["text"], max_length=max_length)
        except ValueError as exc:
            raise EncodeError(f"row {index}: {exc}") from exc

    return dataset.map(fn, with_indices=True, remove_columns=dataset.column_names)


def _outcome(run):
    """What a run gives: its columns and their types, or its error."""
    try:
        out = run()
    except Exception as exc:  # noqa: BLE001 - the error itself is the result compared
        return type(exc), str(exc)
    return out.features, out.to_dict()


def _same_as_reference(dataset, tokenizer, template, types=True, **kw):
    from sftlib.data import encode_dataset

    fast = _outcome(lambda: encode_dataset(dataset, tokenizer, template, **kw))
    reference = _outcome(lambda: _reference(dataset, tokenizer, template, **kw))
    assert (fast if types else fast[1:]) == (reference if types else reference[1:]), kw
    return fast


@pytest.fixture()
def small_batches(monkeypatch):
    """Batches of 16 rows and tokenizer calls of 5 texts, so that every test crosses both boundaries."""
    from sftlib.data import encode_batch

    monkeypatch.setattr(encode_batch, "BATCH_ROWS", 16)
    monkeypatch.setattr(encode_batch, "CHUNK_ROWS", 5)


@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory):
    """A Llama-2/Mistral style SentencePiece BPE tokenizer (byte fallback, BOS added by the tokenizer)."""
    import json

    import sentencepiece as spm

    root = tmp_path_factory.mktemp("spm-encode")
    texts = [" ".join(PIECES[i:] + PIECES[:i]) for i in range(len(PIECES))] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(root / "tokenizer"), vocab_size=500,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True}))
    return root


@pytest.fixture(params=["bpe", "sentencepiece"])
def any_tokenizer(request, tiny_model_dir, spm_folder):
    """A fresh tokenizer of each kind: the byte-level BPE of the tiny model, and a SentencePiece one."""
    from transformers import AutoTokenizer

    from sftlib.data.encode_batch import _rust_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir if request.param == "bpe" else spm_folder)
    assert _rust_tokenizer(tokenizer) is not None  # so the comparisons below test the Rust batch path
    return tokenizer


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_batches_equal_the_per_row_definition(any_tokenizer, name, small_batches):
    from datasets import Dataset

    template = get_template(name)
    prepare_tokenizer(None, any_tokenizer, template)
    data = Dataset.from_dict({"messages": _conversations(37, seed=len(name))})
    for train_on in ("assistant", "all"):
        for max_length in (None, 24):
            features, columns = _same_as_reference(data, any_tokenizer, template, train_on=train_on,
                                                   max_length=max_length)
            assert len(columns["input_ids"]) == 37
            assert any(columns["truncated"]) == (max_length is not None)
            if train_on == "assistant" and max_length is None:  # the masks are not trivial
                assert any(x == IGNORE for row in columns["labels"] for x in row)
                assert any(x != IGNORE for row in columns["labels"] for x in row)


@pytest.mark.parametrize("name", ["chatml", "llama-3", "mistral", "gemma"])
def test_errors_name_the_same_row_and_reason(tiny, name, small_batches):
    from datasets import Dataset

    _, tokenizer = tiny
    template = get_template(name)
    prepare_tokenizer(None, tokenizer, template)
    eot = template.end_of_turn_text(tokenizer.eos_token)
    good = _conversations(30, seed=1)
    bad = {
        "end-of-turn in an answer": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"a {eot} b"}],
        "system turn later": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"},
                              {"role": "assistant", "content": "ok"}],
        "two user turns": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                           {"role": "assistant", "content": "c"}],
        "no turns": [],
    }
    for what, row in bad.items():
        rows = good[:19] + [row] + good[19:25] + [bad["end-of-turn in an answer"]] + good[25:]
        for train_on in ("assistant", "all"):
            outcome = _same_as_reference(Dataset.from_dict({"messages": rows}), tokenizer, template, train_on=train_on)
            if what != "two user turns" or template.alternating:
                assert outcome[0] is EncodeError and outcome[1].startswith("row 19: "), (what, outcome)
            else:  # chatml and llama-3 can write two user turns: the answer further down is the first error
                assert outcome[1].startswith("row 26: ") and "end-of-turn" in outcome[1], (what, outcome)
    # end-of-turn text in a user turn is no error (only the assistant's turn must not contain it)
    rows = good[:3] + [[{"role": "user", "content": f"x {eot} y"}, {"role": "assistant", "content": "z"}]]
    features, columns = _same_as_reference(Dataset.from_dict({"messages": rows}), tokenizer, template)
    assert len(columns["input_ids"]) == 4


def test_a_template_of_ones_own_still_gets_every_check(tiny, small_batches):
    """Only the built-in templates skip the prompt renders when every token is trained; another template
    is checked as before: here one whose generation prompt is not a prefix of the full text."""
    import dataclasses

    from datasets import Dataset

    from sftlib.data.templates import CHATML

    _, tokenizer = tiny
    copy = dataclasses.replace(CHATML, name="chatml-copy")
    broken = dataclasses.replace(CHATML, name="broken",
                                 jinja=CHATML.jinja.replace("assistant\\n' }}{% endif", "bot\\n' }}{% endif"))
    assert "bot" in broken.jinja
    data = Dataset.from_dict({"messages": _conversations(20, seed=3)})
    for template in (copy, broken):
        prepare_tokenizer(None, tokenizer, template)
        for train_on in ("assistant", "all"):
            outcome = _same_as_reference(data, tokenizer, template, train_on=train_on)
            if template is broken:
                assert outcome[0] is EncodeError and "row 0: template `broken` renders turn" in outcome[1]


def test_text_rows_odd_lengths_and_an_empty_dataset(tiny, small_batches):
    import random

    import numpy as np
    from datasets import Dataset

    from sftlib.data import MESSAGES_FEATURES

    _, tokenizer = tiny
    template = get_template("chatml")
    prepare_tokenizer(None, tokenizer, template)
    texts = Dataset.from_dict({"text": [_text(random.Random(i)) for i in range(23)] + [""]})
    for max_length in (None, 7, 0, -3):
        # with every row cut to nothing the per-row version's column types were inferred as `null`
        _same_as_reference(texts, tokenizer, template, types=max_length != 0, max_length=max_length)
    _same_as_reference(Dataset.from_dict({"text": ["fine", None, "fine"]}), tokenizer, template)  # row 1 is None
    messages = Dataset.from_dict({"messages": _conversations(12, seed=5)})
    for max_length in (0, -2, 1, np.int64(5)):  # a numpy int is left to the per-row version
        _same_as_reference(messages, tokenizer, template, types=max_length != 0, max_length=max_length)
    _same_as_reference(Dataset.from_dict({"messages": []}, features=MESSAGES_FEATURES), tokenizer, template)
    # a dataset with a format of its own is mapped in that format, as before (numpy arrays are no message lists)
    outcome = _same_as_reference(messages.with_format("numpy"), tokenizer, template)
    assert outcome[0] is EncodeError and outcome[1].startswith("row 0: chat template `chatml` needs a non-empty list")


def test_without_the_rust_shortcut_and_with_workers(tiny, monkeypatch):
    """The tokenizer's own batched call (used for tokenizers the shortcut does not cover), and `num_proc=2`."""
    from datasets import Dataset

    from sftlib.data import encode_batch as encode

    _, tokenizer = tiny
    template = get_template("llama-3.1")
    prepare_tokenizer(None, tokenizer, template)
    data = Dataset.from_dict({"messages": _conversations(40, seed=7)})
    fast = encode.encode_dataset(data, tokenizer, template, num_proc=2)
    assert fast.to_dict() == _reference(data, tokenizer, template).to_dict()
    monkeypatch.setattr(encode, "_rust_tokenizer", lambda tokenizer: None)
    monkeypatch.setattr(encode, "CHUNK_ROWS", 7)
    for train_on in ("assistant", "all"):
        _same_as_reference(data, tokenizer, template, train_on=train_on, max_length=30)


def test_rust_threads_only_for_the_call(tiny, monkeypatch):
    from datasets import Dataset

    from sftlib.data import encode_batch as encode

    _, tokenizer = tiny
    template = get_template("chatml")
    prepare_tokenizer(None, tokenizer, template)
    seen = []
    tokenize = encode._tokenize
    monkeypatch.setattr(encode, "_tokenize",
                        lambda *a: seen.append(os.environ.get("TOKENIZERS_PARALLELISM")) or tokenize(*a))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    encode.encode_dataset(Dataset.from_dict({"messages": _conversations(3, seed=0)}), tokenizer, template)
    assert seen == ["true"] and os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    encode.encode_dataset(Dataset.from_dict({"messages": _conversations(3, seed=0)}), tokenizer, template)
    assert seen == ["true", "true"] and "TOKENIZERS_PARALLELISM" not in os.environ


def test_vectorised_mask_equals_the_loop():
    """`_mask_batch` against `_mask` on random rows, including offsets that go backwards, spans out of order or
    overlapping, rows without spans or tokens, and offsets past the end of the text (those take the loop)."""
    import numpy as np

    from sftlib.data.encode import mask_labels as _mask
    from sftlib.data.encode_batch import _mask_batch

    rng = np.random.default_rng(0)
    for trial in range(400):
        rows = [], [], [], [], []  # ids, starts, ends, spans, text length
        expected = []
        for _ in range(int(rng.integers(1, 6))):
            length, n = int(rng.integers(0, 50)), int(rng.integers(0, 25))
            s = rng.integers(0, length + 1, n)
            s = np.sort(s) if rng.random() < 0.8 else s
            e = s + rng.integers(0, 6, n)
            if trial % 9:
                e = np.minimum(e, length)
            elif n:
                s[-1] = length + 2  # an offset past the text
            row_spans = sorted(tuple(sorted(rng.integers(0, length + 1, 2).tolist()))
                               for _ in range(rng.integers(0, 4)))
            if rng.random() < 0.2:
                row_spans.reverse()
            ids = rng.integers(0, 1000, n)
            expected += _mask(ids.tolist(), list(zip(s.tolist(), e.tolist())), row_spans)
            for column, value in zip(rows, (ids, s, e, row_spans, length)):
                column.append(value)
        ids, starts, ends, spans, lengths = rows
        got = _mask_batch(np.concatenate(ids).astype(np.int64), np.array([len(x) for x in ids], np.int64),
                          np.concatenate(starts).astype(np.int64), np.concatenate(ends).astype(np.int64), spans,
                          np.array(lengths, np.int64))
        assert got.tolist() == expected, trial


# ------------------------------------------------------- to_messages: Arrow's conversion = the Python one
# For chat layouts `to_messages` checks and converts the rows with Arrow when it can show that every row passes
# the Python checks; otherwise the Python checks run and report exactly as before.


def _to_messages_reference(rows, mapping=None, source=None):
    """to_messages as it was: the Python row checks, then `_convert_batch` through `Dataset.map`."""
    import functools

    from sftlib.data import check, convert, detect

    m = detect.check_mapping(mapping)
    lay = detect.layout_for(detect.detect_format(rows, m), m, rows.column_names)
    check.raise_problems(rows, lay, m, source)
    return rows.map(functools.partial(convert.convert_batch, lay=lay), batched=True, remove_columns=rows.column_names,
                    features=convert.MESSAGES_FEATURES)


def _chat_rows(kind: str) -> list[dict]:
    """Valid rows of a few shapes (`kind`), each taking the Arrow path."""
    convs = _conversations(25, seed=11)
    if kind == "openai":
        return [{"messages": c} for c in convs]
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    if kind == "sharegpt-mixed-keys":  # some turns written the other way round; names in any letter case
        return [{"conversations": [{"from": names[t["role"]].upper(), "value": t["content"]} if j % 2
                                   else {"role": t["role"], "content": t["content"]} for j, t in enumerate(c)]}
                for c in convs]
    if kind == "custom":
        names = {"system": "system", "user": "customer", "assistant": "agent"}
        return [{"dialog": [{"speaker": names[t["role"]], "text": t["content"]} for t in c]} for c in convs]
    return [{"conversations": [{"from": names[t["role"]], "value": t["content"]} for t in c]} for c in convs]


@pytest.mark.parametrize("kind", ["sharegpt", "openai", "sharegpt-mixed-keys", "custom"])
def test_arrow_conversion_equals_python(kind, monkeypatch):
    import datasets

    from sftlib import data
    from sftlib.data import convert, detect

    monkeypatch.setattr(convert, "ARROW_BATCH_ROWS", 7)  # several batches, the last one short
    mapping = {"messages": "dialog", "role": "speaker", "content": "text", "user": "customer",
               "assistant": "agent"} if kind == "custom" else None
    rows = datasets.Dataset.from_list(_chat_rows(kind))
    for part in (rows, rows.select(range(3, 22)), rows.select([9, 2, 17, 4])):  # slices and index mappings too
        m = detect.check_mapping(mapping)
        assert convert.arrow_checks_pass(part, detect.layout_for(detect.detect_format(part, m), m, part.column_names))
        out, reference = data.to_messages(part, mapping=mapping), _to_messages_reference(part, mapping)
        assert out.features == reference.features and out.to_dict() == reference.to_dict()
        assert out.format["type"] is None


def test_arrow_checks_leave_every_problem_to_the_python_checks(monkeypatch):
    """A row with a problem (or one Arrow cannot judge) sends the data through the Python checks: same error."""
    import datasets

    from sftlib import data
    from sftlib.data import convert

    monkeypatch.setattr(convert, "ARROW_BATCH_ROWS", 7)
    good = _chat_rows("sharegpt")

    def turn(who, text):
        return {"from": who, "value": text}

    odd_rows = {
        "blank in Python's sense": [turn("human", "\u2003\x1c \u3000"), turn("gpt", "ok")],
        "empty": [turn("human", "hi"), turn("gpt", "")],
        "unknown role": [turn("human", "hi"), turn("robot", "ok")],
        "system later": [turn("human", "hi"), turn("system", "late"), turn("gpt", "ok")],
        "ends on the user": [turn("human", "hi"), turn("gpt", "ok"), turn("human", "again")],
        "no turns": [],
        "missing value": [turn("human", "hi"), {"from": "gpt", "value": None}],
        "zero-width space is text": [turn("human", "\u200b"), turn("gpt", "\u200b ok")],
    }
    for what, odd in odd_rows.items():
        rows = datasets.Dataset.from_list(good[:12] + [{"conversations": odd}] + good[12:])
        outcomes = []
        for run in (lambda: data.to_messages(rows, source="`chats.jsonl`"),
                    lambda: _to_messages_reference(rows, source="`chats.jsonl`")):
            try:
                out = run()
                outcomes.append((out.features, out.to_dict()))
            except data.DataError as exc:
                outcomes.append(str(exc))
        assert outcomes[0] == outcomes[1], what
        assert isinstance(outcomes[0], tuple) == (what == "zero-width space is text"), what
        if isinstance(outcomes[0], str):
            assert "row 12:" in outcomes[0], what
