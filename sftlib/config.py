"""Run configuration: one dataclass per concern, named presets, YAML/JSON files, validation.

    from sftlib.config import RunConfig
    cfg = RunConfig.preset("colab-t4", **{"lora.r": 32})   # the article's recipe, sized for a T4
    cfg = cfg.with_overrides({"data.source": "chats.jsonl", "train.epochs": 2})
    print(cfg.describe())                                  # each value and where it came from
    cfg.to_yaml("run.yaml")
    assert RunConfig.from_yaml("run.yaml") == cfg

The defaults are the recipe of the "Fine-tune Llama 3.1 Ultra-Efficiently with Unsloth" article
(QLoRA on unsloth/Meta-Llama-3.1-8B-bnb-4bit, FineTome-100k, ChatML); the one exception is
`data.train_on` (see its help). Values are named by dotted keys such as `lora.r`, in files, overrides
and error messages alike. `validate()`, `from_dict()` and `with_overrides()` collect every problem
and raise one `ConfigError` listing them all.

This module imports only the standard library and PyYAML, so notebooks and the CLI can build and
check a config before torch is loaded.
"""

import copy
import dataclasses
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from sftlib.hub import repo_problems, revision_problems

DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
LORA_BIASES = ("none", "all", "lora_only")
TRAIN_EMBEDDINGS = ("auto", "always", "never")
DATA_FORMATS = ("auto", "sharegpt", "openai", "alpaca", "text")
TRAIN_ON = ("assistant", "all")
MAPPING_KEYS = ("messages", "role", "content", "user", "assistant", "system", "instruction", "input", "output", "text")
# transformers' SchedulerType and OptimizerNames values (5.x); listed here so that checking a config
# does not import transformers.
LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
    "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
)
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor", "adamw_anyprecision",
    "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad", "adamw_bnb_8bit", "adamw_8bit",
    "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit",
    "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw",
    "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise",
    "stable_adamw",
)
GRADIENT_CHECKPOINTING = ("unsloth", "true", "false", "auto")
PREFLIGHT = ("stop", "warn", "off")
EXPORT_FORMATS = ("lora", "merged_16bit", "merged_4bit", "gguf")
# llama.cpp quantization types, in the lower case that Unsloth's `quantization_method` takes.
GGUF_QUANTIZATIONS = (
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q4_0", "q4_1",
    "q3_k_l", "q3_k_m", "q3_k_s", "q2_k", "q2_k_s", "iq4_nl", "iq4_xs", "iq3_m", "iq3_s", "iq3_xs", "iq3_xxs",
    "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s", "tq1_0", "tq2_0",
)
BACKENDS = ("auto", "unsloth", "hf", "cpu")
# Used only while sftlib.templates cannot be imported; that module's TEMPLATE_NAMES is the truth.
FALLBACK_TEMPLATE_NAMES = ("alpaca", "chatml", "gemma", "llama-3", "llama-3.1", "mistral", "phi-3", "qwen-2.5")

# Names people bring from TRL, PEFT, Unsloth or the article's code, mapped to ours (for "did you mean").
_KEY_ALIASES = {
    "rank": "lora.r", "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "lr": "train.learning_rate", "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "num_train_epochs": "train.epochs",
    "lr_scheduler_type": "train.lr_scheduler", "use_gradient_checkpointing": "train.gradient_checkpointing",
    "model_name": "model.name", "max_seq_len": "model.max_seq_length", "dataset": "data.source",
    "dataset_name": "data.source", "save_method": "export.formats", "quantization_method": "export.gguf_quantizations",
}
_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{30,}")  # the shape of Hugging Face access tokens
_TOKEN_ADVICE = ("`{key}` holds what looks like a Hugging Face token; never put a token in a config (configs are "
                 "saved and shared): set the HF_TOKEN environment variable or a Colab secret named HF_TOKEN instead")
