"""`sftlib.export(...)` and `python -m sftlib export --model DIR --formats ...`: every format written,
loaded back and checked against the model in memory, on a tiny model trained here on the CPU.

    pytest tests/test_exporter.py -q
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
PAIRS = [("Which colour is the sky?", "The colour is blue."), ("What colour is the sky?", "The colour is blue.")]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """The tiny model fine-tuned until it answers and stops (LoRA in memory, float32)."""
    from conftest import with_lora
    from sftlib.training.trainer import train

    tmp = tmp_path_factory.mktemp("exporter")
    data = tmp / "chat.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
                            + "\n" for q, a in PAIRS * 32))
    cfg = RunConfig.preset("cpu-demo").with_overrides({
        "model.name": str(tiny_model_dir), "data.source": str(data), "data.eval_size": 0,
        "train.max_steps": 40, "train.warmup_steps": 2, "train.batch_size": 4, "train.learning_rate": 1e-2,
        "train.output_dir": str(tmp / "out"), "export.output_dir": str(tmp / "model"),
        "export.gguf_quantizations": ["q8_0"], "export.gguf_pre_tokenizer": "auto",
    })
    model, tokenizer, _, rows, backend = with_lora(cfg)
    train(cfg, model, tokenizer, rows, backend=backend)
    model.eval()
    return dict(cfg=cfg, model=model, tokenizer=tokenizer, tmp=tmp)


@pytest.fixture(scope="module")
def exported(trained):
    import sftlib

    lines = []
    report = sftlib.export(trained["model"], trained["tokenizer"], trained["cfg"],
                           formats=["lora", "merged_16bit", "merged_4bit", "gguf", "gguf:f16"], log=lines.append)
    return report, "\n".join(lines)


def test_parse_formats():
    from sftlib.exports.api import parse_formats
    from sftlib.exports.report import ExportError

    assert parse_formats("lora,merged_16bit,gguf:q4_k_m,gguf:q8_0") == (["lora", "merged_16bit"], ["q4_k_m", "q8_0"])
    assert parse_formats(["gguf", "gguf:F16", "merged_4bit"], ["q8_0", "q2_k"]) == (["merged_4bit"], ["q8_0", "q2_k", "f16"])
    with pytest.raises(ExportError) as err:
        parse_formats(["lora", "merged_8bit", "gguf:q9_k", "gguf:iq2_xxs"])
    text = str(err.value)  # every problem at once, each named
    assert "`merged_8bit`" in text and "q9_k" in text and "importance matrix" in text
    with pytest.raises(ExportError, match="export.gguf_quantizations"):
        parse_formats(["gguf"], [])
    with pytest.raises(ExportError, match="no format"):
        parse_formats("")


def test_export_table_keeps_absolute_paths_whole():
    """ExportReport.table(): inside the export folder a path is shown relative to it; an absolute path outside it,
    or under an export folder at the root `/`, keeps its leading `/` (it once read `tmp/run/model.gguf`)."""
    from sftlib.exports.report import ExportReport, Output

    def shown(out_dir: str, path: str) -> str:
        report = ExportReport(out_dir=out_dir, items=[Output("lora", path, 10, 1.0, True)])
        return report.table().splitlines()[1].split()[1]

    assert shown("/tmp/run/model", "/tmp/run/model/lora") == "lora"
    assert shown("/", "/tmp/run/model.gguf") == "/tmp/run/model.gguf"
    assert shown("/tmp/run/model", "/srv/elsewhere/lora") == "/srv/elsewhere/lora"
    assert shown("model", "/tmp/run/model/lora") == "/tmp/run/model/lora"
    assert shown("", "/tmp/run/lora") == "/tmp/run/lora"
    assert shown("model", "model/merged_16bit") == "merged_16bit"


def test_every_format_is_written_and_verified(exported, trained):
    report, log = exported
    out = Path(trained["cfg"].export.output_dir)
    assert report.ok, report.table()
    assert [w.format for w in report.items] == ["lora", "merged_16bit", "merged_4bit", "gguf:q8_0", "gguf:f16"]
    for w in report.items:
        assert w.ok is True and Path(w.path).exists() and w.bytes > 0 and w.seconds >= 0
        assert w.check["stop_expected"] == w.check["stopped"] == 3, (w.format, w.check)  # it answers and stops
    lora, merged, four = report.items[:3]
    assert lora.check["max_abs_dlogit"] <= 1e-3 and lora.check["greedy_identical"] == 3
    assert merged.check["greedy_identical"] == 3 and merged.check["top1_agreement"] >= 0.95
    assert (out / "lora" / "adapter_config.json").is_file()
    assert not json.loads((out / "merged_16bit" / "config.json").read_text()).get("quantization_config")
    quant = json.loads((out / "merged_4bit" / "config.json").read_text())["quantization_config"]
    assert quant["load_in_4bit"] and quant["bnb_4bit_quant_type"] == "nf4"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no scratch or temporary folder left
    saved = json.loads((out / "export_report.json").read_text())
    assert [i["format"] for i in saved["items"]] == [w.format for w in report.items]
    table = report.table()
    assert table in log and "merged_4bit" in table and table.count(" ok ") == 5


def test_merged_4bit_loads_in_plain_transformers_as_4bit(exported):
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    report, _ = exported
    model = AutoModelForCausalLM.from_pretrained(report.paths["merged_4bit"])
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)


def test_a_broken_write_is_reported_and_kept_aside(trained, monkeypatch):
    """Sabotage the merge after it is written: the check must catch it, name it, and keep the folder aside."""
    from safetensors.torch import load_file, save_file

    import sftlib.exports.merged
    from sftlib.exports.api import export
    from sftlib.exports.report import ExportVerifyError

    real = sftlib.exports.merged.save_merged

    def broken(*args, **kwargs):
        folder = real(*args, **kwargs)
        weights = load_file(folder / "model.safetensors")
        name = next(k for k in weights if k.endswith("layers.1.mlp.down_proj.weight"))
        weights[name] = weights[name] * 8
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        return folder

    monkeypatch.setattr(sftlib.exports.merged, "save_merged", broken)
    out = trained["tmp"] / "broken"
    with pytest.raises(ExportVerifyError, match="merged_16bit"):
        export(trained["model"], trained["tokenizer"], trained["cfg"], ["lora", "merged_16bit"], out=out,
               log=lambda s: None)
    assert (out / "merged_16bit.failed").is_dir() and not (out / "merged_16bit").exists()
    assert (out / "lora").is_dir()
    saved = json.loads((out / "export_report.json").read_text())
    assert [(i["format"], i["ok"]) for i in saved["items"]] == [("lora", True), ("merged_16bit", False)]


def _nf4_in_float32(weight) -> torch.Tensor:
    """The values an NF4 weight stands for, computed here in float32: code[index] * absmax of its block.

    Written out rather than asked of bitsandbytes, whose CPU kernels compute in bfloat16 on CPUs with
    avx512_bf16 (and repack the weight on its first forward): the reference must not depend on the machine."""
    state = weight.quant_state
    assert not state.nested, "double quantization is not used here"
    packed = weight.data.flatten().to(torch.uint8)
    index = torch.stack([packed >> 4, packed & 0x0F], dim=-1).flatten().long()  # two codes a byte, high first
    n = state.shape.numel()
    blocks = state.code.float()[index][:n].view(-1, state.blocksize)
    return (blocks * state.absmax.float()[:, None]).reshape(state.shape)


def test_merged_16bit_from_a_base_stored_in_4bit_is_a_plain_16bit_model(trained, tmp_path):
    """An `...-bnb-4bit` base: the merge dequantizes it first instead of writing a 4-bit model again, and the
    merged model computes what the 4-bit weights stand for plus the adapters."""
    import bitsandbytes as bnb
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from sftlib.exports.merged import save_adapters, save_merged

    base_dir = Path(trained["cfg"].model.name)
    quantized = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    quantized.save_pretrained(tmp_path / "base-bnb-4bit")
    tokenizer.save_pretrained(tmp_path / "base-bnb-4bit")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base-bnb-4bit"),
                           LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    save_adapters(model, tokenizer, tmp_path / "lora")
    folder = save_merged(str(tmp_path / "base-bnb-4bit"), tmp_path / "lora", tmp_path / "merged", dtype="float32")
    config = json.loads((folder / "config.json").read_text())
    assert not config.get("quantization_config")
    merged = AutoModelForCausalLM.from_pretrained(folder)
    assert type(merged.model.layers[0].mlp.down_proj) is torch.nn.Linear
    # The export's check reloads the adapters on the base as it trained, passing the training model's
    # quantization settings (a dict under Unsloth): a base stored in 4-bit loads as saved, without a clash.
    from sftlib.exports.merged import load_adapters

    reloaded, _ = load_adapters(str(tmp_path / "base-bnb-4bit"), tmp_path / "lora",
                                quantization_config=quantized.config.quantization_config.to_dict())
    assert isinstance(reloaded.get_base_model().model.layers[0].mlp.down_proj.base_layer, bnb.nn.Linear4bit)

    # The reference: the float32 base with every 4-bit weight replaced by the values it stands for, and the
    # adapters unmerged on top. No bitsandbytes kernel runs in it.
    reference = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    stored = AutoModelForCausalLM.from_pretrained(tmp_path / "base-bnb-4bit")  # never run: weights as saved
    replaced = 0
    for name, module in stored.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            reference.get_submodule(name).weight.data = _nf4_in_float32(module.weight)
            replaced += 1
    assert replaced == 7 * reference.config.num_hidden_layers
    reference = PeftModel.from_pretrained(reference, tmp_path / "lora")
    ids = torch.tensor([tokenizer("The capital of France is Paris.")["input_ids"]])
    with torch.no_grad():
        got, want = merged(ids).logits, reference(ids).logits
    # Both are float32 sums of the same products, W x + B A x in one and (W + B A) x in the other: they
    # differ by rounding, about 1e-7 of the largest logit a term; 1e-4 of it is far above that and far
    # below any wrong weight (one NF4 step is ~10% of a weight).
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item() + 1e-6


def test_cli_export_from_an_adapter_folder(trained):
    """`python -m sftlib export --model DIR --formats ... --out DIR` in a fresh process, no config: the base
    comes from the adapters, the template from the saved tokenizer."""
    from sftlib.exports.merged import save_adapters

    tmp = trained["tmp"]
    save_adapters(trained["model"], trained["tokenizer"], tmp / "cli-lora")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "sftlib", "export", "--model", str(tmp / "cli-lora"), "--formats",
                           "lora,merged_16bit", "--out", str(tmp / "cli-out")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp / "cli-out" / "export_report.json").read_text())
    assert [(i["format"], i["ok"]) for i in report["items"]] == [("lora", True), ("merged_16bit", True)]
    assert "merged_16bit" in proc.stdout and "verification" in proc.stdout
    # a merged folder works as the starting point too (no adapters: `lora` is not on offer)
    merged = subprocess.run([sys.executable, "-m", "sftlib", "export", "--model", str(tmp / "cli-out" / "merged_16bit"),
                             "--formats", "merged_16bit,merged_4bit", "--out", str(tmp / "cli-merged")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert merged.returncode == 0, merged.stdout[-2000:] + merged.stderr[-3000:]
    again = json.loads((tmp / "cli-merged" / "export_report.json").read_text())
    assert [(i["format"], i["ok"]) for i in again["items"]] == [("merged_16bit", True), ("merged_4bit", True)]
    assert again["items"][0]["check"]["greedy_identical"] == again["items"][0]["check"]["prompts"]
    bad = subprocess.run([sys.executable, "-m", "sftlib", "export", "--model", str(tmp / "cli-lora"), "--formats",
                          "lora,gguf:q9", "--out", str(tmp / "cli-bad")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert bad.returncode == 2 and "q9" in bad.stderr and "Traceback" not in bad.stderr
    empty = tmp / "not-a-model"
    empty.mkdir()
    none = subprocess.run([sys.executable, "-m", "sftlib", "export", "--model", str(empty), "--formats", "lora"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert none.returncode == 2 and "adapter_config.json" in none.stderr and "Traceback" not in none.stderr


def test_cli_export_without_config_names_what_it_exports_and_takes_template(trained, tiny_model_dir):
    """A `--set` without a config keeps the base the adapters name (not the default config's model); the GGUF
    file and its general.name come from that base; a tokenizer without a template needs `--template`, which
    then works."""
    import llama_cpp

    from sftlib.exports.merged import save_adapters

    tmp = trained["tmp"]
    folder = save_adapters(trained["model"], trained["tokenizer"], tmp / "bare-lora")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "sftlib", "export", "--model", str(folder), "--set", "export.check_max_new_tokens=64",
           "--formats", "gguf:f16", "--pre-tokenizer", "auto", "--out", str(tmp / "bare-out")]
    missing = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert missing.returncode == 2 and "pass --template" in missing.stderr, missing.stderr[-2000:]
    proc = subprocess.run(cmd + ["--template", "chatml"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Meta-Llama" not in proc.stdout + proc.stderr and str(tiny_model_dir) in proc.stdout
    assert "generic prompts" in proc.stdout  # no run config: the default data set is not this model's
    (item,) = json.loads((tmp / "bare-out" / "export_report.json").read_text())["items"]
    path = Path(item["path"])
    assert item["ok"] and path.name == f"{tiny_model_dir.name}-sft.F16.gguf", item
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        assert llm.metadata["general.name"] == f"{tiny_model_dir.name}-sft"
    finally:
        llm.close()


def test_a_format_too_big_to_load_back_is_written_and_said_unchecked(trained, monkeypatch):
    """An 8B merged in 16-bit will not load beside the training model on a 15 GB T4: written, not checked, said so."""
    import sftlib.exports.verify
    from sftlib.exports.api import export

    monkeypatch.setattr(sftlib.exports.verify, "available_ram", lambda: 1000)  # bytes free, as on a full machine
    out = trained["tmp"] / "tight"
    with pytest.warns(UserWarning, match="written but not checked"):
        report = export(trained["model"], trained["tokenizer"], trained["cfg"], ["lora", "merged_16bit"], out=out,
                        log=lambda s: None)
    assert [(w.format, w.ok) for w in report.items] == [("lora", None), ("merged_16bit", None)]
    assert all("not verified: loading it back needs about" in w.summary for w in report.items)
    assert (out / "merged_16bit" / "model.safetensors").is_file() and report.ok
