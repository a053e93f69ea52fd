"""The one generic training loop. It knows the Method interface and nothing about any method:
`loss, parts = method(batch)`; backward; clip; optimizer step; `method.after_step`. Read it top to
bottom: `fit` -> `_train_step` (-> `_backward`, `_optimizer_step`) -> `_log` / `_evaluate` (what
`clipkit.train.evaluation` runs, before the step's checkpoint) / `save`. The
micro-batches of a step (exact or independent accumulation) are `clipkit.train.accumulate`'s;
fp16's loss scaling is `clipkit.train.precision`'s."""

from __future__ import annotations

import math
import signal
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from clipkit import checkpoint
from clipkit.config import Config
from clipkit.data.pipeline import DataPosition
from clipkit.distributed import DistInfo, all_reduce_mean
from clipkit.run_dir import RunDir
from clipkit.train.accumulate import MicroSteps, exact_step, independent_step
from clipkit.train.bad_data import bad_counts, too_many_bad
from clipkit.train.evaluation import RunEvaluation
from clipkit.train.logging import RunLog, log
from clipkit.train.optim import lr_at, set_lr
from clipkit.train.precision import autocast, resolve_precision, scaled_step, scaler_record
from clipkit.train.saving import checkpoint_state, first_non_finite, gather_positions, prune

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the temperature at 100


class TrainingError(RuntimeError):
    """The run cannot go on (too much bad data, repeated non-finite loss); a clear message."""


