"""Tests for sftlib.config: defaults, presets, overrides, files, coercion and validation.

    .venv/bin/python -m pytest tests/test_config.py -q
"""

import dataclasses
import json
import subprocess
import sys

import pytest

from sftlib.config import (
    PRESET_NAMES,
    PRESETS,
    ConfigError,
    DataConfig,
    ExportConfig,
    LoraConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)


def problems_of(fn, *args, **kw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kw)
    return [str(p) for p in info.value.problems]


def a_changed_config() -> RunConfig:
    """A value changed in every section, including types YAML and JSON treat specially."""
    return RunConfig.from_dict({
        "model": {"name": "./my-model", "max_seq_length": 1024, "dtype": "bfloat16", "chat_template": "llama-3.1"},
        "lora": {"r": 32, "alpha": 64, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "use_dora": True},
        "data": {"source": "chats.jsonl", "split": "train[:90%]", "mapping": {"messages": "dialog", "user": "human"},
                 "eval_size": 200, "max_rows": 5000, "shuffle_seed": 7},
        "train": {"learning_rate": 2e-5, "epochs": 2.5, "gradient_checkpointing": "false", "save_steps": 50,
                  "report_to": "wandb"},
        "export": {"formats": ["lora", "gguf"], "gguf_quantizations": ["q4_k_m"], "push_to_hub": True,
                   "hub_repo": "me/llama-chat", "hub_private": False},
        "backend": "hf",
    })


# ---- defaults and presets --------------------------------------------------------------------------


def test_defaults_are_the_article_recipe_and_validate():
    cfg = RunConfig().validate()
    assert cfg.model.name == "unsloth/Meta-Llama-3.1-8B-bnb-4bit" and cfg.model.max_seq_length == 2048
    assert cfg.model.load_in_4bit and cfg.model.chat_template == "chatml"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.use_rslora) == (16, 16, 0.0, True)
    assert len(cfg.lora.target_modules) == 7
    assert (cfg.train.learning_rate, cfg.train.batch_size, cfg.train.grad_accum) == (3e-4, 8, 2)
    assert (cfg.train.optim, cfg.train.warmup_steps, cfg.train.weight_decay) == ("adamw_8bit", 10, 0.01)
    assert cfg.data.source == "mlabonne/FineTome-100k"
    assert cfg.export.gguf_quantizations == ["q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k", "q8_0"]


def test_every_field_has_help_text():
    for cls in (ModelConfig, LoraConfig, DataConfig, TrainConfig, ExportConfig, RunConfig):
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("help", "")) > 10, f"{cls.__name__}.{f.name} has no help"


def test_list_defaults_are_not_shared():
    a, b = RunConfig(), RunConfig()
    a.lora.target_modules.append("lm_head")
    assert "lm_head" not in b.lora.target_modules


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_each_preset_validates_and_its_file_says_what_it_is_for(name):
    cfg = RunConfig.preset(name).validate()
    preset = PRESETS[name]
    for key in preset.values:
        assert cfg.sources[key] == f"preset:{name}"
    header = [line for line in open(preset.path, encoding="utf-8") if line.startswith("#")]
    assert header[0].startswith(f"# {name}:"), "the header starts with what the preset is for"
    assert any("python -m sftlib" in line or "papermill" in line for line in header), "and a command that uses it"
    # Same effective batch as the article except on the toy CPU demo.
    if name != "cpu-demo":
        assert cfg.train.batch_size * cfg.train.grad_accum == 16


def test_article_preset_is_defaults_plus_loss_on_all_tokens():
    article, defaults = RunConfig.preset("article"), RunConfig()
    assert article.data.train_on == "all" and defaults.data.train_on == "assistant"
    article.data.train_on = "assistant"
    assert article == defaults


def test_every_list_of_presets_names_them_all():
    """The CLI's help and the README are written against one list: a preset added as a file shows everywhere."""
    from pathlib import Path

    from sftlib.cli import _parser

    train = _parser()._subparsers._group_actions[0].choices["train"]
    help_text = next(a.help for a in train._actions if "--preset" in a.option_strings)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for name in PRESET_NAMES:
        assert name in help_text, f"`--preset` help does not name {name}"
        assert f"`{name}`" in readme, f"README does not name the preset {name}"


