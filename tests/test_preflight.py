"""Pre-flight checks: each check is shown the broken case it exists for, built with real code.

    pytest tests/test_preflight.py -q -s      # -s prints the measured memory-estimate errors
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset

from sftlib.config import RunConfig
from sftlib.data import IGNORE, encode_conversation, encode_dataset
from sftlib.training.memory import LLAMA_3_1_8B, ModelShape, estimate_memory
from sftlib.training.tokenizer import prepare_tokenizer
from sftlib.checks.preflight import FATAL, WARNING, PreflightError, preflight
from sftlib.data.templates import LLAMA_3_1, get_template

REPO = Path(__file__).resolve().parents[1]
CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Hello there! How are you today?"},
     {"role": "assistant", "content": "Fine, thanks."},
     {"role": "user", "content": "What is two plus two?"},
     {"role": "assistant", "content": "Two plus two is four."}],
    [{"role": "user", "content": "The capital of France is?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Which colour is the sky?"},
     {"role": "assistant", "content": "The colour is blue."}],
] * 4


def _cfg(folder, **overrides) -> RunConfig:
    return RunConfig.preset("cpu-demo").with_overrides({"model.name": str(folder), **overrides})


def _dataset() -> Dataset:
    return Dataset.from_list([{"messages": m} for m in CONVERSATIONS])


def _codes(report, severity=None) -> list[str]:
    return report.codes(severity)


def test_healthy_run_has_no_fatal_finding_and_previews_the_mask(tiny, tiny_model_dir):
    model, tokenizer = tiny
    template = get_template("chatml")
    info = prepare_tokenizer(model, tokenizer, template)
    ds = _dataset()
    rows = encode_dataset(ds, tokenizer, template, max_length=256)
    report = preflight(_cfg(tiny_model_dir), tokenizer, template, rows, raw_rows=ds, model=model,
                       embeddings_trained=info.resized)
    assert report.ok and not _codes(report, WARNING), report.to_text()
    assert {"trained_share", "lengths", "memory"} <= set(_codes(report))
    trained = ["".join(t for t, on in p.segments if on) for p in report.previews]
    assert trained[0] == "Fine, thanks.<|im_end|>Two plus two is four.<|im_end|>"
    text = report.to_text()
    assert "«Fine, thanks.<|im_end|>»" in text and "«Paris.<|im_end|>»" in text
    assert report.trained_tokens == sum(sum(x != IGNORE for x in r["labels"]) for r in rows)
    assert "trained embeddings and LM head" in report.estimate.parts
    # Left out, whether embeddings are trained is found as add_lora finds it: the vocabulary grew.
    auto = preflight(_cfg(tiny_model_dir), tokenizer, template, rows, raw_rows=ds, model=model)
    assert auto.estimate.parts == report.estimate.parts


def test_masked_eos_from_pad_equal_to_eos_is_fatal(tiny, tiny_model_dir):
    """The classic: pad = EOS, and a language-modelling collator sets every padding label (so every EOS) to -100."""
    from transformers import DataCollatorForLanguageModeling

    model, tokenizer = tiny
    template = get_template("alpaca")  # its turns end with EOS
    prepare_tokenizer(model, tokenizer, template)
    tokenizer.pad_token = tokenizer.eos_token  # the broken setting
    ds = _dataset()
    encoded = [encode_conversation(tokenizer, template, m) for m in ds["messages"]]
    batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)([{"input_ids": r["input_ids"]} for r in encoded])
    rows = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        rows.append({"input_ids": ids[:n].tolist(), "labels": labels[:n].tolist()})
    assert tokenizer.eos_token_id in rows[0]["input_ids"]  # the EOS is there, only never trained
    cfg = _cfg(tiny_model_dir, **{"model.chat_template": "alpaca"})
    report = preflight(cfg, tokenizer, template, rows, raw_rows=ds)
    assert {"end_of_turn_not_trained", "pad_is_eos"} <= set(_codes(report, FATAL)), report.to_text()
    # Without the conversations the check still sees trained spans that do not end on EOS.
    assert "end_of_turn_not_trained" in _codes(preflight(cfg, tokenizer, template, rows), FATAL)
    # The same rows as sftlib encodes them train every EOS: no such finding.
    good = preflight(cfg, tokenizer, template, encoded, raw_rows=ds)
    assert "end_of_turn_not_trained" not in _codes(good)


def test_pad_equal_to_end_of_turn_is_fatal_and_no_pad_warns(tiny, tiny_model_dir):
    model, tokenizer = tiny
    template = get_template("chatml")
    prepare_tokenizer(model, tokenizer, template)
    rows = [encode_conversation(tokenizer, template, m) for m in CONVERSATIONS]
    tokenizer.pad_token = "<|im_end|>"
    report = preflight(_cfg(tiny_model_dir), tokenizer, template, rows)
    assert "pad_is_end_of_turn" in _codes(report, FATAL)
    tokenizer.pad_token = None
    report = preflight(_cfg(tiny_model_dir), tokenizer, template, rows)
    assert "no_pad_token" in _codes(report, WARNING) and report.ok


def test_double_bos_is_fatal(tiny, tiny_model_dir):
    model, tokenizer = tiny
    template = get_template("llama-3.1")  # writes `bos_token` itself
    prepare_tokenizer(model, tokenizer, template)
    cfg = _cfg(tiny_model_dir, **{"model.chat_template": "llama-3.1"})
    # 1. Rendering the template, then tokenizing with the tokenizer's default `add_special_tokens=True`.
    texts = [template.render(m, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token) for m in CONVERSATIONS]
    rows = [{"input_ids": ids, "labels": list(ids)} for ids in tokenizer(texts)["input_ids"]]
    assert rows[0]["input_ids"][:2] == [tokenizer.bos_token_id] * 2
    report = preflight(cfg, tokenizer, template, rows)
    assert "double_bos" in _codes(report, FATAL), report.to_text()
    # 2. A template that writes BOS but claims it does not: sftlib.data.encode then adds one more.
    wrong = dataclasses.replace(LLAMA_3_1, uses_bos=False)
    rows = [encode_conversation(tokenizer, wrong, m) for m in CONVERSATIONS]
    assert "double_bos" in _codes(preflight(cfg, tokenizer, wrong, rows), FATAL)
    # The real template gives BOS once.
    rows = [encode_conversation(tokenizer, template, m) for m in CONVERSATIONS]
    assert "double_bos" not in _codes(preflight(cfg, tokenizer, template, rows))


def test_missing_bos_warns(tiny, tiny_model_dir):
    model, tokenizer = tiny
    template = get_template("chatml")  # writes no BOS; this tokenizer puts one before every text
    prepare_tokenizer(model, tokenizer, template)
    texts = [template.render(m, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token) for m in CONVERSATIONS]
    rows = [{"input_ids": ids, "labels": list(ids)} for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert "missing_bos" in _codes(preflight(_cfg(tiny_model_dir), tokenizer, template, rows), WARNING)


def _generation_mask_rows(tokenizer, jinja: str) -> list[dict]:
    """Labels from transformers' assistant mask, as TRL's `assistant_only_loss` builds them."""
    tokenizer.chat_template = jinja
    rows = []
    for messages in CONVERSATIONS:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids = list(out["input_ids"])
        rows.append({"input_ids": ids, "labels": [t if m else IGNORE for t, m in zip(ids, out["assistant_masks"])]})
    return rows


def test_template_whose_markers_do_not_match_trains_nothing(tiny, tiny_model_dir):
    """ChatML without `{% generation %}` markers gives an all-zero assistant mask: nothing is trained."""
    model, tokenizer = tiny
    template = get_template("chatml")
    prepare_tokenizer(model, tokenizer, template)
    rows = _generation_mask_rows(tokenizer, template.jinja)
    report = preflight(_cfg(tiny_model_dir), tokenizer, template, rows, raw_rows=_dataset())
    assert "no_trained_tokens" in _codes(report, FATAL), report.to_text()
    # With the markers around each assistant reply and its <|im_end|>, the same path trains the right tokens.
    marked = (
        "{% for message in messages %}{% if message['role'] == 'assistant' %}"
        "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{{ '\\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endif %}{% endfor %}"
    )
    rows = _generation_mask_rows(tokenizer, marked)
    tokenizer.chat_template = template.jinja
    report = preflight(_cfg(tiny_model_dir), tokenizer, template, rows, raw_rows=_dataset())
    assert report.ok, report.to_text()


def test_over_long_rows_are_counted_with_the_trained_tokens_they_lose(tiny, tiny_model_dir):
    model, tokenizer = tiny
    template = get_template("chatml")
    prepare_tokenizer(model, tokenizer, template)
    ds = _dataset()
    full = [encode_conversation(tokenizer, template, m) for m in CONVERSATIONS]
    limit = 40  # cuts the long conversation inside its answers, keeps the short ones whole
    assert len(full[0]["input_ids"]) > limit >= max(len(r["input_ids"]) for r in full[1:3])
    rows = encode_dataset(ds, tokenizer, template, max_length=limit)
    report = preflight(_cfg(tiny_model_dir, **{"model.max_seq_length": limit}), tokenizer, template, rows, raw_rows=ds)
    expected_lost = sum(sum(x != IGNORE for x in f["labels"][limit:]) for f in full)
    assert report.truncated_rows == 4 and report.trained_lost == expected_lost > 0
    finding = next(f for f in report.findings if f.code == "truncated_rows")
    assert finding.severity == WARNING and f"{expected_lost} trained tokens" in finding.message
    assert max(report.lengths) == len(full[0]["input_ids"])  # the uncut length, found by encoding again
    assert any(lo == limit for lo, _, _ in report.histogram())  # the limit is a bucket edge
    assert "cut" in report.to_text()
    # Rows not cut yet (encoded without a limit) are counted the same way: the trainer would cut them.
    uncut = encode_dataset(ds, tokenizer, template)
    again = preflight(_cfg(tiny_model_dir, **{"model.max_seq_length": limit}), tokenizer, template, uncut)
    assert again.truncated_rows == 4 and again.trained_lost == expected_lost


@pytest.mark.parametrize("limit,fix", [
    (512, "raise `model.max_seq_length` to 1024, the most this model reads, and drop or split the rows still longer"),
    (1024, "drop or split the longest rows (99% of rows are under"),
])
def test_suggested_max_seq_length_never_exceeds_what_the_model_reads(limit, fix, tiny, tiny_model_dir):
    """Rows longer than the model's `max_position_embeddings` (1024 for the tiny model): pre-flight's fix for the
    cut rows is never a `model.max_seq_length` the model cannot read (it once suggested 30 million tokens)."""
    model, tokenizer = tiny
    template = get_template("chatml")
    prepare_tokenizer(model, tokenizer, template)
    long_answer = " ".join(["The colour is blue, the capital is Paris."] * 300)
    ds = Dataset.from_list([{"messages": [{"role": "user", "content": "Tell me."},
                                          {"role": "assistant", "content": long_answer}]}] * 3)
    rows = encode_dataset(ds, tokenizer, template, max_length=limit)
    cfg = _cfg(tiny_model_dir, **{"model.max_seq_length": limit})
    for given in (model, None):  # from the loaded model, or from config.json without it
        report = preflight(cfg, tokenizer, template, rows, raw_rows=ds, model=given)
        assert max(report.lengths) > 2000
        finding = next(f for f in report.findings if f.code == "truncated_rows")
        assert fix in finding.message, finding.message


def test_rows_cut_before_their_answer_train_nothing(tiny, tiny_model_dir):
    model, tokenizer = tiny
    template = get_template("chatml")
    prepare_tokenizer(model, tokenizer, template)
    ds = _dataset()
    rows = encode_dataset(ds, tokenizer, template, max_length=12)
    cfg = _cfg(tiny_model_dir, **{"model.max_seq_length": 12})
    report = preflight(cfg, tokenizer, template, rows, raw_rows=ds)
    assert "no_trained_tokens" in _codes(report, FATAL)
    assert "every row is cut at `model.max_seq_length` (12) before its first answer" in report.fatal[0].message
    # One long question among short conversations: cut before its answer, it alone trains nothing.
    long = [{"role": "user", "content": "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 " * 4},
            {"role": "assistant", "content": "Thirteen."}]
    mixed = Dataset.from_list([{"messages": m} for m in CONVERSATIONS[1:3] + [long]])
    rows = encode_dataset(mixed, tokenizer, template, max_length=40)
    report = preflight(_cfg(tiny_model_dir, **{"model.max_seq_length": 40}), tokenizer, template, rows,
                       raw_rows=mixed)
    finding = next(f for f in report.findings if f.code == "rows_without_trained_tokens")
    assert finding.severity == WARNING and "(row 2)" in finding.message and "1 of them was cut" in finding.message
    assert report.ok


def test_template_tokens_missing_from_the_tokenizer_are_fatal(tiny, tiny_model_dir):
    _, tokenizer = tiny  # a base model's tokenizer: no ChatML tokens yet
    template = get_template("chatml")
    rows = [encode_conversation(tokenizer, template, m) for m in CONVERSATIONS]  # the markers become plain text
    report = preflight(_cfg(tiny_model_dir), tokenizer, template, rows)
    split = [f for f in report.fatal if f.code == "special_token_split"]
    assert {f.message.split("`")[1] for f in split} == {"<|im_start|>", "<|im_end|>"}, report.to_text()
    prepare_tokenizer(None, tokenizer, template)
    rows = [encode_conversation(tokenizer, template, m) for m in CONVERSATIONS]
    assert "special_token_split" not in _codes(preflight(_cfg(tiny_model_dir), tokenizer, template, rows))


def test_renderings_and_error(tiny, tiny_model_dir):
    model, tokenizer = tiny
    template = get_template("chatml")
    prepare_tokenizer(model, tokenizer, template)
    rows = [encode_conversation(tokenizer, template, [{"role": "user", "content": "a < b?"},
                                                      {"role": "assistant", "content": "Yes & no."}])]
    report = preflight(_cfg(tiny_model_dir), tokenizer, template, rows)
    page = report.to_html()
    assert "<span style='color:#999'>" in page and "a &lt; b?" in page
    assert "<span style='background:#b9f6ca'>Yes &amp; no.&lt;|im_end|&gt;</span>" in page
    assert "\x1b[1;32mYes & no.<|im_end|>\x1b[0m" in report.to_ansi() and "\x1b[" not in report.to_text()
    assert report._repr_html_() == page
    cut = preflight(_cfg(tiny_model_dir, **{"model.max_seq_length": 8}), tokenizer, template, rows)
    assert "✂ cut here by `model.max_seq_length`" in cut.to_text() and "Yes" not in cut.to_text()
    assert "\x1b[1;31mFATAL" in cut.to_ansi()
    json.dumps(cut.to_dict())
    with pytest.raises(PreflightError, match="train.preflight: warn") as err:
        cut.raise_if_fatal()
    assert isinstance(err.value, ValueError) and "no_trained_tokens" in str(err.value)


def test_long_rows_are_clipped_in_the_preview(tiny, tiny_model_dir):
    model, tokenizer = tiny
    template = get_template("chatml")
    prepare_tokenizer(model, tokenizer, template)
    long = [{"role": "user", "content": "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 " * 60},
            {"role": "assistant", "content": "The colour is blue."}]
    rows = [encode_conversation(tokenizer, template, long)]
    report = preflight(_cfg(tiny_model_dir, **{"model.max_seq_length": 4096}), tokenizer, template, rows)
    text = "".join(t for t, _ in report.previews[0].segments)
    assert len(text) < 1700 and " characters … " in text
    assert text.endswith("The colour is blue.<|im_end|>\n")  # the trained end survives
    assert text.startswith("<|begin_of_text|><|im_start|>user\nNumbers:")


# ---- memory ----------------------------------------------------------------------------------------


def test_llama_8b_numbers():
    """Parameter counts are Meta's published ones; the verdicts follow from them."""
    assert LLAMA_3_1_8B.params == 8_030_261_248
    cfg = RunConfig.preset("colab-t4")
    lora = sum(cfg.lora.r * (i + o) for i, o, _ in LLAMA_3_1_8B.linears.values())
    assert lora == 41_943_040  # r=16 on all seven projections, as PEFT reports for Llama 3 8B
    est = estimate_memory(cfg, LLAMA_3_1_8B)
    assert 5.0 < est.weights["4-bit"] < 5.6 and 14.9 < est.weights["16-bit"] < 15.0
    assert est.gpu == "T4" and est.verdict == "fits", est.to_text()
    # ChatML tokens added to a base Llama with `lora.train_embeddings: always`: both matrices trained whole
    always = cfg.with_overrides({"lora.train_embeddings": "always"})
    big = estimate_memory(always, LLAMA_3_1_8B, embeddings_trained=True)
    assert big.verdict == "too big" and "`lora.train_embeddings: auto`" in big.suggestion, big.to_text()
    assert estimate_memory(cfg, LLAMA_3_1_8B, gpu="H100", embeddings_trained=True).verdict == "fits"
    # the hf backend under `auto`: new rows of embeddings and head as trainable tokens, the loss through the
    # head's forward (all logits) instead of two 128256 x 4096 matrices with their optimizer states
    rows = estimate_memory(cfg, LLAMA_3_1_8B, gpu="H100", backend="hf", embeddings_trained="rows")
    both = estimate_memory(cfg, LLAMA_3_1_8B, gpu="H100", backend="hf", embeddings_trained=True)
    plain = estimate_memory(cfg, LLAMA_3_1_8B, gpu="H100", backend="hf")
    assert "trained embeddings and LM head" not in rows.parts
    tokens = cfg.train.batch_size * cfg.model.max_seq_length
    assert rows.parts["logits and their gradient (*)"] * 1024 ** 3 >= tokens * LLAMA_3_1_8B.vocab * 10
    assert plain.peak_gib < rows.peak_gib < both.peak_gib
    from sftlib.training.memory import embeddings_trained_by

    auto = RunConfig()
    assert [embeddings_trained_by(auto, True, b) for b in ("unsloth", "hf", "cpu", None)] == ["rows"] * 4
    # Unsloth's loss stays chunked with rows trained: the T4 preset fits Llama 3.1 8B with chatml's two new
    # tokens, where the whole matrices with their optimizer states do not
    t4 = RunConfig.preset("colab-t4")
    t4_rows = estimate_memory(t4, LLAMA_3_1_8B, backend="unsloth", embeddings_trained="rows")
    t4_whole = estimate_memory(t4, LLAMA_3_1_8B, backend="unsloth", embeddings_trained=True)
    t4_plain = estimate_memory(t4, LLAMA_3_1_8B, backend="unsloth")
    assert t4_rows.verdict == "fits" and t4_whole.verdict != "fits", (t4_rows.to_text(), t4_whole.to_text())
    assert t4_plain.peak_gib < t4_rows.peak_gib < estimate_memory(t4, LLAMA_3_1_8B, backend="hf",
                                                                   embeddings_trained="rows").peak_gib
    assert embeddings_trained_by(auto, False, "hf") is False
    assert embeddings_trained_by(auto.with_overrides({"lora.train_embeddings": "always"}), False, "hf") is True
    a100 = RunConfig.preset("colab-a100", {"train.gradient_checkpointing": "false"})  # batch 8 x 2048, no recompute
    nogc = estimate_memory(a100, LLAMA_3_1_8B)
    assert nogc.verdict == "too big" and "gradient_checkpointing" in nogc.suggestion


