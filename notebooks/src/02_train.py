# %% [markdown]
# # 02 · Train: the form, a live loss plot, checkpoints and resume
#
# Fine-tune with LoRA from the settings form, one step at a time, watching the loss as it falls.
# Checkpoints are written every `SAVE_STEPS`; run the notebook again after a disconnect and training
# continues from the newest complete one. In Colab, set `DRIVE_FOLDER` so that they are written to
# Google Drive: the VM's disk is lost with the session. The adapters are saved for 03 and 04.
#
# Run it in Colab on a GPU runtime, in Jupyter, or headless with papermill. `PRESET = "cpu-demo"`
# runs it offline on a CPU in minutes, with the tiny model and data bundled with sftlib:
#
#     papermill notebooks/02_train.ipynb out.ipynb -p PRESET cpu-demo -p MAX_STEPS 30 -p SAVE_STEPS 10

# %% include="install"

# %%
import sftlib
from sftlib import notebook as nb
from sftlib.notebook import ConfigForm
from sftlib.training.checkpoints import checkpoint_problem, list_checkpoints

# %% [markdown] include="parameters_note"

# %% tags=["parameters"]
PRESET = "article"    # article | colab-t4 | colab-a100 | gpu-auto | h100 | cpu-demo
MODEL_NAME = None     # Hub id or local folder; None: the preset's (unsloth/Meta-Llama-3.1-8B-bnb-4bit)
DATA_SOURCE = None    # Hub dataset or local .jsonl/.json/.csv/.parquet; None: the preset's (mlabonne/FineTome-100k)
DATA_SPLIT = None     # e.g. "train[:10000]"; None: the preset's (all of "train")
EVAL_SIZE = None      # rows held out: a fraction 0-0.2 or a count; None: the preset's (none)
LORA_R = 16           # 8-128
LORA_ALPHA = 16       # 8-128; equal to LORA_R, as rsLoRA scales by alpha/sqrt(r)
LEARNING_RATE = None  # 1e-5 to 5e-4; None: the preset's (3e-4)
EPOCHS = None         # 0.5-10; None: the preset's (1)
MAX_STEPS = -1        # -1 runs whole epochs; 60 for a first look
SAVE_STEPS = 200      # a checkpoint every N steps, 10-1000; 0 for none
OUTPUT_DIR = None     # checkpoints; None: the preset's
DRIVE_FOLDER = ""     # Colab only: a folder on Google Drive for the checkpoints, e.g. "sftlib/run1" (survives a disconnect); "" keeps them on the VM
RESUME = None         # auto | never | a checkpoint folder; None: the preset's (auto: the newest complete checkpoint of a run with the same settings)
EXPORT_DIR = None     # folder for the adapters and exports; None: the preset's
RESULTS_PATH = ""     # a .json file for the figures of this run; "" for none

# %% [markdown] include="form_note"

# %%
form = ConfigForm(PRESET, {
    "model.name": MODEL_NAME,
    "data.source": DATA_SOURCE,
    "data.split": DATA_SPLIT,
    "data.eval_size": EVAL_SIZE,
    "lora.r": LORA_R,
    "lora.alpha": LORA_ALPHA,
    "train.learning_rate": LEARNING_RATE,
    "train.epochs": EPOCHS,
    "train.max_steps": MAX_STEPS,
    "train.save_steps": SAVE_STEPS,
    "train.output_dir": nb.drive_folder(DRIVE_FOLDER, OUTPUT_DIR),  # mounts Drive in Colab when DRIVE_FOLDER is set
    "train.resume": RESUME,
    "export.output_dir": EXPORT_DIR,
})
form

# %%
# NBVAL_CHECK_OUTPUT
cfg = form.config()  # stops here, listing every problem, when the form shows any
print(form.describe())

