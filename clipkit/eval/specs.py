"""Evaluation specs: which of clipkit's own evaluations a training run performs, on which data.

One spec is one string (`pretrain --eval SPEC`, or an item of the `eval:` list in YAML):

    SPEC        := [NAME=]TASK:SOURCE[,KEY=VALUE...]
    TASK:SOURCE := zero-shot:DATASET:DIR | probe:DATASET:DIR | retrieval:DIR
    DATASET     := imagenet | folder | wds | demo     (as in `clipkit zero-shot DATASET`)

    zero-shot:wds:/data/wds_cifar10                  -> name zero-shot-cifar10
    zero-shot:imagenet:/data/imagenet                -> name zero-shot-imagenet
    shape=zero-shot:demo:demo_data,task=shape        -> name shape
    retrieval:demo_data/eval,ks=1-5-10               -> name retrieval-eval
    probe:wds:/data/wds_cifar10,sweep=full           -> name probe-cifar10

The text is split on its first ':'s only, so DIR may hold ':'; options start at the first ','
followed by `KEY=`. The options are the stand-alone commands' own:

- zero-shot: `split` (test), `task` (demo: shape | colour), `templates` FILE, `classnames` FILE
- probe: `train-split` (train), `test-split` (test), `task`, `classnames`, `seed` (0),
  `val-fraction` (0.2), `sweep`: `quick` (default: weight decays 1e-6, 1e-4, 1e-2, 1 without
  refinement, L-BFGS up to 100 iterations: cheap enough to run every few hundred steps) or
  `full` (`clipkit probe`'s own sweep: 7 decays, 2 refinements, 300 iterations)
- retrieval: `split` (test), `ks` as k values joined by '-' (1-5-10)

Default NAME: the task, the data folder's name (less `wds_`) and (demo) the task:
`zero-shot-demo_data-shape`.
Names match [A-Za-z0-9_.-]+ and are unique within a run. Every metric a spec produces is logged
as `eval/NAME/METRIC` (`eval/NAME/ema/METRIC` for a method's EMA weights): `metric_key`.

No torch here: the config validation reads specs before anything heavy is imported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipkit.config_types import ConfigError

TASKS = ("zero-shot", "probe", "retrieval")
DATASETS = ("imagenet", "folder", "wds", "demo")  # clipkit.data.eval_sets.DATASETS, torch-free
DEMO_TASKS = ("shape", "colour")
SWEEPS = ("quick", "full")
WEIGHTS = ("online", "ema")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_NAMED = re.compile(r"([A-Za-z0-9_.-]+)=(.*)", re.DOTALL)
_OPTION_START = re.compile(r",(?=[a-z][a-z0-9-]*=)")  # a ',' that starts `KEY=`

# Each task's options and their defaults (None: not given).
_OPTIONS: dict[str, dict[str, Any]] = {
    "zero-shot": {"split": "test", "task": "shape", "templates": None, "classnames": None},
    "probe": {
        "train-split": "train",
        "test-split": "test",
        "task": "shape",
        "classnames": None,
        "seed": "0",
        "val-fraction": "0.2",
        "sweep": "quick",
    },
    "retrieval": {"split": "test", "ks": "1-5-10"},
}
_METRICS = {
    "zero-shot": ("acc1", "acc5", "mean_per_class_recall"),
    "probe": ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall"),
}


@dataclass(frozen=True)
class EvalSpec:
    """One parsed spec; `options` holds every option of the task (defaults filled in)."""

    name: str
    task: str  # zero-shot | probe | retrieval
    dataset: str | None  # imagenet | folder | wds | demo; None for retrieval
    path: str
    options: dict[str, Any] = field(default_factory=dict)
    text: str = ""  # the spec as given

    def metric_names(self) -> list[str]:
        """The metric keys this spec's results hold (CLIP_benchmark's names)."""
        if self.task == "retrieval":
            return [f"{kind}_retrieval_recall@{k}" for k in self.ks for kind in ("image", "text")]
        return list(_METRICS[self.task])

    @property
    def ks(self) -> list[int]:
        """Retrieval's k values, sorted and unique."""
        return _parse_ks(self.options["ks"], self.text)

    def option(self, key: str) -> Any:
        return self.options[key]


