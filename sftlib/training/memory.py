"""Memory and time estimate of a LoRA / QLoRA run, from the model's shape alone (no weights loaded).

    from sftlib.training.memory import LLAMA_3_1_8B, ModelShape, estimate_memory
    shape = ModelShape.from_pretrained(cfg.model.name)       # reads config.json only
    est = estimate_memory(cfg, shape, gpu="T4", embeddings_trained=True)
    print(est.to_text())      # the parts, the peak, whether it fits the GPU, what to change if not
    est.peak_gib, est.verdict, est.suggestion

The peak is what PyTorch has allocated at the worst moment of a training step; compare it with
`torch.cuda.max_memory_allocated()`. Bytes per element, with b = 2 in float16/bfloat16 and 4 in
float32 (the compute dtype: `model.dtype`; `auto` = 16-bit on a GPU, 32-bit on a CPU), h = hidden:

- base weights: NF4 = 4.127 bits per parameter of the decoder's linear layers (4-bit codes, absmax per
  64 values quantized again to 8 bits); embeddings, LM head and norms stay 16-bit. Or all at b.
- LoRA: r x (in + out) parameters per adapted layer, in float32 (PEFT's default): 4 (weight) + 4
  (gradient) + the optimizer's states (8 for AdamW, 2 for 8-bit AdamW, 0 for SGD).
- trained embeddings (tokens were added): trainable copies of embed_tokens and lm_head, in float32
  under float16 (the gradient scaler needs it) or at b otherwise, + gradient + optimizer states.
- activations per token and layer kept for the backward pass. transformers: both RMSNorm inputs in
  float32 (8h), their normalised outputs before and after the weight (4bh), q after RoPE and the
  attention output before and after its transpose (3b x q_dim), k and v (2b x kv_dim, or 2b x q_dim
  when a mask makes transformers repeat them), gate, up, SiLU(gate) and their product (4b x
  intermediate), b x r per adapter. Unsloth's fused kernels keep only their inputs: 4bh + 2b x
  q_dim + 2b x kv_dim + 3b x intermediate. Checkpointing keeps each layer's input (b x h; Unsloth's
  offloaded kind moves it to CPU memory) and recomputes one layer at a time; the layers that
  `train.checkpoint_keep_layers` exempts keep all of theirs, as without checkpointing.
- the gradients alive while one layer is back-propagated: b x (3 x intermediate + 2h) per token.
- attention mask (transformers): a boolean (batch x seq)^2 mask for packed rows (batch x seq^2 for
  padded ones), which SDPA turns into a float copy in every layer and keeps for the backward pass.
- logits: TRL's default loss (`chunked_nll`) projects 256 tokens at a time, so about 256 x vocab x
  (b + 20) bytes (float32 logits, log-softmax, entropy terms and their gradients), plus the reordered
  hidden states and their gradient. The logits and a layer's gradients are never alive together.
  With only rows of the embeddings trained (`lora.train_embeddings: auto`, new tokens or an unlikely
  end-of-turn token, sftlib.training.lora) the head with its trained rows written in (vocab x h x b) and
  its gradient are alive during the loss; the rows themselves cost nothing. On transformers the loss
  then runs through the head's forward (`nll`): all tokens x vocab logits at b, their float32 copy and
  its gradient (b + 8 bytes each); Unsloth's loss stays chunked.

Measured on the CPU (tests/test_preflight.py runs two of these; a 28 M-parameter Llama, vocab 16000,
sftlib.training.trainer with TRL, peak resident memory growth): seven configurations (batch x seq 4x256, 8x256,
2x768, 2x1024; checkpointing on and off; packing on and off; embeddings trained) were within -12% to
+5%; with checkpointing the estimate is low by 7-12% (about 30 MiB more was always in use).
On a GPU (H200, Llama-3.1-8B shape in 4-bit, Unsloth, article hyperparameters, packed 2048-token rows,
no tokens added; peaks from benchmarks/results/gpu_bench.md) the estimate is 10-14% high: Unsloth's
checkpointing 8 x 2048: 10.1 estimated / 9.0 measured GiB; no checkpointing 8 x 2048: 75.9 / 66.4;
no checkpointing 2 x 2048: 23.6 / 21.5. (sftlib.training.autotune keeps coefficients fitted to those runs for
its choices.) The transformers (hf backend) figures on a GPU are not measured yet. The time is rough: 4 x params FLOPs per token for LoRA (6 x with checkpointing) at 35% of the GPU's dense
16-bit peak.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from sftlib.config import PRESETS
from sftlib.errors import SftlibError

GiB = 1024 ** 3
# Usable memory of the GPUs the presets are sized for, in GiB, and dense 16-bit tensor TFLOPS.
GPUS = {"T4": (15.0, 65.0), "A100": (40.0, 312.0), "H100": (80.0, 989.0)}
CUDA_RESERVE_GIB = 1.0  # CUDA context and allocator cache: taken from the GPU, not in max_memory_allocated
UTILISATION = 0.35      # share of the peak FLOPS a QLoRA step reaches; rough until benchmarked
NF4_BITS = 4.127
TRL_CHUNK = 256  # tokens per chunk of TRL's default `chunked_nll` loss (trl.trainer.sft_trainer)


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only model that memory depends on; `linears` maps a layer name
    (q_proj, ...) to (sum of in_features, sum of out_features, parameters) over all layers."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tie_embeddings: bool
    linears: dict = field(default_factory=dict, compare=False)
    other_params: int = 0  # embeddings, LM head, norms: never quantized

    @property
    def linear_params(self) -> int:
        return sum(p for _, _, p in self.linears.values())

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    @classmethod
    def llama(cls, *, hidden, layers, heads, kv_heads, intermediate, vocab, tie_embeddings=False, head_dim=None):
        """The Llama layout (also Mistral, Qwen 2.5 up to biases, Gemma up to its extra norms)."""
        hd = head_dim or hidden // heads
        q, kv = heads * hd, kv_heads * hd
        per_layer = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
                     "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
                     "down_proj": (intermediate, hidden)}
        linears = {n: (i * layers, o * layers, i * o * layers) for n, (i, o) in per_layer.items()}
        other = vocab * hidden * (1 if tie_embeddings else 2) + (2 * layers + 1) * hidden
        return cls(hidden, layers, heads, kv_heads, hd, intermediate, vocab, tie_embeddings, linears, other)

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """From a transformers config object (or a dict of config.json)."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        if get("text_config"):  # multimodal wrappers keep the language model's numbers apart
            return cls.from_config(get("text_config"))
        heads = get("num_attention_heads")
        return cls.llama(hidden=get("hidden_size"), layers=get("num_hidden_layers"), heads=heads,
                         kv_heads=get("num_key_value_heads") or heads, intermediate=get("intermediate_size"),
                         vocab=get("vocab_size"), tie_embeddings=bool(get("tie_word_embeddings", False)),
                         head_dim=get("head_dim"))

    @classmethod
    def from_pretrained(cls, name: str, *, trust_remote_code: bool = False) -> "ModelShape":
        """From a local folder's config.json, else transformers' AutoConfig (Hub); raises OSError when neither."""
        local = Path(name) / "config.json"
        if local.is_file():
            return cls.from_config(json.loads(local.read_text(encoding="utf-8")))
        from transformers import AutoConfig

        return cls.from_config(AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code))

    @classmethod
    def from_model(cls, model) -> "ModelShape":
        """Exact counts from a loaded model (4-bit layers counted by their shape, not their packed storage)."""
        import torch

        base = cls.from_config(model.config)
        out_emb = model.get_output_embeddings()
        linears: dict[str, list[int]] = {}
        other = 0
        for name, module in model.named_modules():
            direct = sum(p.numel() for p in module.parameters(recurse=False))
            if "lora_" in name or "modules_to_save" in name:
                continue
            if isinstance(module, torch.nn.Linear) and module is not out_emb:
                acc = linears.setdefault(name.rsplit(".", 1)[-1], [0, 0, 0])
                acc[0] += module.in_features
                acc[1] += module.out_features
                acc[2] += module.in_features * module.out_features
                other += module.out_features if module.bias is not None else 0
            else:
                other += direct
        return replace(base, linears={k: tuple(v) for k, v in linears.items()}, other_params=other)


