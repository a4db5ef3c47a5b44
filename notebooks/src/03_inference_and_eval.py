# %% [markdown]
# # 03 · Inference and evaluation: chat, held-out loss, base vs fine-tuned
#
# Talk to the fine-tuned model and measure what training changed. A streamed chat, the loss and
# perplexity on held-out conversations, and the base and fine-tuned answers side by side. Uses the
# adapters 02_train saved.
#
# Run it in Colab on a GPU runtime, in Jupyter, or headless with papermill. `PRESET = "cpu-demo"`
# runs it offline on a CPU in minutes, with the tiny model and data bundled with sftlib:
#
#     papermill notebooks/03_inference_and_eval.ipynb out.ipynb -p PRESET cpu-demo -p PROMPT "Review: The lamp is great.\nIs this review positive or negative?"

# %% include="install"

# %%
from sftlib import notebook as nb
from sftlib.checks.evaluate import accuracy, answers, heldout_loss, side_by_side
from sftlib.data import encode_dataset, get_template, load_dataset
from sftlib.exports.merged import load_adapters
from sftlib.infer import chat
from sftlib.notebook import ConfigForm
from sftlib.training.backend import choose_backend

# %% [markdown] include="parameters_note"

# %% tags=["parameters"]
PRESET = "article"                   # article | colab-t4 | colab-a100 | gpu-auto | h100 | cpu-demo
MODEL_NAME = None                    # Hub id or local folder; None: the preset's (unsloth/Meta-Llama-3.1-8B-bnb-4bit)
DATA_SOURCE = None                   # Hub dataset or local .jsonl/.json/.csv/.parquet; None: the preset's (mlabonne/FineTome-100k)
DATA_SPLIT = None                    # e.g. "train[:10000]"; None: the preset's (all of "train")
EVAL_SIZE = None                     # the rows 02_train held out: a fraction or a count; None: the preset's
EXPORT_DIR = None                    # folder for the adapters and exports; None: the preset's
ADAPTERS = ""                        # folder of the trained LoRA adapters; "" means <export.output_dir>/lora, where 02_train saves them
PROMPT = "Is 9.11 larger than 9.9?"  # any question
MAX_NEW_TOKENS = 256                 # 16-2048
SAMPLES = 6                          # 1-50 held-out conversations answered by both models
RESULTS_PATH = ""                    # a .json file for the figures of this run; "" for none

# %% [markdown] include="form_note"

# %%
form = ConfigForm(PRESET, {
    "model.name": MODEL_NAME,
    "data.source": DATA_SOURCE,
    "data.split": DATA_SPLIT,
    "data.eval_size": EVAL_SIZE,
    "export.output_dir": EXPORT_DIR,
})
form

# %%
# NBVAL_CHECK_OUTPUT
cfg = form.config()  # stops here, listing every problem, when the form shows any
print(form.describe())

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
# ## Chat, streaming
#
# Tokens appear as they are generated; the answer ends at the template's end-of-turn token.

# %%
# NBVAL_CHECK_OUTPUT
reply = chat(model, tokenizer, template, [{"role": "user", "content": PROMPT}],
             max_new_tokens=MAX_NEW_TOKENS, stream=True)
print(f"[{reply.new_tokens} tokens; stopped at the end of turn: {reply.stopped}]")

# %% [markdown]
# ## Held-out loss and perplexity, base vs fine-tuned
#
# The mean loss over the assistant tokens of conversations kept out of training (the split
# 02_train made, from `data.eval_size` and `data.shuffle_seed`); "base" is the same model with the
# adapters switched off. Perplexity is exp(loss); lower is better.

# %%
_, eval_ds = load_dataset(cfg.data)
base, tuned, base_answers, tuned_answers = {}, {}, [], []
if eval_ds is None:
    print("no held-out rows (data.eval_size = 0, as in the article): set EVAL_SIZE, e.g. 0.01, "
          "here and in 02_train to measure them")
else:
    eval_rows = encode_dataset(eval_ds, tokenizer, template, train_on=cfg.data.train_on,
                               max_length=cfg.model.max_seq_length)

# %%
# NBVAL_CHECK_OUTPUT
if eval_ds is not None:
    tuned = heldout_loss(model, eval_rows)
    with model.disable_adapter():
        base = heldout_loss(model, eval_rows)
    print(f"held-out loss over {tuned['tokens']} tokens: base {base['loss']:.3f} (perplexity "
          f"{base['perplexity']:.1f}), fine-tuned {tuned['loss']:.3f} (perplexity {tuned['perplexity']:.2f})")

# %% [markdown]
# ## Answers side by side
#
# Greedy answers to held-out prompts from the base model and the fine-tuned one; ✓ marks a
# fine-tuned answer equal to the reference that ends at the end-of-turn token.

# %%
# NBVAL_CHECK_OUTPUT
if eval_ds is not None:
    conversations = eval_ds.select(range(min(SAMPLES, len(eval_ds))))["messages"]
    tuned_answers = answers(model, tokenizer, template, conversations, max_new_tokens=MAX_NEW_TOKENS)
    with model.disable_adapter():
        base_answers = answers(model, tokenizer, template, conversations, max_new_tokens=MAX_NEW_TOKENS)
    print(side_by_side(base_answers, tuned_answers))
    print(f"exact answers: base {accuracy(base_answers):.0%}, fine-tuned {accuracy(tuned_answers):.0%}")

# %% [markdown] include="results_note"

# %%
results = nb.save_results(RESULTS_PATH, {
    "backend": backend.name,
    "adapters": adapters,
    "reply": reply.text,
    "stopped": reply.stopped,
    "loss_base": base.get("loss"),
    "loss_tuned": tuned.get("loss"),
    "perplexity_base": base.get("perplexity"),
    "perplexity_tuned": tuned.get("perplexity"),
    "accuracy_base": accuracy(base_answers),
    "accuracy_tuned": accuracy(tuned_answers),
})
results
