"""GGUF export, run in llama.cpp and compared with transformers, on the CPU and offline.

    python -m sftlib gguf-setup          # once per machine (`make test` does it); then:
    pytest tests/test_gguf.py -q

The models here have hidden size 256, because K-quants work on rows of 256 values: with a smaller
hidden size llama.cpp silently writes q5_0 instead and the K kernels are never exercised. The main
model is a 2-layer Llama with a byte-level BPE tokenizer split like Llama 3's, trained for a few
seconds on ChatML conversations so that its answers are peaked and end with <|im_end|>.

Without `llama_cpp` this module fails to import on purpose: a missing toolchain is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

try:
    import llama_cpp
except ImportError as exc:  # pragma: no cover - the point is to fail loudly
    raise ImportError(f"llama_cpp is not installed ({exc}); run `python -m sftlib gguf-setup` (`make test` does)") from exc

from sftlib.exports.gguf.convert import (GGUFExportError, GGUFVerifyError, check_types, estimate_bytes, suggest_pre_tokenizer)
from sftlib.exports.gguf.export import export_gguf
from sftlib.exports.gguf.verify import describe_mismatch
from sftlib.exports.gguf.setup import find_toolchain
from sftlib.data.templates import get_template

REPO = Path(__file__).resolve().parents[1]
from conftest import SHARED_FIXTURES, needs_stories  # noqa: E402
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QA = [
    ("Which colour is the sky?", "The sky is blue."),
    ("Which colour is grass?", "Grass is green."),
    ("What is two plus two?", "Two plus two is four."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Say hello.", "Hello! How can I help you today?"),
]
CHECKS = [[{"role": "user", "content": q}] for q, _ in QA[:4]] + [
    [{"role": "system", "content": "You are brief."}, {"role": "user", "content": QA[4][0]}]]
SWEEP = ["bf16", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k"]  # converted once, to bf16
# Bounds from measured figures (llama.cpp 0.3.36 vs transformers 5.17 on this model, several runs:
# bf16 max |dlogit| 0.02, KL 2e-6; f16 0.008-0.03, KL 1e-7..1e-6; q8_0 KL 5e-5..2e-4; q4_k_m KL
# 8e-3..3e-2), with room for other CPUs. They sit near what other tiny Llama/Qwen/Mistral models
# trained longer gave (f16 <= 0.011, q8_0 4e-5..1.5e-4, q4_k_m 1e-3..1e-2); this one's logits are
# larger, and so its errors.
BOUNDS = {"bf16": dict(dlogit=0.2, kl=1e-4, top1=0.99), "f16": dict(dlogit=0.1, kl=1e-4, top1=0.99),
          "q8_0": dict(dlogit=2.0, kl=2e-3, top1=0.98), "q4_k_m": dict(dlogit=12.0, kl=0.1, top1=0.95)}


def _bpe_tokenizer(texts):
    """Byte-level BPE with Llama 3's split regex and its BOS/EOS/pad names, trained on `texts`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=[bos, eos, pad], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tok.token_to_id(bos))])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, clean_up_tokenization_spaces=False)


def _llama(tokenizer, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))


def _train(model, tokenizer, template, conversations, steps):
    """Full fine-tuning on the assistant turns, with sftlib's own loss mask."""
    from sftlib.data.encode import encode_conversation

    rows = [encode_conversation(tokenizer, template, c) for c in conversations]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return float(loss.detach())


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Models this small run several times faster on one thread than on two busy ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    """A merged-model folder as sftlib writes it (bfloat16 safetensors + fitted tokenizer), ChatML-tuned."""
    from sftlib.training.tokenizer import prepare_tokenizer

    corpus = [f"{q} {a}" for q, a in QA] * 30 + ["Tabs\tand\nnewlines, quotes \"like this\", émojis 🙂, I've 1234567"] * 10
    tokenizer = _bpe_tokenizer(corpus)
    model = _llama(tokenizer)
    template = get_template("chatml")
    prepare_tokenizer(model, tokenizer, template)
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
    convs.append([{"role": "system", "content": "You are brief."}] + convs[-1])
    loss = _train(model, tokenizer, template, convs, steps=100)
    assert loss < 0.05, f"the tiny model did not learn its answers (loss {loss:.3f})"
    folder = tmp_path_factory.mktemp("gguf") / "merged_16bit"
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(chatml_dir):
    out = chatml_dir.parent / "gguf"
    lines = []
    result = export_gguf(chatml_dir, out, SWEEP, template="chatml", model_name="tiny-chat", pre_tokenizer="llama-bpe",
                         conversations=CHECKS, log=lines.append)
    return result, lines


