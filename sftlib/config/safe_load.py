"""YAML and JSON for configs, parsed so that no input can crash, hang or flood the process.

    from sftlib.config.safe_load import load_yaml, load_json, ParseError
    load_yaml("lora: {r: 16}")        # {"lora": {"r": 16}}
    load_yaml("a: 1\\na: 2")           # ParseError: line 2: the key `a` appears twice (first on line 1)

A config is small and flat, so the limits are far above any real one and far below harm: nesting
deeper than MAX_DEPTH (a JSON line 100,000 deep overflows the C stack of a parser), more than
MAX_ALIASES YAML aliases or an expansion over MAX_NODES values (450 bytes of nested aliases expand
to billions of values, and anything that walks or prints them never returns), a duplicate key (YAML
would keep the last one silently), a file over MAX_BYTES. Only the standard library and PyYAML.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

MAX_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_ALIASES = 32
MAX_NODES = 100_000


class ParseError(ValueError):
    """The text is not a config sftlib will read; the message says where and why, in one line."""


def nesting_depth(text: str, limit: int = MAX_DEPTH) -> int:
    """Depth of [ and { outside JSON strings, counted until it passes `limit` (then `limit + 1`)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def _check_size(text: str) -> None:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise ParseError(f"the text is over {MAX_BYTES // 1024} kB; a config is a few hundred lines at most")


def load_json(text: str) -> Any:
    """Parse a JSON config: duplicate keys, nesting deeper than MAX_DEPTH and huge texts are errors."""
    _check_size(text)
    if nesting_depth(text) > MAX_DEPTH:
        raise ParseError(f"the JSON nests values more than {MAX_DEPTH} levels deep; a config nests two or three")

    def pairs(items: list[tuple[str, Any]]) -> dict:
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen:
                raise ParseError(f"the JSON has the key `{key[:60]}` twice in one object; which one was meant?")
            seen[key] = value
        return seen

    try:
        return json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise ParseError(f"the JSON does not parse: line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:  # cannot happen below MAX_DEPTH; kept so that it never becomes a traceback
        raise ParseError(f"values nest more than {MAX_DEPTH} levels deep") from None


class _Loader(yaml.SafeLoader):
    """SafeLoader with bounded depth and aliases, and duplicate keys refused."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise ParseError(f"line {mark.line + 1}: more than {MAX_ALIASES} aliases (`*name`); a config needs "
                                 "none: write the values out")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ParseError(f"line {mark.line + 1}: values nest more than {MAX_DEPTH} levels deep; a config "
                                 "nests two or three")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise ParseError(f"line {key_node.start_mark.line + 1}: a key must be a plain value, "
                                 f"not a {type(key).__name__}") from None
            if key in first:
                raise ParseError(f"line {key_node.start_mark.line + 1}: the key `{str(key)[:60]}` appears twice "
                                 f"(first on line {first[key]}); YAML would keep only the last one")
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _count_nodes(value: Any, limit: int = MAX_NODES) -> int:
    """Values in `value`, counting shared ones each time they appear, stopping past `limit`."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        count += 1
        if count > limit:
            return count
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return count


def load_yaml(text: str) -> Any:
    """Parse a YAML config (safe types only): duplicate keys, deep nesting, alias bombs and huge texts are errors.
    yaml.YAMLError still escapes for text that is not YAML: the caller words it with its line and column."""
    _check_size(text)
    loader = _Loader(text)
    try:
        value = loader.get_single_data()
    finally:
        loader.dispose()
    if _count_nodes(value) > MAX_NODES:
        raise ParseError(f"the values expand to more than {MAX_NODES:,} items (aliases inside aliases?)")
    return value
