"""Malformed versions of every file a user hands mim, through the real CLI.

Each variant must end in exit 0 with the bad record listed in ``data_issues.jsonl``, or a non-zero
exit with one ``mim: error:`` line and no traceback, and leave every file outside the run
directory byte-identical. Most variants run in-process through ``mim.cli.main`` (a subprocess
costs seconds of imports); a few run as real subprocesses to prove the command-line path.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import json
import os
import struct
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mim.cli import main
from tests.conftest import REPO, TINY

NAN, INF = float("nan"), float("inf")
TINY_RUN = [a for a in TINY if not a.startswith("data.batch_size")] + [
    "data.batch_size=4", "train.epochs=1", "train.max_steps=1", "run.resume=none"]
TINY_FT = ["model.arch=vit_tiny_patch16_224", "model.img_size=32", "model.patch_size=8",
           "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "data.batch_size=4",
           "data.num_workers=0", "tracking.backend=none", "train.epochs=1", "train.max_steps=1",
           "run.resume=none"]
TINY_DET = ["task=detect", "model.arch=vit_tiny_patch16_224", "model.img_size=32",
            "model.patch_size=8", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
            "model.pyramid_dim=16", "model.pyramid_scales=[1,0.5]", "data.batch_size=2",
            "data.num_workers=0", "tracking.backend=none", "train.epochs=1", "run.resume=none",
            "data.val_split=train", "eval.vis_images=0"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


# ----------------------------------------------------------------------------- running


@dataclass
class Outcome:
    code: int
    err: str
    crash: str = ""


def run_mim(argv: list[str]) -> Outcome:
    """``mim <argv>`` in this process: its exit code and stderr, or the traceback it escaped
    with."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            _log_handlers_to(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - exactly what the suite looks for
            return Outcome(-1, err.getvalue(), traceback.format_exc())
    return Outcome(code, err.getvalue())


@contextlib.contextmanager
def _log_handlers_to(stream: io.StringIO):
    """Libraries' log handlers (datasets has its own) keep the stderr of when they were made: in
    a real CLI process that is the terminal; here an earlier test's capture, perhaps closed,
    which logging reports as a traceback of its own. Point them at this run's stderr."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    handlers = {h for lg in loggers for h in lg.handlers
                if type(h) is logging.StreamHandler}
    old = {h: h.stream for h in handlers}  # not setStream: it flushes the old, maybe closed, one
    for h in handlers:
        h.stream = stream
    try:
        yield
    finally:
        for h, s in old.items():
            h.stream = s


def tree_hashes(root: Path, skip: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and skip not in p.parents}


def problem(out: Outcome, expect: str, runs: Path) -> str:
    """'' when ``out`` is one of the two acceptable endings; else what is wrong."""
    if out.crash:
        return "traceback:\n" + out.crash[-1500:]
    if "Traceback (most recent call last)" in out.err:
        return "traceback on stderr:\n" + out.err[-1500:]
    # a progress bar redraws with \r: what follows it starts a line on the terminal
    lines = [ln for ln in out.err.replace("\r", "\n").splitlines()
             if ln.startswith("mim: error:")]
    if expect == "ok":
        return "" if out.code == 0 else f"expected exit 0, got {out.code}: {out.err[-800:]}"
    if expect == "error":
        if out.code == 0 or len(lines) != 1:
            return f"expected one 'mim: error:' line and a non-zero exit, got {out.code}: " \
                   f"{out.err[-800:]}"
        return ""
    if out.code != 0:
        return f"expected exit 0 with '{expect}' listed, got {out.code}: {out.err[-800:]}"
    listed = "".join(p.read_text() for p in runs.rglob("data_issues.jsonl"))
    return "" if expect in listed else f"'{expect}' not in data_issues.jsonl: {listed[:500]}"


def check_all(tmp_path: Path, cases: dict[str, tuple[Callable[[Path], list[str]], str]]) -> None:
    """Each case builds its files under ``tmp_path/<case>`` and returns the CLI arguments; runs
    go to ``<case>/runs``. Collects every failure, then fails once listing them."""
    failures = []
    for name, (build, expect) in cases.items():
        root = tmp_path / name
        root.mkdir()
        argv = build(root)
        runs = root / "runs"
        before = tree_hashes(root, runs)
        own_run = argv[0] in ("evaluate-detections", "evaluate") or any(
            a.startswith("run.output_dir=") for a in argv)
        out = run_mim(argv if own_run else [*argv, f"run.output_dir={runs}", "run.name=r"])
        why = problem(out, expect, runs)
        if tree_hashes(root, runs) != before:
            why += " | files outside the run directory changed"
        if why:
            failures.append(f"[{name}] {why}")
    assert not failures, "\n\n".join(failures)


# ----------------------------------------------------------------------------- writing inputs


def png(path: Path, size: int = 32, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def image_folder(root: Path, n: int = 8, classes: int = 0) -> Path:
    for i in range(n):
        sub = f"c{i % classes}/" if classes else ""
        png(root / f"{sub}img{i}.png", seed=i)
    return root


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


RANDOM = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
NOT_UTF8 = "model:\n  arch: vit_t\xe9\n".encode("latin-1")


# ----------------------------------------------------------------------------- configs


def config_case(text: bytes | str) -> Callable[[Path], list[str]]:
    """A pretraining config file over the tiny run's keys (those it sets itself left out)."""
    def build(root: Path) -> list[str]:
        cfg = write(root / "cfg.yaml", text)
        keys = [*TINY_RUN, "data.synthetic=true", "data.synthetic_size=8",
                f"run.output_dir={root / 'runs'}", "run.name=r"]
        body = text if isinstance(text, str) else ""
        keep = [k for k in keys if f" {k.split('=')[0].split('.')[-1]}:" not in body]
        return ["pretrain", "--config", str(cfg), *keep]
    return build


