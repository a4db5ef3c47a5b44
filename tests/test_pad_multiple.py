"""Packed micro-batches rounded up to a multiple of 8 tokens (aligned matmuls on a GPU): same losses.

    pytest tests/test_pad_multiple.py -q
"""

from __future__ import annotations

import json

import pytest

from sftlib.config import RunConfig
from sftlib.training.backend import Backend
from sftlib.training.trainer import PAD_MULTIPLE, pad_multiple, sft_config

CPU = Backend("cpu", "cpu", "test")


def test_on_by_default_on_a_gpu_with_packing_only(monkeypatch):
    monkeypatch.delenv("SFTLIB_PAD_MULTIPLE", raising=False)
    assert pad_multiple(True, True) == PAD_MULTIPLE == 8
    assert pad_multiple(True, False) is None      # the CPU gains nothing from it
    assert pad_multiple(False, True) is None      # unpacked rows are padded by the collator anyway
    monkeypatch.setenv("SFTLIB_PAD_MULTIPLE", "0")
    assert pad_multiple(True, True) is None
    monkeypatch.setenv("SFTLIB_PAD_MULTIPLE", "64")
    assert pad_multiple(True, False) == 64 and pad_multiple(False, False) is None
    assert sft_config(RunConfig.preset("cpu-demo"), CPU).pad_to_multiple_of == 64
    monkeypatch.setenv("SFTLIB_PAD_MULTIPLE", "eight")
    with pytest.raises(ValueError, match="SFTLIB_PAD_MULTIPLE must be a whole number"):
        pad_multiple(True, True)


def _own_data(path):
    with path.open("w") as f:
        for i in range(48):  # lengths that do not add up to multiples of 64
            words = " ".join(["word"] * (1 + i % 7))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Say {i} {words}"},
                                             {"role": "assistant", "content": f"{words} {i}."}]}) + "\n")
    return path


def _train(model_dir, data, tmp_path, name, monkeypatch, multiple):
    from conftest import with_lora
    from sftlib.training.trainer import train

    monkeypatch.setenv("SFTLIB_PAD_MULTIPLE", str(multiple))
    cfg = RunConfig.preset("cpu-demo").with_overrides({
        "model.name": str(model_dir), "data.source": str(data), "data.eval_size": 0,
        "model.max_seq_length": 128, "train.packing": True, "train.max_steps": 4, "train.logging_steps": 1,
        "train.batch_size": 2, "train.grad_accum": 1, "train.save_steps": 0, "train.learning_rate": 1e-2,
        "train.output_dir": str(tmp_path / name),
    })
    model, tokenizer, _, rows, backend = with_lora(cfg)
    lengths, pads = [], []

    def seen(module, args, kwargs):  # what the model is called with, as the trainer calls it
        ids = kwargs["input_ids"]
        lengths.append(ids.shape[1])
        pads.append(int((ids == tokenizer.pad_token_id).sum()))

    handle = model.register_forward_pre_hook(seen, with_kwargs=True)
    try:
        result = train(cfg, model, tokenizer, rows, backend=backend)
    finally:
        handle.remove()
    return [loss for _, loss in result.losses], lengths, pads


@pytest.mark.parametrize("material", ["ours", "real"])
def test_padding_the_packed_row_changes_no_loss(material, tmp_path, monkeypatch, request):
    """On the tests' own model and data, and on the real pretrained stories260K (SentencePiece, tied embeddings)
    with a public chat dataset (OpenAI messages with system turns)."""
    from conftest import SHARED_FIXTURES

    if material == "ours":
        model_dir, data = request.getfixturevalue("tiny_model_dir"), _own_data(tmp_path / "own.jsonl")
    else:
        model_dir = request.getfixturevalue("stories_dir")
        data = SHARED_FIXTURES / "datasets" / "pirate_openai_messages.jsonl"
    plain_losses, plain_lengths, plain_pads = _train(model_dir, data, tmp_path, "plain", monkeypatch, 0)
    padded_losses, padded_lengths, padded_pads = _train(model_dir, data, tmp_path, "padded", monkeypatch, 64)
    assert any(n % 64 for n in plain_lengths), plain_lengths  # the unpadded rows were not aligned already
    assert all(n % 64 == 0 for n in padded_lengths), padded_lengths
    assert sum(plain_pads) == 0 and sum(padded_pads) > 0
    assert len(padded_losses) == len(plain_losses) == 4
    assert padded_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-6)
