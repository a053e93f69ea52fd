"""Evaluation while a model trains (`pretrain --eval SPEC`, specs in `clipkit.eval.specs`).

`InTrainingEval` opens each spec's data once (file lists, class names, templates) and, at each
evaluation, computes the numbers the stand-alone commands compute (`clipkit zero-shot`,
`clipkit probe`, `clipkit retrieve eval`) by calling the same functions: the embedding part runs
on every rank over its share of the set (`clipkit.eval.sharded`), the shares are gathered in the
set's order and the metric part runs on the whole, on every rank. Exact recall only for
retrieval: building FAISS indexes would cost more than the evaluation and measure the index.

An evaluation that fails (a corrupt shard, any exception) is logged and becomes an error record;
training goes on. Every rank takes part in the same gathers whatever failed where, and all agree.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from clipkit.data.augment import run_augment
from clipkit.distributed import DistInfo
from clipkit.eval import LoaderSettings
from clipkit.eval.embed import EmbeddedPart, merge_parts
from clipkit.eval.loading import LoadedModel
from clipkit.eval.sharded import gather, join_columns, share_of
from clipkit.eval.specs import EvalSpec, metric_key
from clipkit.run_dir import RunDir

log = logging.getLogger(__name__)
# sweep=quick: a few weight decays, no refinement, fewer L-BFGS iterations (see specs).
QUICK_PROBE = {"wd_grid": (1e-6, 1e-4, 1e-2, 1.0), "refine_steps": 0, "max_iter": 100}


class EvalFailed(RuntimeError):
    """An evaluation failed on some rank; every rank raises it with the same message."""


class InTrainingEval:
    """The evaluations of one run. Build it before training (a bad data layout is a
    ConfigError then); call `run` on every rank at the same steps."""

    def __init__(
        self,
        specs: list[EvalSpec],
        reading: LoaderSettings,
        preprocess: Callable,
        tokenizer: Callable,
        device: torch.device,
        dist: DistInfo,
        run_dir: str | Path,
        *,
        model_name: str = "",
        arch: dict | None = None,
        data_config=None,
    ):
        self.specs, self.reading, self.device, self.dist = specs, reading, device, dist
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.run_dir = RunDir(run_dir)
        self.model_name, self.arch = model_name, arch or {}
        self.data_config = data_config  # the run's DataConfig: names its augmentation in results
        self.sets = {spec.name: _open_sets(spec, preprocess) for spec in specs}

    def run(self, method, step: int, samples_seen: int) -> list[dict[str, Any]]:
        """One record per (spec, weights): metrics under `eval/NAME[/ema]/METRIC`, or "error".
        The model is in eval mode, without grad, and back in its former mode after."""
        method = getattr(method, "module", method)  # a DDP wrapper's method
        weights = ("online", "ema") if method.has_ema else ("online",)
        was_training = method.training
        method.eval()
        try:
            with torch.no_grad():
                return [
                    self._evaluate(spec, method, which, step, samples_seen)
                    for spec in self.specs
                    for which in weights
                ]
        finally:
            method.train(was_training)

    def _evaluate(self, spec: EvalSpec, method, which: str, step: int, samples_seen: int):
        start = time.perf_counter()
        head = {"step": step, "samples_seen": samples_seen, "eval": spec.name, "weights": which}
        try:
            loaded = self._loaded(method, which)
            result = _RUNNERS[spec.task](self, spec, loaded)
        except Exception as e:  # noqa: BLE001 (no evaluation may stop the training)
            message = str(e) if isinstance(e, EvalFailed) else _message(e)
            if self.dist.is_main:
                log.warning(
                    "evaluation %s failed at step %d: %s; training goes on",
                    spec.name,
                    step,
                    message,
                )
            return {**head, "error": message}
        seconds = time.perf_counter() - start
        result["clipkit"].update(step=step, samples_seen=samples_seen, eval_seconds=seconds)
        self._write(result, step, spec.name, which)
        metrics = {
            metric_key(spec.name, m, which): _finite(result["metrics"].get(m))
            for m in spec.metric_names()
        }
        return {**head, "eval_seconds": seconds, **metrics}

    def _loaded(self, method, which: str) -> LoadedModel:
        """The model to evaluate, described as the results describe a checkpoint's model."""
        return LoadedModel(
            model=method.eval_model(which),
            preprocess=self.preprocess,
            tokenizer=self.tokenizer,
            arch=self.arch,
            name=self.model_name,
            pretrained=str(self.run_dir.root),
            sha256=None,
            weights=which,
            method=method.name,
            source={"checkpoint": str(self.run_dir.root), "weights": which},
            augment=self._augment(method),
        )

    def _augment(self, method) -> str | None:
        """The training views' augmentation, as the results of a checkpoint name it."""
        if self.data_config is None:
            return None
        return run_augment(self.data_config, method.views).describe()

    def _write(self, result: dict, step: int, name: str, which: str) -> None:
        """The main rank writes the results JSON; a failed write is a warning, not a stop."""
        from clipkit.eval.results import write_json
        from clipkit.fileio import OutputError

        if not self.dist.is_main:
            return
        result["clipkit"]["checkpoint"] = str(self.run_dir.root)
        path = self.run_dir.eval_results(step, name, which)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, result)
        except (OSError, OutputError) as e:  # a full disk must not stop the training either
            log.warning("evaluation %s at step %d: %s", name, step, e)

    # ---- the embedding part, on this rank's share, gathered to every rank ----

    def _gathered(self, compute: Callable[[], Any]) -> list[Any]:
        """Every rank's `compute()`, or EvalFailed on every rank when any rank's raised."""
        try:
            outcome = (compute(), None)
        except Exception as e:  # noqa: BLE001 (reported through the gather to every rank)
            outcome = (None, _message(e))
        outcomes = gather(outcome, self.dist)
        errors = [error for _, error in outcomes if error]
        if errors:
            raise EvalFailed(errors[0])
        return [payload for payload, _ in outcomes]

    def _labelled(self, loaded: LoadedModel, data) -> EmbeddedPart:
        from clipkit.eval.zero_shot import embed_labelled

        return embed_labelled(
            loaded.model,
            data.dataset,
            self.device,
            self.reading,
            total=data.num_samples,
            desc=f"eval {data.name}",
            rank=self.dist.rank,
            world=self.dist.world_size,
            show=self.dist.is_main,
        )

    def _zero_shot(self, spec: EvalSpec, loaded: LoadedModel) -> dict:
        from clipkit.eval.zero_shot import zero_shot_classifier, zero_shot_record

        (data,) = self.sets[spec.name]

        def classes(block: range) -> torch.Tensor:
            names = [data.classnames[i] for i in block]
            if not names:
                return torch.zeros(0, 0)
            return zero_shot_classifier(
                loaded.model, self.tokenizer, names, data.templates, self.device, show=False
            )

        def local():
            return classes(share_of(len(data.classnames), self.dist)), self._labelled(loaded, data)

        gathered = self._gathered(local)
        classifier = join_columns([c for c, _ in gathered])
        part = merge_parts([p for _, p in gathered])
        return zero_shot_record(loaded, data, classifier, part, self.reading)

    def _probe(self, spec: EvalSpec, loaded: LoadedModel) -> dict:
        from clipkit.eval.linear_probe import labelled_arrays, probe_from_features

        train, test = self.sets[spec.name]
        gathered = self._gathered(
            lambda: (self._labelled(loaded, train), self._labelled(loaded, test))
        )
        train_xy, test_xy = (
            labelled_arrays(merge_parts([g[i] for g in gathered]), data, self.reading)
            for i, data in enumerate((train, test))
        )
        return probe_from_features(
            loaded,
            train,
            test,
            train_xy,
            test_xy,
            device=self.device,
            seed=int(spec.option("seed")),
            val_fraction=float(spec.option("val-fraction")),
            fit_settings=QUICK_PROBE if spec.option("sweep") == "quick" else None,
            cache_dir=None,
        )

    def _retrieval(self, spec: EvalSpec, loaded: LoadedModel) -> dict:
        from clipkit.eval.results import retrieval_record
        from clipkit.eval.retrieval import embed_pair_part, exact_recall, pair_embeddings

        (pairs,) = self.sets[spec.name]

        def local() -> EmbeddedPart:
            return embed_pair_part(
                loaded,
                pairs.dataset,
                self.device,
                self.reading,
                total=pairs.num_samples,
                rank=self.dist.rank,
                world=self.dist.world_size,
                show=self.dist.is_main,
            )

        part = merge_parts(self._gathered(local))
        emb = pair_embeddings(part, pairs.root, self.reading.max_bad_fraction)
        metrics = exact_recall(emb, spec.ks)
        return retrieval_record(loaded, pairs, emb, {"metrics": metrics}, spec.ks, None)


_RUNNERS = {
    "zero-shot": InTrainingEval._zero_shot,
    "probe": InTrainingEval._probe,
    "retrieval": InTrainingEval._retrieval,
}


def _open_sets(spec: EvalSpec, preprocess: Callable) -> tuple:
    """The spec's data opened once: file lists, class names, templates (ConfigError if bad)."""
    if spec.task == "retrieval":
        from clipkit.data.eval_pairs import paired_set

        return (paired_set(spec.path, preprocess, spec.option("split")),)
    from clipkit.data.eval_sets import classification_set

    def split(name: str, strict: bool):
        return classification_set(
            spec.dataset,
            spec.path,
            name,
            preprocess,
            task=spec.option("task"),
            templates_file=spec.options.get("templates"),
            classnames_file=spec.option("classnames"),
            strict_split=strict,
        )

    if spec.task == "zero-shot":
        return (split(spec.option("split"), False),)
    return split(spec.option("train-split"), True), split(spec.option("test-split"), True)


def _message(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}".rstrip(": ")


def _finite(value: Any) -> Any:
    """A metric for the records: None where it is undefined (NaN, e.g. acc5 with < 5 classes)."""
    return None if isinstance(value, float) and math.isnan(value) else value
