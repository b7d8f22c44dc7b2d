"""``mim <command> --config FILE [key=value ...]``: parse, validate, hand over to an engine.

Every problem found before work starts (bad key, bad value, missing path) prints one line
``mim: error: ...`` and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys

from mim.config import ConfigError, RunError, load_config
from mim.engine.checkpoint import UnsafeCheckpoint


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mim", description="Masked image modeling on timm ViTs.")
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="self-supervised pretraining (MAE)")
    pre.add_argument("--config", "-c", help="YAML config (deltas over the defaults)")
    pre.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    pre.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    tok = sub.add_parser("tokenizer", help="train the visual tokenizer BEiT predicts (vq_tokenizer)")
    tok.add_argument("--config", "-c", help="YAML config (deltas over the defaults)")
    tok.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    tok.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
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
        if args.command == "tokenizer":
            cfg = load_config(args.config, args.overrides, job="pretrain")
            if args.print_config:
                import yaml

                print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
                return 0
            from mim.engine.tokenizer import train_tokenizer

            train_tokenizer(cfg)
            return 0
    except ConfigError as e:
        print(f"mim: error: {e}", file=sys.stderr)
        return 2
    except (RunError, UnsafeCheckpoint) as e:
        print(f"mim: error: {e}", file=sys.stderr)
        return 1
    return 1


def entry() -> None:
    sys.exit(main())
