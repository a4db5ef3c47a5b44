"""What each notebook does: its parameters and its steps, each step a sentence of why and its sftlib calls.

Read by make_notebooks.py, which adds the shared cells (title and badge, install, parameters and form
notes, the config cell, results) around them. A parameter with a `key` is passed to the form and so
to the RunConfig; one without is used by the notebook itself. Cells marked `# NBVAL_CHECK_OUTPUT`
print only deterministic text: nbval re-runs the notebooks and compares those cells.
"""

from __future__ import annotations

from make_notebooks import Notebook, Param, code, md

from sftlib.config import PRESETS

PRESET = Param("PRESET", "article", " | ".join(PRESETS))
MODEL_NAME = Param("MODEL_NAME", None, "Hub id or local folder; None: the preset's (unsloth/Meta-Llama-3.1-8B-bnb-4bit)",
                   "model.name")
DATA_SOURCE = Param("DATA_SOURCE", None, "Hub dataset or local .jsonl/.json/.csv/.parquet; None: the preset's "
                    "(mlabonne/FineTome-100k)", "data.source")
DATA_SPLIT = Param("DATA_SPLIT", None, 'e.g. "train[:10000]"; None: the preset\'s (all of "train")', "data.split")
EVAL_SIZE = Param("EVAL_SIZE", None, "rows held out: a fraction 0-0.2 or a count; None: the preset's (none)",
                  "data.eval_size")
LORA_R = Param("LORA_R", 16, "8-128", "lora.r")
LORA_ALPHA = Param("LORA_ALPHA", 16, "8-128; equal to LORA_R, as rsLoRA scales by alpha/sqrt(r)", "lora.alpha")
LEARNING_RATE = Param("LEARNING_RATE", None, "1e-5 to 5e-4; None: the preset's (3e-4)", "train.learning_rate")
MAX_STEPS = Param("MAX_STEPS", -1, "-1 runs whole epochs; 60 for a first look", "train.max_steps")
EXPORT_DIR = Param("EXPORT_DIR", None, "folder for the adapters and exports; None: the preset's", "export.output_dir")
ADAPTERS = Param("ADAPTERS", "", 'folder of the trained LoRA adapters; "" means <export.output_dir>/lora, where '
                 "02_train saves them")
GGUF_QUANTIZATIONS = Param("GGUF_QUANTIZATIONS", None, 'llama.cpp types, e.g. "q4_k_m,q8_0"; None: the preset\'s '
                           "(q2_k to q8_0)", "export.gguf_quantizations")
PROMPT = Param("PROMPT", "Is 9.11 larger than 9.9?", "any question")
MAX_NEW_TOKENS = Param("MAX_NEW_TOKENS", 256, "16-2048")
HUB_REPO = Param("HUB_REPO", "", '"owner/name" to push to (token from HF_TOKEN or Colab secrets); "" for no push',
                 "export.hub_repo")
RESULTS_PATH = Param("RESULTS_PATH", "", 'a .json file for the figures of this run; "" for none')
PUSH_WHEN_NAMED = {"export.push_to_hub": "True if HUB_REPO else None  # push only when a repository is named"}

GGUF_TOOLCHAIN = [
    md("""
        ## Get the GGUF toolchain first

        GGUF files are written with llama.cpp's own converter and library, built from the
        `llama-cpp-python` source on PyPI: a few minutes the first time, cached after that. Doing it
        before anything else means a missing compiler shows now, not after training.
        """),
    code("""
        if "gguf" in cfg.export.formats:
            ensure_toolchain()
        """),
]

LOAD_ADAPTERS = [
    md("""
        ## Load the base model with the trained adapters

        The tokenizer comes from the adapter folder: it carries the template tokens and the pad token
        that training added. The base is loaded in 16-bit on a GPU and in float32 on a CPU.
        """),
    code("""
        backend = choose_backend(cfg.backend)
        adapters = nb.adapters_folder(ADAPTERS, cfg)
        dtype = "float32" if not backend.cuda else ("bfloat16" if cfg.model.dtype == "auto" else cfg.model.dtype)
        model, tokenizer = load_adapters(cfg.model.name, adapters, dtype=dtype, device=backend.device)
        template = get_template(cfg.model.chat_template)
        print(f"{backend}\\nadapters {adapters} on {cfg.model.name} ({dtype})")
        """),
]

