"""The report of scripts/compare_methods.py: one mean +- std table, the papers' claims checked with
paired seed differences per budget and augmentation, a plot of zero-shot accuracy against training
time, the earlier (confounded) numbers, and the commands."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

# The v1 comparison's headline numbers, copied from its docs/results.md: each method ran under its
# own augmentation, so they are quoted as confounded, never compared with the v2 rows.
CONFOUNDED = Path(__file__).resolve().parents[2] / "docs" / "results-v1.json"
# Comparison v2's two full runs (also in scripts/compare_methods.py's docstring), named at the
# top of every report so that each of the two says how both were made.
FULL_RUNS = (
    "# ~1.5-2 h, writes docs/results.md",
    ".venv/bin/python scripts/compare_methods.py",
    "# 16x the samples (204,800 a run): ~13 h here, writes docs/results-no-colour.md",
    ".venv/bin/python scripts/compare_methods.py --task no-colour --augment clip,slip,aclip",
)
ZEROSHOT = ("zeroshot_shape", "zeroshot_colour")
COLUMNS = [  # (key in a run's eval results, header)
    ("zeroshot_shape", "zero-shot shape"),
    ("zeroshot_colour", "zero-shot colour"),
    ("t2i_r1", "T→I R@1"),
    ("i2t_r1", "I→T R@1"),
    ("probe_shape", "probe shape"),
]


def upgrade(summary: dict) -> dict:
    """A v1 results.json (no augmentation axis, colour task) in the v2 shape, for --report-only."""
    if "augments" in summary:
        return summary
    runs = [{**r, "augment": "own"} for r in summary["runs"]]
    return {
        **summary,
        "task": "colour",
        "zeroshot_tasks": ["shape", "colour"],
        "augments": {"own": "each method's own pipeline (v1)"},
        "clip_time_budget_s": {"own": summary["clip_time_budget_s"]},
        "runs": runs,
    }


def columns(summary: dict) -> list[tuple[str, str]]:
    """The table's metrics: zero-shot only on the tasks the comparison evaluated."""
    tasks = {f"zeroshot_{t}" for t in summary["zeroshot_tasks"]}
    return [(k, h) for k, h in COLUMNS if k not in ZEROSHOT or k in tasks]


def primary_name(summary: dict) -> str:
    if "colour" in summary["zeroshot_tasks"]:
        return "zero-shot mean of shape and colour top-1"
    return "zero-shot shape top-1"


def primary(ev: dict) -> float:
    """The claims' metric: the mean of the zero-shot tasks the run was evaluated on."""
    return statistics.fmean(ev[k] for k in ZEROSHOT if k in ev)


def retrieval(ev: dict) -> float:
    """Recall@1 on the eval split, the mean of both directions (the papers' retrieval claims)."""
    return (ev["t2i_r1"] + ev["i2t_r1"]) / 2


def claim_metrics(summary: dict) -> list[tuple[str, Callable[[dict], float]]]:
    """What the claims are read on. The colour task: zero-shot alone, as in v1. The no-colour task
    adds retrieval: its captions teach count, size and position as well as shape, and at the
    budgets a CPU can give, retrieval learns where zero-shot shape stays near chance."""
    metrics = [(primary_name(summary), primary)]
    if summary["task"] != "colour":
        metrics.append(("retrieval R@1, mean of T→I and I→T", retrieval))
    return metrics


def _runs(summary: dict, budget: str, method: str, augment: str | None = None) -> list[dict]:
    runs = [
        r
        for r in summary["runs"]
        if r["budget"] == budget
        and r["method"] == method
        and (augment is None or r.get("augment") == augment)
    ]
    return sorted(runs, key=lambda r: r["seed"])


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    m = statistics.fmean(values) * scale
    s = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _budget_name(budget: str) -> str:
    return "equal samples" if budget == "samples" else "equal time"