def metric_key(name: str, metric: str, weights: str = "online") -> str:
    """The record key of one metric: `eval/NAME/METRIC`, or `eval/NAME/ema/METRIC`."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    return f"eval/{name}/{metric}" if weights == "online" else f"eval/{name}/ema/{metric}"


def metric_keys(specs: list[EvalSpec], ema: bool = False) -> list[str]:
    """Every record key the specs produce (with the EMA ones when the method keeps EMA weights):
    what `--keep-best` may name."""
    weights = WEIGHTS if ema else WEIGHTS[:1]
    return [metric_key(s.name, m, w) for s in specs for w in weights for m in s.metric_names()]


def parse_specs(texts: list[str]) -> list[EvalSpec]:
    """Parse every spec; names must be unique (two default names clash: give one a NAME=)."""
    specs = [parse_spec(t) for t in texts]
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(
                f"--eval {spec.text!r}: the name '{spec.name}' is taken by {seen[spec.name]!r}; "
                "name one of them with NAME=TASK:..."
            )
        seen[spec.name] = spec.text
    return specs


def parse_spec(text: str) -> EvalSpec:
    """One spec string -> EvalSpec, or a one-line ConfigError naming the spec and the fault."""
    text = text.strip() if isinstance(text, str) else text
    if not isinstance(text, str) or not text:
        raise ConfigError(f"--eval {text!r}: empty; expected [NAME=]TASK:SOURCE[,KEY=VALUE...]")
    named = _NAMED.fullmatch(text)
    name, body = (named.group(1), named.group(2)) if named else (None, text)
    task, sep, rest = body.partition(":")
    if not sep or task not in TASKS:
        raise _error(text, f"unknown task '{task}'; known: {', '.join(TASKS)}")
    dataset = None
    if task != "retrieval":
        dataset, sep, rest = rest.partition(":")
        if not sep or dataset not in DATASETS:
            raise _error(text, f"unknown dataset '{dataset}'; known: {', '.join(DATASETS)}")
    path, *pairs = _OPTION_START.split(rest)
    if not path:
        raise _error(text, "no data folder given")
    options = _options(text, task, dataset, pairs)
    _check(text, task, path, options)
    name = name or default_name(task, dataset, path, options)
    if not _NAME.fullmatch(name):
        raise _error(text, f"the name '{name}' may hold only letters, digits, '_', '.', '-'")
    return EvalSpec(name, task, dataset, path, options, text)


def default_name(task: str, dataset: str | None, path: str, options: dict) -> str:
    """task + data folder name without CLIP_benchmark's `wds_` prefix (+ the demo task), with
    characters outside a name made '_'."""
    folder = (Path(path).name or path.strip("/") or "data").removeprefix("wds_") or "wds"
    parts = [task, re.sub(r"[^A-Za-z0-9_.-]", "_", folder)]
    if dataset == "demo":
        parts.append(options["task"])
    return "-".join(parts)


def _error(text: str, what: str) -> ConfigError:
    return ConfigError(f"--eval {text!r}: {what}")


def _options(text: str, task: str, dataset: str | None, pairs: list[str]) -> dict[str, Any]:
    known = _OPTIONS[task]
    options = dict(known)
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in known:
            raise _error(text, f"unknown option '{key}' for {task}; known: {', '.join(known)}")
        if key == "task" and dataset != "demo":
            raise _error(text, "the option 'task' applies to the demo dataset only")
        if not value:
            raise _error(text, f"option '{key}' has no value")
        options[key] = value
    return options


def _check(text: str, task: str, path: str, options: dict) -> None:
    """The data folder and the option files exist; option values are of their kind."""
    where = Path(path)
    if not (where.is_dir() or (task == "retrieval" and where.suffix == ".tar" and where.is_file())):
        raise _error(text, f"data folder not found: {path}")
    for key in ("templates", "classnames"):
        if options.get(key) is not None and not Path(options[key]).is_file():
            raise _error(text, f"{key} file not found: {options[key]}")
    if "task" in options and options["task"] not in DEMO_TASKS:
        raise _error(text, f"task must be one of {', '.join(DEMO_TASKS)}")
    if task == "retrieval":
        _parse_ks(options["ks"], text)
    if task == "probe":
        _check_probe(text, options)


def _check_probe(text: str, options: dict) -> None:
    if options["sweep"] not in SWEEPS:
        raise _error(text, f"sweep must be one of {', '.join(SWEEPS)}")
    if not options["seed"].isdigit():
        raise _error(text, f"seed must be a whole number >= 0, got '{options['seed']}'")
    try:
        fraction = float(options["val-fraction"])
    except ValueError:
        fraction = float("nan")
    if not 0 < fraction < 1:
        raise _error(text, f"val-fraction must lie in (0, 1), got '{options['val-fraction']}'")


def _parse_ks(ks: str, text: str) -> list[int]:
    """'1-5-10' -> [1, 5, 10]."""
    parts = ks.split("-")
    if not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise _error(text, f"ks must be whole numbers >= 1 joined by '-' (1-5-10), got '{ks}'")
    return sorted({int(p) for p in parts})