QUICKSTART = Notebook(
    name="00_quickstart",
    title="00 · Quickstart: fine-tune Llama 3.1 8B, chat with it, export it",
    summary=(
        "The whole recipe of the article *Fine-tune Llama 3.1 Ultra-Efficiently with Unsloth* in one notebook. "
        "Llama 3.1 8B loaded in 4-bit, rank-stabilised LoRA on every projection, FineTome-100k rendered with "
        "ChatML, packed training, a streamed answer to \"Is 9.11 larger than 9.9?\", a merged 16-bit model, GGUF "
        "files for llama.cpp, Ollama and LM Studio, and a push to the Hugging Face Hub when you name a "
        "repository. `PRESET = \"article\"` is the article's settings (an A100 40 GB; the whole dataset takes "
        "hours, so `MAX_STEPS = 60` gives a first look); `colab-t4` fits a free T4."
    ),
    imports="""
        from sftlib import notebook as nb
        from sftlib.gguf_setup import ensure_toolchain
        from sftlib.infer import chat
        from sftlib.pipeline import run
        from sftlib.widgets import ConfigForm
        """,
    params=[PRESET, MODEL_NAME, DATA_SOURCE, DATA_SPLIT, LORA_R, LORA_ALPHA, LEARNING_RATE, MAX_STEPS,
            GGUF_QUANTIZATIONS, PROMPT, MAX_NEW_TOKENS, HUB_REPO, RESULTS_PATH],
    derived=PUSH_WHEN_NAMED,
    demo_args=" -p MAX_STEPS 30",
    steps=[
        *GGUF_TOOLCHAIN,
        md("""
            ## Fine-tune: the article's recipe in one call

            `run` does what the article does, in order, and prints each decision: it picks the engine
            (Unsloth on a GPU), loads the model in 4-bit, adds ChatML's `<|im_start|>` and `<|im_end|>` to
            the tokenizer (their embeddings are trained), renders FineTome-100k with ChatML and marks what
            the loss sees, checks the rows before training (pre-flight: the end-of-turn token is trained,
            pad is not EOS, BOS appears once), adds rank-stabilised LoRA adapters to all seven projections,
            trains with packing (the plot follows the loss), and saves the adapters, the merged 16-bit
            model, the GGUF files with an Ollama Modelfile, and the upload when a repository is named.
            02_train takes the same steps one cell at a time.
            """),
        code("""
            plot = nb.live_loss_plot()
            result = run(cfg, callbacks=[plot])
            """),
        md("""
            ## Ask it: is 9.11 larger than 9.9?

            The prompt is built by the code that built the training rows, and the answer streams until the
            template's end-of-turn token, not until a length limit.
            """),
        code("""
            reply = chat(result.model, result.tokenizer, result.template_obj, [{"role": "user", "content": PROMPT}],
                         max_new_tokens=MAX_NEW_TOKENS, stream=True)
            print(f"[{reply.new_tokens} tokens; stopped at the end of turn: {reply.stopped}]")
            """),
        md("""
            ## What was written

            The adapters need the base model; the merged folder loads in plain transformers; the GGUF
            folder holds one verified file per quantization and a Modelfile for `ollama create`.
            """),
        code("""
            # NBVAL_CHECK_OUTPUT
            for kind, path in result.outputs.items():
                print(f"{kind:<14} {path}")
            """),
    ],
    results="""
        "backend": result.backend,
        "steps": result.train["steps"],
        "losses": result.train["losses"],
        "logged_this_run": plot.losses,
        "heldout_before": result.before,
        "heldout_after": result.after,
        "preflight_ok": result.preflight.get("ok"),
        "reply": reply.text,
        "stopped": reply.stopped,
        "outputs": result.outputs,
        """,
)

