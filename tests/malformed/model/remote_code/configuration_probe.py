"""Code shipped inside a model folder: it runs only when `trust_remote_code` is on.

Importing it leaves a mark (the file named by SFTLIB_REMOTE_CODE_MARK), so a test can tell whether it ran.
"""
import os
from pathlib import Path

from transformers import LlamaConfig

if os.environ.get("SFTLIB_REMOTE_CODE_MARK"):
    Path(os.environ["SFTLIB_REMOTE_CODE_MARK"]).write_text("remote code ran")


class ProbeConfig(LlamaConfig):
    model_type = "sftlib_probe"
