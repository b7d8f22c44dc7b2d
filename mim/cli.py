"""``mim <command> --config FILE [key=value ...]``: parse, validate, hand over to an engine.

Every problem found before work starts (bad key, bad value, missing path) prints one line
``mim: error: ...`` and exits with code 2; a run stopped by a guard (bad data, divergence, an
unsafe checkpoint) prints one line and exits with code 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mim.config import ConfigError, RunError, load_config
from mim.engine.checkpoint import UnsafeCheckpoint

# command -> (config schema, "module:function" run with the validated config, help)
CONFIG_COMMANDS = {
    "pretrain": ("pretrain", "mim.engine.pretrain:pretrain",
                 "self-supervised pretraining (MAE, SimMIM, MaskFeat, BEiT)"),
    "tokenizer": ("pretrain", "mim.engine.tokenizer:train_tokenizer",
                  "train the visual tokenizer BEiT predicts (vq_tokenizer)"),
    "finetune": ("finetune", "mim.engine.finetune:finetune",
                 "fine-tune a classifier from an encoder checkpoint (init=...)"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mim", description="Masked image modeling on timm ViTs.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (_, _, help_text) in CONFIG_COMMANDS.items():
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--config", "-c", help="YAML config (deltas over the defaults)")
        c.add_argument("overrides", nargs="*", help="dotted key=value overrides")
        c.add_argument("--print-config", action="store_true",
                       help="print the resolved config and exit")
    sub.add_parser("benchmark", add_help=False,
                   help="training-step, input-pipeline and scaling benchmarks against references "
                        "(mim benchmark --help)")
    ev = sub.add_parser("evaluate", help="re-evaluate the best checkpoint of a fine-tuning run")
    ev.add_argument("--run", required=True, help="the fine-tuning run directory")
    ev.add_argument("--split", default="", help="dataset split (default: the run's val split)")
    return p


def _run(args: argparse.Namespace) -> int:
    if args.command in CONFIG_COMMANDS:
        job, target, _ = CONFIG_COMMANDS[args.command]
        cfg = load_config(args.config, args.overrides, job=job)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        module, func = target.split(":")
        getattr(importlib.import_module(module), func)(cfg)
        return 0
    if args.command == "evaluate":
        from mim.engine.evaluate import evaluate_run

        evaluate_run(args.run, args.split)
        return 0
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["benchmark"]:  # its own parser (mim/bench/__init__.py)
        from mim.bench import main as benchmark

        return benchmark(argv[1:])
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except ConfigError as e:
        print(f"mim: error: {e}", file=sys.stderr)
        return 2
    except (RunError, UnsafeCheckpoint) as e:
        print(f"mim: error: {e}", file=sys.stderr)
        return 1


def entry() -> None:
    sys.exit(main())