def _metadata(path) -> dict:
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return dict(llm.metadata)
    finally:
        llm.close()


def _tensor_types(path) -> set[str]:
    """Tensor types in a GGUF, read with the gguf-py that ships with the converter."""
    gguf_py = str(find_toolchain().source_dir / "gguf-py")
    if gguf_py not in sys.path:
        sys.path.insert(0, gguf_py)
    from gguf import GGUFReader

    return {t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def test_every_type_is_written_verified_and_within_measured_bounds(exported):
    result, lines = exported
    assert result.ok, result.table()
    assert [f.format for f in result.items] == [f"gguf:{t}" for t in SWEEP]
    for f in result.items:
        assert Path(f.path).is_file() and Path(f.path).name == f"tiny-chat.{f.format.split(':')[1].upper()}.gguf"
        c = f.check
        assert c["token_mismatches"] == [] and c["token_strings"] >= 15
        assert c["prompt_parity"] is True
        assert c["stop_expected"] == len(CHECKS) and c["stopped"] == len(CHECKS), (f.format, c["replies"])
    sizes = [f.bytes for f in result.items]
    assert sizes == sorted(sizes, reverse=True), sizes  # bf16 = f16 > q8_0 > q6_k > ... > q2_k
    checks = {f.format.split(":")[1]: f.check for f in result.items}
    for qtype, bound in BOUNDS.items():
        c = checks[qtype]
        assert c["max_abs_dlogit"] <= bound["dlogit"], (qtype, c["max_abs_dlogit"])
        assert c["mean_kl"] <= bound["kl"], (qtype, c["mean_kl"])
        assert c["top1_agreement"] >= bound["top1"], (qtype, c["top1_agreement"])
    for qtype in ("bf16", "f16", "q8_0"):  # same greedy tokens as transformers on every prompt
        assert checks[qtype]["greedy_identical"] == len(CHECKS), checks[qtype]["greedy"]
    assert [r["text"] for r in checks["f16"]["replies"]] == [a for _, a in QA]
    assert any("converting" in line for line in lines) and any("q4_k_m written" in line for line in lines)


def test_k_quants_really_use_k_blocks(exported):
    files = {f.format.split(":")[1]: f.path for f in exported[0].items}
    assert "Q4_K" in _tensor_types(files["q4_k_m"]) and "Q6_K" in _tensor_types(files["q6_k"])
    assert "Q2_K" in _tensor_types(files["q2_k"]) and "Q3_K" in _tensor_types(files["q3_k_m"])
    for qtype in ("q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k"):
        assert "Q5_0" not in _tensor_types(files[qtype]), f"{qtype} fell back to q5_0"


def test_metadata_carries_template_bos_and_end_of_turn(exported, chatml_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chatml_dir)
    meta = _metadata(next(f.path for f in exported[0].items if f.format == "gguf:q4_k_m"))
    # training put BOS before a template that does not write it: the GGUF template writes it
    assert meta["tokenizer.chat_template"] == "{{ bos_token }}" + get_template("chatml").jinja
    assert meta["tokenizer.ggml.add_bos_token"] == "true"
    assert int(meta["tokenizer.ggml.eot_token_id"]) == tok.convert_tokens_to_ids("<|im_end|>")
    assert int(meta["tokenizer.ggml.eos_token_id"]) == tok.eos_token_id
    assert meta["general.name"] == "tiny-chat" and meta["tokenizer.ggml.pre"] == "llama-bpe"


def test_chat_completion_stops_at_im_end_with_one_bos(exported, chatml_dir):
    from transformers import AutoTokenizer

    from sftlib.data.encode import prompt_ids

    tok = AutoTokenizer.from_pretrained(chatml_dir)
    path = next(f.path for f in exported[0].items if f.format == "gguf:q4_k_m")
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)
    try:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        out = llm.create_chat_completion(messages=messages, max_tokens=64, temperature=0.0)
        assert out["choices"][0]["finish_reason"] == "stop"
        assert out["choices"][0]["message"]["content"] == "The capital of France is Paris."
        assert out["usage"]["completion_tokens"] < 20  # it stopped at <|im_end|>, not at max_tokens
        assert out["usage"]["prompt_tokens"] == len(prompt_ids(tok, get_template("chatml"), messages))
    finally:
        llm.close()