def test_problems_carry_the_key_they_are_about():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict({"lora": {"r": 0}, "train": {"learning_rate": 5}, "nope": 1})
    assert sorted(p.key for p in info.value.problems) == ["lora.r", "nope", "train.learning_rate"]


def test_unknown_preset_suggests_the_nearest():
    (msg,) = problems_of(RunConfig.preset, "colab_t4")
    assert "unknown preset `colab_t4`" in msg and "did you mean `colab-t4`?" in msg


# ---- overrides and provenance ----------------------------------------------------------------------


def test_with_overrides_copies_and_records_the_source():
    base = RunConfig.preset("colab-t4")
    cfg = base.with_overrides({"lora.r": 64, "train": {"seed": 3}})
    assert (cfg.lora.r, cfg.train.seed) == (64, 3)
    assert base.lora.r == 16, "the original must not change"
    assert cfg.sources["lora.r"] == "override" and cfg.sources["train.batch_size"] == "preset:colab-t4"
    table = cfg.describe()
    assert "lora.r" in table and "override" in table and "preset:colab-t4" in table
    line = next(ln for ln in table.splitlines() if ln.startswith("lora.r "))
    assert "64" in line and line.rstrip().endswith("override")
    assert "effective batch: 2 x 8 = 16" in table


def test_preset_overrides_as_dict_dotted_keywords_and_double_underscore():
    a = RunConfig.preset("h100", {"lora.r": 8})
    b = RunConfig.preset("h100", **{"lora.r": 8})
    c = RunConfig.preset("h100", lora__r=8)
    assert a == b == c and a.lora.r == 8 and a.sources["lora.r"] == "override"
    assert a.train.batch_size == 16


def test_describe_marks_values_changed_in_code():
    cfg = RunConfig()
    cfg.train.seed = 42
    line = next(ln for ln in cfg.describe().splitlines() if ln.startswith("train.seed"))
    assert line.rstrip().endswith("set in code")


def test_overrides_are_validated():
    problems = problems_of(RunConfig.preset, "colab-t4", **{"lora.r": 0})
    assert problems == ["`lora.r` must be a positive integer, got 0"]
    # validate=False defers range checks (e.g. to build up a config in steps)
    cfg = RunConfig().with_overrides({"export.push_to_hub": True}, validate=False)
    assert problems_of(cfg.validate) == ["`export.push_to_hub` is true but `export.hub_repo` is empty; "
                                         "set it to `owner/name`"]


# ---- validation ------------------------------------------------------------------------------------


def test_all_problems_are_reported_at_once():
    problems = problems_of(RunConfig.from_dict, {
        "lora": {"r": -1, "dropout": 1.5},
        "train": {"learning_rate": 5, "batch_size": "eight", "epochs": 0},
        "model": {"dtype": "bf16", "chat_template": "chatlm"},
        "export": {"push_to_hub": True, "formats": ["lora", "gguf", "onnx"]},
        "data": {"eval_size": 2.5},
    })
    expected = [
        "`lora.r` must be a positive integer, got -1",
        "`lora.dropout` must be in [0, 1), got 1.5",
        "`train.learning_rate` must be in (0, 1], got 5.0",
        "`train.batch_size` must be an integer, got 'eight' (str)",
        "`train.epochs` must be > 0 unless `train.max_steps` > 0, got 0.0",
        "`model.dtype` must be one of auto, bfloat16, float16, float32, got 'bf16'; did you mean `bfloat16`?",
        "`model.chat_template`",
        "did you mean `chatml`?",
        "`export.push_to_hub` is true but `export.hub_repo` is empty",
        "`export.formats`: unknown format `onnx`; use lora, merged_16bit, merged_4bit, gguf or gguf:TYPE",
        "`data.eval_size` above 1 is a row count and must be whole, got 2.5",
    ]
    text = "\n".join(problems)
    for piece in expected:
        assert piece in text, f"missing: {piece}\n{text}"
    assert len(problems) == 10, text  # one line per problem, the chat-template one holding two pieces


def test_config_error_is_a_value_error_with_one_line_per_problem():
    err = ConfigError(["`a` is wrong", "`b` is wrong"])
    assert isinstance(err, ValueError)
    assert str(err).splitlines() == ["2 problems in the run config:", "  - `a` is wrong", "  - `b` is wrong"]


