# %% [markdown]
# # 01 · Data and chat templates: what the model will see
#
# Look at a dataset before training on it. Load it from the Hub or a file, detect its format, pick a
# chat template, read rendered conversations, see the trained tokens in colour, and find how many rows
# the max length would cut. Only the tokenizer is loaded, not the weights.
#
# Run it in Colab on a GPU runtime, in Jupyter, or headless with papermill. `PRESET = "cpu-demo"`
# runs it offline on a CPU in minutes, with the tiny model and data bundled with sftlib:
#
#     papermill notebooks/01_data_and_templates.ipynb out.ipynb -p PRESET cpu-demo

# %% include="install"

# %%
import json

import sftlib
from sftlib import notebook as nb
from sftlib.checks.preflight import preflight
from sftlib.data import detect_format, encode_dataset, render
from sftlib.notebook import ConfigForm

# %% [markdown] include="parameters_note"

# %% tags=["parameters"]
PRESET = "article"     # article | colab-t4 | colab-a100 | gpu-auto | h100 | cpu-demo
DATA_SOURCE = None     # Hub dataset or local .jsonl/.json/.csv/.parquet; None: the preset's (mlabonne/FineTome-100k)
DATA_SPLIT = None      # e.g. "train[:10000]"; None: the preset's (all of "train")
DATA_FORMAT = "auto"   # auto | sharegpt | openai | alpaca | text
MODEL_NAME = None      # whose tokenizer counts the tokens (no weights are loaded); None: the preset's
CHAT_TEMPLATE = None   # chatml | llama-3.1 | llama-3 | mistral | mistral-v3 | qwen-2.5 | phi-3 | gemma | alpaca; None: the preset's
TRAIN_ON = None        # assistant | all; None: the preset's
MAX_SEQ_LENGTH = None  # 256-8192; None: the preset's (2048)
MAX_ROWS = 2000        # rows looked at, 100-100000; None for all
SAMPLES = 2            # 1-10 conversations shown
RESULTS_PATH = ""      # a .json file for the figures of this run; "" for none

# %% [markdown] include="form_note"

# %%
form = ConfigForm(PRESET, {
    "data.source": DATA_SOURCE,
    "data.split": DATA_SPLIT,
    "data.format": DATA_FORMAT,
    "model.name": MODEL_NAME,
    "model.chat_template": CHAT_TEMPLATE,
    "data.train_on": TRAIN_ON,
    "model.max_seq_length": MAX_SEQ_LENGTH,
    "data.max_rows": MAX_ROWS,
}, sections=('model', 'data'))
form

# %%
# NBVAL_CHECK_OUTPUT
cfg = form.config()  # stops here, listing every problem, when the form shows any
print(form.describe())

# %% [markdown]
# ## Load the rows as they are
#
# Nothing is converted yet: this is what the file or Hub dataset holds, keys and all.

# %%
raw = nb.raw_rows(cfg.data)

# %%
# NBVAL_CHECK_OUTPUT
print(f"{len(raw)} rows; columns: {raw.column_names}")
print(json.dumps(raw[0], indent=2, ensure_ascii=False)[:1500])

# %% [markdown]
# ## Detect the format
#
# Row 0's keys decide: ShareGPT (`conversations` of `from`/`value`), OpenAI (`messages` of
# `role`/`content`), Alpaca (`instruction`/`input`/`output`) or raw `text`. Set `DATA_FORMAT`, or
# `data.mapping` in the form, when a dataset uses other names. Every row is checked on conversion,
# and a bad row is reported with its number.

# %%
# NBVAL_CHECK_OUTPUT
print("detected format:", detect_format(raw, cfg.data.mapping))

# %% [markdown]
# ## Convert, check every row, and fit the tokenizer to the chat template
#
# The first step of training, without the weights: the rows become one `messages` form (a bad row is
# reported with its number), the held-out rows (`data.eval_size`) are set aside, and the template's
# tokens missing from the tokenizer are added as single tokens, as training will add them. What
# follows is about the rows training will see. The template decides every character the model is
# trained on and prompted with: read a few rendered conversations.

# %%
s = sftlib.setup(cfg, load_weights=False)
ds, template, tokenizer, info = s.rows[0], s.template, s.tokenizer, s.tokens

# %%
# NBVAL_CHECK_OUTPUT
print(f"template {template.name}: added {info.added_tokens}, pad {info.pad_token!r}, "
      f"stops at {template.stop_strings(tokenizer.eos_token)}\n")
column = "messages" if "messages" in ds.column_names else "text"
for row in ds.select(range(min(SAMPLES, len(ds))))[column]:
    print(render(template, tokenizer, row) if column == "messages" else row)
    print("-" * 72)

# %% [markdown]
# ## What the loss sees, and what the max length cuts
#
# The pre-flight report that runs before every training: trained tokens highlighted (with
# `train_on: assistant`, each reply and its end-of-turn token, so the model learns to answer and
# to stop), checks that would stop a run, and a histogram of row lengths with the rows that
# `model.max_seq_length` would cut (their tail, often an answer's end, is lost).

# %%
rows = encode_dataset(ds, tokenizer, template, train_on=cfg.data.train_on,
                      max_length=cfg.model.max_seq_length)

# %%
# NBVAL_CHECK_OUTPUT
report = preflight(cfg, tokenizer, template, rows, raw_rows=ds, sample=len(rows), preview=SAMPLES)
print(f"{report.truncated_rows} of {len(rows)} rows are longer than {cfg.model.max_seq_length} tokens; "
      f"{report.trained_tokens / max(report.tokens, 1):.1%} of the tokens are trained")
report

# %% [markdown] include="results_note"

# %%
results = nb.save_results(RESULTS_PATH, {
    "backend": s.backend.name,
    "rows": len(raw),
    "train_rows": len(ds),
    "format": detect_format(raw, cfg.data.mapping),
    "template": template.name,
    "added_tokens": info.added_tokens,
    "preflight": report.to_dict(),
})
results
