"""The run config's fields: one dataclass per section, help text and allowed values on every field.

    from sftlib.config.fields import FIELDS, SECTIONS
    FIELDS["lora.r"].metadata["help"]       # "LoRA rank: the size of the low-rank update matrices ..."
    FIELDS["train.optim"].metadata["choices"]

The defaults are the recipe of the "Fine-tune Llama 3.1 Ultra-Efficiently with Unsloth" article
(QLoRA on unsloth/Meta-Llama-3.1-8B-bnb-4bit, FineTome-100k, ChatML); the one exception is
`data.train_on` (see its help). The help text is the single source of the YAML docs, the command
line's help, the form's tooltips and `RunConfig.describe()`.
"""


import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sftlib.config.coerce import as_count_or_fraction

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
METHODS = ("sft", "dpo", "orpo")
# the pairwise DPO losses of TRL's DPOConfig (1.14) that need nothing but beta
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
              "sigmoid_norm")
EXPORT_FORMATS = ("lora", "merged_16bit", "merged_4bit", "gguf")
# llama.cpp quantization types, in the lower case that Unsloth's `quantization_method` takes.
GGUF_QUANTIZATIONS = (
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q4_0", "q4_1",
    "q3_k_l", "q3_k_m", "q3_k_s", "q2_k", "q2_k_s", "iq4_nl", "iq4_xs", "iq3_m", "iq3_s", "iq3_xs", "iq3_xxs",
    "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s", "tq1_0", "tq2_0",
)
BACKENDS = ("auto", "unsloth", "hf", "cpu")


