"""Bad input gives sftlib's own error, naming the file, the row and the field, and writes nothing.

    pytest tests/test_malformed.py -q

The corpus lives in tests/malformed/: data files (data/), run configs (config/) and model folders
(model/; the tokenizer files are copied in from the tiny test model, and one more case, a tokenizer
without the EOS token a template ends turns with, is derived from it here). Every case goes through
the real entry point (`load_dataset`, `RunConfig.from_yaml`, `load_model` + `prepare_tokenizer`) and
through `python -m sftlib train` (in-process via `cli.main`, and a few in a subprocess), which must
exit with code 2 and a message without a traceback, leaving the output folders unmade.

The property-based tests generate rows and conversations with hypothesis: format detection,
conversion, rendering and encoding either succeed with well-formed output or raise sftlib's own
validation error; nothing else may escape.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftlib import cli
from sftlib.config import ConfigError, DataConfig, RunConfig
from sftlib.data import DataError, detect_format, load_dataset, to_messages
from sftlib.data.encode import IGNORE, EncodeError, encode_conversation
from sftlib.training.model import ModelLoadError, load_model
from sftlib.training.tokenizer import prepare_tokenizer
from sftlib.data.templates import ChatTemplateError, get_template

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parent / "malformed"

# file -> phrases its error must contain (besides the file's own path, always required). Row numbers
# are 0-based rows of the loaded split; parse errors give the 1-based line of the file as editors show it.
DATA_CASES = {
    "not_json.json": ["line 1, column 1", "Expecting value"],
    "broken_line.jsonl": ["line 3, column 52", "row 2", "Expecting ',' delimiter"],
    "truncated.json": ["line 1, column 80", "cut off while being written"],
    "empty.jsonl": ["is empty: it has no rows"],
    "whitespace_only.json": ["is empty: it has no rows"],
    "not_parquet.parquet": ["could not be read as parquet", "not a parquet file"],
    "unclosed_quote.csv": ["could not be read as CSV", "EOF inside string"],
    "chats.txt": ["unsupported file type `.txt`", ".jsonl"],
    "bad_utf8.jsonl": ["line 2 is not valid UTF-8", "0xe9", "re-save the file as UTF-8"],
    "list_of_strings.json": ["row 0 is a string, not an object", '{"text": "..."}'],
    "object_not_list.json": ["row 0", "keys are `data`", "`data.format`"],
    "unknown_keys.jsonl": ["row 0", "`prompt`, `completion`", "`data.mapping`"],
    "preference_pairs.jsonl": ["preference data (`chosen`/`rejected`", '{"instruction": "prompt", "output": "chosen"}'],
    "kto_labels.jsonl": ["KTO data", "`label` column marks 1 of 2 replies undesirable", "KTO trainer"],
    "tool_calls.jsonl": ["tool-calling data", "1 of 2 rows have tool turns ('function_call', 'observation')",
                         "1 row defines functions in the `tools` column", "does not train tool calling yet"],
    "sharegpt_missing_conversations.jsonl": ["row 2: `conversations` is missing"],
    "openai_missing_messages.jsonl": ["row 1: `messages` is missing"],
    "alpaca_missing_output.jsonl": ["row 1: `output` is missing"],
    "alpaca_output_number.jsonl": ["row 1: `output` must be a string, got int"],
    "alpaca_nulls.parquet": ["row 1: `output` is missing", "row 2: `instruction` is empty"],
    "unknown_role.jsonl": ["row 1: `conversations[1].from` is 'bot', not a known role", '{"assistant": "bot"}'],
    "empty_turn.jsonl": ["row 2: `conversations[1].value` is empty"],
    "whitespace_turn.jsonl": ["row 0: `messages[0].content` is empty (only whitespace)"],
    "content_number.jsonl": ["row 2: `messages[1].content` must be a string, got int"],
    "content_parts_list.jsonl": ["row 1: `messages[0].content` must be a string, got list"],
    "no_assistant_turn.jsonl": ["row 1: has no assistant turn", "drop the row"],
    "ends_on_user.jsonl": ["row 1: ends on a user turn (`messages[2]`)", "drop the trailing turn"],
    "mixed_formats.jsonl": ["row 3 is in the `alpaca` format", "read as `sharegpt`"],
    "conversations_is_text.jsonl": ["row 0: `conversations` must be a list of turns, got str"],
    "conversations_in_csv.csv": ["row 0: `conversations` must be a list of turns, got str", "JSON Lines or parquet"],
    "empty_conversation.jsonl": ["row 1: `conversations` is an empty list"],
    "turns_are_strings.jsonl": ["row 0: `conversations[0]` must be an object with `from` and `value`, got str"],
    "turn_without_role.jsonl": ["row 1: `conversations[0]` has no `from`", "`data.mapping.role`"],
    "system_not_first.jsonl": ["row 0: `messages[1]` is a system turn after the first turn"],
    "null_row.jsonl": ["row 1: `conversations` is missing"],
    "text_empty.jsonl": ["row 1: `text` is empty"],
    "deep_nesting.jsonl": ["line 2 nests values more than 64 levels deep"],
    "no_data_files": ["holds no data files"],
    # made by the test (see MADE): links, pipes and devices are not stored in git
    "symlink_loop.jsonl": ["`data.source`", "symbolic link that leads back to itself", "fix or remove the link"],
    "dangling_link.jsonl": ["symbolic link to", "which does not exist", "fix the link"],
    "fifo.jsonl": ["a named pipe (FIFO), not a regular file", "save the contents to a file"],
    "device": ["a character device, not a regular file", "save the contents to a file"],
    "unreadable": ["cannot be read (Permission denied)", "check its permissions"],
}
CONFIG_CASES = {
    "wrong_type_rank.yaml": ["`lora.r` must be an integer, got 'sixteen'"],
    "unknown_key.yaml": ["unknown key `lora.rank`; did you mean `lora.r`?"],
    "negative_rank.yaml": ["`lora.r` must be a positive integer, got -8"],
    "learning_rate_10.yaml": ["`train.learning_rate` must be in (0, 1], got 10.0"],
    "max_length_0.yaml": ["`model.max_seq_length` must be a positive integer, got 0"],
    "bad_indent.yaml": ["the YAML does not parse: line 3, column 9"],
    "tab_indent.yaml": ["line 2, column 1", "never tabs"],
    "trailing_comma.json": ["the JSON does not parse", "line 1, column 19"],
    "section_not_mapping.yaml": ["`lora` must be a mapping of its fields"],
    "top_level_list.yaml": ["a config must be a mapping"],
    "batch_size_bool.yaml": ["`train.batch_size` must be an integer, got True"],
    "unknown_dtype.yaml": ["`model.dtype` must be one of", "'fp8'"],
    "unknown_template.yaml": ["`model.chat_template` got unknown value 'vicuna'"],
    "empty_source.yaml": ["`data.source` is empty"],
    "eval_size_exceeds_rows.yaml": ["`data.eval_size` (20) holds out every one of `data.max_rows` (10)"],
    "token_in_config.yaml": ["`export.hub_token` holds what looks like a Hugging Face token", "HF_TOKEN"],
    "duplicate_key.yaml": ["line 4: the key `r` appears twice (first on line 2)"],
    "duplicate_key.json": ["the key `lora` twice in one object"],
    "alias_bomb.yaml": ["line 5: more than 32 aliases"],
    "deep_nesting.yaml": ["line 2: values nest more than 32 levels deep"],
    "deep_nesting.json": ["nests values more than 32 levels deep"],
    "rank_huge.yaml": ["`lora.r` is 10000000000000000198...: at most 4096"],
    "epochs_inf.yaml": ["`train.epochs` must be a finite number, got inf"],
    "learning_rate_nan.yaml": ["`train.learning_rate` must be a finite number, got nan"],
    "folder.yaml": ["is a folder, not a file", "give a file inside it"],
    "symlink_loop.yaml": ["symbolic link that leads back to itself", "fix or remove the link"],
    "fifo.yaml": ["a named pipe (FIFO), not a regular file"],
    "unreadable.yaml": ["cannot be read (Permission denied)", "check its permissions"],
}
PARSE_REFUSED = {"folder.yaml", "symlink_loop.yaml", "fifo.yaml", "unreadable.yaml", "bad_indent.yaml",
                 "tab_indent.yaml", "trailing_comma.json", "top_level_list.yaml", "duplicate_key.yaml",
                 "duplicate_key.json", "alias_bomb.yaml", "deep_nesting.yaml", "deep_nesting.json"}
MODEL_CASES = {
    "no_weights": ["has no weight files"],
    "no_config": ["has no config.json"],
    "bin_only": ["pytorch_model.bin, not safetensors", "use_safetensors=False", "save_pretrained"],
    "corrupt_safetensors": ["damaged file", "SafetensorError"],
    "corrupt_config": ["config.json", "not a valid JSON file"],
    "remote_code": ["ships its own Python code", "`model.trust_remote_code: true`"],
    "tokenizer_without_eos": ["`model.chat_template` = `alpaca`", "eos_token", "tokenizer_config.json"],
    "unknown_model_type": ["`model_type` is 'llama9000'", "does not know", "pip install -U transformers"],
    "no_tokenizer": ["has no tokenizer files", "tokenizer.save_pretrained"],
    "config_is_folder": ["its config.json is not a file", "save the model there again"],
    "missing": ["does not exist", "check the path"],
    "empty": ["has no config.json", "point it at a saved model folder"],
    "a_file": ["is a file, not a folder", "give the folder that holds it"],
    "symlink_loop": ["symbolic link that leads back to itself", "fix or remove the link"],
}
# `python -m sftlib export --model FOLDER` (and `load_for_export`); checkpoint folders also as `train.resume`
EXPORT_CASES = {
    "truncated_checkpoint": ["checkpoint", "is incomplete", "adapter_model.safetensors` has 222 bytes, not the 4218",
                             "export from a complete checkpoint"],
    "checkpoint_without_marker": ["is incomplete", "has no `sftlib_checkpoint.json`", "export from a complete"],
    "base_deleted": ["adapter_config.json` (`base_model_name_or_path`)", "/nonexistent/sftlib-deleted-base",
                     "does not exist", "--set model.name=BASE"],
    "missing": ["--model", "does not exist", "check the path"],
    "symlink_loop": ["--model", "symbolic link that leads back to itself"],
    "a_file": ["--model", "is a file, not a folder"],
}
CHECKPOINT_CASES = {"truncated_checkpoint": "has 222 bytes, not the 4218",
                    "checkpoint_without_marker": "has no `sftlib_checkpoint.json`"}


PREFLIGHT_READS_NO_WEIGHTS = {"no_weights", "bin_only", "corrupt_safetensors"}  # pre-flight loads no weights
ALL_CASES = ([("data", n) for n in DATA_CASES] + [("config", n) for n in CONFIG_CASES]
             + [("model", n) for n in MODEL_CASES])
UNREADABLE = Path("/proc/sys/vm/compact_memory")  # refuses reading even to root (permission bits do not)


def _make(kind: str, name: str, root: Path) -> Path:
    """The cases that cannot be stored in git: links, pipes, devices, a missing path, an empty folder."""
    if name == "device":
        return Path("/dev/zero")  # never read: it never ends
    if name.startswith("unreadable"):
        return UNREADABLE
    path = root / kind / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.startswith("symlink_loop"):
        os.symlink(path.name, path)
    elif name.startswith("dangling_link"):
        os.symlink("gone.jsonl", path)
    elif name.startswith("fifo"):
        os.mkfifo(path)
    elif name == "empty":
        path.mkdir()
    elif name == "a_file":
        path.write_text("not a folder\n")
    return path  # "missing": nothing made


MADE = {("data", n) for n in ("symlink_loop.jsonl", "dangling_link.jsonl", "fifo.jsonl", "device", "unreadable")}
MADE |= {("config", n) for n in ("symlink_loop.yaml", "fifo.yaml", "unreadable.yaml")}
MADE |= {("model", n) for n in ("missing", "empty", "a_file", "symlink_loop", "tokenizer_without_eos")}
MADE |= {("export", n) for n in ("missing", "symlink_loop", "a_file")}


def _unreadable_here() -> bool:
    try:
        os.close(os.open(UNREADABLE, os.O_RDONLY))
    except OSError:
        return True
    return False


def _skip_unless_possible(name: str) -> None:
    if name.startswith("unreadable") and not _unreadable_here():
        pytest.skip(f"{UNREADABLE} can be opened here, so there is no unreadable file to give")


def test_the_corpus_is_complete():
    """Every file in tests/malformed has a case here and the other way round: none is silently skipped."""
    on_disk = {("data", p.name) for p in (CORPUS / "data").iterdir()}
    on_disk |= {("config", p.name) for p in (CORPUS / "config").iterdir()}
    on_disk |= {("model", p.name) for p in (CORPUS / "model").iterdir()}
    on_disk |= {("export", p.name) for p in (CORPUS / "export").iterdir()}
    made = {case for case in MADE if case[0] != "export"}
    assert not on_disk & MADE, "a case both stored and made"
    assert on_disk | made == set(ALL_CASES) | {("export", n) for n in EXPORT_CASES} - MADE
    assert {("export", n) for n in EXPORT_CASES} >= {c for c in MADE if c[0] == "export"}
    assert set(CHECKPOINT_CASES) <= set(EXPORT_CASES)
    assert len(ALL_CASES) + len(EXPORT_CASES) >= 30


@pytest.fixture(scope="module")
def model_cases(tiny_model_dir, tmp_path_factory) -> Path:
    """The model folders of the corpus, with the tiny model's tokenizer files; plus one tokenizer without EOS."""
    root = tmp_path_factory.mktemp("model-cases")
    for case in (CORPUS / "model").iterdir():
        shutil.copytree(case, root / case.name)
        for name in ("tokenizer.json", "tokenizer_config.json") if case.name != "no_tokenizer" else ():
            shutil.copy(tiny_model_dir / name, root / case.name / name)
    for case in ("remote_code", "no_tokenizer"):
        shutil.copy(tiny_model_dir / "model.safetensors", root / case)
    for kind, name in MADE - {("model", "tokenizer_without_eos")}:
        _make(kind, name, root / "made")
    no_eos = root / "tokenizer_without_eos"
    shutil.copytree(tiny_model_dir, no_eos)
    config = json.loads((no_eos / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (no_eos / "tokenizer_config.json").write_text(json.dumps(config))
    return root


def _case_input(kind: str, name: str, model_cases: Path) -> Path:
    if (kind, name) in MADE and name != "tokenizer_without_eos":
        return _made_path(kind, name, model_cases)
    if kind == "export":
        folder = CORPUS / "export" / name
        return next(folder.glob("checkpoint-*"), folder)  # a checkpoint case: the checkpoint-N folder inside
    return model_cases / name if kind == "model" else CORPUS / kind / name


def _made_path(kind: str, name: str, model_cases: Path) -> Path:
    if name == "device":
        return Path("/dev/zero")
    return UNREADABLE if name.startswith("unreadable") else model_cases / "made" / kind / name


def _call_entry_point(kind: str, name: str, model_cases: Path):
    """The library call a user (or the pipeline) makes with this input; returns the exception raised."""
    path = _case_input(kind, name, model_cases)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if kind == "data":
                load_dataset(DataConfig(source=str(path)))
            elif kind == "config":
                (RunConfig.from_json if path.suffix == ".json" else RunConfig.from_yaml)(path)
            else:
                from sftlib.training.backend import choose_backend

                template = "alpaca" if name == "tokenizer_without_eos" else "chatml"
                cfg = RunConfig.from_dict({"model.name": str(path), "model.load_in_4bit": False,
                                           "model.dtype": "float32", "model.chat_template": template})
                model, tokenizer = load_model(cfg, choose_backend("cpu"))
                prepare_tokenizer(model, tokenizer, get_template(template))
        except Exception as exc:  # the assertions below say which kinds are acceptable
            return exc
    return None


EXPECTED_TYPE = {"data": DataError, "config": ConfigError, "model": ModelLoadError}


@pytest.mark.parametrize("kind,name", ALL_CASES, ids=[f"{k}/{n}" for k, n in ALL_CASES])
def test_entry_point_names_the_file_row_and_field(kind, name, model_cases):
    _skip_unless_possible(name)
    exc = _call_entry_point(kind, name, model_cases)
    assert exc is not None, f"{kind}/{name} was accepted"
    assert type(exc) is EXPECTED_TYPE[kind], f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
    message = str(exc)
    path = _case_input(kind, name, model_cases)
    assert str(path) in message, f"the message does not name {path}: {message}"
    expected = {**DATA_CASES, **CONFIG_CASES, **MODEL_CASES}[name]
    for phrase in expected:
        assert phrase in message, f"{phrase!r} not in: {message}"
    if kind == "model" and name == "remote_code":
        assert exc.__cause__ is not None  # the dependency's own words stay reachable for a bug report


def _run_config(kind: str, name: str, model_cases: Path, tiny_model_dir: Path, out: Path) -> Path:
    """The config `python -m sftlib train --config` gets for one case; outputs go under `out`."""
    if kind == "config":
        source = _case_input(kind, name, model_cases)
        if name in PARSE_REFUSED:
            return source  # the file itself is refused before it becomes a mapping: run it as it is
        d = yaml.safe_load(source.read_text())
    else:
        d = {}
    good_data = out.parent / "good.jsonl"
    good_data.write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi"},
                                                       {"from": "gpt", "value": "Hello"}]}) + "\n")
    base = {"backend": "cpu", "model": {"name": str(tiny_model_dir), "load_in_4bit": False, "dtype": "float32",
                                        "chat_template": "chatml"},
            "data": {"source": str(good_data)},
            "train": {"max_steps": 1, "optim": "adamw_torch", "gradient_checkpointing": "false",
                      "output_dir": str(out / "train")},
            "export": {"formats": ["lora"], "output_dir": str(out / "model")}}
    if kind == "data":
        base["data"]["source"] = str(_case_input(kind, name, model_cases))
    elif kind == "model":
        base["model"]["name"] = str(_case_input(kind, name, model_cases))
        if name == "tokenizer_without_eos":
            base["model"]["chat_template"] = "alpaca"
    for section, values in d.items():  # the malformed config's own values win
        if isinstance(base.get(section), dict) and isinstance(values, dict):
            base[section].update(values)
        else:
            base[section] = values
    path = out.parent / ("run" + (CORPUS / "config" / name).suffix if kind == "config" else "run.yaml")
    path.write_text(json.dumps(base) if path.suffix == ".json" else yaml.safe_dump(base))
    return path


