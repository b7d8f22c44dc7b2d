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
    det = sub.add_parser("detect", help="detection fine-tuning (ViT + feature pyramid + RetinaNet)")
    det.add_argument("--config", "-c", help="YAML config (deltas over the defaults)")
    det.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. init=RUN_DIR")
    det.add_argument("--print-config", action="store_true",
                     help="print the resolved config and exit")
    ev = sub.add_parser("evaluate", help="re-evaluate a finished detection run")
    ev.add_argument("--run", required=True, help="the run directory")
    ev.add_argument("--split", default="", help="dataset split (default: the run's val split)")
    evd = sub.add_parser("evaluate-detections",
                         help="COCO metrics of any detector's results file, as one JSON object")
    evd.add_argument("--gt", required=True, help="COCO instances JSON (the ground truth)")
    evd.add_argument("--pred", required=True, help="COCO results JSON (a list of detections)")
    evd.add_argument("--score-thresh", type=float, default=0.3,
                     help="operating point of precision_50 / recall_50")
    evd.add_argument("--per-class", action="store_true", help="add per-class AP")
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
        if args.command == "detect":
            cfg = load_config(args.config, args.overrides, job="detect")
            if args.print_config:
                import yaml

                print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
                return 0
            from mim.engine.detect import detect

            detect(cfg)
            return 0
        if args.command == "evaluate":
            from mim.engine.detect import evaluate_run

            evaluate_run(args.run, args.split)
            return 0
        if args.command == "evaluate-detections":
            return _evaluate_detections(args)
    except ConfigError as e:
        print(f"mim: error: {e}", file=sys.stderr)
        return 2
    except (RunError, UnsafeCheckpoint) as e:
        print(f"mim: error: {e}", file=sys.stderr)
        return 1
    return 1


def _evaluate_detections(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from mim.metrics.detection import METRIC_KEYS, evaluate_files

    for flag, path in (("--gt", args.gt), ("--pred", args.pred)):
        if not Path(path).is_file():
            raise ConfigError(f"{flag}: no such file: {path}")
    try:
        out = evaluate_files(args.gt, args.pred, args.score_thresh)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"cannot evaluate {args.pred} against {args.gt}: {e}") from None
    keys = (*METRIC_KEYS, "per_class_ap") if args.per_class else METRIC_KEYS
    print(json.dumps({k: out[k] for k in keys}))
    return 0


def entry() -> None:
    sys.exit(main())
