"""Evaluation while a run trains (`pretrain --eval SPEC`, `--val-data`, `--keep-best`): when it
is due, what it runs and what it records. The trainer calls `due` after each step and, at an
evaluation step, `run` on every rank BEFORE that step's checkpoint is saved, so the checkpoint
holds the tracker state that includes the evaluation and a resumed run neither skips nor repeats
one. The benchmarks themselves are `clipkit.eval.in_training`'s; the held-out loss is
`clipkit.train.validation`'s; the best-so-far bookkeeping is `clipkit.train.best`'s.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from clipkit.config import Config, ConfigError
from clipkit.data.tokenize import build_tokenizer
from clipkit.data.transforms import eval_transform
from clipkit.devices import pick_device
from clipkit.distributed import DistInfo
from clipkit.eval import LoaderSettings
from clipkit.eval.in_training import InTrainingEval
from clipkit.eval.specs import metric_keys, parse_specs
from clipkit.models import factory
from clipkit.run_dir import RunDir, step_of
from clipkit.train.best import BestTracker, parse_keep_best
from clipkit.train.logging import log
from clipkit.train.validation import Validation, ValidationError, open_val_data

VAL_LOSS = "val/loss"


def check_eval_config(cfg: Config, method_has_ema: bool) -> None:
    """Refuse, before anything is written, specs that do not parse or name missing data, held-out
    data that is not there, and a --keep-best metric no evaluation produces."""
    e = cfg.eval
    specs = parse_specs(e.specs)
    if e.val_data is not None:
        open_val_data(e.val_data)
    if e.every is not None and not specs and e.val_data is None:
        raise ConfigError("--eval-every: nothing to evaluate; add --eval SPEC or --val-data")
    if e.keep_best is None:
        return
    metric, _ = parse_keep_best(e.keep_best)
    known = metric_keys(specs, ema=method_has_ema) + ([VAL_LOSS] if e.val_data else [])
    if metric not in known:
        shown = ", ".join(known[:12]) + (" ..." if len(known) > 12 else "")
        raise ConfigError(
            f"--keep-best {e.keep_best}: no evaluation of this run logs '{metric}' "
            f"(logged: {shown or 'nothing; add --eval SPEC or --val-data'})"
        )


def build_evaluation(
    cfg: Config, arch: dict, method_has_ema: bool, total_steps: int, dist: DistInfo
) -> RunEvaluation | None:
    """The run's evaluations with their data opened (file lists, class names), on the device the
    run trains on; None when the run evaluates nothing. ConfigError for any bad option or data."""
    check_eval_config(cfg, method_has_ema)
    if not cfg.eval.specs and cfg.eval.val_data is None:
        return None
    preprocess = factory.preprocess(arch)
    device = pick_device(cfg.run.device, dist)
    tokenizer = build_tokenizer(preprocess)
    return RunEvaluation(cfg, total_steps, preprocess, tokenizer, device, dist, cfg.run.out)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode, then each back in the mode it was in (a frozen teacher
    stays in eval mode)."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


class RunEvaluation:
    """What a run evaluates and when; `best` is the --keep-best tracker (None without it)."""

    def __init__(
        self,
        cfg: Config,
        total_steps: int,
        preprocess,
        tokenizer,
        device: torch.device,
        dist: DistInfo,
        run_dir: str | Path,
    ):
        e = cfg.eval
        reading = LoaderSettings(e.batch_size, e.workers, cfg.data.max_bad_fraction)
        specs, transform = parse_specs(e.specs), eval_transform(preprocess)
        self.every, self.total_steps = e.every, total_steps
        self.benchmarks = None
        if specs:
            self.benchmarks = InTrainingEval(
                specs, reading, transform, tokenizer, device, dist, run_dir,
                model_name=cfg.model.name, arch=cfg.model.arch, data_config=cfg.data,
            )  # fmt: skip
        self.names = [s.name for s in specs]
        self.validation = None
        if e.val_data is not None:
            self.validation = Validation(
                e.val_data, cfg.data.batch_size, reading, transform, tokenizer, device, dist
            )
        self.best = BestTracker.from_option(e.keep_best) if e.keep_best else None
        self.dist = dist

    def restore(self, saved: dict) -> None:
        """A resumed run continues the best so far of the checkpoint it resumes (`saved`)."""
        if self.best is not None:
            self.best.resume(saved.get("best"))

    def due(self, step: int) -> bool:
        """At every `--eval-every` steps, and always at the run's last step."""
        return step == self.total_steps or bool(self.every and step % self.every == 0)

    def run(self, method, state, progress=None) -> list[dict]:
        """Every evaluation at the `state.step` of a `TrainState` (all ranks call it), as
        run-log records; a failed one is a record with its error, and training goes on. The
        progress bar (main rank) says what is being evaluated."""
        step, samples_seen = state.step, state.samples_seen

        def describe(text: str) -> None:
            if progress is not None:
                progress.set_description(text, refresh=True)

        records = []
        with eval_mode(method):
            if self.validation is not None:
                describe(f"evaluating {VAL_LOSS}")
                records.append(self._val_record(method, step, samples_seen))
            if self.benchmarks is not None:
                describe(f"evaluating {', '.join(self.names)}")
                records += self.benchmarks.run(method, step, samples_seen)
        describe("pretrain")
        return records

    def _val_record(self, method, step: int, samples_seen: int) -> dict:
        t0 = time.perf_counter()
        head = {"step": step, "samples_seen": samples_seen}
        try:
            value = self.validation.loss(
                method.eval_model("online"), method.loss_kind, method.model_scales()
            )
        except (ValidationError, ConfigError) as e:  # ConfigError: too many unreadable images
            if self.dist.is_main:  # as InTrainingEval reports the benchmarks' failures
                log.warning("%s failed at step %d: %s; training goes on", VAL_LOSS, step, e)
            return {**head, "eval": "val", "error": str(e)}
        return {**head, VAL_LOSS: value, "eval_seconds": round(time.perf_counter() - t0, 3)}

    def improved(self, records: list[dict], step: int) -> bool:
        """Whether this evaluation beat the --keep-best metric's best so far."""
        return self.best is not None and self.best.update(records, step)

    def checkpoint_state(self) -> dict:
        """What every step checkpoint stores of the evaluations: the tracker's state."""
        return {"best": self.best.state()} if self.best is not None else {}


def resume_evaluations(
    run_dir: Path, saved: dict, evaluation: RunEvaluation | None, dist: DistInfo
) -> None:
    """On resume from checkpoint contents `saved`: the main rank removes eval/step-N folders
    past its step (those steps train again; the run log drops their records likewise), and
    --keep-best continues from the best it recorded."""
    if dist.is_main:
        for folder in RunDir(run_dir).eval_step_dirs():
            if step_of(folder) > saved["step"]:
                shutil.rmtree(folder, ignore_errors=True)
    if evaluation is not None:
        evaluation.restore(saved)
