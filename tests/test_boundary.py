"""No token across the prompt/answer boundary, for every template: replies that start with whitespace,
newlines or punctuation still give training ids that start with the ids inference builds as its prompt,
and only the reply (and its end-of-turn) is trained.

    pytest tests/test_boundary.py -q
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sftlib.data.boundary import straddled, tokenize_cut
from sftlib.data.encode import IGNORE, encode_conversation, prompt_ids, trained_spans
from sftlib.data.templates import TEMPLATES, get_template
from sftlib.training.tokenizer import prepare_tokenizer

LLAMA3_RANKS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tokenizers" / "llama3_tokenizer.model"
LEADS = ["\n", "\n\n", " ", "  ", " \n", "\n ", "\t", ".", ":", "!\n", "\n- ", "", "\n\n\n", ")"]
WORDS = ["Hello there", "The answer is 4.", "Sure:", "ok", "Paris", "- item one\n- item two", "x = 1"]


def conversations(n: int = 60, seed: int = 0) -> list[list[dict]]:
    """One to three exchanges whose replies (and some user turns) start or end with whitespace and punctuation."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": rng.choice(WORDS) + rng.choice(["", "\n", " "])}] \
            if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": rng.choice(WORDS) + rng.choice(["", "\n", " ", ":"])})
            messages.append({"role": "assistant", "content": rng.choice(LEADS) + rng.choice(WORDS)
                             + rng.choice(["", "\n", " "])})
        rows.append(messages)
    return rows


def _bpe_tokenizer():
    """A byte-level BPE with Llama 3's pre-tokenizer, trained on text full of newlines after colons and markers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from data_prep_bench import LLAMA3_PATTERN

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [f"assistant\n{lead}{w}\n\n### Response:\n{lead}{w}: \n\n\n" for lead in LEADS for w in WORDS] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=500, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _llama3_tokenizer():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from data_prep_bench import llama3_tokenizer

    return llama3_tokenizer()[0]


@pytest.fixture(scope="module", params=["bpe", "llama3"])
def tokenizer_kind(request):
    if request.param == "llama3" and not LLAMA3_RANKS.is_file():
        pytest.skip("the Llama 3 ranks fixture is not there")
    return request.param


_BUILT: dict = {}


def fresh(kind: str, template):
    """A tokenizer of `kind` with `template`'s markers added (built once, copied per template)."""
    import copy

    if kind not in _BUILT:
        _BUILT[kind] = _bpe_tokenizer() if kind == "bpe" else _llama3_tokenizer()
    tok = copy.deepcopy(_BUILT[kind])
    prepare_tokenizer(None, tok, template)
    return tok


def crossing_rows(tokenizer, template, rows) -> tuple[int, int]:
    """(rows where the whole text's tokens cross an answer's start, rows where the encoded ids still do)."""
    before = after = 0
    for messages in rows:
        text, spans = trained_spans(template, tokenizer, messages)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        cuts = [a for a, _ in spans]
        before += bool(straddled(enc["offset_mapping"], cuts))
        after += bool(straddled(tokenize_cut(tokenizer, text, cuts, enc)[1], cuts))
    return before, after


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_prompt_is_a_prefix_and_only_the_reply_is_trained(tokenizer_kind, name):
    template = get_template(name)
    tokenizer = fresh(tokenizer_kind, template)
    rows = [m if template.supports_system else [t for t in m if t["role"] != "system"] for m in conversations()]
    before, after = crossing_rows(tokenizer, template, rows)
    assert after == 0, (before, after)
    for messages in rows:
        text, spans = trained_spans(template, tokenizer, messages)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for i, (start, end) in zip(turns, spans):
            prompt = prompt_ids(tokenizer, template, messages[:i])
            # inference starts where training did: the conversation ending with this answer, and (unless
            # mistral-v3 moves the system text to the last user turn) the whole conversation
            for upto in ([i + 1] if template.system_in_last_turn else [i + 1, len(messages)]):
                row = encode_conversation(tokenizer, template, messages[:upto])
                ids, labels = row["input_ids"], row["labels"]
                assert ids[:len(prompt)] == prompt, (name, messages[:upto])
                assert labels[len(prompt) - 1] == IGNORE and labels[len(prompt)] != IGNORE, name
            # the trained run from there on is exactly the reply and its end-of-turn, nothing of the prompt
            row = encode_conversation(tokenizer, template, messages)
            ids, labels = row["input_ids"], row["labels"]
            k = j = len(prompt) if not template.system_in_last_turn else _first_trained(labels, spans.index((start, end)))
            while k < len(ids) and labels[k] != IGNORE:
                k += 1
            assert tokenizer.decode(ids[j:k], clean_up_tokenization_spaces=False) == text[start:end], name
            assert messages[i]["content"].strip() in text[start:end]


