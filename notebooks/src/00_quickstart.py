# %% [markdown]
# # 00 · Quickstart: fine-tune Llama 3.1 8B, chat with it, export it
#
# The whole recipe of the article *Fine-tune Llama 3.1 Ultra-Efficiently with Unsloth* in one
# notebook. Llama 3.1 8B loaded in 4-bit, rank-stabilised LoRA on every projection, FineTome-100k
# rendered with ChatML, packed training, a streamed answer to "Is 9.11 larger than 9.9?", a merged
# 16-bit model, GGUF files for llama.cpp, Ollama and LM Studio, and a push to the Hugging Face Hub
# when you name a repository. `PRESET = "article"` is the article's settings (an A100 40 GB; the whole
# dataset takes hours, so `MAX_STEPS = 60` gives a first look); `colab-t4` fits a free T4.
#
# Run it in Colab on a GPU runtime, in Jupyter, or headless with papermill. `PRESET = "cpu-demo"`
# runs it offline on a CPU in minutes, with the tiny model and data bundled with sftlib:
#
#     papermill notebooks/00_quickstart.ipynb out.ipynb -p PRESET cpu-demo -p MAX_STEPS 30

# %% include="install"

# %%
import sftlib
from sftlib import notebook as nb
from sftlib.exports.gguf.setup import ensure_toolchain
from sftlib.infer import chat
from sftlib.notebook import ConfigForm

# %% [markdown] include="parameters_note"

# %% tags=["parameters"]
PRESET = "article"                   # article | colab-t4 | colab-a100 | gpu-auto | h100 | cpu-demo
MODEL_NAME = None                    # Hub id or local folder; None: the preset's (unsloth/Meta-Llama-3.1-8B-bnb-4bit)
DATA_SOURCE = None                   # Hub dataset or local .jsonl/.json/.csv/.parquet; None: the preset's (mlabonne/FineTome-100k)
DATA_SPLIT = None                    # e.g. "train[:10000]"; None: the preset's (all of "train")
LORA_R = 16                          # 8-128
LORA_ALPHA = 16                      # 8-128; equal to LORA_R, as rsLoRA scales by alpha/sqrt(r)
LEARNING_RATE = None                 # 1e-5 to 5e-4; None: the preset's (3e-4)
MAX_STEPS = -1                       # -1 runs whole epochs; 60 for a first look
EXPORT_FORMATS = None                # comma-separated: lora, merged_16bit, merged_4bit, gguf; None: the preset's
GGUF_QUANTIZATIONS = None            # llama.cpp types, e.g. "q4_k_m,q8_0"; None: the preset's (q2_k to q8_0)
PROMPT = "Is 9.11 larger than 9.9?"  # any question
MAX_NEW_TOKENS = 256                 # 16-2048
DRIVE_FOLDER = ""                    # Colab only: a Google Drive folder for checkpoints, e.g. "sftlib/run1"; "" keeps them on the VM
HUB_REPO = ""                        # "owner/name" to push to (token from HF_TOKEN or Colab secrets); "" for no push
RESULTS_PATH = ""                    # a .json file for the figures of this run; "" for none

# %% [markdown] include="form_note"

# %%
form = ConfigForm(PRESET, {
    "model.name": MODEL_NAME,
    "data.source": DATA_SOURCE,
    "data.split": DATA_SPLIT,
    "lora.r": LORA_R,
    "lora.alpha": LORA_ALPHA,
    "train.learning_rate": LEARNING_RATE,
    "train.max_steps": MAX_STEPS,
    "train.output_dir": nb.drive_folder(DRIVE_FOLDER),  # mounts Drive in Colab when DRIVE_FOLDER is set
    "export.formats": EXPORT_FORMATS,
    "export.gguf_quantizations": GGUF_QUANTIZATIONS,
    "export.hub_repo": HUB_REPO,
    "export.push_to_hub": True if HUB_REPO else None,  # push only when a repository is named
})
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
# ## Fine-tune: the article's recipe in one call
#
# `sftlib.run` does what the article does, in order, and prints each decision: it picks the engine
# (Unsloth on a GPU), loads the model in 4-bit, adds ChatML's `<|im_start|>` and `<|im_end|>` to
# the tokenizer (their embeddings are trained), renders FineTome-100k with ChatML and marks what
# the loss sees, checks the rows before training (pre-flight: the end-of-turn token is trained,
# pad is not EOS, BOS appears once), adds rank-stabilised LoRA adapters to all seven projections,
# trains with packing (the plot follows the loss), and saves the adapters, the merged 16-bit
# model, the GGUF files with an Ollama Modelfile, and the upload when a repository is named.
# 02_train takes the same steps one cell at a time.

# %%
plot = nb.live_loss_plot()
result = sftlib.run(cfg, callbacks=[plot])

# %% [markdown]
# ## Ask it: is 9.11 larger than 9.9?
#
# The prompt is built by the code that built the training rows, and the answer streams until the
# template's end-of-turn token, not until a length limit.

# %%
reply = chat(result.model, result.tokenizer, result.template_obj, [{"role": "user", "content": PROMPT}],
             max_new_tokens=MAX_NEW_TOKENS, stream=True)
print(f"[{reply.new_tokens} tokens; stopped at the end of turn: {reply.stopped}]")

# %% [markdown]
# ## What was written
#
# The adapters need the base model; the merged folder loads in plain transformers; the GGUF
# folder holds one verified file per quantization and a Modelfile for `ollama create`.

# %%
# NBVAL_CHECK_OUTPUT
for kind, path in result.outputs.items():
    print(f"{kind:<14} {path}")

# %% [markdown] include="results_note"

# %%
results = nb.save_results(RESULTS_PATH, {
    "config": cfg.to_dict(),
    "backend": result.backend,
    "steps": result.train["steps"],
    "peak_memory_gib": result.train["peak_memory_gib"],
    "losses": result.train["losses"],
    "logged_this_run": plot.losses,
    "heldout_before": result.before,
    "heldout_after": result.after,
    "preflight_ok": result.preflight.get("ok"),
    "reply": reply.text,
    "stopped": reply.stopped,
    "outputs": result.outputs,
})
results
