"""What can be wrong with a run config, found all at once and named by the field as the user typed it.

    from sftlib.config.problems import ConfigError, Problem, check
    problems = check(cfg)                 # [Problem(key="lora.r", message="`lora.r` must be ..."), ...]
    raise ConfigError(problems)           # one error listing them all

A `Problem` carries the dotted key it is about (or "" for the config as a whole), so the form can put
each one beside its field without reading the message. Messages name the field in backticks and the
fix. No message echoes a token (anything shaped like a Hugging Face token becomes `hf_***`) or more
than a short excerpt of a value, however large the value is.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from typing import Any

from sftlib.config.coerce import EXPECTED, type_ok
from sftlib.config.fields import (EXPORT_FORMATS, FIELDS, GGUF_QUANTIZATIONS, MAPPING_KEYS, SECTIONS, get_value)
from sftlib.errors import SftlibError
from sftlib.tokens import MASK, TOKEN_PATTERN

# Used only while sftlib.data.templates cannot be imported; that module's TEMPLATE_NAMES is the truth.
FALLBACK_TEMPLATE_NAMES = ("alpaca", "chatml", "gemma", "llama-3", "llama-3.1", "mistral", "mistral-v3", "phi-3", "qwen-2.5")
TOKEN_ADVICE = ("`{key}` holds what looks like a Hugging Face token; never put a token in a config (configs are "
                "saved and shared): set the HF_TOKEN environment variable or a Colab secret named HF_TOKEN instead")
# Names people bring from TRL, PEFT, Unsloth or the article's code, mapped to ours (for "did you mean").
KEY_ALIASES = {
    "rank": "lora.r", "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "lr": "train.learning_rate", "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "num_train_epochs": "train.epochs",
    "lr_scheduler_type": "train.lr_scheduler", "use_gradient_checkpointing": "train.gradient_checkpointing",
    "model_name": "model.name", "max_seq_len": "model.max_seq_length", "dataset": "data.source",
    "dataset_name": "data.source", "save_method": "export.formats", "quantization_method": "export.gguf_quantizations",
}
VALUE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
_REPO_PART = re.compile(r"[A-Za-z0-9._-]{1,96}")
_BRANCH_BAD = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")  # what git refuses in a branch name (spaces included)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: the dotted key it is about ("" = the config as a whole) and the message."""

    key: str
    message: str

    def __str__(self) -> str:
        return self.message


class ConfigError(SftlibError):
    """Every problem found in a config, one per line; `.problems` holds them as `Problem`s."""

    def __init__(self, problems: list[Problem | str] | Problem | str):
        items = [problems] if isinstance(problems, (str, Problem)) else list(problems)
        self.problems = [p if isinstance(p, Problem) else Problem("", str(p)) for p in items]
        # errors get printed: never echo a token
        self.problems = [Problem(p.key, TOKEN_PATTERN.sub(MASK, p.message)) for p in self.problems]
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        super().__init__(f"{count} in the run config:\n" + "\n".join(f"  - {p}" for p in self.problems))


# Upper bounds far above any real run, so that a typo (1e30, an extra zero run) is an error, not an
# overflow or an allocation that takes the machine down.
MAX = {"lora.r": 4096, "lora.alpha": 1 << 20, "model.max_seq_length": 1 << 20, "train.batch_size": 1 << 16,
       "train.grad_accum": 1 << 16, "train.checkpoint_keep_layers": 1 << 16,
       "train.epochs": 10_000, "train.max_steps": 100_000_000}


