"""The encoded-rows cache: a second run on the same data and settings loads the rows; any change in the data,
the template, the tokenizer or a setting that changes ids or labels encodes again; a write cut short leaves
no entry.

    pytest tests/test_encode_cache.py -q
"""

from __future__ import annotations

import copy
import dataclasses

import pytest

from sftlib.data.templates import get_template
from sftlib.training.tokenizer import prepare_tokenizer

CORPUS = ["Hello there, how are you?", "The capital of France is Paris.", "Two plus two is four.",
          "\nA reply that starts on a new line.", "- a list\n- of things"] * 10


def _conversations(n: int, seed: int = 0) -> list[list[dict]]:
    import random

    rng = random.Random(seed)
    return [[{"role": "user", "content": rng.choice(CORPUS)},
             {"role": "assistant", "content": rng.choice(CORPUS)}] for _ in range(n)]


@pytest.fixture(scope="module")
def base_tokenizer():
    from sftlib.demo.tiny import build_tokenizer

    return build_tokenizer(CORPUS, vocab_size=300)


def _tokenizer(base, template):
    tokenizer = copy.deepcopy(base)
    prepare_tokenizer(None, tokenizer, template)
    return tokenizer


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLIB_ENCODE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _encode(ds, tokenizer, template, **kw):
    """(rows, the lines logged) of one cached_encode call."""
    from sftlib.data.encode_cache import cached_encode

    lines = []
    rows = cached_encode(ds, tokenizer, template, log=lines.append, **kw)
    return rows, lines


