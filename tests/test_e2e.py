"""End to end on a tiny model, on the CPU: train, save, reload, merge, and the demo as a user runs it.

    pytest tests/test_e2e.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sftlib.config import RunConfig

REPO = Path(__file__).resolve().parents[1]


def _write_chat_data(path: Path, n: int = 64) -> Path:
    """A toy task a 2-layer random model memorises in a few dozen steps: one answer, asked in two ways.
    (Learning to generalise is the demo's job, tested below.)"""
    pairs = [("Which colour is the sky?", "The colour is blue."), ("What colour is the sky?", "The colour is blue.")]
    with path.open("w") as f:
        for i in range(n):
            question, answer = pairs[i % 2]
            f.write(json.dumps({"conversations": [{"from": "human", "value": question},
                                                  {"from": "gpt", "value": answer}]}) + "\n")
    return path


@pytest.fixture()
def trained(tiny_model_dir, tmp_path):
    """Run the pipeline pieces once and keep what the assertions need."""
    from conftest import with_lora
    from sftlib.training.trainer import train

    data = _write_chat_data(tmp_path / "chat.jsonl")
    cfg = RunConfig.preset("cpu-demo").with_overrides({
        "model.name": str(tiny_model_dir), "data.source": str(data), "data.eval_size": 0,
        "train.max_steps": 40, "train.logging_steps": 1, "train.warmup_steps": 2, "train.batch_size": 4,
        "train.learning_rate": 1e-2,
        "train.output_dir": str(tmp_path / "out"), "export.output_dir": str(tmp_path / "model"),
    })
    model, tokenizer, template, rows, backend = with_lora(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(cfg, model, tokenizer, rows, backend=backend)
    return dict(cfg=cfg, model=model, tokenizer=tokenizer, template=template, before=before, result=result,
                rows=rows, tmp=tmp_path)


def test_training_learns_and_touches_only_lora(trained):
    result, model, before = trained["result"], trained["model"], trained["before"]
    assert result.steps == 40
    first = sum(loss for _, loss in result.losses[:3]) / 3
    last = sum(loss for _, loss in result.losses[-3:]) / 3
    assert last < 0.5 * first, result.losses
    assert result.tokens_seen > 0 and result.tokens_per_s > 0 and result.peak_memory_gib > 0
    changed_lora = changed_base = 0
    for name, p in model.named_parameters():
        moved = not torch.equal(p.detach(), before[name])
        if "lora_" in name or "modules_to_save" in name:
            changed_lora += moved
        else:
            assert not moved, f"base weight {name} changed"
            changed_base += moved
    assert changed_lora > 0 and changed_base == 0


def test_generation_stops_at_end_of_turn(trained):
    from sftlib.infer import chat

    reply = chat(trained["model"], trained["tokenizer"], trained["template"],
                 [{"role": "user", "content": "Which colour is the sky?"}], max_new_tokens=20)
    assert reply.stopped, reply
    assert reply.text == "The colour is blue."


def test_adapters_reload_and_merge_give_the_same_logits(trained):
    from sftlib.exports.merged import load_adapters, save_adapters, save_merged
    from transformers import AutoModelForCausalLM

    cfg, model, tokenizer, tmp = trained["cfg"], trained["model"], trained["tokenizer"], trained["tmp"]
    ids = torch.tensor([trained["rows"][0]["input_ids"]])
    model.eval()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    lora_dir = save_adapters(model, tokenizer, tmp / "model" / "lora")
    reloaded, tok2 = load_adapters(cfg.model.name, lora_dir)
    assert len(tok2) == len(tokenizer) and tok2.chat_template == tokenizer.chat_template
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, reference, atol=1e-5, rtol=0)
    # float32 merge: equal up to float rounding
    merged32 = save_merged(cfg.model.name, lora_dir, tmp / "model" / "merged32", dtype="float32")
    m32 = AutoModelForCausalLM.from_pretrained(merged32)
    with torch.no_grad():
        torch.testing.assert_close(m32(input_ids=ids).logits, reference, atol=1e-4, rtol=0)
    # bf16 merge, what `merged_16bit` writes: 8 bits of mantissa, so compare loosely and by argmax
    merged16 = save_merged(cfg.model.name, lora_dir, tmp / "model" / "merged_16bit")
    m16 = AutoModelForCausalLM.from_pretrained(merged16)
    assert m16.dtype == torch.bfloat16
    with torch.no_grad():
        logits16 = m16(input_ids=ids).logits.float()
    assert (logits16 - reference).abs().max() < 0.25
    assert (logits16.argmax(-1) == reference.argmax(-1)).float().mean() > 0.95
    # the merged folder carries the template's stop tokens for plain transformers users
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in list(m16.generation_config.eos_token_id)
    assert not any(p.name.startswith(".") for p in (tmp / "model").iterdir())  # no temporary folders left


def test_only_new_token_rows_train_and_survive_save_and_merge(tiny_model_dir, tmp_path):
    """`lora.train_embeddings: auto` trains just the added tokens' rows; reload and merge keep them."""
    from transformers import AutoModelForCausalLM

    from sftlib.training.backend import choose_backend
    from sftlib.data import load_dataset
    from sftlib.data import encode_dataset
    from sftlib.exports.merged import load_adapters, save_adapters, save_merged
    from sftlib.training.lora import add_lora, trainable_parameters
    from sftlib.training.model import load_model
    from sftlib.training.tokenizer import prepare_tokenizer
    from sftlib.data.templates import get_template
    from sftlib.training.trainer import train

    cfg = RunConfig.preset("cpu-demo").with_overrides({
        "model.name": str(tiny_model_dir), "data.source": str(_write_chat_data(tmp_path / "c.jsonl", 16)),
        "data.eval_size": 0, "lora.train_embeddings": "auto", "train.max_steps": 6, "train.learning_rate": 1e-2,
        "train.warmup_steps": 0, "train.output_dir": str(tmp_path / "out"), "train.save_steps": 3,
    })
    backend = choose_backend("cpu")
    template = get_template("chatml")
    model, tokenizer = load_model(cfg, backend)
    info = prepare_tokenizer(model, tokenizer, template)
    base_embed = model.get_input_embeddings().weight.detach().clone()
    rows = encode_dataset(load_dataset(cfg.data)[0], tokenizer, template, max_length=128)
    model = add_lora(model, cfg, backend, info)
    train(cfg, model, tokenizer, rows, backend=backend)
    ids = torch.tensor([rows[0]["input_ids"]])
    model.eval()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    lora_dir = save_adapters(model, tokenizer, tmp_path / "lora")
    # only LoRA matrices and the trained rows are saved, of the input embeddings and of the untied head:
    # not the resized matrices PEFT would write whole
    from safetensors.torch import load_file

    saved = load_file(lora_dir / "adapter_model.safetensors")
    rows = info.rows_to_train
    assert set(info.added_token_ids) <= set(rows) and set(info.new_row_ids) <= set(rows)
    others = {k: v.shape for k, v in saved.items() if "lora_" not in k}
    assert {k.split(".")[-3] for k in others} == {"embed_tokens", "lm_head"} and \
        all(shape == (len(rows), 64) for shape in others.values()), others
    assert sum(v.numel() for v in saved.values()) == sum(trainable_parameters(model).values())
    checkpoint = load_file(tmp_path / "out" / "checkpoint-6" / "adapter_model.safetensors")  # checkpoints too
    assert {k: v.shape for k, v in checkpoint.items()} == {k: v.shape for k, v in saved.items()}
    reloaded, _ = load_adapters(cfg.model.name, lora_dir)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, reference, atol=1e-5, rtol=0)
    # adapters loaded back and saved again (04_export does) stay rows: PEFT alone would add both matrices whole
    again = load_file(save_adapters(reloaded, tokenizer, tmp_path / "lora-again") / "adapter_model.safetensors")
    assert {k: v.shape for k, v in again.items()} == {k: v.shape for k, v in saved.items()}
    merged = AutoModelForCausalLM.from_pretrained(save_merged(cfg.model.name, lora_dir, tmp_path / "m", dtype="float32"))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reference, atol=1e-4, rtol=0)
    old = base_embed.shape[0]
    changed = (merged.get_input_embeddings().weight[:old] - base_embed[:old]).abs().amax(dim=1) > 0
    assert sorted(changed.nonzero().flatten().tolist()) == [r for r in rows if r < old]