def test_malformed_configs(tmp_path):
    deep = "a: " + "[" * 50_000 + "]" * 50_000 + "\n"
    check_all(tmp_path, {
        "empty file is the defaults": (config_case(""), "ok"),
        "not UTF-8": (config_case(NOT_UTF8), "error"),
        "random bytes": (config_case(RANDOM), "error"),
        "not YAML": (config_case("model: [1, 2\n"), "error"),
        "a list, not sections": (config_case("- model\n"), "error"),
        "a section that is a number": (config_case("model: 3\n"), "error"),
        "a string for an int": (config_case("data:\n  num_examples: many\n"), "error"),
        "a list for a float": (config_case("optim:\n  lr: [1, 2]\n"), "error"),
        "NaN lr": (config_case("optim:\n  lr: .nan\n"), "error"),
        "inf weight decay": (config_case("optim:\n  weight_decay: .inf\n"), "error"),
        "inf beta": (config_case("optim:\n  betas: [0.9, .inf]\n"), "error"),
        "NaN mask ratio": (config_case("method:\n  mask_ratio: .nan\n"), "error"),
        "1e999 warmup": (config_case("optim:\n  min_lr: 1e999\n"), "error"),
        "a key twice": (config_case("optim:\n  lr: 0.1\noptim:\n  lr: 0.2\n"), "error"),
        "a nested key twice": (config_case("optim:\n  lr: 0.1\n  lr: 0.2\n"), "error"),
        "50k nested lists": (config_case(deep), "error"),
        "huge batch": (config_case("data:\n  batch_size: 1000000000000\n"), "error"),
        "huge image": (config_case("model:\n  img_size: 1048576\n"), "error"),
        "huge width": (config_case("model:\n  embed_dim: 10000000\n"), "error"),
        "huge depth": (config_case("model:\n  depth: 100000000\n"), "error"),
        "huge synthetic set": (config_case("data:\n  synthetic_size: 100000000000000\n"),
                               "error"),
        "arch not a ViT": (config_case("model:\n  arch: resnet18\n"), "error"),
        "arch unknown": (config_case("model:\n  arch: no_such_net\n"), "error"),
        "run name ..": (config_case("run:\n  name: ..\n"), "error"),
    })


