"""The GPU path end to end: the unsloth backend and the hf backend on a real CUDA GPU.

    pytest -m gpu tests/test_gpu.py -q                 # skipped without CUDA
    python benchmarks/gpu_tests_report.py              # runs them and writes benchmarks/results/gpu_tests.md

The model is the real Llama-3.1-8B config with random weights and 2 layers instead of 32 (same
widths, same 128,256-token vocabulary, same RoPE scaling), built by benchmarks/make_model.py; set
SFTLIB_GPU_MODEL to a folder it wrote to use another (e.g. all 32 layers). Each backend runs in its
own process because Unsloth patches transformers, TRL and PEFT when it is imported.

Each run: load in 4-bit, fit the tokenizer to ChatML (new tokens: embeddings trained), LoRA, SFT with
packing on the bundled demo data, held-out loss before and after, a streamed reply, adapters saved,
a merged 16-bit model rebuilt from the 16-bit base, and a merged 4-bit model, all through
sftlib.export (which loads each back and checks it); the test checks them again its own way. The scenario prints one JSON line the tests (and the report) read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")


# ---- the scenario, run in a fresh process: python tests/test_gpu.py BACKEND MODEL_DIR OUT_DIR ----------


def _logits_agree(a, b) -> float:
    """Cosine similarity of two logit tensors, flattened (1.0 = same direction)."""
    import torch

    a, b = a.float().flatten(), b.float().flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _trained_embedding_parts(model) -> dict:
    """What was trained besides LoRA: whole embedding/head copies (PEFT's modules_to_save) and trainable-token
    rows, with how far each row set moved from the rows it started from."""
    out = {"whole": sorted(n for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n),
           "rows": {}}
    for name, module in model.named_modules():
        deltas = getattr(module, "trainable_tokens_delta", None)
        if deltas is not None and "default" in deltas:
            start = module.trainable_tokens_original["default"].float()
            out["rows"][name] = {"shape": list(deltas["default"].shape), "dtype": str(deltas["default"].dtype),
                                 "moved": float((deltas["default"].detach().float() - start).abs().max())}
    return out


def scenario(backend_name: str, model_dir: str, out_dir: str) -> dict:
    import io
    import time

    from sftlib.training.backend import choose_backend  # first: imports Unsloth before transformers

    backend = choose_backend(backend_name)
    import torch

    from sftlib.config import RunConfig
    from sftlib.steps import run

    out = Path(out_dir)
    cfg = RunConfig.from_dict({
        "backend": backend_name,
        "model": {"name": model_dir, "max_seq_length": 512, "chat_template": "chatml", "dtype": "bfloat16"},
        "data": {"source": "demo", "eval_size": 16, "max_rows": 400},
        "train": {"max_steps": 30, "batch_size": 4, "grad_accum": 1, "learning_rate": 2e-3, "warmup_steps": 3,
                  "logging_steps": 5, "save_steps": 15, "gradient_checkpointing": "auto", "auto_batch": True,
                  "output_dir": str(out / "train")},
        "export": {"formats": ["lora", "merged_16bit", "merged_4bit"], "output_dir": str(out / "model")},
    })
    if hasattr(cfg.train, "resume"):
        cfg.train.resume = "never"
    report = {"backend": str(backend), "gpu": torch.cuda.get_device_name(0)}
    start = time.perf_counter()
    result = run(cfg, log=lambda s: print(s, flush=True))
    report.update(seconds_pipeline=round(time.perf_counter() - start, 1), backend_used=result.backend,
                  added_tokens=result.added_tokens, loss_before=result.before.get("loss"),
                  loss_after=result.after.get("loss"), train=result.train, outputs=result.outputs,
                  plan=str(getattr(result.model, "sftlib_plan", None)),
                  gradient_checkpointing=cfg.train.gradient_checkpointing,
                  batch=f"{cfg.train.batch_size} x {cfg.train.grad_accum}")
    model, tokenizer, template = result.model, result.tokenizer, result.template_obj
    report["trained"] = _trained_embedding_parts(model)
    report["four_bit_layers"] = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")

    # streaming generation: what is printed is the reply
    from sftlib.infer import chat

    if backend_name == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    printed = io.StringIO()
    messages = [{"role": "user", "content": "Classify the sentiment of this review: The coffee is great."}]
    reply = chat(model, tokenizer, template, messages, max_new_tokens=24, stream=True, out=printed)
    report["reply"] = {"text": reply.text, "stopped": reply.stopped, "new_tokens": reply.new_tokens,
                       "printed": printed.getvalue()}

    # reference logits of the trained (4-bit base + adapters) model on one prompt
    ids = torch.tensor([tokenizer("The review is positive.")["input_ids"]], device="cuda")
    with torch.no_grad():
        trained_logits = model(input_ids=ids).logits.float().cpu()
    del model, result
    torch.cuda.empty_cache()

    # the adapters and the merged 16-bit model load back in plain transformers / PEFT
    from transformers import AutoModelForCausalLM

    from sftlib.exports.merged import load_adapters

    lora, merged16 = Path(report["outputs"]["lora"]), Path(report["outputs"]["merged_16bit"])
    peft_model, _ = load_adapters(model_dir, lora, dtype="bfloat16", device="cuda")
    with torch.no_grad():
        adapter_logits = peft_model(input_ids=ids).logits.float().cpu()
    del peft_model
    m16 = AutoModelForCausalLM.from_pretrained(merged16, dtype=torch.bfloat16, device_map={"": 0})
    with torch.no_grad():
        merged_logits = m16(input_ids=ids).logits.float().cpu()
    del m16
    report["cos_adapters_vs_trained"] = _logits_agree(adapter_logits, trained_logits)
    report["cos_merged16_vs_adapters"] = _logits_agree(merged_logits, adapter_logits)

    # merged 4-bit: written and checked by sftlib.export inside the run (its report is read below)
    merged4 = Path(report["outputs"]["merged_4bit"])
    m4 = AutoModelForCausalLM.from_pretrained(merged4, device_map={"": 0})
    report["merged_4bit_layers"] = sum(1 for m in m4.modules() if type(m).__name__ == "Linear4bit")
    with torch.no_grad():
        m4_logits = m4(input_ids=ids).logits.float().cpu()
    report["cos_merged4_vs_merged16"] = _logits_agree(m4_logits, merged_logits)
    report["sizes_gib"] = {p.name: round(sum(f.stat().st_size for f in p.glob("*.safetensors")) / 2 ** 30, 3)
                           for p in (lora, merged16, merged4)}
    report["checkpoint_sizes_gib"] = {p.name: round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2 ** 30, 3)
                                      for p in sorted((out / "train").glob("checkpoint-*"))}
    export = json.loads(Path(report["outputs"]["export_report"]).read_text())
    report["export"] = [{k: item[k] for k in ("format", "bytes", "seconds", "ok", "summary")} for item in export["items"]]
    report["seconds_total"] = round(time.perf_counter() - start, 1)
    return report


def _run_scenario(backend: str, tmp_path: Path) -> dict:
    model = os.environ.get("SFTLIB_GPU_MODEL")
    if not model:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from make_model import write_model

        model = str(write_model(Path(os.environ.get("SFTLIB_GPU_MODEL_CACHE", tmp_path / "llama-2l")), layers=2))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, __file__, backend, model, str(tmp_path / backend)],
                          capture_output=True, text=True, env=env, timeout=900)
    log = proc.stdout + proc.stderr
    report_dir = os.environ.get("SFTLIB_GPU_REPORT_DIR")
    if report_dir:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        (Path(report_dir) / f"gpu-{backend}.log").write_text(log[-100_000:])
    rows = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and rows, f"the {backend} scenario failed:\n{log[-6000:]}"
    report = json.loads(rows[-1])
    if report_dir:
        (Path(report_dir) / f"gpu-{backend}.json").write_text(json.dumps(report, indent=2))
    return report


def _check(report: dict, backend: str) -> None:
    assert report["backend_used"] == backend
    assert report["four_bit_layers"] > 0, "the base was not loaded in 4-bit"
    assert report["added_tokens"], "ChatML tokens should have been added to the Llama 3 vocabulary"
    assert report["loss_after"] < report["loss_before"] - 0.5, (report["loss_before"], report["loss_after"])
    assert report["train"]["steps"] == 30
    reply = report["reply"]
    assert reply["new_tokens"] > 0
    assert reply["printed"].strip() == reply["text"].strip(), "the streamed text differs from the reply"
    # the trained model has a 4-bit base, the reloaded one a 16-bit base: close, not equal
    assert report["cos_adapters_vs_trained"] > 0.95, "reloaded adapters do not reproduce the trained model"
    assert report["cos_merged16_vs_adapters"] > 0.999, "the merged 16-bit model differs from base + adapters"
    assert report["merged_4bit_layers"] > 0
    assert [(e["format"], e["ok"]) for e in report["export"]] == \
        [("lora", True), ("merged_16bit", True), ("merged_4bit", True)], report["export"]
    assert report["cos_merged4_vs_merged16"] > 0.9, "the merged 4-bit model is far from the merged 16-bit one"
    # only the new tokens' rows are trained and saved, on every backend: no whole embedding or head copy
    trained = report["trained"]
    assert not trained["whole"], trained
    assert trained["rows"] and all(r["shape"][0] == len(report["added_tokens"]) and r["moved"] > 0
                                   for r in trained["rows"].values()), trained
    assert report["sizes_gib"]["lora"] < 0.05, report["sizes_gib"]  # LoRA of 2 layers + 2 rows; whole: 2+ GiB
    assert report["checkpoint_sizes_gib"] and max(report["checkpoint_sizes_gib"].values()) < 0.1, \
        report["checkpoint_sizes_gib"]


@needs_cuda
def test_unsloth_backend_end_to_end(tmp_path):
    pytest.importorskip("unsloth")
    _check(_run_scenario("unsloth", tmp_path), "unsloth")


@needs_cuda
def test_hf_backend_end_to_end(tmp_path):
    pytest.importorskip("bitsandbytes")
    _check(_run_scenario("hf", tmp_path), "hf")


@needs_cuda
def test_packed_attention_matches_per_document_sdpa():
    """sftlib's varlen call for Unsloth's packed rows: outputs and gradients as per-document SDPA gives them."""
    import torch

    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        pytest.skip("this torch build has no flash-attention kernel")
    from sftlib.training.packed_attention import _check, _function

    assert _check(_function()) is None


# One training step of the 2-layer 4-bit model through sftlib's Unsloth path, LoRA B set to random values so the
# adapters matter; saves the loss, the LoRA gradients and which path ran. argv: model folder, output file, and
# "jitter" to move the input of every attention and MLP block by one bfloat16 rounding (the noise floor).
_LORA_STEP = r"""
import sys
import unsloth  # noqa: F401  before transformers
import torch
from sftlib.config import RunConfig
from sftlib.training import merged_lora
from sftlib.training.backend import choose_backend
from sftlib.training.lora import add_lora
from sftlib.training.model import load_model

folder, out = sys.argv[1:3]
checkpointing = "unsloth" if "recompute" in sys.argv[3:] else "false"
backend = choose_backend("unsloth")
cfg = RunConfig.from_dict({"backend": "unsloth", "model": {"name": folder, "max_seq_length": 2048, "dtype": "bfloat16"},
                           "lora": {"r": 16, "alpha": 16, "use_rslora": True, "train_embeddings": "never"},
                           "train": {"gradient_checkpointing": checkpointing, "seed": 0}})
model, _ = load_model(cfg, backend)
model = add_lora(model, cfg, backend)
gen = torch.Generator().manual_seed(0)
for name, p in model.named_parameters():
    if "lora_B" in name:
        p.data.copy_(torch.randn(p.shape, generator=gen) * 0.01)
ids = torch.randint(0, 128000, (8, 2048), generator=gen).cuda()
if "jitter" in sys.argv[3:]:
    cuda_gen = torch.Generator(device="cuda").manual_seed(1)

    def jitter(module, args, kwargs):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        sign = torch.randint(0, 2, h.shape, generator=cuda_gen, device=h.device) * 2 - 1
        h = (h.float() * (1 + 2.0 ** -8 * sign)).to(h.dtype)
        return (args, dict(kwargs, hidden_states=h)) if "hidden_states" in kwargs else ((h,) + args[1:], kwargs)

    for layer in merged_lora._decoder_layers(model):
        layer.self_attn.register_forward_pre_hook(jitter, with_kwargs=True)
        layer.mlp.register_forward_pre_hook(jitter, with_kwargs=True)
model.train()
loss = model(input_ids=ids, labels=ids).loss
loss.backward()
torch.save({"note": model.sftlib_merged_lora, "loss": loss.item(), "calls": merged_lora.calls(),
            "grads": {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}}, out)
"""


def _lora_step(model: str, out: Path, env: dict, extra: list) -> dict:
    """One forward and backward pass of `_LORA_STEP` in a fresh process: its loss, gradients, note and call counts."""
    import torch

    proc = subprocess.run([sys.executable, "-c", _LORA_STEP, model, str(out), *extra], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return torch.load(out)


def _two_layer_model(tmp_path) -> str:
    model = os.environ.get("SFTLIB_GPU_MODEL")
    if not model:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from make_model import write_model

        model = str(write_model(Path(os.environ.get("SFTLIB_GPU_MODEL_CACHE", tmp_path / "llama-2l")), layers=2))
    return model


@needs_cuda
def test_recompute_skip_keeps_loss_and_gradients(tmp_path):
    """With Unsloth's offloaded recomputation, a recomputed layer skipping its MLP's down product
    (SFTLIB_RECOMPUTE_SKIP=1) gives the same loss and LoRA gradients as making it, and really skips (once per layer).
    Unsloth's per-block compile is off here, as it is for packed batches (the skip never acts inside a compiled
    block)."""
    import torch

    pytest.importorskip("unsloth")
    model = _two_layer_model(tmp_path)
    runs = {}
    for name, setting in (("skip", "1"), ("made", "0")):
        env = dict(os.environ, SFTLIB_MERGED_LORA="1", SFTLIB_RECOMPUTE_SKIP=setting, UNSLOTH_BLOCK_COMPILE="0",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        runs[name] = _lora_step(model, tmp_path / f"step-{name}.pt", env, ["recompute"])
    skip, made = runs["skip"], runs["made"]
    assert "skips its MLP's down product" in skip["note"], skip["note"]
    layers = len(skip["grads"]) // (2 * 7)
    assert skip["calls"]["skipped"] == layers and made["calls"]["skipped"] == 0, (skip["calls"], made["calls"])
    assert abs(skip["loss"] - made["loss"]) <= 1e-6 * abs(made["loss"])  # the forward giving the loss is untouched
    assert skip["grads"].keys() == made["grads"].keys()
    for name, want in made["grads"].items():  # the same operations on the same values; atomics may reorder sums
        got = skip["grads"][name]
        assert want.norm() > 0 and float((got - want).norm() / want.norm()) < 1e-3, name


@needs_cuda
def test_merged_lora_matches_unsloth_products(tmp_path):
    """LoRA folded into the dequantized weights (sftlib.training.merged_lora) against Unsloth's three products:
    the same loss and LoRA gradients to bfloat16 rounding on the 4-bit model, and the merged path really ran."""
    import torch

    pytest.importorskip("unsloth")
    model = _two_layer_model(tmp_path)
    runs = {}
    for name, setting, extra in (("merged", "1", []), ("products", "0", []), ("jitter", "0", ["jitter"])):
        env = dict(os.environ, SFTLIB_MERGED_LORA=setting,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        runs[name] = _lora_step(model, tmp_path / f"step-{name}.pt", env, extra)
    merged, products, jittered = runs["merged"], runs["products"], runs["jitter"]
    assert merged["note"] and "layers fold LoRA" in merged["note"], merged["note"]
    assert merged["calls"]["merged"] > 0 and merged["calls"]["unsloth"] == 0, merged["calls"]
    assert products["note"] is None and products["calls"]["merged"] == 0
    assert abs(merged["loss"] - products["loss"]) < 1e-3 * abs(products["loss"]), (merged["loss"], products["loss"])
    assert merged["grads"].keys() == products["grads"].keys() and len(merged["grads"]) == 2 * 7 * 2
    # Both paths round in bfloat16, at different places (the merged weight once, against X·Aᵀ and its product in
    # Unsloth's), so neither gives the exact gradient, and on a random model with random tokens the LoRA
    # gradients are sums of terms that mostly cancel: a rounding's worth of change moves them by percents (2.5%
    # seen on an H100, the direction unchanged). The yardstick is Unsloth's own path with every block's input
    # moved by one bfloat16 rounding: the merged path may differ from Unsloth's by at most twice that, and every
    # gradient must point the same way (a wrong scale, a transpose or a missing term gives far more or a cosine
    # far below 0.995). The exact formula is checked in float32 on the CPU (tests/test_merged_lora.py) and on
    # this GPU's first layer by enable() itself.
    def flat(run):
        return torch.cat([run["grads"][n].flatten() for n in products["grads"]])

    want = flat(products)
    merged_diff = float((flat(merged) - want).norm() / want.norm())
    noise = float((flat(jittered) - want).norm() / want.norm())
    assert jittered["grads"].keys() == products["grads"].keys() and 0 < noise < 0.2, noise
    report = {}
    for name, want_p in products["grads"].items():
        got = merged["grads"][name]
        assert want_p.norm() > 0, name
        report[name] = (round(float(torch.nn.functional.cosine_similarity(got.flatten(), want_p.flatten(), dim=0)), 5),
                        round(float((got - want_p).norm() / want_p.norm()), 4))
    print(f"LoRA gradients: merged against Unsloth's {merged_diff:.4f}, one rounding's jitter {noise:.4f}; {report}")
    assert all(cos >= 0.995 for cos, _ in report.values()), report
    assert merged_diff <= 2 * noise, (merged_diff, noise, report)


if __name__ == "__main__":
    backend, model_dir, out_dir = sys.argv[1:4]
    print("RESULT " + json.dumps(scenario(backend, model_dir, out_dir), default=str), flush=True)
