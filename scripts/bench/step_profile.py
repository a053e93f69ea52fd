#!/usr/bin/env python
"""Where a training step's time goes, in clipkit's trainer or open_clip's, measured the same way.

    python step_profile.py clipkit  RUN_DIR -- <clipkit pretrain arguments>
    python step_profile.py open_clip RUN_DIR -- <open_clip_train.main arguments>

Runs the trainer in this process (clipkit in clipkit's venv, open_clip_train in the reference
venv) with wall-clock timers wrapped around the library functions both trainers call: the image
and text towers' forward (open_clip's `CLIP.encode_image` / `encode_text`, the same model code on
both sides), the contrastive loss, `Tensor.backward`, gradient clipping, the AdamW step and
`zero_grad`, and the wait for the next batch (`_BaseDataLoaderIter.__next__`). Timers start after
`--warmup-steps` optimizer steps; "other" is the rest of the step time (the trainer's own loop:
logging, checks, learning-rate updates, moving tensors). Also reports the CPU time the trainer's
process and its data workers used over the timed steps, in cores. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timers import timed  # noqa: E402

SPENT: dict[str, float] = {}
STEP_ENDS: list[float] = []
CPU_MARKS: list[tuple[float, float]] = []  # (trainer process CPU s, data workers' CPU s)
TICKS = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int | str) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        kids += [int(k) for k in text]
    return kids + [g for k in kids for g in _children(k)]


def cpu_now() -> tuple[float, float]:
    workers = 0.0
    for kid in _children(os.getpid()):
        try:
            workers += _proc_cpu(kid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return _proc_cpu("self"), workers


class Armed:
    """Timers count only after the warm-up steps (start-up, first allocations, autotuning)."""

    on = False


def armed_timer(name: str, fn):
    inner = timed(SPENT, name, fn)
    state = {"depth": 0}

    def wrapper(*args, **kwargs):
        if not Armed.on or state["depth"]:  # count a re-entrant call once
            return fn(*args, **kwargs)
        state["depth"] += 1
        try:
            return inner(*args, **kwargs)
        finally:
            state["depth"] -= 1

    return wrapper


def install(tool: str, warmup_steps: int) -> None:
    import open_clip.model
    from torch.utils.data import dataloader

    clip_cls = open_clip.model.CLIP
    clip_cls.encode_image = armed_timer("forward image", clip_cls.encode_image)
    clip_cls.encode_text = armed_timer("forward text", clip_cls.encode_text)
    torch.Tensor.backward = armed_timer("backward", torch.Tensor.backward)
    torch.nn.utils.clip_grad_norm_ = armed_timer("clip gradients", torch.nn.utils.clip_grad_norm_)
    it = dataloader._BaseDataLoaderIter
    it.__next__ = armed_timer("data wait", it.__next__)
    adamw = torch.optim.AdamW
    adamw.zero_grad = armed_timer("zero_grad", adamw.zero_grad)
    step = armed_timer("optimizer", adamw.step)

    def counted_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        STEP_ENDS.append(time.perf_counter())
        if len(STEP_ENDS) >= warmup_steps:  # CPU at the warm-up's end, and at the latest step
            Armed.on = True
            CPU_MARKS[1 if CPU_MARKS else 0 :] = [cpu_now()]
        return out

    adamw.step = counted_step
    if tool == "clipkit":
        import clipkit.methods.base as base

        base.clip_loss = armed_timer("loss", base.clip_loss)
    else:
        import open_clip.loss

        loss_cls = open_clip.loss.ClipLoss
        loss_cls.forward = armed_timer("loss", loss_cls.forward)


def run(tool: str, out: Path, args: list[str]) -> None:
    if tool == "clipkit":
        from clipkit.cli.main import cli

        cli.main(["pretrain", "--out", str(out), *args], prog_name="clipkit")
    else:
        from open_clip_train.main import main

        main(["--logs", str(out), *args])


def report(tool: str, warmup_steps: int) -> dict:
    steps = len(STEP_ENDS) - warmup_steps
    wall = STEP_ENDS[-1] - STEP_ENDS[warmup_steps - 1]
    phases = {k: v / steps for k, v in sorted(SPENT.items())}
    per_step = wall / steps
    phases["other"] = per_step - sum(phases.values())
    (main0, workers0), (main1, workers1) = CPU_MARKS
    return {
        "tool": tool,
        "timed_steps": steps,
        "seconds_per_step": per_step,
        "phases_s": phases,
        "trainer_cores": (main1 - main0) / wall,
        "worker_cores": (workers1 - workers0) / wall,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("tool", choices=["clipkit", "open_clip"])
    p.add_argument("out", type=Path, help="run / logs folder of the trainer")
    p.add_argument("--warmup-steps", type=int, default=3, help="steps before timing starts")
    argv = sys.argv[1:]
    if "--" not in argv:
        p.error("the trainer's arguments follow --")
    cut = argv.index("--")
    a, args = p.parse_args(argv[:cut]), argv[cut + 1 :]
    install(a.tool, a.warmup_steps)
    run(a.tool, a.out, args)
    print(json.dumps(report(a.tool, a.warmup_steps)), flush=True)


if __name__ == "__main__":
    main()