def test_report_and_modelfile_sit_beside_the_files(exported):
    result, _ = exported
    out = Path(result.out_dir)
    report = json.loads((out / "gguf_report.json").read_text())
    assert [f["format"] for f in report["items"]] == [f"gguf:{t}" for t in SWEEP] and all(f["ok"] for f in report["items"])
    assert report["extra"]["settings"]["add_bos"] is True and report["extra"]["settings"]["stop_strings"] == ["<|im_end|>", "<|end_of_text|>"]
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny-chat.Q4_K_M.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "<|end_of_text|>"' in modelfile
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["Modelfile", "gguf_report.json"] + [f"tiny-chat.{t.upper()}.gguf" for t in SWEEP])  # nothing half-written


def test_unknown_bpe_tokenizer_stops_with_a_suggestion(chatml_dir, tmp_path):
    assert suggest_pre_tokenizer(chatml_dir) == "llama-bpe"
    with pytest.raises(GGUFExportError, match=r"does not recognise the BPE tokenizer.*pre_tokenizer='llama-bpe'"):
        export_gguf(chatml_dir, tmp_path / "out", ["f16"], template="chatml", verify=False, log=lambda s: None)
    assert list((tmp_path / "out").iterdir()) == []


def test_forced_verification_failure_is_reported_and_the_file_kept_aside(chatml_dir, tmp_path):
    """add_bos=False contradicts training (it put BOS first): the prompt check must catch it."""
    out = tmp_path / "out"
    with pytest.raises(GGUFVerifyError, match="chat prompt ids differ from training"):
        export_gguf(chatml_dir, out, ["f16"], template="chatml", pre_tokenizer="llama-bpe", add_bos=False,
                    conversations=CHECKS[:1], log=lambda s: None)
    assert sorted(p.name for p in out.iterdir()) == ["gguf_report.json", "sftlib-model.F16.gguf.failed"]
    report = json.loads((out / "gguf_report.json").read_text())
    assert report["items"][0]["ok"] is False and report["items"][0]["check"]["prompt_parity"] is False


class _Interrupt(BaseException):
    pass


def test_interrupted_export_leaves_nothing_that_looks_complete(chatml_dir, tmp_path):
    def log(line):
        if line.startswith("gguf: verifying q8_0"):  # f16 and q8_0 are written and f16 verified by now
            raise _Interrupt

    out = tmp_path / "out"
    with pytest.raises(_Interrupt):
        export_gguf(chatml_dir, out, ["f16", "q8_0"], template="chatml", pre_tokenizer="llama-bpe",
                    conversations=CHECKS[:1], log=log)
    assert list(out.iterdir()) == []  # temporary files removed, nothing renamed into place


def test_killed_export_leaves_only_hidden_temporary_files(chatml_dir, tmp_path):
    """SIGKILL gives no chance to clean up: what is left must not look finished, and the next export clears it."""
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        from sftlib.exports.gguf.export import export_gguf
        export_gguf({str(chatml_dir)!r}, {str(out)!r}, ["f16", "q8_0"], template="chatml",
                    pre_tokenizer="llama-bpe", log=lambda s: print(s, flush=True))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)
    try:
        for line in proc.stdout:
            if line.startswith("gguf: verifying"):
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    left = sorted(p.name for p in out.iterdir())
    assert left and all(n.startswith(".") and ".partial-" in n for n in left), left
    from sftlib.exports.gguf.export import _remove_dead_partials

    _remove_dead_partials(out, "sftlib-model")
    assert list(out.iterdir()) == []