# %% [markdown]
# ## Set up: data, engine, model and tokenizer
#
# `sftlib.run()` takes these same steps in one call; here each has a cell. First everything that can
# fail without weights: the data are loaded and every row is checked. Then the engine is chosen once,
# before transformers is imported: Unsloth on a CUDA GPU where it imports (it patches transformers,
# so it must come first), otherwise transformers + PEFT; on a CPU, 4-bit weights and 8-bit optimizers
# are replaced, with a note for each. QLoRA keeps the frozen base in 4-bit NF4 (about 5.5 GB for 8B
# parameters). A base model has no ChatML tokens, so `<|im_start|>` and `<|im_end|>` are added as
# single tokens; the pad token is never EOS, so EOS stays in the loss.

# %%
s = sftlib.setup(cfg)

# %% [markdown]
# ## Encode the data with the loss mask, and check before training
#
# Rows in ShareGPT, OpenAI, Alpaca or raw-text form become one `messages` form; each conversation is
# rendered with the template and tokenized once, and its labels mark what the loss sees
# (`data.train_on`: the assistant turns with their end-of-turn token, or everything, as in the
# article). Then the pre-flight report: the trained tokens of a few rows highlighted, and the checks
# that catch a run that would learn the wrong thing (an untrained end-of-turn token, pad = EOS, a
# double BOS, rows cut short) or not fit the GPU. With `train.preflight: stop` a fatal finding stops
# here and says what to change.

# %%
data = sftlib.prepare_data(cfg, s)

# %% [markdown]
# ## Held-out loss before training
#
# The loss on the conversations kept out of training (`data.eval_size`), measured on the base model
# so that the figure after training has something to be compared with. Nothing without held-out rows.

# %%
before = sftlib.evaluate(s.model, s, data, label="before")

# %% [markdown]
# ## Add rank-stabilised LoRA adapters
#
# Adapters on all seven attention and MLP projections; rsLoRA scales the update by alpha/√r rather
# than alpha/r, so a larger rank does not shrink it. When the template added tokens, their rows of
# the embeddings and LM head are trained too (only those rows), or the model could never write
# `<|im_end|>`.

# %%
model = sftlib.add_adapters(cfg, s)

# %% [markdown]
# ## Train, with packing and a live loss plot
#
# Short conversations are packed into `max_seq_length` sequences whose position ids restart at each
# conversation, so none attends to another and no compute goes to padding. With `train.resume: auto`,
# a checkpoint of this same run in `train.output_dir` is continued: adapters, optimizer, schedule and
# position in the data, so the run ends where an uninterrupted one would.

# %%
plot = nb.live_loss_plot()
outcome = sftlib.train(cfg, model, s, data, callbacks=[plot])

# %%
after = sftlib.evaluate(model, s, data, label="after")

# %% [markdown]
# ## Checkpoints
#
# Every `train.save_steps` steps the trainer writes a `checkpoint-N` folder. One counts as complete
# only once all its files are written; an incomplete one (the session ended while saving) is never
# resumed from.

# %%
for folder in list_checkpoints(cfg.train.output_dir):
    problem = checkpoint_problem(folder)
    print(folder, "complete" if problem is None else f"incomplete: {problem}")

# %% [markdown]
# ## Save the adapters
#
# With the tokenizer the template fitted, and loaded back to check them. 03_inference_and_eval and
# 04_export load them from here.

# %%
exported = sftlib.export(model, s.tokenizer, cfg, ["lora"], template=s.template, data=data)
adapters = exported.outputs["lora"]

# %% [markdown] include="results_note"

# %%
results = nb.save_results(RESULTS_PATH, {
    "backend": s.backend.name,
    "config": cfg.to_dict(),
    "trainable_parameters": sftlib.trainable_parameters(model),
    "steps": outcome.steps,
    "peak_memory_gib": outcome.peak_memory_gib,
    "losses": outcome.losses,
    "logged_this_run": plot.losses,
    "first_loss": outcome.first_loss,
    "final_loss": outcome.final_loss,
    "resumed_from": outcome.resumed_from,
    "checkpoints": outcome.checkpoints,
    "heldout_before": before.loss,
    "heldout_after": after.loss,
    "preflight_ok": data.preflight.ok if data.preflight is not None else None,
    "adapters": adapters,
})
results
