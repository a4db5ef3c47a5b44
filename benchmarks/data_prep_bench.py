"""Data preparation speed on the CPU: the article's path vs sftlib's, same conversations, same tokens out.

    python benchmarks/data_prep_bench.py                       # 100,000 conversations, 2 processes
    python benchmarks/data_prep_bench.py --rows 5000 --num-proc 2 --out /tmp/r

Data: synthetic FineTome-like ShareGPT conversations (fixed seed): an optional system turn, then 1-3
human/gpt exchanges, English-like words with lognormal turn lengths, about 600 Llama-3 tokens per
conversation on average.

Tokenizer: the real Llama 3 tokenizer, built offline from `shared/fixtures/tokenizers/llama3_tokenizer.model`
beside the checkout with transformers' TikTokenConverter (Llama 3's pre-tokenizer pattern and its 256
special tokens). Where that file is absent, a byte-level BPE trained on the synthetic text stands in,
and the report says so.

The paths, ChatML, the loss on every token (as in the article):
- article: `datasets.map` of `tokenizer.apply_chat_template(..., tokenize=False)` to a `text` column,
  then a second `map` tokenizing the text (what TRL's SFTTrainer does with a `text` dataset), with
  `--num-proc` processes;
- sftlib: `sftlib.data.to_messages` (ShareGPT -> messages, every row checked) and
  `sftlib.data.encode.encode_dataset` (render, tokenize, loss mask) as the pipeline calls them: one process,
  in which the Rust tokenizer uses every core;
- the floor: the Rust tokenizer alone (`encode_batch`, every core) on the rendered texts, which any
  path that produces these tokens with this tokenizer has to pay;
- sftlib again with `train_on="assistant"` (its default: the loss mask needs character offsets and a
  render of every prompt), unless `--no-assistant`.
Token sequences are compared on every row. Results: OUT/data_prep.json and OUT/data_prep.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python benchmarks/data_prep_bench.py` from a checkout, sftlib not installed
FIXTURE = REPO.parent / "shared" / "fixtures" / "tokenizers" / "llama3_tokenizer.model"
# Llama 3's pre-tokenizer pattern (from its tokenizer.json / tiktoken setup).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
WORDS = ("the of and to in is that for it as with was on be by this are from or an at which can have not but "
         "their more one all also has were its these other into time than only such how when may some two first "
         "use data model energy water system between each process used many people number different function "
         "example value form important because light change however result second within through cells growth "
         "theory equation code python list return variable algorithm network learning temperature pressure "
         "history culture economy market policy language country government region species protein structure "
         "reaction solution problem answer question explain describe calculate analysis effect increase").split()
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
          "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")


def _sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    text = words[0].capitalize()
    for i, w in enumerate(words[1:], 1):
        if i % rng.randint(8, 16) == 0:
            text += rng.choice([".", ",", ";", "?"])
            w = w.capitalize() if text.endswith((".", "?")) else w
        text += " " + w
    return text + "."


def conversations(n: int, seed: int = 0) -> list[dict]:
    """`n` ShareGPT rows: ~600 Llama-3 tokens each on average (about 1.1 tokens per word here)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        turns = []
        if rng.random() < 0.2:
            turns.append({"from": "system", "value": _sentence(rng, rng.randint(8, 30))})
        for _ in range(rng.choice([1, 1, 2, 3])):
            turns.append({"from": "human", "value": _sentence(rng, max(3, int(rng.lognormvariate(math.log(45), 0.8))))})
            turns.append({"from": "gpt", "value": _sentence(rng, max(3, int(rng.lognormvariate(math.log(200), 0.7))))})
        rows.append({"conversations": turns})
    return rows


