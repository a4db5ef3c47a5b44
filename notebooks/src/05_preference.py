# %% [markdown]
# # 05 · Preference tuning: DPO or ORPO after SFT
#
# Teach the fine-tuned model which of two replies people prefer, from pairs of a prompt, a chosen and a
# rejected reply: the step after supervised fine-tuning. DPO keeps the model near where it started (the
# adapters it starts from, kept frozen as the reference: no second copy of the base); ORPO needs no
# reference. The pairs are rendered with the same chat template and loss mask as SFT, and the held-out
# pairs are scored before and after: the share where the chosen reply scores above the rejected one
# (the preference accuracy) should rise.
#
# Run it in Colab on a GPU runtime, in Jupyter, or headless with papermill. On a CPU, offline, with the
# tiny model and data bundled with sftlib: first the SFT demo (02_train with `PRESET = "cpu-demo"`, or
# `python -m sftlib demo`), then this notebook on the bundled pairs, starting from its adapters:
#
#     papermill notebooks/05_preference.ipynb out.ipynb -p PRESET cpu-demo -p DATA_SOURCE demo \
#         -p START_FROM outputs/demo/model/lora -p LEARNING_RATE 3e-4 -p EPOCHS 3 -p SFT_WEIGHT 1.0

# %% include="install"

# %%
import sftlib
from sftlib import notebook as nb
from sftlib.checks.evaluate import side_by_side
from sftlib.notebook import ConfigForm
from sftlib.steps import summarize

# %% [markdown] include="parameters_note"

# %% tags=["parameters"]
PRESET = "article"    # article | colab-t4 | colab-a100 | gpu-auto | h100 | cpu-demo
METHOD = "dpo"        # dpo | orpo
BETA = 0.1            # 0.01-1; DPO: how near the reference the model stays; ORPO: the weight of the odds-ratio term
LOSS_TYPE = "sigmoid"  # DPO's loss: sigmoid | ipo | hinge | robust | ...
SFT_WEIGHT = 0.0      # 0-1; DPO only: a loss on the chosen replies beside DPO's (0: DPO alone)
START_FROM = ""       # folder of trained LoRA adapters (an SFT run's `lora` export); "" for new adapters
MODEL_NAME = None     # Hub id or local folder; None: the preset's (unsloth/Meta-Llama-3.1-8B-bnb-4bit)
DATA_SOURCE = "trl-lib/ultrafeedback_binarized"  # preference pairs: Hub dataset or local file; "demo" for the bundled pairs
DATA_SPLIT = "train[:2000]"  # e.g. "train" for all
EVAL_SIZE = 0.05      # pairs held out and scored before and after: a fraction 0.01-0.2 or a count
LEARNING_RATE = 5e-6  # 1e-6 to 5e-4; lower than SFT's
EPOCHS = 1.0          # 0.5-5
MAX_STEPS = -1        # -1 runs whole epochs; 30 for a first look
OUTPUT_DIR = "outputs/preference"  # checkpoints and logs, apart from the SFT run's
EXPORT_DIR = "outputs/preference/model"  # folder for the adapters and exports
EXPORT_FORMATS = ["lora"]  # lora, merged_16bit, merged_4bit, gguf, gguf:q4_k_m; comma-separated with -p
SAMPLES = 4           # held-out prompts answered before and after, 0-20
RESULTS_PATH = ""     # a .json file for the figures of this run; "" for none

# %% [markdown] include="form_note"

# %%
form = ConfigForm(PRESET, {
    "train.method": METHOD,
    "train.beta": BETA,
    "train.loss_type": LOSS_TYPE,
    "train.sft_weight": SFT_WEIGHT,
    "lora.start_from": START_FROM,
    "model.name": MODEL_NAME,
    "data.source": DATA_SOURCE,
    "data.split": DATA_SPLIT,
    "data.eval_size": EVAL_SIZE,
    "train.learning_rate": LEARNING_RATE,
    "train.epochs": EPOCHS,
    "train.max_steps": MAX_STEPS,
    "train.output_dir": OUTPUT_DIR,
    "export.output_dir": EXPORT_DIR,
    "export.formats": EXPORT_FORMATS,
})
form

# %%
# NBVAL_CHECK_OUTPUT
cfg = form.config()  # stops here, listing every problem, when the form shows any
print(form.describe())

# %% [markdown]
# ## Set up: the pairs, engine, model and tokenizer
#
# The pairs are loaded and every one is checked before any weights: the layout is read from the
# columns (TRL's prompt/chosen/rejected, ShareGPT `conversations` with `chosen`/`rejected` as
# LLaMA-Factory writes them, OpenAI `messages`, or whole chosen and rejected conversations), and a pair
# whose replies are equal, whose side is empty or whose prompt does not end on the user's turn is
# named by its row number. Then the engine, the model and its tokenizer fitted to the template, as
# for SFT.

# %%
s = sftlib.setup(cfg)

# %% [markdown]
# ## Encode the pairs, and check before training
#
# Each side is the prompt and its reply rendered with the chat template and masked as SFT masks a
# reply: the reply's words and its end-of-turn token are what DPO and ORPO compare. The pre-flight
# report shows one pair with the compared tokens between « », the pair lengths, the replies cut by
# `model.max_seq_length` and the pairs whose prompt alone fills it, and the memory of two sequences per
# pair.

# %%
data = sftlib.prepare_data(cfg, s)

# %% [markdown]
# ## The adapters to tune, and the held-out pairs before training
#
# With `START_FROM`, the SFT run's adapters are loaded and trained further; DPO's reference is a frozen
# copy of them. The held-out pairs are scored now, so that the figures after training have something
# to be compared with, and the first prompts are answered.

# %%
model = sftlib.add_adapters(cfg, s)
before = sftlib.evaluate(model, s, data, samples=SAMPLES, label="before")

# %% [markdown]
# ## Train, with a live plot of the loss and the reward margin
#
# The reward margin is how much more the model (against its reference, for DPO) favours the chosen
# reply than the rejected one; it should climb above zero.

# %%
plot = nb.live_preference_plot()
outcome = sftlib.train(cfg, model, s, data, callbacks=[plot])

# %% [markdown]
# ## Did it work? The held-out pairs after training
#
# The preference accuracy before and after, the mean log-probability margin, and the reward margin
# against the model as training started; then the answers to the same prompts side by side.

# %%
after = sftlib.evaluate(model, s, data, samples=SAMPLES, label="after", reference=before)
if after.answers:
    print(side_by_side(before.answers, after.answers))

# %% [markdown]
# ## Export
#
# Through the same export as SFT: each format written and loaded back to check it, and the model card,
# which records the method and the held-out figures above.

# %%
result = summarize(cfg, s, data, model, outcome, before, after)
exported = sftlib.export(model, s.tokenizer, cfg, template=s.template, result=result, data=data)
exported.outputs

# %% [markdown] include="results_note"

# %%
results = nb.save_results(RESULTS_PATH, {
    "backend": s.backend.name,
    "method": cfg.train.method,
    "config": cfg.to_dict(),
    "train_pairs": len(data.train_rows),
    "steps": outcome.steps,
    "losses": outcome.losses,
    "margins": outcome.margins,
    "logged_this_run": plot.losses,
    "preference": after.preference,
    "answers_before": [a.reply for a in before.answers],
    "answers_after": [a.reply for a in after.answers],
    "exact_before": before.accuracy,
    "exact_after": after.accuracy,
    "preflight_ok": data.preflight.ok if data.preflight is not None else None,
    "outputs": exported.outputs,
})
results