def test_cross_field_rules():
    ok = RunConfig().with_overrides({"train.epochs": 0, "train.max_steps": 60})  # max_steps wins over epochs
    assert ok.train.max_steps == 60
    problems = problems_of(RunConfig.from_dict, {
        "backend": "cpu",  # with 4-bit loading: not a problem, the backend falls back with a warning
        "data": {"eval_size": 100, "max_rows": 100},
        "export": {"gguf_quantizations": [], "hub_repo": "no-owner"},
        "train": {"max_steps": 0},
    })
    text = "\n".join(problems)
    assert "load_in_4bit" not in text
    assert "holds out every one of `data.max_rows`" in text
    assert "`export.gguf_quantizations` is empty" in text
    assert "`export.hub_repo` must look like `owner/name`" in text
    assert "`train.max_steps` must be -1" in text
    assert len(problems) == 4


def test_mapping_keys_and_duplicates_are_checked():
    problems = problems_of(RunConfig.from_dict, {"data": {"mapping": {"usr": "human"}},
                                                 "lora": {"target_modules": ["q_proj", "q_proj"]}})
    assert any("`data.mapping` has unknown key `usr`" in p and "did you mean `user`?" in p for p in problems)
    assert "`lora.target_modules` lists q_proj more than once" in problems


def test_validate_reports_wrong_types_set_in_code_instead_of_crashing():
    cfg = RunConfig()
    cfg.lora.r = "16"
    cfg.export.push_to_hub = "no"
    assert problems_of(cfg.validate) == ["`lora.r` must be an integer, got '16' (str)",
                                         "`export.push_to_hub` must be true or false, got 'no' (str)"]


def test_chat_template_names_come_from_the_templates_module():
    from sftlib.config import template_names as _template_names

    names = _template_names()
    for name in ("chatml", "llama-3.1", "mistral", "gemma", "qwen-2.5"):
        assert name in names
    for name in names:
        RunConfig().with_overrides({"model.chat_template": name})


# ---- unknown keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize("given, suggestion", [
    ({"lora": {"rank": 32}}, "unknown key `lora.rank`; did you mean `lora.r`?"),
    ({"lora.lora_alpha": 32}, "unknown key `lora.lora_alpha`; did you mean `lora.alpha`?"),
    ({"learning_rate": 1e-4}, "unknown key `learning_rate`; did you mean `train.learning_rate`?"),
    ({"train": {"per_device_train_batch_size": 4}}, "did you mean `train.batch_size`?"),
    ({"model": {"nmae": "x"}}, "unknown key `model.nmae`; did you mean `model.name`?"),
])
def test_unknown_keys_suggest_the_nearest_valid_name(given, suggestion):
    (msg,) = problems_of(RunConfig.from_dict, given)
    assert suggestion in msg


def test_unknown_key_without_a_near_match_lists_the_valid_ones():
    (msg,) = problems_of(RunConfig.from_dict, {"lora": {"zzzzzz": 1}})
    assert msg.startswith("unknown key `lora.zzzzzz`; `lora` has: r, alpha, dropout")


def test_section_that_is_not_a_mapping():
    (msg,) = problems_of(RunConfig.from_dict, {"lora": 16})
    assert msg.startswith("`lora` must be a mapping of its fields (r, alpha")


# ---- type coercion ---------------------------------------------------------------------------------


def test_scalars_are_coerced_sensibly():
    cfg = RunConfig.from_dict({
        "train": {"learning_rate": "3e-4", "epochs": 2, "batch_size": 4.0, "gradient_checkpointing": False,
                  "packing": "False", "optim": "ADAMW_TORCH"},
        "data": {"max_rows": "none", "eval_size": 100.0},
        "export": {"formats": "lora, gguf", "gguf_quantizations": ["Q4_K_M"]},
        "lora": {"r": "32"},
    })
    t = cfg.train
    assert t.learning_rate == 3e-4 and isinstance(t.learning_rate, float)
    assert t.epochs == 2.0 and isinstance(t.epochs, float)
    assert t.batch_size == 4 and isinstance(t.batch_size, int)
    assert t.gradient_checkpointing == "false" and t.packing is False and t.optim == "adamw_torch"
    assert cfg.data.max_rows is None
    assert cfg.data.eval_size == 100 and isinstance(cfg.data.eval_size, int)  # a row count stays a count
    assert cfg.export.formats == ["lora", "gguf"] and cfg.export.gguf_quantizations == ["q4_k_m"]
    assert cfg.lora.r == 32
    assert RunConfig.from_dict({"data": {"eval_size": 0.2}}).data.eval_size == 0.2


