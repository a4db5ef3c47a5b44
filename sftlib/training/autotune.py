"""Choose gradient checkpointing and the micro-batch from the GPU's free memory, keeping the effective batch.

    from sftlib.training.autotune import plan_for_model
    plan = plan_for_model(cfg, model, backend)   # after load_model, before add_lora
    plan.gradient_checkpointing, plan.batch_size, plan.grad_accum, plan.estimated_peak_gib
    print(plan)                                  # what was chosen and why

`train.gradient_checkpointing: auto` and `train.auto_batch: true` call this from `sftlib.training.lora.add_lora`,
which writes the plan into `cfg.train` (so TRL gets the chosen micro-batch) and onto the model
(`model.sftlib_plan`).

Why: the article's settings (batch 8 x 2, Unsloth's offloaded checkpointing) peak near 9 GiB. On a
40-141 GiB card that leaves most memory idle and pays for recomputing every layer. Measured on an
H200 with Llama-3.1-8B in 4-bit and packed 2048-token rows (benchmarks/results/), turning
checkpointing off is the largest single gain (12,370 against 9,115 tokens/s; under a 40 GiB cap,
micro-batch 2 without checkpointing still beat the article's settings: 10,585), and micro-batches beyond
about 16k tokens are slower, not faster (see MAX_TOKENS_PER_MICRO_BATCH). So the rule is:

1. Candidates are (checkpointing, micro-batch) pairs whose micro-batch divides the effective batch
   `batch_size x grad_accum` (with `auto_batch`; otherwise only the configured batch_size).
2. Micro-batches above `MAX_TOKENS_PER_MICRO_BATCH` tokens are dropped unless nothing else is left.
3. The first candidate that fits wins, in this order: no checkpointing with the largest micro-batch
   down to `MIN_TOKENS_WITHOUT_CHECKPOINTING` tokens, then checkpointing (Unsloth's offloaded kind on
   the unsloth backend) with the largest micro-batch, then smaller micro-batches without checkpointing.
   Two rows of 2048 tokens without recomputation beat eight with it (13,627 against 11,116 tokens/s,
   H200). One row does not, under a 15 GiB cap where it peaks at 13.6 GiB: on one H100, run twice
   each, 9,258 and 9,455 tokens/s against 10,765 and 10,659 for eight rows recomputed (an earlier
   run's 12,862 was not reproduced, a later one gave 11,114 against 10,773; benchmarks/results/gpu_bench.md),
   so recomputation comes first there. To train one row at a time without it, set
   `train.gradient_checkpointing: false`, `train.batch_size: 1`. Two rows recomputing half the layers
   (`train.checkpoint_keep_layers: 16`) ran 1.02x the plan there, with 12 kept 0.95x: not chosen either.
4. Where the plan recomputes on Unsloth and no layers were configured to be kept, `SFTLIB_AUTO_KEEP=1` keeps as
   many layers from recomputation as the memory left holds by the same estimate (`Plan.keep_layers`). Off
   by default: at the plan's 8 x 2 under a 15 GiB cap (H100), two kept ran 1.01x and five ran out of memory,
   and the one layer this estimate allows there has not been measured.

"Fits" uses a memory model: the bytes already allocated (the loaded model, measured), plus the LoRA
weights, gradients and optimizer states, plus activation bytes per token x tokens per micro-batch,
must stay under the budget minus a safety margin. The per-token activation bytes were measured on the
GPU for each checkpointing mode (`MEASURED`; `PACKED_KERNEL` when sftlib's packed-attention kernel runs,
which keeps less per token) and are scaled to other models by their layer count and widths. The budget
is the device memory this process can use: free plus what it already holds, capped by
`torch.cuda.set_per_process_memory_fraction` and by the `SFTLIB_GPU_MEMORY_GIB` variable.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

GiB = 1024 ** 3
# Measured earlier on the H200 (Llama-3.1-8B config, 4-bit, packed 2048-token rows): 16 x 2048 tokens per
# micro-batch ran 10,009 tokens/s against 12,412 for 8 x 2048 without checkpointing, and 8,010 against about
# 9,400 with Unsloth's: beyond this many tokens, larger micro-batches only spend memory.
MAX_TOKENS_PER_MICRO_BATCH = 16384
# Micro-batches without recomputation below this many tokens come after recomputation (rule 3 above).
MIN_TOKENS_WITHOUT_CHECKPOINTING = 4096


@dataclass(frozen=True)
class MemoryModel:
    """Activation bytes per token = coefficient x the model's size measure for that mode.

    `no_checkpointing` scales with layers x (hidden + intermediate) x 2 bytes: every layer keeps its
    activations. `offloaded` (Unsloth) scales with (hidden + intermediate) x 2: layer inputs live in CPU
    memory and one layer is recomputed at a time. `checkpointing` (transformers) is the offloaded
    figure plus one bf16 hidden state per layer and token, kept on the GPU. Where the backend is not
    Unsloth, `logits_bytes` per token and vocabulary entry is added and the no-checkpointing figure is
    multiplied by `hf_factor`.
    """

    no_checkpointing: float
    offloaded: float
    logits_bytes: float = 4.8    # measured: hf + TRL 1.15 (its chunked loss), with checkpointing
    hf_factor: float = 1.5       # NOT measured: transformers keeps more per layer than Unsloth's kernels
    overhead_gib: float = 1.1    # measured: peak at zero tokens (line through two batch sizes) minus memory held
    margin: float = 0.08         # of the budget, for allocator fragmentation and estimate error
    reserve_gib: float = 1.0     # kept free besides: workspaces of kernels not seen in the measurement
    source: str = ""


# Measured on an H200 with the Llama-3.1-8B config in 4-bit, packed 2048-token rows, Unsloth 2026.10.9,
# torch 2.11 (benchmarks/results/gpu_bench.md): peaks of 66.36 GiB (no checkpointing, 8 x 2048 tokens),
# 21.51 GiB (2 x 2048) and 8.96 GiB (offloaded checkpointing, 8 x 2048) over 5.50 GiB held before
# training -> 3.92 MB per token without checkpointing (3.32 x 32 x 18432 x 2), 157 kB with (4.27 x 18432 x 2).
MEASURED = MemoryModel(
    no_checkpointing=3.32, offloaded=4.27,
    source="H200, Llama-3.1-8B config in 4-bit, Unsloth 2026.10.9, packed 2048-token rows",
)
# The same workload with sftlib's packed-attention kernel on (sftlib.training.packed_attention: one varlen
# flash call per layer, no per-document copies), H100, 2026-12-05: peaks of 60.76 GiB (8 rows, 16,363 tokens)
# and 13.59 GiB (1 row, 2,045 tokens) over 5.50 GiB held, no checkpointing -> 3.37 MiB per token
# (3.00 x 32 x 18432 x 2 bytes) and 1.35 GiB at zero tokens; reserved stayed within 0.1 GiB of allocated.
# The offloaded figure is unchanged (8.80 against 8.96 GiB for 8 x 2048).
PACKED_KERNEL = MemoryModel(
    no_checkpointing=3.00, offloaded=4.27, overhead_gib=1.35,
    source="H100, Llama-3.1-8B config in 4-bit, Unsloth 2026.10.9, packed 2048-token rows, packed-attention kernel",
)


@dataclass(frozen=True)
class ModelDims:
    layers: int
    hidden: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "ModelDims":
        text = getattr(config, "text_config", None) or config
        return cls(text.num_hidden_layers, text.hidden_size, text.intermediate_size, text.vocab_size)


@dataclass
class Plan:
    gradient_checkpointing: str   # "false" | "unsloth" | "true"
    batch_size: int
    grad_accum: int
    estimated_peak_gib: float
    budget_gib: float
    fits: bool
    reason: str
    candidates: list = field(default_factory=list)  # (checkpointing, batch, estimated GiB, fits) tried
    keep_layers: int = 0  # layers the plan exempts from recomputation (SFTLIB_AUTO_KEEP=1); 0: none chosen

    def __str__(self) -> str:
        return (f"memory plan: checkpointing {self.gradient_checkpointing}, batch {self.batch_size} x "
                f"{self.grad_accum}, about {self.estimated_peak_gib:.1f} of {self.budget_gib:.1f} GiB ({self.reason})")

    def to_dict(self) -> dict:
        return asdict(self)


def activation_bytes_per_token(dims: ModelDims, checkpointing: str, *, backend: str = "unsloth",
                               model: MemoryModel = MEASURED, keep_layers: int = 0) -> float:
    """Bytes of activations per trained token for `checkpointing` ("false", "unsloth" or "true"), with
    `keep_layers` of the layers not recomputed (`train.checkpoint_keep_layers`) keeping all of theirs."""
    layer = (dims.hidden + dims.intermediate) * 2
    if checkpointing == "false":
        per_token = model.no_checkpointing * dims.layers * layer
    else:
        kept = min(keep_layers, dims.layers)
        per_token = model.offloaded * layer + model.no_checkpointing * kept * layer
        if checkpointing != "unsloth":
            per_token += (dims.layers - kept) * dims.hidden * 2
    if backend != "unsloth":
        if checkpointing == "false":
            per_token *= model.hf_factor
        per_token += model.logits_bytes * dims.vocab
    return per_token


def lora_state_bytes(model, r: int, targets) -> float:
    """LoRA weights in float32 + their gradients + 8-bit Adam states, counted from `model`'s layers."""
    params = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and hasattr(module, "in_features"):
            params += r * (module.in_features + module.out_features)
    return params * (4 + 4 + 2)


