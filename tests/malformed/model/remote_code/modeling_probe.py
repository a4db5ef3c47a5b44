"""A Llama under another name, loaded through `auto_map` (remote code)."""
from transformers import LlamaForCausalLM

from .configuration_probe import ProbeConfig


class ProbeForCausalLM(LlamaForCausalLM):
    config_class = ProbeConfig
