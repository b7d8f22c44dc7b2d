"""``mim <command> --config FILE [key=value ...]``: parse, validate, hand over to an engine.

Every problem found before work starts (bad key, bad value, missing path) prints one line
``mim: error: ...`` and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys

from mim.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mim", description="Masked image modeling on timm ViTs.")
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="self-supervised pretraining (MAE)")
    pre.add_argument("--config", "-c", help="YAML config (deltas over the defaults)")
    pre.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    pre.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ft = sub.add_parser("finetune", help="fine-tune a classifier from an encoder checkpoint")
    ft.add_argument("--config", "-c", help="YAML config (deltas over the defaults)")
    ft.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. init=RUN_DIR")
    ft.add_argument("--print-config", action="store_true",
                    help="print the resolved config and exit")
    ev = sub.add_parser("evaluate", help="re-evaluate the best checkpoint of a fine-tuning run")
    ev.add_argument("--run", required=True, help="the fine-tuning run directory")
    ev.add_argument("--split", default="", help="dataset split (default: the run's val split)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "pretrain":
            cfg = load_config(args.config, args.overrides, job="pretrain")
            if args.print_config:
                import yaml

                print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
                return 0
            from mim.engine.pretrain import pretrain

            pretrain(cfg)
            return 0
        if args.command == "finetune":
            cfg = load_config(args.config, args.overrides, job="finetune")
            if args.print_config:
                import yaml

                print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
                return 0
            from mim.engine.finetune import finetune

            finetune(cfg)
            return 0
        if args.command == "evaluate":
            from mim.engine.evaluate import evaluate_run

            evaluate_run(args.run, args.split)
            return 0
    except ConfigError as e:
        print(f"mim: error: {e}", file=sys.stderr)
        return 2
    return 1


def entry() -> None:
    sys.exit(main())
