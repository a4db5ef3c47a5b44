"""`train.checkpoint_keep_layers`: with checkpointing on, that many decoder layers keep their activations instead
of recomputing them. Same loss and gradients; the kept layers run forward once per step, the others twice."""

from __future__ import annotations

import pytest
import torch

from sftlib.config import ConfigError, RunConfig
from sftlib.training.backend import Backend
from sftlib.training.lora import add_lora

CPU = Backend("cpu", "cpu", "test")


def _step(folder, gc: str, keep: int):
    """(loss, LoRA gradients, forward calls per decoder layer) of one training step through `add_lora`'s model."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    cfg = RunConfig.preset("cpu-demo", {"train.gradient_checkpointing": gc, "train.checkpoint_keep_layers": keep,
                                        "lora.train_embeddings": "never", "lora.dropout": 0.0})
    peft_model = add_lora(model, cfg, CPU)
    peft_model.train()
    layers = [m for m in peft_model.modules() if isinstance(m, GradientCheckpointingLayer)]
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    return out.loss.item(), grads, calls


@pytest.mark.parametrize("model", ["tiny_model_dir", "stories_dir"])
def test_kept_layers_run_once_and_the_gradients_do_not_change(request, model):
    folder = request.getfixturevalue(model)  # the tests' random Llama; the real pretrained stories260K
    from transformers import AutoConfig

    n = AutoConfig.from_pretrained(folder).num_hidden_layers
    keep = max(1, n // 2)
    loss_off, grads_off, calls_off = _step(folder, "false", 0)
    loss_all, grads_all, calls_all = _step(folder, "true", 0)
    loss_two, grads_two, calls_two = _step(folder, "true", keep)
    assert n >= 2 and calls_off == [1] * n and calls_all == [2] * n  # recomputation runs each layer again
    kept = [i for i, c in enumerate(calls_two) if c == 1]
    assert len(kept) == keep and sorted(calls_two) == [1] * keep + [2] * (n - keep)
    assert kept != list(range(keep))  # spread over the stack, not the first ones
    assert loss_two == pytest.approx(loss_off, rel=1e-6) and loss_all == pytest.approx(loss_off, rel=1e-6)
    assert grads_two.keys() == grads_off.keys() and any(g.abs().sum() > 0 for g in grads_off.values())
    for name, g in grads_off.items():
        torch.testing.assert_close(grads_two[name], g, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grads_all[name], g, rtol=1e-5, atol=1e-7)


def test_more_layers_than_the_model_has_keep_them_all(tiny_model_dir):
    _, _, calls = _step(tiny_model_dir, "true", 1000)
    assert calls == [1] * len(calls)


def test_without_checkpointing_the_setting_changes_nothing(tiny_model_dir):
    _, _, calls = _step(tiny_model_dir, "false", 3)
    assert calls == [1] * len(calls)


def test_a_negative_or_absurd_count_is_refused():
    with pytest.raises(ConfigError, match="checkpoint_keep_layers"):
        RunConfig.from_dict({"train": {"checkpoint_keep_layers": -1}})
    with pytest.raises(ConfigError, match="checkpoint_keep_layers"):
        RunConfig.from_dict({"train": {"checkpoint_keep_layers": 10 ** 9}})


@pytest.mark.parametrize("backend", ["unsloth", "hf"])
def test_the_estimate_grows_by_one_layer_of_activations_per_kept_layer(backend):
    from sftlib.training.memory import LLAMA_3_1_8B, estimate_memory

    def estimate(gc, keep):
        cfg = RunConfig.from_dict({"train": {"batch_size": 2, "grad_accum": 8, "gradient_checkpointing": gc,
                                             "checkpoint_keep_layers": keep}})
        return estimate_memory(cfg, LLAMA_3_1_8B, gpu="H100", backend=backend)

    gc = "unsloth" if backend == "unsloth" else "true"
    off, layers = estimate("false", 0), LLAMA_3_1_8B.layers
    runs = [estimate(gc, k) for k in (0, 8, 16, layers)]
    steps = [e.peak_gib for e in runs]
    assert steps[0] < steps[1] < steps[2] < steps[3]
    per_layer = (steps[2] - steps[1]) / 8
    assert (steps[1] - steps[0]) / 8 == pytest.approx(per_layer, rel=0.05)
    assert 0.1 < per_layer < 1.0  # GiB per layer for 2 x 2048 tokens of Llama-3.1-8B
    # every layer kept: the activations of no checkpointing, give or take what checkpointing keeps besides
    assert runs[-1].peak_gib == pytest.approx(off.peak_gib, rel=0.05)
    assert estimate(gc, 10 * layers).peak_gib == runs[-1].peak_gib
    seconds = [e.step_seconds for e in runs]
    assert seconds[0] > seconds[1] > seconds[2] > seconds[3] == pytest.approx(off.step_seconds)
    assert any("not recomputed" in name for name in runs[1].parts) and not any("recomputed" in n for n in off.parts)