def test_run_name_dot_dot_cannot_escape_output_dir(tmp_path):
    """The data-loss case of round two: run.name=.. wrote into the parent of run.output_dir."""
    parent = tmp_path / "mine"
    write(parent / "config.yaml", "mine: 1\n")
    write(parent / "metrics.jsonl", '{"step": 1}\n')
    before = tree_hashes(parent, tmp_path / "none")
    for name in ("..", ".", ""):
        out = run_mim(["pretrain", *TINY_RUN, "data.synthetic=true",
                       f"run.output_dir={parent / 'runs'}", f"run.name={name}"])
        assert problem(out, "error", parent) == "" and "'run.name'" in out.err
    assert tree_hashes(parent, tmp_path / "none") == before


def test_cli_subprocess_reports_bad_files_in_one_line(tmp_path):
    """The real command line: a config that is not UTF-8 and an init of random bytes."""
    cfg = write(tmp_path / "cfg.yaml", NOT_UTF8)
    init = write(tmp_path / "w.safetensors", RANDOM)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for argv in (["pretrain", "--config", str(cfg)],
                 ["finetune", *TINY_FT, "data.synthetic=true", f"init={init}",
                  f"run.output_dir={tmp_path / 'runs'}"]):
        r = subprocess.run([sys.executable, "-m", "mim", *argv], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("mim: error:")]
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
        assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- init files


def init_case(make: Callable[[Path], Path], *extra: str) -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        return ["finetune", *TINY_FT, "data.synthetic=true", "data.synthetic_size=16",
                f"init={make(root)}", *extra]
    return build


def _tiny_encoder_state() -> dict[str, torch.Tensor]:
    from mim.config import load_config
    from mim.models.encoder import create_vit

    return create_vit(load_config(None, TINY_FT + ["data.synthetic=true"], job="finetune").model
                      ).state_dict()


