"""The layout of a training run directory, named once:

    RUN/config.yaml              the resolved config of the run
    RUN/metrics.jsonl            one JSON object per logged step
    RUN/tensorboard/             TensorBoard events
    RUN/wandb_id                 the W&B run id (--report-to wandb), reused by --resume
    RUN/wandb/                   W&B's own files (offline runs, logs)
    RUN/curves.png               loss / lr curves
    RUN/.lock                    held by the one process training into RUN
    RUN/checkpoints/step-N.pt    the checkpoint of step N
    RUN/checkpoints/latest.pt    a hard link to the newest step-N.pt
    RUN/checkpoints/best.pt      the step checkpoint at the best --keep-best value so far
    RUN/eval/step-N/NAME.json    the results of evaluation NAME at step N (NAME.ema.json: the
                                 EMA weights'), CLIP_benchmark's schema

Plain paths only (no torch): the lock, the logs, the checkpoint file format and the trainer all
read their places from here.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = "checkpoints"
LATEST = "latest.pt"
BEST = "best.pt"
STEP_PREFIX = "step-"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
TENSORBOARD = "tensorboard"
WANDB_ID = "wandb_id"
EVAL = "eval"
LOCK = ".lock"


class _InRoot:
    """A read-only RunDir attribute: the path of one fixed name under the run's root."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, run: RunDir | None, owner=None):
        return self if run is None else run.root / self.name

    def __set__(self, run: RunDir, value) -> None:
        raise AttributeError(f"{self.name}: a run directory's layout is fixed")


class RunDir:
    """The paths of one run directory (nothing is created or checked here)."""

    checkpoints = _InRoot(CHECKPOINTS)
    config = _InRoot(CONFIG)
    metrics = _InRoot(METRICS)
    curves = _InRoot(CURVES)
    tensorboard = _InRoot(TENSORBOARD)
    wandb_id = _InRoot(WANDB_ID)
    lock = _InRoot(LOCK)

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def latest(self) -> Path:
        return self.checkpoints / LATEST

    @property
    def best(self) -> Path:
        return self.checkpoints / BEST

    def step_checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{STEP_PREFIX}{step}.pt"

    def eval_step_dir(self, step: int) -> Path:
        """Where the evaluations of step N write their results."""
        return self.root / EVAL / f"{STEP_PREFIX}{step}"

    def eval_results(self, step: int, name: str, weights: str = "online") -> Path:
        """The results JSON of evaluation `name` at `step` (the EMA weights': NAME.ema.json)."""
        suffix = ".json" if weights == "online" else f".{weights}.json"
        return self.eval_step_dir(step) / f"{name}{suffix}"

    def eval_step_dirs(self) -> list[Path]:
        """Every eval/step-N folder, oldest step first."""
        found = self.root.joinpath(EVAL).glob(f"{STEP_PREFIX}*")
        return sorted((p for p in found if p.is_dir() and step_of(p) is not None), key=step_of)

    def step_checkpoints(self) -> list[Path]:
        """Every checkpoints/step-N.pt, oldest step first (other names are not ours: skipped)."""
        found = (p for p in self.checkpoints.glob(f"{STEP_PREFIX}*.pt") if step_of(p) is not None)
        return sorted(found, key=step_of)


def step_of(path: Path) -> int | None:
    """N for a file named step-N.pt or a folder named step-N; None for any other name."""
    name = path.stem if path.suffix == ".pt" else path.name
    digits = name[len(STEP_PREFIX) :]
    if not name.startswith(STEP_PREFIX) or not digits.isdigit():
        return None
    return int(digits)


def is_checkpoints_folder(folder: Path) -> bool:
    """Whether `folder` is a run's checkpoints/ folder (by its name, as the layout fixes it)."""
    return folder.name == CHECKPOINTS