def _first_trained(labels, n: int) -> int:
    """Where the `n`-th run of trained labels starts."""
    runs = [k for k in range(len(labels)) if labels[k] != IGNORE and (k == 0 or labels[k - 1] == IGNORE)]
    return runs[n]


def test_the_affected_templates_are_the_ones_that_merge(tokenizer_kind):
    """Which templates had a token across an answer's start before (and none after), on the same test set."""
    counts = {}
    for name in sorted(TEMPLATES):
        template = get_template(name)
        tokenizer = fresh(tokenizer_kind, template)
        rows = [m if template.supports_system else [t for t in m if t["role"] != "system"] for m in conversations()]
        counts[name] = crossing_rows(tokenizer, template, rows)
    print(tokenizer_kind, counts)
    assert all(after == 0 for _, after in counts.values()), counts
    # a prompt ending in "\n" as text, before a reply starting with "\n": merged before the fix
    assert all(counts[name][0] > 0 for name in ("chatml", "qwen-2.5", "alpaca")), counts


def test_a_leading_newline_is_trained_as_its_own_token(tokenizer_kind):
    template = get_template("chatml")
    tokenizer = fresh(tokenizer_kind, template)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\n\nHello there"}]
    row = encode_conversation(tokenizer, template, messages)
    prompt = prompt_ids(tokenizer, template, messages[:1])
    assert tokenizer.decode(prompt[-1:]) == "\n" and row["input_ids"][:len(prompt)] == prompt
    first = tokenizer.decode(row["input_ids"][len(prompt):len(prompt) + 1])
    assert first.startswith("\n") and row["labels"][len(prompt)] == row["input_ids"][len(prompt)]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_batches_equal_the_per_row_definition_at_the_boundary(tokenizer_kind, name, monkeypatch):
    """The batch path finds the rows with a token across an answer's start and gives them the reference's ids."""
    from datasets import Dataset

    from sftlib.data import encode_batch, encode_dataset

    monkeypatch.setattr(encode_batch, "BATCH_ROWS", 16)
    monkeypatch.setattr(encode_batch, "CHUNK_ROWS", 5)
    template = get_template(name)
    tokenizer = fresh(tokenizer_kind, template)
    rows = [m if template.supports_system else [t for t in m if t["role"] != "system"] for m in conversations(40, 1)]
    for train_on, max_length in (("assistant", None), ("assistant", 20), ("all", None)):
        fast = encode_dataset(Dataset.from_dict({"messages": rows}), tokenizer, template, train_on=train_on,
                              max_length=max_length).to_dict()
        reference = [encode_conversation(tokenizer, template, m, train_on=train_on, max_length=max_length)
                     for m in rows]
        for key in ("input_ids", "labels", "truncated"):
            assert fast[key] == [r[key] for r in reference], (name, train_on, key)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_preflight_finds_nothing_wrong_with_such_rows(tiny, tiny_model_dir, name):
    """Replies starting with newlines and spaces: no warning or fatal finding about the mask or the ends."""
    from datasets import Dataset

    from sftlib.checks.preflight import FATAL, WARNING, preflight
    from sftlib.config import RunConfig
    from sftlib.data import encode_dataset

    model, _ = tiny
    template = get_template(name)
    tokenizer = fresh("bpe", template)
    rows = [m if template.supports_system else [t for t in m if t["role"] != "system"] for m in conversations(30, 2)]
    assert crossing_rows(tokenizer, template, rows)[0] > 0 or name not in ("chatml", "qwen-2.5", "phi-3", "alpaca")
    ds = Dataset.from_dict({"messages": rows})
    encoded = encode_dataset(ds, tokenizer, template, max_length=256)
    cfg = RunConfig.preset("cpu-demo").with_overrides({"model.name": str(tiny_model_dir)})
    report = preflight(cfg, tokenizer, template, encoded, raw_rows=ds, model=model)
    flagged = [f.code for f in report.findings if f.severity in (FATAL, WARNING)
               and f.code not in ("memory", "memory_tight", "memory_too_big", "pad_is_eos", "no_pad_token")]
    assert not flagged, report.to_text()


