"""Tiny Llama-architecture models and tokenizers built offline, for the demo and the tests.

    from sftlib.demo.tiny import build_tiny_model
    folder = build_tiny_model("outputs/tiny", texts=["some text", ...], hidden_size=128)
    # `folder` now loads with AutoModelForCausalLM.from_pretrained / AutoTokenizer.from_pretrained,
    # the same path a Hub model takes.

The tokenizer is a byte-level BPE trained on `texts` with the `tokenizers` library and set up like
Llama 3's: `<|begin_of_text|>` is added in front of every encoded text, `<|end_of_text|>` is EOS, and
`<|finetune_right_pad_id|>` exists for padding. It has no chat tokens: applying a chat template adds
them, as it would to a real base model. The model is randomly initialised (seeded) and saved in
float32 safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|finetune_right_pad_id|>"


def build_tokenizer(texts: list[str], vocab_size: int = 1024, extra_special: tuple[str, ...] = ()):
    """Train a byte-level BPE tokenizer on `texts`; returns a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, PAD, *extra_special]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, model_max_length=4096, clean_up_tokenization_spaces=False
    )


def build_tiny_model(
    folder: str | Path,
    texts: list[str],
    *,
    vocab_size: int = 1024,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_positions: int = 1024,
    tie_embeddings: bool = False,
    seed: int = 0,
    extra_special: tuple[str, ...] = (),
) -> Path:
    """Write a random-init Llama and its tokenizer to `folder` (skipped when already complete)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    marker = folder / "sftlib_tiny.json"
    spec = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, max_positions=max_positions,
                tie_embeddings=tie_embeddings, seed=seed, extra_special=list(extra_special), n_texts=len(texts))
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(texts, vocab_size, extra_special)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    marker.write_text(json.dumps(spec))  # written last: a half-built folder is rebuilt next time
    return folder