def test_disk_space_is_checked_before_anything_is_written(chatml_dir, exported, tmp_path, monkeypatch):
    from collections import namedtuple

    from sftlib.files import DiskSpaceError

    written = sum(f.bytes for f in exported[0].items)
    estimate = estimate_bytes(chatml_dir, SWEEP, "bf16")
    assert written <= estimate <= 3 * written, (written, estimate)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(DiskSpaceError, match="not enough disk space"):
        export_gguf(chatml_dir, tmp_path / "out", SWEEP, template="chatml", pre_tokenizer="llama-bpe", log=lambda s: None)
    assert list((tmp_path / "out").iterdir()) == []


def test_quantization_types_are_checked_all_at_once():
    with pytest.raises(GGUFExportError) as err:
        check_types(["q4_k_m", "iq2_xxs", "q9_k", "Q4_K_M"])
    text = str(err.value)
    assert "`iq2_xxs` needs an importance matrix" in text and "unknown quantization `q9_k`" in text
    assert "lists ['q4_k_m'] twice" in text
    assert check_types(["Q8_0", "q4_k_m"]) == ["q8_0", "q4_k_m"]


# ----------------------------------------------------------------------------- SentencePiece, Mistral template


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """Llama-2/Mistral style: a SentencePiece BPE vocab with byte fallback, BOS added by the tokenizer."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from sftlib.training.tokenizer import prepare_tokenizer

    root = tmp_path_factory.mktemp("spm")
    texts = [f"{q} {a}" for q, a in QA] * 40 + ["Tabs\tand\nnewlines, émojis 🙂, 1234567 [INST] x [/INST]"] * 10
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(root / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True}))
    tokenizer = AutoTokenizer.from_pretrained(root)
    model = _llama(tokenizer, seed=1)
    prepare_tokenizer(model, tokenizer, get_template("mistral"))
    folder = root / "merged_16bit"
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_sentencepiece_model_with_mistral_template(spm_dir):
    with pytest.warns(UserWarning, match="stopping could not be checked"):  # random weights never end a turn
        result = export_gguf(spm_dir, spm_dir.parent / "gguf", ["f16", "q8_0"], template="mistral",
                             model_name="tiny-spm", max_new_tokens=12, log=lambda s: None)
    assert result.ok, result.table()
    f16, q8 = (f.check for f in result.items)
    assert f16["token_mismatches"] == [] and f16["prompt_parity"] is True  # one BOS: the template's own
    assert f16["max_abs_dlogit"] <= 0.05 and f16["greedy_identical"] == 3
    assert q8["mean_kl"] <= 2e-3
    meta = _metadata(result.items[0].path)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_bos_token"] == "true"
    # transformers puts no "▁" before a word that follows a special token; llama.cpp must not either
    assert meta["tokenizer.ggml.add_space_prefix"] == "false"
    assert meta["tokenizer.chat_template"] == get_template("mistral").jinja  # it writes BOS itself: unchanged
    assert 'PARAMETER stop "</s>"' in Path(result.extra["modelfile"]).read_text()


# ----------------------------------------------------------------------------- real SentencePiece tokenizers

# Spaces, digits, accents, CJK, emoji, code, URLs, and words SentencePiece's merge order decides ("Give":
# G|ive, not Gi|ve). Each follows BOS, as every string the export's own check compares does.
SPM_STRINGS = [
    "Give me a hint.", "Hello world", "  two leading spaces", "tabs\tand\nnewlines\n\n", "1234567890 3.14159",
    "naïve café résumé", "日本語のテキスト", "emoji 🙂👍🏽 here", "def f(x):\n    return x ** 2  # square",
    "if (a && b) { return -1; }", "I've been there, they're here, we'll see", "UPPER lower MiXeD",
    "https://example.com/path?q=1&r=2", "   ", "a", "The quick brown fox jumps over the lazy dog.",
    "Supercalifragilisticexpialidocious", "multiple   spaces   inside", "[INST] hi [/INST]", "x</s>",
    "Ünïcödé ß ø å — “quotes” ‘single’ …"]


def _real_spm_tokenizer(name: str, root: Path):
    """The HF tokenizer loaded from a real SentencePiece file of the shared fixtures."""
    from transformers import AutoTokenizer

    tok_dir = root / "tok"
    tok_dir.mkdir(parents=True)
    (tok_dir / "tokenizer.model").write_bytes((SHARED_FIXTURES / "tokenizers" / f"{name}_tokenizer.model").read_bytes())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True}))
    return AutoTokenizer.from_pretrained(tok_dir)


def _real_spm_dir(name: str, root: Path) -> Path:
    """A merged-model folder as transformers 5 writes it for a real SentencePiece tokenizer: tokenizer.json
    only, no tokenizer.model; a 1-layer model of hidden size 16 (the 32k-row embedding is most of it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _real_spm_tokenizer(name, root)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=256))
    folder = root / "merged_16bit"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert not (folder / "tokenizer.model").exists()  # the case under test: the converter must do without it
    return folder