DATA = Notebook(
    name="01_data_and_templates",
    title="01 · Data and chat templates: what the model will see",
    summary=(
        "Look at a dataset before training on it. Load it from the Hub or a file, detect its format, pick a "
        "chat template, read rendered conversations, see the trained tokens in colour, and find how many rows "
        "the max length would cut. Only the tokenizer is loaded, not the weights."
    ),
    imports="""
        import json

        from sftlib import notebook as nb
        from sftlib.data import detect_format, to_messages
        from sftlib.encode import encode_dataset, render
        from sftlib.preflight import preflight
        from sftlib.templates import get_template
        from sftlib.widgets import ConfigForm
        """,
    params=[
        PRESET, DATA_SOURCE, DATA_SPLIT,
        Param("DATA_FORMAT", "auto", "auto | sharegpt | openai | alpaca | text", "data.format"),
        Param("MODEL_NAME", None, "whose tokenizer counts the tokens (no weights are loaded); None: the preset's",
              "model.name"),
        Param("CHAT_TEMPLATE", None, "chatml | llama-3.1 | llama-3 | mistral | qwen-2.5 | phi-3 | gemma | alpaca; "
              "None: the preset's", "model.chat_template"),
        Param("TRAIN_ON", None, "assistant | all; None: the preset's", "data.train_on"),
        Param("MAX_SEQ_LENGTH", None, "256-8192; None: the preset's (2048)", "model.max_seq_length"),
        Param("MAX_ROWS", 2000, "rows looked at, 100-100000; None for all", "data.max_rows"),
        Param("SAMPLES", 2, "1-10 conversations shown"),
        RESULTS_PATH,
    ],
    sections=("model", "data"),
    steps=[
        md("""
            ## Load the rows as they are

            Nothing is converted yet: this is what the file or Hub dataset holds, keys and all.
            """),
        code("""
            raw = nb.raw_rows(cfg.data)
            """),
        code("""
            # NBVAL_CHECK_OUTPUT
            print(f"{len(raw)} rows; columns: {raw.column_names}")
            print(json.dumps(raw[0], indent=2, ensure_ascii=False)[:1500])
            """),
        md("""
            ## Detect the format

            Row 0's keys decide: ShareGPT (`conversations` of `from`/`value`), OpenAI (`messages` of
            `role`/`content`), Alpaca (`instruction`/`input`/`output`) or raw `text`. Set `DATA_FORMAT`, or
            `data.mapping` in the form, when a dataset uses other names. Every row is checked on conversion,
            and a bad row is reported with its number.
            """),
        code("""
            # NBVAL_CHECK_OUTPUT
            print("detected format:", detect_format(raw, cfg.data.mapping))
            """),
        code("""
            ds = to_messages(raw, cfg.data.format, cfg.data.mapping)
            """),
        md("""
            ## Pick a chat template and read a few rendered conversations

            The template decides every character the model is trained on and prompted with. The template's
            tokens missing from the tokenizer are added as single tokens, as training will add them.
            """),
        code("""
            template = get_template(cfg.model.chat_template)
            tokenizer, info = nb.load_tokenizer(cfg, template)
            """),
        code("""
            # NBVAL_CHECK_OUTPUT
            print(f"template {template.name}: added {info.added_tokens}, pad {info.pad_token!r}, "
                  f"stops at {template.stop_strings(tokenizer.eos_token)}\\n")
            column = "messages" if "messages" in ds.column_names else "text"
            for row in ds.select(range(min(SAMPLES, len(ds))))[column]:
                print(render(template, tokenizer, row) if column == "messages" else row)
                print("-" * 72)
            """),
        md("""
            ## What the loss sees, and what the max length cuts

            The pre-flight report that runs before every training: trained tokens highlighted (with
            `train_on: assistant`, each reply and its end-of-turn token, so the model learns to answer and
            to stop), checks that would stop a run, and a histogram of row lengths with the rows that
            `model.max_seq_length` would cut (their tail, often an answer's end, is lost).
            """),
        code("""
            rows = encode_dataset(ds, tokenizer, template, train_on=cfg.data.train_on,
                                  max_length=cfg.model.max_seq_length)
            """),
        code("""
            # NBVAL_CHECK_OUTPUT
            report = preflight(cfg, tokenizer, template, rows, raw_rows=ds, sample=len(rows), preview=SAMPLES)
            print(f"{report.truncated_rows} of {len(rows)} rows are longer than {cfg.model.max_seq_length} tokens; "
                  f"{report.trained_tokens / max(report.tokens, 1):.1%} of the tokens are trained")
            report
            """),
    ],
    results="""
        "rows": len(raw),
        "format": detect_format(raw, cfg.data.mapping),
        "template": template.name,
        "added_tokens": info.added_tokens,
        "preflight": report.to_dict(),
        """,
)

