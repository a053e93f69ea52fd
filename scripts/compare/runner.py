"""How scripts/compare_methods.py trains and evaluates: one method under one augmentation (an
`Arm`) per run, every clipkit command run in this process through clipkit's own CLI, a record per
run written last so that an interrupted comparison resumes where it stopped."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import statistics
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

from clipkit.run_dir import RunDir, step_of

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    flags: list[str]
    family: str = "clip"  # which model JSON: "clip" (separate towers) or "msclip"
    has_ema: bool = False
    group: str = "main"  # "main" methods, the A-CLIP "ablation" rows, or the "batch" rows
    accum: int = 1  # micro-batches per step (--accum-steps): the step sees accum x batch samples


@dataclass
class Setup:
    """Sizes of one mode. `width`/`layers` are shared by both towers of every model."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    context: int
    batch: int
    samples: int  # per equal-samples run
    train_samples: int  # demo training pairs
    eval_samples: int  # held-out pairs (zero-shot test split and retrieval)
    probe_samples: int  # labelled images the probe trains on
    seeds: list[int]
    curve_points: int  # checkpoints evaluated along each equal-time run
    lr: float = 1e-3
    warmup_share: float = 0.1
    ema_momentum: float = 0.9
    extra: dict = field(default_factory=dict)

    @property
    def heads(self) -> int:
        return max(1, self.width // 32)

    def ssl_dims(self) -> tuple[int, int]:
        """A-CLIP's SSL heads (4096 hidden, 256 out at ViT width 768) scaled to this width."""
        hidden = max(32, round(4096 * self.width / 768 / 32) * 32)
        return hidden, max(32, round(256 * self.width / 768 / 32) * 32)


LOG: list[Path] = []  # where clipkit's own output goes (the current run's log.txt)


def clipkit(*argv: str | int | float) -> None:
    """Run one clipkit command in this process, exactly as the shell would parse it; its output
    goes to the current run's log.txt (the last lines are shown if it fails)."""
    from clipkit.cli.main import cli

    args = [str(a) for a in argv]
    LOG[-1].parent.mkdir(parents=True, exist_ok=True)
    with open(LOG[-1], "a") as f, redirect_stdout(f), redirect_stderr(f):
        print(f"$ clipkit {shlex.join(args)}", flush=True)
        # the CLI's logging.basicConfig binds the stderr of its first call; rebind it to this log
        logging.getLogger().handlers.clear()
        start = time.perf_counter()
        try:
            cli.main(args, prog_name="clipkit")
            code = 0
        except SystemExit as e:
            code = e.code or 0
        print(f"# exit {code} after {time.perf_counter() - start:.2f} s", flush=True)
    if code:
        tail = "\n".join(LOG[-1].read_text().splitlines()[-5:])
        raise RuntimeError(f"`clipkit {shlex.join(args)}` exited with {code}:\n{tail}")


@dataclass(frozen=True)
class Arm:
    """One method under one augmentation pipeline: what a row of the comparison trains."""

    spec: MethodSpec
    augment: str

    @property
    def flags(self) -> list[str]:
        # The demo captions name colours, so colour changes would contradict them: every pipeline
        # runs without, except A-CLIP's own, asked for by name for the no-colour task.
        photometric = [] if self.augment == "aclip" else ["--no-photometric"]
        return [*self.spec.flags, "--augment", self.augment, *photometric]

    def folder(self, budget: str, seed: int) -> str:
        return f"{budget}-{self.augment}-{self.spec.name}-s{seed}"


def pretrain_argv(arm: Arm, setup: Setup, data: Path, model: Path, run: Path, seed: int,
                  samples: int) -> list:  # fmt: skip
    spec = arm.spec
    steps = max(1, samples // (setup.batch * spec.accum))
    save_every = max(1, -(-steps // setup.curve_points))  # ceil: no point right before the end
    hidden, embed = setup.ssl_dims()
    argv = [
        "pretrain", "--data", data / "train", "--out", run, "--model", model,
        "--steps", steps, "--batch-size", setup.batch, "--lr", setup.lr,
        "--warmup", max(1, round(setup.warmup_share * steps)), "--seed", seed,
        "--workers", 2, "--log-every", 1, "--save-every", save_every, *arm.flags,
    ]  # fmt: skip
    if spec.flags[spec.flags.index("--method") + 1] not in ("clip", "flip"):  # A-CLIP family
        argv += ["--ema-momentum", setup.ema_momentum]
        argv += ["--ssl-hidden-dim", hidden, "--ssl-embed-dim", embed]
    return argv


def evaluate(ckpt: Path, data: Path, weights: str, out: Path, tasks, full: bool = True) -> dict:
    """Zero-shot on `tasks` (+ retrieval and linear probe when `full`) of one checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    common = ["--checkpoint", ckpt, "--weights", weights, "--workers", 0, "--device", "cpu"]
    results = {}
    for task in tasks:
        f = out / f"zeroshot_{task}.json"
        clipkit("zero-shot", "demo", "--data-root", data, "--task", task, *common, "-o", f)
        results[f"zeroshot_{task}"] = json.loads(f.read_text())["metrics"]["acc1"]
    if not full:
        return results
    f = out / "retrieval.json"
    clipkit("retrieve", "eval", "--data", data / "eval", *common, "-o", f)
    m = json.loads(f.read_text())["metrics"]
    results["t2i_r1"] = m["image_retrieval_recall@1"]
    results["i2t_r1"] = m["text_retrieval_recall@1"]
    results["t2i_r5"] = m["image_retrieval_recall@5"]
    results["i2t_r5"] = m["text_retrieval_recall@5"]
    f = out / "probe_shape.json"
    clipkit("probe", "demo", "--data-root", data, "--task", "shape", *common, "--no-cache", "-o", f)
    results["probe_shape"] = json.loads(f.read_text())["metrics"]["lp_acc1"]
    return results


@dataclass
class Comparison:
    """What every run of one comparison shares, and the records of the runs done so far."""

    setup: Setup
    data: Path
    models: dict[str, Path]
    out: Path
    tasks: tuple[str, ...]  # zero-shot tasks evaluated
    keep_checkpoints: bool
    runs: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def run(self, arm: Arm, seed: int, samples: int, budget: str, curve: bool) -> None:
        rec = train_and_evaluate(self, arm, seed, samples, budget, curve)
        zs = rec["eval"]["online"]
        scores = " ".join(f"{t} {zs[f'zeroshot_{t}']:.3f}" for t in self.tasks)
        log(
            f"{budget:>7} {arm.augment:>5} {arm.spec.name:<15} seed {seed}: {rec['samples']} "
            f"samples in {rec['train_seconds']:.1f} s, zero-shot {scores} "
            f"(elapsed {time.perf_counter() - self.started:.0f} s)"
        )
        self.runs.append(rec)

    def equal_samples(self, arms: list[Arm], seeds: list[int]) -> None:
        """Every arm sees `setup.samples` pairs; arms alternate within a seed so that a slow spell
        of the machine does not fall on one of them only."""
        for seed in seeds:
            for arm in arms:
                self.run(arm, seed, self.setup.samples, "samples", curve=arm.spec.name == "clip")

    def time_budgets(self, arms: list[Arm]) -> tuple[dict, dict]:
        """Per augmentation: CLIP's median training time under it, and each method's median
        seconds per sample under it, from the equal-samples runs."""
        clip_time, per_sample = {}, {}
        for aug in dict.fromkeys(a.augment for a in arms):
            done = [r for r in self.runs if r["budget"] == "samples" and r["augment"] == aug]
            per_sample[aug] = {
                a.spec.name: statistics.median(
                    r["train_seconds"] / r["samples"] for r in done if r["method"] == a.spec.name
                )
                for a in arms
                if a.augment == aug
            }
            if clip := [r["train_seconds"] for r in done if r["method"] == "clip"]:
                clip_time[aug] = statistics.median(clip)
        return clip_time, per_sample

    def equal_time(self, arms: list[Arm], seeds: list[int], clip_time, per_sample) -> None:
        """Every arm trains for CLIP's median time under the same augmentation, converted into
        its samples with its own seconds per sample (CLIP's equal-samples run counts for both)."""
        for seed in seeds:
            for arm in arms:
                if arm.spec.name == "clip":
                    rec = next(
                        r
                        for r in self.runs
                        if r["budget"] == "samples"
                        and r["method"] == "clip"
                        and r["augment"] == arm.augment
                        and r["seed"] == seed
                    )
                    self.runs.append({**rec, "budget": "time"})
                    continue
                rate = per_sample[arm.augment][arm.spec.name]
                samples = max(self.setup.batch, round(clip_time[arm.augment] / rate))
                self.run(arm, seed, samples, "time", curve=True)


def train_and_evaluate(cmp: Comparison, arm: Arm, seed, samples, budget, curve) -> dict:
    """One run: train, then evaluate the final weights (and intermediate checkpoints if `curve`)."""
    run = cmp.out / "runs" / arm.folder(budget, seed)
    record_path = run / "record.json"
    if record_path.is_file():  # finished earlier: the comparison resumes where it stopped
        return json.loads(record_path.read_text())
    model = cmp.models[arm.spec.family]
    argv = pretrain_argv(arm, cmp.setup, cmp.data, model, run, seed, samples)
    wall = time.perf_counter()
    if run.exists():
        shutil.rmtree(run)  # a half-finished run from an interrupted comparison
    LOG.append(cmp.out / "logs" / f"{run.name}.txt")
    clipkit(*argv)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    record = {
        "method": arm.spec.name,
        "augment": arm.augment,
        "seed": seed,
        "budget": budget,
        "samples": last["samples_seen"],
        "train_seconds": last["train_seconds"],
        "final_loss": last["loss"],
        "command": "clipkit " + shlex.join(_relative(a) for a in argv),
        "eval": {},
        "curve": [],
    }
    layout = RunDir(run)
    for weights in ("online", "ema") if arm.spec.has_ema else ("online",):
        ev = evaluate(layout.latest, cmp.data, weights, run / f"eval-{weights}", cmp.tasks)
        record["eval"][weights] = ev
    if curve:
        seconds = {r["step"]: r["train_seconds"] for r in metrics}
        record["curve"] = _curve(cmp, layout, run, seconds, last["step"], record["eval"]["online"])
    record["wall_seconds"] = time.perf_counter() - wall
    if not cmp.keep_checkpoints:
        for ckpt in layout.checkpoints.glob("*.pt"):
            ckpt.unlink()
    tmp = record_path.with_suffix(".tmp")  # a killed comparison never leaves half a record
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(record_path)
    return record


def _curve(cmp: Comparison, layout: RunDir, run: Path, seconds: dict, last: int, final: dict):
    """Zero-shot accuracy of every saved checkpoint against its training time."""
    points = []
    for ckpt in layout.step_checkpoints():
        step = step_of(ckpt)
        if step == last:
            point = {f"zeroshot_{t}": final[f"zeroshot_{t}"] for t in cmp.tasks}
        else:
            folder = run / f"eval-step-{step}"
            point = evaluate(ckpt, cmp.data, "online", folder, cmp.tasks, full=False)
        points.append({"step": step, "train_seconds": seconds[step], **point})
    return points


def _relative(arg) -> str:
    """A path argument as the report prints it: relative to the repository root."""
    return os.path.relpath(arg, ROOT) if isinstance(arg, Path) else str(arg)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