def _entries(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_a_second_call_reuses_the_rows(base_tokenizer, folder):
    from datasets import Dataset

    from sftlib.data import encode_dataset

    template = get_template("chatml")
    tokenizer = _tokenizer(base_tokenizer, template)
    ds = Dataset.from_dict({"messages": _conversations(30)})
    first, lines = _encode(ds, tokenizer, template, max_length=64)
    assert "saved to the cache" in lines[0] and len(_entries(folder)) == 1
    # a fresh tokenizer object and the same rows loaded again: the same key (content, not identity)
    again = Dataset.from_dict({"messages": _conversations(30)})
    second, lines = _encode(again, _tokenizer(base_tokenizer, template), template, max_length=64)
    assert "reused from the cache" in lines[0], lines
    assert all(str(folder) in f["filename"] for f in second.cache_files)  # read from the entry, not encoded
    expected = encode_dataset(ds, tokenizer, template, max_length=64).to_dict()
    assert second.to_dict() == first.to_dict() == expected
    assert second.features == first.features


def _changed(kind, ds, tokenizer, template, kw):
    """The same call with one part of the key changed."""
    from datasets import Dataset

    if kind == "data":
        ds = Dataset.from_dict({"messages": _conversations(30, seed=1)})
    elif kind == "template":
        template = get_template("qwen-2.5")  # the same markers as chatml: the same tokenizer works
    elif kind == "template text":  # the same name, another Jinja text
        template = dataclasses.replace(template, jinja=template.jinja.replace("'<|im_end|>\\n'", "'<|im_end|>\\n\\n'"))
    elif kind == "tokenizer":  # the same class and name, one token more
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_tokens(["France"])
    elif kind == "train_on":
        kw = {**kw, "train_on": "all"}
    elif kind == "max_length":
        kw = {**kw, "max_length": 12}
    return ds, tokenizer, template, kw


def test_another_transformers_version_encodes_again(base_tokenizer, folder, monkeypatch):
    """The renderer and tokenizer libraries are part of the key: rows saved under one version are not reused
    under another (the same rows come out here, but they need not)."""
    import transformers
    from datasets import Dataset

    template = get_template("chatml")
    tokenizer = _tokenizer(base_tokenizer, template)
    ds = Dataset.from_dict({"messages": _conversations(10)})
    assert "saved" in _encode(ds, tokenizer, template)[1][0]
    monkeypatch.setattr(transformers, "__version__", transformers.__version__ + ".post1")
    assert "saved" in _encode(ds, tokenizer, template)[1][0] and len(_entries(folder)) == 2


@pytest.mark.parametrize("kind", ["data", "template", "template text", "tokenizer", "train_on", "max_length"])
def test_each_part_of_the_key_encodes_again(base_tokenizer, folder, kind):
    from datasets import Dataset

    from sftlib.data import encode_dataset

    template = get_template("chatml")
    tokenizer = _tokenizer(base_tokenizer, template)
    ds = Dataset.from_dict({"messages": _conversations(30)})
    kw = {"train_on": "assistant", "max_length": 64}
    _encode(ds, tokenizer, template, **kw)
    ds2, tokenizer2, template2, kw2 = _changed(kind, ds, tokenizer, template, kw)
    rows, lines = _encode(ds2, tokenizer2, template2, **kw2)
    assert "saved to the cache" in lines[0], (kind, lines)
    assert len(_entries(folder)) == 2
    assert rows.to_dict() == encode_dataset(ds2, tokenizer2, template2, **kw2).to_dict()
    assert rows.to_dict() != encode_dataset(ds, tokenizer, template, **kw).to_dict()  # the change mattered
    assert "reused" in _encode(ds2, tokenizer2, template2, **kw2)[1][0]


def test_a_write_cut_short_leaves_no_entry(base_tokenizer, folder, monkeypatch):
    from datasets import Dataset

    template = get_template("chatml")
    tokenizer = _tokenizer(base_tokenizer, template)
    ds = Dataset.from_dict({"messages": _conversations(20)})
    save = Dataset.save_to_disk

    def cut_short(self, path, **kw):  # the files half written, then the process is interrupted
        save(self, path, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(Dataset, "save_to_disk", cut_short)
    with pytest.raises(KeyboardInterrupt):
        _encode(ds, tokenizer, template)
    assert _entries(folder) == []
    monkeypatch.setattr(Dataset, "save_to_disk", save)
    assert "saved" in _encode(ds, tokenizer, template)[1][0]
    assert "reused" in _encode(ds, tokenizer, template)[1][0]


def test_an_unreadable_entry_is_encoded_again(base_tokenizer, folder):
    from datasets import Dataset

    template = get_template("chatml")
    tokenizer = _tokenizer(base_tokenizer, template)
    ds = Dataset.from_dict({"messages": _conversations(20)})
    first, _ = _encode(ds, tokenizer, template)
    (entry,) = [folder / name for name in _entries(folder)]
    for arrow in entry.glob("*.arrow"):
        arrow.write_bytes(b"not arrow")
    rows, lines = _encode(ds, tokenizer, template)
    assert "could not be read" in lines[0] and "saved" in lines[1]
    assert rows.to_dict() == first.to_dict()


def test_where_the_cache_lives(base_tokenizer, tmp_path, monkeypatch):
    """`SFTLIB_ENCODE_CACHE=off`: nothing written; unset: `sftlib-encoded` in the datasets cache."""
    import datasets
    from datasets import Dataset

    from sftlib.data.encode_cache import cache_folder

    template = get_template("chatml")
    tokenizer = _tokenizer(base_tokenizer, template)
    ds = Dataset.from_dict({"messages": _conversations(10)})
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("SFTLIB_ENCODE_CACHE", "off")
    assert cache_folder() is None and _encode(ds, tokenizer, template)[1] == []
    monkeypatch.delenv("SFTLIB_ENCODE_CACHE")
    assert cache_folder() == tmp_path / "hf" / "sftlib-encoded"
    assert "saved" in _encode(ds, tokenizer, template)[1][0] and len(_entries(tmp_path / "hf" / "sftlib-encoded")) == 1


def test_prepare_data_says_it_reused_the_rows(folder):
    """Two runs of the demo's setup and prepare_data (fresh tokenizer, data loaded again): the second reuses."""
    from sftlib import prepare_data, setup
    from sftlib.config import RunConfig

    cfg = RunConfig.preset("cpu-demo").with_overrides({"train.preflight": "off"})
    logs = []
    for _ in range(2):
        lines = []
        s = setup(cfg, load_weights=False, log=lambda _: None)
        data = prepare_data(cfg, s, log=lines.append)
        logs.append((lines, data.train_rows.to_dict(), data.tokens))
    (first, rows1, tokens1), (second, rows2, tokens2) = logs
    assert sum("saved to the cache" in line for line in first) == (2 if s.rows[1] is not None else 1), first
    assert sum("reused from the cache" in line for line in second) == (2 if s.rows[1] is not None else 1), second
    assert rows1 == rows2 and tokens1 == tokens2
