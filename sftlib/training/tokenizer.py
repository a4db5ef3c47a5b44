"""Fit a tokenizer (and the model's embeddings) to a chat template: its tokens, a real pad token, its stops.

    from sftlib.training.tokenizer import prepare_tokenizer
    info = prepare_tokenizer(model, tokenizer, template)   # adds missing special tokens, a pad that is not EOS
    info.added_tokens, info.added_token_ids, info.stop_token_ids

`model` may be None: then only the tokenizer is fitted (to look at data before loading any weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sftlib.training.model import ModelLoadError

PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]")
NEW_PAD = "<|pad|>"


@dataclass
class TokenizerInfo:
    added_tokens: list[str] = field(default_factory=list)
    pad_token: str = ""
    pad_added: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    added_token_ids: list[int] = field(default_factory=list)  # rows that start untrained: train them
    new_row_ids: list[int] = field(default_factory=list)  # every row beyond the base's matrix (added tokens, pad,
    # an eos_token the vocabulary lacked, which transformers adds silently): saved with the adapters
    eos_added: bool = False  # the tokenizer's eos_token was not in the base's vocabulary
    weak_stop_ids: list[int] = field(default_factory=list)  # stop rows the base almost never predicts: trained
    stop_probability: float | None = None  # the base's mean probability of ending assistant turns (None: not probed)

    @property
    def resized(self) -> bool:
        return bool(self.added_tokens) or self.pad_added or bool(self.new_row_ids)

    @property
    def rows_to_train(self) -> list[int]:
        """Rows of the embeddings (and LM head) that must learn: new rows, and stop rows the base never predicts."""
        return sorted({*self.added_token_ids, *self.new_row_ids, *self.weak_stop_ids})


def _is_single_token(tokenizer, text: str) -> bool:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1


def stop_token_ids(tokenizer, template) -> list[int]:
    ids = []
    for text in template.stop_strings(tokenizer.eos_token or ""):
        if text and _is_single_token(tokenizer, text):
            ids.append(tokenizer.convert_tokens_to_ids(text))
    return list(dict.fromkeys(ids))


def prepare_tokenizer(model, tokenizer, template) -> TokenizerInfo:
    """Make `tokenizer` (and `model`'s embeddings) able to express `template`, with a pad token that is not EOS.

    Missing special tokens are added as single special tokens, the embeddings are resized (new rows
    start at the mean of the old ones), the template becomes `tokenizer.chat_template`, and generation
    stops at the template's end-of-turn tokens.
    """
    info = TokenizerInfo()
    missing = [t for t in template.special_tokens if not _is_single_token(tokenizer, t)]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
        info.added_tokens = missing
        info.added_token_ids = tokenizer.convert_tokens_to_ids(missing)
    eot = template.end_of_turn_text(tokenizer.eos_token)
    pad = tokenizer.pad_token
    if pad is None or pad in (tokenizer.eos_token, eot):
        # pad = EOS is the classic bug: the collator masks padding, and with it every EOS the model should learn.
        pad = next((c for c in PAD_CANDIDATES if c != eot and c in tokenizer.get_vocab()), None)
        if pad is None:
            tokenizer.add_tokens([NEW_PAD], special_tokens=True)
            pad, info.pad_added = NEW_PAD, True
        tokenizer.pad_token = pad
    info.pad_token = pad
    if model is not None:  # None: only the tokenizer is wanted, e.g. to look at data before loading weights
        old = model.get_input_embeddings().weight.shape[0]
        info.new_row_ids = list(range(old, len(tokenizer)))
        info.eos_added = tokenizer.eos_token_id is not None and tokenizer.eos_token_id >= old
        if len(tokenizer) > old:
            import torch

            # mean_resizing draws the new rows from torch's global generator, whose start differs per process:
            # a fixed private seed makes the same run give the same weights (and a resumed run match)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    tokenizer.chat_template = template.jinja
    info.stop_token_ids = stop_token_ids(tokenizer, template)
    if not info.stop_token_ids:
        where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise ModelLoadError(
            f"`model.chat_template` = `{template.name}` stops generation at {', '.join(template.stop_tokens)} "
            f"({'{eos}'} = the tokenizer's eos_token, here {tokenizer.eos_token!r}), and none of them is one token of "
            f"the tokenizer of `model.name` ({where}); set `eos_token` in its tokenizer_config.json, or pick a "
            "template with its own end-of-turn token, e.g. chatml"
        )
    if model is None:
        return info
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = info.stop_token_ids
    return info