@pytest.mark.skipif(not (SHARED_FIXTURES / "tokenizers").is_dir(), reason="shared fixtures not present")
@pytest.mark.parametrize("name", ["llama2", "mistral_v1", "mistral_v3_instruct"])
def test_real_sentencepiece_tokenizer_without_tokenizer_model_gives_hf_ids(name, tmp_path):
    """Before piece scores were rebuilt from tokenizer.json's merges: 15, 17 and 17 of these 21 equal."""
    from transformers import AutoTokenizer

    folder = _real_spm_dir(name, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    result = export_gguf(folder, tmp_path / "gguf", ["f16"], template="mistral", verify=False, modelfile=False,
                         log=lambda s: None)
    llm = llama_cpp.Llama(model_path=result.items[0].path, vocab_only=True, verbose=False)
    try:
        differ = []
        for text in ("<s>" + t for t in SPM_STRINGS):
            hf = tokenizer(text, add_special_tokens=False)["input_ids"]
            got = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
            if got != hf:
                differ.append(describe_mismatch(text, hf, got, tokenizer))
    finally:
        llm.close()
    assert differ == [], "\n".join(differ)
    scores = _metadata_scores(result.items[0].path)
    give = tokenizer.convert_tokens_to_ids(["ive", "Gi"])
    assert scores[give[0]] > scores[give[1]]  # SentencePiece's order: G|ive before Gi|ve


def _spm_base(arch: str, template: str, root: Path) -> Path:
    """A base folder as the Hub has them: model, tokenizer.json and the real Llama-2 SentencePiece
    `tokenizer.model`, for a 1-layer `arch` (the llama2 vocabulary stands in for Gemma's and Phi-3's own:
    what is under test is the file the converters of those architectures insist on). The chat template's
    tokens are added first (ids 32000+), as sftlib's training adds them."""
    from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    from sftlib.training.tokenizer import prepare_tokenizer

    tokenizer = _real_spm_tokenizer("llama2", root)
    small = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, max_position_embeddings=256)
    config, cls = {"llama": (LlamaConfig(num_key_value_heads=1, **small), LlamaForCausalLM),
                   "gemma": (GemmaConfig(num_key_value_heads=1, head_dim=8, **small), GemmaForCausalLM),
                   "phi3": (Phi3Config(num_key_value_heads=2, pad_token_id=0, **small), Phi3ForCausalLM)}[arch]
    torch.manual_seed(0)
    model = cls(config)
    info = prepare_tokenizer(model, tokenizer, get_template(template))
    assert info.added_token_ids and min(info.added_token_ids) >= 32000
    base = root / "base"  # an architecture word in the name (hence in general.name) sets off llama.cpp's per-model
    # token lookups, which Phi-3's would fail on this stand-in vocabulary (it has no <|endoftext|>)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    (base / "tokenizer.model").write_bytes((root / "tok" / "tokenizer.model").read_bytes())
    return base


