"""The run configuration: one dataclass per concern, named presets, YAML/JSON files, validation.

    from sftlib.config import RunConfig
    cfg = RunConfig.preset("colab-t4", {"lora.r": 32})
    cfg.validate()                    # ConfigError listing every Problem(key, message) at once

fields.py holds the sections and their help, coerce.py the types, problems.py the checks,
presets.py and presets/*.yaml the named presets, run_config.py the RunConfig that ties them.
"""

from sftlib.config.fields import (BACKENDS, EXPORT_FORMATS, FIELDS, GGUF_QUANTIZATIONS, SECTIONS, DataConfig,
                                  ExportConfig, LoraConfig, ModelConfig, TrainConfig, get_value)
from sftlib.config.presets import PRESET_NAMES, PRESETS, Preset
from sftlib.config.problems import (ConfigError, Problem, export_format_problem, repo_problems, revision_problems,
                                    template_names)
from sftlib.config.run_config import RunConfig

__all__ = ["BACKENDS", "EXPORT_FORMATS", "FIELDS", "GGUF_QUANTIZATIONS", "PRESETS", "PRESET_NAMES", "SECTIONS",
           "ConfigError", "DataConfig", "ExportConfig", "LoraConfig", "ModelConfig", "Preset", "Problem",
           "RunConfig", "TrainConfig", "export_format_problem", "get_value", "repo_problems", "revision_problems",
           "template_names"]
