"""Backend choice, CPU fallbacks, tokenizer fitting and LoRA set-up on a tiny model.

    pytest tests/test_backend_model.py -q
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from sftlib.training.backend import Backend, choose_backend, resolve
from sftlib.config import RunConfig
from sftlib.training.lora import add_lora
from sftlib.training.model import ModelLoadError, load_model
from sftlib.training.tokenizer import prepare_tokenizer
from sftlib.data.templates import get_template

CPU = Backend("cpu", "cpu", "test")


def test_auto_picks_cpu_without_cuda_and_says_why():
    backend = choose_backend("auto")
    assert backend.name == "cpu" and "no CUDA GPU" in str(backend)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        choose_backend("unsloth")
    with pytest.raises(ValueError, match="must be one of"):
        choose_backend("tpu")


def test_cpu_fallbacks_warn_once_each():
    cfg = RunConfig.preset("article")
    assert cfg.model.load_in_4bit and cfg.train.optim == "adamw_8bit"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        notes = resolve(cfg, CPU)
    assert not cfg.model.load_in_4bit and cfg.train.optim == "adamw_torch"
    assert cfg.train.gradient_checkpointing == "true"
    assert len(notes) == 3 and len(caught) == 3
    assert any("load_in_4bit" in n for n in notes) and any("adamw_8bit" in n for n in notes)


def test_prepare_tokenizer_adds_template_tokens_and_a_real_pad(tiny):
    model, tokenizer = tiny
    vocab = len(tokenizer)
    assert tokenizer.pad_token is None
    info = prepare_tokenizer(model, tokenizer, get_template("chatml"))
    assert info.added_tokens == ["<|im_start|>", "<|im_end|>"]
    assert len(tokenizer) == vocab + 2
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    for token in info.added_tokens:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    # pad is a dedicated token, never EOS or the end of turn
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>"
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in info.stop_token_ids
    assert tokenizer.chat_template == get_template("chatml").jinja


def test_pad_equal_to_eos_is_replaced(tiny):
    model, tokenizer = tiny
    tokenizer.pad_token = tokenizer.eos_token
    prepare_tokenizer(model, tokenizer, get_template("llama-3.1"))
    assert tokenizer.pad_token != tokenizer.eos_token


def test_only_the_added_token_rows_are_trained_by_default(tiny):
    model, tokenizer = tiny
    cfg = RunConfig.preset("cpu-demo", {"lora.train_embeddings": "auto"})  # the default; the demo trains all
    info = prepare_tokenizer(model, tokenizer, get_template("chatml"))
    peft_model = add_lora(model, cfg, CPU, info)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    rows = {n: p for n, p in trainable.items() if "trainable_tokens" in n}
    # the same rows of the input embeddings and of the untied head, not the vocab; no matrix trained whole
    assert {n.split(".token_adapter")[0].rsplit(".", 1)[-1] for n in rows} == {"embed_tokens", "lm_head"}
    assert set(info.added_token_ids) <= set(info.rows_to_train)
    assert all(p.shape[0] == len(info.rows_to_train) for p in rows.values())
    assert not any("modules_to_save" in n for n in trainable)
    # TRL's default loss reads lm_head.weight/.bias and skips the head's forward, which applies the rows
    from sftlib.training.trainer import sft_config

    assert sft_config(cfg, CPU, peft_model).loss_type == "nll"
    assert sft_config(cfg, CPU, add_lora(type(model)(model.config), cfg, CPU)).loss_type == "chunked_nll"
    targets = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in trainable if "lora_A" in n}
    assert targets == set(cfg.lora.target_modules)


def test_rows_train_through_a_loss_that_reads_the_head_weight_and_bias(tiny):
    """TRL 1.15's fused LM head (and Unsloth's fused loss) read `lm_head.weight` and `.bias` instead of calling
    the head: both must be there, and the rows' gradient must flow through the weight. Unsloth's LoRA setup
    freezes every parameter but LoRA's (seen on a GPU: the rows never moved); the rows are made trainable
    again after it."""
    import torch

    from sftlib.training.lora import _train_rows

    model, tokenizer = tiny
    cfg = RunConfig.preset("cpu-demo", {"lora.train_embeddings": "auto"})
    info = prepare_tokenizer(model, tokenizer, get_template("chatml"))
    peft_model = add_lora(model, cfg, CPU, info)
    for name, p in peft_model.named_parameters():  # what Unsloth's setup leaves
        p.requires_grad_("lora_" in name)
    _train_rows(peft_model)
    head = peft_model.get_output_embeddings()
    assert head.bias is None
    new = info.added_token_ids[0]
    ids = torch.tensor([[1, new, 5, new, 7]])
    hidden = peft_model.base_model.model.model(input_ids=ids).last_hidden_state
    logits = torch.nn.functional.linear(hidden, head.weight, head.bias)
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    deltas = {n.split(".token_adapter")[0].rsplit(".", 1)[-1]: p for n, p in peft_model.named_parameters()
              if "trainable_tokens_delta" in n}
    assert set(deltas) == {"embed_tokens", "lm_head"}
    assert all(p.requires_grad and p.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0
               for p in deltas.values()), {n: p.grad for n, p in deltas.items()}
    assert "bias" not in dict(head.named_parameters())  # no second parameter registered


def test_train_embeddings_always_trains_whole_matrices(tiny):
    model, tokenizer = tiny
    cfg = RunConfig.preset("cpu-demo", {"lora.train_embeddings": "always"})
    info = prepare_tokenizer(model, tokenizer, get_template("chatml"))
    peft_model = add_lora(model, cfg, CPU, info)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("embed_tokens" in n and "modules_to_save" in n for n in trainable)
    assert any("lm_head" in n and "modules_to_save" in n for n in trainable)


def test_lora_without_new_tokens_leaves_embeddings_frozen(tiny):
    model, tokenizer = tiny
    cfg = RunConfig.preset("cpu-demo", {"lora.train_embeddings": "auto"})
    peft_model = add_lora(model, cfg, CPU)  # no tokens were added
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_unknown_target_module_is_named(tiny):
    model, _ = tiny
    cfg = RunConfig.preset("cpu-demo", {"lora.target_modules": ["q_proj", "qkv_proj"]})
    with pytest.raises(ValueError, match=r"qkv_proj.*not found.*its linear layers are"):
        add_lora(model, cfg, CPU)


def test_rslora_and_dora_reach_peft(tiny):
    model, _ = tiny
    cfg = RunConfig.preset("cpu-demo", {"lora.use_dora": True, "lora.r": 8, "lora.alpha": 16})
    peft_model = add_lora(model, cfg, CPU)
    peft_cfg = peft_model.peft_config["default"]
    assert peft_cfg.use_rslora and peft_cfg.use_dora and peft_cfg.r == 8
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(16 / 8 ** 0.5)  # rsLoRA: alpha / sqrt(r)


def test_loading_a_folder_without_weights_says_so(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    cfg = RunConfig.preset("cpu-demo", {"model.name": str(tmp_path)})
    with pytest.raises(ModelLoadError, match="no weight files"):
        load_model(cfg, CPU)


def test_unreachable_hub_model_gives_an_offline_hint():
    cfg = RunConfig.preset("cpu-demo", {"model.name": "nobody-here/no-such-model-xyz"})
    with pytest.raises(ModelLoadError, match="local folder"):
        load_model(cfg, CPU)


def test_streaming_chat_prints_what_it_returns(tiny):
    from sftlib.infer import chat

    model, tokenizer = tiny
    template = get_template("chatml")
    prepare_tokenizer(model, tokenizer, template)
    out = io.StringIO()
    torch.manual_seed(0)
    reply = chat(model, tokenizer, template, [{"role": "user", "content": "Hello there!"}], max_new_tokens=12,
                 stream=True, out=out)
    assert reply.new_tokens == 12 and not reply.stopped  # an untrained model does not stop
    assert out.getvalue() == reply.text + "\n"