@pytest.mark.skipif(not (SHARED_FIXTURES / "tokenizers").is_dir(), reason="shared fixtures not present")
@pytest.mark.parametrize("arch,template", [("gemma", "gemma"), ("phi3", "phi-3"), ("llama", "chatml")])
def test_sentencepiece_base_keeps_its_tokenizer_model_through_export(arch, template, tmp_path):
    """transformers 5 saves no tokenizer.model: llama.cpp's Gemma and Phi-3 converters then stop ("Missing
    tokenizer.model"). sftlib's merged folder carries the base's file, the added tokens listed beside it, and
    the GGUF tokenizes like transformers, added tokens included."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlib.config import RunConfig
    from sftlib.exports.api import export

    base = _spm_base(arch, template, tmp_path)
    if arch != "llama":  # what users met before: the merged folder as transformers alone writes it
        bare = tmp_path / "bare"
        AutoModelForCausalLM.from_pretrained(base).save_pretrained(bare)
        AutoTokenizer.from_pretrained(base).save_pretrained(bare)
        with pytest.raises(GGUFExportError, match="tokenizer.model"):
            export_gguf(bare, tmp_path / "bare-gguf", ["f16"], template=template, verify=False, modelfile=False,
                        log=lambda s: None)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=4, target_modules=["o_proj", "down_proj"]))
    tokenizer = AutoTokenizer.from_pretrained(base)
    cfg = RunConfig().with_overrides({"model.name": str(base), "model.chat_template": template})
    with pytest.warns(UserWarning, match="stopping could not be checked"):  # random weights never end a turn
        report = export(model.eval(), tokenizer, cfg, ["merged_16bit", "gguf:f16"], out=tmp_path / "out",
                        max_new_tokens=8, log=lambda s: None)
    assert report.ok, report.table()
    merged = Path(report.paths["merged_16bit"])
    assert (merged / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    assert AutoTokenizer.from_pretrained(merged).get_vocab() == tokenizer.get_vocab()  # the listing loads back as it was
    f16 = report.items[-1]
    assert f16.check["token_mismatches"] == [] and f16.check["prompt_parity"] is True, f16.check
    markers = [t for t in tokenizer.added_tokens_decoder.values() if tokenizer.convert_tokens_to_ids(t.content) >= 32000]
    texts = ["<s>" + t for t in SPM_STRINGS] + [f"<s>{m.content}Give me a hint.{m.content}\n" for m in markers]
    llm = llama_cpp.Llama(model_path=report.paths["gguf:f16"], vocab_only=True, verbose=False)
    try:
        differ = [describe_mismatch(text, hf, got, tokenizer) for text in texts
                  if (hf := tokenizer(text, add_special_tokens=False)["input_ids"])
                  != (got := list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)))]
    finally:
        llm.close()
    assert differ == [], "\n".join(differ)


@pytest.mark.skipif(not (SHARED_FIXTURES / "tokenizers").is_dir(), reason="shared fixtures not present")
def test_save_tokenizer_copies_only_a_sentencepiece_model_that_matches(tmp_path):
    from sftlib.exports.merged import save_tokenizer

    tokenizer = _real_spm_tokenizer("llama2", tmp_path)
    save_tokenizer(tokenizer, tmp_path / "spm")
    assert (tmp_path / "spm" / "tokenizer.model").is_file()
    tiktoken = tmp_path / "llama3" / "tokenizer.model"  # Llama 3's file has that name and is no SentencePiece model
    tiktoken.parent.mkdir()
    tiktoken.write_bytes((SHARED_FIXTURES / "tokenizers" / "llama3_tokenizer.model").read_bytes())
    tokenizer.vocab_file = str(tiktoken)
    save_tokenizer(tokenizer, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").is_file() and not (tmp_path / "out" / "tokenizer.model").exists()


def _metadata_scores(path) -> list[float]:
    gguf_py = str(find_toolchain().source_dir / "gguf-py")
    if gguf_py not in sys.path:
        sys.path.insert(0, gguf_py)
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields["tokenizer.ggml.scores"]
    return [float(field.parts[i][0]) for i in field.data]


@pytest.mark.skipif(not (SHARED_FIXTURES / "tokenizers").is_dir(), reason="shared fixtures not present")
def test_token_mismatch_message_shows_where_the_ids_part(tmp_path):
    tokenizer = _real_spm_tokenizer("llama2", tmp_path)
    text = "<s>Give me a hint."
    hf = tokenizer(text, add_special_tokens=False)["input_ids"]
    gi, ve = tokenizer.convert_tokens_to_ids(["Gi", "ve"])
    flat_scores = [hf[0], gi, ve] + hf[3:]  # what llama.cpp gave with every piece scored -1000
    msg = describe_mismatch(text, hf, flat_scores, tokenizer)
    assert msg.startswith("'<s>Give me a hint.': ids differ from position 1 ")
    assert f"HF [1 '<s>', {hf[1]} 'G', {hf[2]} 'ive'," in msg and f"llama.cpp [1 '<s>', {gi} 'Gi', {ve} 've'," in msg


# ----------------------------------------------------------------------------- sftlib.export: every format


def _with_adapters(base_dir: Path, seed: int = 0):
    """The float32 model of `base_dir` with LoRA adapters (small random B: the merge must change weights,
    not answers), as training leaves it in memory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 1e-3)
    return model.eval(), AutoTokenizer.from_pretrained(base_dir)