def divisors(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def plan(*, budget_bytes: float, static_bytes: float, dims: ModelDims, seq_len: int, batch_size: int,
         grad_accum: int, checkpointing: str, auto_batch: bool, backend: str = "unsloth",
         model: MemoryModel = MEASURED, keep_layers: int = 0, fill_keep: bool = False) -> Plan:
    """The settings to train with. `checkpointing` is the configured value; `auto` lets the plan choose.

    `static_bytes`: memory held before training (weights, LoRA, optimizer states); `budget_bytes`:
    what the process may use in all; `keep_layers`: layers exempt from recomputation wherever it is on.
    `fill_keep`: where the plan recomputes and `keep_layers` is 0, exempt as many layers as the memory left
    under the budget holds by the same estimate (`Plan.keep_layers`).
    """
    effective = batch_size * grad_accum
    usable = budget_bytes * (1 - model.margin) - model.reserve_gib * GiB
    if checkpointing == "auto":
        modes = ["false", "unsloth" if backend == "unsloth" else "true"]
    else:
        modes = [checkpointing]
    sizes = divisors(effective) if auto_batch else [batch_size]
    small = [b for b in sizes if b * seq_len <= MAX_TOKENS_PER_MICRO_BATCH] or sizes[-1:]
    ordered = small + [b for b in sizes if b not in small]  # too-large micro-batches only as a last resort
    candidates = [(modes[0], b) for b in ordered]
    if len(modes) > 1:  # auto: tiny micro-batches without recomputation only after recomputation's
        tiny = [c for c in candidates if c[1] * seq_len < MIN_TOKENS_WITHOUT_CHECKPOINTING and c[1] != ordered[0]]
        candidates = [c for c in candidates if c not in tiny] + [(modes[1], b) for b in ordered] + tiny
    tried = []
    for mode, b in candidates:
        per_token = activation_bytes_per_token(dims, mode, backend=backend, model=model, keep_layers=keep_layers)
        peak = static_bytes + model.overhead_gib * GiB + per_token * b * seq_len
        ok = peak <= usable
        tried.append((mode, b, round(peak / GiB, 2), ok))
        if ok:
            why = "no recomputation" if mode == "false" else \
                "checkpointing needed to fit" if checkpointing == "auto" else "checkpointing as configured"
            if b != batch_size:
                why += f"; micro-batch {b} keeps the effective batch of {effective}"
            kept = 0
            if fill_keep and mode != "false" and not keep_layers:
                for k in range(dims.layers, 0, -1):
                    per_token = activation_bytes_per_token(dims, mode, backend=backend, model=model, keep_layers=k)
                    with_k = static_bytes + model.overhead_gib * GiB + per_token * b * seq_len
                    if with_k <= usable:
                        kept, peak = k, with_k
                        why += f"; {k} of {dims.layers} layers kept from recomputation in the memory left"
                        break
            return Plan(mode, b, effective // b, peak / GiB, budget_bytes / GiB, True, why, tried, kept)
    mode, b = modes[-1], sizes[-1]
    peak = static_bytes + model.overhead_gib * GiB + \
        activation_bytes_per_token(dims, mode, backend=backend, model=model, keep_layers=keep_layers) * b * seq_len
    return Plan(mode, b, effective // b, peak / GiB, budget_bytes / GiB, False,
                "nothing fits the estimate; trying the smallest setting", tried)


def auto_keep() -> bool:
    """Whether a plan that recomputes also keeps layers out of recomputation in the memory it leaves
    (SFTLIB_AUTO_KEEP: 0, the default until measured on a GPU, or 1)."""
    from sftlib.training import env_switch

    return env_switch("SFTLIB_AUTO_KEEP", False)


def unsloth_can_keep_layers() -> bool:
    """Whether this Unsloth's get_peft_model takes `checkpoint_skip_layers` (layers kept from recomputation)."""
    import inspect

    from unsloth import FastLanguageModel

    return "checkpoint_skip_layers" in inspect.signature(FastLanguageModel.get_peft_model).parameters


def gpu_budget_bytes(device: int = 0) -> float:
    """Memory this process may use on `device`: free + already held, capped by the per-process fraction
    and by SFTLIB_GPU_MEMORY_GIB."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    budget = free + torch.cuda.memory_reserved(device)
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if getter is not None:
        budget = min(budget, getter(device) * total)
    cap = os.environ.get("SFTLIB_GPU_MEMORY_GIB")
    if cap:
        budget = min(budget, float(cap) * GiB)
    return float(budget)


def plan_for_model(cfg, model, backend) -> Plan:
    """The plan for `cfg` on the loaded `model` (before LoRA is added) on `backend`'s GPU."""
    import torch

    t = cfg.train
    dims = ModelDims.from_config(model.config)
    if not backend.cuda:
        mode = "false" if t.gradient_checkpointing == "auto" else t.gradient_checkpointing
        return Plan(mode, t.batch_size, t.grad_accum, 0.0, 0.0, True, "no GPU: memory not planned")
    device = torch.cuda.current_device()
    static = torch.cuda.memory_allocated(device) + lora_state_bytes(model, cfg.lora.r, cfg.lora.target_modules)
    from sftlib.training import packed_attention

    # kept layers only where their memory was measured: Unsloth's (transformers keeps more per layer, hf_factor)
    fill = auto_keep() and t.gradient_checkpointing == "auto" and not t.checkpoint_keep_layers and \
        backend.name == "unsloth" and unsloth_can_keep_layers()
    return plan(budget_bytes=gpu_budget_bytes(device), static_bytes=static, dims=dims,
                seq_len=cfg.model.max_seq_length, batch_size=t.batch_size, grad_accum=t.grad_accum,
                checkpointing=t.gradient_checkpointing, auto_batch=t.auto_batch, backend=backend.name,
                keep_layers=t.checkpoint_keep_layers, fill_keep=fill,
                model=PACKED_KERNEL if packed_attention.active() and t.packing else MEASURED)


def apply(cfg, chosen: Plan) -> list[str]:
    """Write `chosen` into `cfg.train`; returns one note per value that changed."""
    t, notes = cfg.train, []
    changes = [("gradient_checkpointing", chosen.gradient_checkpointing), ("batch_size", chosen.batch_size),
               ("grad_accum", chosen.grad_accum)]
    if chosen.keep_layers:
        changes.append(("checkpoint_keep_layers", chosen.keep_layers))
    for key, value in changes:
        if getattr(t, key) != value:
            notes.append(f"`train.{key}`: {getattr(t, key)} -> {value}")
            setattr(t, key, value)
            cfg.sources[f"train.{key}"] = "auto"
    if not chosen.fits:
        import warnings

        warnings.warn(f"{chosen}: it may run out of GPU memory; lower `model.max_seq_length` or the batch",
                      stacklevel=2)
    return notes
