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
    sub.add_parser("benchmark", add_help=False,
                   help="training-step, input-pipeline and scaling benchmarks against references "
                        "(mim benchmark --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["benchmark"]:  # its own parser (mim/bench/__init__.py)
        from mim.bench import main as benchmark

        return benchmark(argv[1:])
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
    except ConfigError as e:
        print(f"mim: error: {e}", file=sys.stderr)
        return 2
    return 1


def entry() -> None:
    sys.exit(main())