@pytest.mark.parametrize("key, value, message", [
    ("lora.r", "sixteen", "`lora.r` must be an integer, got 'sixteen' (str)"),
    ("lora.r", 3.5, "`lora.r` must be an integer, got 3.5 (float)"),
    ("lora.r", True, "`lora.r` must be an integer, got True (bool)"),
    ("model.load_in_4bit", 1, "`model.load_in_4bit` must be true or false, got 1 (int)"),
    ("model.load_in_4bit", "yes", "`model.load_in_4bit` must be true or false, got 'yes' (str)"),
    ("train.learning_rate", "fast", "`train.learning_rate` must be a finite number, got 'fast' (str)"),
    ("model.name", 7, "`model.name` must be text, got 7 (int)"),
    ("model.name", True, "`model.name` must be text, got True (bool)"),
    ("lora.target_modules", ["q_proj", 3], "`lora.target_modules` must be a list of text"),
    ("data.mapping", ["messages"], "`data.mapping` must be a mapping of text to text"),
    ("data.max_rows", "many", "`data.max_rows` must be an integer or null, got 'many' (str)"),
])
def test_wrong_types_name_the_field_and_expected_type(key, value, message):
    problems = problems_of(RunConfig().with_overrides, {key: value})
    assert len(problems) == 1 and problems[0].startswith(message), problems


# ---- files -----------------------------------------------------------------------------------------


def test_yaml_round_trip_text_and_file(tmp_path):
    cfg = a_changed_config()
    text = cfg.to_yaml()
    assert "r: 32" in text and "formats: [lora, gguf]" in text
    assert RunConfig.from_yaml(text) == cfg
    path = tmp_path / "run.yaml"
    assert cfg.to_yaml(path) == path.read_text()
    again = RunConfig.from_yaml(path)
    assert again == cfg and RunConfig.from_yaml(str(path)) == cfg
    assert again != RunConfig() and again.sources["lora.r"] == "file"
    assert again.to_dict() == cfg.to_dict() and "sources" not in again.to_dict()


def test_json_round_trip_text_and_file(tmp_path):
    cfg = a_changed_config()
    text = cfg.to_json()
    assert json.loads(text)["lora"]["r"] == 32
    assert RunConfig.from_json(text) == cfg
    path = tmp_path / "run.json"
    cfg.to_json(path)
    assert RunConfig.from_json(path) == cfg


def test_every_preset_round_trips_through_yaml():
    for name in PRESETS:
        cfg = RunConfig.preset(name)
        assert RunConfig.from_yaml(cfg.to_yaml()) == cfg, name


def test_partial_yaml_keeps_defaults_and_reads_yaml_1_1_exponents():
    cfg = RunConfig.from_yaml("lora:\n  r: 8\ntrain:\n  learning_rate: 2e-4\n  gradient_checkpointing: false\n")
    assert cfg.lora.r == 8 and cfg.train.learning_rate == 2e-4 and cfg.train.gradient_checkpointing == "false"
    assert cfg.lora.alpha == 16 and cfg.sources == {"lora.r": "file", "train.learning_rate": "file",
                                                    "train.gradient_checkpointing": "file"}
    assert RunConfig.from_yaml("") == RunConfig()
    assert RunConfig.from_yaml("lora:\n") == RunConfig()


def test_bad_files_give_config_errors(tmp_path):
    assert "does not exist" in problems_of(RunConfig.from_yaml, tmp_path / "missing.yaml")[0]
    assert "does not exist" in problems_of(RunConfig.from_yaml, "missing.yaml")[0]
    assert "does not parse" in problems_of(RunConfig.from_yaml, "lora: [unclosed\n")[0]
    assert "does not parse" in problems_of(RunConfig.from_json, "{not json")[0]
    assert "must be a mapping" in problems_of(RunConfig.from_yaml, "- just\n- a list\n")[0]


def test_importing_config_does_not_import_torch():
    code = "import sys, sftlib.config; sys.exit(int('torch' in sys.modules or 'transformers' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
