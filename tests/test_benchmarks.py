"""The benchmark scripts' CPU parts: synthetic data, FLOP counts, the stand-in tokenizer, same tokens out.

    pytest tests/test_benchmarks.py -q

The GPU runs themselves are benchmarks/gpu_bench.py and tests/test_gpu.py (marked gpu).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import data_prep_bench  # noqa: E402
import dpo_gpu  # noqa: E402
import gpu_bench  # noqa: E402
import make_model  # noqa: E402


def test_benchmark_documents_are_conversation_like_and_reproducible():
    lengths = gpu_bench.doc_lengths(2500, seed=0)
    assert 400 <= statistics.median(lengths) <= 500 and max(lengths) <= 2048 and min(lengths) >= 16
    assert lengths == gpu_bench.doc_lengths(2500, seed=0) and lengths != gpu_bench.doc_lengths(2500, seed=1)
    ds = gpu_bench.make_dataset(20)
    assert [len(x) for x in ds["input_ids"]] == gpu_bench.doc_lengths(20)
    assert all(row[0] == 128000 and max(row[1:]) < 128000 for row in ds["input_ids"])


def test_flops_per_token_of_llama_8b():
    config = json.loads(make_model.CONFIG.read_text())
    short = gpu_bench.flops_per_token(config, [100])
    # 4 x the 7.5 B matmul weights (32 decoder layers + LM head) dominate: about 30 GFLOP per token
    assert 29e9 < short < 31.5e9
    assert gpu_bench.flops_per_token(config, [2000]) > short  # attention grows with document length


def test_stand_in_tokenizer_has_llama3_size_and_special_ids():
    tok = make_model.build_tokenizer(make_model.demo_texts()[:200], trained_vocab=600)
    assert len(tok) == 128256
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
                                                      "<|start_header_id|>", "<|finetune_right_pad_id|>")}
    assert ids == {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|eot_id|>": 128009,
                   "<|start_header_id|>": 128006, "<|finetune_right_pad_id|>": 128004}
    encoded = tok("The review is positive.")["input_ids"]
    assert encoded[0] == 128000 and tok.decode(encoded[1:]) == "The review is positive."


def test_data_prep_paths_give_the_same_tokens(tmp_path):
    import datasets

    tokenizer, template, _ = data_prep_bench._tokenizer_and_template()
    ds = datasets.Dataset.from_list(data_prep_bench.conversations(40, seed=3))
    article = data_prep_bench.article_path(ds, tokenizer, num_proc=None)["input_ids"]
    ours = data_prep_bench.sftlib_path(ds, tokenizer, template, tmp_path)["input_ids"]
    assert article == ours
    assert 300 < sum(map(len, ours)) / len(ours) < 1000


def test_dpo_benchmark_pairs_and_contenders_run_on_the_cpu(tmp_path):
    """benchmarks/dpo_gpu.py's CPU parts: the synthetic pairs, and the sftlib and plain-TRL contenders for a few
    steps on a tiny model with the same pairs (`--cpu-smoke` runs the same in subprocesses), then the report."""
    pairs = dpo_gpu.make_pairs(64, vocab=240, max_length=128, low=8)
    assert pairs["prompt_ids"] == dpo_gpu.make_pairs(64, vocab=240, max_length=128, low=8)["prompt_ids"]
    for p, c, r in zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"]):
        assert len(p) + max(len(c), len(r)) <= 128 and min(p + c + r) >= 8 and max(p + c + r) < 240
    model = dpo_gpu.tiny_model(tmp_path / "tiny")
    rows = []
    for contender, fn in (("sftlib", dpo_gpu.run_sftlib), ("hf", dpo_gpu.run_hf)):
        timer = dpo_gpu.step_timer(False)
        history, _ = fn(str(model), dpo_gpu.CPU_SMOKE, pairs, 3, str(tmp_path / contender), timer, False)
        row = {"contender": contender, "device": "cpu", **dpo_gpu.summarise(timer.marks, history, 1, False)}
        assert len(timer.marks) == 4 and row["measured_steps"] == 2 and row["tokens_per_s"] > 0, row
        assert row["first_losses"][0] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy = reference at step 1
        rows.append(row)
    # same pairs, same order, same batch: both contenders see the same tokens in each timed step
    assert rows[0]["tokens_per_step"] == rows[1]["tokens_per_step"]
    dpo_gpu.write_report(tmp_path / "out", rows, "python benchmarks/dpo_gpu.py --cpu-smoke", True)
    assert "| sftlib | cpu |" in (tmp_path / "out" / "dpo_gpu.md").read_text()


def test_data_prep_benchmark_second_run_reuses_the_cache(tmp_path):
    """The whole benchmark on a few rows: its second run (another process) must reuse both settings' rows."""
    assert data_prep_bench.main(["--rows", "60", "--no-article", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "data_prep.json").read_text())
    assert {k: v["reused"] for k, v in result["second_run"].items()} == {"all": True, "assistant": True}
    assert result["second_run"]["all"]["rows"] == 60 and "reused the cache" in (tmp_path / "data_prep.md").read_text()


def test_failed_run_records_its_exception_not_the_progress_bar():
    log = ("Unsloth: patching\nTraceback (most recent call last):\n  File \"x.py\", line 3, in <module>\n"
           "    raise ValueError('no')\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 256.00 MiB.\n\n"
           "  0%|          | 0/8 [00:02<?, ?it/s]\n")
    assert gpu_bench.failure_line(log) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 256.00 MiB."
    assert gpu_bench.failure_line("loading\n  0%| 0/8\n") == "0%| 0/8"  # no exception: the last line
    assert gpu_bench.failure_line("") == "no output"