def results_table(summary: dict) -> list[str]:
    cols = columns(summary)
    head = ["budget", "augmentation", "method", "weights", "params", "samples", "train s"]
    head += [h for _, h in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    params = summary["parameters"]
    for budget in ("samples", "time"):
        for aug in summary["augments"]:
            for m in summary["methods"]:
                runs = _runs(summary, budget, m["name"], aug)
                if not runs:
                    continue
                for weights in ("online", "ema") if m["has_ema"] else ("online",):
                    cells = [
                        _budget_name(budget),
                        aug,
                        m["name"],
                        weights,
                        f"{params[m['family']] / 1e6:.2f} M",
                        f"{statistics.fmean(r['samples'] for r in runs):,.0f}",
                        _mean_std([r["train_seconds"] for r in runs], scale=1.0, digits=0),
                    ]
                    cells += [_mean_std([r["eval"][weights][k] for r in runs]) for k, _ in cols]
                    lines.append("| " + " | ".join(cells) + " |")
    return lines


def paired(
    summary: dict,
    budget: str,
    a: str,
    b: str,
    weights: str = "online",
    augment: str | None = None,
    metric: Callable[[dict], float] = primary,
) -> dict | None:
    """Mean and standard error of `a - b` on `metric` (the primary one unless given) over seeds
    both have (under one augmentation when given)."""
    ra = {r["seed"]: r for r in _runs(summary, budget, a, augment)}
    rb = {r["seed"]: r for r in _runs(summary, budget, b, augment)}
    seeds = sorted(set(ra) & set(rb))
    if not seeds:
        return None
    diffs = [metric(ra[s]["eval"][weights]) - metric(rb[s]["eval"]["online"]) for s in seeds]
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("inf")
    return {"diff": mean, "se": se, "n": len(seeds)}


def verdict(d: dict, at_least: bool = False) -> str:
    """'holds' when the paired difference is beyond two standard errors in the claimed direction;
    for a '>=' claim, when it is not beyond two standard errors below zero. One seed has no
    standard error, so no verdict."""
    if d.get("n", 2) < 2:
        return "one seed: no verdict"
    if at_least:
        if d["diff"] < -2 * d["se"]:
            return "does not hold (worse)"
        return "holds" if d["diff"] >= 0 else "holds within noise (slightly lower, < 2 SE)"
    if d["diff"] > 2 * d["se"]:
        return "holds"
    if d["diff"] < -2 * d["se"]:
        return "does not hold (reversed)"
    return "not resolved (within 2 SE)"


class Claim(NamedTuple):
    """A paper's claim: `a` (its `weights`) beats `b` (online) under each of `budgets`; an
    `at_least` claim only says `a` is no worse."""

    text: str
    budgets: tuple[str, ...]
    a: str
    b: str
    weights: str = "online"
    at_least: bool = False


BOTH = ("samples", "time")
CLAIMS = [
    Claim("A-CLIP > CLIP", BOTH, "aclip", "clip"),
    Claim("A-CLIP (EMA weights) > CLIP", ("samples",), "aclip", "clip", "ema"),
    Claim("A-CLIP-eff > CLIP", ("time",), "aclip-eff", "clip"),
    Claim(
        "attentive > random removal, 1 view x 50%", ("samples",), "attentive-1x50", "random-1x50"
    ),
    Claim(
        "attentive > random removal, 2 views x 50%", ("samples",), "attentive-2x50", "random-2x50"
    ),
    Claim(
        "keeping the most-attended > removing them (AttMask-high), 2 x 50%",
        ("samples",),
        "attentive-2x50",
        "attmask-high",
    ),
    Claim("MS-CLIP >= CLIP", BOTH, "msclip", "clip", at_least=True),
    # issue 16's rows (--methods clip,clip-siglip,clip-x8-exact,clip-x8-independent)
    Claim(
        "exact > independent accumulation, 8 x 128",
        ("samples",),
        "clip-x8-exact",
        "clip-x8-independent",
    ),
    Claim("batch 8 x 128 exact >= batch 128", ("samples",), "clip-x8-exact", "clip", at_least=True),
    Claim("SigLIP >= CLIP loss", ("samples",), "clip-siglip", "clip", at_least=True),
]


def claims_table(summary: dict) -> list[str]:
    """One row per claim x budget x augmentation that the comparison ran (x metric, where the
    task reads claims on more than one)."""
    metrics = claim_metrics(summary)
    several = len(metrics) > 1
    what = "difference" if several else f"difference in {metrics[0][0]}"
    head = ["claim", "budget", "augmentation", *(["metric"] if several else [])]
    head += [f"{what} (points, mean ± SE over paired seeds)", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for claim in CLAIMS:
        for name, metric in metrics:
            for budget in claim.budgets:
                for aug in summary["augments"]:
                    d = paired(summary, budget, claim.a, claim.b, claim.weights, aug, metric)
                    if d is None:
                        continue
                    diff = f"{100 * d['diff']:+.1f} ± {100 * d['se']:.1f} (n={d['n']})"
                    cells = [claim.text, _budget_name(budget), aug, *([name] if several else [])]
                    cells += [diff, verdict(d, claim.at_least)]
                    lines.append("| " + " | ".join(cells) + " |")
    p = summary["parameters"]
    if "msclip" not in {m["name"] for m in summary["methods"]}:
        return lines
    cells = ["MS-CLIP has fewer parameters than CLIP", "any", "any", *(["size"] if several else [])]
    cells += [
        f"{p['msclip']:,} vs {p['clip']:,}",
        "holds" if p["msclip"] < p["clip"] else "does not hold",
    ]
    lines.append("| " + " | ".join(cells) + " |")
    return lines


def confounded_section(path: Path = CONFOUNDED) -> list[str]:
    """The v1 comparison's headline numbers, labelled as confounded by augmentation."""
    if not path.is_file():
        return []
    v1 = json.loads(path.read_text())
    lines = [
        "## Earlier confounded numbers (v1, not comparable with the tables above)",
        "",
        f"The comparison of {v1['date']} trained {v1['confound']}. Its differences between methods "
        "therefore mix the method with the augmentation; they are quoted here as they were "
        f"published ({v1['metric']}), not as evidence for or against any claim.",
        "",
        "| budget | method | its own augmentation | samples | zero-shot shape | zero-shot colour |",
        "|---|---|---|---|---|---|",
    ]
    for r in v1["rows"]:
        cells = [_budget_name(r["budget"]), r["method"], r["augment"], r["samples"]]
        lines.append("| " + " | ".join(cells + [r["zeroshot_shape"], r["zeroshot_colour"]]) + " |")
    lines += ["", "| claim (v1, confounded) | difference | verdict then |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['difference']} | {c['verdict']} |" for c in v1["claims"]]
    return lines + [""]


def _series(summary: dict):
    """(method, augmentation, time curves over seeds) of every equal-time arm that has curves."""
    for m in summary["methods"]:
        for aug in summary["augments"]:
            curves = [r["curve"] for r in _runs(summary, "time", m["name"], aug) if r.get("curve")]
            if curves:
                yield m, aug, curves


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = summary["zeroshot_tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    axes = list(axes[0])
    cmap = plt.get_cmap("tab10")
    names = [m["name"] for m in summary["methods"]]
    styles = dict(zip(summary["augments"], ("-", "--", ":", "-."), strict=False))
    for m, aug, curves in _series(summary):
        n = min(len(c) for c in curves)
        xs = [statistics.fmean(c[j]["train_seconds"] for c in curves) for j in range(n)]
        colour = cmap(names.index(m["name"]) % 10)
        for ax, task in zip(axes, tasks, strict=True):
            ys = [
                100 * statistics.fmean(c[j][f"zeroshot_{task}"] for c in curves) for j in range(n)
            ]
            label = f"{m['name']} ({aug})"
            ax.plot(xs, ys, styles[aug], marker="o", ms=3, color=colour, label=label)
    titles = {"shape": "shape (6 classes, chance 16.7%)", "colour": "colour (8, chance 12.5%)"}
    for ax, task in zip(axes, tasks, strict=True):
        ax.set_title(f"zero-shot {titles[task]}, held-out pairs")
        ax.set_xlabel("training time (s, 2 CPU cores)")
        ax.set_ylabel("top-1 (%), mean over seeds")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, ncol=2)
    fig.suptitle(
        "Equal wall-clock runs: zero-shot accuracy along training\n(line style: augmentation)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def commands(summary: dict) -> list[str]:
    seed = min(r["seed"] for r in summary["runs"])
    lines = ["```bash", f".venv/bin/python {summary['script']}", "# what it runs, per seed:"]
    for aug in summary["augments"]:
        for m in summary["methods"]:
            rec = next(r for r in _runs(summary, "samples", m["name"], aug) if r["seed"] == seed)
            lines.append(rec["command"])
    zeroshot = [
        f"clipkit zero-shot demo --data-root DATA --task {t} --checkpoint RUN --workers 0 -o F"
        for t in summary["zeroshot_tasks"]
    ]
    lines += [
        "# and for each run (RUN = its folder; --weights ema too where the method has an EMA):",
        *zeroshot,
        "clipkit retrieve eval --data DATA/eval --checkpoint RUN --workers 0 -o F",
        "clipkit probe demo --data-root DATA --task shape --checkpoint RUN --no-cache -o F",
        "```",
    ]
    return lines


def _time_budget(summary: dict) -> str:
    """The equal-wall-clock sentence, when the comparison ran that budget (`--budgets`)."""
    if not _has_time_runs(summary):
        return ""
    budgets = ", ".join(f"{s:.0f} s under {a}" for a, s in summary["clip_time_budget_s"].items())
    return (
        f"Equal wall-clock: CLIP's median training time under the same augmentation ({budgets}), "
        "converted into each method's samples with its own measured seconds per sample under it. "
    )


def _has_time_runs(summary: dict) -> bool:
    return any(r["budget"] == "time" for r in summary["runs"])


def _task_text(summary: dict) -> str:
    augments = "; ".join(f"`{a}`: {d}" for a, d in summary["augments"].items())
    if summary["task"] == "colour":
        data = "captions name the shape and the colour (`--captions all`)"
        evals = ""
    else:
        data = "captions never name a colour (`--captions no-colour`; same images)"
        evals = (
            " Zero-shot colour is not evaluated: the captions never name a colour, so a classifier"
            " built from colour prompts would measure nothing the training taught. The claims are"
            " read on zero-shot shape and on retrieval recall@1 (held-out pairs, the mean of both"
            " directions), since these captions also name count, size and position."
        )
    return f"Task: {data}. Every method runs under each augmentation ({augments}).{evals}"


def write_report(summary: dict, path: Path, plot_path: Path) -> bool:
    """Write the markdown report (and the plot, where there are equal-time runs to draw); returns
    whether a plot was drawn."""
    summary = upgrade(summary)
    drawn = _has_time_runs(summary)
    if drawn:
        plot(summary, plot_path)
    s = summary["setup"]
    rel_plot = os.path.relpath(Path(plot_path).resolve(), Path(path).resolve().parent)
    text = [
        "# Method comparison at small scale",
        "",
        f"Generated by `{summary['script']}` on {summary['date']} ({summary['machine']}); "
        f"whole comparison {summary['total_seconds'] / 60:.1f} min.",
        "",
        "How to reproduce comparison v2 (3 seeds, equal samples and equal time, 2 CPU cores):",
        "",
        "```bash",
        *FULL_RUNS,
        "```",
        "",
        f"Data: `clipkit data demo`, {s['train_samples']:,} training pairs at {s['image_size']} "
        "px; evaluation on the held-out (shape, colour) pairs. Models: both towers width "
        f"{s['width']}, depth {s['layers']}, {s['heads']} heads, patch {s['patch_size']}, "
        f"context {s['context']}; MS-CLIP is the same width/depth with one shared Transformer. "
        f"Every run: batch {s['batch']}, lr {s['lr']}, warmup {s['warmup_share']:.0%} of "
        f"the steps, cosine, AdamW wd 0.2, seeds {s['seeds']}. Equal samples: "
        f"{s['samples']:,} pairs per run. {_time_budget(summary)}A-CLIP rows: EMA momentum "
        f"{s['ema_momentum']} -> 1 (cosine) and SSL heads {s['ssl_dims'][0]}/{s['ssl_dims'][1]} "
        "wide (see notes).",
        "",
        _task_text(summary),
        "",
        "## Results (mean ± std over seeds, %)",
        "",
        *results_table(summary),
        "",
        "## The papers' claims at this scale",
        "",
        *claims_table(summary),
        "",
        *(
            [f"![zero-shot accuracy against training time]({rel_plot})", ""]
            if _has_time_runs(summary)
            else []
        ),
        *([] if "own" in summary["augments"] else confounded_section()),  # v1 quotes itself
        "## Commands",
        "",
        *commands(summary),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    notes = path.parent / (path.stem + ".notes.md")
    if notes.is_file():  # hand-written reading of the numbers, kept across regenerations
        text += [notes.read_text()]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(text))
    tmp.replace(path)
    return drawn
