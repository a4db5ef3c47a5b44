"""Chat templates render the published formats exactly and keep the prompt-prefix promise.

    .venv/bin/python -m pytest tests/test_templates.py -q

Golden strings below are written out by hand from each family's documented format and always run.
Byte-for-byte comparisons with the reference templates run when the shared fixtures folder
(`../shared/fixtures/chat_templates` next to the repository) exists, and skip otherwise.
"""

from __future__ import annotations

import dataclasses
import random
import re
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

from sftlib.data.templates import (
    TEMPLATE_NAMES,
    TEMPLATES,
    ChatTemplate,
    ChatTemplateError,
    get_template,
)

from conftest import SHARED_FIXTURES  # noqa: E402

FIXTURES = SHARED_FIXTURES / "chat_templates"

REFERENCE_FILES = {
    "chatml": "axolotl_chatml.jinja",
    "llama-3": "trl_llama3.jinja",
    "llama-3.1": "trl_llama3_1.jinja",
    "qwen-2.5": "trl_qwen2_5.jinja",
    "phi-3": "trl_phi3.jinja",
    "alpaca": "axolotl_alpaca.jinja",
    "mistral": "mistral_v1_spm.jinja",
    "mistral-v3": "mistral_v3_spm.jinja",
}

# Each family's real bos/eos, so the golden strings read like what the model sees.
SPECIAL = {
    "chatml": ("<s>", "<|endoftext|>"),
    "qwen-2.5": ("<s>", "<|endoftext|>"),
    "llama-3": ("<|begin_of_text|>", "<|end_of_text|>"),
    "llama-3.1": ("<|begin_of_text|>", "<|end_of_text|>"),
    "phi-3": ("<s>", "<|endoftext|>"),
    "alpaca": ("<s>", "</s>"),
    "mistral": ("<s>", "</s>"),
    "mistral-v3": ("<s>", "</s>"),
    "gemma": ("<bos>", "<eos>"),
}

TWO_TURNS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]

_L3_TURNS = (
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
)
_CHATML = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n"
    "<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello.<|im_end|>\n"
    "<|im_start|>user\n2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4<|im_end|>\n"
)

# render(TWO_TURNS) for every template.
GOLDEN = {
    "chatml": _CHATML,
    "qwen-2.5": _CHATML,
    "llama-3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>" + _L3_TURNS
    ),
    "llama-3.1": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "You are terse.<|eot_id|>" + _L3_TURNS
    ),
    "phi-3": (
        "<|system|>\nYou are terse.<|end|>\n"
        "<|user|>\nHi<|end|>\n"
        "<|assistant|>\nHello.<|end|>\n"
        "<|user|>\n2+2?<|end|>\n"
        "<|assistant|>\n4<|end|>\n"
        "<|endoftext|>"
    ),
    "alpaca": (
        "<s>You are terse.\n\n"
        "### Instruction:\nHi\n\n"
        "### Response:\nHello.</s>\n\n"
        "### Instruction:\n2+2?\n\n"
        "### Response:\n4</s>"
    ),
    "mistral": "<s> [INST] You are terse.\n\nHi [/INST] Hello.</s> [INST] 2+2? [/INST] 4</s>",
    "mistral-v3": "<s>[INST] Hi[/INST] Hello.</s>[INST] You are terse.\n\n2+2?[/INST] 4</s>",  # system: last turn
    "gemma": (
        "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n"
        "<start_of_turn>model\n4<end_of_turn>\n"
    ),
}