def _assert_one_paragraph(stderr: str) -> None:
    assert "Traceback" not in stderr and "site-packages" not in stderr, stderr
    text = stderr.strip()
    assert text and "\n\n" not in text, f"not one paragraph:\n{stderr}"


@pytest.mark.parametrize("kind,name", ALL_CASES, ids=[f"{k}/{n}" for k, n in ALL_CASES])
def test_cli_train_exits_2_without_traceback_and_writes_nothing(kind, name, model_cases, tiny_model_dir, tmp_path,
                                                                capsys):
    _skip_unless_possible(name)
    out = tmp_path / "out"
    config = _run_config(kind, name, model_cases, tiny_model_dir, out)
    before = sorted(p.name for p in _case_input(kind, name, model_cases).parent.iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main(["train", "--config", str(config)])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    _assert_one_paragraph(stderr)
    assert "error: " in stderr
    assert not out.exists(), f"wrote {[str(p) for p in out.rglob('*')]}"
    assert sorted(p.name for p in _case_input(kind, name, model_cases).parent.iterdir()) == before


@pytest.mark.parametrize("name", EXPORT_CASES)
def test_export_refuses_a_folder_it_cannot_use(name, model_cases, tmp_path, capsys):
    """`python -m sftlib export --model FOLDER`: a checkpoint cut short, a base that is gone, a path that is not
    a folder; `load_for_export` raises ExportError naming the folder and the fix, the CLI exits 2, nothing written."""
    from sftlib.exports import load_for_export
    from sftlib.exports.report import ExportError

    folder = _case_input("export", name, model_cases)
    with pytest.raises(ExportError) as caught:
        load_for_export(folder, device="cpu")
    for phrase in [str(folder), *EXPORT_CASES[name]]:
        assert phrase in str(caught.value), f"{phrase!r} not in: {caught.value}"
    before = sorted(p.name for p in folder.parent.iterdir())
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main(["export", "--model", str(folder), "--out", str(out)])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    _assert_one_paragraph(stderr)
    assert "error: " in stderr and str(folder) in stderr
    assert not out.exists() and sorted(p.name for p in folder.parent.iterdir()) == before


@pytest.mark.parametrize("name", CHECKPOINT_CASES)
def test_train_refuses_to_resume_from_an_incomplete_checkpoint(name, model_cases, tiny_model_dir, tmp_path, capsys):
    """The same folders as `train.resume`: refused before the model loads or any folder is made."""
    folder = _case_input("export", name, model_cases)
    out = tmp_path / "out"
    config = _run_config("model", "no_weights", model_cases, tiny_model_dir, out)  # a run config to start from
    run = yaml.safe_load(config.read_text())
    run["model"]["name"] = str(tiny_model_dir)
    run["train"]["resume"] = str(folder)
    config.write_text(yaml.safe_dump(run))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main(["train", "--config", str(config)])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    _assert_one_paragraph(stderr)
    assert f"`train.resume` = `{folder}` cannot be resumed from" in stderr
    assert CHECKPOINT_CASES[name] in stderr


PREFLIGHT_CASES = [(k, n) for k, n in ALL_CASES if n not in PREFLIGHT_READS_NO_WEIGHTS]


@pytest.mark.parametrize("kind,name", PREFLIGHT_CASES, ids=[f"{k}/{n}" for k, n in PREFLIGHT_CASES])
def test_cli_preflight_refuses_what_train_refuses(kind, name, model_cases, tiny_model_dir, tmp_path, capsys):
    """`python -m sftlib preflight --config run.yaml` on the same inputs: exit 2, one paragraph, the same first
    phrase as train's error. Damaged weights are the exception: pre-flight does not read them."""
    out = tmp_path / "out"
    config = _run_config(kind, name, model_cases, tiny_model_dir, out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main(["preflight", "--config", str(config)])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    error = stderr[stderr.find("error: "):]
    _assert_one_paragraph(error)
    assert {**DATA_CASES, **CONFIG_CASES, **MODEL_CASES}[name][0] in error
    assert not out.exists()


@pytest.mark.parametrize("kind,name", [("data", "content_number.jsonl"), ("config", "negative_rank.yaml"),
                                       ("model", "bin_only")])
def test_cli_in_a_subprocess(kind, name, model_cases, tiny_model_dir, tmp_path):
    """As a user runs it: `python -m sftlib train --config run.yaml` in a fresh process."""
    out = tmp_path / "out"
    config = _run_config(kind, name, model_cases, tiny_model_dir, out)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "sftlib", "train", "--config", str(config)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = proc.stderr[proc.stderr.find("error"):]  # after any progress bars and warnings
    _assert_one_paragraph(error)
    assert {**DATA_CASES, **CONFIG_CASES, **MODEL_CASES}[name][0] in error
    assert not out.exists()


def test_a_rank_above_the_models_layer_width_stops_before_training(tiny_model_dir, tmp_path, capsys):
    """`lora.r` passes the config's own bound but not the model's: said once the model is known, nothing trained."""
    from transformers import AutoConfig

    width = min(AutoConfig.from_pretrained(tiny_model_dir).hidden_size, 4096)
    out = tmp_path / "out"
    code = cli.main(["train", "--preset", "cpu-demo", "--set", f"model.name={tiny_model_dir}",
                     "--set", f"lora.r={width + 1}", "--set", f"train.output_dir={out / 'train'}",
                     "--set", f"export.output_dir={out / 'model'}", "--set", "train.max_steps=1"])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    _assert_one_paragraph(stderr)
    assert f"`lora.r` is {width + 1}, above the width of the narrowest adapted layer" in stderr
    assert not (out / "model").exists() and not list((out / "train").glob("checkpoint-*"))


@pytest.mark.parametrize("command", ["train", "preflight"])
def test_a_row_far_longer_than_max_seq_length_is_refused_before_tokenizing(command, tiny_model_dir, tmp_path, capsys):
    """A 3 MB one-line conversation (a file pasted into one turn) against `model.max_seq_length: 2048`: refused from
    its character count, before any row is tokenized, with a fix that is not a 750,000-token max_seq_length."""
    huge = " ".join(["lorem ipsum dolor sit amet"] * 120_000)  # about 3.2 MB
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}] * 3
    rows.insert(1, {"messages": [{"role": "user", "content": huge}, {"role": "assistant", "content": "Done."}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    code = cli.main([command, "--preset", "cpu-demo", "--set", f"model.name={tiny_model_dir}",
                     "--set", f"data.source={data}", "--set", "data.eval_size=0", "--set", "model.max_seq_length=2048",
                     "--set", f"train.output_dir={out / 'train'}", "--set", f"export.output_dir={out / 'model'}"])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert "Tokenizing" not in stderr  # refused before the tokenizer saw any row
    error = stderr[stderr.find("error: "):]
    _assert_one_paragraph(error)
    assert f"`{data}`: row 1 of the training rows (starting 'lorem ipsum" in error
    assert f"has {len(huge) + 5:,} characters" in error and "`model.max_seq_length` 2048" in error
    assert "drop it or split it" in error and "131,072 characters" in error
    assert not out.exists()


def test_a_valueerror_from_a_dependency_still_shows_its_traceback(tmp_path, capsys, monkeypatch):
    """The CLI hides tracebacks only for sftlib's own errors: a crash inside a dependency is a bug to report."""
    import sftlib.steps

    def crash(cfg, **kwargs):
        json.loads("{")  # a ValueError raised inside the json module, not by sftlib

    monkeypatch.setattr(sftlib.steps, "run", crash)
    with pytest.raises(json.JSONDecodeError):
        cli.main(["train", "--preset", "cpu-demo", "--set", f"train.output_dir={tmp_path}"])


# ---- property-based: generated rows and conversations --------------------------------------------------

KEYS = ["conversations", "messages", "instruction", "input", "output", "text", "from", "value", "role", "content",
        "id", "chosen"]
ROLE_NAMES = ["system", "user", "assistant", "human", "gpt", "model", "Human", "GPT", "tool", "bot", ""]
TRICKY_TEXT = ["<|im_end|>", "<|im_start|>", "<|eot_id|>", "</s>", "<s>", "[INST]", "<end_of_turn>", "<|end|>",
               "{{ x }}", "{% if %}", "\n", " ", "\u200b", "🙂", "Hi", "Hello."]
text = st.one_of(st.text(max_size=20), st.sampled_from(TRICKY_TEXT),
                 st.lists(st.sampled_from(TRICKY_TEXT), max_size=4).map("".join))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False, width=32), text)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
                      max_leaves=8)
