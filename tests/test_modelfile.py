"""The Ollama Modelfile: its Go TEMPLATE renders conversations exactly like our Jinja templates.

    pytest tests/test_modelfile.py -q

There is no Go toolchain in CI, so `go_render` below implements the part of Go's text/template that
the TEMPLATEs use (text, `{{- -}}` trimming, fields, variables with `:=` and `=`, if / else if /
else, range with and without index variables, and the functions eq, ne, and, or, not), and is itself
checked on cases whose Go output is known. Ollama executes a TEMPLATE with `.Messages` (every
message, system ones included, consecutive same-role messages joined by a blank line) and `.System`
(the system messages joined by a blank line).
"""

from __future__ import annotations

import re

import pytest

from sftlib.exports.modelfile import ModelfileError, modelfile_text, ollama_template, write_modelfile
from sftlib.data.templates import TEMPLATES, get_template

# ----------------------------------------------------------------------------- a Go text/template subset

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\(|\)|:=|=|[^\s()]+')


def _parse(src: str):
    """Tokens -> nested blocks: ("text", s) | ("out", expr) | ("set", name, expr, declare) |
    ("if", [(cond, body)], else_body) | ("range", vars, expr, body)."""
    items, pos = [], 0
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        items.append(("text", text))
        items.append(("action", m.group(2)))
        pos = m.end()
        if m.group(3):
            rest = src[pos:]
            pos += len(rest) - len(rest.lstrip(" \t\r\n"))
    items.append(("text", src[pos:]))

    def block(i, stop):
        out = []
        while i < len(items):
            kind, val = items[i]
            if kind == "text":
                if val:
                    out.append(("text", val))
                i += 1
                continue
            head = val.split(None, 1)[0] if val else ""
            if head in stop:
                return out, i
            if head == "if":
                branches, cond = [], val[2:].strip()
                while True:
                    body, i = block(i + 1, ("else", "end"))
                    branches.append((cond, body))
                    act = items[i][1]
                    if act == "end":
                        out.append(("if", branches, []))
                        break
                    if act.startswith("else if"):
                        cond = act[len("else if"):].strip()
                        continue
                    els, i = block(i + 1, ("end",))
                    out.append(("if", branches, els))
                    break
                i += 1
            elif head == "range":
                spec = val[len("range"):].strip()
                names, expr = [], spec
                if ":=" in spec:
                    left, expr = spec.split(":=", 1)
                    names = [n.strip() for n in left.split(",")]
                body, i = block(i + 1, ("end",))
                out.append(("range", names, expr.strip(), body))
                i += 1
            elif re.match(r"^\$\w+\s*:?=", val):
                name, op, expr = re.match(r"^(\$\w+)\s*(:?=)\s*(.*)$", val, re.S).groups()
                out.append(("set", name, expr, op == ":="))
                i += 1
            else:
                out.append(("out", val))
                i += 1
        return out, i

    tree, _ = block(0, ())
    return tree


def _truth(v) -> bool:
    return bool(v) if not isinstance(v, bool) else v


def _eval(expr: str, dot, scopes):
    tokens = _TOKEN.findall(expr)

    def operand(k):
        t = tokens[k]
        if t == "(":
            depth, j = 1, k + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[j], 0)
                j += 1
            return call(tokens[k + 1:j - 1]), j
        if t.startswith('"'):
            return bytes(t[1:-1], "utf-8").decode("unicode_escape"), k + 1
        if t in ("true", "false"):
            return t == "true", k + 1
        if t.isdigit():
            return int(t), k + 1
        if t.startswith("$"):
            name, _, field = t.partition(".")
            base = next(s[name] for s in reversed(scopes) if name in s) if name != "$" else scopes[0]["$"]
            return (base.get(field, "") if field else base), k + 1
        if t == ".":
            return dot, k + 1
        if t.startswith("."):
            return dot.get(t[1:], ""), k + 1
        raise ValueError(f"unsupported operand {t!r}")

    funcs = {
        "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "not": lambda a: not _truth(a),
        "and": lambda *a: next((x for x in a if not _truth(x)), a[-1]),
        "or": lambda *a: next((x for x in a if _truth(x)), a[-1]),
    }

    def call(toks):
        nonlocal tokens
        saved, tokens = tokens, toks
        try:
            if toks[0] in funcs:
                args, k = [], 1
                while k < len(toks):
                    v, k = operand(k)
                    args.append(v)
                return funcs[toks[0]](*args)
            v, _ = operand(0)
            return v
        finally:
            tokens = saved

    return call(tokens)


def _run(nodes, dot, scopes, out):
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "out":
            v = _eval(node[1], dot, scopes)
            out.append(str(v).lower() if isinstance(v, bool) else str(v))
        elif kind == "set":
            _, name, expr, declare = node
            v = _eval(expr, dot, scopes)
            target = scopes[-1] if declare else next(s for s in reversed(scopes) if name in s)
            target[name] = v
        elif kind == "if":
            for cond, body in node[1]:
                if _truth(_eval(cond, dot, scopes)):
                    scopes.append({})
                    _run(body, dot, scopes, out)
                    scopes.pop()
                    break
            else:
                scopes.append({})
                _run(node[2], dot, scopes, out)
                scopes.pop()
        elif kind == "range":
            _, names, expr, body = node
            for i, item in enumerate(_eval(expr, dot, scopes)):
                scope = {}
                if len(names) == 2:
                    scope[names[0]], scope[names[1]] = i, item
                elif len(names) == 1:
                    scope[names[0]] = item
                scopes.append(scope)
                _run(body, item, scopes, out)
                scopes.pop()


