"""Ollama `Modelfile` from the chat template the model was trained with.

    from sftlib.exports.modelfile import modelfile_text, write_modelfile, ollama_template
    text = modelfile_text("model.Q4_K_M.gguf", get_template("chatml"), eos_token="<|end_of_text|>",
                          system="You are a helpful assistant.")
    write_modelfile("out/Modelfile", "model.Q4_K_M.gguf", template, eos_token=tok.eos_token)
    # then: ollama create my-model -f out/Modelfile

The TEMPLATE is written in Ollama's Go-template syntax over `.Messages` (Ollama passes the whole
conversation, system messages included, and the joined system text as `.System`). For every template
in `sftlib.data.templates` it renders a conversation that ends with a user turn to the same text as our
Jinja template with `add_generation_prompt=True`, except for the BOS token: Ollama adds BOS itself
when the GGUF says `tokenizer.ggml.add_bos_token` (sftlib's GGUF export sets it to what training
used), so the TEMPLATE must not write it again. Known difference: Go templates have no `trim`, so
llama-3, llama-3.1 and gemma (whose Jinja trims message text) differ for message text that starts or
ends with whitespace. Every stop token of the template becomes a `PARAMETER stop` line, so Ollama
stops at the end of the assistant turn even where the GGUF's end-of-generation tokens do not say so.
"""

from __future__ import annotations

import os
from pathlib import Path

from sftlib.data.templates import QWEN_DEFAULT_SYSTEM, ChatTemplate, get_template
from sftlib.files import atomic_write_text
from sftlib.errors import SftlibError

_EOS = "{{EOS}}"  # replaced by the tokenizer's eos text: previous assistant turns end with it in some templates

# One line each, so no template whitespace leaks; "\n" here is a real newline in the TEMPLATE text.
# `$first` marks the first user turn, where Mistral and Gemma fold in the system text.
GO_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n"
    ),
    "qwen-2.5": (
        "{{ if not .System }}<|im_start|>system\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\n{{ end }}"
        "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n"
    ),
    "llama-3": (
        "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "llama-3.1": (
        "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n{{ .System }}<|eot_id|>"
        '{{ range .Messages }}{{ if ne .Role "system" }}'
        "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "phi-3": "{{ range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
    "alpaca": (
        "{{ range $i, $m := .Messages }}{{ if $i }}\n\n{{ end }}"
        '{{ if eq .Role "system" }}{{ .Content }}'
        '{{ else if eq .Role "user" }}### Instruction:\n{{ .Content }}'
        '{{ else if eq .Role "assistant" }}### Response:\n{{ .Content }}' + _EOS + "{{ end }}{{ end }}"
        "\n\n### Response:\n"
    ),
    # Our Jinja writes " " after a user turn that is not the last; the next turn is always the
    # assistant's (turns alternate), so here the assistant turn opens with that space.
    "mistral": (
        "{{ $first := true }}{{ range .Messages }}"
        '{{ if eq .Role "user" }} [INST] {{ if and $first $.System }}{{ $.System }}\n\n{{ end }}'
        "{{ $first = false }}{{ .Content }} [/INST]"
        '{{ else if eq .Role "assistant" }} {{ .Content }}' + _EOS + "{{ end }}{{ end }}"
    ),
    # Mistral v3 writes the system text into the last user turn: the first range finds it.
    "mistral-v3": (
        '{{ $last := 0 }}{{ range $i, $m := .Messages }}{{ if eq .Role "user" }}{{ $last = $i }}{{ end }}{{ end }}'
        '{{ range $i, $m := .Messages }}{{ if eq .Role "user" }}[INST] '
        "{{ if and (eq $i $last) $.System }}{{ $.System }}\n\n{{ end }}{{ .Content }}[/INST]"
        '{{ else if eq .Role "assistant" }} {{ .Content }}' + _EOS + "{{ end }}{{ end }}"
    ),
    "gemma": (
        "{{ $first := true }}{{ range .Messages }}"
        '{{ if eq .Role "user" }}<start_of_turn>user\n{{ if and $first $.System }}{{ $.System }}\n\n{{ end }}'
        "{{ $first = false }}{{ .Content }}<end_of_turn>\n"
        '{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}'
        "<start_of_turn>model\n"
    ),
}


class ModelfileError(SftlibError):
    """The Modelfile cannot express this template or value."""


def ollama_template(template: ChatTemplate | str, eos_token: str = "") -> str:
    """The Go-template TEMPLATE text for `template` (a ChatTemplate or its name)."""
    template = get_template(template)
    if template.name not in GO_TEMPLATES:
        raise ModelfileError(
            f"no Ollama TEMPLATE is known for chat template `{template.name}`; add one to sftlib.exports.modelfile.GO_TEMPLATES"
        )
    text = GO_TEMPLATES[template.name]
    if _EOS in text and not eos_token:
        raise ModelfileError(f"template `{template.name}` ends assistant turns with EOS; pass `eos_token`")
    return text.replace(_EOS, eos_token)


def _quote(value: str, what: str) -> str:
    if '"' in value or "\n" in value:
        raise ModelfileError(f"{what} {value!r} contains a quote or newline, which a Modelfile line cannot hold")
    return f'"{value}"'


def modelfile_text(gguf_file: str | Path, template: ChatTemplate | str, *, eos_token: str = "",
                   system: str | None = None, parameters: dict[str, object] | None = None) -> str:
    """The Modelfile: FROM the GGUF (relative to the Modelfile's folder), TEMPLATE, SYSTEM, stop tokens."""
    template = get_template(template)
    body = ollama_template(template, eos_token)
    if '"""' in body or (system and '"""' in system):
        raise ModelfileError('the TEMPLATE or SYSTEM text contains `"""`, which ends a Modelfile block')
    stops = template.stop_strings(eos_token)  # "{eos}" entries are dropped when eos_token is unknown
    if not stops:
        raise ModelfileError(f"template `{template.name}` stops at EOS only; pass the tokenizer's `eos_token`")
    gguf = str(gguf_file)
    lines = [f"FROM ./{gguf}" if not os.path.isabs(gguf) and not gguf.startswith(".") else f"FROM {gguf}",
             f'TEMPLATE """{body}"""']
    if system:
        if not template.supports_system:
            raise ModelfileError(f"template `{template.name}` has no system turn; drop `system`")
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {_quote(s, 'stop token')}" for s in stops]
    for key, value in (parameters or {}).items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"


def write_modelfile(path: str | Path, gguf_file: str | Path, template: ChatTemplate | str, **kw) -> Path:
    """Write `modelfile_text(...)` to `path` atomically (a temporary name, then a rename)."""
    return atomic_write_text(path, modelfile_text(gguf_file, template, **kw))