TRAIN = Notebook(
    name="02_train",
    title="02 · Train: the form, a live loss plot, checkpoints and resume",
    summary=(
        "Fine-tune with LoRA from the settings form, one step at a time, watching the loss as it falls. "
        "Checkpoints are written every `SAVE_STEPS`; run the notebook again after a disconnect and training "
        "continues from the newest complete one. The adapters are saved for 03 and 04."
    ),
    imports="""
        from pathlib import Path

        from sftlib import notebook as nb
        from sftlib.backend import choose_backend, resolve
        from sftlib.data import load_dataset
        from sftlib.encode import encode_dataset
        from sftlib.save import save_adapters
        from sftlib.model import add_lora, load_model, prepare_tokenizer
        from sftlib.preflight import preflight
        from sftlib.templates import get_template
        from sftlib.train import checkpoint_problem, list_checkpoints, train
        from sftlib.widgets import ConfigForm
        """,
    params=[
        PRESET, MODEL_NAME, DATA_SOURCE, DATA_SPLIT, EVAL_SIZE, LORA_R, LORA_ALPHA, LEARNING_RATE,
        Param("EPOCHS", None, "0.5-10; None: the preset's (1)", "train.epochs"),
        MAX_STEPS,
        Param("SAVE_STEPS", 200, "a checkpoint every N steps, 10-1000; 0 for none", "train.save_steps"),
        Param("OUTPUT_DIR", None, "checkpoints; in Colab a Google Drive folder survives a disconnect; "
              "None: the preset's", "train.output_dir"),
        Param("RESUME", None, "auto | never | a checkpoint folder; None: the preset's (auto: the newest "
              "complete checkpoint of a run with the same settings)", "train.resume"),
        EXPORT_DIR, RESULTS_PATH,
    ],
    demo_args=" -p MAX_STEPS 30 -p SAVE_STEPS 10",
    steps=[
        md("""
            ## Choose the engine

            Decided once, before transformers is imported: Unsloth on a CUDA GPU where it imports (it
            patches transformers, so it must come first), otherwise transformers + PEFT. On a CPU, 4-bit
            weights and 8-bit optimizers are replaced, with a note for each.
            """),
        code("""
            backend = choose_backend(cfg.backend)
            notes = resolve(cfg, backend)
            print(backend, *notes, sep="\\n")
            """),
        md("""
            ## Load the model and fit its tokenizer to the chat template

            QLoRA keeps the frozen base in 4-bit NF4 (about 5.5 GB for 8B parameters) and trains small
            adapters beside it. A base model has no ChatML tokens, so `<|im_start|>` and `<|im_end|>` are
            added as single tokens and their embeddings trained; the pad token is never EOS, so EOS stays
            in the loss.
            """),
        code("""
            model, tokenizer = load_model(cfg, backend)
            template = get_template(cfg.model.chat_template)
            info = prepare_tokenizer(model, tokenizer, template)
            print(f"added tokens {info.added_tokens}, pad {info.pad_token!r}, "
                  f"generation stops at {tokenizer.convert_ids_to_tokens(info.stop_token_ids)}")
            """),
        md("""
            ## Load the data and encode it with the loss mask

            Rows in ShareGPT, OpenAI, Alpaca or raw-text form become one `messages` form; each conversation
            is rendered with the template and tokenized once, and its labels mark what the loss sees
            (`data.train_on`: the assistant turns with their end-of-turn token, or everything, as in the
            article).
            """),
        code("""
            train_ds, eval_ds = load_dataset(cfg.data)
            train_rows = encode_dataset(train_ds, tokenizer, template, train_on=cfg.data.train_on,
                                        max_length=cfg.model.max_seq_length)
            print(f"{len(train_rows)} training conversations; {len(eval_ds) if eval_ds is not None else 0} held out")
            """),
        md("""
            ## Check before training

            The pre-flight report: the trained tokens of a few rows highlighted, and the checks that catch
            a run that would learn the wrong thing (an untrained end-of-turn token, pad = EOS, a double
            BOS, rows cut short) or not fit the GPU. With `train.preflight: stop` a fatal finding stops
            here and says what to change.
            """),
        code("""
            report = preflight(cfg, tokenizer, template, train_rows, raw_rows=train_ds, model=model,
                               backend=backend.name)
            if cfg.train.preflight == "stop":
                report.raise_if_fatal()
            report
            """),
        md("""
            ## Add rank-stabilised LoRA adapters

            Adapters on all seven attention and MLP projections; rsLoRA scales the update by alpha/√r
            rather than alpha/r, so a larger rank does not shrink it. When tokens were added, the
            embeddings and LM head are trained too, or the model could never write `<|im_end|>`.
            """),
        code("""
            model = add_lora(model, cfg, backend, train_embeddings=info.resized)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} rslora={cfg.lora.use_rslora}: {trainable:,} trainable parameters")
            """),
        md("""
            ## Train, with packing and a live loss plot

            Short conversations are packed into `max_seq_length` sequences whose position ids restart at
            each conversation, so none attends to another and no compute goes to padding. With
            `train.resume: auto`, a checkpoint of this same run in `train.output_dir` is continued:
            adapters, optimizer, schedule and position in the data, so the run ends where an uninterrupted
            one would.
            """),
        code("""
            plot = nb.live_loss_plot()
            outcome = train(cfg, model, tokenizer, train_rows, backend=backend, callbacks=[plot])
            print(f"{'resumed from ' + outcome.resumed_from if outcome.resumed_from else 'fresh adapters'}: "
                  f"{outcome.steps} steps, loss {outcome.first_loss:.3f} -> {outcome.final_loss:.3f}, "
                  f"{outcome.tokens_per_s:,.0f} tokens/s")
            """),
        md("""
            ## Checkpoints

            Every `train.save_steps` steps the trainer writes a `checkpoint-N` folder. One counts as
            complete only once all its files are written; an incomplete one (the session ended while
            saving) is never resumed from.
            """),
        code("""
            for folder in list_checkpoints(cfg.train.output_dir):
                problem = checkpoint_problem(folder)
                print(folder, "complete" if problem is None else f"incomplete: {problem}")
            """),
        md("""
            ## Save the adapters

            03_inference_and_eval and 04_export load them from here, with the tokenizer the template fitted.
            """),
        code("""
            adapters = save_adapters(model, tokenizer, Path(cfg.export.output_dir) / "lora")
            print(adapters)
            """),
    ],
    results="""
        "config": form.config().to_dict(),
        "steps": outcome.steps,
        "losses": outcome.losses,
        "logged_this_run": plot.losses,
        "first_loss": outcome.first_loss,
        "final_loss": outcome.final_loss,
        "resumed_from": outcome.resumed_from,
        "checkpoints": [p for p in list_checkpoints(cfg.train.output_dir) if checkpoint_problem(p) is None],
        "preflight_ok": report.ok,
        "adapters": adapters,
        """,
)

