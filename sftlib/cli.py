"""Command line: `python -m sftlib demo | train | config | export | preflight | push`.

    python -m sftlib demo                                  # the offline CPU demo
    python -m sftlib train --config run.yaml               # a run from a YAML (or JSON) config
    python -m sftlib train --preset colab-t4 --set lora.r=32 --set train.max_steps=60
    python -m sftlib config --preset article               # print a resolved config as YAML
    python -m sftlib export --model model/lora --formats lora,merged_16bit,gguf:q4_k_m --out exported
    python -m sftlib export --config run.yaml --model model/lora   # export.formats of the config, each verified
    python -m sftlib preflight --config run.yaml --gpu T4  # checks without loading weights; exit 1 if fatal
    python -m sftlib push --folder model --repo me/my-model --dry-run   # what would be uploaded; no token needed
    python -m sftlib push --folder model --repo me/my-model [--revision v1] [--public]   # show it, then upload
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _config(args):
    from sftlib.config import RunConfig

    if args.config:
        load = RunConfig.from_json if args.config.lower().endswith(".json") else RunConfig.from_yaml
        cfg = load(args.config)
    else:
        cfg = RunConfig.preset(args.preset) if args.preset else RunConfig()
    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        import yaml

        overrides[key.strip()] = yaml.safe_load(value)
    return cfg.with_overrides(overrides) if overrides else cfg


def _add_config_args(p):
    p.add_argument("--config", help="YAML or JSON run config")
    p.add_argument("--preset", help="start from a preset: article, colab-t4, colab-a100, h100, cpu-demo")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one field, e.g. lora.r=32")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m sftlib", description="Supervised fine-tuning, hard to get wrong.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="fine-tune the embedded tiny model offline on the CPU", add_help=False)
    p_train = sub.add_parser("train", help="run the whole flow from a config")
    _add_config_args(p_train)
    p_cfg = sub.add_parser("config", help="print the resolved config as YAML (and check it)")
    _add_config_args(p_cfg)
    p_pre = sub.add_parser("preflight", help="check data, loss mask, tokenizer and memory without loading the "
                                             "weights; exit status 1 on a fatal finding")
    _add_config_args(p_pre)
    p_pre.add_argument("--gpu", help="GPU to check the memory against: T4, A100, H100 or a size in GiB "
                                     "(default: the preset's GPU, or the one in this machine)")
    p_pre.add_argument("--rows", type=int, default=2000, help="rows to check (a seeded sample; default 2000)")
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
    if argv[:1] == ["demo"]:
        from sftlib.demo import main as demo_main

        return demo_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "push":  # no run config: a folder and a repository are all it needs
        return _push(args)
    from sftlib.config import ConfigError

    try:
        cfg = _config(args)
        cfg.validate()
    except ConfigError as exc:
        print(f"config error:\n{exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(cfg.to_yaml(), end="")
        return 0
    from sftlib.hub import redact, redact_logging
    from sftlib.pipeline import run

    redact_logging()
    try:
        if args.command == "preflight":
            from sftlib.preflight import preflight_from_config

            gpu = float(args.gpu) if args.gpu and args.gpu.replace(".", "", 1).isdigit() else args.gpu
            report = preflight_from_config(cfg, gpu=gpu, sample=args.rows)
            print(redact(report.to_ansi() if sys.stdout.isatty() else report.to_text()))
            return 1 if report.fatal else 0
        if args.command == "export":
            from sftlib.exporter import export, load_for_export

            given = args.config or args.preset or args.set
            model, tokenizer, cfg = load_for_export(args.model, cfg if given else None)
            if args.template:
                cfg = cfg.with_overrides({"model.chat_template": args.template})
            export(model, tokenizer, cfg, args.formats, out=args.out, verify=not args.no_verify,
                   pre_tokenizer=args.pre_tokenizer, log=lambda line: print(redact(line)))
        else:
            run(cfg, log=lambda line: print(redact(line)))
    except Exception as exc:
        if not _user_error(exc):
            raise
        # sftlib's own errors already say what is wrong and what to do: no traceback through the dependencies
        print(f"error: {redact(exc)}", file=sys.stderr)
        return 2
    return 0


def _push(args) -> int:
    """`push`: print the upload plan; unless --dry-run, upload exactly it. Exit 2 with one line on a HubError."""
    from sftlib.hub import HubError, push_plan, redact, redact_logging, upload_plan

    redact_logging()
    try:
        plan = upload_plan(args.folder, args.repo, revision=args.revision, private=not args.public)
        print(plan.table())
        if args.dry_run:
            print("dry run: nothing was uploaded")
            return 0
        print(f"uploaded to {push_plan(plan)}")
    except HubError as exc:
        print(f"error: {redact(exc)}", file=sys.stderr)
        return 2
    return 0


def _user_error(exc: BaseException) -> bool:
    """An error class of sftlib's own, or a ValueError that sftlib's code raised: a problem with the input."""
    if type(exc).__module__.startswith("sftlib."):
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    package = Path(__file__).resolve().parent
    return isinstance(exc, ValueError) and tb is not None and \
        Path(tb.tb_frame.f_code.co_filename).resolve().parent == package
