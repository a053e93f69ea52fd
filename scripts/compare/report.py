"""The report of scripts/compare_methods.py: one mean +- std table, the papers' claims checked with
paired seed differences, a plot of zero-shot accuracy against training time, and the commands."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

COLUMNS = [  # (key in a run's eval results, header)
    ("zeroshot_shape", "zero-shot shape"),
    ("zeroshot_colour", "zero-shot colour"),
    ("t2i_r1", "T→I R@1"),
    ("i2t_r1", "I→T R@1"),
    ("probe_shape", "probe shape"),
]
PRIMARY = "zero-shot mean of shape and colour top-1"


def primary(ev: dict) -> float:
    return (ev["zeroshot_shape"] + ev["zeroshot_colour"]) / 2


def _runs(summary: dict, budget: str, method: str) -> list[dict]:
    runs = [r for r in summary["runs"] if r["budget"] == budget and r["method"] == method]
    return sorted(runs, key=lambda r: r["seed"])


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    m = statistics.fmean(values) * scale
    s = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def results_table(summary: dict) -> list[str]:
    head = ["budget", "method", "weights", "params", "samples", "train s"]
    head += [h for _, h in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    params = summary["parameters"]
    for budget in ("samples", "time"):
        for m in summary["methods"]:
            runs = _runs(summary, budget, m["name"])
            if not runs:
                continue
            for weights in ("online", "ema") if m["has_ema"] else ("online",):
                cells = [
                    "equal samples" if budget == "samples" else "equal time",
                    m["name"],
                    weights,
                    f"{params[m['family']] / 1e6:.2f} M",
                    f"{statistics.fmean(r['samples'] for r in runs):,.0f}",
                    _mean_std([r["train_seconds"] for r in runs], scale=1.0, digits=0),
                ]
                cells += [_mean_std([r["eval"][weights][k] for r in runs]) for k, _ in COLUMNS]
                lines.append("| " + " | ".join(cells) + " |")
    return lines


def paired(summary: dict, budget: str, a: str, b: str, weights: str = "online") -> dict | None:
    """Mean and standard error of `a - b` on the primary metric over seeds both have."""
    ra = {r["seed"]: r for r in _runs(summary, budget, a)}
    rb = {r["seed"]: r for r in _runs(summary, budget, b)}
    seeds = sorted(set(ra) & set(rb))
    if not seeds:
        return None
    diffs = [primary(ra[s]["eval"][weights]) - primary(rb[s]["eval"]["online"]) for s in seeds]
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


CLAIMS = [  # (claim, budget, method a, method b, a's weights, ">=" claim)
    ("A-CLIP > CLIP at equal samples", "samples", "aclip", "clip", "online", False),
    ("A-CLIP > CLIP at equal wall-clock", "time", "aclip", "clip", "online", False),
    ("A-CLIP (EMA weights) > CLIP at equal samples", "samples", "aclip", "clip", "ema", False),
    ("A-CLIP-eff > CLIP at equal wall-clock", "time", "aclip-eff", "clip", "online", False),
    (
        "attentive > random removal, 1 view x 50%",
        "samples",
        "attentive-1x50",
        "random-1x50",
        "online",
        False,
    ),  # fmt: skip
    (
        "attentive > random removal, 2 views x 50%",
        "samples",
        "attentive-2x50",
        "random-2x50",
        "online",
        False,
    ),  # fmt: skip
    (
        "keeping the most-attended > removing them (AttMask-high), 2 x 50%",
        "samples",
        "attentive-2x50",
        "attmask-high",
        "online",
        False,
    ),  # fmt: skip
    ("MS-CLIP >= CLIP (equal samples)", "samples", "msclip", "clip", "online", True),
    ("MS-CLIP >= CLIP (equal wall-clock)", "time", "msclip", "clip", "online", True),
    # issue 16's rows (--methods clip,clip-siglip,clip-x8-exact,clip-x8-independent)
    (
        "exact > independent accumulation, 8 x 128 (equal samples)",
        "samples",
        "clip-x8-exact",
        "clip-x8-independent",
        "online",
        False,
    ),  # fmt: skip
    (
        "batch 8 x 128 exact >= batch 128 (equal samples)",
        "samples",
        "clip-x8-exact",
        "clip",
        "online",
        True,
    ),  # fmt: skip
    ("SigLIP >= CLIP loss (equal samples)", "samples", "clip-siglip", "clip", "online", True),
]


def claims_table(summary: dict) -> list[str]:
    lines = [
        f"| claim | difference in {PRIMARY} (points, mean ± SE over paired seeds) | verdict |",
        "|---|---|---|",
    ]
    for claim, budget, a, b, weights, at_least in CLAIMS:
        d = paired(summary, budget, a, b, weights)
        if d is None:
            continue
        diff = f"{100 * d['diff']:+.1f} ± {100 * d['se']:.1f} (n={d['n']})"
        lines.append(f"| {claim} | {diff} | {verdict(d, at_least)} |")
    p = summary["parameters"]
    if "msclip" not in {m["name"] for m in summary["methods"]}:
        return lines
    lines.append(
        f"| MS-CLIP has fewer parameters than CLIP | {p['msclip']:,} vs {p['clip']:,} | "
        f"{'holds' if p['msclip'] < p['clip'] else 'does not hold'} |"
    )
    return lines


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(summary["methods"]):
        runs = _runs(summary, "time", m["name"])
        curves = [r["curve"] for r in runs if r.get("curve")]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        xs = [statistics.fmean(c[j]["train_seconds"] for c in curves) for j in range(n)]
        style = "-" if m["group"] == "main" else "--"
        for ax, key in zip(axes, ("zeroshot_shape", "zeroshot_colour"), strict=True):
            ys = [100 * statistics.fmean(c[j][key] for c in curves) for j in range(n)]
            ax.plot(xs, ys, style, marker="o", ms=3, color=cmap(i % 10), label=m["name"])
    titles = ("shape (6 classes, chance 16.7%)", "colour (8, chance 12.5%)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(f"zero-shot {title}, held-out pairs")
        ax.set_xlabel("training time (s, 2 CPU cores)")
        ax.set_ylabel("top-1 (%), mean over seeds")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, ncol=2)
    fig.suptitle("Equal wall-clock runs: zero-shot accuracy along training")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def commands(summary: dict) -> list[str]:
    seed = min(r["seed"] for r in summary["runs"])
    lines = ["```bash", f".venv/bin/python {summary['script']}", "# what it runs, per seed:"]
    for m in summary["methods"]:
        rec = next(r for r in _runs(summary, "samples", m["name"]) if r["seed"] == seed)
        lines.append(rec["command"])
    lines += [
        "# and for each run (RUN = its folder; --weights ema too where the method has an EMA):",
        "clipkit zero-shot demo --data-root DATA --task shape --checkpoint RUN --workers 0 -o F",
        "clipkit zero-shot demo --data-root DATA --task colour --checkpoint RUN --workers 0 -o F",
        "clipkit retrieve eval --data DATA/eval --checkpoint RUN --workers 0 -o F",
        "clipkit probe demo --data-root DATA --task shape --checkpoint RUN --no-cache -o F",
        "```",
    ]
    return lines


def _time_budget(summary: dict) -> str:
    """The equal-wall-clock sentence, when the comparison ran that budget (`--budgets`)."""
    if not _has_time_runs(summary):
        return ""
    return (
        f"Equal wall-clock: CLIP's median training time ({summary['clip_time_budget_s']:.0f} s), "
        "converted into each method's samples with its own measured seconds per sample. "
    )


def _has_time_runs(summary: dict) -> bool:
    return any(r["budget"] == "time" for r in summary["runs"])


def write_report(summary: dict, path: Path, plot_path: Path) -> None:
    if _has_time_runs(summary):
        plot(summary, plot_path)
    s = summary["setup"]
    rel_plot = os.path.relpath(Path(plot_path).resolve(), Path(path).resolve().parent)
    text = [
        "# Method comparison at small scale",
        "",
        f"Generated by `{summary['script']}` on {summary['date']} ({summary['machine']}); "
        f"whole comparison {summary['total_seconds'] / 60:.1f} min.",
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