# render(TWO_TURNS[:4], add_generation_prompt=True): the prompt for the second answer.
GOLDEN_PROMPT = {
    "chatml": _CHATML[: -len("4<|im_end|>\n")],
    "qwen-2.5": _CHATML[: -len("4<|im_end|>\n")],
    "llama-3": GOLDEN["llama-3"][: -len("4<|eot_id|>")],
    "llama-3.1": GOLDEN["llama-3.1"][: -len("4<|eot_id|>")],
    "phi-3": (
        "<|system|>\nYou are terse.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n"
        "<|user|>\n2+2?<|end|>\n<|assistant|>\n"
    ),
    "alpaca": (
        "<s>You are terse.\n\n### Instruction:\nHi\n\n### Response:\nHello.</s>\n\n"
        "### Instruction:\n2+2?\n\n### Response:\n"
    ),
    "mistral": "<s> [INST] You are terse.\n\nHi [/INST] Hello.</s> [INST] 2+2? [/INST]",
    "mistral-v3": "<s>[INST] Hi[/INST] Hello.</s>[INST] You are terse.\n\n2+2?[/INST]",
    "gemma": (
        "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n"
    ),
}


def render(name: str, messages, add_generation_prompt=False, **kw) -> str:
    bos, eos = SPECIAL[name]
    return get_template(name).render(
        messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos, **kw
    )


# --- Golden strings (always run) -----------------------------------------------------------------


def test_every_template_has_a_golden_string():
    assert set(GOLDEN) == set(TEMPLATES) == set(GOLDEN_PROMPT)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_two_turns_with_system(name):
    assert render(name, TWO_TURNS) == GOLDEN[name]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_generation_prompt(name):
    prompt = render(name, TWO_TURNS[:4], add_generation_prompt=True)
    assert prompt == GOLDEN_PROMPT[name]
    assert GOLDEN[name].startswith(prompt)
    assert prompt.endswith(get_template(name).assistant_prefix)


