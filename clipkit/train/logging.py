"""Run logs: metrics.jsonl (one object per record) and its reports: TensorBoard events, W&B
(`--report-to`), curves.png.

Three kinds of record share metrics.jsonl, told apart by their keys:
- training: `{"step", "samples_seen", "train_seconds", "loss", <loss parts>, "lr", ...}`;
- evaluation: `{"step", "samples_seen", "eval": NAME, "weights": "online"|"ema", "eval_seconds",
  "eval/NAME/METRIC": v, ...}` (EMA weights: `eval/NAME/ema/METRIC`), or `"error"` instead of
  metrics when the evaluation failed;
- validation: `{"step", "samples_seen", "val/loss", "eval_seconds"}`.
Every report names a record's numbers alike (`report_scalars`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from clipkit.config import Config, report_targets
from clipkit.fileio import atomic_write_bytes
from clipkit.run_dir import RunDir

log = logging.getLogger("clipkit")

# (label, steps, values): one line of a curves.png panel; a panel is (title, [lines]).
Line = tuple[str, list[int], list[float]]
Panel = tuple[str, list[Line]]


class RunLog:
    """Writes metrics on rank 0 only; other ranks get a no-op. Without a config (tests, tools)
    it reports to TensorBoard, the default of `--report-to`."""

    def __init__(self, run_dir: Path, enabled: bool, cfg: Config | None = None):
        self.enabled = enabled
        self.layout = RunDir(run_dir)
        self.path = self.layout.metrics
        targets = report_targets(cfg.run.report_to) if cfg is not None else ("tensorboard",)
        self.tb = (
            _tensorboard(self.layout.tensorboard) if enabled and "tensorboard" in targets else None
        )
        self.wandb = None
        if enabled and "wandb" in targets:
            from clipkit.train.wandb_log import WandbReport

            self.wandb = WandbReport(run_dir, cfg.run.wandb_project, cfg.to_dict())

    def truncate_after(self, step: int) -> None:
        """On resume: drop records a killed run logged past its last checkpoint."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = report_scalars(record)
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, record["step"])

    def close(self, curves: bool = True) -> Path | None:
        """End the reports. `curves`: draw curves.png first (W&B gets it too); a run that crashed
        passes False and its W&B run is marked failed. Returns the figure's path, if drawn."""
        if not self.enabled:
            return None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        png = plot_curves(self.path, self.layout.curves) if curves else None
        if self.wandb is not None:
            self.wandb.finish(png, exit_code=0 if curves else 1)
            self.wandb = None
        return png


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; tolerate its absence anyway
        log.warning("tensorboard not installed: no event files")
        return None
    return SummaryWriter(str(folder))


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- naming -------------------------------------------------------------------------------------
def record_kind(record: dict) -> str:
    """training | eval | val | error (a failed evaluation, already logged as a warning)."""
    if "error" in record:
        return "error"
    if "eval" in record:
        return "eval"
    if any(key.startswith("val/") for key in record):
        return "val"
    return "training"


def report_scalars(record: dict) -> dict[str, float]:
    """A record's numbers under their report names: training values as `train/KEY`; evaluation
    and validation metrics under their own `eval/...`, `val/...` names; an evaluation's time as
    `eval/NAME/seconds` (`eval/NAME/ema/seconds`, `val/seconds`). Failed evaluations: none."""
    kind = record_kind(record)
    if kind == "error":
        return {}
    if kind == "training":
        named = {f"train/{k}": v for k, v in record.items() if k != "step"}
    else:
        named = {k: v for k, v in record.items() if k.startswith(("eval/", "val/"))}
        if "eval_seconds" in record:
            named[_seconds_key(record)] = record["eval_seconds"]
    return {k: v for k, v in named.items() if _is_number(v)}


def _seconds_key(record: dict) -> str:
    if "eval" not in record:
        return "val/seconds"
    return f"{_metric_prefix(record)}seconds"


def _metric_prefix(record: dict) -> str:
    """`eval/NAME/`, or `eval/NAME/ema/` for a record of the EMA weights."""
    ema = "ema/" if record.get("weights") == "ema" else ""
    return f"eval/{record['eval']}/{ema}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def main_metric(record: dict) -> tuple[str, float] | None:
    """The one number an evaluation record is plotted by: zero-shot `acc1`, probe `lp_acc1`,
    retrieval the mean of text and image recall@K at its smallest K (`R@K`)."""
    prefix = _metric_prefix(record)
    metrics = {k[len(prefix) :]: v for k, v in record.items() if k.startswith(prefix)}
    for key in ("acc1", "lp_acc1"):
        if _is_number(metrics.get(key)):
            return key, metrics[key]
    ks = sorted(
        int(k.rsplit("@", 1)[1]) for k in metrics if k.startswith("image_retrieval_recall@")
    )
    for k in ks:
        pair = [metrics.get(f"{side}_retrieval_recall@{k}") for side in ("image", "text")]
        if all(_is_number(v) for v in pair):
            return f"R@{k}", sum(pair) / 2
    return None


# -- curves.png ---------------------------------------------------------------------------------
def curve_panels(records: list[dict]) -> list[Panel]:
    """The panels of curves.png: loss (validation loss as a second line), learning rate,
    throughput; with evaluation records, an "evaluation" panel of each evaluation's main metric."""
    train = [r for r in records if record_kind(r) == "training"]
    val = [r for r in records if record_kind(r) == "val"]
    loss = [_line("training", train, "loss")]
    if val:
        loss.append(_line("validation", val, "val/loss"))
    panels = [
        ("training loss", loss),
        ("learning rate", [_line("lr", train, "lr")]),
        ("samples/s", [_line("samples/s", train, "samples_per_s")]),
    ]
    evaluations = _evaluation_lines(records)
    if evaluations:
        panels.append(("evaluation", evaluations))
    return panels


def _line(label: str, records: list[dict], key: str) -> Line:
    return label, [r["step"] for r in records], [r.get(key, math.nan) for r in records]


def _evaluation_lines(records: list[dict]) -> list[Line]:
    """One line per (evaluation, weights), in the order they first appear."""
    lines: dict[str, Line] = {}
    for record in records:
        found = main_metric(record) if record_kind(record) == "eval" else None
        if found is None:
            continue
        ema = " (ema)" if record.get("weights") == "ema" else ""
        label = f"{record['eval']} {found[0]}{ema}"
        _, steps, values = lines.setdefault(label, (label, [], []))
        steps.append(record["step"])
        values.append(found[1])
    return list(lines.values())


def plot_curves(metrics_path: Path, out_png: Path) -> Path | None:
    """The panels of `curve_panels` side by side, against step."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = curve_panels(records)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels, strict=True):
        for i, (label, steps, values) in enumerate(lines):
            # evaluations are sparse: dots show where they were taken
            sparse = i > 0 or title == "evaluation"
            ax.plot(steps, values, lw=1.5, label=label, marker="o" if sparse else None, ms=3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
