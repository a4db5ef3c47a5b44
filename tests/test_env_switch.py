"""sftlib's on/off environment variables (sftlib.training.env_switch): one reading for all of them."""

from __future__ import annotations

import pytest

from sftlib.training import env_switch, packed_attention


@pytest.mark.parametrize("raw,want", [("1", True), ("on", True), (" Yes ", True), ("TRUE", True), ("0", False),
                                      ("off", False), ("No", False), ("false", False)])
def test_values(monkeypatch, raw, want):
    monkeypatch.setenv("SFTLIB_SOME_SWITCH", raw)
    assert env_switch("SFTLIB_SOME_SWITCH", not want) is want


def test_unset_or_empty_gives_the_default_and_anything_else_is_an_error(monkeypatch):
    monkeypatch.delenv("SFTLIB_SOME_SWITCH", raising=False)
    assert env_switch("SFTLIB_SOME_SWITCH", True) is True and env_switch("SFTLIB_SOME_SWITCH", False) is False
    monkeypatch.setenv("SFTLIB_SOME_SWITCH", "")
    assert env_switch("SFTLIB_SOME_SWITCH", True) is True
    monkeypatch.setenv("SFTLIB_SOME_SWITCH", "2")
    with pytest.raises(ValueError, match="SFTLIB_SOME_SWITCH must be 0 or 1, got '2'"):
        env_switch("SFTLIB_SOME_SWITCH", True)


def test_packed_attention_refuses_a_bad_value_and_can_be_asked_again(monkeypatch):
    monkeypatch.setattr(packed_attention, "_DONE", False)
    monkeypatch.setattr(packed_attention, "_NOTE", None)
    monkeypatch.setenv("SFTLIB_PACKED_VARLEN", "sometimes")  # used to count as on
    with pytest.raises(ValueError, match="SFTLIB_PACKED_VARLEN must be 0 or 1"):
        packed_attention.enable()
    assert not packed_attention._DONE  # nothing decided: fixing the variable and calling again works
    monkeypatch.setenv("SFTLIB_PACKED_VARLEN", "0")
    assert packed_attention.enable() is None and packed_attention._DONE  # decided now: off
