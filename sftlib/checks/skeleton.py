"""The model's settings checked against its architecture, without its weights: what pre-flight runs so that
it refuses what training would refuse once the model is loaded.

    from sftlib.checks.skeleton import check_model_settings
    check_model_settings(cfg)   # ConfigError for `lora.target_modules` the model lacks, `lora.r` above a layer's width

The model is built from its config.json under accelerate's `init_empty_weights`: its modules exist, with their
shapes, but every parameter is on the meta device, so even an 8B model is built in about a second and takes no
memory. The check itself is sftlib.training.lora.check_targets, the one `add_lora` runs on the loaded model.
"""

from __future__ import annotations


def skeleton(cfg):
    """`cfg.model.name` as modules without weights, or None when its config.json cannot be read (no copy here and
    no network, or an architecture transformers does not know): training then says why when it loads the model."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftlib.training.model import ModelLoadError, model_folder_problem, remote_code_error, resolve_model_name

    remote, name = cfg.model.trust_remote_code, resolve_model_name(cfg.model.name)
    problem = model_folder_problem(name, weights=False)  # training's own check of a local folder
    if problem:
        raise ModelLoadError(f"`model.name`: {problem}")
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=remote)
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=remote)
    except ValueError as exc:
        error = remote_code_error(name, exc)
        if error is not None:
            raise error from exc
        return None
    except (OSError, KeyError, ImportError):
        return None


SANE_MAX_SEQ_LENGTH = 131_072  # when the model's own limit is unknown: no suggestion goes above it


def max_positions(cfg, model=None) -> int:
    """The longest sequence the model reads (`max_position_embeddings` of its config), else SANE_MAX_SEQ_LENGTH:
    pre-flight never suggests a `model.max_seq_length` above it."""
    config = getattr(model, "config", None)
    if config is None:
        from transformers import AutoConfig

        from sftlib.training.model import resolve_model_name

        try:
            config = AutoConfig.from_pretrained(resolve_model_name(cfg.model.name),
                                                trust_remote_code=cfg.model.trust_remote_code)
        except (OSError, ValueError, KeyError, ImportError):
            return SANE_MAX_SEQ_LENGTH
    config = getattr(config, "get_text_config", lambda: config)()
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else SANE_MAX_SEQ_LENGTH


def check_model_settings(cfg) -> bool:
    """Raise ConfigError as `add_lora` would for this model; False when the model's architecture is unknown here
    (nothing could be checked), True when it passed."""
    from sftlib.training.lora import check_targets

    model = skeleton(cfg)
    if model is None:
        return False
    check_targets(model, cfg.lora)
    return True
