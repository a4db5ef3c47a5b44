"""Secrets and safe loading: the Hub token is found, never shown or written; only safetensors load;
model code runs only when the config allows it.

    pytest tests/test_secrets.py -q

The Hub cannot be reached here, so uploads are tested up to the point where the network is needed:
without a token `push_folder` stops with a clear error, and a whole `python -m sftlib train` run with
a dummy token in the environment and `export.push_to_hub: true` is scanned, every byte it printed and
every file it wrote, for the token.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from sftlib import tokens as hub
from sftlib.config import ConfigError, RunConfig
from sftlib.exports.hub import push_folder
from sftlib.tokens import HubError, get_token, redact

REPO = Path(__file__).resolve().parents[1]
DUMMY = "hf_" + "Zq7dummyTokenForSftlibTests0123456789"  # shaped like a real token, valid nowhere
CORPUS = Path(__file__).resolve().parent / "malformed" / "model"


def test_token_sources_in_order(no_token, monkeypatch):
    assert get_token(interactive=False) is None
    # Colab: google.colab.userdata exists only there; a stand-in module plays the notebook's secret store.
    colab = types.ModuleType("google.colab")
    colab.userdata = types.SimpleNamespace(get=lambda name: DUMMY + "colab" if name == "HF_TOKEN" else None)
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    assert get_token(interactive=False) == DUMMY + "colab"
    monkeypatch.setenv("HF_TOKEN", f"  {DUMMY}\n")  # pasted with spaces and a newline: stripped
    assert get_token(interactive=False) == DUMMY
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delitem(sys.modules, "google.colab")
    monkeypatch.setattr("getpass.getpass", lambda prompt: DUMMY + "typed")  # what a person types, unseen
    assert get_token(interactive=True) == DUMMY + "typed"


def test_push_without_a_token_says_where_to_put_one(no_token, tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(HubError, match="no Hugging Face token found: set the HF_TOKEN environment variable") as err:
        push_folder(folder, "me/model", interactive=False)
    assert "Colab secret named HF_TOKEN" in str(err.value) and "hf auth login" in str(err.value)
    with pytest.raises(HubError, match="must look like `owner/name`"):
        push_folder(folder, "no-owner", token=DUMMY)
    with pytest.raises(HubError, match="not a folder with files"):
        push_folder(tmp_path / "missing", "me/model", token=DUMMY)


def test_a_folder_holding_the_token_is_never_uploaded(no_token, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "README.md").write_text(f"trained with token {DUMMY}\n")
    with pytest.raises(HubError, match=r"README\.md contain\(s\) a Hugging Face token") as err:
        push_folder(folder, "me/model", token=DUMMY)
    assert DUMMY not in str(err.value)


def test_redact_masks_known_and_token_shaped_strings(no_token, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "my-own-secret-value")  # not token-shaped: masked because it is the env's
    assert redact("a my-own-secret-value b") == "a hf_*** b"
    assert redact(f"x {DUMMY} y") == "x hf_*** y"
    assert redact("hf_short stays, it is not a token") == "hf_short stays, it is not a token"
    stream = io.StringIO()
    logger = logging.getLogger("sftlib.test-redaction")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        hub.redact_logging("sftlib.test-redaction")
        logger.warning("request with Authorization: Bearer %s failed", DUMMY)
    finally:
        logger.removeHandler(handler)
    assert DUMMY not in stream.getvalue() and "Bearer hf_***" in stream.getvalue()


def test_a_token_in_a_config_is_refused_and_not_echoed():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"export.hub_repo": DUMMY})
    assert "looks like a Hugging Face token" in str(err.value) and DUMMY not in str(err.value)
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"lora.r": DUMMY})  # a wrong-type message would quote the value
    assert DUMMY not in str(err.value)


def test_a_run_with_a_token_in_the_environment_leaks_it_nowhere(tiny_model_dir, tmp_path):
    """`python -m sftlib train` with HF_TOKEN set and an upload asked for (offline, so it fails at the end):
    the token is in no line it printed and no file it wrote (outputs, checkpoints, configs, model cards,
    caches under HF_HOME)."""
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"Say {w}"},
                                                           {"from": "gpt", "value": w}]}) + "\n"
                            for w in ("yes", "no", "maybe", "never") * 4))
    config = {
        "backend": "cpu",
        "model": {"name": str(tiny_model_dir), "load_in_4bit": False, "dtype": "float32", "max_seq_length": 64},
        "lora": {"r": 4, "alpha": 4},
        "data": {"source": str(data), "eval_size": 2},
        "train": {"max_steps": 2, "save_steps": 1, "batch_size": 4, "optim": "adamw_torch",
                  "gradient_checkpointing": "false", "output_dir": str(tmp_path / "run" / "train")},
        "export": {"formats": ["lora", "merged_16bit"], "output_dir": str(tmp_path / "run" / "model"),
                   "push_to_hub": True, "hub_repo": "me/tiny-chat"},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_TOKEN=DUMMY, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf-home"), SFTLIB_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "sftlib", "train", "--config", str(tmp_path / "run.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: could not upload" in proc.stderr and "offline mode is on" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert DUMMY not in proc.stdout + proc.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "adapter_model.safetensors" for p in written)           # the run did write outputs
    assert any(p.parent.name.startswith("checkpoint-") for p in written)         # and checkpoints
    leaks = [str(p) for p in written if DUMMY.encode() in p.read_bytes() or DUMMY[3:].encode() in p.read_bytes()]
    assert leaks == []


# ---- safe loading ---------------------------------------------------------------------------------------


def _cfg(folder: Path, **extra) -> RunConfig:
    return RunConfig.from_dict({"model.name": str(folder), "model.load_in_4bit": False, "model.dtype": "float32",
                                **extra})


def test_weights_load_from_safetensors_never_from_pickles(tiny_model_dir, tmp_path):
    from sftlib.training.backend import choose_backend
    from sftlib.training.model import load_model

    folder = tmp_path / "both"
    shutil.copytree(tiny_model_dir, folder)
    # A pickle that would run code if it were ever unpickled; with safetensors beside it, it must be ignored.
    (folder / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    model, _ = load_model(_cfg(folder), choose_backend("cpu"))
    assert not (tmp_path / "pwned").exists()
    assert model.get_input_embeddings().weight.shape[0] == 400


def test_model_code_runs_only_when_the_config_allows_it(tiny_model_dir, tmp_path, monkeypatch):
    from sftlib.training.backend import choose_backend
    from sftlib.training.model import ModelLoadError, load_model

    folder = tmp_path / "remote_code"
    shutil.copytree(CORPUS / "remote_code", folder)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder)
    mark = tmp_path / "ran"
    monkeypatch.setenv("SFTLIB_REMOTE_CODE_MARK", str(mark))
    assert RunConfig().model.trust_remote_code is False
    with pytest.raises(ModelLoadError, match="ships its own Python code"):
        load_model(_cfg(folder), choose_backend("cpu"))
    assert not mark.exists(), "the folder's code ran although trust_remote_code is off"
    model, _ = load_model(_cfg(folder, **{"model.trust_remote_code": True}), choose_backend("cpu"))
    assert mark.read_text() == "remote code ran" and type(model).__name__ == "ProbeForCausalLM"