# Meta's published Llama 3.1 8B config, for when the model's own config.json cannot be read (offline).
LLAMA_3_1_8B = ModelShape.llama(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256)


def fallback_shape(name: str) -> ModelShape | None:
    """The bundled shape for a model name that is recognisably Llama 3 / 3.1 8B, else None."""
    low = name.lower().replace("_", "-")
    return LLAMA_3_1_8B if ("llama-3" in low and "8b" in low) else None


def _optimizer_bytes(optim: str, param_bytes: int) -> float:
    if optim.startswith("sgd") or "lomo" in optim:
        return 0
    if "adafactor" in optim:
        return 0.1 * param_bytes  # factored second moments: rows + columns, no first moment
    if "8bit" in optim or "4bit" in optim:
        return 2 if "lion" not in optim else 1
    if "lion" in optim:
        return param_bytes
    return 2 * param_bytes  # Adam-like: first and second moment


@dataclass
class Estimate:
    parts: dict[str, float]             # GiB: what the peak is made of
    weights: dict[str, float]           # GiB of the base weights at 4, 16 and 32 bits
    activations: dict[str, float]       # GiB with and without gradient checkpointing
    peak_gib: float
    device: str
    gpu: str | None = None
    gpu_gib: float | None = None
    verdict: str = "unknown"            # fits | tight | too big | unknown
    suggestion: str = ""
    tokens_per_step: int = 0
    step_seconds: float | None = None
    assumptions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        return None if self.verdict == "unknown" else self.verdict != "too big"

    def to_text(self) -> str:
        unit, scale = ("GiB", 1) if self.peak_gib >= 1 else ("MiB", 1024)
        width = max(len(k) for k in self.parts)
        lines = [f"  {k:<{width}}  {v * scale:7.2f} {unit}" for k, v in self.parts.items()]
        lines.append(f"  {'peak (allocated)':<{width}}  {self.peak_gib * scale:7.2f} {unit}")
        if any(k.endswith("(*)") for k in self.parts):
            lines.append("  (*) never alive at the same time: the larger one counts")
        w = ", ".join(f"{k} {v * scale:.2f}" for k, v in self.weights.items())
        a = ", ".join(f"{k} {v * scale:.2f}" for k, v in self.activations.items())
        lines += [f"  base weights at: {w} {unit}", f"  activations: {a} {unit}"]
        if self.gpu_gib:
            lines.append(f"  {self.gpu} ({self.gpu_gib:.0f} GiB, {CUDA_RESERVE_GIB:.0f} GiB kept for CUDA): {self.verdict}")
        if self.step_seconds:
            lines.append(f"  about {self.step_seconds:.3g} s per optimizer step of {self.tokens_per_step:,} tokens "
                         f"(rough: {UTILISATION:.0%} of peak FLOPS)")
        if self.suggestion:
            lines.append(f"  to fit: {self.suggestion}")
        return "\n".join(lines)


