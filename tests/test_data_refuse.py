"""Data that is not supervised fine-tuning data is refused, and the way out each error offers works.

    .venv/bin/python -m pytest tests/test_data_refuse.py -q

Preference pairs (`chosen`/`rejected`), KTO rows (a true/false `label`) and tool-calling rows are built here
in the shapes TRL, LLaMA-Factory and OpenAI use; the public samples of each are in tests/test_data.py.
"""

from __future__ import annotations

import warnings

import pytest

from conftest import turns
from sftlib.data import DataError, load_rows, to_messages

pytestmark = pytest.mark.usefixtures("datasets_cache_in_tmp")


def python_advice(message: str) -> str:
    return message.split("in Python `", 1)[1].split("`", 1)[0]


def dropped_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "not trained on" in str(w.message)]


# ---------------------------------------------------------------------------------------------- preference pairs


def test_whole_conversation_pairs_train_on_chosen_with_the_mapping_the_error_gives():
    """TRL's implicit-prompt shape: `chosen` and `rejected` are whole conversations."""
    rows = [{"chosen": turns(("user", f"Q{i}"), ("assistant", f"good {i}")),
             "rejected": turns(("user", f"Q{i}"), ("assistant", f"bad {i}"))} for i in range(3)]
    with pytest.raises(DataError) as err:
        to_messages(rows)
    message = str(err.value)
    assert "preference data (`chosen`/`rejected`" in message
    assert 'set `data.mapping` to {"messages": "chosen"}' in message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = to_messages(rows, mapping={"messages": "chosen"})
    assert ds["messages"] == [turns(("user", f"Q{i}"), ("assistant", f"good {i}")) for i in range(3)]
    assert len(dropped_warnings(caught)) == 1 and "`rejected`" in dropped_warnings(caught)[0]


def test_prompt_and_string_replies_train_on_chosen_with_the_mapping_the_error_gives():
    """TRL's standard shape: `prompt`, `chosen` and `rejected` are strings."""
    rows = [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}]
    with pytest.raises(DataError) as err:
        to_messages(rows)
    assert '{"instruction": "prompt", "output": "chosen"}' in str(err.value)
    ds = to_messages(rows, mapping={"instruction": "prompt", "output": "chosen"})
    assert ds["messages"] == [turns(("user", "Capital of France?"), ("assistant", "Paris."))]


def test_explicit_prompt_pairs_train_on_chosen_with_the_python_the_error_gives():
    """TRL's explicit-prompt conversational shape: `prompt` turns, then `chosen`/`rejected` reply turns."""
    rows = load_rows([{"prompt": turns(("user", "Hi")), "chosen": turns(("assistant", "Hello!")),
                       "rejected": turns(("assistant", "Go away."))}])
    with pytest.raises(DataError) as err:
        to_messages(rows)
    kept = eval(python_advice(str(err.value)), {"rows": rows})
    assert kept.column_names == ["messages"]
    ds = to_messages(kept)
    assert ds["messages"] == [turns(("user", "Hi"), ("assistant", "Hello!"))]


def test_one_preference_column_is_enough_to_refuse():
    rows = [{"messages": turns(("user", "Hi"), ("assistant", "Hello!")), "rejected": "Go away."}]
    with pytest.raises(DataError, match=r"preference data \(`rejected`"):
        to_messages(rows)


# ---------------------------------------------------------------------------------------------- KTO labels


@pytest.mark.parametrize("label", [[True, False, True], ["true", "False", " TRUE "]])
def test_kto_labels_are_refused_and_the_advice_keeps_the_desirable_rows(label):
    rows = load_rows([{"messages": turns(("user", f"Q{i}"), ("assistant", f"A{i}")), "label": v}
                      for i, v in enumerate(label)])
    with pytest.raises(DataError) as err:
        to_messages(rows, source="`kto.jsonl`")
    message = str(err.value)
    assert message.startswith("`kto.jsonl`: these rows are KTO data: the true/false `label` column marks 1 of 3")
    ds = to_messages(eval(python_advice(message), {"rows": rows}))
    assert [m[-1]["content"] for m in ds["messages"]] == ["A0", "A2"]


def test_a_label_column_that_is_not_true_false_is_only_dropped_with_a_warning():
    rows = [{"messages": turns(("user", "Hi"), ("assistant", "Hello!")), "label": "greeting"}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = to_messages(rows)
    assert len(ds) == 1 and "`label`" in dropped_warnings(caught)[0]


# ---------------------------------------------------------------------------------------------- tool calls


def test_openai_tool_calls_are_refused_without_a_filter_that_cannot_work():
    rows = [{"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]}, {"messages": turns(("user", "Hi"), ("assistant", "Hello!"))}]
    with pytest.raises(DataError) as err:
        to_messages(rows)
    message = str(err.value)
    assert "1 of 2 rows have tool turns ('tool', `tool_calls`)" in message
    assert "does not train tool calling yet" in message and "in Python" not in message


def test_sharegpt_tool_roles_without_a_tools_column_and_the_filter_the_error_gives():
    rows = load_rows([
        {"conversations": [{"from": "human", "value": "Add 2 and 3"}, {"from": "function_call", "value": "{}"},
                           {"from": "observation", "value": "5"}, {"from": "gpt", "value": "5"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    ])
    with pytest.raises(DataError) as err:
        to_messages(rows)
    message = str(err.value)
    assert "1 of 2 rows have tool turns ('function_call', 'observation')" in message
    ds = to_messages(eval(python_advice(message), {"rows": rows}))
    assert ds["messages"] == [turns(("user", "Hi"), ("assistant", "Hello!"))]


def test_a_tools_column_alone_is_refused_and_mapped_roles_do_not_count_as_tool_turns():
    rows = load_rows([
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "tool", "value": "Hello!"}],
         "tools": '[{"name": "f"}]'},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}], "tools": ""},
    ])
    with pytest.raises(DataError) as err:
        to_messages(rows, mapping={"assistant": "tool"})  # "tool" is the user's name for the assistant here
    message = str(err.value)
    assert "tool turns" not in message and "1 row defines functions in the `tools` column" in message
    ds = to_messages(eval(python_advice(message), {"rows": rows}), mapping={"assistant": "tool"})
    assert len(ds) == 1


def test_an_empty_tools_column_is_only_dropped_with_a_warning():
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}], "tools": "[]"}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(to_messages(rows)) == 1
    assert "`tools`" in dropped_warnings(caught)[0]


# ---------------------------------------------------------------------------------------------- dropped columns


def test_dropped_columns_are_named_once_per_conversion_and_the_layout_keys_are_not():
    rows = [{"instruction": f"Say {i}", "input": "", "output": f"{i}", "id": i, "score": 0.5} for i in range(2500)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        to_messages(rows, source="`a.jsonl`")
    said = dropped_warnings(caught)
    assert said == ["`a.jsonl`: the columns `id`, `score` are not part of the alpaca format and are not trained on "
                    "(dropped when converting)"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_messages([{"instruction": "a", "input": "b", "output": "c"}])
        to_messages([{"messages": turns(("user", "Hi"), ("assistant", "Hello!"))}])
