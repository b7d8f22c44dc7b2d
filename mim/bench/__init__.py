"""``mim benchmark``: how fast mim trains, against the reference, on this machine.

See docs/benchmarks.md for the suites, the targets and recorded results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mim benchmark",
        description="Time mim's MAE training step against transformers' ViTMAEForPreTraining "
                    "(same architecture, batch and dtype), the input pipeline against "
                    "torchvision's ImageFolder, and the scaling with batch and image size.")
    p.add_argument("--suite", choices=["cpu", "gpu", "scaling"],
                   help="cpu: ViT-Ti/16 and ViT-S/16 fp32 + input pipeline + targets; gpu: "
                        "ViT-B/16 bf16 + input pipeline + targets; scaling: images/s and memory "
                        "against batch and image size. Without --suite: one step comparison at "
                        "the given config")
    p.add_argument("--config", "-c", help="YAML config (deltas over the defaults)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--modes", default="eager,compile", help="comma list of eager,compile")
    p.add_argument("--no-reference", action="store_true", help="time mim only")
    p.add_argument("--impls", default="", help="comma list of contenders for the single case "
                   "(default mim,reference; variants: mim-deviceguard, mim-gc, mim-whole, "
                   "mim-flash, mim-efficient, mim-cudnn)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (each contender once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per contender first")
    p.add_argument("--budget", type=float, default=None, help="stop timing after this many "
                   "seconds (at least 3 rounds)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", default="", help="scaling: batch sizes (default by device)")
    p.add_argument("--sizes", default="224,384,512", help="scaling: image sizes")
    p.add_argument("--size-batch", type=int, default=0, help="scaling: batch for the image-size "
                   "sweep (default: the smallest of --batches)")
    p.add_argument("--quick", action="store_true", help="a smoke run: few rounds (numbers are "
                   "not meaningful)")
    p.add_argument("--json", help="write the raw numbers here")
    p.add_argument("--markdown", help="write the report here")
    return p


def main(argv: list[str] | None = None) -> int:
    from mim.bench.suites import (
        bench_config,
        case_table,
        machine_line,
        run_scaling,
        run_step_case,
        run_suite,
        say,
        targets_table,
    )
    from mim.errors import ConfigError

    args = _parser().parse_args(argv)
    device = torch.device("cpu" if args.suite == "cpu" else args.device)
    if args.suite == "gpu" and device.type != "cuda" and not args.quick:
        print("mim: error: --suite gpu needs a CUDA device (for a smoke run elsewhere: --quick "
              "with small model overrides)", file=sys.stderr)
        return 2
    report: list[str] = []
    raw: dict = {}
    try:
        if args.suite in ("cpu", "gpu"):
            report, targets, raw = run_suite(args.suite, args.overrides, device, args.quick)
            table = ["## Targets", *targets_table(targets)]
            say("", *table)
            report += table
            raw["targets"] = [{"name": t.name, "value": t.value, "threshold": t.threshold,
                               "met": t.met} for t in targets]
        elif args.suite == "scaling":
            batches = [int(b) for b in args.batches.split(",") if b] or (
                [64, 128, 256] if device.type == "cuda" else [8, 16, 32])
            sizes = [int(s) for s in args.sizes.split(",") if s]
            overrides = ([] if args.config else _scaling_defaults(device)) + args.overrides
            report = [f"machine: {machine_line(device)}", ""]
            say(report[0])
            mode = args.modes.split(",")[0]
            lines, raw = run_scaling(overrides, device, batches, sizes,
                                     args.size_batch or min(batches), mode,
                                     rounds=2 if args.quick else args.rounds,
                                     budget_s=args.budget)
            report += lines
            say(*lines)
        else:
            cfg = bench_config(args.overrides, args.config)
            report = [f"machine: {machine_line(device)}", ""]
            say(report[0])
            impls = (tuple(args.impls.split(",")) if args.impls else
                     ("mim",) if args.no_reference else ("mim", "reference"))
            res = run_step_case(cfg, "MAE training step", device,
                                tuple(args.modes.split(",")), impls, warmup=args.warmup,
                                rounds=2 if args.quick else args.rounds, budget_s=args.budget,
                                matmul_size=512 if args.quick else 0)
            report += case_table(res)
            say(*case_table(res))
    except ConfigError as e:
        print(f"mim: error: {e}", file=sys.stderr)
        return 2
    if args.markdown:
        Path(args.markdown).write_text("\n".join(report) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2, default=str) + "\n")
    return 0


def _scaling_defaults(device: torch.device) -> list[str]:
    from mim.bench.suites import CPU_CASES, CPU_COMMON, GPU_CASE

    if device.type == "cuda":
        return [o for o in GPU_CASE if not o.startswith("data.batch_size")]
    return [o for o in CPU_COMMON if not o.startswith("data.batch_size")] + CPU_CASES["ViT-Ti/16"]
