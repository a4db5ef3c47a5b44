"""Command line: `python -m sftlib demo | train | preflight`.

    python -m sftlib demo                                  # the offline CPU demo
    python -m sftlib train --config run.yaml               # a run from a YAML (or JSON) config
    python -m sftlib train --preset colab-t4 --set lora.r=32 --set train.max_steps=60
    python -m sftlib config --preset article               # print a resolved config as YAML
"""

from __future__ import annotations

import argparse
import sys


def _config(args):
    from sftlib.config import RunConfig

    if args.config:
        cfg = RunConfig.from_yaml(args.config)
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
    if argv[:1] == ["demo"]:
        from sftlib.demo import main as demo_main

        return demo_main(argv[1:])
    args = parser.parse_args(argv)
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
    from sftlib.pipeline import run

    run(cfg)
    return 0