_VALUE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def _field(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with help text (and optional `choices`/`coerce`) in its metadata."""
    metadata = {"help": help, **metadata}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _as_count_or_fraction(value: Any) -> float | int:
    """`data.eval_size`: keep whole numbers >= 1 as int row counts, fractions as float."""
    number = _as_float(value)
    return int(number) if number >= 1 and number.is_integer() else number


@dataclass
class ModelConfig:
    name: str = _field("unsloth/Meta-Llama-3.1-8B-bnb-4bit",
                       "Hub id or local folder of the base model; `demo` is the tiny model bundled with sftlib.")
    max_seq_length: int = _field(2048, "Longest training sequence in tokens; longer rows are truncated.")
    load_in_4bit: bool = _field(True, "Load the base weights in 4-bit NF4 (QLoRA). Needs a CUDA GPU.")
    dtype: str = _field("auto", "Compute dtype; `auto` picks bfloat16 where the GPU supports it, else float16.",
                        choices=DTYPES)
    chat_template: str = _field("chatml", "Chat template the conversations are rendered with (see sftlib.templates).")
    trust_remote_code: bool = _field(False, "Run modelling code shipped in the model's repository.")
    attn_implementation: str = _field("auto", "Attention kernel; `auto` lets the backend choose.",
                                      choices=ATTN_IMPLEMENTATIONS)


@dataclass
class LoraConfig:
    r: int = _field(16, "LoRA rank: the size of the low-rank update matrices (8-128 is usual).")
    alpha: int = _field(16, "LoRA scaling numerator; = r because rsLoRA scales by alpha/sqrt(r).")
    dropout: float = _field(0.0, "Dropout on the LoRA input, in [0, 1); 0 lets Unsloth use its fast path.")
    target_modules: list[str] = _field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Linear layers that get adapters: every attention and MLP projection.")
    use_rslora: bool = _field(True, "Rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r.")
    use_dora: bool = _field(False, "Weight-decomposed LoRA (DoRA); slower, sometimes better at low rank.")
    bias: str = _field("none", "Which biases to train alongside the adapters.", choices=LORA_BIASES)
    train_embeddings: str = _field(
        "auto", "Train embed_tokens and lm_head: `auto` only when tokens were added to the vocabulary "
        "(e.g. ChatML's on a base model), `always`, or `never`.", choices=TRAIN_EMBEDDINGS)


@dataclass
class DataConfig:
    source: str = _field("mlabonne/FineTome-100k",
                         "Hub dataset name or a local .json/.jsonl/.parquet/.csv file or folder; `demo` = bundled data.")
    split: str = _field("train", "Split to load, with datasets' slicing syntax, e.g. `train[:10000]`.")
    format: str = _field("auto", "Row format; `auto` detects it from the first rows' keys.", choices=DATA_FORMATS)
    mapping: dict[str, str] = _field(
        {}, "Our key -> the dataset's key, for datasets with other column or role names, "
        "e.g. {messages: dialog, user: human}. Keys: " + ", ".join(MAPPING_KEYS) + ".")
    # Differs from the article, which computes the loss on every token (prompts included).
    train_on: str = _field("assistant", "Tokens that count in the loss: `assistant` replies only, or `all` "
                           "(the article's choice).", choices=TRAIN_ON)
    eval_size: float = _field(0.0, "Rows held out for evaluation: a fraction in (0, 1), a count >= 1, or 0 for none.",
                              coerce=_as_count_or_fraction)
    max_rows: int | None = _field(None, "Use only the first N rows (after the split); null = all.")
    shuffle_seed: int = _field(0, "Seed of the shuffle before the evaluation split.")


@dataclass
class TrainConfig:
    learning_rate: float = _field(3e-4, "Peak learning rate, in (0, 1].")
    lr_scheduler: str = _field("linear", "Learning-rate schedule after warm-up.", choices=LR_SCHEDULERS)
    batch_size: int = _field(8, "Sequences per device per step.")
    grad_accum: int = _field(2, "Gradient accumulation steps; effective batch = batch_size x grad_accum.")
    epochs: float = _field(1.0, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = _field(-1, "Stop after this many optimizer steps; -1 = run `epochs` epochs.")
    optim: str = _field("adamw_8bit", "Optimizer name as transformers knows it; `adamw_8bit` needs bitsandbytes.",
                        choices=OPTIMIZERS)
    weight_decay: float = _field(0.01, "Decoupled weight decay on the trained parameters.")
    warmup_steps: int = _field(10, "Linear warm-up steps from 0 to learning_rate.")
    seed: int = _field(0, "Seed for adapter initialisation and data order.")
    packing: bool = _field(True, "Pack several short rows into each max_seq_length sequence.")
    gradient_checkpointing: str = _field(
        "unsloth", "Recompute activations to save memory: `unsloth` (offloaded, Unsloth only), `true`, `false`, "
        "or `auto`: off when the batch fits the free GPU memory without it (see sftlib.autotune).",
        choices=GRADIENT_CHECKPOINTING)
    auto_batch: bool = _field(False, "Split the effective batch (batch_size x grad_accum) into the micro-batch "
                              "that fits the free GPU memory best (see sftlib.autotune); needs a CUDA GPU.")
    logging_steps: int = _field(1, "Log loss and learning rate every N steps.")
    output_dir: str = _field("outputs", "Folder for checkpoints and training logs.")
    save_steps: int = _field(0, "Save a checkpoint every N steps; 0 = no intermediate checkpoints.")
    resume: str = _field("auto", "Continue from a checkpoint in `output_dir`: `auto` = the newest complete one "
                         "saved with the same settings (none: start fresh), `never` = start over, or a checkpoint "
                         "folder's path.")
    report_to: str = _field("none", "Experiment tracker(s) for transformers, e.g. `wandb`, `tensorboard`; `none`.")
    preflight: str = _field("stop", "Pre-flight checks before training (sftlib.preflight): `stop` on a fatal finding, "
                            "`warn` = report and train anyway, `off` = skip them.", choices=PREFLIGHT)


@dataclass
class ExportConfig:
    output_dir: str = _field("model", "Folder the exported model(s) are written to.")
    formats: list[str] = _field(["lora", "merged_16bit", "gguf"],
                                "What to save: `lora` adapters, `merged_16bit` full model, `gguf` files; [] = none.",
                                choices=EXPORT_FORMATS)
    gguf_quantizations: list[str] = _field(["q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k", "q8_0"],
                                           "llama.cpp quantization types, one GGUF file each.",
                                           choices=GGUF_QUANTIZATIONS)
    gguf_pre_tokenizer: str = _field("", "llama.cpp pre-tokenizer for a BPE tokenizer its converter does not know "
                                         "(e.g. llama-bpe, qwen2, gpt-2, or auto: read it from tokenizer.json); "
                                         "empty: the converter recognizes it.")
    push_to_hub: bool = _field(False, "Upload the exports to the Hugging Face Hub (needs hub_repo and a token).")
    hub_repo: str = _field("", "Hub repository `owner/name` to upload to.")
    hub_private: bool = _field(True, "Create the Hub repository as private.")
    hub_revision: str = _field("main", "Branch of the Hub repository to upload to; created from main when missing.")


_SECTIONS = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "train": TrainConfig,
             "export": ExportConfig}


def _section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


class ConfigError(ValueError):
    """Every problem found in a config, one per line; `.problems` holds them as a list."""

    def __init__(self, problems: list[str] | str):
        problems = [problems] if isinstance(problems, str) else list(problems)
        self.problems = [_TOKEN_RE.sub("hf_***", p) for p in problems]  # errors get printed: never echo a token
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        super().__init__(f"{count} in the run config:\n" + "\n".join(f"  - {p}" for p in self.problems))


PRESETS: dict[str, dict[str, Any]] = {
    "article": {"data.train_on": "all"},
    "colab-t4": {  # 16 GB, no bfloat16; same effective batch of 16 as the article
        "model.dtype": "float16", "model.load_in_4bit": True,
        "train.batch_size": 2, "train.grad_accum": 8, "train.gradient_checkpointing": "unsloth",
    },
    "colab-a100": {"model.dtype": "bfloat16", "train.batch_size": 8, "train.grad_accum": 2},
    "gpu-auto": {  # any CUDA GPU: checkpointing and micro-batch chosen from free memory, effective batch 16
        "model.dtype": "bfloat16", "train.gradient_checkpointing": "auto", "train.auto_batch": True,
    },
    "h100": {  # 80 GB: the whole effective batch in one step; keep offloaded checkpointing for 2048 tokens
        "model.dtype": "bfloat16", "train.batch_size": 16, "train.grad_accum": 1,
        "train.gradient_checkpointing": "unsloth",
    },
    "cpu-demo": {  # the bundled tiny model and data: trains in minutes on a laptop CPU
        "model.name": "demo", "model.load_in_4bit": False, "model.dtype": "float32", "model.max_seq_length": 256,
        "model.chat_template": "chatml", "lora.r": 16, "lora.alpha": 16,
        # the demo base has random weights: LoRA alone has little to adapt, so its embeddings and
        # head are trained whole (affordable at 0.4 M parameters) and it learns in seconds
        "lora.train_embeddings": "always",
        "train.batch_size": 8, "train.grad_accum": 1, "train.optim": "adamw_torch",
        "train.gradient_checkpointing": "false", "train.learning_rate": 2e-3, "train.epochs": 3,
        "train.warmup_steps": 10, "train.logging_steps": 10, "train.output_dir": "outputs/demo",
        "data.source": "demo", "data.eval_size": 0.1,
        "export.formats": ["lora", "merged_16bit"], "export.output_dir": "outputs/demo/model",
    },
}
PRESET_HELP = {
    "article": "Exactly the article's recipe (A100 40 GB), loss on all tokens.",
    "colab-t4": "Free Colab T4 (16 GB, float16): batch 2 x 8.",
    "colab-a100": "Colab A100 40 GB (bfloat16): batch 8 x 2, as in the article.",
    "h100": "H100 80 GB (bfloat16): batch 16 x 1.",
    "gpu-auto": "Any bfloat16 GPU: checkpointing and micro-batch chosen from free memory (batch 8 x 2 on 40 GiB+).",
    "cpu-demo": "Tiny bundled model and data on CPU; for trying the pipeline, not for quality.",
}


@dataclass
class RunConfig:
    model: ModelConfig = _section(ModelConfig, "Base model and how it is loaded.")
    lora: LoraConfig = _section(LoraConfig, "The LoRA adapters trained on top of the frozen model.")
    data: DataConfig = _section(DataConfig, "Training data: where it is, its format, what the loss sees.")
    train: TrainConfig = _section(TrainConfig, "Optimisation and trainer settings: schedule, batch, checkpoints, logging.")
    export: ExportConfig = _section(ExportConfig, "What is saved after training, and where.")
    backend: str = _field("auto", "Training stack: `auto` (Unsloth on a CUDA GPU if installed, else plain "
                          "transformers), `unsloth`, `hf`, or `cpu`.", choices=BACKENDS)
    # Not part of the config's value: left out of to_dict() and of ==.
    sources: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False, metadata={
        "help": "Where each dotted key's value came from (preset:<name>, override, file); missing = default."})

    # ---- building ---------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, validate: bool = True, source: str = "override") -> "RunConfig":
        """Build from nested ({"lora": {"r": 32}}) or dotted ({"lora.r": 32}) keys on top of the defaults."""
        return cls().with_overrides(d, validate=validate, source=source)

    @classmethod
    def preset(cls, name: str, overrides: Mapping[str, Any] | None = None, *, validate: bool = True,
               **kw: Any) -> "RunConfig":
        """A named preset from PRESETS, then overrides (dotted keys; as keywords write `lora__r=32`)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset `{name}` (known: {', '.join(PRESETS)})" + _did_you_mean(name, PRESETS))
        cfg = cls().with_overrides(PRESETS[name], validate=False, source=f"preset:{name}")
        extra = {**(overrides or {}), **{k.replace("__", "."): v for k, v in kw.items()}}
        return cfg.with_overrides(extra, validate=validate)

    def with_overrides(self, overrides: Mapping[str, Any], *, validate: bool = True,
                       source: str = "override") -> "RunConfig":
        """A copy with dotted (or nested) values replaced; type, key and (if validate) range errors raised together."""
        problems, new = [], copy.deepcopy(self)
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"a config must be a mapping of section: fields, got {_show(overrides)}")
        for key, value in _flatten(overrides, problems).items():
            f = _FIELDS.get(key)
            if f is None:
                problems.append(_unknown_key(key))
                if isinstance(value, str) and _TOKEN_RE.search(value):
                    problems.append(_TOKEN_ADVICE.format(key=key))
                continue
            choices = f.metadata.get("choices", ())
            if isinstance(value, bool) and "true" in choices:  # YAML reads `gradient_checkpointing: false` as a bool
                value = "true" if value else "false"
            coerce = f.metadata.get("coerce") or _COERCERS[f.type]
            try:
                value = coerce(value)
            except _WrongType as e:
                problems.append(f"`{key}` must be {e.expected}, got {_show(value)}")
                continue
            if isinstance(value, str) and choices:
                value = _normalise_choice(value, choices)
            elif isinstance(value, list) and choices:
                value = [_normalise_choice(x, choices) for x in value]
            section, _, name = key.rpartition(".")
            setattr(getattr(new, section) if section else new, name, value)
            new.sources[key] = source
        if validate:
            problems += new._problems()
        if problems:
            raise ConfigError(problems)
        return new

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike, *, validate: bool = True) -> "RunConfig":
        """Load a YAML file (a path) or YAML text; missing keys keep their defaults."""
        text, where = _read_path_or_text(path_or_text, (".yaml", ".yml"))
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}the YAML does not parse: {_yaml_problem(e)}") from None
        return cls._from_file(d or {}, where, validate)

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike, *, validate: bool = True) -> "RunConfig":
        """Load a JSON file (a path) or JSON text; missing keys keep their defaults."""
        text, where = _read_path_or_text(path_or_text, (".json",))
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}the JSON does not parse: {e}") from None
        return cls._from_file(d, where, validate)

    @classmethod
    def _from_file(cls, d: Any, where: str, validate: bool) -> "RunConfig":
        try:
            return cls.from_dict(d, validate=validate, source="file")
        except ConfigError as e:  # say which file each problem is in
            raise ConfigError([where + p for p in e.problems]) from None

    # ---- writing ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict of every value (no provenance)."""
        d = {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}
        d["backend"] = self.backend
        return d

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        """The config as YAML text; also written to `path` when given."""
        text = yaml.dump(self.to_dict(), Dumper=_YamlDumper, sort_keys=False, width=120)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The config as JSON text; also written to `path` when given."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def describe(self) -> str:
        """A table of every value and where it came from: default, preset:<name>, override, file, set in code."""
        defaults, rows = RunConfig(), []
        for key in _FIELDS:
            value, default = _get(self, key), _get(defaults, key)
            origin = self.sources.get(key) or ("default" if value == default else "set in code")
            rows.append((key, value if isinstance(value, str) and value else json.dumps(value), origin))
        width = [max(len(r[i]) for r in rows + [("field", "value", "source")]) for i in range(2)]
        lines = [f"{'field':<{width[0]}}  {'value':<{width[1]}}  source"]
        lines += [f"{k:<{width[0]}}  {v:<{width[1]}}  {s}" for k, v, s in rows]
        t = self.train
        lines.append(f"effective batch: {t.batch_size} x {t.grad_accum} = {t.batch_size * t.grad_accum} sequences")
        return "\n".join(lines)

    # ---- checking ---------------------------------------------------------------------------------

    def validate(self) -> "RunConfig":
        """Raise ConfigError listing every problem; returns self so calls can chain."""
        problems = self._problems()
        if problems:
            raise ConfigError(problems)
        return self

    def _problems(self) -> list[str]:
        # Values set in code skip from_dict's coercion; range checks below would crash on a wrong type.
        wrong = [f"`{key}` must be {_EXPECTED[f.type]}, got {_show(_get(self, key))}"
                 for key, f in _FIELDS.items() if not _type_ok(_get(self, key), f.type)]
        if wrong:
            return wrong
        p: list[str] = []
        m, lo, d, t, e = self.model, self.lora, self.data, self.train, self.export

        for key, f in _FIELDS.items():  # enums, including each item of a list
            value = _get(self, key)
            if "choices" not in f.metadata:
                continue
            for item in value if isinstance(value, list) else [value]:
                if item not in f.metadata["choices"]:
                    p.append(_bad_choice(key, item, f.metadata["choices"]))
        templates = _template_names()
        if m.chat_template not in templates:
            p.append(_bad_choice("model.chat_template", m.chat_template, templates))

        def need(ok: bool, message: str) -> None:
            if not ok:
                p.append(message)

        need(m.name.strip() != "", "`model.name` is empty; give a Hub id such as "
             "`unsloth/Meta-Llama-3.1-8B-bnb-4bit`, a local folder, or `demo`")
        need(m.max_seq_length > 0, f"`model.max_seq_length` must be a positive integer, got {m.max_seq_length}")

        need(lo.r > 0, f"`lora.r` must be a positive integer, got {lo.r}")
        need(lo.alpha > 0, f"`lora.alpha` must be a positive integer, got {lo.alpha}")
        need(0 <= lo.dropout < 1, f"`lora.dropout` must be in [0, 1), got {lo.dropout}")
        need(len(lo.target_modules) > 0, "`lora.target_modules` is empty; list the layers to adapt, e.g. [q_proj, v_proj]")
        need(all(x.strip() for x in lo.target_modules), "`lora.target_modules` has an empty name")
        _no_duplicates(p, "lora.target_modules", lo.target_modules)

        need(d.source.strip() != "", "`data.source` is empty; give a Hub dataset name, a local file, or `demo`")
        need(d.split.strip() != "", "`data.split` is empty; use `train` or a slice such as `train[:1000]`")
        for k, v in d.mapping.items():
            if k not in MAPPING_KEYS:
                p.append(f"`data.mapping` has unknown key `{k}` (known: {', '.join(MAPPING_KEYS)})"
                         + _did_you_mean(k, MAPPING_KEYS))
            need(v.strip() != "", f"`data.mapping.{k}` is empty; give the dataset's own name for it")
        if not (d.eval_size >= 0):
            p.append(f"`data.eval_size` must be 0, a fraction in (0, 1) or a row count >= 1, got {d.eval_size}")
        elif d.eval_size >= 1 and not float(d.eval_size).is_integer():
            p.append(f"`data.eval_size` above 1 is a row count and must be whole, got {d.eval_size}; "
                     "use a fraction below 1 for a share of the rows")
        need(d.max_rows is None or d.max_rows >= 1, f"`data.max_rows` must be null or >= 1, got {d.max_rows}")
        if d.max_rows is not None and d.max_rows >= 1 and d.eval_size >= d.max_rows:
            p.append(f"`data.eval_size` ({d.eval_size}) holds out every one of `data.max_rows` ({d.max_rows}) rows; "
                     "lower it or raise max_rows")
        need(d.shuffle_seed >= 0, f"`data.shuffle_seed` must be >= 0, got {d.shuffle_seed}")

        need(0 < t.learning_rate <= 1, f"`train.learning_rate` must be in (0, 1], got {t.learning_rate}; "
             "LoRA usually takes 1e-5 to 5e-4")
        need(t.batch_size >= 1, f"`train.batch_size` must be >= 1, got {t.batch_size}")
        need(t.grad_accum >= 1, f"`train.grad_accum` must be >= 1, got {t.grad_accum}")
        need(t.max_steps == -1 or t.max_steps > 0, f"`train.max_steps` must be -1 (use epochs) or > 0, got {t.max_steps}")
        need(t.epochs > 0 or t.max_steps > 0, f"`train.epochs` must be > 0 unless `train.max_steps` > 0, got {t.epochs}")
        need(t.weight_decay >= 0, f"`train.weight_decay` must be >= 0, got {t.weight_decay}")
        need(t.warmup_steps >= 0, f"`train.warmup_steps` must be >= 0, got {t.warmup_steps}")
        need(t.seed >= 0, f"`train.seed` must be >= 0, got {t.seed}")
        need(t.logging_steps >= 1, f"`train.logging_steps` must be >= 1, got {t.logging_steps}")
        need(t.save_steps >= 0, f"`train.save_steps` must be >= 0 (0 = no intermediate checkpoints), got {t.save_steps}")
        need(t.output_dir.strip() != "", "`train.output_dir` is empty; give a folder such as `outputs`")
        need(t.resume.strip() != "", "`train.resume` is empty; use `auto`, `never` or a checkpoint folder's path")
        need(t.report_to.strip() != "", "`train.report_to` is empty; use `none` to log to the console only")

        need(e.output_dir.strip() != "", "`export.output_dir` is empty; give a folder such as `model`")
        _no_duplicates(p, "export.formats", e.formats)
        _no_duplicates(p, "export.gguf_quantizations", e.gguf_quantizations)
        need("gguf" not in e.formats or len(e.gguf_quantizations) > 0,
             "`export.formats` includes `gguf` but `export.gguf_quantizations` is empty; add e.g. q4_k_m")
        for key in _FIELDS:  # a config is saved and shared: a token in it would leak
            values = _get(self, key)
            for value in values if isinstance(values, list) else [values]:
                if isinstance(value, str) and _TOKEN_RE.search(value):
                    p.append(_TOKEN_ADVICE.format(key=key))
        if e.push_to_hub and not e.hub_repo:
            p.append("`export.push_to_hub` is true but `export.hub_repo` is empty; set it to `owner/name`")
        elif e.hub_repo:
            p += repo_problems(e.hub_repo, "export.hub_repo")
        p += revision_problems(e.hub_revision, "export.hub_revision")
        return p