def _prefix_rows(template, rows):
    """(conversation, assistant turn i, conversation ending with turn i's answer or the whole one): every
    place inference starts from, as `test_prompt_is_a_prefix_and_only_the_reply_is_trained` walks them."""
    out = []
    for messages in rows:
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                for upto in ([i + 1] if template.system_in_last_turn else [i + 1, len(messages)]):
                    out.append((messages, i, messages[:upto]))
    return out


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_train_on_all_keeps_each_prompt_a_prefix(tokenizer_kind, name):
    """`train_on: all` (the whole text trained) cuts at each answer's start as `assistant` does: the prompt
    inference builds is a prefix of the training ids, on the batch path and the per-row path, every token
    trained; rows with no token across an answer's start keep the whole text's ids."""
    from datasets import Dataset

    from sftlib.data import encode_dataset

    template = get_template(name)
    tokenizer = fresh(tokenizer_kind, template)
    rows = [m if template.supports_system else [t for t in m if t["role"] != "system"] for m in conversations(20, 3)]
    cases = _prefix_rows(template, rows)
    fast = encode_dataset(Dataset.from_dict({"messages": [c for _, _, c in cases]}), tokenizer, template,
                          train_on="all").to_dict()
    cut = 0
    for (messages, i, upto), ids, labels in zip(cases, fast["input_ids"], fast["labels"]):
        row = encode_conversation(tokenizer, template, upto, train_on="all")
        assert row["input_ids"] == ids and row["labels"] == labels == ids, (name, upto)
        prompt = prompt_ids(tokenizer, template, messages[:i])
        assert ids[:len(prompt)] == prompt, (name, upto)
        # the same ids as `train_on: assistant`, which is where the cut came from
        assert encode_conversation(tokenizer, template, upto)["input_ids"] == ids
        text = template.render(upto, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
        whole = tokenizer(text, add_special_tokens=False)["input_ids"]
        cut += ids[len(ids) - len(whole):] != whole
    # a prompt ending in "\n" before a reply starting with "\n" merges into one token in the whole text
    assert (cut > 0) == (name in ("alpaca", "chatml", "phi-3", "qwen-2.5")), (name, cut)


def test_crosses_reads_the_offsets_as_straddled_does():
    """`crosses` (two questions to the tokenizer per cut) answers as `straddled` (every offset) at every
    position of texts with multi-byte characters, runs of whitespace and markers, on the Llama 3 tokenizer."""
    from sftlib.data.boundary import crosses

    if not LLAMA3_RANKS.is_file():
        pytest.skip("the Llama 3 ranks fixture is not there")
    tokenizer = fresh("llama3", get_template("chatml"))
    texts = ["<|im_start|>user\nhé 🙂 \n\n<|im_end|>\n<|im_start|>assistant\n\n\nÜber  naïve—“q” 🙂🙂\t\n x",
             "a\n\n\n\n b  \t\n:)\n- ß", "🙂", ""]
    for text in texts:
        enc = tokenizer._tokenizer.encode(text, add_special_tokens=False)
        for c in range(len(text) + 1):
            assert crosses(enc, text, [c]) == bool(straddled(enc.offsets, [c])), (text, c)
        assert crosses(enc, text, range(len(text) + 1)) == bool(straddled(enc.offsets, range(len(text) + 1)))


def test_marker_ends_finds_overlapping_markers():
    from sftlib.data.boundary import marker_ends

    marker = get_template("alpaca").assistant_prefix  # "\n\n### Response:\n": it can overlap itself
    assert marker_ends(marker + "\n### Response:\nx", marker) == [16, 31]
    assert marker_ends("no marker", marker) == [] and marker_ends("abc", "") == []


@pytest.mark.skipif(not (LLAMA3_RANKS.parent / "mistral_v1_tokenizer.model").is_file(),
                    reason="the SentencePiece fixture is not there")
def test_sentencepiece_is_left_as_it_is(tmp_path):
    """A real SentencePiece tokenizer (Mistral v1's) prepends "▁" to every text, so a cut text would not
    tokenize as its parts: `train_on: all` keeps the whole text's ids there, on both paths."""
    import json

    from datasets import Dataset
    from transformers import AutoTokenizer

    from sftlib.data import encode_dataset
    from sftlib.data.boundary import prepends_space

    (tmp_path / "tokenizer.model").write_bytes((LLAMA3_RANKS.parent / "mistral_v1_tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True}))
    base = AutoTokenizer.from_pretrained(tmp_path)
    assert prepends_space(base)
    import copy

    for name in ("chatml", "alpaca", "mistral"):
        template = get_template(name)
        tokenizer = copy.deepcopy(base)
        prepare_tokenizer(None, tokenizer, template)
        rows = conversations(20, 4)
        fast = encode_dataset(Dataset.from_dict({"messages": rows}), tokenizer, template, train_on="all")
        for messages, ids in zip(rows, fast["input_ids"]):
            text = template.render(messages, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
            whole = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert ids[len(ids) - len(whole):] == whole, name
            assert encode_conversation(tokenizer, template, messages, train_on="all")["input_ids"] == ids


@pytest.mark.parametrize("name", ["chatml", "llama-3", "alpaca", "mistral-v3"])
def test_batches_equal_the_reference_with_multibyte_edges(tokenizer_kind, name, monkeypatch):
    """Answers that start or end with characters of several bytes (split across tokens by byte-level BPE):
    the batch path's masks, which ask only about the tokens at each span's ends, equal `mask_labels`'s."""
    import random

    from datasets import Dataset

    from sftlib.data import encode_batch, encode_dataset

    monkeypatch.setattr(encode_batch, "CHUNK_ROWS", 7)
    template = get_template(name)
    tokenizer = fresh(tokenizer_kind, template)
    rng = random.Random(5)
    edges = ["🙂", "東京", "é", "\u0301", "ß\n", "\n🙂", " 🙂 ", "\t", "x"]
    rows = [[{"role": "user", "content": rng.choice(WORDS) + rng.choice(edges)},
             {"role": "assistant", "content": rng.choice(edges) + rng.choice(WORDS) + rng.choice(edges)},
             {"role": "user", "content": rng.choice(edges)},
             {"role": "assistant", "content": rng.choice(edges) + rng.choice(edges)}] for _ in range(24)]
    for train_on in ("assistant", "all"):
        fast = encode_dataset(Dataset.from_dict({"messages": rows}), tokenizer, template, train_on=train_on).to_dict()
        reference = [encode_conversation(tokenizer, template, m, train_on=train_on) for m in rows]
        for key in ("input_ids", "labels"):
            assert fast[key] == [r[key] for r in reference], (name, train_on, key)


@pytest.mark.parametrize("name", ["chatml", "alpaca", "mistral"])
def test_the_marker_inside_a_message_is_not_taken_for_an_answer(name):
    """The batch path takes the answers' starts from the ends of `assistant_prefix` in the text only where there
    are exactly as many as assistant turns; a message quoting the marker sends the row to the prompt renders."""
    from datasets import Dataset

    from sftlib.data import encode_dataset

    template = get_template(name)
    tokenizer = fresh("bpe", template)
    marker = template.assistant_prefix
    rows = [[{"role": "user", "content": f"say {marker} please"}, {"role": "assistant", "content": f"ok{marker}x"}],
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\nHello"},
             {"role": "user", "content": marker.strip() or "x"}, {"role": "assistant", "content": marker}]]
    fast = encode_dataset(Dataset.from_dict({"messages": rows}), tokenizer, template).to_dict()
    reference = [encode_conversation(tokenizer, template, m) for m in rows]
    assert fast["labels"] == [r["labels"] for r in reference] and fast["input_ids"] == [r["input_ids"] for r in reference]