def setting(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with help text (and optional `choices`/`coerce`) in its metadata."""
    metadata = {"help": help, **metadata}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    name: str = setting("unsloth/Meta-Llama-3.1-8B-bnb-4bit",
                        "Hub id or local folder of the base model; `demo` is the tiny model bundled with sftlib.")
    max_seq_length: int = setting(2048, "Longest training sequence in tokens; longer rows are truncated.")
    load_in_4bit: bool = setting(True, "Load the base weights in 4-bit NF4 (QLoRA). Needs a CUDA GPU.")
    dtype: str = setting("auto", "Compute dtype; `auto` picks bfloat16 where the GPU supports it, else float16.",
                         choices=DTYPES)
    chat_template: str = setting("chatml", "Chat template the conversations are rendered with (see "
                                 "sftlib.data.templates).")
    trust_remote_code: bool = setting(False, "Run modelling code shipped in the model's repository.")
    attn_implementation: str = setting("auto", "Attention kernel; `auto` lets the backend choose.",
                                       choices=ATTN_IMPLEMENTATIONS)


@dataclass
class LoraConfig:
    r: int = setting(16, "LoRA rank: the size of the low-rank update matrices (8-128 is usual).")
    alpha: int = setting(16, "LoRA scaling numerator; = r because rsLoRA scales by alpha/sqrt(r).")
    dropout: float = setting(0.0, "Dropout on the LoRA input, in [0, 1); 0 lets Unsloth use its fast path.")
    target_modules: list[str] = setting(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Linear layers that get adapters: every attention and MLP projection.")
    use_rslora: bool = setting(True, "Rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r.")
    use_dora: bool = setting(False, "Weight-decomposed LoRA (DoRA); slower, sometimes better at low rank.")
    bias: str = setting("none", "Which biases to train alongside the adapters.", choices=LORA_BIASES)
    train_embeddings: str = setting(
        "auto", "Train embed_tokens and lm_head: `auto` = only the rows that need it (tokens added to the "
        "vocabulary, e.g. ChatML's on a base model, and an end-of-turn token the base never predicts), saved "
        "as rows, on every backend. `always` = both matrices whole; `never`.",
        choices=TRAIN_EMBEDDINGS)
    start_from: str = setting("", "Folder of trained LoRA adapters to continue from instead of new ones, e.g. an "
                              "SFT run's `lora` export before preference tuning it (`train.method: dpo`); empty = "
                              "new adapters. Its `r`, `alpha` and targets replace the values above.")


@dataclass
class DataConfig:
    source: str = setting("mlabonne/FineTome-100k",
                          "Hub dataset name or a local .json/.jsonl/.parquet/.csv file or folder; `demo` = bundled data.")
    split: str = setting("train", "Split to load, with datasets' slicing syntax, e.g. `train[:10000]`.")
    format: str = setting("auto", "Row format; `auto` detects it from the first rows' keys.", choices=DATA_FORMATS)
    mapping: dict[str, str] = setting(
        {}, "Our key -> the dataset's key, for datasets with other column or role names, "
        "e.g. {messages: dialog, user: human}. Keys: " + ", ".join(MAPPING_KEYS) + ".")
    # Differs from the article, which computes the loss on every token (prompts included).
    train_on: str = setting("assistant", "Tokens that count in the loss: `assistant` replies only, or `all` "
                            "(the article's choice).", choices=TRAIN_ON)
    eval_size: float = setting(0.0, "Rows held out for evaluation: a fraction in (0, 1), a count >= 1, or 0 for none.",
                               coerce=as_count_or_fraction)
    max_rows: int | None = setting(None, "Use only the first N rows (after the split); null = all.")
    shuffle_seed: int = setting(0, "Seed of the shuffle before the evaluation split.")


@dataclass
class TrainConfig:
    method: str = setting(
        "sft", "What is trained: `sft` = supervised fine-tuning on conversations; `dpo` or `orpo` = preference "
        "tuning on pairs (a prompt, a chosen and a rejected reply; see sftlib.data.pairs) with TRL's DPOTrainer or "
        "ORPOTrainer. DPO's reference is the model as training starts (the base with the adapters off, or "
        "`lora.start_from`'s adapters kept frozen): no second copy of the base. ORPO needs no reference.",
        choices=METHODS)
    beta: float = setting(0.1, "Preference strength (`dpo`, `orpo`): DPO's beta, how strongly the model is held near "
                          "its reference (lower lets it move further); ORPO's lambda, the weight of the odds-ratio "
                          "term beside the chosen replies' loss. 0.1 is TRL's default for both.")
    loss_type: str = setting("sigmoid", "DPO's loss (`dpo` only), as TRL names it: `sigmoid` is the DPO paper's, "
                             "`ipo`, `hinge`, `robust`, ... its variants.", choices=DPO_LOSSES)
    sft_weight: float = setting(0.0, "DPO only: weight of a loss on the chosen replies (their mean negative "
                                "log-likelihood, TRL's `sft` loss) added to the DPO loss, as RPO does; 0 = DPO alone. "
                                "DPO can lower both replies' likelihood and spoil generation, most on small models "
                                "and data; 1.0 keeps the chosen replies likely.")
    learning_rate: float = setting(3e-4, "Peak learning rate, in (0, 1].")
    lr_scheduler: str = setting("linear", "Learning-rate schedule after warm-up.", choices=LR_SCHEDULERS)
    batch_size: int = setting(8, "Sequences per device per step.")
    grad_accum: int = setting(2, "Gradient accumulation steps; effective batch = batch_size x grad_accum.")
    epochs: float = setting(1.0, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = setting(-1, "Stop after this many optimizer steps; -1 = run `epochs` epochs.")
    optim: str = setting("adamw_8bit", "Optimizer name as transformers knows it; `adamw_8bit` needs bitsandbytes.",
                         choices=OPTIMIZERS)
    weight_decay: float = setting(0.01, "Decoupled weight decay on the trained parameters.")
    warmup_steps: int = setting(10, "Linear warm-up steps from 0 to learning_rate.")
    seed: int = setting(0, "Seed for adapter initialisation and data order.")
    packing: bool = setting(True, "Pack several short rows into each max_seq_length sequence.")
    gradient_checkpointing: str = setting(
        "unsloth", "Recompute activations to save memory: `unsloth` (offloaded, Unsloth only), `true`, `false`, "
        "or `auto`: off when the batch fits the free GPU memory without it (see sftlib.training.autotune).",
        choices=GRADIENT_CHECKPOINTING)
    checkpoint_keep_layers: int = setting(
        0, "With checkpointing on: this many decoder layers, evenly spaced, keep their activations for the backward "
        "pass instead of recomputing them: faster, for one layer's activations of a micro-batch each (about 0.2 GiB "
        "per 2048 tokens on Llama-3.1-8B). 0 = every layer recomputed (with `auto` checkpointing on Unsloth and "
        "the environment variable SFTLIB_AUTO_KEEP=1, the plan sets it from the memory it leaves).")
    auto_batch: bool = setting(False, "Split the effective batch (batch_size x grad_accum) into the micro-batch "
                               "that fits the free GPU memory best (see sftlib.training.autotune); needs a CUDA GPU.")
    logging_steps: int = setting(1, "Log loss and learning rate every N steps.")
    output_dir: str = setting("outputs", "Folder for checkpoints and training logs.")
    save_steps: int = setting(0, "Save a checkpoint every N steps; 0 = no intermediate checkpoints.")
    resume: str = setting("auto", "Continue from a checkpoint in `output_dir`: `auto` = the newest complete one "
                          "saved with the same settings (none: start fresh), `never` = start over, or a checkpoint "
                          "folder's path.")
    report_to: str = setting("none", "Experiment tracker(s) for transformers, e.g. `wandb`, `tensorboard`; `none`.")
    preflight: str = setting("stop", "Pre-flight checks before training (sftlib.checks.preflight): `stop` on a fatal "
                             "finding, `warn` = report and train anyway, `off` = skip them.", choices=PREFLIGHT)


@dataclass
class ExportConfig:
    output_dir: str = setting("model", "Folder the exported model(s) are written to.")
    formats: list[str] = setting(["lora", "merged_16bit", "gguf"],
                                 "What to save: `lora` adapters, `merged_16bit` full model, `merged_4bit` (NF4), "
                                 "`gguf` files (the types below), or `gguf:TYPE` for one type; [] = none.")
    gguf_quantizations: list[str] = setting(["q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k", "q8_0"],
                                            "llama.cpp quantization types, one GGUF file each.",
                                            choices=GGUF_QUANTIZATIONS)
    gguf_pre_tokenizer: str = setting("", "llama.cpp pre-tokenizer for a BPE tokenizer its converter does not know "
                                          "(e.g. llama-bpe, qwen2, gpt-2, or auto: read it from tokenizer.json); "
                                          "empty: the converter recognizes it.")
    check_max_new_tokens: int = setting(128, "Longest reply (in tokens) each export check generates: a reply that "
                                             "has not stopped by then cannot show whether the file stops too, and "
                                             "the report says so.")
    push_to_hub: bool = setting(False, "Upload the exports to the Hugging Face Hub (needs hub_repo and a token).")
    hub_repo: str = setting("", "Hub repository `owner/name` to upload to.")
    hub_private: bool = setting(True, "Create the Hub repository as private.")
    hub_revision: str = setting("main", "Branch of the Hub repository to upload to; created from main when missing.")


SECTIONS: dict[str, type] = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "train": TrainConfig,
                             "export": ExportConfig}
SECTION_HELP = {
    "model": "Base model and how it is loaded.",
    "lora": "The LoRA adapters trained on top of the frozen model.",
    "data": "Training data: where it is, its format, what the loss sees.",
    "train": "Optimisation and trainer settings: schedule, batch, checkpoints, logging.",
    "export": "What is saved after training, and where.",
}


@dataclass
class TopLevel:
    """The fields that belong to no section."""

    backend: str = setting("auto", "Training stack: `auto` (Unsloth on a CUDA GPU if installed, else plain "
                           "transformers), `unsloth`, `hf`, or `cpu`.", choices=BACKENDS)


def _all_fields() -> dict[str, dataclasses.Field]:
    out = {}
    for name, cls in SECTIONS.items():
        out.update({f"{name}.{f.name}": f for f in dataclasses.fields(cls)})
    out.update({f.name: f for f in dataclasses.fields(TopLevel)})
    return out


FIELDS: dict[str, dataclasses.Field] = _all_fields()  # every dotted key, in the order files and the form show them


def get_value(cfg: Any, key: str) -> Any:
    """The value of the dotted `key` in a RunConfig."""
    section, _, name = key.rpartition(".")
    return getattr(getattr(cfg, section) if section else cfg, name)


def set_value(cfg: Any, key: str, value: Any) -> None:
    section, _, name = key.rpartition(".")
    setattr(getattr(cfg, section) if section else cfg, name, value)