def test_malformed_init_files(tmp_path):
    good = {k: v for k, v in _tiny_encoder_state().items() if not k.startswith("head.")}
    good_bytes = None

    def safetensors_of(state: dict, name: str = "w.safetensors") -> Callable[[Path], Path]:
        def make(root: Path) -> Path:
            save_file({k: v.contiguous() for k, v in state.items()}, str(root / name))
            return root / name
        return make

    def torch_file(obj) -> Callable[[Path], Path]:
        def make(root: Path) -> Path:
            torch.save(obj, root / "w.pth")
            return root / "w.pth"
        return make

    def truncated(root: Path) -> Path:
        nonlocal good_bytes
        safetensors_of(good)(root)
        good_bytes = (root / "w.safetensors").read_bytes()
        return write(root / "w.safetensors", good_bytes[: len(good_bytes) // 2])

    renamed = {f"other.{k}": v for k, v in good.items()}
    nan = {**good, "cls_token": torch.full_like(good["cls_token"], NAN)}
    check_all(tmp_path, {
        "zero-byte .pth": (init_case(lambda r: write(r / "w.pth", b"")), "error"),
        "random .pth": (init_case(lambda r: write(r / "w.pth", RANDOM)), "error"),
        "zero-byte .safetensors": (init_case(lambda r: write(r / "w.safetensors", b"")), "error"),
        "random .safetensors": (init_case(lambda r: write(r / "w.safetensors", RANDOM)), "error"),
        "safetensors header claiming 2^60 bytes": (init_case(lambda r: write(
            r / "w.safetensors", struct.pack("<Q", 2**60) + b"{}")), "error"),
        "truncated .safetensors": (init_case(truncated), "error"),
        "text named .pth": (init_case(lambda r: write(r / "w.pth", "hello\n")), "error"),
        ".pth holding a list": (init_case(torch_file([1, 2, 3])), "error"),
        ".pth of a tensor": (init_case(torch_file(torch.ones(3))), "error"),
        "keys that match nothing": (init_case(safetensors_of(renamed)), "error"),
        "keys that match nothing, init_strict=false": (
            init_case(safetensors_of(renamed), "init_strict=false"), "ok"),
        "NaN weights": (init_case(safetensors_of(nan)), "error"),
        "a wrong shape": (init_case(safetensors_of({**good, "cls_token": torch.zeros(1, 1, 7)})),
                          "error"),
        "folder without weights": (init_case(lambda r: (r / "empty").mkdir() or r / "empty"),
                                   "error"),
        "the good file (control)": (init_case(safetensors_of(good)), "ok"),
    })


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("ckpt")
    assert main(["pretrain", *TINY_RUN, "data.synthetic=true", "data.synthetic_size=8",
                 "train.max_steps=0", "train.save_every=1", "train.keep_last=2",
                 f"run.output_dir={runs}", "run.name=src"]) == 0
    return runs / "src"


def test_malformed_checkpoints(tmp_path, finished_run):
    import shutil

    def resume_case(damage: Callable[[Path], None], auto: bool = False):
        def build(root: Path) -> list[str]:
            run = root / "runs" / "r"
            shutil.copytree(finished_run, run)
            newest = sorted((run / "checkpoints").iterdir())[-1]
            damage(newest)
            where = "auto" if auto else str(newest)
            return ["pretrain", *TINY_RUN, "data.synthetic=true", "data.synthetic_size=8",
                    f"run.output_dir={root / 'runs'}", "run.name=r", f"run.resume={where}",
                    "train.max_steps=0"]
        return build

    def cut(name: str) -> Callable[[Path], None]:
        return lambda ck: write(ck / name, (ck / name).read_bytes()[:100])

    def state(obj) -> Callable[[Path], None]:
        return lambda ck: torch.save(obj, ck / "state.pt")

    def every(damage):
        return lambda ck: [damage(c) for c in ck.parent.iterdir()]

    check_all(tmp_path, {
        "truncated state.pt": (resume_case(cut("state.pt")), "error"),
        "truncated model.safetensors": (resume_case(cut("model.safetensors")), "error"),
        "random state.pt": (resume_case(lambda ck: write(ck / "state.pt", RANDOM)), "error"),
        "state.pt of another version": (resume_case(state({"format_version": 99})), "error"),
        "state.pt without its keys": (resume_case(state({"format_version": 1})), "error"),
        "state.pt with a wrong loop": (resume_case(state(
            {"format_version": 1, "config": {}, "loop": {"step": "x", "bogus": 1},
             "optimizer": {}, "scheduler": {}})), "error"),
        "state.pt a list": (resume_case(state([1, 2])), "error"),
        "auto, newest truncated (falls back)": (resume_case(cut("state.pt"), auto=True), "ok"),
        "auto, every one truncated": (resume_case(every(cut("state.pt")), auto=True), "error"),
    })


# ----------------------------------------------------------------------------- predictions


GT = {"images": [{"id": 1, "width": 32, "height": 32}, {"id": 2, "width": 32, "height": 32}],
      "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10],
                       "area": 100, "iscrowd": 0},
                      {"id": 2, "image_id": 2, "category_id": 2, "bbox": [5, 5, 20, 8],
                       "area": 160, "iscrowd": 0}],
      "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
PRED = [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "score": 0.9},
        {"image_id": 2, "category_id": 2, "bbox": [5, 5, 20, 8], "score": 0.8}]


def _with(base, path: tuple, value):
    """A deep copy of ``base`` with the item at ``path`` replaced (or deleted for ...)."""
    obj = json.loads(json.dumps(base))
    *head, last = path
    target = obj
    for k in head:
        target = target[k]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return obj


