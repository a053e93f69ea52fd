"""Weights & Biases reporting of a run (`--report-to wandb`), on the main rank only.

The W&B run id is kept in RUN_DIR/wandb_id, so `--resume` continues the same W&B run. W&B is a
report, not part of training: any error it raises (no network, a full disk, a server refusing)
is logged once as a warning and reporting to it stops; training goes on.
`WANDB_MODE=offline` writes the run under RUN_DIR/wandb/ without a network (`wandb sync` uploads
it later).
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

from clipkit.fileio import atomic_write_bytes
from clipkit.run_dir import RunDir

log = logging.getLogger("clipkit")


class WandbReport:
    """One W&B run fed with the run's scalars; every call is a no-op once W&B has failed."""

    def __init__(self, run_dir: Path, project: str, config: dict):
        self.run = None
        self.last_step = 0
        layout = RunDir(run_dir)
        try:
            import wandb

            self.run = wandb.init(
                project=project,
                name=layout.root.resolve().name,
                dir=str(layout.root),
                config=config,
                id=_run_id(layout.wandb_id),
                resume="allow",
                # silent: W&B's banners would interleave with the training log lines
                settings=wandb.Settings(silent=True),
            )
        except Exception as e:  # noqa: BLE001  (any W&B failure must leave training alone)
            self._give_up("could not start", e)

    def log(self, scalars: dict[str, float], step: int) -> None:
        if self.run is None or not scalars:
            return
        self.last_step = max(self.last_step, step)
        try:
            self.run.log(scalars, step=step)
        except Exception as e:  # noqa: BLE001
            self._give_up("could not log", e)

    def finish(self, curves: Path | None, exit_code: int = 0) -> None:
        """Log the curves figure (when drawn) at the last step, then end the W&B run."""
        if self.run is None:
            return
        try:
            if curves is not None and curves.is_file():
                import wandb

                self.run.log({"curves": wandb.Image(str(curves))}, step=self.last_step)
            self.run.finish(exit_code=exit_code)
        except Exception as e:  # noqa: BLE001
            self._give_up("could not finish", e)
        self.run = None

    def _give_up(self, what: str, error: Exception) -> None:
        detail = " ".join(str(error).split())  # W&B's messages span lines; the log keeps one
        log.warning(
            "W&B %s (%s: %s); training goes on without it", what, type(error).__name__, detail
        )
        self.run = None


def _run_id(path: Path) -> str:
    """The W&B run id of this run directory: the stored one, or a new one stored now."""
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(6)  # W&B ids: lowercase letters and digits
    atomic_write_bytes(path, (run_id + "\n").encode())
    return run_id
