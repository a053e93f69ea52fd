#!/usr/bin/env python
"""Method comparison at small scale: CLIP, FLIP, A-CLIP, A-CLIP-eff, MS-CLIP and the A-CLIP
ablation rows, trained on the built-in demo data with matched width/depth, at equal samples seen
and at equal wall-clock, over several seeds; each run evaluated with `clipkit zero-shot`,
`clipkit retrieve eval` and `clipkit probe` (online weights, and the EMA image tower where the
method keeps one). Writes results.json, a markdown report and a plot of zero-shot accuracy against
training time.

    .venv/bin/python scripts/compare_methods.py                 # full: ~55 min on 2 CPU cores
    .venv/bin/python scripts/compare_methods.py --quick         # a few minutes
    .venv/bin/python scripts/compare_methods.py --report-only   # redraw from results.json

Every method gets the same data, batch, learning rate, warmup share, schedule and seeds; nothing
is tuned per method. Every command runs in this process through clipkit's own CLI (the exact shell
equivalents are printed into the report) so that ~300 evaluations do not pay ~300 interpreter
start-ups; training time is the trainer's own `train_seconds` (steps only: no start-up, no
checkpoint writes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import statistics
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # one line per run instead of ~400 progress bars
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from compare.report import write_report  # noqa: E402

from clipkit.run_dir import RunDir, step_of  # noqa: E402

# A-CLIP's Table 2a/2b rows are CLIP-loss only (spec Sec. 5.3); the full methods keep SimCLR+BYOL.
CLIP_ONLY = ["--simclr-weight", "0", "--byol-weight", "0", "--keep-ratio", "0.5"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    flags: list[str]
    family: str = "clip"  # which model JSON: "clip" (separate towers) or "msclip"
    has_ema: bool = False
    group: str = "main"  # "main" methods, the A-CLIP "ablation" rows, or the "batch" rows
    accum: int = 1  # micro-batches per step (--accum-steps): the step sees accum x batch samples


METHODS = [
    MethodSpec("clip", ["--method", "clip"]),
    MethodSpec("flip", ["--method", "flip", "--mask-ratio", "0.5"]),
    MethodSpec("aclip", ["--method", "aclip"], has_ema=True),
    MethodSpec("aclip-eff", ["--method", "aclip-eff"], has_ema=True),
    MethodSpec("msclip", ["--method", "clip"], family="msclip"),
    MethodSpec(
        "random-1x50",
        ["--method", "aclip", "--random-blocks", "--num-views", "1", *CLIP_ONLY],
        group="ablation",
    ),
    MethodSpec(
        "random-2x50",
        ["--method", "aclip", "--random-blocks", "--num-views", "2", *CLIP_ONLY],
        group="ablation",
    ),
    MethodSpec(
        "attentive-1x50",
        ["--method", "aclip", "--attentive", "--num-views", "1", *CLIP_ONLY],
        has_ema=True,
        group="ablation",
    ),
    MethodSpec(
        "attentive-2x50",
        ["--method", "aclip", "--attentive", "--num-views", "2", *CLIP_ONLY],
        has_ema=True,
        group="ablation",
    ),
    MethodSpec(
        "attmask-high",
        ["--method", "attmask-high", "--num-views", "2", *CLIP_ONLY],
        has_ema=True,
        group="ablation",
    ),
]
# Issue 16: the loss and the contrastive batch, on CLIP (equal samples seen: a batch 8x larger
# takes 8x fewer steps). Not in the default set; ask for them with --methods.
BATCH_ROWS = [
    MethodSpec("clip-siglip", ["--method", "clip", "--loss", "siglip"], group="batch"),
    MethodSpec("clip-x8-exact", ["--method", "clip", "--accum-steps", "8"], group="batch", accum=8),
    MethodSpec(
        "clip-x8-independent",
        ["--method", "clip", "--accum-steps", "8", "--accum-mode", "independent"],
        group="batch",
        accum=8,
    ),
]
BY_NAME = {m.name: m for m in METHODS + BATCH_ROWS}


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


FULL = Setup(32, 4, 64, 4, 32, 128, 12_800, 10_000, 500, 1000, [0, 1, 2], 4)
QUICK = Setup(32, 8, 32, 2, 32, 32, 256, 512, 96, 96, [0, 1], 2)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 seeds (a few minutes)")
    p.add_argument("--out", help="working folder (default .bench/compare[-quick])")
    p.add_argument("--methods", help="comma-separated subset of: " + ", ".join(BY_NAME))
    p.add_argument("--seeds", help="comma-separated seeds (default full 0,1,2; quick 0,1)")
    p.add_argument("--samples", type=int, help="samples per equal-samples run")
    p.add_argument(
        "--budgets",
        default="samples,time",
        help="which budgets to run: samples, time or both (default); time needs samples first",
    )
    p.add_argument(
        "--report", help="markdown report (default docs/results.md; quick: OUT/results.md)"
    )
    p.add_argument("--plot", help="PNG path (default next to the report)")
    p.add_argument("--report-only", action="store_true", help="redraw from OUT/results.json")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep every run's weights")
    args = p.parse_args()
    args.setup = QUICK if args.quick else FULL
    args.budgets = set(args.budgets.split(","))
    if not args.budgets or not args.budgets <= {"samples", "time"}:
        p.error("--budgets: samples, time or samples,time")
    if args.seeds:
        args.setup.seeds = [int(s) for s in args.seeds.split(",")]
    if args.samples:
        args.setup.samples = args.samples
    args.methods = [BY_NAME[m] for m in args.methods.split(",")] if args.methods else METHODS
    args.out = Path(args.out or ROOT / ".bench" / ("compare-quick" if args.quick else "compare"))
    # the full run writes the project's docs; a quick run keeps its report next to its runs
    default_report = args.out / "results.md" if args.quick else ROOT / "docs" / "results.md"
    args.report = Path(args.report) if args.report else default_report
    default_plot = args.report.parent / "images" / "compare-zeroshot-time.png"
    args.plot = Path(args.plot) if args.plot else default_plot
    return args


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


def write_models(setup: Setup, folder: Path) -> dict[str, Path]:
    """open_clip-style JSON for CLIP and MS-CLIP of the same width, depth, embedding and grid."""
    folder.mkdir(parents=True, exist_ok=True)
    s = setup
    clip = {
        "embed_dim": s.width,
        "vision_cfg": {
            "image_size": s.image_size,
            "patch_size": s.patch_size,
            "width": s.width,
            "layers": s.layers,
            "head_width": s.width // s.heads,
        },
        "text_cfg": {
            "context_length": s.context,
            "vocab_size": 49408,
            "width": s.width,
            "heads": s.heads,
            "layers": s.layers,
        },
    }
    # Strides whose product is the patch size; one lateral fusion per stage over the depth.
    strides = [2] * (s.patch_size.bit_length() - 1) + [1] * (6 - s.patch_size.bit_length())
    slots = sorted(min(s.layers - 1, 1 + i * (s.layers - 1) // 5) for i in range(5))
    msclip = {
        "family": "msclip",
        "config": {
            "embed_dim": s.width,
            "image_size": s.image_size,
            "patch_size": s.patch_size,
            "width": s.width,
            "layers": s.layers,
            "heads": s.heads,
            "context_length": s.context,
            "stem_strides": strides,
            "branch_strides": strides,
            "lateral_slots": slots,
        },
    }
    paths = {"clip": folder / "clip.json", "msclip": folder / "msclip.json"}
    paths["clip"].write_text(json.dumps(clip, indent=1))
    paths["msclip"].write_text(json.dumps(msclip, indent=1))
    return paths


def parameter_count(model_json: Path) -> int:
    import torch

    from clipkit.config import ModelConfig
    from clipkit.models import factory

    cfg = ModelConfig(name=str(model_json))
    cfg.arch = factory.resolve_arch(cfg)
    with torch.device("meta"):
        model = factory.build(cfg)
    return sum(p.numel() for p in model.parameters())


def pretrain_argv(spec: MethodSpec, setup: Setup, data: Path, model: Path, run: Path, seed: int,
                  samples: int) -> list:  # fmt: skip
    steps = max(1, samples // (setup.batch * spec.accum))
    save_every = max(1, -(-steps // setup.curve_points))  # ceil: no point right before the end
    hidden, embed = setup.ssl_dims()
    argv = [
        "pretrain", "--data", data / "train", "--out", run, "--model", model,
        "--steps", steps, "--batch-size", setup.batch, "--lr", setup.lr,
        "--warmup", max(1, round(setup.warmup_share * steps)), "--seed", seed,
        "--workers", 2, "--log-every", 1, "--save-every", save_every, *spec.flags,
    ]  # fmt: skip
    if spec.flags[spec.flags.index("--method") + 1] not in ("clip", "flip"):  # A-CLIP family
        argv += ["--ema-momentum", setup.ema_momentum]
        argv += ["--ssl-hidden-dim", hidden, "--ssl-embed-dim", embed]
    return argv


def evaluate(ckpt: Path, data: Path, weights: str, out: Path, full: bool = True) -> dict:
    """Zero-shot shape and colour (+ retrieval and linear probe when `full`) of one checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    common = ["--checkpoint", ckpt, "--weights", weights, "--workers", 0, "--device", "cpu"]
    results = {}
    for task in ("shape", "colour"):
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