def test_llama3_template_every_format_through_sftlib_export(tmp_path):
    """Llama-3-style byte-level BPE with the llama-3 template: lora, merged 16/4-bit and GGUF files, each
    checked, every one stopping at <|eot_id|> where the model in memory does."""
    from sftlib.config import RunConfig
    from sftlib.exports.api import export
    from sftlib.training.tokenizer import prepare_tokenizer

    corpus = [f"{q} {a}" for q, a in QA] * 30 + ["Tabs\tand\nnewlines, quotes, émojis 🙂, I've 1234567"] * 10
    tokenizer = _bpe_tokenizer(corpus)
    model = _llama(tokenizer, seed=2)
    template = get_template("llama-3")
    info = prepare_tokenizer(model, tokenizer, template)
    assert "<|eot_id|>" in info.added_tokens
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
    assert _train(model, tokenizer, template, convs, steps=100) < 0.05
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    peft_model, tokenizer = _with_adapters(tmp_path / "base")
    cfg = RunConfig().with_overrides({"model.name": str(tmp_path / "base"), "model.chat_template": "llama-3",
                                      "export.gguf_pre_tokenizer": "llama-bpe"})
    report = export(peft_model, tokenizer, cfg, ["lora", "merged_16bit", "merged_4bit", "gguf:f16", "gguf:q8_0"],
                    out=tmp_path / "out", conversations=CHECKS[:4], log=lambda s: None)
    assert report.ok, report.table()
    assert [w.format for w in report.items] == ["lora", "merged_16bit", "merged_4bit", "gguf:f16", "gguf:q8_0"]
    for w in report.items:
        assert w.check["stop_expected"] == w.check["stopped"] == 4, (w.format, w.check)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    meta = _metadata(report.paths["gguf:f16"])
    assert meta["tokenizer.ggml.eot_token_id"] == str(eot)
    assert meta["tokenizer.chat_template"].startswith("{{ bos_token }}") or "bos_token" in meta["tokenizer.chat_template"]
    assert 'PARAMETER stop "<|eot_id|>"' in (tmp_path / "out" / "gguf" / "Modelfile").read_text()


