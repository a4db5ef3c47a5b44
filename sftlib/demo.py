"""The embedded demo: a real fine-tune, offline, on the CPU, in about two minutes.

    python -m sftlib demo                 # or: make demo

It runs the same `pipeline.run` as any other run, with the `cpu-demo` preset: a tiny Llama (about
0.4 M parameters, random weights) and a byte-level BPE tokenizer trained on the bundled data are
built into the cache folder and loaded from there with `from_pretrained`; the bundled ShareGPT
dataset (short reviews labelled positive or negative, `sftlib/demo_data/`) is rendered with ChatML,
which adds `<|im_start|>`/`<|im_end|>` to the vocabulary; LoRA is trained with packing; and the
held-out rows, which the model never saw, show whether it learned:

- held-out loss and perplexity on the assistant tokens, before and after;
- exact-answer accuracy on held-out conversations (greedy reply equal to the reference *and* ending
  on `<|im_end|>`), before and after, with a few answers side by side.
"""

from __future__ import annotations

import time


def main(argv: list[str] | None = None) -> int:
    import argparse

    from sftlib.config import RunConfig

    parser = argparse.ArgumentParser(prog="python -m sftlib demo", description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="outputs/demo", help="folder for checkpoints, adapters and the merged model")
    parser.add_argument("--epochs", type=float, default=None, help="override `train.epochs`")
    parser.add_argument("--samples", type=int, default=60, help="held-out conversations answered before and after")
    args = parser.parse_args(argv)

    overrides = {"train.output_dir": args.output, "export.output_dir": f"{args.output}/model"}
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    cfg = RunConfig.preset("cpu-demo").with_overrides(overrides)
    from sftlib.pipeline import run

    start = time.perf_counter()
    result = run(cfg, answer_samples=args.samples, show_answers=6)
    took = time.perf_counter() - start
    print()
    print("demo summary")
    print(f"  held-out loss        {result.before['loss']:.3f} -> {result.after['loss']:.3f}")
    print(f"  held-out perplexity  {result.before['perplexity']:.1f} -> {result.after['perplexity']:.2f}")
    print(f"  exact answers        {result.accuracy_before:.0%} -> {result.accuracy_after:.0%}"
          f" of {args.samples} held-out conversations")
    for name, path in result.outputs.items():
        print(f"  {name:<20} {path}")
    print(f"  total time           {took:.0f} s")
    return 0