EVALUATE = Notebook(
    name="03_inference_and_eval",
    title="03 · Inference and evaluation: chat, held-out loss, base vs fine-tuned",
    summary=(
        "Talk to the fine-tuned model and measure what training changed. A streamed chat, the loss and "
        "perplexity on held-out conversations, and the base and fine-tuned answers side by side. Uses the "
        "adapters 02_train saved."
    ),
    imports="""
        from sftlib import notebook as nb
        from sftlib.backend import choose_backend
        from sftlib.data import load_dataset
        from sftlib.encode import encode_dataset
        from sftlib.evaluate import accuracy, answers, heldout_loss, side_by_side
        from sftlib.save import load_adapters
        from sftlib.infer import chat
        from sftlib.templates import get_template
        from sftlib.widgets import ConfigForm
        """,
    params=[
        PRESET, MODEL_NAME, DATA_SOURCE, DATA_SPLIT,
        Param("EVAL_SIZE", None, "the rows 02_train held out: a fraction or a count; None: the preset's",
              "data.eval_size"),
        EXPORT_DIR, ADAPTERS, PROMPT, MAX_NEW_TOKENS,
        Param("SAMPLES", 6, "1-50 held-out conversations answered by both models"),
        RESULTS_PATH,
    ],
    demo_args=' -p PROMPT "Review: The lamp is great.\\nIs this review positive or negative?"',
    steps=[
        *LOAD_ADAPTERS,
        md("""
            ## Chat, streaming

            Tokens appear as they are generated; the answer ends at the template's end-of-turn token.
            """),
        code("""
            # NBVAL_CHECK_OUTPUT
            reply = chat(model, tokenizer, template, [{"role": "user", "content": PROMPT}],
                         max_new_tokens=MAX_NEW_TOKENS, stream=True)
            print(f"[{reply.new_tokens} tokens; stopped at the end of turn: {reply.stopped}]")
            """),
        md("""
            ## Held-out loss and perplexity, base vs fine-tuned

            The mean loss over the assistant tokens of conversations kept out of training (the split
            02_train made, from `data.eval_size` and `data.shuffle_seed`); "base" is the same model with the
            adapters switched off. Perplexity is exp(loss); lower is better.
            """),
        code("""
            _, eval_ds = load_dataset(cfg.data)
            base, tuned, base_answers, tuned_answers = {}, {}, [], []
            if eval_ds is None:
                print("no held-out rows (data.eval_size = 0, as in the article): set EVAL_SIZE, e.g. 0.01, "
                      "here and in 02_train to measure them")
            else:
                eval_rows = encode_dataset(eval_ds, tokenizer, template, train_on=cfg.data.train_on,
                                           max_length=cfg.model.max_seq_length)
            """),
        code("""
            # NBVAL_CHECK_OUTPUT
            if eval_ds is not None:
                tuned = heldout_loss(model, eval_rows)
                with model.disable_adapter():
                    base = heldout_loss(model, eval_rows)
                print(f"held-out loss over {tuned['tokens']} tokens: base {base['loss']:.3f} (perplexity "
                      f"{base['perplexity']:.1f}), fine-tuned {tuned['loss']:.3f} (perplexity {tuned['perplexity']:.2f})")
            """),
        md("""
            ## Answers side by side

            Greedy answers to held-out prompts from the base model and the fine-tuned one; ✓ marks a
            fine-tuned answer equal to the reference that ends at the end-of-turn token.
            """),
        code("""
            # NBVAL_CHECK_OUTPUT
            if eval_ds is not None:
                conversations = eval_ds.select(range(min(SAMPLES, len(eval_ds))))["messages"]
                tuned_answers = answers(model, tokenizer, template, conversations, max_new_tokens=MAX_NEW_TOKENS)
                with model.disable_adapter():
                    base_answers = answers(model, tokenizer, template, conversations, max_new_tokens=MAX_NEW_TOKENS)
                print(side_by_side(base_answers, tuned_answers))
                print(f"exact answers: base {accuracy(base_answers):.0%}, fine-tuned {accuracy(tuned_answers):.0%}")
            """),
    ],
    results="""
        "adapters": adapters,
        "reply": reply.text,
        "stopped": reply.stopped,
        "loss_base": base.get("loss"),
        "loss_tuned": tuned.get("loss"),
        "perplexity_base": base.get("perplexity"),
        "perplexity_tuned": tuned.get("perplexity"),
        "accuracy_base": accuracy(base_answers),
        "accuracy_tuned": accuracy(tuned_answers),
        """,
)