def cpu_steal_seconds() -> float | None:
    """CPU time the hypervisor gave to other machines so far (Linux /proc/stat), None where unknown."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def llama3_tokenizer():
    """(tokenizer, description): the real Llama 3 tokenizer if the fixture is there, else a stand-in BPE."""
    from transformers import PreTrainedTokenizerFast

    if FIXTURE.is_file():
        from transformers.convert_slow_tokenizer import TikTokenConverter

        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
        specials += [f"<|reserved_special_token_{i}|>" for i in range(3, 256 - 8)]
        class Converter(TikTokenConverter):
            @staticmethod
            def load_tiktoken_bpe(path: str) -> dict[bytes, int]:  # the file format, without needing tiktoken
                import base64

                lines = Path(path).read_text().split("\n")
                return {base64.b64decode(tok): int(rank) for tok, rank in (ln.split() for ln in lines if ln)}

        tok = Converter(vocab_file=str(FIXTURE), pattern=LLAMA3_PATTERN, extra_special_tokens=specials).converted()
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", 128000)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                       eos_token="<|end_of_text|>", pad_token="<|finetune_right_pad_id|>")
        return fast, f"Llama 3 (tiktoken BPE, {len(fast)} tokens) built offline from llama3_tokenizer.model"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_model import build_tokenizer

    texts = [t["value"] for row in conversations(2000, seed=1) for t in row["conversations"]]
    return build_tokenizer(texts, trained_vocab=8000), \
        "stand-in byte-level BPE (8,000 merges-vocabulary, padded to 128,256): the Llama 3 tokenizer file was not found"


def article_path(ds, tokenizer, num_proc: int):
    """The article: ShareGPT -> ChatML text with apply_chat_template, then tokenize the text."""
    roles = {"system": "system", "human": "user", "gpt": "assistant"}

    def to_text(batch):
        texts = []
        for convo in batch["conversations"]:
            messages = [{"role": roles[t["from"]], "content": t["value"]} for t in convo]
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        return {"text": texts}

    text = ds.map(to_text, batched=True, num_proc=num_proc, remove_columns=ds.column_names)
    return text.map(lambda b: tokenizer(b["text"]), batched=True, num_proc=num_proc, remove_columns=["text"])


def sftlib_path(ds, tokenizer, template, num_proc: int | None = None, train_on: str = "all", times: dict | None = None):
    """sftlib's path; `times` (if given) gets the seconds of its two steps."""
    from sftlib.data import to_messages
    from sftlib.data import encode_dataset

    t0 = time.perf_counter()
    messages = to_messages(ds)
    t1 = time.perf_counter()
    out = encode_dataset(messages, tokenizer, template, train_on=train_on, max_length=None, num_proc=num_proc)
    if times is not None:
        times.update(to_messages=t1 - t0, encode_dataset=time.perf_counter() - t1)
    return out