class _StopWaiting(BaseException):
    """Raised by the signal handler out of a wait for data. A BaseException, so that no
    `except Exception` in the data code (decoders, webdataset's handlers) can swallow it."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # over all ranks
    position: DataPosition = field(default_factory=DataPosition)
    bad: Counter = field(default_factory=Counter)  # bad samples by reason (this rank)
    bad_shards: Counter = field(default_factory=Counter)
    nonfinite_steps: int = 0
    scaler_skipped_steps: int = 0  # fp16: steps whose gradients overflowed (no update, counted)
    train_seconds: float = 0.0  # wall-clock of the steps so far (checkpoint writes excluded)
    eval_seconds: float = 0.0  # wall-clock of the evaluations so far (not in train_seconds)


class Trainer:
    def __init__(
        self,
        cfg: Config,
        method: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader,
        total_steps: int,
        dist: DistInfo,
        device: torch.device,
        run_dir: Path,
        state: TrainState,
        evaluation: RunEvaluation | None = None,
    ):
        self.cfg, self.method, self.optimizer, self.evaluation = cfg, method, optimizer, evaluation
        self.loader, self.total_steps, self.dist = loader, total_steps, dist
        self.device, self.run_dir, self.state = device, run_dir, state
        self.layout = RunDir(run_dir)
        self.engine = self._wrap_ddp(method)
        if cfg.run.compile:
            self.engine = torch.compile(self.engine)
        self.runlog = RunLog(run_dir, dist.is_main, cfg)
        self.runlog.truncate_after(state.step)
        self.stop_requested: str | None = None
        self.saved_step: int | None = state.step or None  # step of the newest checkpoint on disk
        self.waiting_for_data = False
        self.global_batch = dist.global_batch(cfg.data.batch_size, cfg.optim.accum_steps)
        self.precision = resolve_precision(cfg.run.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")

    # -- setup ---------------------------------------------------------------------------------
    def _wrap_ddp(self, method: nn.Module) -> nn.Module:
        if not self.dist.enabled:
            return method
        if self.device.type == "cuda":
            # BatchNorm in heads/branches (A-CLIP SSL heads, MS-CLIP's branch) sees the global
            # batch; SyncBatchNorm has no CPU kernel, so gloo runs keep per-rank statistics.
            nn.SyncBatchNorm.convert_sync_batchnorm(method)

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(
            method,
            device_ids=ids,
            find_unused_parameters=method.has_unused_parameters,
        )

    def _autocast(self):
        return autocast(self.precision, self.device)

    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = signal.Signals(signum).name
        # Waiting for a step's first batch, no step is in progress: stop now, as the batch may
        # never come. Under DDP the ranks must stop together: they agree after a step.
        if self.waiting_for_data and not self.dist.enabled:
            raise _StopWaiting

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        batches = iter(self.loader)
        progress = self._progress()
        window = {"t0": time.perf_counter(), "wait": 0.0, "samples": 0}
        try:
            while self.state.step < self.total_steps:
                t_step = time.perf_counter()
                try:
                    parts, wait = self._train_step(batches)
                except _StopWaiting:  # before the step's first batch: nothing of it is done
                    log.info("stopped by %s while waiting for data", self.stop_requested)
                    break
                self.state.train_seconds += time.perf_counter() - t_step
                window["wait"] += wait
                window["samples"] += self.global_batch
                step, last = self.state.step, self.state.step == self.total_steps
                if step % self.cfg.run.log_every == 0 or last:
                    self._log(parts, window, progress)
                    window = {"t0": time.perf_counter(), "wait": 0.0, "samples": 0}
                if self.evaluation is not None and self.evaluation.due(step):
                    window["t0"] += self._evaluate(progress)  # samples/s counts training only
                if step % self.cfg.run.save_every == 0 and not last:
                    self.save()
                if self._agree_to_stop():
                    break
            if self.state.step > (self.saved_step or 0):  # steps trained since the last save
                self.save()
        except BaseException:
            self.runlog.close(curves=False)  # no figure of a crash; W&B marks the run failed
            raise
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            if progress is not None:
                progress.close()
        self.runlog.close()  # draws curves.png (preempted runs too), then ends the reports
        stopped = {"stopped_by": self.stop_requested} if self.stop_requested else {}
        return {**stopped, **self._summary()}

    def _train_step(self, batches) -> tuple[dict, float]:
        cfg, state = self.cfg, self.state
        set_lr(self.optimizer, lr_at(state.step, self.total_steps, cfg.optim))
        waits: list[float] = []

        def fetch(micro: int) -> dict:
            t0 = time.perf_counter()
            batch = self._next_batch(batches, interruptible=micro == 0)
            waits.append(time.perf_counter() - t0)
            self._account_data(batch)
            return self._to_device(batch)

        steps = MicroSteps(
            engine=self.engine,
            method=self.method,
            count=cfg.optim.accum_steps,
            fetch=fetch,
            sync=self._sync,
            autocast=self._autocast,
            backward=self._backward,
            device=self.device,
        )
        exact = cfg.optim.accum_mode == "exact" and steps.count > 1  # K=1: the same step
        parts_sum = exact_step(steps) if exact else independent_step(steps)
        wait = sum(waits)
        if not self._finite(parts_sum["loss"]):
            return parts_sum, wait
        self._optimizer_step()
        state.step += 1
        state.samples_seen += self.global_batch
        self.method.after_step(state.step, self.total_steps)
        self._clamp_logit_scale()
        return parts_sum, wait

    def _sync(self, all_reduce: bool):
        """Around a micro-batch's forward: DDP all-reduces the gradients of its backward only
        when `all_reduce` (the step's last micro-batch); the others accumulate locally."""
        return nullcontext() if all_reduce or not self.dist.enabled else self.engine.no_sync()

    def _backward(self, tensor: torch.Tensor) -> None:
        """Every backward of a step that reaches the parameters goes through here: times the
        loss scale under fp16 (the scaler is off, a plain backward, under fp32/bf16)."""
        self.scaler.scale(tensor).backward()

    def _optimizer_step(self) -> None:
        """Unscale, clip, step; count a step the fp16 scaler skips (inf/nan gradients). The
        guard `_finite` runs first, for every precision: a non-finite loss comes from the
        forward pass (overflowing activations, bad data), which a smaller scale cannot cure,
        so it never reaches the scaler (no update, not a step, scale kept, stop after 5 in a
        row). Only a finite loss whose scaled gradients overflow is skipped here, as a step."""
        params = self.method.parameters()
        skipped = scaled_step(self.scaler, self.optimizer, params, self.cfg.optim.grad_clip)
        self.state.scaler_skipped_steps += int(skipped)

    def _next_batch(self, batches, interruptible: bool) -> dict:
        self.waiting_for_data = interruptible
        try:
            return next(batches)
        except RuntimeError as e:
            if "timed out" not in str(e):
                raise
            workers = max(self.cfg.data.workers, 1)
            logical = self.state.position.batches % workers
            epoch = self.state.position.workers.get(logical, [0])[0]
            shards = self.loader.dataset.worker_shards(logical, epoch)
            names = ", ".join(Path(u).name for u in shards[:4])
            raise TrainingError(
                f"no batch for {self.cfg.data.stall_timeout:g}s from data worker {logical} of "
                f"rank {self.dist.rank} (epoch {epoch}, shards {names}); check those shards "
                "(`clipkit data check`) or raise --stall-timeout"
            ) from None
        finally:
            self.waiting_for_data = False

    def _finite(self, loss: torch.Tensor) -> bool:
        """Skip the update on a non-finite loss; stop after several in a row."""
        if bool(torch.isfinite(loss)):
            self.state.nonfinite_steps = 0
            return True
        self.optimizer.zero_grad(set_to_none=True)
        self.state.nonfinite_steps += 1
        log.warning("non-finite loss at step %d: update skipped", self.state.step)
        if self.state.nonfinite_steps >= 5:
            raise TrainingError(
                f"loss was non-finite for {self.state.nonfinite_steps} steps in a row at step "
                f"{self.state.step}; lower --lr or check the data ({self._checkpoint_note()})"
            )
        return False

    @torch.no_grad()
    def _clamp_logit_scale(self) -> None:
        scale = getattr(self.method.model, "logit_scale", None)
        if isinstance(scale, torch.Tensor):
            scale.clamp_(0, MAX_LOGIT_SCALE)

    def _to_device(self, batch: dict) -> dict:
        nb = self.device.type == "cuda"
        return {
            k: v.to(self.device, non_blocking=nb) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
            if not k.startswith("_")
        }

    def _account_data(self, batch: dict) -> None:
        self.state.position.update(batch)
        self.state.bad.update(batch.get("_bad", {}))
        self.state.bad_shards.update(batch.get("_bad_shards", {}))

    # -- logging, stopping ---------------------------------------------------------------------
    def _progress(self):
        if not self.dist.is_main:
            return None
        return tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc="pretrain",
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def _log(self, parts: dict, window: dict, progress) -> None:
        elapsed = max(time.perf_counter() - window["t0"], 1e-9)
        values = {k: float(all_reduce_mean(v.detach())) for k, v in parts.items()}
        bad_total, seen = self._bad_counts()
        record = {
            "step": self.state.step,
            "samples_seen": self.state.samples_seen,
            "train_seconds": round(self.state.train_seconds, 3),
            **values,
            "lr": self.optimizer.param_groups[0]["lr"]
            / self.optimizer.param_groups[0].get("lr_mult", 1.0),
            "samples_per_s": window["samples"] / elapsed,
            "data_wait_frac": min(1.0, window["wait"] / elapsed),
            "bad_samples": bad_total,
            "bad_by_reason": dict(self.state.bad),
            **scaler_record(self.scaler, self.state.scaler_skipped_steps),
        }
        self.runlog.write(record)
        if progress is not None:
            progress.n = self.state.step
            progress.set_postfix(
                loss=f"{record['loss']:.4f}",
                lr=f"{record['lr']:.2e}",
                sps=f"{record['samples_per_s']:.0f}",
                wait=f"{record['data_wait_frac']:.0%}",
                refresh=False,
            )
            progress.refresh()
        self._check_bad_fraction(bad_total, seen)

    def _evaluate(self, progress) -> float:
        """Run the step's evaluations (every rank), log them, keep best.pt; their seconds."""
        t0 = time.perf_counter()
        records = self.evaluation.run(self.method, self.state, progress)
        for record in records:
            self.runlog.write(record)
        if self.evaluation.improved(records, self.state.step):
            self.save(best=True)
        elapsed = time.perf_counter() - t0
        self.state.eval_seconds += elapsed
        return elapsed

    def _bad_counts(self) -> tuple[int, int]:
        """(bad, bad + good) over all ranks."""
        batches, batch_size = self.state.position.batches, self.cfg.data.batch_size
        return bad_counts(self.state.bad, batches, batch_size, self.dist)

    def _check_bad_fraction(self, bad: int, seen: int) -> None:
        limit = self.cfg.data.max_bad_fraction
        problem = too_many_bad(bad, seen, limit, self.state.bad, self.state.bad_shards, self.dist)
        if problem is not None:
            raise TrainingError(problem)

    def _agree_to_stop(self) -> bool:
        """A signal on any rank stops every rank at the same step."""
        flag = torch.tensor([1.0 if self.stop_requested else 0.0])
        if self.dist.enabled:
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        if flag.item() and not self.stop_requested:
            self.stop_requested = "peer"
        return bool(flag.item())

    def _summary(self) -> dict:
        scaler = scaler_record(self.scaler, self.state.scaler_skipped_steps)
        if scaler and self.dist.is_main:
            log.info(
                "fp16: %(scaler_skipped_steps)d steps skipped, loss scale %(loss_scale)g", scaler
            )
        return {
            "step": self.state.step,
            "samples_seen": self.state.samples_seen,
            "bad_samples": dict(self.state.bad),
            "eval_seconds": round(self.state.eval_seconds, 3),
            **scaler,
        }

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, best: bool = False) -> Path | None:
        """The step's checkpoint (every rank calls it; the main rank writes); `best`: write it
        as checkpoints/best.pt instead (--keep-best), the step checkpoints untouched."""
        positions = gather_positions(self.state.position.state(), self.dist)
        if not self.dist.is_main:
            self.saved_step = self.saved_step if best else self.state.step
            return None
        self._check_weights_finite()
        state = checkpoint_state(self, positions)
        if best:
            return self._write(state, self.layout.best)
        step_path = self._write(state, self.layout.step_checkpoint(self.state.step), link=True)
        self.saved_step = self.state.step
        prune(self.layout, self.cfg.run.keep_last)
        return step_path

    def _write(self, state: dict, path: Path, link: bool = False) -> Path:
        """Write a checkpoint atomically (and point latest.pt at it)."""
        try:
            checkpoint.save(state, path)
            if link:
                checkpoint.link_latest(path, self.layout.latest)
        except OSError as e:  # full disk, quota, read-only: one line, latest.pt stays as it was
            raise TrainingError(
                f"cannot write {path}: {e.strerror or e}; {self._checkpoint_note()}"
            ) from None
        return path

    def _checkpoint_note(self) -> str:
        """What a stopped run leaves to continue from, for error messages."""
        if self.saved_step is None:
            return "no checkpoint was written yet: run the command again without --resume"
        return f"the checkpoint of step {self.saved_step} is intact: continue with --resume"

    def _check_weights_finite(self) -> None:
        name = first_non_finite(self.method)
        if name is not None:
            raise TrainingError(
                f"parameter {name} is non-finite at step {self.state.step}; "
                f"not saving it ({self._checkpoint_note()})"
            )
