"""Chat templates: how a conversation becomes the one string a model is trained on.

    from sftlib.data.templates import get_template
    tpl = get_template("llama-3.1")
    text = tpl.render(messages, bos_token=tok.bos_token, eos_token=tok.eos_token)
    prompt = tpl.render(messages[:i], add_generation_prompt=True, bos_token=..., eos_token=...)
    assert text.startswith(prompt) and prompt.endswith(tpl.assistant_prefix)  # for assistant turn i
    tok.chat_template = tpl.jinja                     # apply_chat_template now renders the same text
    tok.add_special_tokens({"additional_special_tokens": list(tpl.special_tokens)})
    gen_kwargs = {"stop_strings": tpl.stop_strings(tok.eos_token)}
    tpl.check(messages)   # ChatTemplateError (a ValueError) listing every problem, e.g. system not first

Each template renders system/user/assistant conversations byte for byte like the model family's
published template (Llama 3 and 3.1 as in TRL, Qwen 2.5, Phi-3, ChatML and Alpaca as in axolotl,
Mistral v1 and v3 as in mistral-common, Gemma 3 as in Google's release). Tool calls are not supported:
fine-tuning data here is plain turns, and a shorter template is easier to check.

Every template keeps one promise that assistant-only loss masking relies on: for a valid
conversation `m` and any assistant turn `i`, `render(m[:i], add_generation_prompt=True)` is a prefix
of `render(m)` and ends with `assistant_prefix` (`turn_prompt` says which prompt: mistral-v3 moves
the system text to the last user turn). So the tokens after the prompt are exactly what the
model must learn to write for turn `i`, up to and including `end_of_turn`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from sftlib.errors import SftlibError

ROLES = ("system", "user", "assistant")
EOS = "{eos}"  # placeholder in `end_of_turn` / `stop_tokens` for the tokenizer's own eos token


class ChatTemplateError(SftlibError):
    """A conversation the template cannot express, or an unknown template name."""


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # registry name, e.g. "chatml"
    jinja: str  # text for `tokenizer.chat_template`; rendered by transformers' own Jinja environment
    special_tokens: tuple[str, ...]  # literal tokens the text emits that must be single vocab entries
    end_of_turn: str  # closes an assistant turn; "{eos}" means the tokenizer's eos token
    stop_tokens: tuple[str, ...]  # generation stops at any of these; includes end_of_turn
    assistant_prefix: str  # what every generation prompt ends with, right before the assistant text
    uses_bos: bool  # the template itself writes `bos_token`, so tokenizing must not add another
    supports_system: bool  # a first `system` message is rendered (not dropped, not an error)
    aliases: tuple[str, ...] = ()  # other names get_template accepts
    # Mistral and Gemma have no way to write two turns of one role in a row (Gemma's template
    # raises, Mistral's merges them into one turn). We reject them: merging two answers would make
    # the first answer's prompt stop being a prefix of the full text.
    alternating: bool = False  # user and assistant turns must alternate
    # Mistral v3 writes the system text into the *last* user turn, so an earlier turn's prompt is the
    # conversation rendered without it (see `turn_prompt`).
    system_in_last_turn: bool = False

    def check(self, messages: list[dict[str, Any]]) -> None:
        """Raise ChatTemplateError listing every reason this template cannot render `messages`."""
        problems: list[str] = []
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ChatTemplateError(
                f"chat template `{self.name}` needs a non-empty list of messages, got {messages!r}"
            )
        roles: list[str | None] = []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                problems.append(f"message {i} must be a dict with `role` and `content`, got {msg!r}")
                roles.append(None)
                continue
            role, content = msg["role"], msg["content"]
            roles.append(role)
            if role not in ROLES:
                problems.append(f"message {i} has role `{role}`; use one of {', '.join(ROLES)}")
            if not isinstance(content, str):
                problems.append(
                    f"message {i} `content` must be a string, got {type(content).__name__}"
                )
            if role == "system":
                if not self.supports_system:
                    problems.append(
                        f"message {i} is a system message, which `{self.name}` cannot express; "
                        "drop it, fold it into the first user message, or pick a template with one"
                    )
                elif i != 0:
                    problems.append(
                        f"message {i} is a system message; only the first message may be `system`"
                    )
        turns = [r for r in roles if r != "system"]
        if not turns:
            problems.append("the conversation has no user turn")
        elif turns[0] != "user":
            problems.append(
                f"the first turn after an optional system message must be `user`, got `{turns[0]}`"
            )
        if self.alternating:
            offset = 1 if roles[0] == "system" else 0
            for i in range(offset + 1, len(roles)):
                if roles[i] == roles[i - 1] and roles[i] in ("user", "assistant"):
                    problems.append(
                        f"messages {i - 1} and {i} are both `{roles[i]}`; `{self.name}` needs "
                        "user and assistant turns to alternate: merge them into one message"
                    )
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise ChatTemplateError(f"chat template `{self.name}` cannot render this conversation:\n{lines}")

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        **kw: Any,
    ) -> str:
        """The text `tokenizer.apply_chat_template(messages, tokenize=False)` gives with this template.

        Extra keyword arguments reach the template as variables (llama-3.1 reads `date_string`).
        """
        self.check(messages)
        # Imported here so that `import sftlib.data.templates` stays cheap (config validation uses it).
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            conversations=[list(messages)],
            chat_template=self.jinja,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **kw,
        )
        return rendered[0]

    def turn_prompt(self, messages: list[dict[str, Any]], i: int, **kw: Any) -> str:
        """The text `render(messages)` has right before assistant turn `i`: the generation prompt of
        `messages[:i]`, or, where the system text goes into the last user turn and a user turn follows
        turn `i`, that prompt rendered without the system message (the system text comes later)."""
        head = messages[:i]
        later_user = any(m.get("role") == "user" for m in messages[i + 1:])
        if self.system_in_last_turn and later_user and head and head[0].get("role") == "system":
            head = head[1:]
        return self.render(head, add_generation_prompt=True, **kw)

    def end_of_turn_text(self, eos_token: str | None) -> str:
        """`end_of_turn` with "{eos}" resolved to the tokenizer's EOS ("" when it has none)."""
        return self.end_of_turn.replace(EOS, eos_token or "")

    def stop_strings(self, eos_token: str | None) -> list[str]:
        """`stop_tokens` with "{eos}" resolved, without duplicates; no eos entry when it is unknown."""
        out: list[str] = []
        for tok in self.stop_tokens:
            text = tok.replace(EOS, eos_token or "") if EOS in tok else tok
            if text and text not in out:
                out.append(text)
        return out