def go_render(template: str, messages: list[dict]) -> str:
    """Execute `template` the way Ollama does for a chat request with `messages`."""
    collated: list[dict] = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    data = {"System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"), "Messages": collated}
    out: list[str] = []
    _run(_parse(template), data, [{"$": data}], out)
    return "".join(out)


def test_the_go_subset_renders_like_go():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert go_render("x  {{- .System -}}  \n y", msgs) == "xSy"  # trim markers eat all surrounding whitespace
    assert go_render('{{ range $i, $m := .Messages }}{{ if $i }},{{ end }}{{ $m.Role }}{{ end }}', msgs) == \
        "system,user,assistant"
    assert go_render('{{ range .Messages }}{{ if eq .Role "user" }}U{{ else if ne .Role "system" }}A'
                     "{{ else }}S{{ end }}{{ end }}", msgs) == "SUA"
    assert go_render("{{ $f := true }}{{ range .Messages }}{{ if $f }}[{{ .Content }}]{{ $f = false }}{{ end }}{{ end }}",
                     msgs) == "[S]"  # `=` assigns the variable declared outside the range
    assert go_render('{{ if and .System (not .Missing) }}yes{{ end }}{{ if or .Missing "" }}no{{ end }}', msgs) == "yes"
    # consecutive messages of one role reach the template as one message, as in Ollama
    assert go_render("{{ range .Messages }}<{{ .Content }}>{{ end }}",
                     [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "<a\n\nb>"


# ----------------------------------------------------------------------------- TEMPLATE == Jinja

EOS = "</s>"
CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "What is 2+2?"}],
    "multi turn": [
        {"role": "user", "content": "Hi there."},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a colour.\nJust one."},
    ],
    "system + multi turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Bye?"},
    ],
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("case", sorted(CONVERSATIONS))
def test_ollama_template_renders_like_the_training_template(name, case):
    """Ollama adds BOS itself (the GGUF's add_bos_token), so the Jinja side renders with an empty BOS."""
    template = get_template(name)
    messages = CONVERSATIONS[case]
    if messages[0]["role"] == "system" and not template.supports_system:
        pytest.skip(f"{name} has no system turn")
    expected = template.render(messages, add_generation_prompt=True, bos_token="", eos_token=EOS)
    assert go_render(ollama_template(template, eos_token=EOS), messages) == expected


def test_qwen_default_system_and_llama31_header_come_through():
    msgs = [{"role": "user", "content": "Hi."}]
    qwen = go_render(ollama_template("qwen-2.5"), msgs)
    assert qwen.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    llama31 = go_render(ollama_template("llama-3.1"), msgs)
    assert "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>" in llama31


def test_modelfile_lines(tmp_path):
    text = modelfile_text("m.Q4_K_M.gguf", get_template("chatml"), eos_token="<|end_of_text|>",
                          system="You are a helpful assistant.", parameters={"temperature": 0.7})
    lines = text.splitlines()
    assert lines[0] == "FROM ./m.Q4_K_M.gguf"
    assert 'TEMPLATE """{{ range .Messages }}<|im_start|>{{ .Role }}' in text
    assert 'SYSTEM """You are a helpful assistant."""' in text
    stops = [line for line in lines if line.startswith("PARAMETER stop")]
    assert stops == ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|end_of_text|>"']
    assert "PARAMETER temperature 0.7" in lines
    llama3 = modelfile_text("m.gguf", "llama-3", eos_token="<|end_of_text|>")
    assert 'PARAMETER stop "<|eot_id|>"' in llama3 and "SYSTEM" not in llama3
    # the Go TEMPLATE must not write BOS: Ollama adds it from the GGUF
    assert "<|begin_of_text|>" not in llama3 and "bos" not in ollama_template("mistral", EOS).lower()
    path = write_modelfile(tmp_path / "Modelfile", "m.gguf", "phi-3", eos_token="<|endoftext|>")
    assert path.read_text() == modelfile_text("m.gguf", "phi-3", eos_token="<|endoftext|>")
    assert [p.name for p in tmp_path.iterdir()] == ["Modelfile"]  # no temporary file left


def test_modelfile_refuses_what_it_cannot_express():
    with pytest.raises(ModelfileError, match="eos_token"):
        ollama_template("alpaca")  # previous answers end with EOS: its text is needed
    with pytest.raises(ModelfileError, match="eos_token"):
        modelfile_text("m.gguf", "mistral")  # its only stop token is EOS
    with pytest.raises(ModelfileError, match='"""'):
        modelfile_text("m.gguf", "chatml", eos_token=EOS, system='say """hi"""')