def test_sentencepiece_every_format_through_sftlib_export(spm_dir, tmp_path):
    """A SentencePiece (Llama-2/Mistral style) tokenizer and the mistral template, every format.

    The prompts are the generic ones: with this 400-piece vocabulary llama.cpp 0.3.36 splits "grass"
    differently from both sentencepiece and transformers (id 325 where they give 340 for "▁grass"),
    and the token-id check rightly fails the file on CHECKS[1]."""
    from sftlib.config import RunConfig
    from sftlib.exports.api import export
    from sftlib.exports.reference import DEFAULT_CONVERSATIONS

    peft_model, tokenizer = _with_adapters(spm_dir)
    cfg = RunConfig().with_overrides({"model.name": str(spm_dir), "model.chat_template": "mistral"})
    with pytest.warns(UserWarning, match="stopping could not be checked"):  # random weights never end a turn
        report = export(peft_model, tokenizer, cfg, ["lora", "merged_16bit", "merged_4bit", "gguf:f16"],
                        out=tmp_path / "out", conversations=DEFAULT_CONVERSATIONS, max_new_tokens=12, log=lambda s: None)
    assert report.ok, report.table()
    lora, merged, four, f16 = report.items
    assert lora.check["greedy_identical"] == 3 and lora.check["max_abs_dlogit"] <= 1e-3
    assert merged.check["greedy_identical"] + len(merged.check["notes"]) >= 3  # near-ties noted, not failed
    assert four.check["top1_agreement"] > 0.5
    assert f16.check["token_mismatches"] == [] and f16.check["prompt_parity"] is True


# ----------------------------------------------------------------------------- the command line


def test_cli_export_merges_adapters_and_writes_verified_gguf(chatml_dir, tmp_path):
    """`python -m sftlib export --config run.yaml --adapter DIR`, in a fresh process."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlib.exports.merged import save_adapters

    base = AutoModelForCausalLM.from_pretrained(chatml_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(chatml_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # small but non-zero: the merge must change the weights, not the answers
            p.data.normal_(0, 1e-3)
    save_adapters(model, tokenizer, tmp_path / "lora")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                            + "\n" for q, a in QA))
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent(f"""
        model: {{name: {chatml_dir}, chat_template: chatml, load_in_4bit: false, dtype: float32}}
        data: {{source: {data}, eval_size: 0}}
        export: {{output_dir: {tmp_path / "model"}, formats: [gguf], gguf_quantizations: [q8_0]}}
    """))
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "sftlib", "export", "--config", str(config), "--adapter",
                           str(tmp_path / "lora"), "--pre-tokenizer", "auto"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    gguf_dir = tmp_path / "model" / "gguf"
    # only what was asked for stays: the merged model the GGUF came from was a step, not an output
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["README.md", "export_report.json", "gguf"]
    report = json.loads((gguf_dir / "gguf_report.json").read_text())
    (q8,) = report["items"]
    assert q8["ok"] and Path(q8["path"]).name == "merged_16bit-sft.Q8_0.gguf" and Path(q8["path"]).is_file()
    assert q8["check"]["stopped"] == q8["check"]["stop_expected"] == 3  # prompts taken from the run's data
    assert (gguf_dir / "Modelfile").read_text().startswith("FROM ./merged_16bit-sft.Q8_0.gguf")
    assert "merged_16bit-sft.Q8_0.gguf" in proc.stdout and " ok " in proc.stdout


# ----------------------------------------------------------------------------- a real pretrained model


@needs_stories
def test_real_stories260k_gguf_tells_the_story_of_its_model_card(stories_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    expected = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    hf_dir = stories_dir  # the fixture checked the conversion against the model card's ids and text
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_ids = [1]
    with torch.no_grad():
        for _ in range(24):
            hf_ids.append(int(model(input_ids=torch.tensor([hf_ids])).logits[0, -1].argmax()))
    # hidden size 64: f16 only (K-quants would fall back to q5_0); no chat template was trained, so no checks
    result = export_gguf(hf_dir, tmp_path / "gguf", ["f16"], template="alpaca", model_name="stories260K",
                         add_bos=True, verify=False, modelfile=False, log=lambda s: None)
    llm = llama_cpp.Llama(model_path=result.items[0].path, n_ctx=128, n_threads=1, n_threads_batch=1, logits_all=True,
                          verbose=False)
    try:
        ids = [llm.token_bos()]
        llm.eval(ids)
        while len(ids) < len(hf_ids):
            ids.append(int(llm.scores[llm.n_tokens - 1].argmax()))
            llm.eval(ids[-1:])
        assert ids == hf_ids
        text = llm.create_completion("", max_tokens=40, temperature=0.0, repeat_penalty=1.0)["choices"][0]["text"]
        assert text.strip().startswith(expected), text
    finally:
        llm.close()
