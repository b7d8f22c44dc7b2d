"""``mim <command> --config FILE [key=value ...]``: parse, validate, hand over to an engine.

Every problem found before work starts (bad key, bad value, missing path) prints one line
``mim: error: ...`` and exits with code 2; a run stopped by a guard (bad data, divergence, an
unsafe checkpoint) prints one line and exits with code 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import yaml

from mim.checkpoint import CheckpointError
from mim.config import ConfigError, RunError, finetune_task, load_config
from mim.inference.commands import COMMANDS as INFERENCE_COMMANDS
from mim.inference.commands import add_commands as add_inference_commands

# command -> (config schema, "module:function" run with the validated config, help)
CONFIG_COMMANDS = {
    "pretrain": ("pretrain", "mim.engine.pretrain:pretrain",
                 "self-supervised pretraining (MAE, SimMIM, MaskFeat, BEiT, supervised)"),
    "tokenizer": ("pretrain", "mim.engine.tokenizer:train_tokenizer",
                  "train the visual tokenizer BEiT predicts (vq_tokenizer)"),
    "finetune": ("finetune", "mim.engine.finetune:finetune",
                 "fine-tune from an encoder checkpoint (init=...): classification, or detection "
                 "for a config with 'task: detect'"),
    "detect": ("detect", "mim.engine.detect:detect",
               "detection fine-tuning (ViT + feature pyramid + RetinaNet)"),
    "compare": ("compare", "mim.engine.compare:compare",
                "fine-tune every init x label fraction x seed and write one report"),
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
    knn = sub.add_parser("knn", help="k-NN top-1 of an init's frozen encoder on a labeled set "
                                     "(one JSON line)")
    knn.add_argument("--init", required=True, help="a mim run or file, MAE/BEiT .pth, timm:<name>")
    knn.add_argument("--init-file", default="", help="local weights for --init timm:<name>")
    knn.add_argument("--data", required=True,
                     help="a folder (train/ and val/ of class sub-folders), a dataset, or "
                          "'synthetic'; without a val split a stratified hold-out is probed")
    knn.add_argument("overrides", nargs="*", help="dotted key=value overrides (model.*, data.*, "
                                                  "k, temperature, linear_epochs, seed)")
    ev = sub.add_parser("evaluate", help="re-evaluate a finished fine-tuning or detection run")
    ev.add_argument("--run", required=True, help="the run directory")
    ev.add_argument("--split", default="", help="dataset split (default: the run's val split)")
    evd = sub.add_parser("evaluate-detections",
                         help="COCO metrics of any detector's results file, as one JSON object")
    evd.add_argument("--gt", required=True, help="COCO instances JSON (the ground truth)")
    evd.add_argument("--pred", required=True, help="COCO results JSON (a list of detections)")
    evd.add_argument("--score-thresh", type=float, default=0.3,
                     help="operating point of precision_50 / recall_50")
    evd.add_argument("--per-class", action="store_true", help="add per-class AP")
    add_inference_commands(sub)
    return p


def _run(args: argparse.Namespace) -> int:
    if args.command in CONFIG_COMMANDS:
        command = args.command
        if command == "finetune" and finetune_task(args.config, args.overrides) == "detect":
            command = "detect"
        job, target, _ = CONFIG_COMMANDS[command]
        cfg = load_config(args.config, args.overrides, job=job)
        if args.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        module, func = target.split(":")
        getattr(importlib.import_module(module), func)(cfg)
        return 0
    if args.command == "evaluate":
        if finetune_task(Path(args.run) / "config.yaml", []) == "detect":
            from mim.engine.detect import evaluate_run
        else:
            from mim.engine.evaluate import evaluate_run
        evaluate_run(args.run, args.split)
        return 0
    if args.command == "knn":
        from mim.engine.knn import knn_command

        knn_command(args.init, args.data, args.init_file, args.overrides)
        return 0
    if args.command == "evaluate-detections":
        return _evaluate_detections(args)
    if args.command in INFERENCE_COMMANDS:
        from mim.inference.commands import run_command

        return run_command(args)
    return 1


def _evaluate_detections(args: argparse.Namespace) -> int:
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["benchmark"]:  # its own parser (mim/bench/__init__.py)
        from mim.bench import main as benchmark

        return benchmark(argv[1:])
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except ConfigError as e:
        print(f"mim: error: {one_line(e)}", file=sys.stderr)
        return 2
    except (RunError, CheckpointError) as e:
        print(f"mim: error: {one_line(e)}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # a collective whose peers are gone: one line, not N tracebacks
        from mim.engine.distributed import lost_peer

        lost = lost_peer(e)
        if lost is None:
            raise
        print(f"mim: error: {lost}", file=sys.stderr)
        return 1
    finally:
        _end_process_group()


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line. An error raised in a data-loader worker comes back
    wrapped in the worker's traceback, whose last line is ``module.Class: message``."""
    text = str(e).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


def _end_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def entry() -> None:
    sys.exit(main())