def train_and_evaluate(spec, setup, data, models, out, seed, samples, budget, curve, keep):
    """One run: train, then evaluate the final weights (and intermediate checkpoints if `curve`)."""
    run = out / "runs" / f"{budget}-{spec.name}-s{seed}"
    record_path = run / "record.json"
    if record_path.is_file():  # finished earlier: the comparison resumes where it stopped
        return json.loads(record_path.read_text())
    argv = pretrain_argv(spec, setup, data, models[spec.family], run, seed, samples)
    wall = time.perf_counter()
    if run.exists():
        shutil.rmtree(run)  # a half-finished run from an interrupted comparison
    LOG.append(out / "logs" / f"{run.name}.txt")
    clipkit(*argv)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    seconds = {r["step"]: r["train_seconds"] for r in metrics}
    last = metrics[-1]
    record = {
        "method": spec.name,
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
    latest = layout.latest
    for weights in ("online", "ema") if spec.has_ema else ("online",):
        record["eval"][weights] = evaluate(latest, data, weights, run / f"eval-{weights}")
    if curve:
        for ckpt in layout.step_checkpoints():
            step = step_of(ckpt)
            if step == last["step"]:
                point = {
                    k: record["eval"]["online"][k] for k in ("zeroshot_shape", "zeroshot_colour")
                }
            else:
                point = evaluate(ckpt, data, "online", run / f"eval-step-{step}", full=False)
            record["curve"].append({"step": step, "train_seconds": seconds[step], **point})
    record["wall_seconds"] = time.perf_counter() - wall
    if not keep:
        for ckpt in layout.checkpoints.glob("*.pt"):
            ckpt.unlink()
    tmp = record_path.with_suffix(".tmp")  # a killed comparison never leaves half a record
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(record_path)
    return record


def _relative(arg) -> str:
    """A path argument as the report prints it: relative to the repository root."""
    return os.path.relpath(arg, ROOT) if isinstance(arg, Path) else str(arg)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    args = parse_args()
    setup, out = args.setup, args.out
    results_path = out / "results.json"
    if args.report_only:
        write_report(json.loads(results_path.read_text()), args.report, args.plot)
        return
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    LOG.append(out / "logs" / "data.txt")
    if not (data / "demo.json").is_file():
        clipkit("data", "demo", "--out", data, "--train-samples", setup.train_samples,
                "--eval-samples", setup.eval_samples, "--probe-train-samples", setup.probe_samples,
                "--image-size", setup.image_size, "--shard-size", 500)  # fmt: skip
    models = write_models(setup, out / "models")
    params = {fam: parameter_count(path) for fam, path in models.items()}
    started = time.perf_counter()
    runs = []

    def run(spec, seed, samples, budget, curve):
        rec = train_and_evaluate(spec, setup, data, models, out, seed, samples, budget, curve,
                                 args.keep_checkpoints)  # fmt: skip
        zs = rec["eval"]["online"]
        log(
            f"{budget:>7} {spec.name:<15} seed {seed}: {rec['samples']} samples in "
            f"{rec['train_seconds']:.1f} s, zero-shot shape {zs['zeroshot_shape']:.3f} "
            f"colour {zs['zeroshot_colour']:.3f} (elapsed {time.perf_counter() - started:.0f} s)"
        )
        runs.append(rec)
        return rec

    # 1) equal samples: every method sees `setup.samples` pairs; methods alternate within a seed
    #    so a slow spell of the machine does not fall on one method only.
    for seed in setup.seeds:
        for spec in args.methods:
            run(spec, seed, setup.samples, "samples", curve=spec.name == "clip")
    # 2) equal wall-clock: CLIP's median training time, converted into each method's samples
    #    with its own median seconds per sample from step 1 (CLIP's run counts for both).
    per_sample = {
        spec.name: statistics.median(
            r["train_seconds"] / r["samples"] for r in runs if r["method"] == spec.name
        )
        for spec in args.methods
    }
    clip_time = statistics.median(r["train_seconds"] for r in runs if r["method"] == "clip")
    for seed in setup.seeds if "time" in args.budgets else ():
        for spec in args.methods:
            if spec.name == "clip":
                rec = next(r for r in runs if r["method"] == "clip" and r["seed"] == seed)
                runs.append({**rec, "budget": "time"})
                continue
            samples = max(setup.batch, round(clip_time / per_sample[spec.name]))
            run(spec, seed, samples, "time", curve=True)
    summary = {
        "setup": {**setup.__dict__, "heads": setup.heads, "ssl_dims": setup.ssl_dims()},
        "quick": args.quick,
        "parameters": params,
        "methods": [m.__dict__ for m in args.methods],
        "clip_time_budget_s": clip_time,
        "seconds_per_sample": per_sample,
        # every run's own wall-clock (CLIP's time-budget entry is its samples run, counted once),
        # so a comparison resumed from finished runs still reports what they took
        "total_seconds": sum(
            r.get("wall_seconds", 0.0)
            for r in runs
            if not (r["budget"] == "time" and r["method"] == "clip")
        ),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "script": shlex.join(["scripts/compare_methods.py", *sys.argv[1:]]),
        "runs": runs,
    }
    tmp = results_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(results_path)
    write_report(summary, args.report, args.plot)
    log(f"done in {summary['total_seconds'] / 60:.1f} min: {args.report}, {args.plot}")


def machine() -> str:
    import platform

    import torch

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
