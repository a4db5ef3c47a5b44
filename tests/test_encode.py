"""The loss mask and packing: exactly the assistant's words and end-of-turn token are trained.

    pytest tests/test_encode.py -q
"""

from __future__ import annotations

import pytest
import torch

from sftlib.encode import IGNORE, EncodeError, encode_conversation, prompt_ids
from sftlib.model import prepare_tokenizer
from sftlib.templates import TEMPLATES, get_template

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

    from sftlib.encode import encode_dataset

    model, tokenizer = tiny
    template = get_template("gemma")  # strictly alternating user/assistant
    prepare_tokenizer(model, tokenizer, template)
    ok = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "again"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(EncodeError, match=r"row 1: .*gemma"):
        encode_dataset(Dataset.from_dict({"messages": [ok, bad]}), tokenizer, template)