# --- The templates. Written as one line of Jinja each, so no template whitespace can leak. ---
# `'\\n'` in these Python strings is a Jinja escape: the rendered text gets a newline.

_GEN_CHATML = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"

CHATML = ChatTemplate(
    name="chatml",
    jinja=(
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}" + _GEN_CHATML
    ),
    special_tokens=("<|im_start|>", "<|im_end|>"),
    end_of_turn="<|im_end|>",
    stop_tokens=("<|im_end|>", EOS),
    assistant_prefix="<|im_start|>assistant\n",
    uses_bos=False,
    supports_system=True,
)

# Qwen 2.5 is ChatML with a system turn that is always there: its own text when none is given.
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

QWEN_2_5 = ChatTemplate(
    name="qwen-2.5",
    jinja=(
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = '" + QWEN_DEFAULT_SYSTEM + "' %}{% set turns = messages %}{% endif %}"
        "{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}"
        "{% for message in turns %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}" + _GEN_CHATML
    ),
    special_tokens=("<|im_start|>", "<|im_end|>"),
    end_of_turn="<|im_end|>",
    stop_tokens=("<|im_end|>", EOS),
    assistant_prefix="<|im_start|>assistant\n",
    uses_bos=False,
    supports_system=True,
    aliases=("qwen2.5", "qwen25"),
)

_LLAMA3_TURN = (
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + (message['content'] | trim) + '<|eot_id|>' }}"
)
_GEN_LLAMA3 = (
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
_LLAMA3_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

LLAMA_3 = ChatTemplate(
    name="llama-3",
    jinja=(
        "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
        + _LLAMA3_TURN
        + "{% endfor %}"
        + _GEN_LLAMA3
    ),
    special_tokens=_LLAMA3_TOKENS,
    end_of_turn="<|eot_id|>",
    stop_tokens=("<|eot_id|>", EOS),
    assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
    uses_bos=True,
    supports_system=True,
    aliases=("llama3",),
)

# Llama 3.1 always opens with a system turn carrying the knowledge cutoff and a date; Meta's
# template defaults the date to 26 Jul 2024 and lets callers pass `date_string`.
LLAMA_3_1 = ChatTemplate(
    name="llama-3.1",
    jinja=(
        "{{ bos_token }}"
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] | trim %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
        "{% if date_string is not defined %}{% set date_string = '26 Jul 2024' %}{% endif %}"
        "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n'"
        " + 'Today Date: ' + date_string + '\\n\\n' + system + '<|eot_id|>' }}"
        "{% for message in turns %}" + _LLAMA3_TURN + "{% endfor %}" + _GEN_LLAMA3
    ),
    special_tokens=_LLAMA3_TOKENS,
    end_of_turn="<|eot_id|>",
    stop_tokens=("<|eot_id|>", EOS),
    assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
    uses_bos=True,
    supports_system=True,
    aliases=("llama-31", "llama3.1"),
)