def test_qwen_adds_its_default_system_prompt():
    text = render("qwen-2.5", [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chatml_adds_no_system_prompt_and_no_bos():
    text = render("chatml", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"


def test_llama_31_always_writes_the_system_header_and_takes_a_date():
    msgs = [{"role": "user", "content": "Hi"}]
    text = render("llama-3.1", msgs, add_generation_prompt=True, date_string="1 Jan 2025")
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 1 Jan 2025\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_gemma_without_system_trims_turns_and_calls_the_assistant_model():
    msgs = [
        {"role": "user", "content": "  Hi\n"},
        {"role": "assistant", "content": "Hello. "},
        {"role": "user", "content": "Bye"},
    ]
    assert render("gemma", msgs, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_phi3_ends_a_finished_conversation_with_eos_but_not_a_prompt():
    msgs = [{"role": "user", "content": "Hi"}]
    assert render("phi-3", msgs) == "<|user|>\nHi<|end|>\n<|endoftext|>"
    assert render("phi-3", msgs, add_generation_prompt=True) == "<|user|>\nHi<|end|>\n<|assistant|>\n"


# --- The prompt-prefix promise -------------------------------------------------------------------

# Leading/trailing whitespace matters: llama-3 and gemma trim turns, the others keep them verbatim.
_PIECES = [
    "Hi", " spaced ", "two\nlines", "\ttab", "ünïcødé ✓", "[INST] literal", "x" * 40, "a  b", "\n",
]


def random_conversation(rng: random.Random, alternating: bool) -> list[dict[str, str]]:
    """A valid conversation: optional system, user first, ends on an assistant turn."""

    def text() -> str:
        return "".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 3))) + rng.choice(["", " ", "!"])

    msgs = [{"role": "system", "content": text()}] if rng.random() < 0.5 else []
    role = "user"
    for _ in range(rng.randint(1, 4)):
        msgs.append({"role": role, "content": text()})
        if alternating or rng.random() < 0.7:
            role = "assistant" if role == "user" else "user"
    if msgs[-1]["role"] != "assistant":
        if alternating or rng.random() < 0.5:
            msgs.append({"role": "assistant", "content": text()})
        else:  # two answers in a row, only where the template allows it
            msgs += [{"role": "assistant", "content": text()}, {"role": "assistant", "content": text()}]
    return msgs


def conversations_for(name: str, count: int = 150, seed: int = 0):
    rng = random.Random(seed)
    alternating = get_template(name).alternating
    return [TWO_TURNS, *(random_conversation(rng, alternating) for _ in range(count))]


def prefix_violations(tpl: ChatTemplate, conversations, bos: str, eos: str) -> list:
    """Every (conversation, assistant index) where the prompt is not a prefix of the full text."""
    bad = []
    for msgs in conversations:
        for upto in range(1, len(msgs) + 1):
            if msgs[upto - 1]["role"] != "assistant":
                continue  # a training conversation ends on an answer
            full = tpl.render(msgs[:upto], bos_token=bos, eos_token=eos)
            for i in range(upto):
                if msgs[i]["role"] != "assistant":
                    continue
                prompt = tpl.turn_prompt(msgs[:upto], i, bos_token=bos, eos_token=eos)
                answer = full[len(prompt) :]
                end = tpl.end_of_turn.replace("{eos}", eos)
                # The answer that follows the prompt must be closed by the end-of-turn text.
                if not (full.startswith(prompt) and prompt.endswith(tpl.assistant_prefix) and end in answer):
                    bad.append((msgs[:upto], i))
    return bad


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_prompt_is_prefix_of_full_text_for_every_assistant_turn(name):
    assert prefix_violations(get_template(name), conversations_for(name), *SPECIAL[name]) == []


def test_prefix_check_catches_a_generation_prompt_without_the_separator():
    """An Alpaca variant whose prompt forgets the blank line the full text puts before a response."""
    alpaca = get_template("alpaca")
    broken = dataclasses.replace(
        alpaca,
        jinja=alpaca.jinja.replace("{{ '\\n\\n### Response:\\n' }}", "{{ '### Response:\\n' }}"),
        assistant_prefix="### Response:\n",
    )
    assert broken.jinja != alpaca.jinja
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert prefix_violations(broken, [msgs], "<s>", "</s>") == [(msgs, 1)]
    assert prefix_violations(alpaca, [msgs], "<s>", "</s>") == []


# --- Tokens --------------------------------------------------------------------------------------

_TOKEN_LIKE = re.compile(r"<\|[a-z_]+\|>|<[a-z]+_of_turn>|<(?:bos|eos)>|</?s>|\[/?INST\]")
PLAIN_TEXT_MARKERS = {"mistral": {"[INST]", "[/INST]"}}  # v1's vocabulary has no such tokens


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_special_tokens_are_exactly_the_token_literals_rendered(name):
    tpl = get_template(name)
    bos, eos = SPECIAL[name]
    text = render(name, TWO_TURNS) + render(name, TWO_TURNS[:2], add_generation_prompt=True)
    seen = set(_TOKEN_LIKE.findall(text)) - {bos, eos} - PLAIN_TEXT_MARKERS.get(name, set())
    assert seen == set(tpl.special_tokens)
    for tok in tpl.special_tokens:
        assert tok in tpl.jinja


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_stop_tokens_cover_end_of_turn_and_are_known_tokens(name):
    tpl = get_template(name)
    assert tpl.end_of_turn in tpl.stop_tokens
    assert set(tpl.stop_tokens) <= set(tpl.special_tokens) | {"{eos}"}
    assert tpl.uses_bos == ("bos_token" in tpl.jinja)


def test_stop_strings_resolve_eos_without_duplicates():
    assert get_template("llama-3").stop_strings("<|end_of_text|>") == ["<|eot_id|>", "<|end_of_text|>"]
    assert get_template("mistral").stop_strings("</s>") == ["</s>"]
    assert get_template("chatml").stop_strings("<|im_end|>") == ["<|im_end|>"]
    assert get_template("phi-3").stop_strings(None) == ["<|end|>"]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_tokenizer_apply_chat_template_renders_the_same_text(name):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bos, eos = SPECIAL[name]
    core = Tokenizer(models.WordLevel({"[UNK]": 0, bos: 1, eos: 2}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, unk_token="[UNK]")
    tok.chat_template = get_template(name).jinja
    for msgs in conversations_for(name, count=10, seed=1):
        for gen in (False, True):
            via_tokenizer = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert via_tokenizer == render(name, msgs, add_generation_prompt=gen)


# --- Byte-for-byte against the reference templates (when the fixtures exist) ---------------------


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"reference templates not found at {FIXTURES}")
@pytest.mark.parametrize("name", sorted(REFERENCE_FILES))
def test_matches_reference_template(name):
    from transformers.utils.chat_template_utils import render_jinja_template

    reference = (FIXTURES / REFERENCE_FILES[name]).read_text()
    extra = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": " Be nice. "}, {"role": "user", "content": " Hi\n"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
    ]
    checked = 0
    for msgs in [*extra, *conversations_for(name, count=60, seed=2)]:
        for gen in (False, True):
            for bos, eos in (SPECIAL[name], ("<B>", "<E>")):
                ours = get_template(name).render(
                    msgs, add_generation_prompt=gen, bos_token=bos, eos_token=eos
                )
                rendered, _ = render_jinja_template(
                    conversations=[msgs], chat_template=reference, add_generation_prompt=gen,
                    bos_token=bos, eos_token=eos,
                )
                assert ours == rendered[0], (name, msgs, gen)
                checked += 1
    assert checked > 100