def test_memory_too_big_is_a_fatal_finding_with_the_fix(tiny, tiny_model_dir):
    model, tokenizer = tiny
    template = get_template("chatml")
    prepare_tokenizer(model, tokenizer, template)
    rows = [encode_conversation(tokenizer, template, m) for m in CONVERSATIONS]
    cfg = RunConfig.preset("colab-t4", {"lora.train_embeddings": "always"})
    report = preflight(cfg, tokenizer, template, rows, shape=LLAMA_3_1_8B, embeddings_trained=True)
    finding = next(f for f in report.fatal if f.code == "memory_too_big")
    assert "T4" in finding.message and "`lora.train_embeddings: auto`" in finding.message
    rows_only = preflight(cfg.with_overrides({"lora.train_embeddings": "auto"}), tokenizer, template, rows,
                          shape=LLAMA_3_1_8B, embeddings_trained="rows")
    assert "memory_too_big" not in _codes(rows_only), rows_only.to_text()
    ok = preflight(cfg, tokenizer, template, rows, shape=LLAMA_3_1_8B, embeddings_trained=False)
    assert ok.ok and "memory" in _codes(ok)


MEASURE = r"""
import json, sys
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
import datasets, peft, torch, transformers, trl  # noqa: F401 - imported before the baseline is taken
from transformers import TrainerCallback
from sftlib.training.backend import choose_backend
from sftlib.config import RunConfig
from sftlib.training.lora import add_lora
from sftlib.training.model import load_model
from sftlib.training.trainer import train
torch.set_num_threads(2)
cfg = RunConfig.from_json(sys.argv[1])
backend = choose_backend("cpu")
base = status("VmRSS")
model, tokenizer = load_model(cfg, backend)
model = add_lora(model, cfg, backend)  # no tokens added: embeddings train only under `always`
n = cfg.train.batch_size * (cfg.train.max_steps + 1)
ids = torch.randint(5, model.config.vocab_size, (n, cfg.model.max_seq_length),
                    generator=torch.Generator().manual_seed(0)).tolist()
train(cfg, model, tokenizer, datasets.Dataset.from_dict({"input_ids": ids, "labels": ids}), backend=backend)
print("MEASURED", json.dumps({"grown": status("VmHWM") - base}))
"""


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    """A Llama big enough for its memory to stand out of the process's own: 28 M parameters, vocab 16000."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftlib.demo.tiny import build_tokenizer

    folder = tmp_path_factory.mktemp("mid")
    tokenizer = build_tokenizer(["Memory is measured, not guessed.", "Tokens, rows and steps."] * 50, 400)
    tokenizer.pad_token = "<|finetune_right_pad_id|>"
    config = LlamaConfig(vocab_size=16000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("overrides", [
    {"train.batch_size": 4, "model.max_seq_length": 256, "train.gradient_checkpointing": "false",
     "lora.train_embeddings": "always"},
    {"train.batch_size": 2, "model.max_seq_length": 768, "train.gradient_checkpointing": "true"},
], ids=["no-checkpointing+embeddings", "checkpointing"])
def test_memory_estimate_matches_a_measured_cpu_run(mid_model, tmp_path, overrides):
    """A real sftlib training run (LoRA, TRL, packing) in a fresh process: how much did its memory grow?

    Measured as the peak resident memory (VmHWM) minus the resident memory before the model was
    loaded, with glibc told to hand large blocks back to the system at once (so freed tensors do not
    linger in the heap). Seven configurations were measured while writing this: errors -12% to +5%.
    """
    cfg = _cfg(mid_model, **{"train.max_steps": 2, "train.output_dir": str(tmp_path / "out"),
                             "train.logging_steps": 1, **overrides})
    path = tmp_path / "cfg.json"
    cfg.to_json(path)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "SFTLIB_FORCE_CPU": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], env=env, capture_output=True, text=True,
                         timeout=300)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("MEASURED ")), None)
    assert line, out.stderr[-3000:]
    measured = json.loads(line.split(" ", 1)[1])["grown"] / 1024 ** 2
    est = estimate_memory(cfg, ModelShape.from_pretrained(str(mid_model)), device="cpu",
                          embeddings_trained=cfg.lora.train_embeddings == "always")
    estimated = est.peak_gib * 1024
    error = (estimated - measured) / measured
    print(f"\nmemory estimate {estimated:.0f} MiB, measured {measured:.0f} MiB, error {error:+.1%} ({overrides})")
    assert abs(error) < 0.2, est.to_text()


# ---- wiring: the pipeline stops, the command line exits non-zero ----------------------------------------


def _write_data(path: Path) -> Path:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    return path


def test_pipeline_stops_before_training_on_a_fatal_finding(tiny_model_dir, tmp_path):
    from sftlib.steps import run

    data = _write_data(tmp_path / "chat.jsonl")
    cfg = _cfg(tiny_model_dir, **{"data.source": str(data), "data.eval_size": 0, "model.max_seq_length": 12,
                                  "train.output_dir": str(tmp_path / "out"), "export.output_dir": str(tmp_path / "m")})
    lines = []
    with pytest.raises(PreflightError, match="no_trained_tokens"):
        run(cfg, log=lines.append)
    assert any(line.startswith("pre-flight: ") for line in lines)
    assert not (tmp_path / "out").exists()  # nothing was trained or written
    # `warn` reports and goes on; here the next guard (nothing to train) stops it, not the pre-flight.
    with pytest.raises(ValueError, match="no token is trained") as err:
        run(cfg.with_overrides({"train.preflight": "warn"}), log=lines.append)
    assert not isinstance(err.value, PreflightError)


def test_cli_exit_status(tiny_model_dir, tmp_path, capsys):
    from sftlib.cli import main

    data = _write_data(tmp_path / "chat.jsonl")
    config = tmp_path / "run.yaml"
    _cfg(tiny_model_dir, **{"data.source": str(data), "data.eval_size": 0}).to_yaml(config)
    assert main(["preflight", "--config", str(config)]) == 0
    assert "pre-flight: 0 fatal" in capsys.readouterr().out
    assert main(["preflight", "--config", str(config), "--set", "model.max_seq_length=12"]) == 1
    assert "FATAL   no_trained_tokens" in capsys.readouterr().out
    assert main(["preflight", "--config", str(config), "--set", "train.preflight=sometimes"]) == 2  # config error



@pytest.mark.parametrize("setting,expected", [
    ("lora.target_modules=[q_proj,nope]", "`lora.target_modules`: ['nope'] not found in this model"),
    ("lora.r=65", "`lora.r` is 65, above the width of the narrowest adapted layer (32)"),
])
def test_cli_preflight_refuses_what_train_refuses(setting, expected, tiny_model_dir, tmp_path, capsys):
    """`python -m sftlib preflight --config run.yaml --set lora.target_modules=[q_proj,nope]`: the model-dependent
    checks `train` runs after loading the model, here on a skeleton without weights; same message, exit 2."""
    from sftlib import cli

    data = _write_data(tmp_path / "chat.jsonl")
    config = tmp_path / "run.yaml"
    out = tmp_path / "out"
    _cfg(tiny_model_dir, **{"data.source": str(data), "data.eval_size": 0, "train.max_steps": 1,
                            "train.output_dir": str(out / "train"), "export.output_dir": str(out / "model")}
         ).to_yaml(config)
    messages = []
    for command in ("preflight", "train"):
        code = cli.main([command, "--config", str(config), "--set", setting])
        err = capsys.readouterr().err
        assert code == 2, err
        err = err[err.find("error: "):]  # after train's progress bars
        assert "Traceback" not in err and err.startswith("error: ") and "\n\n" not in err.strip(), err
        assert expected in err
        messages.append(err)
    assert messages[0] == messages[1]
    assert not (out / "model").exists()


@pytest.mark.parametrize("rows", ["-5", "0", "many"])
def test_cli_preflight_rows_must_be_a_positive_integer(rows, capsys):
    from sftlib import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["preflight", "--preset", "cpu-demo", "--rows", rows])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --rows: expects a positive integer" in err and "Traceback" not in err



@pytest.mark.parametrize("lengths,limit", [([40, 60, 300_000], 64), ([20] * 5 + [2048, 5_000_000], 2048),
                                           ([5, 900_000], 0), ([30, 31, 32], 64)])
def test_length_histogram_has_a_bounded_number_of_lines(lengths, limit):
    """One conversation thousands of times longer than `model.max_seq_length` adds a few lines to the report's
    histogram, not one empty line per max_seq_length-wide bucket up to it; every row is still counted."""
    from sftlib.checks.report import Report

    report = Report(rows_total=len(lengths), rows_checked=len(lengths), lengths=lengths, max_seq_length=limit)
    buckets = report.histogram()
    assert len(buckets) <= 24
    assert sum(c for _, _, c in buckets) == len(lengths)
    assert buckets[-1][1] >= max(lengths)
    if limit and limit < max(lengths):
        assert any(hi == limit for _, hi, _ in buckets)  # the limit stays a bucket edge
    text = report.to_text()
    assert 0 < sum(line.startswith("  ") and "-" in line and "#" in line for line in text.splitlines()) <= 24
    assert len(text.splitlines()) < 40


from conftest import SHARED_FIXTURES  # noqa: E402

TOKENIZERS = SHARED_FIXTURES / "tokenizers"


@pytest.mark.skipif(not TOKENIZERS.is_dir(), reason=f"tokenizers not found at {TOKENIZERS}")
def test_mistral_v1_template_on_the_real_v3_tokenizer_warns_of_lone_space_pieces(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    (tmp_path / "tokenizer.model").write_bytes((TOKENIZERS / "mistral_v3_instruct_tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    found = {}
    for name in ("mistral", "mistral-v3"):
        template = get_template(name)
        rows = [encode_conversation(tokenizer, template, m) for m in CONVERSATIONS]
        report = preflight(_cfg(tiny_model_dir), tokenizer, template, rows)
        found[name] = [f.message for f in report.findings if f.code == "marker_pieces_odd"]
    assert found["mistral-v3"] == []
    assert len(found["mistral"]) == 1 and "beside [/INST], [INST] on this tokenizer (4 in" in found["mistral"][0]