# Phi-3 writes eos once after the last turn of a finished conversation (as TRL's template does);
# with a generation prompt there is no eos, so the prompt stays a prefix of the full text.
PHI_3 = ChatTemplate(
    name="phi-3",
    jinja=(
        "{% set tags = {'system': '<|system|>', 'user': '<|user|>', 'assistant': '<|assistant|>'} %}"
        "{% for message in messages %}{% if message['role'] in tags %}"
        "{{ tags[message['role']] + '\\n' + message['content'] + '<|end|>\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    special_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    end_of_turn="<|end|>",
    stop_tokens=("<|end|>", EOS),
    assistant_prefix="<|assistant|>\n",
    uses_bos=False,
    supports_system=True,
    aliases=("phi3",),
)

# Alpaca as a chat template: the system text is written bare, turns are separated by a blank line,
# and eos closes each response (there is no end-of-turn token of its own).
ALPACA = ChatTemplate(
    name="alpaca",
    jinja=(
        "{{ bos_token }}{% for message in messages %}"
        "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
        "{% if message['role'] == 'system' %}{{ message['content'] }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '\\n\\n### Response:\\n' }}{% endif %}"
    ),
    special_tokens=(),
    end_of_turn=EOS,
    stop_tokens=(EOS,),
    assistant_prefix="\n\n### Response:\n",
    uses_bos=True,
    supports_system=True,
)

# Mistral v1 (SentencePiece vocab): [INST] and [/INST] are plain text there, not special tokens.
# The system text opens the first user turn. There is no generation prompt: a prompt ends with
# " [/INST]" and the space before the answer belongs to the answer, which is also how
# SentencePiece splits it ("▁word"), so prompt tokens are a prefix of the full text's tokens.
_ALTERNATE = "{{ raise_exception('user and assistant turns must alternate, starting with user') }}"

MISTRAL = ChatTemplate(
    name="mistral",
    jinja=(
        "{{ bos_token }}"
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" + _ALTERNATE + "{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{{ ' [INST] ' + (system + '\\n\\n' if loop.first and system else '')"
        " + message['content'] + ' [/INST]' }}"
        "{% if not loop.last %}{{ ' ' }}{% endif %}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    special_tokens=(),
    end_of_turn=EOS,
    stop_tokens=(EOS,),
    assistant_prefix=" [/INST]",
    uses_bos=True,
    supports_system=True,
    aliases=("mistral-v1",),
    alternating=True,
)

# Mistral v3 (mistral-common's SentencePiece v3 tokenizer): [INST] and [/INST] are control tokens, written
# with no space before them ("<s>[INST] hi[/INST] answer</s>"); the system text opens the *last* user
# turn; a space opens each answer. As with v1, a prompt ends with "[/INST]" and the answer's leading
# space becomes its first "▁word" piece, so prompt tokens are a prefix of the full text's tokens.
MISTRAL_V3 = ChatTemplate(
    name="mistral-v3",
    jinja=(
        "{{ bos_token }}"
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
        "{% set ns = namespace(last_user=-1) %}"
        "{% for message in turns %}{% if message['role'] == 'user' %}{% set ns.last_user = loop.index0 %}"
        "{% endif %}{% endfor %}"
        "{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" + _ALTERNATE + "{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + (system + '\\n\\n' if loop.index0 == ns.last_user and system else '')"
        " + message['content'] + '[/INST]' }}"
        "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    special_tokens=("[INST]", "[/INST]"),
    end_of_turn=EOS,
    stop_tokens=(EOS,),
    assistant_prefix="[/INST]",
    uses_bos=True,
    supports_system=True,
    aliases=("mistral-v0.3", "mistral-instruct-v3"),
    alternating=True,
    system_in_last_turn=True,
)

# Gemma 2/3 instruct: the assistant role is called "model"; there is no system turn, so the system
# text opens the first user turn (Gemma 3's rule; Gemma 2's own template rejects system messages).
GEMMA = ChatTemplate(
    name="gemma",
    jinja=(
        "{{ bos_token }}"
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] + '\\n\\n' %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" + _ALTERNATE + "{% endif %}"
        "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n'"
        " + (system if loop.first else '') + (message['content'] | trim) + '<end_of_turn>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    special_tokens=("<start_of_turn>", "<end_of_turn>"),
    end_of_turn="<end_of_turn>",
    stop_tokens=("<end_of_turn>", EOS),
    assistant_prefix="<start_of_turn>model\n",
    uses_bos=True,
    supports_system=True,
    aliases=("gemma-3", "gemma3", "gemma-2", "gemma2"),
    alternating=True,
)

TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t for t in (CHATML, LLAMA_3, LLAMA_3_1, MISTRAL, MISTRAL_V3, ALPACA, GEMMA, PHI_3, QWEN_2_5)
}
_BY_NAME: dict[str, ChatTemplate] = {
    n: t for t in TEMPLATES.values() for n in (t.name, *t.aliases)
}
TEMPLATE_NAMES: list[str] = sorted(_BY_NAME)


def get_template(name: str | ChatTemplate) -> ChatTemplate:
    """The template called `name` (or one of its aliases); a ChatTemplate is returned unchanged."""
    if isinstance(name, ChatTemplate):
        return name
    key = str(name).strip().lower().replace("_", "-")
    if key in _BY_NAME:
        return _BY_NAME[key]
    close = difflib.get_close_matches(key, TEMPLATE_NAMES, n=1, cutoff=0.5)
    hint = f"did you mean `{close[0]}`? " if close else ""
    raise ChatTemplateError(
        f"unknown chat template `{name}`; {hint}set `model.chat_template` to one of: "
        + ", ".join(TEMPLATE_NAMES)
    )