def eval_case(gt=GT, pred=PRED) -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        files = []
        for name, obj in (("gt.json", gt), ("pred.json", pred)):
            raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
            files.append(write(root / name, raw))
        return ["evaluate-detections", "--gt", str(files[0]), "--pred", str(files[1])]
    return build


def test_malformed_predictions_and_ground_truth(tmp_path):
    big_segm = _with(PRED, (0, "segmentation"), {"size": [10**9, 10**9], "counts": "0"})
    check_all(tmp_path, {
        "good files (control)": (eval_case(), "ok"),
        "no detections": (eval_case(pred=[]), "ok"),
        "NaN score": (eval_case(pred=_with(PRED, (0, "score"), NAN)), "error"),
        "inf score": (eval_case(pred=_with(PRED, (1, "score"), INF)), "error"),
        "string score": (eval_case(pred=_with(PRED, (0, "score"), "0.9")), "error"),
        "no score": (eval_case(pred=_with(PRED, (0, "score"), ...)), "error"),
        "NaN in a box": (eval_case(pred=_with(PRED, (0, "bbox", 2), NAN)), "error"),
        "1e999 in a box": (eval_case(pred=b'[{"image_id": 1, "category_id": 1, '
                                          b'"bbox": [1, 1, 1e999, 2], "score": 0.5}]'), "error"),
        "negative width": (eval_case(pred=_with(PRED, (0, "bbox", 2), -5)), "error"),
        "3-number box": (eval_case(pred=_with(PRED, (0, "bbox"), [1, 2, 3])), "error"),
        "unknown image": (eval_case(pred=_with(PRED, (0, "image_id"), 99)), "error"),
        "unknown category": (eval_case(pred=_with(PRED, (0, "category_id"), 99)), "error"),
        "list as an image id": (eval_case(pred=_with(PRED, (0, "image_id"), [1])), "error"),
        "entries not objects": (eval_case(pred=[1, 2]), "error"),
        "an object, not a list": (eval_case(pred={"x": 1}), "error"),
        "huge segmentation ignored": (eval_case(pred=big_segm), "ok"),
        "predictions not JSON": (eval_case(pred=b"[{"), "error"),
        "predictions empty file": (eval_case(pred=b""), "error"),
        "predictions not UTF-8": (eval_case(pred=b'[{"\xff": 1}]'), "error"),
        "predictions 100k nested lists": (eval_case(pred=b"[" * 100_000 + b"]" * 100_000),
                                          "error"),
        "integer of 5000 digits": (eval_case(pred=b"[" + b"9" * 5000 + b"]"), "error"),
        "gt a list": (eval_case(gt=[GT]), "error"),
        "gt without images": (eval_case(gt=_with(GT, ("images",), ...)), "error"),
        "gt images an object": (eval_case(gt=_with(GT, ("images",), {"id": 1})), "error"),
        "gt image without id": (eval_case(gt=_with(GT, ("images", 0, "id"), ...)), "error"),
        "gt image id twice": (eval_case(gt=_with(GT, ("images", 1, "id"), 1)), "error"),
        "gt annotation id twice": (eval_case(gt=_with(GT, ("annotations", 1, "id"), 1)),
                                   "error"),
        "gt NaN box": (eval_case(gt=_with(GT, ("annotations", 0, "bbox", 0), NAN)), "error"),
        "gt unknown category": (eval_case(gt=_with(GT, ("annotations", 0, "category_id"), 7)),
                                "error"),
        "gt category without name": (eval_case(gt=_with(GT, ("categories", 0, "name"), ...)),
                                     "error"),
        "gt iscrowd 5": (eval_case(gt=_with(GT, ("annotations", 0, "iscrowd"), 5)), "error"),
        "gt area NaN": (eval_case(gt=_with(GT, ("annotations", 0, "area"), NAN)), "error"),
        "gt empty object": (eval_case(gt={}), "error"),
        "gt not UTF-8": (eval_case(gt=b"\xff\xfe"), "error"),
    })


