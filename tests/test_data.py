"""Loading, checking and converting training data (sftlib.data).

    .venv/bin/python -m pytest tests/test_data.py -q

Every test builds its data in code (tmp_path files); the last few also read the public sample datasets
in the shared fixtures folder ($SFTLIB_FIXTURES, else ../shared/fixtures beside the repository) when it
exists, and skip otherwise:

    SFTLIB_FIXTURES=/path/to/shared/fixtures .venv/bin/python -m pytest tests/test_data.py -q
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest

from sftlib.data import (
    DataError,
    detect_format,
    load_dataset,
    load_rows,
    split_eval,
    to_messages,
)

REPO = Path(__file__).resolve().parents[1]
from conftest import SHARED_FIXTURES, turns  # noqa: E402

pytestmark = pytest.mark.usefixtures("datasets_cache_in_tmp")

FIXTURES = SHARED_FIXTURES / "datasets"


def sharegpt(*pairs):
    return {"conversations": [{"from": name, "value": value} for name, value in pairs]}


def openai(*pairs):
    return {"messages": turns(*pairs)}


GOOD_SHAREGPT = sharegpt(("human", "Hi"), ("gpt", "Hello!"))
GOOD_OPENAI = openai(("user", "Hi"), ("assistant", "Hello!"))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def alpaca_rows(n):
    return [{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(n)]


# ---------------------------------------------------------------------------------------------- formats


def test_sharegpt_becomes_messages_with_standard_roles_and_exact_text():
    rows = [
        sharegpt(("system", "Be brief."), ("human", "  Hi\n"), ("gpt", "Hello!  "), ("user", "And?"), ("model", "Done.")),
        sharegpt(("Human", "Case"), ("GPT", "does not matter")),
    ]
    ds = to_messages(load_rows(rows))
    assert ds.column_names == ["messages"]
    assert ds[0]["messages"] == turns(
        ("system", "Be brief."), ("user", "  Hi\n"), ("assistant", "Hello!  "), ("user", "And?"), ("assistant", "Done.")
    )
    assert ds[1]["messages"] == turns(("user", "Case"), ("assistant", "does not matter"))


def test_openai_messages_pass_through_and_drop_extra_keys(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "S", "name": "x"}, {"role": "user", "content": "U"},
                      {"role": "assistant", "content": "A", "weight": 1}], "id": 7},
    ]
    ds = to_messages(load_rows(write_jsonl(tmp_path / "chat.jsonl", rows)))
    assert ds.column_names == ["messages"]
    assert ds[0]["messages"] == turns(("system", "S"), ("user", "U"), ("assistant", "A"))
    # Converting converted data changes nothing.
    assert to_messages(ds).to_list() == ds.to_list()


def test_alpaca_joins_instruction_and_input_with_a_blank_line():
    rows = [
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue"},
        {"instruction": "Count.", "input": "   ", "output": "1 2 3"},  # whitespace-only input counts as none
        {"instruction": "No input key at all.", "output": "Fine"},
    ]
    ds = to_messages(load_rows(rows))
    got = [row["messages"] for row in ds]
    assert got[0] == turns(("user", "Translate to French.\n\ncat"), ("assistant", "chat"))
    assert got[1] == turns(("user", "Name a colour."), ("assistant", "Blue"))
    assert got[2] == turns(("user", "Count."), ("assistant", "1 2 3"))
    assert got[3] == turns(("user", "No input key at all."), ("assistant", "Fine"))


def test_text_format_keeps_one_text_column():
    ds = to_messages(load_rows([{"text": " Once upon a time.\n", "source": "x"}, {"text": "The end."}]))
    assert ds.column_names == ["text"]
    assert ds["text"] == [" Once upon a time.\n", "The end."]


@pytest.mark.parametrize(
    "row, expected",
    [
        (GOOD_SHAREGPT, "sharegpt"),
        (GOOD_OPENAI, "openai"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"instruction": "a", "output": "b"}, "alpaca"),
        ({"text": "raw"}, "text"),
        ({**GOOD_SHAREGPT, "id": "x", "score": 4.5}, "sharegpt"),
    ],
)
def test_detect_format(row, expected):
    assert detect_format([row]) == expected
    assert detect_format(load_rows([row])) == expected


def test_detect_format_unknown_lists_the_keys_and_the_fix():
    with pytest.raises(DataError) as err:
        detect_format([{"prompt": "a", "completion": "b"}])
    message = str(err.value)
    assert "`prompt`" in message and "`completion`" in message
    assert "`data.format`" in message and "`data.mapping`" in message


def test_detect_format_ambiguous_row_asks_for_data_format():
    with pytest.raises(DataError, match=r"more than one format \(openai, text\).*`data.format`"):
        detect_format([{**GOOD_OPENAI, "text": "rendered"}])


def test_format_override_picks_the_column_to_use():
    rows = load_rows([{**GOOD_OPENAI, "text": "Hi -> Hello!"}])
    with pytest.raises(DataError, match="more than one format"):
        to_messages(rows)
    assert to_messages(rows, format="text")["text"] == ["Hi -> Hello!"]
    assert to_messages(rows, format="openai")[0]["messages"] == GOOD_OPENAI["messages"]


def test_format_override_to_a_layout_the_data_lacks_names_the_column():
    with pytest.raises(DataError, match=r"format `sharegpt` reads the column\(s\) `conversations`.*`data.mapping`"):
        to_messages(load_rows([GOOD_OPENAI]), format="sharegpt")
    with pytest.raises(DataError, match="did you mean `sharegpt`"):
        to_messages(load_rows([GOOD_SHAREGPT]), format="sharegtp")


def test_custom_mapping_of_keys_and_role_names():
    rows = [
        {"dialog": [{"speaker": "customer", "text": "My order is late."}, {"speaker": "agent", "text": "Sorry!"}]},
        {"dialog": [{"speaker": "customer", "text": "Thanks"}, {"speaker": "agent", "text": "Welcome"}]},
    ]
    mapping = {"messages": "dialog", "role": "speaker", "content": "text", "user": "customer", "assistant": "agent"}
    assert detect_format(rows, mapping) == "openai"
    ds = to_messages(load_rows(rows), mapping=mapping)
    assert ds[0]["messages"] == turns(("user", "My order is late."), ("assistant", "Sorry!"))
    # Without the mapping the layout is not recognised at all.
    with pytest.raises(DataError, match="cannot tell the data format"):
        to_messages(load_rows(rows))


def test_role_mapping_adds_names_and_keeps_the_standard_ones():
    rows = [sharegpt(("human", "Weather?"), ("agent", "Which city?"), ("customer", "Paris"), ("gpt", "Sunny."))]
    with pytest.raises(DataError) as err:
        to_messages(load_rows(rows))
    message = str(err.value)
    assert "row 0" in message and "'agent'" in message and "'customer'" in message
    assert "`data.mapping`" in message
    ds = to_messages(load_rows(rows), mapping={"assistant": "agent", "user": "customer"})
    assert [t["role"] for t in ds[0]["messages"]] == ["user", "assistant", "user", "assistant"]


def test_alpaca_and_text_key_mapping():
    rows = [{"question": "2+2?", "context": "math", "answer": "4"}]
    ds = to_messages(load_rows(rows), mapping={"instruction": "question", "input": "context", "output": "answer"})
    assert ds[0]["messages"] == turns(("user", "2+2?\n\nmath"), ("assistant", "4"))
    ds = to_messages(load_rows([{"body": "raw words"}]), mapping={"text": "body"})
    assert ds["text"] == ["raw words"]


def test_bad_mapping_is_reported_whole():
    with pytest.raises(DataError) as err:
        to_messages(load_rows([GOOD_SHAREGPT]), mapping={"rol": "speaker", "user": "", "contents": "x"})
    message = str(err.value)
    assert "unknown key `data.mapping.rol`; did you mean `role`?" in message
    assert "`data.mapping.user`" in message
    assert "did you mean `content`?" in message
    with pytest.raises(DataError, match="both `user` and `assistant`"):
        to_messages(load_rows([GOOD_SHAREGPT]), mapping={"user": "bot", "assistant": "bot"})


# ---------------------------------------------------------------------------------------------- bad rows


BAD_ROWS = {
    "missing key": ({"conversations": None, "id": 1}, r"row 1: `conversations` is missing"),
    "not a list": ({"conversations": {"from": "human", "value": "Hi"}}, r"row 1: `conversations` must be a list of turns, got dict"),
    "empty list": ({"conversations": []}, r"row 1: `conversations` is an empty list"),
    "turn not an object": ({"conversations": ["Hi", "Hello"]}, r"row 1: `conversations\[0\]` must be an object"),
    "turn without role": ({"conversations": [{"value": "Hi"}, {"from": "gpt", "value": "Hello"}]}, r"row 1: `conversations\[0\]` has no `from`"),
    "turn without content": ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "Hello"}]}, r"row 1: `conversations\[0\].value` is missing"),
    "non-string content": (sharegpt(("human", "Hi"), ("gpt", 42)), r"row 1: `conversations\[1\].value` must be a string, got int"),
    "empty content": (sharegpt(("human", ""), ("gpt", "Hello")), r"row 1: `conversations\[0\].value` is empty"),
    "whitespace content": (sharegpt(("human", "Hi"), ("gpt", " \n\t")), r"row 1: `conversations\[1\].value` is empty \(only whitespace\)"),
    "unknown role": (sharegpt(("human", "Hi"), ("bot", "Hello")), r"row 1: `conversations\[1\].from` is 'bot', not a known role"),
    "no assistant turn": (sharegpt(("system", "S"), ("human", "Hi")), r"row 1: has no assistant turn"),
    "ends on user": (sharegpt(("human", "Hi"), ("gpt", "Hello"), ("human", "Bye")), r"row 1: ends on a user turn \(`conversations\[2\]`\)"),
    "system not first": (sharegpt(("human", "Hi"), ("system", "S"), ("gpt", "Hello")), r"row 1: `conversations\[1\]` is a system turn after the first"),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_each_bad_row_kind_names_the_row_and_field(kind):
    bad, pattern = BAD_ROWS[kind]
    good = dict(GOOD_SHAREGPT)
    rows = [good, bad, good]
    if kind == "non-string content":
        rows = [good, bad]  # Arrow cannot hold int and str in one column: load_rows diagnoses the row itself
        with pytest.raises(DataError, match=pattern):
            load_rows(rows)
        return
    with pytest.raises(DataError, match=pattern) as err:
        to_messages(load_rows(rows))
    assert "1 row has problems" in str(err.value)
    assert "row 0" not in str(err.value) and "row 2" not in str(err.value)


@pytest.mark.parametrize(
    "bad, pattern",
    [
        ({"instruction": "Q", "output": None}, r"row 0: `output` is missing"),
        ({"instruction": " ", "output": "A"}, r"row 0: `instruction` is empty"),
        ({"instruction": "Q", "input": 3, "output": "A"}, r"row 0: `input` must be a string, got int"),
    ],
)
def test_bad_alpaca_rows(bad, pattern):
    with pytest.raises(DataError, match=pattern):
        to_messages(load_rows([bad]), format="alpaca")


def test_bad_text_rows():
    with pytest.raises(DataError, match=r"row 1: `text` is empty"):
        to_messages(load_rows([{"text": "ok"}, {"text": "\n"}]))


def test_every_row_is_checked_and_reported_once_with_the_count():
    rows = [GOOD_OPENAI] * 3 + [openai(("user", "Hi"))] * 25 + [openai(("assistant", "x"), ("user", ""))]
    with pytest.raises(DataError) as err:
        to_messages(load_rows(rows), format="openai")
    message = str(err.value)
    assert "26 rows have problems; the first 10" in message
    listed = [line for line in message.splitlines() if line.strip().startswith("row ")]
    assert len(listed) == 10
    assert listed[0].strip().startswith("row 3: ") and listed[-1].strip().startswith("row 12: ")


def test_non_string_content_from_a_file_with_mixed_types(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD_OPENAI, openai(("user", "Hi"), ("assistant", 5))])
    with pytest.raises(DataError, match=r"row 1: `messages\[1\].content` must be a string, got int"):
        to_messages(load_rows(path), source=str(path))


def test_mixed_formats_name_the_first_row_that_differs(tmp_path):
    rows = [GOOD_SHAREGPT, GOOD_SHAREGPT, GOOD_OPENAI, GOOD_SHAREGPT, GOOD_OPENAI]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    for source in (path, rows):
        with pytest.raises(DataError, match=r"row 2 is in the `openai` format.*read as `sharegpt`"):
            to_messages(load_rows(source))


def test_a_row_that_is_not_a_dict():
    with pytest.raises(DataError, match="row 1 is a str"):
        load_rows([GOOD_OPENAI, "hello"])


# ---------------------------------------------------------------------------------------------- files


def write_each_type(tmp_path, rows, name="data"):
    """The same rows as a JSON list, JSON Lines (.jsonl and .json), CSV and parquet."""
    files = {}
    files["json list"] = tmp_path / f"{name}.json"
    files["json list"].write_text(json.dumps(rows, indent=2), encoding="utf-8")
    files["jsonl"] = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    files["json lines in .json"] = write_jsonl(tmp_path / f"{name}_lines.json", rows)
    files["csv"] = write_csv(tmp_path / f"{name}.csv", rows)
    files["parquet"] = tmp_path / f"{name}.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(files["parquet"]))
    return files


def test_each_file_type_gives_the_same_conversations(tmp_path):
    rows = [
        {"instruction": "Greet", "input": "", "output": "Hello, \"friend\"!"},
        {"instruction": "Zip code?", "input": "NA", "output": "007"},
        {"instruction": "Lines", "input": "a, b", "output": "one\ntwo  "},
    ]
    expected = [
        turns(("user", "Greet"), ("assistant", 'Hello, "friend"!')),
        turns(("user", "Zip code?\n\nNA"), ("assistant", "007")),  # CSV: "007" and "NA" stay text
        turns(("user", "Lines\n\na, b"), ("assistant", "one\ntwo  ")),
    ]
    for kind, path in write_each_type(tmp_path, rows).items():
        ds = to_messages(load_rows(path))
        assert ds["messages"] == expected, kind


def test_nested_conversations_from_parquet_and_a_single_json_object(tmp_path):
    path = tmp_path / "chats.parquet"
    datasets.Dataset.from_list([GOOD_SHAREGPT] * 2).to_parquet(str(path))
    assert to_messages(load_rows(path))[1]["messages"] == GOOD_OPENAI["messages"]
    single = tmp_path / "one.json"
    single.write_text(json.dumps(GOOD_SHAREGPT, indent=2))
    assert len(to_messages(load_rows(single))) == 1


def test_conversations_in_csv_are_text_and_the_error_says_so(tmp_path):
    path = write_csv(tmp_path / "chats.csv", [{"messages": json.dumps(GOOD_OPENAI["messages"])}])
    with pytest.raises(DataError, match="got str; a CSV cell holds only text: store conversations as JSON Lines"):
        to_messages(load_rows(path))


BROKEN = {
    "broken.jsonl": ('{"text": "a"}\n{"text": \n', "could not be read as JSON"),
    "broken.json": ('[{"text": "a"}, {"text": ', "could not be read as JSON"),
    "scalar.json": ("5", "could not be read as JSON"),
    "broken.csv": ('text,other\n"never closed\n', "could not be read as CSV"),
    "broken.parquet": ("this is not parquet", "could not be read as parquet"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_file_names_the_file_and_keeps_the_cause(tmp_path, name):
    content, phrase = BROKEN[name]
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=phrase) as err:
        load_rows(path)
    assert f"`{path}`" in str(err.value)
    assert err.value.__cause__ is not None


@pytest.mark.parametrize("name", ["empty.json", "empty.jsonl", "empty.csv", "empty.parquet", "blank.jsonl"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n \n" if name.startswith("blank") else "")
    with pytest.raises(DataError, match=r"is empty: it has no rows"):
        load_rows(path)


@pytest.mark.parametrize("name, content", [("list.json", "[]"), ("header.csv", "text\n")])
def test_file_without_rows(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=r"has no rows"):
        load_rows(path)


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type `.txt`"):
        load_rows(tmp_path / "notes.txt")
    # A path that looks local is never looked up on the Hub, even in the form "owner/name.jsonl".
    for missing in (str(tmp_path / "nope.jsonl"), "data/chats.jsonl", "./chats", "a/b/c"):
        with pytest.raises(DataError, match="file not found"):
            load_rows(missing)
    with pytest.raises(DataError, match="must be a file path"):
        load_rows(42)


def test_a_hub_name_offline_says_the_hub_is_unreachable(tmp_path):
    # A fresh interpreter, because the Hub libraries read HF_HUB_OFFLINE when imported.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path), "HF_HOME": str(tmp_path)}
    code = (
        "from sftlib.data import load_rows, DataError\n"
        "try:\n    load_rows('sftlib-tests/no-such-dataset')\n"
        "except DataError as e:\n    print('DataError:', e, '| cause:', type(e.__cause__).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert "DataError: could not reach the Hugging Face Hub to load `sftlib-tests/no-such-dataset`" in out.stdout, out.stderr
    assert "local file" in out.stdout and "HF_HUB_OFFLINE" in out.stdout
    assert "| cause: ConnectionError" in out.stdout


# ---------------------------------------------------------------------------------------------- splits


@pytest.fixture()
def ten_rows_file(tmp_path):
    return write_jsonl(tmp_path / "ten.jsonl", alpaca_rows(10))


def test_split_slicing_on_a_file(ten_rows_file):
    assert load_rows(ten_rows_file, "train[:3]")["output"] == ["0", "1", "2"]
    assert load_rows(ten_rows_file, "train[50%:]")["output"] == ["5", "6", "7", "8", "9"]
    assert load_rows(ten_rows_file, "train[-2:]")["output"] == ["8", "9"]


def test_split_slicing_in_memory():
    rows = alpaca_rows(10)
    assert load_rows(rows, "train[:3]")["output"] == ["0", "1", "2"]
    assert load_rows(datasets.Dataset.from_list(rows), "train[50%:]")["output"] == ["5", "6", "7", "8", "9"]
    assert load_rows(datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}), "test[:1]")["output"] == ["0"]


def test_bad_splits(ten_rows_file):
    with pytest.raises(DataError, match=r"`train\[:x\]` is not a split spec"):
        load_rows(ten_rows_file, "train[:x]")
    with pytest.raises(DataError, match="a single file has one split, `train`"):
        load_rows(ten_rows_file, "test")
    with pytest.raises(DataError, match="selects no rows"):
        load_rows(ten_rows_file, "train[:0]")
    with pytest.raises(DataError, match="split `validation` is not in the given DatasetDict"):
        load_rows(datasets.DatasetDict({"train": datasets.Dataset.from_list(alpaca_rows(2))}), "validation")


def test_folder_with_split_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", alpaca_rows(6))
    write_jsonl(tmp_path / "test.jsonl", alpaca_rows(2))
    assert len(load_rows(tmp_path, "train")) == 6
    assert load_rows(tmp_path, "test[:1]")["output"] == ["0"]
    with pytest.raises(DataError, match=r"Unknown split \"validation\""):
        load_rows(tmp_path, "validation")
    (tmp_path / "extra.csv").write_text("text\nx\n")
    with pytest.raises(DataError, match="mixes file types"):
        load_rows(tmp_path)


def test_split_eval_by_fraction_and_by_count():
    ds = to_messages(load_rows(alpaca_rows(20)))
    train, held = split_eval(ds, 0.25, seed=0)
    assert (len(train), len(held)) == (15, 5)
    prompts = lambda d: {row["messages"][0]["content"] for row in d}  # noqa: E731
    assert prompts(train).isdisjoint(prompts(held)) and len(prompts(train) | prompts(held)) == 20
    assert prompts(split_eval(ds, 0.25, seed=0)[1]) == prompts(held)  # the seed fixes the draw
    assert prompts(split_eval(ds, 0.25, seed=1)[1]) != prompts(held)

    train, held = split_eval(ds, 3, seed=0)
    assert (len(train), len(held)) == (17, 3)
    assert len(split_eval(ds, 0.01, seed=0)[1]) == 1  # a fraction holds out at least one row
    assert split_eval(ds, 0, seed=0) == (ds, None)


@pytest.mark.parametrize("size, pattern", [(20, "leaving none to train on"), (2.5, "whole number"), (-1, "must be 0"),
                                           ("10%", "must be a number")])
def test_split_eval_rejects(size, pattern):
    ds = to_messages(load_rows(alpaca_rows(20)))
    with pytest.raises(DataError, match=pattern):
        split_eval(ds, size, seed=0)


# ---------------------------------------------------------------------------------------------- end to end


def data_cfg(source, **kw):
    base = dict(source=str(source), split="train", format="auto", mapping={}, eval_size=0.0, max_rows=None,
                shuffle_seed=0)
    return SimpleNamespace(**{**base, **kw})


def test_load_dataset_applies_split_max_rows_and_eval(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [sharegpt(("human", f"q{i}"), ("gpt", f"a{i}")) for i in range(40)])
    train, held = load_dataset(data_cfg(path))
    assert (len(train), held) == (40, None)
    train, held = load_dataset(data_cfg(path, split="train[10:]", max_rows=20, eval_size=5))
    assert (len(train), len(held)) == (15, 5)
    users = {row["messages"][0]["content"] for d in (train, held) for row in d}
    assert users == {f"q{i}" for i in range(10, 30)}  # max_rows keeps the first rows of the split
    with pytest.raises(DataError, match="`data.max_rows`"):
        load_dataset(data_cfg(path, max_rows=0))


def test_load_dataset_errors_name_the_file_and_the_split(tmp_path):
    rows = [GOOD_SHAREGPT] * 4 + [sharegpt(("human", "Hi"))]
    path = write_jsonl(tmp_path / "chats.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_dataset(data_cfg(path, split="train[2:]"))
    message = str(err.value)
    assert message.startswith(f"`{path}` (split `train[2:]`; rows are numbered within it)")
    assert "row 2: has no assistant turn" in message


# ---------------------------------------------------------------------------------------------- public samples

needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures/datasets is not here")


needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"{FIXTURES} is not here (set SFTLIB_FIXTURES)")


def python_advice(message: str) -> str:
    """The Python expression an error offers ("e.g. in Python `...`"), to check that following it works."""
    return message.split("in Python `", 1)[1].split("`", 1)[0]


@needs_fixtures
@pytest.mark.parametrize(
    "name, fmt, rows, dropped",
    [
        ("fastchat_dummy_conversation_sharegpt.json", "sharegpt", 500, ["id"]),
        ("axolotl_sharegpt_conversation.json", "sharegpt", 1, []),
        ("pirate_openai_messages.jsonl", "openai", 10, []),
        ("axolotl_alpaca.json", "alpaca", 2, []),
        ("llamafactory_identity.json", "alpaca", 91, []),
        ("llamafactory_alpaca_en_demo.json", "alpaca", 999, []),
        ("llamafactory_c4_demo.jsonl", "text", 300, []),
    ],
)
def test_public_samples_convert(name, fmt, rows, dropped):
    raw = load_rows(FIXTURES / name)
    assert detect_format(raw) == fmt
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = to_messages(raw)
    assert len(ds) == rows
    said = [str(w.message) for w in caught if "not trained on" in str(w.message)]
    assert len(said) == (1 if dropped else 0)
    assert all(f"`{column}`" in said[0] for column in dropped)
    if fmt == "text":
        assert ds["text"] == raw["text"]
    else:
        roles = {turn["role"] for conversation in ds["messages"] for turn in conversation}
        assert roles <= {"system", "user", "assistant"} and "assistant" in roles


@needs_fixtures
def test_every_public_sample_is_covered():
    """Each dataset in the shared folder has a test here: a new one must be added to the lists above and below."""
    covered = {"fastchat_dummy_conversation_sharegpt.json", "axolotl_sharegpt_conversation.json",
               "pirate_openai_messages.jsonl", "axolotl_alpaca.json", "llamafactory_identity.json",
               "llamafactory_alpaca_en_demo.json", "llamafactory_c4_demo.jsonl", "llamafactory_kto_en_demo.json",
               "llamafactory_dpo_en_demo.json", "llamafactory_glaive_toolcall_en_demo.json"}
    assert {p.name for p in FIXTURES.iterdir() if p.is_file()} == covered


@needs_fixtures
def test_public_kto_sample_is_refused_and_the_advice_keeps_the_desirable_replies():
    path = FIXTURES / "llamafactory_kto_en_demo.json"
    rows = load_rows(path)
    with pytest.raises(DataError) as err:
        load_dataset(SimpleNamespace(source=str(path)))
    message = str(err.value)
    assert message.startswith(f"`{path}`: these rows are KTO data")
    assert "marks 150 of 300 replies undesirable" in message and "KTO trainer" in message
    kept = eval(python_advice(message), {"rows": rows})
    ds = to_messages(kept)
    assert len(ds) == 150
    desirable = [r["messages"] for r in rows if r["label"] is True]
    assert [[(t["role"], t["content"]) for t in m] for m in ds["messages"]] == \
        [[(t["role"], t["content"]) for t in m] for m in desirable]


@needs_fixtures
def test_public_preference_sample_is_refused_and_the_advice_trains_on_the_chosen_replies():
    path = FIXTURES / "llamafactory_dpo_en_demo.json"
    rows = load_rows(path)
    with pytest.raises(DataError) as err:
        to_messages(rows, source=f"`{path.name}`")
    message = str(err.value)
    assert message.startswith(f"`{path.name}`: these rows are preference data (`chosen`/`rejected`")
    assert "does not train on preference pairs" in message and "DPO or ORPO" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is dropped silently or otherwise
        ds = to_messages(eval(python_advice(message), {"rows": rows}))
    assert len(ds) == 300
    assert [m[-1]["content"] for m in ds["messages"]] == [r["chosen"]["value"] for r in rows]
    assert [m[:-1] for m in ds["messages"]] == \
        [[{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
          for t in r["conversations"]] for r in rows]


@needs_fixtures
def test_public_tool_call_sample_is_refused_even_with_its_roles_mapped():
    path = FIXTURES / "llamafactory_glaive_toolcall_en_demo.json"
    rows = load_rows(path)
    with pytest.raises(DataError) as err:
        to_messages(rows, source=f"`{path.name}`")
    message = str(err.value)
    assert "tool-calling data: 153 of 300 rows have tool turns ('function_call', 'observation')" in message
    assert "191 rows define functions in the `tools` column" in message
    assert "does not train tool calling yet" in message
    # Mapping the tool roles onto ours would train the calls without the `tools` definitions: still refused.
    with pytest.raises(DataError, match="does not train tool calling yet"):
        to_messages(rows, mapping={"assistant": "function_call", "user": "observation"})
    # The advice keeps the 109 rows that have neither tool turns nor function definitions, and loses nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = to_messages(eval(python_advice(message), {"rows": rows}))
    assert len(ds) == 109
    assert {t["role"] for m in ds["messages"] for t in m} <= {"system", "user", "assistant"}


def test_a_row_nested_too_deep_is_refused_in_a_folder_too(tmp_path):
    """Arrow's JSON reader crashes the process on a row nested thousands deep: the line is named before it reads,
    for a data folder as for a single file."""
    folder = tmp_path / "chats"
    folder.mkdir()
    good = json.dumps({"messages": turns(("user", "Hi [there] {you}"), ("assistant", "Hello."))})
    (folder / "train.jsonl").write_text(good + "\n" + '{"messages": ' + "[" * 5000 + "]" * 5000 + "}\n")
    with pytest.raises(DataError, match=r"train\.jsonl`.*line 2 nests values more than 64 levels deep"):
        load_rows(str(folder))