turn = st.one_of(
    st.fixed_dictionaries({"from": st.sampled_from(ROLE_NAMES), "value": text}),
    st.fixed_dictionaries({"role": st.sampled_from(ROLE_NAMES), "content": text}),
    st.dictionaries(st.sampled_from(KEYS), values, max_size=3),
    text,
)
row = st.one_of(
    st.fixed_dictionaries({"conversations": st.lists(turn, max_size=4)}),
    st.fixed_dictionaries({"messages": st.lists(turn, max_size=4)}),
    st.fixed_dictionaries({"instruction": text, "output": text}, optional={"input": st.one_of(st.none(), text)}),
    st.fixed_dictionaries({"text": text}),
    st.dictionaries(st.sampled_from(KEYS), values, max_size=4),
)
content = text.filter(lambda t: t.strip())  # what a valid turn holds


@st.composite
def conversation(draw) -> list[dict]:
    """A well-formed conversation: optional system prompt, then user/assistant pairs."""
    messages = [{"role": "system", "content": draw(content)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages += [{"role": "user", "content": draw(content)}, {"role": "assistant", "content": draw(content)}]
    return messages


SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}
valid_rows = [
    conversation().map(lambda m: {"messages": m}),
    conversation().map(lambda m: {"conversations": [{"from": SHAREGPT_NAMES[t["role"]], "value": t["content"]}
                                                    for t in m]}),
    st.fixed_dictionaries({"instruction": content, "output": content}, optional={"input": text}),
    st.fixed_dictionaries({"text": content}),
]
# About half the datasets are well formed (one layout each), so what a successful conversion promises is
# checked as often as the errors are.
rows_strategy = st.one_of(*[st.lists(v, min_size=1, max_size=5) for v in valid_rows],
                          *[st.lists(row, min_size=1, max_size=5)] * 4)
# No example database: the tests write nothing into the checkout (a failure prints its example and seed).
PROPERTY = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(rows=rows_strategy, fmt=st.sampled_from(["auto", "auto", "auto", "sharegpt", "openai", "alpaca", "text"]))
def test_detection_and_conversion_fail_only_with_data_errors(rows, fmt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            detect_format(rows)
        except DataError:
            pass
        try:
            ds = to_messages(rows, format=fmt)
        except DataError:
            return
    assert len(ds) == len(rows)
    if ds.column_names == ["text"]:
        assert all(isinstance(t, str) and t.strip() for t in ds["text"])
        return
    assert ds.column_names == ["messages"]
    for messages in ds["messages"]:  # what conversion promises the templates
        roles = [m["role"] for m in messages]
        assert set(roles) <= {"system", "user", "assistant"} and roles[-1] == "assistant"
        assert "system" not in roles[1:]
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in messages)


@pytest.fixture(scope="module")
def fitted_tokenizers(tiny_model_dir):
    """The tiny tokenizer fitted to each template (tokens added, chat template set), without a model."""
    from transformers import AutoTokenizer

    fitted = {}
    for name in ("chatml", "llama-3.1", "mistral", "alpaca", "gemma", "phi-3"):
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        template = get_template(name)
        prepare_tokenizer(None, tokenizer, template)
        fitted[name] = (tokenizer, template)
    return fitted


message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": text}),
    st.fixed_dictionaries({"role": st.sampled_from(ROLE_NAMES), "content": st.one_of(text, st.integers())}),
)


@settings(PROPERTY, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(messages=st.one_of(conversation(), st.lists(message, min_size=0, max_size=6)),
       name=st.sampled_from(["chatml", "llama-3.1", "mistral", "alpaca", "gemma", "phi-3"]),
       train_on=st.sampled_from(["assistant", "all"]))
def test_rendering_and_encoding_fail_only_with_template_or_encode_errors(fitted_tokenizers, messages, name, train_on):
    tokenizer, template = fitted_tokenizers[name]
    try:
        row = encode_conversation(tokenizer, template, messages, train_on=train_on, max_length=512)
    except (ChatTemplateError, EncodeError):
        return
    assert len(row["input_ids"]) == len(row["labels"]) > 0
    trained = [t for t in row["labels"] if t != IGNORE]
    if train_on == "all":
        assert trained == row["input_ids"][: len(trained)]
    elif any(m["role"] == "assistant" for m in messages) and not row["truncated"]:
        # every assistant turn ends with the template's end-of-turn token, and it is trained
        eot = template.end_of_turn.replace("{eos}", tokenizer.eos_token)
        eot_id = tokenizer.convert_tokens_to_ids(eot)
        assert trained.count(eot_id) >= sum(m["role"] == "assistant" for m in messages)
