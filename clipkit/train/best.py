"""`--keep-best METRIC`: which logged metric decides, in which direction, and the best value seen
so far. The trainer writes `checkpoints/best.pt` (a step checkpoint plus this tracker's state)
when `update` says the metric improved; every step checkpoint carries the state too, so a resumed
run compares against the best of the steps it already trained."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from clipkit.config_types import ConfigError

DIRECTIONS = ("min", "max")


def parse_keep_best(text: str) -> tuple[str, str]:
    """`METRIC[:min|:max]` -> (metric, direction). Without a suffix, lower is better for a name
    ending in `loss` (val/loss) and higher for anything else (accuracies, recalls)."""
    metric, sep, direction = text.strip().rpartition(":")
    if not sep or direction not in DIRECTIONS:
        metric, direction = text.strip(), ""
    if not metric:
        raise ConfigError(f"--keep-best {text!r}: name a metric, e.g. val/loss or eval/NAME/acc1")
    return metric, direction or ("min" if metric.endswith("loss") else "max")


@dataclass
class BestTracker:
    metric: str
    direction: str  # min | max
    value: float | None = None  # the best value so far (None: nothing evaluated yet)
    step: int | None = None  # the step that reached it

    @classmethod
    def from_option(cls, text: str) -> BestTracker:
        """The tracker of `--keep-best TEXT`, nothing seen yet."""
        return cls(*parse_keep_best(text))

    def resume(self, saved: dict | None) -> None:
        """Continue a checkpoint's `saved` state when it tracked the same metric the same way
        (a run resumed with another --keep-best starts afresh)."""
        if saved and (saved["metric"], saved["direction"]) == (self.metric, self.direction):
            self.value, self.step = saved["value"], saved["step"]

    def update(self, records: list[dict], step: int) -> bool:
        """Take the metric from one evaluation's records; True when it beats the best so far
        (a failed evaluation, whose record lacks it, or a non-finite value never does)."""
        values = [r[self.metric] for r in records if isinstance(r.get(self.metric), (int, float))]
        if not values or not math.isfinite(values[0]):
            return False
        value = float(values[0])
        if self.value is not None and not self._better(value, self.value):
            return False
        self.value, self.step = value, step
        return True

    def _better(self, new: float, old: float) -> bool:
        return new < old if self.direction == "min" else new > old

    def state(self) -> dict:
        """What checkpoints store under "best": metric, direction, value, step."""
        return asdict(self)