TOKENIZERS = FIXTURES.parent / "tokenizers"


def _real_sentencepiece(name: str, tmp_path):
    import json

    from transformers import AutoTokenizer

    (tmp_path / "tokenizer.model").write_bytes((TOKENIZERS / f"{name}_tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return AutoTokenizer.from_pretrained(tmp_path)


@pytest.mark.skipif(not TOKENIZERS.is_dir(), reason=f"tokenizers not found at {TOKENIZERS}")
def test_mistral_v3_tokens_follow_the_official_layout(tmp_path):
    """mistral-common's v3 layout: BOS [INST] ▁user... [/INST] ▁answer... EOS, the system text opening the
    last user turn; no "▁" piece of its own before the control tokens (v1's template gives two per exchange)."""
    tok = _real_sentencepiece("mistral_v3_instruct", tmp_path)
    inst, end_inst = tok.convert_tokens_to_ids(["[INST]", "[/INST]"])

    def words(text):  # what mistral-common encodes for a message: SentencePiece with its "▁" prefix
        return tok(text, add_special_tokens=False)["input_ids"]

    official = ([tok.bos_token_id, inst] + words("Hi") + [end_inst] + words("Hello.") + [tok.eos_token_id, inst]
                + words("You are terse.\n\n2+2?") + [end_inst] + words("4") + [tok.eos_token_id])
    ids = tok(render("mistral-v3", TWO_TURNS), add_special_tokens=False)["input_ids"]
    assert ids == official, tok.convert_ids_to_tokens(ids)
    v1 = tok.convert_ids_to_tokens(tok(render("mistral", TWO_TURNS), add_special_tokens=False)["input_ids"])
    stray = [a for a, b in zip(v1, v1[1:]) if a == "\u2581" and b in ("[INST]", "[/INST]")]
    assert len(stray) == 4  # a lone "▁" before each marker: what the v3 template exists to avoid


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"reference templates not found at {FIXTURES}")
def test_llama_31_date_string_matches_reference():
    from transformers.utils.chat_template_utils import render_jinja_template

    reference = (FIXTURES / REFERENCE_FILES["llama-3.1"]).read_text()
    for msgs in (TWO_TURNS, TWO_TURNS[1:3]):
        ours = render("llama-3.1", msgs, date_string="5 Mar 2025")
        rendered, _ = render_jinja_template(
            conversations=[msgs], chat_template=reference, bos_token="<|begin_of_text|>",
            eos_token="<|end_of_text|>", date_string="5 Mar 2025",
        )
        assert ours == rendered[0]
        assert "Today Date: 5 Mar 2025\n" in ours


# --- Errors --------------------------------------------------------------------------------------


def test_system_message_rejected_where_the_template_has_no_system_turn():
    no_system = dataclasses.replace(get_template("gemma"), name="gemma-no-system", supports_system=False)
    with pytest.raises(ChatTemplateError, match=r"`gemma-no-system`.*\n.*message 0 is a system message"):
        no_system.render(TWO_TURNS)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_bad_role_order_names_template_and_problem(name):
    cases = {
        "system not first": (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
            "only the first message may be `system`",
        ),
        "assistant first": ([{"role": "assistant", "content": "a"}], "must be `user`, got `assistant`"),
        "no user": ([{"role": "system", "content": "s"}], "no user turn"),
        "unknown role": (
            [{"role": "user", "content": "a"}, {"role": "tool", "content": "t"}],
            "role `tool`; use one of system, user, assistant",
        ),
        "content not text": ([{"role": "user", "content": ["a"]}], "`content` must be a string, got list"),
        "empty": ([], "non-empty list of messages"),
    }
    for msgs, expected in cases.values():
        with pytest.raises(ValueError, match=re.escape(expected)) as err:
            get_template(name).render(msgs)
        assert f"`{name}`" in str(err.value)


@pytest.mark.parametrize("name", ["mistral", "gemma"])
def test_alternating_templates_reject_repeated_roles(name):
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
    ]
    with pytest.raises(ChatTemplateError, match=r"messages 1 and 2 are both `user`.*merge them"):
        get_template(name).render(msgs)
    # The Jinja text refuses too, so apply_chat_template on a tokenizer cannot silently mis-render.
    from transformers.utils.chat_template_utils import render_jinja_template

    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        render_jinja_template(
            conversations=[msgs], chat_template=get_template(name).jinja, bos_token="", eos_token=""
        )