# ---- helpers ----------------------------------------------------------------------------------------


def _all_fields() -> dict[str, dataclasses.Field]:
    out = {}
    for name, cls in _SECTIONS.items():
        out.update({f"{name}.{f.name}": f for f in dataclasses.fields(cls)})
    out["backend"] = next(f for f in dataclasses.fields(RunConfig) if f.name == "backend")
    return out


def _get(cfg: RunConfig, key: str) -> Any:
    section, _, name = key.rpartition(".")
    return getattr(getattr(cfg, section) if section else cfg, name)


def _flatten(d: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """{"lora": {"r": 8}, "train.seed": 1} -> {"lora.r": 8, "train.seed": 1}; only section names nest."""
    flat = {}
    for key, value in d.items():
        key = str(key)
        if key not in _SECTIONS:
            flat[key] = value
        elif value is None:  # an empty `lora:` block in YAML
            continue
        elif isinstance(value, Mapping):
            flat.update({f"{key}.{sub}": v for sub, v in value.items()})
        else:
            names = ", ".join(f.name for f in dataclasses.fields(_SECTIONS[key]))
            problems.append(f"`{key}` must be a mapping of its fields ({names}), got {_show(value)}")
    return flat


def _did_you_mean(word: str, candidates: Any) -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean `{match[0]}`?" if match else ""


def _unknown_key(key: str) -> str:
    leaf = key.rpartition(".")[2]
    # Match whole dotted names ("lora.rank" ~ "lora.r") and bare leaf names ("learning_rate").
    targets = {k: k for k in _FIELDS}
    targets.update({k.rpartition(".")[2]: k for k in reversed(list(_FIELDS))})
    guess = _KEY_ALIASES.get(leaf) or _KEY_ALIASES.get(key)
    if guess is None:
        match = difflib.get_close_matches(key, list(targets), n=1, cutoff=0.6)
        guess = targets[match[0]] if match else None
    if guess is not None:
        return f"unknown key `{key}`; did you mean `{guess}`?"
    section = key.partition(".")[0]
    if section in _SECTIONS:
        names = ", ".join(f.name for f in dataclasses.fields(_SECTIONS[section]))
        return f"unknown key `{key}`; `{section}` has: {names}"
    return f"unknown key `{key}`; the top-level keys are {', '.join(_SECTIONS)} and backend"


def _normalise_choice(value: str, choices: tuple[str, ...]) -> str:
    """Case only: `Q4_K_M` -> `q4_k_m`. Other near-misses are reported by validate, not guessed."""
    lowered = value.lower()
    return lowered if value not in choices and lowered in choices else value


def _bad_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    hint = f"; did you mean `{_VALUE_ALIASES[value]}`?" if _VALUE_ALIASES.get(value) in choices \
        else _did_you_mean(str(value), choices)
    if len(choices) <= 12:
        return f"`{key}` must be one of {', '.join(choices)}, got {value!r}{hint}"
    return f"`{key}` got unknown value {value!r}{hint} (known: {', '.join(choices[:6])}, ...)"


def _no_duplicates(p: list[str], key: str, items: list[str]) -> None:
    dupes = sorted({x for x in items if items.count(x) > 1})
    if dupes:
        p.append(f"`{key}` lists {', '.join(dupes)} more than once")


def _template_names() -> tuple[str, ...]:
    try:  # imported here: templates may import this module, and it is not needed to build a config
        from .templates import TEMPLATE_NAMES
    except ImportError:
        return FALLBACK_TEMPLATE_NAMES
    return tuple(TEMPLATE_NAMES)


def _read_path_or_text(path_or_text: str | os.PathLike, suffixes: tuple[str, ...]) -> tuple[str, str]:
    """(text, "`file`: " to put in front of each problem, or "" for text given directly)."""
    if isinstance(path_or_text, os.PathLike) or (
            "\n" not in path_or_text and (os.path.isfile(path_or_text) or path_or_text.endswith(suffixes))):
        path = Path(path_or_text)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            return path.read_text(encoding="utf-8"), f"`{path}`: "
        except UnicodeDecodeError as e:
            raise ConfigError(f"`{path}` is not UTF-8 text (byte {e.start}); save the config as UTF-8 YAML or JSON") \
                from None
    return path_or_text, ""


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's message in one line, with the line and column (1-based) and the usual cause of a tab error."""
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    if "'\\t'" in what:
        what += " (YAML indents with spaces, never tabs)"
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None else what


class _YamlDumper(yaml.SafeDumper):
    """Sections as blocks, lists on one line: `formats: [lora, gguf]`."""


_YamlDumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True))


