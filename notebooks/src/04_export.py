# %% [markdown]
# # 04 · Export: adapters, merged model, GGUF, Ollama Modelfile, Hub
#
# Turn trained adapters into files others can run. The adapters, a merged 16-bit model that plain
# transformers loads (checked by loading it back and asking it something), GGUF files for llama.cpp,
# Ollama and LM Studio with a Modelfile, and an upload to the Hugging Face Hub when you name a
# repository. Uses the adapters 02_train saved.
#
# Run it in Colab on a GPU runtime, in Jupyter, or headless with papermill. `PRESET = "cpu-demo"`
# runs it offline on a CPU in minutes, with the tiny model and data bundled with sftlib:
#
#     papermill notebooks/04_export.ipynb out.ipynb -p PRESET cpu-demo

# %% include="install"

# %%
from pathlib import Path

import sftlib
from sftlib import notebook as nb
from sftlib.data import get_template
from sftlib.exports.gguf.setup import ensure_toolchain
from sftlib.exports.hub import push_plan, upload_plan
from sftlib.exports.merged import load_adapters
from sftlib.infer import chat
from sftlib.notebook import ConfigForm
from sftlib.training.backend import choose_backend

# %% [markdown] include="parameters_note"

# %% tags=["parameters"]
PRESET = "article"                   # article | colab-t4 | colab-a100 | gpu-auto | h100 | cpu-demo
MODEL_NAME = None                    # Hub id or local folder; None: the preset's (unsloth/Meta-Llama-3.1-8B-bnb-4bit)
EXPORT_DIR = None                    # folder for the adapters and exports; None: the preset's
ADAPTERS = ""                        # folder of the trained LoRA adapters; "" means <export.output_dir>/lora, where 02_train saves them
EXPORT_FORMATS = None                # comma-separated: lora, merged_16bit, merged_4bit, gguf; None: the preset's
GGUF_QUANTIZATIONS = None            # llama.cpp types, e.g. "q4_k_m,q8_0"; None: the preset's (q2_k to q8_0)
PROMPT = "Is 9.11 larger than 9.9?"  # asked of the merged model, to check that it loads and stops
MAX_NEW_TOKENS = 256                 # 16-2048
HUB_REPO = ""                        # "owner/name" to push to (token from HF_TOKEN or Colab secrets); "" for no push
RESULTS_PATH = ""                    # a .json file for the figures of this run; "" for none

# %% [markdown] include="form_note"

# %%
form = ConfigForm(PRESET, {
    "model.name": MODEL_NAME,
    "export.output_dir": EXPORT_DIR,
    "export.formats": EXPORT_FORMATS,
    "export.gguf_quantizations": GGUF_QUANTIZATIONS,
    "export.hub_repo": HUB_REPO,
    "export.push_to_hub": True if HUB_REPO else None,  # push only when a repository is named
}, sections=('model', 'export', 'backend'))
form

# %%
# NBVAL_CHECK_OUTPUT
cfg = form.config()  # stops here, listing every problem, when the form shows any
print(form.describe())

# %% [markdown]
# ## Get the GGUF toolchain first
#
# GGUF files are written with llama.cpp's own converter and library, built from the
# `llama-cpp-python` source on PyPI: a few minutes the first time, cached after that. Doing it
# before anything else means a missing compiler shows now, not after training.

# %%
if "gguf" in cfg.export.formats:
    ensure_toolchain()

# %% [markdown]
# ## Load the base model with the trained adapters
#
# The tokenizer comes from the adapter folder: it carries the template tokens and the pad token
# that training added. The base is loaded in 16-bit on a GPU and in float32 on a CPU.

# %%
backend = choose_backend(cfg.backend)
adapters = nb.adapters_folder(ADAPTERS, cfg)
dtype = "float32" if not backend.cuda else ("bfloat16" if cfg.model.dtype == "auto" else cfg.model.dtype)
model, tokenizer = load_adapters(cfg.model.name, adapters, dtype=dtype, device=backend.device)
template = get_template(cfg.model.chat_template)
print(f"{backend}\nadapters {adapters} on {cfg.model.name} ({dtype})")

# %% [markdown]
# ## Export: each format written, loaded back and checked
#
# One call writes what `export.formats` asks for, and the adapters always:
# - `lora`: the adapters, tens of megabytes for an 8B model, with the fitted tokenizer and the
#   template's stop tokens; share these when the other side has the base model;
# - `merged_16bit`: the base reloaded in bfloat16 (dequantized when it is stored in 4-bit) with
#   the adapters merged in: needs neither PEFT nor the 4-bit weights training used;
# - `merged_4bit`: that, quantized to NF4 by bitsandbytes;
# - `gguf`: one conversion with llama.cpp's converter, then one file per quantization, with the
#   chat template and stop tokens of training inside, and an Ollama Modelfile.
#
# Each output is then loaded back the way you would load it and held to the model in memory on
# prompts from your data: the same greedy answer and the same stop at the end of turn (quantized
# files report how close they come). Everything is written under a temporary name and renamed
# when complete; a file that fails its check is kept aside as `NAME.failed` and the cell stops
# with the reason.

# %%
out = Path(cfg.export.output_dir)
report = sftlib.export(model, tokenizer, cfg, ["lora", *cfg.export.formats], out=out, template=template, push=False)
written = report.outputs

# %%
# NBVAL_CHECK_OUTPUT
for kind, path in written.items():
    files = sorted(p.name for p in Path(path).iterdir())
    print(f"{kind:<14} {path}: {', '.join(files)}")

# %% [markdown]
# ## Check that the merged model loads and stops
#
# Loaded back with plain transformers, no PEFT, and asked the prompt: the answer must end at the
# template's end-of-turn token, which the merged folder's generation config carries.

# %%
from transformers import AutoModelForCausalLM  # here, after choose_backend: Unsloth must come first

merged_reply = None
if "merged_16bit" in written:
    merged = AutoModelForCausalLM.from_pretrained(written["merged_16bit"], device_map=backend.device)
    merged_reply = chat(merged, tokenizer, template, [{"role": "user", "content": PROMPT}],
                        max_new_tokens=MAX_NEW_TOKENS, stream=True)
    print(f"[stopped at the end of turn: {merged_reply.stopped}]")

# %% [markdown]
# ## Upload to the Hugging Face Hub
#
# Only when `HUB_REPO` names a repository (private unless `export.hub_private` is off), to the
# branch `export.hub_revision`. First a dry run shows the plan: every file that will be sent with
# its size, and what stays here (temporary files, GGUF files that failed their check). Then exactly
# those files go up in one commit. The token comes from the `HF_TOKEN` environment variable or the
# Colab secret of that name; it is never printed, and a plan with a file containing it is refused.

# %%
if cfg.export.push_to_hub:
    plan = upload_plan(out, cfg.export.hub_repo, revision=cfg.export.hub_revision,
                       private=cfg.export.hub_private)  # no token, no network yet
    print(plan.table())

# %%
if cfg.export.push_to_hub:
    written["hub"] = push_plan(plan)
    print(written["hub"])

# %% [markdown] include="results_note"

# %%
results = nb.save_results(RESULTS_PATH, {
    "backend": backend.name,
    "written": written,
    "merged_reply": merged_reply.text if merged_reply else None,
    "merged_stopped": merged_reply.stopped if merged_reply else None,
})
results