# ----------------------------------------------------------------------------- images, datasets


def data_case(make: Callable[[Path], Path], *extra: str, job: str = "pretrain"):
    keys = TINY_RUN if job == "pretrain" else TINY_FT

    def build(root: Path) -> list[str]:
        return [job, *keys, f"data.path={make(root)}", "data.batch_size=8",
                "data.max_bad_fraction=0.5", *extra]
    return build


def folder_with(*bad: tuple[str, bytes]) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        image_folder(root / "imgs", n=8 - len(bad))
        for name, data in bad:
            write(root / "imgs" / name, data)
        return root / "imgs"
    return make


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", 60000, 60000)  # IHDR claims 60000 x 60000
    return bytes(data)


def _dataset(root: Path, column: dict, fmt: str = "parquet") -> Path:
    import datasets

    ds = datasets.Dataset.from_dict(column)
    if fmt == "parquet":
        (root / "ds").mkdir()
        ds.to_parquet(str(root / "ds" / "train-00000.parquet"))
    else:
        ds.save_to_disk(str(root / "ds"))
    return root / "ds"


def _damaged(fmt: str, damage: Callable[[Path], None]) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        imgs = [{"bytes": (png(root / f"p{i}.png", seed=i)).read_bytes(), "path": None}
                for i in range(8)]
        import datasets

        ds = datasets.Dataset.from_dict({"image": imgs}).cast_column("image", datasets.Image())
        if fmt == "parquet":
            (root / "ds").mkdir()
            ds.to_parquet(str(root / "ds" / "train-00000.parquet"))
        else:
            ds.save_to_disk(str(root / "ds"))
        damage(root / "ds")
        return root / "ds"
    return make


def _cut(pattern: str, keep: int = 100) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        for f in d.rglob(pattern):
            write(f, f.read_bytes()[:keep])
    return damage


