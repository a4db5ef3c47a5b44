"""Preference pairs: the layouts, the row checks, and the encoding held to TRL's own tokenization.

    pytest -q tests/test_pairs.py
"""

from __future__ import annotations

import pytest

from conftest import SHARED_FIXTURES, turns
from sftlib.data import DataError, get_template, to_messages
from sftlib.data.encode import prompt_ids
from sftlib.data.encode_pairs import encode_pair
from sftlib.data.pairs import to_pairs

DPO_DEMO = SHARED_FIXTURES / "datasets" / "llamafactory_dpo_en_demo.json"
needs_dpo_demo = pytest.mark.skipif(not DPO_DEMO.is_file(), reason=f"{DPO_DEMO} is not here (set SFTLIB_FIXTURES)")


def reply(text):
    return [{"role": "assistant", "content": text}]


@needs_dpo_demo
def test_llamafactory_dpo_file_reads_as_pairs(datasets_cache_in_tmp):
    import json

    raw = json.loads(DPO_DEMO.read_text(encoding="utf-8"))
    ds = to_pairs(str(DPO_DEMO))
    assert len(ds) == 300
    names = {"human": "user", "gpt": "assistant", "system": "system"}
    for row, pair in zip(raw, ds):
        assert pair["prompt"] == [{"role": names[t["from"]], "content": t["value"]} for t in row["conversations"]]
        assert pair["chosen"] == reply(row["chosen"]["value"]) and pair["rejected"] == reply(row["rejected"]["value"])
    assert sum(len(p) > 1 for p in ds["prompt"]) == 186  # multi-turn prompts keep their earlier turns


@pytest.mark.parametrize("rows", [
    [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}],                      # TRL, strings
    [{"prompt": turns(("user", "Capital of France?")), "chosen": reply("Paris."), "rejected": reply("Rome.")}],
    [{"messages": turns(("user", "Capital of France?")), "chosen": {"role": "assistant", "content": "Paris."},
      "rejected": {"role": "assistant", "content": "Rome."}}],                                         # OpenAI
    [{"conversations": [{"from": "human", "value": "Capital of France?"}], "chosen": {"from": "gpt", "value": "Paris."},
      "rejected": {"from": "gpt", "value": "Rome."}}],                                                 # ShareGPT
    [{"chosen": turns(("user", "Capital of France?"), ("assistant", "Paris.")),                        # implicit prompt
      "rejected": turns(("user", "Capital of France?"), ("assistant", "Rome."))}],
], ids=["prompt-strings", "prompt-turns", "openai", "sharegpt", "implicit"])
def test_every_layout_gives_the_same_pair(rows):
    ds = to_pairs(rows)
    assert ds[0] == {"prompt": turns(("user", "Capital of France?")), "chosen": reply("Paris."),
                     "rejected": reply("Rome.")}


def test_mapping_names_the_prompt_column_and_roles():
    rows = [{"dialog": [{"speaker": "me", "text": "Hi"}], "chosen": {"speaker": "bot", "text": "Hello!"},
             "rejected": {"speaker": "bot", "text": "Go away."}}]
    ds = to_pairs(rows, {"messages": "dialog", "role": "speaker", "content": "text", "user": "me", "assistant": "bot"})
    assert ds[0]["prompt"] == turns(("user", "Hi")) and ds[0]["rejected"] == reply("Go away.")


def test_bad_rows_are_listed_with_their_row_numbers():
    good = {"prompt": turns(("user", "Q")), "chosen": reply("A"), "rejected": reply("B")}
    rows = [good,
            {**good, "rejected": reply("A")},                                            # 1: equal sides
            {**good, "chosen": reply("  ")},                                             # 2: empty chosen
            {**good, "prompt": turns(("user", "Q"), ("assistant", "A"))},                # 3: prompt ends on assistant
            {**good, "rejected": None},                                                  # 4: missing side
            {**good, "chosen": turns(("user", "A"))},                                    # 5: chosen is not a reply
            {**good, "prompt": turns(("robot", "Q"))}]                                   # 6: unknown role
    with pytest.raises(DataError) as err:
        to_pairs(rows, source="`pairs.jsonl`")
    message = str(err.value)
    assert message.startswith("`pairs.jsonl`: 6 of 7 preference rows (prompt layout) cannot be used")
    for expected in ("row 1: `chosen` equals `rejected`", "row 2: `chosen` is empty (only whitespace)",
                     "row 3: the prompt ends on an assistant turn", "row 4: `rejected` is missing",
                     "row 5: `chosen` must be one assistant reply, got user",
                     "row 6: `prompt` turn 0 has the role 'robot'"):
        assert expected in message, message
    assert "row 0" not in message