EXPORT = Notebook(
    name="04_export",
    title="04 · Export: adapters, merged model, GGUF, Ollama Modelfile, Hub",
    summary=(
        "Turn trained adapters into files others can run. The adapters, a merged 16-bit model that plain "
        "transformers loads (checked by loading it back and asking it something), GGUF files for llama.cpp, "
        "Ollama and LM Studio with a Modelfile, and an upload to the Hugging Face Hub when you name a "
        "repository. Uses the adapters 02_train saved."
    ),
    imports="""
        from pathlib import Path

        from sftlib import notebook as nb
        from sftlib.backend import choose_backend
        from sftlib.save import load_adapters
        from sftlib.exporter import export
        from sftlib.gguf_setup import ensure_toolchain
        from sftlib.hub import push_folder, push_plan
        from sftlib.infer import chat
        from sftlib.templates import get_template
        from sftlib.widgets import ConfigForm
        """,
    params=[
        PRESET, MODEL_NAME, EXPORT_DIR, ADAPTERS,
        Param("EXPORT_FORMATS", None, 'comma-separated: lora, merged_16bit, merged_4bit, gguf; None: the preset\'s',
              "export.formats"),
        GGUF_QUANTIZATIONS,
        Param("PROMPT", "Is 9.11 larger than 9.9?", "asked of the merged model, to check that it loads and stops"),
        MAX_NEW_TOKENS, HUB_REPO, RESULTS_PATH,
    ],
    derived=PUSH_WHEN_NAMED,
    sections=("model", "export", "backend"),
    steps=[
        *GGUF_TOOLCHAIN,
        *LOAD_ADAPTERS,
        md("""
            ## Export: each format written, loaded back and checked

            One call writes what `export.formats` asks for, and the adapters always:
            - `lora`: the adapters, tens of megabytes for an 8B model, with the fitted tokenizer and the
              template's stop tokens; share these when the other side has the base model;
            - `merged_16bit`: the base reloaded in bfloat16 (dequantized when it is stored in 4-bit) with
              the adapters merged in: needs neither PEFT nor the 4-bit weights training used;
            - `merged_4bit`: that, quantized to NF4 by bitsandbytes;
            - `gguf`: one conversion with llama.cpp's converter, then one file per quantization, with the
              chat template and stop tokens of training inside, and an Ollama Modelfile.

            Each output is then loaded back the way you would load it and held to the model in memory on
            prompts from your data: the same greedy answer and the same stop at the end of turn (quantized
            files report how close they come). Everything is written under a temporary name and renamed
            when complete; a file that fails its check is kept aside as `NAME.failed` and the cell stops
            with the reason.
            """),
        code("""
            out = Path(cfg.export.output_dir)
            report = export(model, tokenizer, cfg, ["lora", *cfg.export.formats], out=out)
            written = report.outputs
            """),
        code("""
            # NBVAL_CHECK_OUTPUT
            for kind, path in written.items():
                files = sorted(p.name for p in Path(path).iterdir())
                print(f"{kind:<14} {path}: {', '.join(files)}")
            """),
        md("""
            ## Check that the merged model loads and stops

            Loaded back with plain transformers, no PEFT, and asked the prompt: the answer must end at the
            template's end-of-turn token, which the merged folder's generation config carries.
            """),
        code("""
            from transformers import AutoModelForCausalLM  # here, after choose_backend: Unsloth must come first

            merged_reply = None
            if "merged_16bit" in written:
                merged = AutoModelForCausalLM.from_pretrained(written["merged_16bit"], device_map=backend.device)
                merged_reply = chat(merged, tokenizer, template, [{"role": "user", "content": PROMPT}],
                                    max_new_tokens=MAX_NEW_TOKENS, stream=True)
                print(f"[stopped at the end of turn: {merged_reply.stopped}]")
            """),
        md("""
            ## Upload to the Hugging Face Hub

            Only when `HUB_REPO` names a repository (private unless `export.hub_private` is off), to the
            branch `export.hub_revision`. First a dry run shows the plan: every file that will be sent with
            its size, and what stays here (temporary files, GGUF files that failed their check). Then exactly
            those files go up in one commit. The token comes from the `HF_TOKEN` environment variable or the
            Colab secret of that name; it is never printed, and a plan with a file containing it is refused.
            """),
        code("""
            if cfg.export.push_to_hub:
                plan = push_folder(out, cfg.export.hub_repo, revision=cfg.export.hub_revision,
                                   private=cfg.export.hub_private, dry_run=True)  # no token, no network yet
                print(plan.table())
            """),
        code("""
            if cfg.export.push_to_hub:
                written["hub"] = push_plan(plan)
                print(written["hub"])
            """),
    ],
    results="""
        "written": written,
        "merged_reply": merged_reply.text if merged_reply else None,
        "merged_stopped": merged_reply.stopped if merged_reply else None,
        """,
)

NOTEBOOKS = [QUICKSTART, DATA, TRAIN, EVALUATE, EXPORT]