def _compute_bytes(cfg, device: str) -> int:
    if cfg.model.dtype == "float32" or (cfg.model.dtype == "auto" and device != "cuda"):
        return 4
    return 2


def _peak_parts(cfg, shape: ModelShape, device: str, backend: str, embeddings_trained: bool, gpu: str | None):
    b = _compute_bytes(cfg, device)
    m, lo, t = cfg.model, cfg.lora, cfg.train
    h, L, q_dim, kv_dim, i = shape.hidden, shape.layers, shape.heads * shape.head_dim, \
        shape.kv_heads * shape.head_dim, shape.intermediate
    weights = {"4-bit": (shape.linear_params * NF4_BITS / 8 + shape.other_params * 2) / GiB,
               "16-bit": shape.params * 2 / GiB, "32-bit": shape.params * 4 / GiB}
    four_bit = m.load_in_4bit and device == "cuda"
    parts = {"base weights": weights["4-bit"] if four_bit else shape.params * b / GiB}

    targets = [shape.linears[n] for n in lo.target_modules if n in shape.linears]
    lora_params = sum(lo.r * (i_ + o_) for i_, o_, _ in targets)
    parts["LoRA weights, gradients, optimizer"] = lora_params * (8 + _optimizer_bytes(t.optim, 4)) / GiB
    rows_only = embeddings_trained == "rows"  # a few rows as PEFT trainable tokens: negligible weights
    if embeddings_trained and not rows_only:
        n = shape.vocab * h * (1 if shape.tie_embeddings else 2)
        fp16 = m.dtype == "float16" or (m.dtype == "auto" and gpu == "T4")  # a T4 has no bfloat16
        pb = 4 if (b == 4 or fp16) else 2
        parts["trained embeddings and LM head"] = n * (2 * pb + _optimizer_bytes(t.optim, pb)) / GiB

    static = sum(parts.values()) * GiB
    tokens = t.batch_size * m.max_seq_length
    masked = backend != "unsloth"  # packing (and padding) hands SDPA a mask; Unsloth's kernels take none
    kv_saved = q_dim if masked and shape.kv_heads < shape.heads else kv_dim
    if backend == "unsloth":  # fused RMSNorm and SwiGLU kernels keep only their inputs; flash attention
        per_layer = 4 * b * h + 2 * b * q_dim + 2 * b * kv_dim + 3 * b * i + b * lo.r * len(targets)
    else:
        per_layer = 8 * h + 4 * b * h + 3 * b * q_dim + 2 * b * kv_saved + 4 * b * i + b * lo.r * len(targets)
    if lo.dropout > 0:  # each adapter gets its own dropped-out copy of its input, and the mask
        per_layer += sum((b + 1) * i_ // L for i_, _, _ in targets)
    final_norm = tokens * (4 * h + 2 * b * h)
    # Packed rows are one sequence of batch x seq tokens; padded rows get a mask per row.
    square = tokens ** 2 if t.packing else t.batch_size * m.max_seq_length ** 2
    mask_bool, mask_layer = (square, square * b) if masked else (0, 0)
    # TRL's default loss (`chunked_nll`, TRL >= 1.14) computes the logits TRL_CHUNK tokens at a time, on every backend.
    logits = TRL_CHUNK * shape.vocab * (b + 20) + 2 * tokens * h * b
    if rows_only and backend != "unsloth":  # the head's own forward (`nll`): every token's logits
        logits = tokens * shape.vocab * (b + 8) + 2 * shape.vocab * h * b
    elif rows_only:  # Unsloth's chunked loss on the head with its rows written in, and that head's gradient
        logits += 2 * shape.vocab * h * b
    gc = t.gradient_checkpointing
    offload = gc == "unsloth" and backend == "unsloth"
    kept = min(t.checkpoint_keep_layers, L) if gc != "false" else 0  # layers that keep their activations
    inputs = 2 * tokens * b * h if offload else tokens * (L - kept) * b * h  # what checkpointing keeps on the device
    kept_bytes = kept * (tokens * per_layer + mask_layer)  # each kept layer: its activations and mask copy
    activations = {"without checkpointing": (tokens * L * per_layer + final_norm) / GiB,
                   "with checkpointing": (tokens * L * b * h + tokens * per_layer + final_norm) / GiB}
    if backend == "unsloth":
        activations["Unsloth offloaded"] = (inputs + tokens * per_layer + final_norm) / GiB
    grads = tokens * b * (3 * i + 2 * h)  # gradients alive while one layer is back-propagated
    # Starred parts are never alive together: the loss is done before the first layer's backward starts.
    if gc == "false":
        parts["activations"] = (tokens * L * per_layer + final_norm) / GiB
        if mask_bool:
            parts["attention masks"] = (mask_bool + L * mask_layer) / GiB
        parts["gradients of one layer (*)"] = grads / GiB
        dynamic = tokens * L * per_layer + final_norm + mask_bool + L * mask_layer + max(grads, logits)
    else:
        parts["checkpointed layer inputs"] = (inputs + final_norm) / GiB
        if kept:
            parts[f"activations of the {kept} layers not recomputed"] = kept_bytes / GiB
        if mask_bool:
            parts["attention mask"] = mask_bool / GiB
        parts["one layer recomputed, with gradients (*)"] = (tokens * per_layer + mask_layer + grads) / GiB
        dynamic = inputs + kept_bytes + final_norm + mask_bool + max(tokens * per_layer + mask_layer + grads, logits)
    parts["logits and their gradient (*)"] = logits / GiB
    return parts, weights, activations, tokens, (static + dynamic) / GiB


def _gpu(cfg, gpu) -> tuple[str | None, float | None]:
    if gpu is None:  # the GPU the config's preset was sized for
        presets = [v.split(":", 1)[1] for v in getattr(cfg, "sources", {}).values() if v.startswith("preset:")]
        gpu = next((PRESETS[p].gpu for p in presets if p in PRESETS and PRESETS[p].gpu), None)
    if gpu is None:
        return None, None
    if isinstance(gpu, tuple):  # (name, GiB) of the GPU in this machine
        return gpu[0], float(gpu[1])
    if isinstance(gpu, (int, float)):
        return f"{gpu:g} GiB GPU", float(gpu)
    key = next((k for k in GPUS if k.lower() == str(gpu).strip().lower()), None)
    if key is None:
        raise SftlibError(f"unknown GPU {gpu!r}; use one of {', '.join(GPUS)} or a size in GiB")
    return key, GPUS[key][0]


def _verdict(peak: float, gpu_gib: float | None) -> str:
    if not gpu_gib:
        return "unknown"
    need = peak + CUDA_RESERVE_GIB
    # The estimate's own error is about 10% (see the module docstring), hence the band around the limit.
    return "fits" if need <= 0.9 * gpu_gib else "tight" if need <= 1.1 * gpu_gib else "too big"


def embeddings_trained_by(cfg, vocabulary_grew: bool, backend: str | None) -> bool | str:
    """What sftlib.training.lora.add_lora trains besides LoRA, for the estimate: True (embeddings and LM head
    whole), "rows" (rows of both as PEFT trainable tokens) or False. `lora.train_embeddings: auto` trains
    the rows of the new tokens, on every backend."""
    mode = cfg.lora.train_embeddings
    if mode == "always":
        return True
    if mode != "auto" or not vocabulary_grew:
        return False
    return "rows"


def estimate_memory(cfg, shape: ModelShape | None = None, *, device: str = "cuda", gpu=None, backend: str | None = None,
                    embeddings_trained: bool | str = False, suggest: bool = True) -> Estimate:
    """Peak training memory (and step time on a known GPU) for `cfg` on a model of `shape`.

    `gpu`: T4, A100, H100, a size in GiB or (name, GiB); None = the GPU of the config's preset, if any.
    `backend`: unsloth | hf | cpu; None = unsloth on `cuda` unless `cfg.backend` is `hf`, else cpu.
    `embeddings_trained`: tokens were added, so embed_tokens and lm_head are trained as well (True), or
    only rows of both ("rows"); see `embeddings_trained_by`.
    """
    if shape is None:
        shape = fallback_shape(cfg.model.name)
        if shape is None:
            raise SftlibError(f"no shape known for `model.name` {cfg.model.name!r}; pass ModelShape.from_pretrained(...)")
    if backend is None:
        backend = "cpu" if device != "cuda" else "hf" if cfg.backend == "hf" else "unsloth"
    gpu_name, gpu_gib = _gpu(cfg, gpu) if device == "cuda" else (None, None)
    parts, weights, activations, tokens, peak = _peak_parts(cfg, shape, device, backend, embeddings_trained, gpu_name)
    est = Estimate(parts=parts, weights=weights, activations=activations,
                   peak_gib=peak, device=device, gpu=gpu_name, gpu_gib=gpu_gib, verdict=_verdict(peak, gpu_gib),
                   tokens_per_step=tokens * cfg.train.grad_accum)
    tflops = next((GPUS[k][1] for k in GPUS if gpu_name and k in gpu_name.upper()), None)
    if tflops:
        t = cfg.train
        # recomputation is one more forward pass through the layers that do not keep their activations
        again = 0.0 if t.gradient_checkpointing == "false" else \
            1 - min(t.checkpoint_keep_layers, shape.layers) / shape.layers
        per_token = (4 + 2 * again) * shape.params
        attention = 2 * shape.layers * cfg.model.max_seq_length * shape.heads * shape.head_dim
        per_token += attention * (3 + again)
        est.step_seconds = est.tokens_per_step * per_token / (tflops * 1e12 * UTILISATION)
    est.assumptions = [
        f"backend {backend}, compute in {8 * _compute_bytes(cfg, device)}-bit, "
        f"{'4-bit' if cfg.model.load_in_4bit and device == 'cuda' else 'unquantized'} base weights",
        f"{cfg.train.batch_size} x {cfg.model.max_seq_length} tokens per forward pass (packed rows are full)",
    ]
    if suggest and est.verdict in ("tight", "too big"):
        est.suggestion = _suggest(cfg, shape, device, backend, embeddings_trained, gpu_name, gpu_gib)
    return est


def _suggest(cfg, shape, device, backend, embeddings_trained, gpu_name, gpu_gib) -> str:
    """The least harmful single change that makes the estimate fit; else several, applied in that order."""
    import copy

    def peak(c, emb) -> float:
        return _peak_parts(c, shape, device, backend, emb, gpu_name)[4]

    def fits(c, emb) -> bool:
        return _verdict(peak(c, emb), gpu_gib) == "fits"

    # Each move changes a config copy (and whether embeddings are trained) and says what it changed.
    def optim(c, emb):
        if "8bit" not in c.train.optim:
            c.train.optim = "adamw_8bit"
            return "`train.optim: adamw_8bit`", emb
        return None, emb

    def checkpointing(c, emb):
        if c.train.gradient_checkpointing == "false":
            c.train.gradient_checkpointing = "unsloth" if backend == "unsloth" else "true"
            return f"`train.gradient_checkpointing: {c.train.gradient_checkpointing}`", emb
        return None, emb

    def four_bit(c, emb):
        if not c.model.load_in_4bit:
            c.model.load_in_4bit = True
            return "`model.load_in_4bit: true`", emb
        return None, emb

    def batch(c, emb):
        t = c.train
        if t.batch_size == 1:
            return None, emb
        while t.batch_size > 1:
            t.batch_size, t.grad_accum = max(1, t.batch_size // 2), t.grad_accum * 2
            if fits(c, emb):
                break
        return (f"`train.batch_size: {t.batch_size}`, `train.grad_accum: {t.grad_accum}` "
                f"(same effective batch of {t.batch_size * t.grad_accum})"), emb

    def embeddings(c, emb):
        if emb is True:  # whole matrices (`always`): the new rows alone take almost nothing
            c.lora.train_embeddings = "auto"
            return "`lora.train_embeddings: auto` (only the added tokens' rows are trained)", "rows"
        if emb:
            return ("a chat template whose tokens the tokenizer already has, so no embeddings are trained "
                    "(for Llama 3.x: `model.chat_template: llama-3.1`)"), False
        return None, emb

    def length(c, emb):
        m = c.model
        if m.max_seq_length <= 256:
            return None, emb
        while m.max_seq_length > 256:
            m.max_seq_length //= 2
            if fits(c, emb):
                break
        return f"`model.max_seq_length: {m.max_seq_length}` (longer rows are cut)", emb

    moves = (optim, checkpointing, four_bit, batch, embeddings, length)
    for move in moves:
        c = copy.deepcopy(cfg)
        text, emb = move(c, embeddings_trained)
        if text and fits(c, emb):
            return f"{text} -> about {peak(c, emb):.1f} GiB"
    c, emb, changes = copy.deepcopy(cfg), embeddings_trained, []
    for move in moves:
        text, emb = move(c, emb)
        if text:
            changes.append(text)
            if fits(c, emb):
                return f"{'; '.join(changes)} -> about {peak(c, emb):.1f} GiB"
    return f"even with {'; '.join(changes) or 'no change'} the peak is {peak(c, emb):.1f} GiB: use a bigger GPU or a smaller model"
