"""The benchmark scripts' CPU parts: synthetic data, FLOP counts, the stand-in tokenizer, same tokens out.

    pytest tests/test_benchmarks.py -q

The GPU runs themselves are benchmarks/gpu_bench.py and tests/test_gpu.py (marked gpu).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import data_prep_bench  # noqa: E402
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


def test_data_prep_benchmark_second_run_reuses_the_cache(tmp_path):
    """The whole benchmark on a few rows: its second run (another process) must reuse both settings' rows."""
    assert data_prep_bench.main(["--rows", "60", "--no-article", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "data_prep.json").read_text())
    assert {k: v["reused"] for k, v in result["second_run"].items()} == {"all": True, "assistant": True}
    assert result["second_run"]["all"]["rows"] == 60 and "reused the cache" in (tmp_path / "data_prep.md").read_text()
