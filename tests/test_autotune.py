"""Automatic checkpointing and micro-batch (sftlib/autotune.py): the choice for each memory budget.

    pytest tests/test_autotune.py -q

The GPU numbers are those of Llama-3.1-8B in 4-bit on 139, 40 and 15 GiB; the end-to-end check on
a real GPU is benchmarks/gpu_bench.py (sftlib:auto, sftlib:auto-40GiB, sftlib:auto-15GiB).
"""

from __future__ import annotations

import pytest

from sftlib.training import autotune
from sftlib.training.autotune import GiB, ModelDims, plan
from sftlib.config import ConfigError, RunConfig

LLAMA_8B = ModelDims(layers=32, hidden=4096, intermediate=14336, vocab=128256)
WEIGHTS_8B = 5.7 * GiB  # NF4 weights, bf16 embeddings and LM head, LoRA states


def _plan(budget_gib, checkpointing="auto", auto_batch=True, batch=8, accum=2, backend="unsloth", seq=2048,
          model=autotune.MEASURED, static=WEIGHTS_8B, keep=0):
    return plan(budget_bytes=budget_gib * GiB, static_bytes=static, dims=LLAMA_8B, seq_len=seq,
                batch_size=batch, grad_accum=accum, checkpointing=checkpointing, auto_batch=auto_batch,
                backend=backend, model=model, keep_layers=keep)


def test_large_gpu_turns_checkpointing_off_and_keeps_the_effective_batch():
    p = _plan(139)
    assert (p.gradient_checkpointing, p.batch_size, p.grad_accum) == ("false", 8, 2)
    assert p.fits and p.estimated_peak_gib < 139


def test_micro_batch_is_capped_at_16k_tokens_even_when_more_fits():
    p = _plan(139, batch=16, accum=1)  # 16 x 2048 would fit in 139 GiB, but measured slower
    assert (p.batch_size, p.grad_accum) == (8, 2)


def test_40_gib_keeps_checkpointing_off_with_a_smaller_micro_batch():
    p = _plan(40)
    assert p.gradient_checkpointing == "false"
    assert p.batch_size * p.grad_accum == 16 and p.batch_size < 8
    assert p.estimated_peak_gib <= 40 * (1 - autotune.MEASURED.margin) - autotune.MEASURED.reserve_gib


def test_15_gib_needs_offloaded_checkpointing_on_unsloth_and_plain_checkpointing_on_hf():
    p = _plan(15)  # Unsloth's own packed attention (a T4 has no flash kernel): one row does not fit
    assert p.gradient_checkpointing == "unsloth" and p.batch_size * p.grad_accum == 16
    assert _plan(15, backend="hf").gradient_checkpointing == "true"


def test_15_gib_with_the_packed_kernel_estimates_one_row_as_measured_and_keeps_recomputation_first():
    """Measured under a 15 GiB cap (H100): 1 x 16 without checkpointing peaked at 13.59 GiB over 5.50 held; its speed
    was 1.17x recomputation's in one run and unsettled in another, so recomputation still comes first."""
    one_row = _plan(15, model=autotune.PACKED_KERNEL, static=5.50 * GiB, checkpointing="false")
    assert one_row.batch_size == 1
    assert one_row.estimated_peak_gib == pytest.approx(13.59, abs=0.05)  # the measured peak
    p = _plan(15, model=autotune.PACKED_KERNEL, static=5.50 * GiB)
    assert (p.gradient_checkpointing, p.batch_size, p.grad_accum) == ("unsloth", 8, 2)
    assert [c[:2] for c in p.candidates] == [("false", 8), ("false", 4), ("false", 2), ("false", 16), ("unsloth", 8)]


def test_micro_batches_under_4096_tokens_come_after_recomputation():
    # 512-token rows under 11 GiB: one row without recomputation would fit, but micro-batches that small come after
    # recomputation
    p = _plan(11, seq=512, model=autotune.PACKED_KERNEL, static=5.50 * GiB)
    assert (p.gradient_checkpointing, p.batch_size) == ("unsloth", 16), p.candidates
    assert [c[:2] for c in p.candidates] == [("false", 16), ("false", 8), ("unsloth", 16)]
    one_row = _plan(11, seq=512, model=autotune.PACKED_KERNEL, static=5.50 * GiB, checkpointing="false")
    assert one_row.fits and one_row.batch_size == 1  # what the old order would have taken


