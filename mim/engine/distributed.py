"""What a launch asks for and what it gets: mixed precision (the launcher's unless the config
says otherwise), a process group of the size the environment announces, and the FSDP-safe
ways to reach the model's weights, pictures and optimizer state from every process."""

from __future__ import annotations

import os
import re

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, parse_flag_from_env
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)

from mim.errors import ConfigError

# what ``accelerate launch`` (its config file or --mixed_precision) hands its processes
LAUNCHER_PRECISION = "ACCELERATE_MIXED_PRECISION"


def launcher_precision() -> str | None:
    """The launcher's mixed precision, or None where nothing set one (plain python, torchrun)."""
    value = os.environ.get(LAUNCHER_PRECISION, "").strip().lower()
    return value or None


def accelerator_precision(setting: str) -> str | None:
    """``train.mixed_precision`` as ``Accelerator(mixed_precision=...)`` takes it: ``auto`` is
    None, which accelerate resolves to the launcher's setting ('no' where none is set)."""
    return None if setting == "auto" else setting


def resolved_precision(setting: str) -> str:
    """The precision a job without an accelerator (the benchmarks) runs: the same rule."""
    return (launcher_precision() or "no") if setting == "auto" else setting


def precision_note(acc: Accelerator) -> str:
    """The accounting's 'mixed precision' row: what runs, and whose choice it is."""
    got, launcher = acc.mixed_precision, launcher_precision()
    if launcher is None:
        return f"{got} (no launcher setting)"
    if got == launcher:
        return f"{got} (the launcher's)"
    return f"{got} (train.mixed_precision; overrides the launcher's {launcher})"


def check_launch(state: PartialState | None = None) -> None:
    """Refuse, before any work, a launch whose processes would not form the group it asks for:
    each process would otherwise train the whole job alone, into the same run directory.
    Called with no state before the process group starts (what the environment asks for and
    this machine cannot give) and with the state after (the group accelerate formed). Only the
    process of rank 0 prints the one-line error; the others exit with the same status."""
    problem = launch_problem() if state is None else group_problem(state)
    if problem is None:
        return
    if torch.distributed.is_initialized():  # let every peer finish joining before anyone leaves
        torch.distributed.barrier()
    if int(os.environ.get("RANK", "0") or 0) != 0:
        raise SystemExit(2)
    raise ConfigError(problem)


def launch_problem() -> str | None:
    """What the launcher's environment asks for that this machine cannot run."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.accelerator.is_available()
    for flag, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if parse_flag_from_env(flag) and cpu:
            return (f"the launch asks for {name} ({flag}=true) on {world} CPU process(es); "
                    f"accelerate runs {name} on GPUs only: launch DDP over gloo instead "
                    "(configs/accelerate/cpu_2proc.yaml, ACCELERATE_USE_CPU=true)")
    if world > 1 and cpu and not parse_flag_from_env("ACCELERATE_USE_CPU"):
        return (f"the launch starts WORLD_SIZE={world} processes on a machine without GPUs, "
                "where accelerate would run each alone; set ACCELERATE_USE_CPU=true for a CPU "
                "launch over gloo (configs/accelerate/cpu_2proc.yaml)")
    return None


def group_problem(state: PartialState) -> str | None:
    """A process group of another size than the launcher announced."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and state.num_processes != world:
        return (f"the launch starts WORLD_SIZE={world} processes but they did not form a "
                f"group (accelerate sees {state.num_processes} on {state.device.type}); check "
                "the launcher's num_processes, ACCELERATE_USE_CPU and the visible devices")
    return None


def is_sharded(acc: Accelerator) -> bool:
    """Whether parameters and optimizer state are split over the processes (FSDP)."""
    return acc.distributed_type == DistributedType.FSDP


def forward_module(acc: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The module a forward outside the training step (pictures, evaluation) goes through.
    Under FSDP that is the wrapped model, whose forward gathers the shards, so every process
    must run it; elsewhere the plain module (no gradient synchronisation)."""
    return model if is_sharded(acc) else acc.unwrap_model(model)


def optimizer_state(acc: Accelerator, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> tuple[dict, str]:
    """The optimizer state to save, and its format; every process calls this.

    Under FSDP each process holds a shard: torch's ``get_optimizer_state_dict`` gathers the full
    state, keyed by parameter name ('by_name'), onto the main process's CPU. Elsewhere it is
    ``optimizer.state_dict()`` ('by_index', the format of earlier checkpoints): under DDP
    every process holds the full state."""
    if not by_name(acc):
        return optimizer.state_dict(), "by_index"
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, _inner(optimizer), options=options), "by_name"


def load_optimizer_state(acc: Accelerator, model: torch.nn.Module,
                         optimizer: torch.optim.Optimizer, state: dict, fmt: str) -> None:
    """Every process loads the full saved state; under FSDP each keeps its own shard."""
    if fmt == "by_index" and is_sharded(acc):
        raise ConfigError("this checkpoint's optimizer state was saved without FSDP (by parameter "
                          "index); resume it the way it was launched (DDP or one process)")
    if fmt == "by_name":
        set_optimizer_state_dict(model, _inner(optimizer), state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def load_model_state(acc: Accelerator, model: torch.nn.Module,
                     state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load the full (unwrapped) state into ``model``; every process calls this. Returns the
    missing and unexpected keys."""
    if is_sharded(acc):
        keys = set_model_state_dict(model, state,
                                    options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        keys = acc.unwrap_model(model).load_state_dict(state, strict=False)
    return list(keys.missing_keys), list(keys.unexpected_keys)


def by_name(acc: Accelerator) -> bool:
    """Whether the optimizer state is saved by parameter name (FSDP's sharded state)."""
    return is_sharded(acc)


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper


_PEER_FAILURE = re.compile(r"gloo|nccl|connection (closed|reset)|timed out|timeout|broken pipe",
                           re.IGNORECASE)


def lost_peer(error: BaseException) -> str | None:
    """A one-line explanation when ``error`` is a collective that failed because another process
    of the launch died or stopped answering (for ``train.dist_timeout_s``); None otherwise."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    if not (isinstance(error, dist.DistError) or (isinstance(error, RuntimeError)
                                                   and _PEER_FAILURE.search(str(error)))):
        return None
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    return (f"process {dist.get_rank()} of {dist.get_world_size()} lost the others of its launch "
            f"(a process or node died, or stopped answering for train.dist_timeout_s): {first}; "
            "the newest checkpoint is kept: relaunch every node with run.resume=auto")
