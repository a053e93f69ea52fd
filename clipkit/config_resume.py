"""What a resumed run may change: options that define what a run trains keep their saved values
(`check_resume`, against the checkpoint's config); configs saved before an option existed get the
value their run used (`with_legacy_defaults`)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from clipkit.config import SECTIONS, Config, ConfigError, EvalConfig, section_dict

# Options a resumed run may change: how long, where and how fast it runs, and safety limits. Every
# other option defines what the run trains and must keep its saved value: the model, the method,
# the data stream (sources, keys, batch size, epoch size, shuffle, seed, accumulation) and the
# optimizer settings AdamW restores from the checkpoint (weight decay, betas, eps and the shared
# parameters' lr multiplier: a new value would be recorded but silently not used).
# `data.workers` may change: the stream then restarts its epoch order with a warning, as for a
# different number of ranks. `model.grad_checkpointing` only trades memory for compute.
CHANGEABLE_ON_RESUME = {
    "data": {"workers", "max_bad_fraction", "max_pixels", "stall_timeout"},
    "model": {"grad_checkpointing"},
    "method": set(),
    "optim": {
        "lr",
        "warmup",
        "warmup_epochs",
        "warmup_start_lr",
        "final_lr",
        "schedule",
        "grad_clip",
    },
    "run": {
        "out",
        "steps",
        "samples",
        "device",
        "precision",
        "save_every",
        "log_every",
        "keep_last",
        "compile",
        "threads",
        "report_to",
        "wandb_project",
    },
    # What a run evaluates decides nothing it trains: every eval option may change.
    "eval": {f.name for f in fields(EvalConfig)},
}


def with_legacy_defaults(saved: dict) -> dict:
    """A saved run config plus what its run used for options added since: runs saved before
    `optim.accum_mode` existed accumulated independently."""
    return {**saved, "optim": {"accum_mode": "independent", **(saved.get("optim") or {})}}


def check_resume(cfg: Config, saved: dict) -> None:
    """Refuse a resume that changes what the saved run (its checkpoint's config) trains."""
    before = Config.from_dict(with_legacy_defaults(saved))
    changed = []
    for section in SECTIONS:
        saved_values = section_dict(before, section)
        for key, given in section_dict(cfg, section).items():
            # A key only one side has belongs to another method: the name change is reported.
            if key in CHANGEABLE_ON_RESUME[section] or key not in saved_values:
                continue
            kept = saved_values[key]
            if key == "arch" and not given:  # derived; filled in from the checkpoint
                continue
            if given != kept:
                changed.append(f"{section}.{key} (saved {_brief(kept)}, given {_brief(given)})")
    if changed:
        raise ConfigError(
            f"--resume cannot change what the run trains: {'; '.join(changed)}; leave these "
            "options out (the saved values are used) or start a new run with another --out"
        )


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