def test_40_gib_with_the_packed_kernel_takes_four_rows():
    p = _plan(40, model=autotune.PACKED_KERNEL, static=5.50 * GiB)
    assert (p.gradient_checkpointing, p.batch_size, p.grad_accum) == ("false", 4, 4)
    assert p.estimated_peak_gib < 40 * (1 - autotune.PACKED_KERNEL.margin) - autotune.PACKED_KERNEL.reserve_gib


def test_the_estimate_grows_with_the_micro_batch_and_falls_with_checkpointing():
    off = [autotune.activation_bytes_per_token(LLAMA_8B, "false")]
    on = autotune.activation_bytes_per_token(LLAMA_8B, "unsloth")
    plain = autotune.activation_bytes_per_token(LLAMA_8B, "true")
    assert on < plain < off[0]
    assert autotune.activation_bytes_per_token(LLAMA_8B, "false", backend="hf") > off[0]  # full logits


def test_fixed_settings_are_respected():
    p = _plan(139, checkpointing="unsloth", auto_batch=False)
    assert (p.gradient_checkpointing, p.batch_size, p.grad_accum) == ("unsloth", 8, 2)
    p = _plan(40, checkpointing="auto", auto_batch=False)  # batch 8 fixed: only checkpointing may change
    assert (p.gradient_checkpointing, p.batch_size) == ("unsloth", 8)


def test_nothing_fits_says_so_and_takes_the_smallest_setting():
    p = _plan(6)
    assert not p.fits and p.batch_size == 1 and p.gradient_checkpointing == "unsloth"
    assert p.batch_size * p.grad_accum == 16
    cfg = RunConfig()
    with pytest.warns(UserWarning, match="may run out of GPU memory"):
        notes = autotune.apply(cfg, p)
    assert cfg.train.batch_size == 1 and cfg.train.grad_accum == 16 and len(notes) == 2  # checkpointing was already `unsloth`
    assert cfg.sources["train.batch_size"] == "auto"


def test_config_accepts_auto_and_the_gpu_auto_preset():
    cfg = RunConfig.from_dict({"train": {"gradient_checkpointing": "auto", "auto_batch": "true"}})
    assert cfg.train.gradient_checkpointing == "auto" and cfg.train.auto_batch is True
    cfg = RunConfig.preset("gpu-auto")
    assert cfg.train.gradient_checkpointing == "auto" and cfg.train.auto_batch
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        RunConfig.from_dict({"train": {"gradient_checkpointing": "sometimes"}})


def test_add_lora_on_the_cpu_resolves_auto_without_touching_the_batch(tiny):
    from sftlib.training.backend import Backend
    from sftlib.training.lora import add_lora

    model, _ = tiny
    cfg = RunConfig.preset("cpu-demo", {"train.gradient_checkpointing": "auto", "train.auto_batch": True})
    peft_model = add_lora(model, cfg, Backend("cpu", "cpu", "test"))
    assert cfg.train.gradient_checkpointing == "false" and cfg.train.batch_size == 8
    assert peft_model.sftlib_plan is not None and "no GPU" in str(peft_model.sftlib_plan)


def test_layers_kept_out_of_recomputation_are_planned_for():
    """`train.checkpoint_keep_layers` with `auto`: the kept layers' activations count, so the plan does not take eight
    rows that fit only when every layer recomputes. Measured (H100, 15 GiB cap, packed kernel): 2 x 2048 tokens with
    16 of 32 layers kept peaked at 13.18 GiB over 5.50 held."""
    measured = _plan(15, model=autotune.PACKED_KERNEL, static=5.50 * GiB, checkpointing="unsloth", auto_batch=False,
                     batch=2, accum=8, keep=16)
    assert measured.estimated_peak_gib == pytest.approx(13.18, rel=0.1)
    assert _plan(15, model=autotune.PACKED_KERNEL, static=5.50 * GiB).batch_size == 8  # nothing kept: 8 x 2
    p = _plan(15, model=autotune.PACKED_KERNEL, static=5.50 * GiB, keep=16)
    assert p.fits and p.gradient_checkpointing == "unsloth" and p.batch_size < 8 and p.batch_size * p.grad_accum == 16
    assert ("unsloth", 8, False) in [(c[0], c[1], c[3]) for c in p.candidates]
    assert p.estimated_peak_gib <= 15 * (1 - autotune.PACKED_KERNEL.margin) - autotune.PACKED_KERNEL.reserve_gib
    assert autotune.activation_bytes_per_token(LLAMA_8B, "unsloth", keep_layers=10 ** 6) == \
        autotune.activation_bytes_per_token(LLAMA_8B, "unsloth", keep_layers=32)