def _replace(pattern: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: [write(f, data) for f in d.rglob(pattern)]


def test_malformed_image_folders_and_datasets(tmp_path):
    check_all(tmp_path, {
        "zero-byte png": (data_case(folder_with(("zero.png", b""))), "zero.png"),
        "truncated png": (data_case(folder_with(("cut.png", png(tmp_path / "x.png", 64)
                                                  .read_bytes()[:200]))), "cut.png"),
        "text named .jpg": (data_case(folder_with(("text.jpg", b"hello"))), "text.jpg"),
        "decompression bomb header": (data_case(folder_with(("bomb.png", _bomb()))), "bomb.png"),
        "all images bad": (data_case(folder_with(*[(f"b{i}.png", b"") for i in range(8)])),
                           "error"),
        "empty folder": (data_case(lambda r: (r / "e").mkdir() or r / "e"), "error"),
        "no images, only text": (data_case(lambda r: write(r / "t" / "a.txt", "x").parent),
                                 "error"),
        "a plain file": (data_case(lambda r: write(r / "f.bin", RANDOM)), "error"),
        "random bytes named .parquet": (data_case(lambda r: write(r / "d" / "train.parquet",
                                                                  RANDOM).parent), "error"),
        "truncated parquet": (data_case(_damaged("parquet", _cut("*.parquet"))), "error"),
        "parquet without images": (data_case(lambda r: _dataset(r, {"x": [1, 2, 3]})), "error"),
        "parquet image column of ints": (data_case(
            lambda r: _dataset(r, {"image": list(range(8))})), "error"),
        "save_to_disk, arrow file truncated": (data_case(_damaged("disk", _cut("*.arrow"))),
                                               "error"),
        "save_to_disk, state.json random": (data_case(_damaged("disk", _replace(
            "state.json", RANDOM))), "error"),
        "save_to_disk, dataset_info.json not JSON": (data_case(_damaged("disk", _replace(
            "dataset_info.json", b"{"))), "error"),
        "save_to_disk, arrow file gone": (data_case(_damaged("disk", lambda d: [
            f.unlink() for f in d.glob("*.arrow")])), "error"),
    })


# ----------------------------------------------------------------------------- detection labels


COCO = {"images": [{"id": i, "file_name": f"im{i}.png", "width": 32, "height": 32}
                   for i in (1, 2, 3, 4)],
        "annotations": [{"id": i, "image_id": i, "category_id": 1 + i % 2,
                         "bbox": [4, 4, 12, 10], "area": 120, "iscrowd": 0} for i in (1, 2, 3, 4)],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def coco_case(ann, *extra: str) -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        for i in (1, 2, 3, 4):
            png(root / "d" / "images" / "train" / f"im{i}.png", seed=i)
        raw = ann if isinstance(ann, bytes) else json.dumps(ann).encode()
        write(root / "d" / "annotations" / "instances_train.json", raw)
        return ["finetune", *TINY_DET, f"data.path={root / 'd'}", "data.format=coco",
                "train.max_steps=1", *extra]
    return build


def yolo_case(labels: dict[str, bytes], classes: bytes = b"a\nb\n",
              classes_file: str = "classes.txt") -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        for i in (1, 2, 3, 4):
            png(root / "d" / "images" / "train" / f"im{i}.png", seed=i)
            write(root / "d" / "labels" / "train" / f"im{i}.txt", b"0 0.5 0.5 0.4 0.4\n")
        for name, data in labels.items():
            write(root / "d" / "labels" / "train" / name, data)
        write(root / "d" / classes_file, classes)
        return ["finetune", *TINY_DET, f"data.path={root / 'd'}", "data.format=yolo",
                "train.max_steps=1"]
    return build


def hf_case(objects: list, **columns) -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        import datasets

        imgs = [{"bytes": png(root / f"p{i}.png", seed=i).read_bytes(), "path": None}
                for i in range(len(objects))]
        ds = datasets.Dataset.from_dict({"image": imgs, "objects": objects, **columns})
        ds.cast_column("image", datasets.Image()).save_to_disk(str(root / "d"))
        return ["finetune", *TINY_DET, f"data.path={root / 'd'}", "data.format=hf",
                "train.max_steps=1"]
    return build


def test_malformed_detection_annotations(tmp_path):
    good = {"bbox": [[2, 2, 10, 10]], "category": [0]}
    check_all(tmp_path, {
        "hf good (control)": (hf_case([good] * 4), "ok"),
        "hf a 3-number box": (hf_case([good] * 3 + [{"bbox": [[1, 2, 3]], "category": [1]}]),
                              "row 3"),
        "hf objects column of ints": (hf_case([1, 2, 3, 4]), "error"),
        "hf categories as names": (hf_case([{"bbox": [[2, 2, 9, 9]], "category": ["cat"]}] * 4),
                                   "error"),
        "coco good (control)": (coco_case(COCO), "ok"),
        "coco NaN box": (coco_case(_with(COCO, ("annotations", 0, "bbox", 1), NAN)),
                         "annotations[0]"),
        "coco 3-number box": (coco_case(_with(COCO, ("annotations", 1, "bbox"), [1, 2, 3])),
                              "annotations[1]"),
        "coco string box": (coco_case(_with(COCO, ("annotations", 2, "bbox"), "1,2,3,4")),
                            "annotations[2]"),
        "coco unknown category": (coco_case(_with(COCO, ("annotations", 3, "category_id"), 9)),
                                  "annotations[3]"),
        "coco unknown image": (coco_case(_with(COCO, ("annotations", 0, "image_id"), 77)),
                               "annotations[0]"),
        "coco iscrowd 7": (coco_case(_with(COCO, ("annotations", 0, "iscrowd"), 7)),
                           "annotations[0]"),
        "coco not JSON": (coco_case(b"{"), "error"),
        "coco empty file": (coco_case(b""), "error"),
        "coco not UTF-8": (coco_case(b'{"images": "\xff"}'), "error"),
        "coco a list": (coco_case([COCO]), "error"),
        "coco without images": (coco_case(_with(COCO, ("images",), ...)), "error"),
        "coco image id twice": (coco_case(_with(COCO, ("images", 1, "id"), 1)), "error"),
        "coco image without size": (coco_case(_with(COCO, ("images", 0, "width"), ...)),
                                    "error"),
        "coco image width a string": (coco_case(_with(COCO, ("images", 0, "width"), "32")),
                                      "error"),
        "coco categories missing": (coco_case(_with(COCO, ("categories",), ...)), "error"),
        "coco image file missing": (coco_case(_with(COCO, ("images", 0, "file_name"), "no.png"),
                                              "data.max_bad_fraction=0.5"), "no.png"),
        "yolo good (control)": (yolo_case({}), "ok"),
        "yolo label not UTF-8": (yolo_case({"im1.txt": b"0 0.5 0.5 0.2 \xff\n"}), "im1.txt"),
        "yolo NaN": (yolo_case({"im2.txt": b"0 nan 0.5 0.2 0.2\n"}), "im2.txt:1"),
        "yolo inf": (yolo_case({"im3.txt": b"1 0.5 inf 0.2 0.2\n"}), "im3.txt:1"),
        "yolo six fields": (yolo_case({"im4.txt": b"0 0.5 0.5 0.2 0.2 9\n"}), "im4.txt:1"),
        "yolo unknown class": (yolo_case({"im1.txt": b"5 0.5 0.5 0.2 0.2\n"}), "im1.txt:1"),
        "yolo binary label file": (yolo_case({"im2.txt": RANDOM}), "im2.txt"),
        "yolo classes.txt not UTF-8": (yolo_case({}, b"\xff\xfe"), "error"),
        "yolo classes.txt empty": (yolo_case({}, b""), "error"),
        "yolo data.yaml not YAML": (yolo_case({}, b"names: [a", "data.yaml"), "error"),
        "yolo data.yaml a list": (yolo_case({}, b"- a\n", "data.yaml"), "error"),
        "yolo data.yaml names a number": (yolo_case({}, b"names: 3\n", "data.yaml"), "error"),
    })


def test_damaged_run_directories_for_evaluate(tmp_path):
    """``mim evaluate --run`` on a fine-tuning run whose files were damaged after it ended."""
    import yaml

    from mim.config import load_config

    cfg = load_config(None, TINY_FT + ["data.synthetic=true", "data.synthetic_size=16"],
                      job="finetune").to_dict()
    record = {"num_classes": 10, "class_names": [str(i) for i in range(10)],
              "best": {"epoch": 1}}

    def run_case(config: bytes, metrics: bytes, weights: bytes | dict):
        def build(root: Path) -> list[str]:
            write(root / "run" / "config.yaml", config)
            write(root / "run" / "best" / "metrics.json", metrics)
            if isinstance(weights, dict):
                save_file(weights, str(root / "run" / "best" / "model.safetensors"))
            else:
                write(root / "run" / "best" / "model.safetensors", weights)
            return ["evaluate", "--run", str(root / "run")]
        return build

    good_cfg, good_rec = yaml.safe_dump(cfg).encode(), json.dumps(record).encode()
    check_all(tmp_path, {
        "config.yaml not YAML": (run_case(b"a: [", good_rec, RANDOM), "error"),
        "config.yaml not UTF-8": (run_case(b"\xff", good_rec, RANDOM), "error"),
        "metrics.json not JSON": (run_case(good_cfg, b"{", RANDOM), "error"),
        "metrics.json a list": (run_case(good_cfg, b"[]", RANDOM), "error"),
        "weights random": (run_case(good_cfg, good_rec, RANDOM), "error"),
        "weights of another model": (run_case(good_cfg, good_rec, {"x": torch.ones(2)}),
                                     "error"),
    })
