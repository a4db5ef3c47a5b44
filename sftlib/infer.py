"""Chat with a model through its chat template, streaming, stopping at the template's end of turn.

    from sftlib.infer import chat
    reply = chat(model, tokenizer, template, [{"role": "user", "content": "Is 9.11 larger than 9.9?"}])
    reply.text, reply.stopped          # stopped: ended on an end-of-turn token, not at max_new_tokens

The prompt is built by the same code that built the training rows (`encode.prompt_ids`), so what the
model sees at inference is byte for byte what it was trained on, BOS included exactly once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass
class Reply:
    text: str
    stopped: bool      # True when generation ended on a stop token
    new_tokens: int


class _Printer:
    """A minimal streamer: prints decoded text as tokens arrive (works in terminals and notebooks)."""

    def __init__(self, tokenizer, stop_ids, out=None):
        self.tokenizer, self.stop_ids, self.out = tokenizer, set(stop_ids), out or sys.stdout
        self.ids: list[int] = []
        self.printed = 0
        self.first = True

    def put(self, value):
        if self.first:  # the first call carries the prompt
            self.first = False
            return
        for tok in value.reshape(-1).tolist():
            if tok in self.stop_ids:
                continue
            self.ids.append(tok)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def end(self):
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()


def autocast_for(model):
    """Mixed precision for inference on a GPU, as in training: a 4-bit model keeps its norms in float32
    (PEFT upcasts them) while trained embedding copies stay 16-bit, and plain matmuls would refuse to mix
    them. On the CPU nothing changes."""
    import contextlib

    import torch

    if model.device.type != "cuda":
        return contextlib.nullcontext()
    dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype not in (torch.bfloat16, torch.float16) or not torch.cuda.is_bf16_supported():
        # a GPU without bfloat16 (a T4) computes in float16, whatever dtype the weights were saved in
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def chat(model, tokenizer, template, messages: list[dict], *, max_new_tokens: int = 256, stream: bool = False,
         temperature: float = 0.0, stop_ids: list[int] | None = None, out=None) -> Reply:
    """Generate the assistant's reply to `messages` (greedy unless `temperature` > 0)."""
    import torch

    from sftlib.data.encode import prompt_ids
    from sftlib.training.tokenizer import stop_token_ids

    stop_ids = stop_ids or stop_token_ids(tokenizer, template)
    ids = torch.tensor([prompt_ids(tokenizer, template, messages)], device=model.device)
    streamer = _Printer(tokenizer, stop_ids, out) if stream else None
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast_for(model):
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=None,
            top_k=None,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            use_cache=True,
        )
    if was_training:
        model.train()
    new = output[0, ids.shape[1]:].tolist()
    stopped = bool(new) and new[-1] in stop_ids
    if stopped:
        new = new[:-1]
    return Reply(text=tokenizer.decode(new, skip_special_tokens=True), stopped=stopped, new_tokens=len(new))
