"""Everything that leaves the machine after training: each format written, loaded back and checked.

    from sftlib.exports import export, load_for_export
    report = export(model, tokenizer, cfg, ["lora", "merged_16bit", "merged_4bit", "gguf:q4_k_m"])
    model, tokenizer, cfg = load_for_export("outputs/model/lora")      # from a folder instead

api.py writes the formats; merged.py saves adapters and merged models; reference.py and verify.py
hold each output to the model in memory; gguf/ converts, quantizes and checks in llama.cpp;
modelfile.py writes Ollama's Modelfile; card.py the model card; hub.py plans and makes uploads;
report.py is the one result type they all return.
"""

from sftlib.exports.api import REPORT_NAME, export, parse_formats
from sftlib.exports.load import load_for_export, template_of
from sftlib.exports.report import ExportError, ExportReport, ExportVerifyError, Output

__all__ = ["REPORT_NAME", "ExportError", "ExportReport", "ExportVerifyError", "Output", "export",
           "load_for_export", "parse_formats", "template_of"]