def _show(value: Any) -> str:
    text = repr(value)
    return f"{text[:60] + '...' if len(text) > 60 else text} ({type(value).__name__})"


# ---- type coercion: YAML, JSON and command-line strings to the field's type --------------------------


class _WrongType(Exception):
    def __init__(self, expected: str):
        self.expected = expected


def _as_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise _WrongType("text")


def _as_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _WrongType("an integer") from None
    if isinstance(number, float) and number.is_integer():
        return int(number)
    raise _WrongType("an integer")


def _as_float(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # PyYAML (YAML 1.1) reads `3e-4`, without a dot, as a string
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _WrongType("a number")


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _WrongType("true or false")


def _as_optional_int(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "")):
        return None
    try:
        return _as_int(value)
    except _WrongType:
        raise _WrongType("an integer or null") from None


def _as_str_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):  # "lora,gguf" from a command line or a one-item YAML scalar
        return [x.strip() for x in value.split(",") if x.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value):
        return list(value)
    raise _WrongType("a list of text")


def _as_str_dict(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    raise _WrongType("a mapping of text to text")


def _type_ok(value: Any, ftype: Any) -> bool:
    if ftype is bool or isinstance(value, bool):
        return ftype is bool and isinstance(value, bool)
    if ftype == list[str]:
        return isinstance(value, list) and all(isinstance(x, str) for x in value)
    if ftype == dict[str, str]:
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    allowed = {str: str, int: int, float: (int, float), int | None: (int, type(None))}[ftype]
    return isinstance(value, allowed)


_EXPECTED = {str: "text", int: "an integer", float: "a number", bool: "true or false", int | None: "an integer or null",
             list[str]: "a list of text", dict[str, str]: "a mapping of text to text"}
_COERCERS = {str: _as_str, int: _as_int, float: _as_float, bool: _as_bool, int | None: _as_optional_int,
             list[str]: _as_str_list, dict[str, str]: _as_str_dict}
_FIELDS = _all_fields()
