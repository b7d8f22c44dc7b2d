"""The command lines of ``mim predict``, ``mim embed`` and ``mim export`` (``mim/cli.py`` adds
them to its parser and hands them over here)."""

from __future__ import annotations

import argparse

COMMANDS = ("predict", "embed", "export")


def _inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", nargs="+", required=True,
                   help="a folder (sub-folders included), a .txt list of paths, image files, a "
                        "save_to_disk/parquet set or a hub dataset name")
    p.add_argument("--split", default="", help="the split of a dataset with several")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=2, help="image decoding processes")


def add_commands(sub: argparse._SubParsersAction) -> None:
    pr = sub.add_parser("predict", help="a fine-tuned run's predictions on new images "
                                        "(classification CSV, detection COCO JSON + pictures)")
    pr.add_argument("--run", required=True, help="a finished fine-tuning or detection run")
    _inputs(pr)
    pr.add_argument("--out", required=True,
                    help="classifier: a .csv file; detector: a folder")
    pr.add_argument("--topk", type=int, default=5, help="classes per image (classifier)")
    pr.add_argument("--draw", action="store_true", help="detector: one picture per image")
    pr.add_argument("--score-thresh", type=float, default=0.5,
                    help="detector: the lowest score drawn")
    pr.add_argument("--labels", choices=("coco", "yolo", "hf"), default="",
                    help="detector: --images is a labeled detection set in this data.format; "
                         "score it as mim evaluate does")
    em = sub.add_parser("embed", help="one vector per image from the encoder of any init")
    em.add_argument("--init", required=True,
                    help="a mim run or weights file, an MAE/BEiT .pth, or timm:<name>")
    em.add_argument("--init-file", default="", help="local weights for timm:<name>")
    _inputs(em)
    em.add_argument("--out", required=True, help="a .parquet file")
    em.add_argument("--pool", choices=("avg", "token"), default="",
                    help="mean of the patch tokens or the class token (default: a fine-tuned "
                         "run's own pooling, else avg)")
    em.add_argument("overrides", nargs="*",
                    help="model.* keys for an init without a run (model.arch=..., "
                         "model.img_size=...)")
    ex = sub.add_parser("export", help="a run's model as ONNX or a timm folder, with a model "
                                       "card; optionally uploaded to the Hugging Face Hub")
    ex.add_argument("--run", required=True)
    ex.add_argument("--format", choices=("onnx", "timm"), required=True)
    ex.add_argument("--out", default="", help="the folder (default: <run>/export_<format>)")
    ex.add_argument("--push-to-hub", default="", metavar="REPO", help="a Hub model repo id")


def run_command(args: argparse.Namespace) -> int:
    if args.command == "predict":
        from mim.inference.predict import predict

        return predict(args.run, args.images, args.out, split=args.split,
                       batch_size=args.batch_size, num_workers=args.num_workers,
                       topk=args.topk, draw=args.draw, score_thresh=args.score_thresh,
                       labels_format=args.labels)
    if args.command == "embed":
        from mim.inference.embed import embed

        return embed(args.init, args.images, args.out, init_file=args.init_file, pool=args.pool,
                     split=args.split, batch_size=args.batch_size,
                     num_workers=args.num_workers, overrides=args.overrides)
    from mim.inference.export import export

    export(args.run, args.format, args.out or None, args.push_to_hub)
    return 0