def tokenizer_alone(ds, tokenizer, template, chunk: int = 1024) -> float:
    """Seconds the Rust tokenizer alone takes for the rendered texts, on every core (rendering not timed)."""
    from sftlib.data import to_messages
    from sftlib.data.encode import render

    texts = [render(template, tokenizer, m) for m in to_messages(ds)["messages"]]
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    t0 = time.perf_counter()
    for i in range(0, len(texts), chunk):
        tokenizer._tokenizer.encode_batch(texts[i: i + chunk], add_special_tokens=False)
    seconds = time.perf_counter() - t0
    if before is None:
        del os.environ["TOKENIZERS_PARALLELISM"]
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = before
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--no-assistant", action="store_true", help="skip the train_on=assistant run of sftlib")
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets

    from sftlib.training.tokenizer import prepare_tokenizer
    from sftlib.data.templates import get_template

    datasets.disable_caching()  # every run computes; no cached result is reused
    datasets.disable_progress_bars()
    tokenizer, tok_note = llama3_tokenizer()
    template = get_template("chatml")

    class _NoModel:  # prepare_tokenizer's embedding resize needs a model; the benchmark has none
        config = type("C", (), {"pad_token_id": None})()
        generation_config = None

        def get_input_embeddings(self):
            return type("E", (), {"weight": type("W", (), {"shape": (10 ** 9,)})()})()

    prepare_tokenizer(_NoModel(), tokenizer, template)  # ChatML tokens added as single tokens, as in training
    tokenizer.chat_template = CHATML
    start = time.perf_counter()
    ds = datasets.Dataset.from_list(conversations(a.rows, a.seed))
    made = time.perf_counter() - start

    loads = {"start": os.getloadavg()}
    steal_start = cpu_steal_seconds()
    t0 = time.perf_counter()
    art = article_path(ds, tokenizer, a.num_proc)
    t_article = time.perf_counter() - t0
    loads["after_article"] = os.getloadavg()
    steps: dict = {}
    t0 = time.perf_counter()
    ours = sftlib_path(ds, tokenizer, template, times=steps)
    t_sftlib = time.perf_counter() - t0
    loads["after_sftlib"] = os.getloadavg()
    t_floor = tokenizer_alone(ds, tokenizer, template)
    loads["after_tokenizer_alone"] = os.getloadavg()
    t_assistant, trained = None, None
    if not a.no_assistant:
        t0 = time.perf_counter()
        masked = sftlib_path(ds, tokenizer, template, train_on="assistant")
        t_assistant = time.perf_counter() - t0
        loads["after_assistant"] = os.getloadavg()
        assert masked["input_ids"][:] == ours["input_ids"][:], "train_on changed the tokens"
        labels = masked.data.column("labels").combine_chunks().flatten().to_numpy()
        trained = int((labels != -100).sum())

    steal = None if steal_start is None else round(cpu_steal_seconds() - steal_start, 1)
    a_ids, s_ids = art["input_ids"], ours["input_ids"]
    same = sum(x == y for x, y in zip(a_ids, s_ids))
    tokens = sum(len(x) for x in s_ids)
    target = 60.0
    result = {"rows": a.rows, "num_proc": a.num_proc, "num_proc_sftlib": None, "tokenizer": tok_note,
              "tokens": tokens, "mean_tokens_per_row": tokens / a.rows, "seconds_article": round(t_article, 1),
              "seconds_sftlib": round(t_sftlib, 1), "seconds_sftlib_to_messages": round(steps["to_messages"], 1),
              "seconds_sftlib_encode_dataset": round(steps["encode_dataset"], 1),
              "seconds_tokenizer_alone": round(t_floor, 1), "tokenizer_alone_tokens_per_s": round(tokens / t_floor),
              "seconds_sftlib_train_on_assistant": None if t_assistant is None else round(t_assistant, 1),
              "trained_tokens_train_on_assistant": trained, "target_seconds": target,
              "target_met": t_sftlib <= target if a.rows == 100_000 else None, "rows_identical": same,
              "seconds_make_data": round(made, 1),
              "cpu": platform.processor() or platform.machine(), "cpus_visible": os.cpu_count(),
              "load_average_at_end": os.getloadavg(), "load_averages": loads, "cpu_steal_seconds": steal}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "data_prep.json").write_text(json.dumps(result, indent=2) + "\n")
    cmd = ("python benchmarks/data_prep_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    rows = [f"| article: apply_chat_template to text, then tokenize (datasets.map, {a.num_proc} processes) | "
            f"{t_article:.1f} | {a.rows / t_article:,.0f} |",
            f"| sftlib: to_messages + encode_dataset (render, tokenize, mask; 1 process, Rust on every core) | "
            f"{t_sftlib:.1f} | {a.rows / t_sftlib:,.0f} |",
            f"| - of which to_messages (ShareGPT -> messages, every row checked) | {steps['to_messages']:.1f} | |",
            f"| - of which encode_dataset | {steps['encode_dataset']:.1f} | |",
            f"| floor: the Rust tokenizer alone on the rendered texts (encode_batch, every core) | {t_floor:.1f} | "
            f"{a.rows / t_floor:,.0f} |"]
    if t_assistant is not None:
        rows.append(f"| sftlib with train_on=assistant (its default: offsets, prompt renders, masks) | "
                    f"{t_assistant:.1f} | {a.rows / t_assistant:,.0f} |")
    md = ["# Data preparation speed (CPU)", "", f"Command: `{cmd}`", "",
          f"{a.rows:,} synthetic FineTome-like ShareGPT conversations, {tokens:,} tokens "
          f"({tokens / a.rows:.0f} per conversation), ChatML, loss on all tokens.",
          f"Tokenizer: {tok_note}.", "",
          "| path | seconds | rows/s |", "|---|---:|---:|", *rows,
          "", f"Identical token ids: {same:,} of {a.rows:,} rows."
          + ("" if trained is None else f" With train_on=assistant the same ids, {trained:,} of them trained."),
          (f"Target (100,000 rows): sftlib <= {target:.0f} s: {'met' if t_sftlib <= target else 'not met'}. "
           if a.rows == 100_000 else "The 60 s target is for 100,000 rows. ")
          + f"The Rust tokenizer alone ran at {tokens / t_floor:,.0f} tokens/s here.",
          f"Machine: {os.cpu_count()} CPUs visible; load average (1 min) at the start {loads['start'][0]:.1f}, "
          + ", ".join(f"{k.replace('_', ' ')} {v[0]:.1f}" for k, v in loads.items() if k != "start")
          + " (shared with other jobs: times are upper bounds)"
          + ("" if steal is None else f"; CPU time taken by the hypervisor during the timed runs: {steal:.1f} s") + ".",
          ""]
    (a.out / "data_prep.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