def test_sft_still_refuses_pairs_and_points_to_dpo():
    rows = [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}]
    with pytest.raises(DataError) as err:
        to_messages(rows)
    assert "`train.method: sft` fine-tunes on conversations" in str(err.value)
    assert "set `train.method: dpo`" in str(err.value)


@pytest.fixture()
def chatml_tokenizer(tiny):
    from sftlib.training.tokenizer import prepare_tokenizer

    model, tokenizer = tiny
    template = get_template("chatml")
    prepare_tokenizer(model, tokenizer, template)
    return tokenizer, template


def test_pairs_are_masked_as_trl_masks_them(chatml_tokenizer):
    """TRL's DPOTrainer tokenizes the same conversational pair with the chat template (the one sftlib sets on
    the tokenizer): prompt with the generation prompt, then the completion. sftlib's ids must be TRL's, less
    what ChatML writes after the end-of-turn token (its newline, which nothing is predicted from), plus the BOS
    that SFT rows start with too (this tokenizer puts BOS in front of a text; the ChatML text has none)."""
    from trl.data_utils import _tokenize

    from sftlib.data.encode import bos_prefix

    tokenizer, template = chatml_tokenizer
    pair = {"prompt": turns(("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello there"),
                            ("user", "Capital of France?")),
            "chosen": reply("The capital of France is Paris."), "rejected": reply("I like green apples.")}
    ours = encode_pair(tokenizer, template, pair)
    trl_prompt = _tokenize(tokenizer, pair["prompt"], add_generation_prompt=True)["input_ids"]
    bos = bos_prefix(tokenizer, template)
    assert bos == [tokenizer.bos_token_id]
    assert ours["prompt_ids"] == bos + list(trl_prompt) == prompt_ids(tokenizer, template, pair["prompt"])
    eot_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for side in ("chosen", "rejected"):
        whole = list(_tokenize(tokenizer, pair["prompt"] + pair[side])["input_ids"])
        assert whole[:len(trl_prompt)] == list(trl_prompt)
        completion = whole[len(trl_prompt):]
        assert ours[f"{side}_ids"] == completion[:completion.index(eot_id) + 1]
        assert tokenizer.decode(completion[len(ours[f"{side}_ids"]):]) == "\n"
        assert tokenizer.decode(ours[f"{side}_ids"][:-1]) == pair[side][0]["content"]


def test_replies_are_cut_to_fit_and_counted(chatml_tokenizer):
    tokenizer, template = chatml_tokenizer
    pair = {"prompt": turns(("user", "Hi")), "chosen": reply("The capital of France is Paris. " * 4),
            "rejected": reply("No.")}
    whole = encode_pair(tokenizer, template, pair)
    limit = len(whole["prompt_ids"]) + 5
    cut = encode_pair(tokenizer, template, pair, max_length=limit)
    assert cut["chosen_ids"] == whole["chosen_ids"][:5] and cut["chosen_cut"] == len(whole["chosen_ids"]) - 5
    assert cut["rejected_ids"] == whole["rejected_ids"] and cut["rejected_cut"] == 0
    from sftlib.data.encode import EncodeError
    from sftlib.data.encode_pairs import PromptTooLong, encode_pairs
    from sftlib.data.pairs import to_pairs

    with pytest.raises(PromptTooLong, match="the prompt alone is"):
        encode_pair(tokenizer, template, pair, max_length=len(whole["prompt_ids"]))
    long = {**pair, "prompt": turns(("user", "Hello there! How are you today? " * 3))}
    limit = len(encode_pair(tokenizer, template, long)["prompt_ids"])
    assert len(whole["prompt_ids"]) < limit
    rows, dropped = encode_pairs(to_pairs([long, pair, long]), tokenizer, template, max_length=limit)
    assert dropped == [0, 2] and len(rows) == 1 and rows[0]["prompt_ids"] == whole["prompt_ids"]
    with pytest.raises(EncodeError, match="every one of the 2 pairs"):
        encode_pairs(to_pairs([pair, pair]), tokenizer, template, max_length=len(whole["prompt_ids"]))