def test_demo_runs_as_a_user_runs_it(tmp_path):
    """`python -m sftlib demo` end to end, in a fresh process, offline."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", SFTLIB_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "sftlib", "demo", "--output", str(out), "--samples", "30"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "demo summary" in proc.stdout
    result = json.loads((out / "run_result.json").read_text())
    assert result["after"]["loss"] < 0.5 * result["before"]["loss"]
    assert result["accuracy_before"] < 0.2 and result["accuracy_after"] >= 0.9
    assert (out / "model" / "lora" / "adapter_model.safetensors").exists()
    assert (out / "model" / "merged_16bit" / "model.safetensors").exists()
    card = (out / "model" / "README.md").read_text()
    for piece in ("chat template: `chatml`", "`<|im_end|>`", "source `demo`", "| loss |", "| lora |",
                  "| merged_16bit |", "```yaml", "transformers 5."):
        assert piece in card, piece
    assert f"{result['after']['loss']:.4f}" in card

    # then every export format of the demo model, as a user would ask for them, each checked
    formats = "lora,merged_16bit,merged_4bit,gguf:f16,gguf:q8_0,gguf:q4_k_m"
    proc = subprocess.run([sys.executable, "-m", "sftlib", "export", "--preset", "cpu-demo", "--model",
                           str(out / "model" / "lora"), "--formats", formats, "--out", str(tmp_path / "exported")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "exported" / "export_report.json").read_text())
    assert [(i["format"], i["ok"]) for i in report["items"]] == [(f, True) for f in formats.split(",")]
    for item in report["items"]:  # the demo model answers the held-out prompts and stops: so must every file
        assert item["check"]["stop_expected"] == item["check"]["stopped"] == 3, item
    for line in ("lora", "merged_4bit", "sftlib-demo-sft.Q4_K_M.gguf"):
        assert line in proc.stdout