@pytest.mark.parametrize("name", ["chatml", "llama-3", "llama-3.1", "qwen-2.5", "phi-3", "alpaca"])
def test_free_form_templates_accept_repeated_roles(name):
    msgs = [
        {"role": "user", "content": "Q1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A1"},
        {"role": "assistant", "content": "A2"},
    ]
    text = render(name, msgs)
    # Each turn is kept as its own turn, in order: nothing merged, nothing dropped.
    assert [m for m in re.findall(r"[QA][12]", text)] == ["Q1", "Q2", "A1", "A2"]


def test_all_problems_are_reported_at_once():
    msgs = [
        {"role": "assistant", "content": 3},
        {"role": "system", "content": "s"},
        {"role": "bot", "content": "x"},
    ]
    with pytest.raises(ChatTemplateError) as err:
        get_template("chatml").render(msgs)
    lines = str(err.value).splitlines()
    assert len(lines) == 1 + 4, str(err.value)


# --- Registry ------------------------------------------------------------------------------------


def test_registry_names_and_aliases():
    assert TEMPLATE_NAMES == sorted(TEMPLATE_NAMES)
    assert set(TEMPLATES) == {
        "chatml", "llama-3", "llama-3.1", "mistral", "mistral-v3", "alpaca", "gemma", "phi-3", "qwen-2.5"
    }
    for tpl in TEMPLATES.values():
        assert isinstance(tpl, ChatTemplate)
        for name in (tpl.name, *tpl.aliases):
            assert name in TEMPLATE_NAMES
            assert get_template(name) is tpl
    assert get_template("llama3") is get_template("llama-3")
    assert get_template("llama-31") is get_template("llama-3.1")
    assert get_template(" Qwen_2.5 ") is get_template("qwen-2.5")
    assert get_template(TEMPLATES["gemma"]) is TEMPLATES["gemma"]


def test_unknown_template_suggests_the_closest_name():
    expected = r"unknown chat template `lama-3.1`; did you mean `llama-3.1`\?"
    with pytest.raises(ValueError, match=expected) as err:
        get_template("lama-3.1")
    assert "chatml" in str(err.value) and "model.chat_template" in str(err.value)
    with pytest.raises(ChatTemplateError, match="unknown chat template `zzz`; set"):
        get_template("zzz")


def test_import_does_not_load_transformers():
    code = "import sys, sftlib.data.templates; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
