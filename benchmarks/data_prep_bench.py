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
- sftlib again with `train_on="assistant"` (its default: the loss mask), unless `--no-assistant`;
- the second run: a new process loads the same conversations (saved with `save_to_disk`, as a second
  run loads the same files) and calls what `prepare_data` calls, `sftlib.data.encode_cache.cached_encode`,
  for both settings: it must reuse the rows the first runs saved (the cache folder is a fresh temporary one).
sftlib's runs go through `cached_encode` too, with that fresh folder: each is a first run, and the table
gives its encoding time (what the target is about) and, apart, the time it took to write the cache entry.
Before the timed runs each path runs once on 1,000 rows (imports, compiled templates, Rust's thread pool);
the floor is timed before and after sftlib's runs and their mean is the reference, since other jobs on a
shared machine change from minute to minute; beside the seconds, the CPU seconds of the process (all its
threads, and finished worker processes) are given, which such jobs disturb less.
Token sequences are compared on every row. Results: OUT/data_prep.json and OUT/data_prep.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
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


def cpu_seconds() -> float:
    """CPU time of this process (every thread) and of its finished children so far, user and system."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


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


def sftlib_path(ds, tokenizer, template, work: Path, train_on: str = "all", times: dict | None = None):
    """sftlib's path as `prepare_data` takes it, on a first run (nothing in `work/cache`): the rows.
    `times` (if given) gets the seconds of to_messages and of `cached_encode`'s key, encoding and cache write.
    The conversations are saved to `work/messages` and loaded back (not timed), so that this run and the
    second one encode the same dataset as loaded from disk (loading gives it its own fingerprint, the same
    each time, as loading the same data files does in two runs of `prepare_data`)."""
    import datasets

    from sftlib.data import to_messages
    from sftlib.data.encode_cache import cached_encode

    t0, c0 = time.perf_counter(), cpu_seconds()
    messages = to_messages(ds)
    t1, c1 = time.perf_counter(), cpu_seconds()
    if not (work / "messages").is_dir():
        messages.save_to_disk(str(work / "messages"))
    messages = datasets.load_from_disk(str(work / "messages"))
    stats: dict = {}
    c2 = cpu_seconds()
    out = cached_encode(messages, tokenizer, template, train_on=train_on, max_length=None, folder=work / "cache",
                        log=lambda _: None, stats=stats)
    c3 = cpu_seconds()
    assert not stats["reused"], "the first run found an entry in a fresh cache folder"
    if times is not None:
        times.update(to_messages=t1 - t0, encode=stats["key_seconds"] + stats["encode_seconds"],
                     save=stats["save_seconds"], cpu=(c1 - c0) + (c3 - c2))  # cpu: the cache write included
    return out


def second_run(folder: Path) -> int:
    """The second run, in its own process: the same conversations loaded from `folder/messages`, the same
    tokenizer built again; prints one JSON line with each setting's seconds and whether the cache was reused."""
    import datasets

    from sftlib.data.encode_cache import cached_encode

    tokenizer, template, _ = _tokenizer_and_template()
    messages = datasets.load_from_disk(str(folder / "messages"))
    result = {}
    for train_on in ("all", "assistant"):
        lines: list[str] = []
        stats: dict = {}
        t0 = time.perf_counter()
        rows = cached_encode(messages, tokenizer, template, train_on=train_on, max_length=None, folder=folder / "cache",
                             log=lines.append, stats=stats)
        seconds = time.perf_counter() - t0
        result[train_on] = {"seconds": seconds, "reused": stats["reused"], "rows": len(rows), "log": lines,
                            "load_seconds": stats["load_seconds"], "key_seconds": stats["key_seconds"]}
    print(json.dumps(result))
    return 0


def tokenizer_alone(ds, tokenizer, template, chunk: int = 1024) -> tuple[float, float]:
    """(seconds, CPU seconds) the Rust tokenizer alone takes for the rendered texts, on every core (rendering
    not timed)."""
    from sftlib.data import to_messages
    from sftlib.data.encode import render

    texts = [render(template, tokenizer, m) for m in to_messages(ds)["messages"]]
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    t0, c0 = time.perf_counter(), cpu_seconds()
    for i in range(0, len(texts), chunk):
        tokenizer._tokenizer.encode_batch(texts[i: i + chunk], add_special_tokens=False)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    if before is None:
        del os.environ["TOKENIZERS_PARALLELISM"]
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = before
    return seconds, cpu


def _tokenizer_and_template():
    """(tokenizer, template, note): the Llama 3 tokenizer fitted to ChatML as training fits it."""
    from sftlib.data.templates import get_template
    from sftlib.training.tokenizer import prepare_tokenizer

    tokenizer, tok_note = llama3_tokenizer()
    template = get_template("chatml")

    class _NoModel:  # prepare_tokenizer's embedding resize needs a model; the benchmark has none
        config = type("C", (), {"pad_token_id": None})()
        generation_config = None

        def get_input_embeddings(self):
            return type("E", (), {"weight": type("W", (), {"shape": (10 ** 9,)})()})()

    prepare_tokenizer(_NoModel(), tokenizer, template)  # ChatML tokens added as single tokens, as in training
    tokenizer.chat_template = CHATML
    return tokenizer, template, tok_note


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--no-assistant", action="store_true", help="skip the train_on=assistant run of sftlib")
    p.add_argument("--no-article", action="store_true", help="skip the article's path")
    p.add_argument("--second-run", type=Path, help=argparse.SUPPRESS)  # the child process of the cached run
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets

    datasets.disable_caching()  # every run computes; no result of `datasets`' own cache is reused
    datasets.disable_progress_bars()
    if a.second_run is not None:
        return second_run(a.second_run)
    tokenizer, template, tok_note = _tokenizer_and_template()
    work = Path(tempfile.mkdtemp(prefix="data-prep-bench-"))
    start = time.perf_counter()
    ds = datasets.Dataset.from_list(conversations(a.rows, a.seed))
    made = time.perf_counter() - start

    # warm-up, not timed: imports, compiled templates, Rust's thread pool (each path then runs as it would
    # in a process that already did some work)
    warm = ds.select(range(min(1000, len(ds))))
    tokenizer_alone(warm, tokenizer, template)
    for train_on in ("all", "assistant"):
        sftlib_path(warm, tokenizer, template, work / "warm-up", train_on=train_on)
    loads = {"start": os.getloadavg()}
    steal_start = cpu_steal_seconds()
    t_article = art = c_article = None
    if not a.no_article:
        t0, c0 = time.perf_counter(), cpu_seconds()
        art = article_path(ds, tokenizer, a.num_proc)
        t_article, c_article = time.perf_counter() - t0, cpu_seconds() - c0
        loads["after_article"] = os.getloadavg()
    # the floor before and after sftlib's runs: the other jobs on the machine change from minute to minute
    floors = [tokenizer_alone(ds, tokenizer, template)]
    loads["after_tokenizer_alone"] = os.getloadavg()
    steps: dict = {}
    ours = sftlib_path(ds, tokenizer, template, work, times=steps)
    t_sftlib = steps["to_messages"] + steps["encode"]
    loads["after_sftlib_all"] = os.getloadavg()
    t_assistant, trained, steps_a = None, None, {}
    if not a.no_assistant:
        masked = sftlib_path(ds, tokenizer, template, work, train_on="assistant", times=steps_a)
        t_assistant = steps_a["to_messages"] + steps_a["encode"]
        loads["after_sftlib_assistant"] = os.getloadavg()
        assert masked["input_ids"][:] == ours["input_ids"][:], "train_on changed the tokens"
        labels = masked.data.column("labels").combine_chunks().flatten().to_numpy()
        trained = int((labels != -100).sum())
    floors.append(tokenizer_alone(ds, tokenizer, template))
    loads["after_tokenizer_alone_again"] = os.getloadavg()
    steal = None if steal_start is None else round(cpu_steal_seconds() - steal_start, 1)
    t_floor = sum(f[0] for f in floors) / len(floors)
    c_floor = sum(f[1] for f in floors) / len(floors)

    # the second run: another process, the same conversations (saved by the first) and settings
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--second-run", str(work)], env=env,
                           capture_output=True, text=True, check=False)
    if child.returncode != 0:
        raise SystemExit(f"the second run failed:\n{child.stderr[-3000:]}")
    second = json.loads(child.stdout.strip().splitlines()[-1])
    loads["after_second_run"] = os.getloadavg()
    import shutil

    shutil.rmtree(work, ignore_errors=True)

    s_ids = ours["input_ids"]
    same = sum(x == y for x, y in zip(art["input_ids"], s_ids)) if art is not None else None
    tokens = sum(len(x) for x in s_ids)
    ratio = 1.1
    r1 = lambda x: None if x is None else round(x, 1)  # noqa: E731
    result = {"rows": a.rows, "num_proc": a.num_proc, "num_proc_sftlib": None, "tokenizer": tok_note,
              "tokens": tokens, "mean_tokens_per_row": tokens / a.rows,
              "seconds_article": r1(t_article), "cpu_seconds_article": r1(c_article),
              "seconds_tokenizer_alone_runs": [r1(f[0]) for f in floors],
              "cpu_seconds_tokenizer_alone_runs": [r1(f[1]) for f in floors],
              "seconds_tokenizer_alone": r1(t_floor), "tokenizer_alone_tokens_per_s": round(tokens / t_floor),
              "seconds_sftlib": r1(t_sftlib), "seconds_sftlib_to_messages": r1(steps["to_messages"]),
              "seconds_sftlib_encode": r1(steps["encode"]), "seconds_sftlib_cache_write": r1(steps["save"]),
              "cpu_seconds_sftlib_with_cache_write": r1(steps["cpu"]),
              "seconds_sftlib_train_on_assistant": r1(t_assistant),
              "seconds_sftlib_train_on_assistant_cache_write": r1(steps_a.get("save")),
              "cpu_seconds_sftlib_train_on_assistant_with_cache_write": r1(steps_a.get("cpu")),
              "ratio_sftlib_to_floor": round(t_sftlib / t_floor, 3),
              "ratio_assistant_to_floor": None if t_assistant is None else round(t_assistant / t_floor, 3),
              "cpu_ratio_sftlib_to_floor": round(steps["cpu"] / c_floor, 3),
              "cpu_ratio_assistant_to_floor": round(steps_a["cpu"] / c_floor, 3) if steps_a else None,
              "second_run": second, "target_ratio": ratio, "target_cached_seconds": 5.0,
              "trained_tokens_train_on_assistant": trained, "rows_identical_to_article": same,
              "seconds_make_data": round(made, 1),
              "cpu": platform.processor() or platform.machine(), "cpus_visible": os.cpu_count(),
              "load_average_at_end": os.getloadavg(), "load_averages": loads, "cpu_steal_seconds": steal}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "data_prep.json").write_text(json.dumps(result, indent=2) + "\n")
    cmd = ("python benchmarks/data_prep_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()

    def row(name, seconds, cpu=None):
        return (f"| {name} | {seconds:.1f} | {a.rows / seconds:,.0f} | {seconds / t_floor:.2f}x | "
                + (" |" if cpu is None else f"{cpu:.1f} | {cpu / c_floor:.2f}x") + " |")

    rows = []
    if t_article is not None:
        rows.append(row(f"article: apply_chat_template to text, then tokenize (datasets.map, {a.num_proc} processes)",
                        t_article, c_article))
    rows += [row("floor: the Rust tokenizer alone on the rendered texts (encode_batch, every core), mean of "
                 + " and ".join(f"{f[0]:.1f} s" for f in floors), t_floor, c_floor),
             row("sftlib, train_on=all: to_messages + encode (render, tokenize, labels; 1 process, Rust on every "
                 "core)", t_sftlib, steps["cpu"]),
             f"| - of which to_messages (ShareGPT -> messages, every row checked) | {steps['to_messages']:.1f} | | | | |",
             f"| - then, apart: writing the cache entry (not in the seconds above; in the CPU seconds) | "
             f"{steps['save']:.1f} | | | | |"]
    if t_assistant is not None:
        rows += [row("sftlib, train_on=assistant (its default: loss mask on the replies)", t_assistant, steps_a["cpu"]),
                 f"| - then, apart: writing the cache entry | {steps_a['save']:.1f} | | | | |"]
    for train_on in ("all", "assistant"):
        if train_on in second and (train_on == "all" or t_assistant is not None):
            r = second[train_on]
            rows.append(row(f"second run (a new process), train_on={train_on}: "
                            + ("reused the cache" if r["reused"] else "NOT reused, encoded again"), r["seconds"]))
    met = t_sftlib <= ratio * t_floor and (t_assistant is None or t_assistant <= ratio * t_floor)
    cached_ok = all(r["reused"] and r["seconds"] <= 5.0 for r in second.values())
    md = ["# Data preparation speed (CPU)", "", f"Command: `{cmd}`", "",
          f"{a.rows:,} synthetic FineTome-like ShareGPT conversations, {tokens:,} tokens "
          f"({tokens / a.rows:.0f} per conversation), ChatML.",
          f"Tokenizer: {tok_note}.", "",
          "| path | seconds | rows/s | / floor | CPU seconds | CPU / floor's |", "|---|---:|---:|---:|---:|---:|",
          *rows, "",
          ("" if same is None else f"Identical token ids to the article's: {same:,} of {a.rows:,} rows. ")
          + ("" if trained is None else f"With train_on=assistant the same ids, {trained:,} of them trained."),
          f"Target: sftlib (both settings) <= {ratio}x the floor's seconds: {'met' if met else 'not met'}"
          + ("" if a.rows == 100_000 else f" (on {a.rows:,} rows; the target is stated for 100,000)")
          + f"; second run <= 5 s, reusing the cache: {'met' if cached_ok else 'not met'}. "
          + f"The Rust tokenizer alone ran at {tokens / t_floor:,.0f} tokens/s here.",
          "CPU seconds: user + system time of the benchmark process (all its threads) and of its finished "
          "worker processes, a measure the other jobs on the machine disturb less than the seconds.",
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
