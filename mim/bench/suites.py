"""Benchmark cases and suites: what is measured, against which target, and the printed tables.

A *step case* times the training step of mim's MAE and of the reference at one configuration
(each in eager mode and compiled), together with a large matrix product in the same rounds (the
device's practical peak under the same load); a *suite* is a list of cases plus the input
pipeline, with targets that print as met / not met and a profile wherever one is not met.
"""

from __future__ import annotations

import copy
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mim.bench.measure import (
    FlopCount,
    Timings,
    count_step_flops,
    cuda_peak_bytes,
    default_matmul_size,
    matmul,
    profile_step,
    saved_activation_bytes,
    state_bytes,
    synchronize,
    time_interleaved,
)
from mim.bench.pipeline import bench_pipeline, make_jpeg_folder, real_run_data_wait
from mim.bench.reference import NotComparable
from mim.bench.step import Contender, build_contender
from mim.config import load_config
from mim.engine.distributed import resolved_precision


def say(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


# ----------------------------------------------------------------------------- one step case


@dataclass
class Row:
    name: str
    impl: str
    mode: str
    images_per_s: float
    step_ms: float
    spread: float
    first_step_s: float  # the first call: compilation, allocator warm-up
    memory: int | None  # bytes
    flops: FlopCount
    mfu: float


@dataclass
class CaseResult:
    title: str
    description: str
    device: str
    dtype: str
    batch: int
    rows: list[Row]
    matmul_flops_s: float  # median in the same rounds
    matmul_best_flops_s: float
    memory_kind: str
    timings: Timings
    contenders: dict[str, Contender] = field(repr=False, default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def best(self, impl: str) -> Row | None:
        rows = [r for r in self.rows if r.impl == impl]
        return max(rows, key=lambda r: r.images_per_s) if rows else None

    def speedup(self) -> float | None:
        """mim's best over the reference's best, as the median of paired per-round ratios."""
        ours, ref = self.best("mim"), self.best("reference")
        if ours is None or ref is None:
            return None
        return self.timings.ratio(ref.name, ours.name)


def describe(cfg: Any) -> str:
    from mim.models import create_vit

    vit, m = create_vit(cfg.model), cfg.method
    enc = (f"{m.name}: {cfg.model.arch} (dim {vit.embed_dim}, depth {len(vit.blocks)}, heads "
           f"{vit.blocks[0].attn.num_heads}) at {cfg.model.img_size} px, patch "
           f"{cfg.model.patch_size}")
    if m.name != "mae":
        return f"{enc}; mask {m.mask_ratio}"
    return (f"{enc}; decoder dim {m.decoder_dim}, depth {m.decoder_depth}, heads "
            f"{m.decoder_heads}; mask {m.mask_ratio}, norm_pix {m.norm_pix_loss}")


def run_step_case(cfg: Any, title: str, device: torch.device, modes: tuple[str, ...],
                  impls: tuple[str, ...] = ("mim", "reference"), warmup: int = 2,
                  rounds: int = 10, budget_s: float | None = None,
                  keep_contenders: bool = False, matmul_size: int = 0) -> CaseResult:
    """Build every (impl, mode) contender at ``cfg``, time them interleaved, count FLOPs and
    memory. The reference is skipped (and the reason kept) when it cannot match the model."""
    b, c, s = cfg.data.batch_size, cfg.model.in_chans, cfg.model.img_size
    torch.manual_seed(cfg.run.seed)
    images = torch.randn(b, c, s, s, device=device)
    contenders: dict[str, Contender] = {}
    notes, first = [], {}
    for impl in impls:
        for mode in modes:
            try:
                con = build_contender(cfg, impl, mode, device, images)
            except NotComparable as e:
                notes.append(f"reference not measured: {e}")
                break
            try:  # the first step compiles; a contender that cannot run is reported, not fatal
                synchronize(device)
                t0 = time.perf_counter()
                con.step()
                synchronize(device)
                first[con.name] = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001
                notes.append(f"{con.name} failed: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300] if str(e) else ''}")
                say(f"  {notes[-1]}")
                continue
            contenders[con.name] = con
    if not contenders:
        raise RuntimeError("no contender ran: " + "; ".join(notes))
    dtype = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[
        cfg.train.mixed_precision]
    mm_dtype = torch.float32 if cfg.train.mixed_precision == "no" else torch.bfloat16
    mm, mm_flops = matmul(device, mm_dtype, matmul_size or default_matmul_size(device))
    calls = {name: con.step for name, con in contenders.items()}
    calls["matmul"] = mm
    say(f"  timing {', '.join(contenders)} (+ matmul) ...")
    t = time_interleaved(calls, device, warmup=max(warmup - 1, 1), rounds=rounds,
                         budget_s=budget_s)
    mm_rate = mm_flops / t.median("matmul")
    mm_best = mm_flops / min(t.rounds["matmul"] + t.warmup["matmul"][1:])

    # Model FLOPs: mim's variants (e.g. activation checkpointing, which recomputes the forward)
    # count as mim, so "of matmul peak" compares useful work.
    flops: dict[str, FlopCount] = {}
    family = {name: "reference" if con.impl == "reference" else "mim"
              for name, con in contenders.items()}
    for name, con in contenders.items():
        if family[name] not in flops and con.impl in ("mim", "reference") and con.mode == "eager":
            flops[family[name]] = count_step_flops(con.forward_backward, b)
            con.model.zero_grad(set_to_none=True)
    for name in contenders:  # no plain eager contender: count on a fresh one
        if family[name] not in flops:
            fresh = build_contender(cfg, family[name], "eager", device, images)
            flops[family[name]] = count_step_flops(fresh.forward_backward, b)
            del fresh

    rows = []
    memory_kind = "peak (allocator)" if device.type == "cuda" else "counted (eager)"
    for name, con in contenders.items():
        own = state_bytes(con.model, con.optimizer)
        if device.type == "cuda":
            mem = cuda_peak_bytes(con.step, device, own)
        elif con.mode == "eager":
            mem = own + saved_activation_bytes(con.forward)
        else:
            mem = None
        step_s = t.median(name)
        fl = flops[family[name]]
        rows.append(Row(name, con.impl, con.mode, b / step_s, 1e3 * step_s, t.spread(name),
                        first[name], mem, fl,
                        fl.total * b / step_s / mm_rate))
    return CaseResult(title, describe(cfg), str(device), dtype, b, rows, mm_rate, mm_best,
                      memory_kind, t, contenders if keep_contenders else {}, notes)


def fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2**20:.0f} MiB"


def fmt_flops(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} "


def case_table(res: CaseResult) -> list[str]:
    lines = [f"### {res.title}",
             f"{res.description}; batch {res.batch}, {res.dtype}, device {res.device}",
             (f"matmul peak ({res.dtype.split()[0]}, same rounds): median "
              f"{fmt_flops(res.matmul_flops_s)}FLOP/s, best "
              f"{fmt_flops(res.matmul_best_flops_s)}FLOP/s"), "",
             ("| contender | images/s | step ms | spread | first step s | memory "
              f"({res.memory_kind}) | train FLOPs/img | attention share | achieved FLOP/s | "
              "of matmul peak |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res.rows:
        lines.append(f"| {r.name} | {r.images_per_s:.1f} | {r.step_ms:.1f} | "
                     f"{100 * r.spread:.0f}% | {r.first_step_s:.1f} | {fmt_bytes(r.memory)} | "
                     f"{fmt_flops(r.flops.total)} | {100 * r.flops.attention_share:.1f}% | "
                     f"{fmt_flops(r.flops.total * r.images_per_s)} | {100 * r.mfu:.1f}% |")
    noisy = [r.name for r in res.rows if r.spread > 0.25]
    if noisy:
        lines.append(f"\nwarning: noisy timings (spread > 25% of the median) for "
                     f"{', '.join(noisy)}: the machine was busy; ratios are less reliable")
    sp = res.speedup()
    if sp is not None:
        lines.append(f"\nmim best ({res.best('mim').name}) / reference best "
                     f"({res.best('reference').name}): **{sp:.2f}x** images/s "
                     "(median of paired per-round ratios)")
    lines += [f"\nnote: {n}" for n in res.notes]
    return lines


# ----------------------------------------------------------------------------- suites


@dataclass
class Target:
    name: str
    value: float
    threshold: float
    unit: str
    why_not: list[str] = field(default_factory=list)

    @property
    def met(self) -> bool:
        return self.value >= self.threshold


def bench_config(overrides: list[str], path: str | None = None) -> Any:
    """A pretraining config for benchmarking: the synthetic source unless one is named, no
    tracking."""
    import yaml

    named = any(o.split("=")[0] in ("data.name", "data.path", "data.synthetic")
                for o in overrides)
    if path is not None:
        data = (yaml.safe_load(Path(path).read_text()) or {}).get("data", {}) or {}
        named = named or any(k in data for k in ("name", "path", "synthetic"))
    extra = [] if named else ["data.synthetic=true"]
    cfg = load_config(path, extra + ["tracking.backend=none", *overrides])
    cfg.train.mixed_precision = resolved_precision(cfg.train.mixed_precision)  # no accelerator
    return cfg


CPU_CASES = {
    "ViT-Ti/16": ["model.arch=vit_tiny_patch16_224"],
    "ViT-S/16": ["model.arch=vit_small_patch16_224"],
}
# A light decoder for the small CPU encoders (MAE's 512-dim, 8-block default would be ~90% of
# the FLOPs of a ViT-Ti MAE and make the encoder a rounding error).
CPU_COMMON = ["model.img_size=224", "model.patch_size=16", "method.decoder_dim=128",
              "method.decoder_depth=2", "method.decoder_heads=4", "data.batch_size=16"]
GPU_CASE = ["model.arch=vit_base_patch16_224", "model.img_size=224", "model.patch_size=16",
            "method.decoder_dim=512", "method.decoder_depth=8", "method.decoder_heads=16",
            "data.batch_size=256", "train.mixed_precision=bf16"]


def machine_line(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = " load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    gpu = f"; GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads){gpu};{load}")


def run_suite(suite: str, overrides: list[str], device: torch.device, quick: bool = False,
              workdir: Path | None = None) -> tuple[list[str], list[Target], dict]:
    """Run a suite; returns the report lines, the targets and raw numbers for --json."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="mim-bench-"))
    start = time.perf_counter()
    report = [f"machine: {machine_line(device)}", ""]
    targets: list[Target] = []
    raw: dict[str, Any] = {"suite": suite, "machine": machine_line(device), "cases": {}}
    say(report[0])
    if suite == "cpu":
        cases = [(name, CPU_COMMON + extra) for name, extra in CPU_CASES.items()]
        budgets = [80.0, 100.0] if not quick else [10.0, 10.0]
        rounds = 10 if not quick else 2
    else:
        cases = [("ViT-B/16", GPU_CASE)]
        budgets, rounds = [120.0], 20 if not quick else 3
    modes = ("eager", "compile")
    best_mim_cfg = None
    for (name, ov), budget in zip(cases, budgets):
        cfg = bench_config(ov + overrides)
        say(f"== step: {name} ({time.perf_counter() - start:.0f} s)")
        try:
            res = run_step_case(cfg, f"{name} MAE training step", device, modes,
                                rounds=rounds, budget_s=budget, keep_contenders=True)
        except Exception as e:  # noqa: BLE001 - report the broken case, keep the others
            line = f"PART FAILED: step case {name}: {type(e).__name__}: {e}"
            report += [line, ""]
            say(line)
            continue
        report += case_table(res) + [""]
        say(*case_table(res), "")
        raw["cases"][name] = _case_raw(res)
        sp = res.speedup()
        ours = res.best("mim")
        if best_mim_cfg is None:
            best_mim_cfg = (cfg, ours.mode, ours.images_per_s)
        case_targets = []
        if sp is not None:
            case_targets.append(Target(f"{name} images/s vs ViTMAEForPreTraining (sdpa), best "
                                       "of eager/compile each", sp, 1.3, "x"))
        peak = "fp32" if cfg.train.mixed_precision == "no" else "bf16"
        case_targets.append(Target(f"{name} training step, share of measured {peak} matmul "
                                   "peak", ours.mfu, 0.5, ""))
        failed = [t for t in case_targets if not t.met]
        if failed:
            failed[0].why_not = _why(res, device)
            for t in failed[1:]:
                t.why_not = [f"  (same profile as above: {failed[0].name})"]
        targets += case_targets
        res.contenders.clear()
    if best_mim_cfg is None:
        best_mim_cfg = (bench_config(cases[0][1] + overrides), "eager", float("nan"))
    parts = [_optimizer_part, _pipeline_part, _real_run_part]
    if suite == "gpu":
        parts.insert(0, _variants_part)
    for part in parts:
        try:
            part(report, targets, raw, best_mim_cfg, device, quick, workdir, start)
        except Exception as e:  # noqa: BLE001 - report the broken part, keep the others
            import traceback

            traceback.print_exc()
            line = f"PART FAILED: {part.__name__.strip('_')}: {type(e).__name__}: {e}"
            report += [line, ""]
            say(line)
    raw["elapsed_s"] = time.perf_counter() - start
    return report, targets, raw


def _variants_part(report, targets, raw, best_mim_cfg, device, quick, workdir, start) -> None:
    say(f"== engine options, eager ({time.perf_counter() - start:.0f} s)")
    res = run_step_case(best_mim_cfg[0], "Engine options (eager, same rounds)", device,
                        ("eager",), ("mim", "mim-deviceguard", "mim-gc"),
                        rounds=3 if quick else 15, budget_s=90.0)
    lines = case_table(res)
    device_guard = "non-finite guard decided on the device (no host sync)"
    for other, what in (("mim-deviceguard eager", device_guard),
                        ("mim-gc eager", "train.grad_checkpointing=true")):
        if other in res.timings.rounds:
            lines.append(f"- {what}: step time x{res.timings.ratio(other, 'mim eager'):.3f} "
                         "(median of paired rounds)")
    report += lines + [""]
    say(*lines, "")
    raw["variants"] = _case_raw(res)


def _optimizer_part(report, targets, raw, best_mim_cfg, device, quick, workdir, start) -> None:
    """AdamW alone on the model's parameters (random gradients): the per-tensor loop, the
    multi-tensor (foreach) and the fused implementation, interleaved."""
    say(f"== optimizer step ({time.perf_counter() - start:.0f} s)")
    from timm.optim import create_optimizer_v2

    from mim.methods import build_pretrainer

    cfg = best_mim_cfg[0]
    calls, n_params = {}, 0
    for impl, kw in (("for-loop", {"foreach": False}), ("foreach", {"foreach": True}),
                     ("fused", {"fused": True})):
        model = build_pretrainer(cfg).to(device)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        n_params = sum(p.numel() for p in model.parameters())
        opt = create_optimizer_v2(model, "adamw", lr=1e-4, weight_decay=0.05, **kw)
        calls[impl] = opt.step
    t = time_interleaved(calls, device, warmup=2, rounds=3 if quick else 10, budget_s=30.0)
    lines = [f"### AdamW step alone ({n_params / 1e6:.1f} M parameters, {device.type})", "",
             "| implementation | ms per step | fused is faster by |", "|---|---:|---:|"]
    lines += [f"| {name} | {1e3 * t.median(name):.2f} | {t.ratio(name, 'fused'):.2f}x |"
              for name in calls]
    report += lines + [""]
    say(*lines, "")
    raw["optimizer_ms"] = {name: 1e3 * t.median(name) for name in calls}


def _pipeline_part(report, targets, raw, best_mim_cfg, device, quick, workdir, start) -> None:
    say(f"== input pipeline ({time.perf_counter() - start:.0f} s)")
    report += ["### Input pipeline: decode + MAE augmentation, one DataLoader worker"]
    cfg0 = best_mim_cfg[0]
    d = cfg0.data
    sizes = [(500, 375), (2048, 1536)]
    for size in sizes:
        root = make_jpeg_folder(workdir / f"jpeg_{size[0]}x{size[1]}",
                                64 if size[0] < 1000 else 24, size)
        rows = bench_pipeline(root, cfg0.model.img_size, d.crop_scale, d.mean, d.std,
                              rounds=10 if not quick else 2, budget_s=30 if not quick else 5)
        lines = [f"JPEG {size[0]}x{size[1]} (quality 90) -> {cfg0.model.img_size} px:", "",
                 "| loader | images/s per worker | vs ImageFolder |", "|---|---:|---:|"]
        lines += [f"| {r.name} | {r.images_per_s:.1f} | {r.ratio_to_imagefolder:.2f}x |"
                  for r in rows]
        report += lines + [""]
        say(*lines, "")
        raw[f"pipeline_{size[0]}x{size[1]}"] = [r.__dict__ for r in rows]
        for r in rows:
            if r.name in ("mim folder", "mim in-memory"):
                targets.append(Target(f"input pipeline {r.name} vs ImageFolder, JPEG "
                                      f"{size[0]}x{size[1]}", r.ratio_to_imagefolder, 1.0, "x"))


def _real_run_part(report, targets, raw, best_mim_cfg, device, quick, workdir, start) -> None:
    say(f"== real run, data wait ({time.perf_counter() - start:.0f} s)")
    cfg, mode, step_rate = best_mim_cfg
    run_cfg = copy.deepcopy(cfg)
    run_cfg.train.compile = mode == "compile"
    workers = max(1, min(16, (os.cpu_count() or 2) - 2))
    run_cfg.data.num_workers = workers
    steps = 16 if device.type == "cpu" else 12
    steps = 4 if quick else steps
    n_img = max(steps * run_cfg.data.batch_size, 256)  # one epoch: no restart inside the windows
    root = make_jpeg_folder(workdir / "jpeg_run", n_img, (500, 375))
    real = real_run_data_wait(run_cfg, root, steps=steps, log_every=max(steps // 4, 1),
                              workdir=workdir / "runs")
    lines = [(f"### Real run: `mim pretrain` on {n_img} JPEGs (500x375), {workers} "
              f"worker{'s' if workers > 1 else ''}, "
              f"train.compile={run_cfg.train.compile}"),
             (f"images/s {real.images_per_s:.1f} (step benchmark {step_rate:.1f}: "
              f"{real.images_per_s / step_rate:.2f}x), waiting for data "
              f"{100 * real.data_wait:.1f}% of the time (mean of {real.windows} logging windows "
              "after the first)")]
    report += lines + [""]
    say(*lines, "")
    raw["real_run"] = real.__dict__
    if device.type == "cuda":
        targets.append(Target("full pipeline with data loading / step benchmark (within 15%)",
                              real.images_per_s / step_rate, 0.85, "x"))


def _why(res: CaseResult, device: torch.device) -> list[str]:
    ours, ref = res.best("mim"), res.best("reference")
    con = res.contenders[ours.name]
    prof = profile_step(con.step, device)
    lines = [f"  profile of {ours.name} ({res.title}):"] + prof.lines()
    if ref is not None and ref.mfu == ref.mfu:  # both count the same FLOPs (a test checks it)
        need = 1.3 * ref.mfu
        lines.append(f"  ceiling: {ref.name} already runs at {100 * ref.mfu:.0f}% of the measured "
                     f"matmul peak with the same counted FLOPs, so 1.3x would need "
                     f"{100 * need:.0f}%" + (" (more than the peak: out of reach without doing "
                                             "less work)" if need > 1 else ""))
    return lines


def _case_raw(res: CaseResult) -> dict:
    return {"description": res.description, "batch": res.batch, "dtype": res.dtype,
            "matmul_flops_s": res.matmul_flops_s, "speedup": res.speedup(),
            "rows": [{**r.__dict__, "flops": r.flops.__dict__} for r in res.rows],
            "rounds": res.timings.rounds, "warmup": res.timings.warmup}


def targets_table(targets: list[Target]) -> list[str]:
    lines = ["| target | measured | needed | |", "|---|---:|---:|---|"]
    for t in targets:
        val = f"{100 * t.value:.1f}%" if t.unit == "" else f"{t.value:.2f}{t.unit}"
        need = f">= {100 * t.threshold:.0f}%" if t.unit == "" else f">= {t.threshold}{t.unit}"
        lines.append(f"| {t.name} | {val} | {need} | {'met' if t.met else '**not met**'} |")
    for t in targets:
        if not t.met and t.why_not:
            lines += ["", f"why not met: {t.name}", *t.why_not]
    return lines



def run_scaling(overrides: list[str], device: torch.device, batches: list[int],
                sizes: list[int], size_batch: int, mode: str = "eager", rounds: int = 5,
                budget_s: float | None = None) -> tuple[list[str], dict]:
    """mim's step at several batch sizes (at the configured image size) and image sizes (at
    ``size_batch``), all interleaved in the same rounds: images/s, memory, counted FLOPs and
    how the cost per image grows with the token count."""
    base = bench_config(overrides)
    variants: list[tuple[str, Any]] = []
    for b in batches:
        variants.append((f"batch {b}, {base.model.img_size} px",
                         bench_config(overrides + [f"data.batch_size={b}"])))
    for s in sizes:
        if s == base.model.img_size and size_batch in batches:
            continue
        variants.append((f"batch {size_batch}, {s} px",
                         bench_config(overrides + [f"data.batch_size={size_batch}",
                                                   f"model.img_size={s}"])))
    contenders, flops, tokens = {}, {}, {}
    for name, cfg in variants:
        b, s = cfg.data.batch_size, cfg.model.img_size
        torch.manual_seed(0)
        images = torch.randn(b, cfg.model.in_chans, s, s, device=device)
        con = build_contender(cfg, "mim", mode, device, images)
        enc = con.model.encoder
        keep = enc.num_patches - round(enc.num_patches * cfg.method.mask_ratio)
        tokens[name] = (enc.num_patches, keep + enc.num_prefix_tokens)
        eager = con if mode == "eager" else build_contender(cfg, "mim", "eager", device, images)
        flops[name] = count_step_flops(eager.forward_backward, b)
        eager.model.zero_grad(set_to_none=True)
        contenders[name] = con
    say(f"  timing {len(contenders)} configurations ({mode}) ...")
    t = time_interleaved({n: c.step for n, c in contenders.items()}, device, warmup=2,
                         rounds=rounds, budget_s=budget_s)
    ref_name = f"batch {size_batch}, {base.model.img_size} px"
    ref_name = ref_name if ref_name in contenders else None
    dtype = "fp32" if base.train.mixed_precision == "no" else base.train.mixed_precision
    lines = [f"### Scaling: {describe(base)}, {mode}, {dtype}",
             "", ("| configuration | patches (encoder tokens) | images/s | step ms | memory | "
                  "train FLOPs/img | attention share | time/img vs ref | FLOPs/img vs ref | "
                  "patches vs ref | patches^2 vs ref |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    raw = {}
    for name, con in contenders.items():
        b = con.images.shape[0]
        own = state_bytes(con.model, con.optimizer)
        if device.type == "cuda":
            mem = cuda_peak_bytes(con.step, device, own)
        else:
            mem = own + saved_activation_bytes(con.forward) if mode == "eager" else None
        per_img = t.median(name) / b
        rel = ""
        if ref_name is not None:
            r_img = t.median(ref_name) / contenders[ref_name].images.shape[0]
            p0, p = tokens[ref_name][0], tokens[name][0]
            f_rel = flops[name].total / flops[ref_name].total
            rel = f"{per_img / r_img:.2f}x | {f_rel:.2f}x | {p / p0:.2f}x | {(p / p0) ** 2:.2f}x"
        else:
            rel = "- | - | - | -"
        lines.append(f"| {name} | {tokens[name][0]} ({tokens[name][1]}) | {b / t.median(name):.1f}"
                     f" | {1e3 * t.median(name):.0f} | {fmt_bytes(mem)} | "
                     f"{fmt_flops(flops[name].total)} | {100 * flops[name].attention_share:.1f}% | "
                     f"{rel} |")
        raw[name] = {"images_per_s": b / t.median(name), "memory": mem,
                     "flops": flops[name].__dict__, "patches": tokens[name][0],
                     "rounds": t.rounds[name]}
    if ref_name is not None:
        lines.append(f"\nref = {ref_name}")
    return lines, raw