def show(value: Any, limit: int = 60) -> str:
    """A bounded excerpt of a value and its type, for messages: never the whole of a huge value."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        text = repr(value) if not isinstance(value, int) or abs(value) < 10 ** 30 else f"{str(value)[:20]}..."
    else:  # a container may be huge (a YAML alias bomb): describe it, never repr it whole
        size = len(value) if hasattr(value, "__len__") else None
        text = f"a {type(value).__name__}" + (f" of {size} items" if size is not None else "")
        return TOKEN_PATTERN.sub(MASK, text)
    text = text[:limit] + "..." if len(text) > limit else text
    return TOKEN_PATTERN.sub(MASK, f"{text} ({type(value).__name__})")


def did_you_mean(word: str, candidates: Any) -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean `{match[0]}`?" if match else ""


def unknown_key(key: str) -> Problem:
    leaf = key.rpartition(".")[2]
    # Match whole dotted names ("lora.rank" ~ "lora.r") and bare leaf names ("learning_rate").
    targets = {k: k for k in FIELDS}
    targets.update({k.rpartition(".")[2]: k for k in reversed(list(FIELDS))})
    guess = KEY_ALIASES.get(leaf) or KEY_ALIASES.get(key)
    if guess is None:
        match = difflib.get_close_matches(key, list(targets), n=1, cutoff=0.6)
        guess = targets[match[0]] if match else None
    if guess is not None:
        return Problem(key, f"unknown key `{key}`; did you mean `{guess}`?")
    section = key.partition(".")[0]
    if section in SECTIONS:
        names = ", ".join(f.name for f in dataclasses.fields(SECTIONS[section]))
        return Problem(key, f"unknown key `{key}`; `{section}` has: {names}")
    return Problem(key, f"unknown key `{key}`; the top-level keys are {', '.join(SECTIONS)} and backend")


def bad_choice(key: str, value: Any, choices: tuple[str, ...]) -> Problem:
    hint = f"; did you mean `{VALUE_ALIASES[value]}`?" if VALUE_ALIASES.get(value) in choices \
        else did_you_mean(str(value), choices)
    if len(choices) <= 12:
        return Problem(key, f"`{key}` must be one of {', '.join(choices)}, got {show(value).rsplit(' (', 1)[0]}{hint}")
    return Problem(key, f"`{key}` got unknown value {show(value).rsplit(' (', 1)[0]}{hint} "
                        f"(known: {', '.join(choices[:6])}, ...)")


def template_names() -> tuple[str, ...]:
    try:  # imported here: a config can be built and checked before sftlib.data's dependencies are installed
        from sftlib.data.templates import TEMPLATE_NAMES
    except ImportError:
        return FALLBACK_TEMPLATE_NAMES
    return tuple(TEMPLATE_NAMES)


def repo_problems(repo, name: str = "repo") -> list[str]:
    """What is wrong with `repo` as a Hub model repository id, in the words of the field `name`; [] if nothing."""
    rule = ("each part letters, digits, `-`, `_` or `.`, at most 96 characters, not starting or ending with `-` or "
            "`.`, without `--` or `..`, no `.git` ending; e.g. `me/llama-3.1-8b-chat`")
    if not isinstance(repo, str) or repo.count("/") != 1 or "" in repo.split("/"):
        return [f"`{name}` must look like `owner/name` ({rule}), got {show(repo)}"]
    if repo.endswith(".git") or any(not _REPO_PART.fullmatch(part) or part[0] in "-." or part[-1] in "-."
                                    or "--" in part or ".." in part for part in repo.split("/")):
        return [f"`{name}` is not a valid Hub repository id: {show(repo)} ({rule})"]
    return []


def revision_problems(revision, name: str = "revision") -> list[str]:
    """What is wrong with `revision` as a branch name to upload to; [] if nothing."""
    if not isinstance(revision, str) or not revision:
        return [f"`{name}` must be a branch name such as `main`, got {show(revision)}"]
    if (_BRANCH_BAD.search(revision) or ".." in revision or "//" in revision or "@{" in revision
            or revision[0] in "-/." or revision[-1] in "/." or revision.endswith(".lock")):
        return [f"`{name}` must be a branch name (no spaces, `..`, `~^:?*[\\`, no leading `-`, `/` or `.`), "
                f"e.g. `main` or `v1`; got {show(revision)}"]
    return []


def export_format_problem(entry: str) -> str | None:
    """Why `entry` is not an export format (`lora`, `merged_16bit`, `merged_4bit`, `gguf`, `gguf:TYPE`); None if it is."""
    name = entry.strip().lower()
    kind, sep, qtype = name.partition(":")
    if (name in EXPORT_FORMATS and not sep) or (kind == "gguf" and sep and qtype in GGUF_QUANTIZATIONS):
        return None
    if kind == "gguf" and sep:
        return (f"unknown GGUF type `{qtype}` in `{entry}`" + did_you_mean(qtype, GGUF_QUANTIZATIONS)
                + f" (known: {', '.join(GGUF_QUANTIZATIONS[:8])}, ...)")
    return (f"unknown format `{entry}`" + did_you_mean(name, [*EXPORT_FORMATS, "gguf:q4_k_m"])
            + f"; use {', '.join(EXPORT_FORMATS)} or gguf:TYPE (e.g. gguf:q4_k_m)")


def _no_duplicates(p: list[Problem], key: str, items: list[str]) -> None:
    dupes = sorted({x for x in items if items.count(x) > 1})
    if dupes:
        p.append(Problem(key, f"`{key}` lists {', '.join(dupes)} more than once"))


def check(cfg) -> list[Problem]:
    """Every problem of a RunConfig, in field order; [] when it can run."""
    # Values set in code skip the coercion of with_overrides; range checks below would crash on a wrong type.
    wrong = [Problem(key, f"`{key}` must be {EXPECTED[f.type]}, got {show(get_value(cfg, key))}")
             for key, f in FIELDS.items() if not type_ok(get_value(cfg, key), f.type)]
    if wrong:
        return wrong
    p: list[Problem] = []
    m, lo, d, t, e = cfg.model, cfg.lora, cfg.data, cfg.train, cfg.export

    for key, f in FIELDS.items():  # enums, including each item of a list
        value = get_value(cfg, key)
        if "choices" not in f.metadata:
            continue
        for item in value if isinstance(value, list) else [value]:
            if item not in f.metadata["choices"]:
                p.append(bad_choice(key, item, f.metadata["choices"]))
    templates = template_names()
    if m.chat_template not in templates:
        p.append(bad_choice("model.chat_template", m.chat_template, templates))

    def need(key: str, ok: bool, message: str) -> None:
        if not ok:
            p.append(Problem(key, message))

    need("model.name", m.name.strip() != "", "`model.name` is empty; give a Hub id such as "
         "`unsloth/Meta-Llama-3.1-8B-bnb-4bit`, a local folder, or `demo`")
    need("model.max_seq_length", m.max_seq_length > 0,
         f"`model.max_seq_length` must be a positive integer, got {m.max_seq_length}")

    need("lora.r", lo.r > 0, f"`lora.r` must be a positive integer, got {show(lo.r).rsplit(' (', 1)[0]}")
    need("lora.r", lo.r <= MAX["lora.r"], f"`lora.r` is {show(lo.r).rsplit(' (', 1)[0]}: at most {MAX['lora.r']} "
         "(and at most the width of the smallest adapted layer); LoRA uses 8-128")
    need("lora.alpha", lo.alpha > 0, f"`lora.alpha` must be a positive integer, got {show(lo.alpha).rsplit(' (', 1)[0]}")
    for key, value in (("lora.alpha", lo.alpha), ("model.max_seq_length", m.max_seq_length),
                       ("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum),
                       ("train.checkpoint_keep_layers", t.checkpoint_keep_layers), ("train.epochs", t.epochs),
                       ("train.max_steps", t.max_steps)):
        need(key, value <= MAX[key], f"`{key}` is {show(value).rsplit(' (', 1)[0]}: at most {MAX[key]:,} is accepted")
    need("lora.dropout", 0 <= lo.dropout < 1, f"`lora.dropout` must be in [0, 1), got {lo.dropout}")
    need("lora.target_modules", len(lo.target_modules) > 0,
         "`lora.target_modules` is empty; list the layers to adapt, e.g. [q_proj, v_proj]")
    need("lora.target_modules", all(x.strip() for x in lo.target_modules), "`lora.target_modules` has an empty name")
    _no_duplicates(p, "lora.target_modules", lo.target_modules)

    need("data.source", d.source.strip() != "", "`data.source` is empty; give a Hub dataset name, a local file, "
         "or `demo`")
    need("data.split", d.split.strip() != "", "`data.split` is empty; use `train` or a slice such as `train[:1000]`")
    for k, v in d.mapping.items():
        if k not in MAPPING_KEYS:
            p.append(Problem("data.mapping", f"`data.mapping` has unknown key `{k}` (known: {', '.join(MAPPING_KEYS)})"
                             + did_you_mean(k, MAPPING_KEYS)))
        need("data.mapping", v.strip() != "", f"`data.mapping.{k}` is empty; give the dataset's own name for it")
    if not (d.eval_size >= 0):
        p.append(Problem("data.eval_size", "`data.eval_size` must be 0, a fraction in (0, 1) or a row count >= 1, "
                         f"got {d.eval_size}"))
    elif d.eval_size >= 1 and not float(d.eval_size).is_integer():
        p.append(Problem("data.eval_size", f"`data.eval_size` above 1 is a row count and must be whole, got "
                         f"{d.eval_size}; use a fraction below 1 for a share of the rows"))
    need("data.max_rows", d.max_rows is None or d.max_rows >= 1, f"`data.max_rows` must be null or >= 1, got {d.max_rows}")
    if d.max_rows is not None and d.max_rows >= 1 and d.eval_size >= d.max_rows:
        p.append(Problem("data.eval_size", f"`data.eval_size` ({d.eval_size}) holds out every one of `data.max_rows` "
                         f"({d.max_rows}) rows; lower it or raise max_rows"))
    need("data.shuffle_seed", d.shuffle_seed >= 0, f"`data.shuffle_seed` must be >= 0, got {d.shuffle_seed}")

    need("train.learning_rate", 0 < t.learning_rate <= 1, f"`train.learning_rate` must be in (0, 1], got "
         f"{t.learning_rate}; LoRA usually takes 1e-5 to 5e-4")
    need("train.batch_size", t.batch_size >= 1, f"`train.batch_size` must be >= 1, got {t.batch_size}")
    need("train.grad_accum", t.grad_accum >= 1, f"`train.grad_accum` must be >= 1, got {t.grad_accum}")
    need("train.checkpoint_keep_layers", t.checkpoint_keep_layers >= 0,
         f"`train.checkpoint_keep_layers` must be >= 0 (0 = every layer recomputed), got {t.checkpoint_keep_layers}")
    need("train.max_steps", t.max_steps == -1 or t.max_steps > 0,
         f"`train.max_steps` must be -1 (use epochs) or > 0, got {t.max_steps}")
    need("train.epochs", t.epochs > 0 or t.max_steps > 0,
         f"`train.epochs` must be > 0 unless `train.max_steps` > 0, got {t.epochs}")
    need("train.weight_decay", t.weight_decay >= 0, f"`train.weight_decay` must be >= 0, got {t.weight_decay}")
    need("train.warmup_steps", t.warmup_steps >= 0, f"`train.warmup_steps` must be >= 0, got {t.warmup_steps}")
    need("train.seed", t.seed >= 0, f"`train.seed` must be >= 0, got {t.seed}")
    need("train.logging_steps", t.logging_steps >= 1, f"`train.logging_steps` must be >= 1, got {t.logging_steps}")
    need("train.save_steps", t.save_steps >= 0,
         f"`train.save_steps` must be >= 0 (0 = no intermediate checkpoints), got {t.save_steps}")
    need("train.beta", t.beta > 0, f"`train.beta` must be > 0, got {t.beta}; 0.1 is usual for DPO and ORPO")
    need("train.sft_weight", t.sft_weight >= 0, f"`train.sft_weight` must be >= 0 (0 = DPO alone), got {t.sft_weight}")
    if t.method != "dpo" and t.sft_weight:
        p.append(Problem("train.sft_weight", f"`train.sft_weight` adds a loss to DPO, but `train.method` is "
                         f"`{t.method}`; set it to 0" + (" (ORPO's loss has the chosen replies' loss already)"
                                                         if t.method == "orpo" else "")))
    if t.method == "sft" and t.loss_type != "sigmoid":
        p.append(Problem("train.loss_type", f"`train.loss_type: {t.loss_type}` is a DPO loss, but `train.method` is "
                         "`sft`; set `train.method: dpo` or leave `train.loss_type` at `sigmoid`"))
    if t.method == "orpo" and t.loss_type != "sigmoid":
        p.append(Problem("train.loss_type", f"`train.loss_type: {t.loss_type}` is a DPO loss; ORPO has one loss: "
                         "leave it at `sigmoid` or use `train.method: dpo`"))
    need("train.output_dir", t.output_dir.strip() != "", "`train.output_dir` is empty; give a folder such as `outputs`")
    need("train.resume", t.resume.strip() != "", "`train.resume` is empty; use `auto`, `never` or a checkpoint "
         "folder's path")
    need("train.report_to", t.report_to.strip() != "", "`train.report_to` is empty; use `none` to log to the "
         "console only")

    need("export.output_dir", e.output_dir.strip() != "", "`export.output_dir` is empty; give a folder such as `model`")
    for entry in e.formats:
        problem = export_format_problem(entry)
        if problem:
            p.append(Problem("export.formats", f"`export.formats`: {problem}"))
    _no_duplicates(p, "export.formats", e.formats)
    _no_duplicates(p, "export.gguf_quantizations", e.gguf_quantizations)
    need("export.gguf_quantizations", "gguf" not in e.formats or len(e.gguf_quantizations) > 0,
         "`export.formats` includes `gguf` but `export.gguf_quantizations` is empty; add e.g. q4_k_m")
    for key in FIELDS:  # a config is saved and shared: a token in it would leak
        values = get_value(cfg, key)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str) and TOKEN_PATTERN.search(value):
                p.append(Problem(key, TOKEN_ADVICE.format(key=key)))
    if e.push_to_hub and not e.hub_repo:
        p.append(Problem("export.hub_repo", "`export.push_to_hub` is true but `export.hub_repo` is empty; set it to "
                         "`owner/name`"))
    elif e.hub_repo:
        p += [Problem("export.hub_repo", x) for x in repo_problems(e.hub_repo, "export.hub_repo")]
    p += [Problem("export.hub_revision", x) for x in revision_problems(e.hub_revision, "export.hub_revision")]
    return p
