"""Data problems met while training, listed in ``<run>/data_issues.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator

from mim.engine.state import LoopState
from mim.errors import RunError


def record_label_issues(acc: Accelerator, run_dir: Path, state: LoopState, issues: list[str],
                        split: str) -> None:
    """List label problems found while loading (dropped boxes, malformed lines) in
    data_issues.jsonl, the way validation's are listed at start-up; the first one is printed."""
    if not issues:
        return
    if not state.extra.get("warned_label_issues"):
        acc.print(f"warning: {issues[0]} ('{split}' split); all are listed in data_issues.jsonl")
        state.extra["warned_label_issues"] = True
    with open(run_dir / "data_issues.jsonl", "a") as f:
        f.writelines(json.dumps({"split": split, "issue": issue, "rank": acc.process_index,
                                 "step": state.step}) + "\n" for issue in issues)


def record_bad_samples(acc: Accelerator, run_dir: Path, state: LoopState, bad: list,
                       seen: set, max_bad: int | None = None, max_fraction: float = 0.0) -> None:
    """Count each unreadable file once and list it in data_issues.jsonl (path, error, rank);
    more than ``max_bad`` on this process stops the run."""
    new = [(p, err) for p, err in bad if p not in seen]
    if not new:
        return
    seen.update(p for p, _ in new)
    state.bad_samples += len(new)
    with open(run_dir / "data_issues.jsonl", "a") as f:
        for path, err in new:
            f.write(json.dumps({"rank": acc.process_index, "path": path, "error": err,
                                "step": state.step}) + "\n")
    acc.print(f"warning: skipped unreadable image {new[0][0]} ({new[0][1]}); "
              f"{state.bad_samples} so far, listed in data_issues.jsonl")
    if max_bad is not None and state.bad_samples > max_bad:
        raise RunError(f"{state.bad_samples} unreadable images, more than data.max_bad_fraction="
                       f"{max_fraction} of the data; see {run_dir}/data_issues.jsonl")
