"""Measuring primitives: interleaved timing, the matmul peak, counted FLOPs, memory, profiles.

Everything a comparison reports is measured in the same process and, for timings, in interleaved
rounds (A, B, C, A, B, C, ...), so a load that comes and goes on a shared machine hits every
contender alike and the ratios stay meaningful even when the absolute numbers drift.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode


def _register_cpu_attention_flops() -> None:
    """torch's FlopCounterMode knows the CUDA attention kernels but not the CPU one; count it with
    torch's own formulas, so the FLOPs of the fused CPU step are counted too."""
    aten = torch.ops.aten
    fwd, bwd = (aten._scaled_dot_product_flash_attention_for_cpu,
                aten._scaled_dot_product_flash_attention_for_cpu_backward)
    if fwd in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(fwd)
    def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    @flop_counter.register_flop_formula(bwd)
    def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
             **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape,
                                                     value_shape)


_register_cpu_attention_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    """Seconds per call of each contender: the first (warm-up, compilation) calls and the timed
    rounds."""

    warmup: dict[str, list[float]] = field(default_factory=dict)
    rounds: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.rounds[name])

    def spread(self, name: str) -> float:
        """Interquartile range over the median (with under 4 rounds: the full range): how noisy
        the timing was."""
        t = sorted(self.rounds[name])
        if len(t) < 4:
            return (t[-1] - t[0]) / statistics.median(t) if t else 0.0
        q = statistics.quantiles(t, n=4)
        return (q[2] - q[0]) / statistics.median(t)

    def ratio(self, slow: str, fast: str) -> float:
        """Median over rounds of the per-round time ratio slow / fast (paired, so a load spike
        that hits one round hits both sides of its ratio)."""
        return statistics.median(a / b for a, b in zip(self.rounds[slow], self.rounds[fast]))


def time_interleaved(calls: dict[str, Callable[[], object]], device: torch.device,
                     warmup: int, rounds: int, budget_s: float | None = None) -> Timings:
    """Warm every call up on its own, then time ``rounds`` rounds that run each call once, in
    turn (each round starting one contender later, so none is always first). ``budget_s`` stops
    early (after at least 3 rounds) on a slow machine."""
    out = Timings()
    for name, fn in calls.items():
        out.warmup[name] = []
        for _ in range(warmup):
            synchronize(device)
            t = time.perf_counter()
            fn()
            synchronize(device)
            out.warmup[name].append(time.perf_counter() - t)
        out.rounds[name] = []
    start = time.perf_counter()
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate: no fixed first
            fn = calls[name]
            synchronize(device)
            t = time.perf_counter()
            fn()
            synchronize(device)
            out.rounds[name].append(time.perf_counter() - t)
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    return out


def matmul(device: torch.device, dtype: torch.dtype, n: int) -> tuple[Callable[[], object], float]:
    """A square ``n``-sized matrix product and its FLOPs: the device's practical peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b)), 2.0 * n ** 3


def default_matmul_size(device: torch.device) -> int:
    return 8192 if device.type == "cuda" else 3072


@dataclass
class FlopCount:
    """FLOPs of one training step (forward and backward), per image, split by kind of op."""

    total: float
    attention: float  # scaled-dot-product attention: grows with tokens^2
    matmul: float  # linear layers and the patch convolution: grows with tokens

    @property
    def attention_share(self) -> float:
        return self.attention / self.total if self.total else 0.0


def count_step_flops(forward_backward: Callable[[], object], batch: int) -> FlopCount:
    """Count (never estimate) the FLOPs of forward + backward with torch's FlopCounterMode."""
    with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
        forward_backward()
    by_op: dict[str, float] = defaultdict(float)
    for op, n in counter.get_flop_counts()["Global"].items():
        by_op[str(op)] += n
    attention = sum(n for op, n in by_op.items() if "scaled_dot_product" in op
                    or "flash_attention" in op or "efficient_attention" in op)
    total = sum(by_op.values())
    return FlopCount(total / batch, attention / batch, (total - attention) / batch)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters, their gradients and the optimizer state: what a step keeps besides
    activations."""
    params = list(model.parameters())
    opt_state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return 2 * tensor_bytes(params) + tensor_bytes(opt_state)


def saved_activation_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd keeps for backward during ``forward`` (each storage counted once). Eager
    mode only; the backward is not run."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            s = t.untyped_storage()
            seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    del loss
    return sum(seen.values())


def cuda_peak_bytes(step: Callable[[], object], device: torch.device, own_state: int) -> int:
    """Peak allocator memory of one step counted for this model alone: the transient peak above
    what was allocated before the step (other models may be resident) plus its own state."""
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before + own_state


_CATEGORIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul",
                "convolution", "aten::_convolution")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("optimizer", ("adam", "_foreach", "Optimizer.step")),
    ("layer norm", ("layer_norm",)),
    ("gelu", ("gelu",)),
    ("compiled kernels", ("cpp_fused", "triton_", "CompiledFunction", "Torch-Compiled",
                          "CompiledFxGraph")),
    ("copies/layout/casts", ("aten::copy_", "aten::_to_copy", "aten::cat", "aten::stack",
                             "aten::clone", "aten::contiguous", "aten::gather", "aten::index",
                             "aten::scatter", "aten::fill_", "aten::zero_", "aten::zeros",
                             "aten::empty")),
    ("reductions/elementwise", ("aten::sum", "aten::add", "aten::mul", "aten::div", "aten::sub",
                                "aten::pow", "aten::mean", "aten::var", "aten::sqrt",
                                "aten::lerp", "aten::where", "aten::rsub")),
)


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in _CATEGORIES:
        if any(k.lower() in low for k in keys):
            return cat
    return "other"


@dataclass
class Profile:
    top: list[tuple[str, float, float]]  # (op, self ms per step, share of the profiled time)
    categories: list[tuple[str, float]]  # (category, share)

    def lines(self) -> list[str]:
        cats = ", ".join(f"{c} {100 * s:.0f}%" for c, s in self.categories if s >= 0.005)
        out = [f"    time by kind: {cats}"]
        out += [f"    {share * 100:5.1f}%  {ms:9.2f} ms/step  {op}" for op, ms, share in self.top]
        return out


def profile_step(step: Callable[[], object], device: torch.device, steps: int = 2,
                 top: int = 12) -> Profile:
    """Where a step's time goes: torch.profiler self time per operator (on CUDA, the device time
    of the kernels each operator launched)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    from torch.autograd import DeviceType

    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    # Operator rows only: on CUDA each kernel's time is also on the operator that launched it.
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0
              and e.device_type == DeviceType.CPU and not e.key.startswith("ProfilerStep")]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: -getattr(e, attr))
    rows = [(e.key, getattr(e, attr) / 1e3 / steps, getattr(e, attr) / total)
            for e in events[:top]]
    cats: dict[str, float] = defaultdict(float)
    for e in events:
        cats[_category(e.key)] += getattr(e, attr) / total
    return Profile(rows, sorted(cats.items(), key=lambda kv: -kv[1]))
