"""Run logs: metrics.jsonl (one object per logged step), TensorBoard events, curves.png."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from clipkit.fileio import atomic_write_bytes
from clipkit.run_dir import RunDir

log = logging.getLogger("clipkit")


class RunLog:
    """Writes metrics on rank 0 only; other ranks get a no-op."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = RunDir(run_dir).metrics
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(RunDir(run_dir).tensorboard))
            except ImportError:  # tensorboard is a dependency; tolerate its absence anyway
                log.warning("tensorboard not installed: no event files")

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
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, out_png: Path) -> Path | None:
    """Loss, learning rate and throughput against step, one panel each."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    panels = [("loss", "training loss"), ("lr", "learning rate"), ("samples_per_s", "samples/s")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.plot(steps, [r.get(key, float("nan")) for r in records], lw=1.5)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
