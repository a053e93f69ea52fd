"""MS-CLIP weight files: clipkit's layout and the official one (You et al., ECCV 2022, arXiv
2207.12661; code github.com/Hxyou/MSCLIP at e25daf3, spec `methods/msclip.md` §7.11).

The official state_dict stores every shared tensor twice, under `visual.transformer.resblocks.i.*`
and `transformer.resblocks.i.*` (521 keys for B/32); clipkit's own `state_dict()` also lists a
shared tensor once per tower that holds it. Either way both copies map onto the one tensor of the
model, and they must be equal: a file whose copies differ was not written by a tied model.

Files are read with `torch.load(weights_only=True)` (or safetensors) and may wrap the state_dict
under `state_dict` or `model` (a clipkit checkpoint) and carry DDP's `module.` prefix.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from clipkit.config import ConfigError

# clipkit key -> official key (state_dict layout of Hxyou/MSCLIP, §7.11); first match wins.
_ADAPTER = r"visual.transformer.parallel_lateral_adapter.\1."
_OFFICIAL_RULES = [
    (r"^visual\.stem\.blocks\.(\d+)\.", r"visual.transformer.resblocks.0.resnet_stage.conv_\1."),
    (r"^visual\.stem\.", "visual.transformer.resblocks.0."),
    (r"^visual\.branch\.0\.", "visual.transformer.parallel_branch_v.0."),
    (r"^visual\.branch\.(\d+)\.", r"visual.transformer.parallel_branch_v.\1.resnet_stage.conv_0."),
    (r"^visual\.adapters\.(\d+)\.branch_dw\.", _ADAPTER + "top2bottom_dw_conv.conv."),
    (r"^visual\.adapters\.(\d+)\.branch_bn\.", _ADAPTER + "top2bottom_dw_conv.bn."),
    (r"^visual\.adapters\.(\d+)\.branch_pw\.", _ADAPTER + "top2bottom_pw_conv.conv."),
    (r"^visual\.adapters\.(\d+)\.token_dw\.", _ADAPTER + "bottom_dw_conv.conv."),
    (r"^visual\.adapters\.(\d+)\.token_bn\.", _ADAPTER + "bottom_dw_conv.bn."),
    (r"^visual\.adapters\.(\d+)\.ln\.", _ADAPTER + "ln_adapt."),
    (r"^text_blocks\.", "transformer.resblocks."),
]
_OFFICIAL_PREFIXES = ("visual.transformer.", "transformer.resblocks.")


def official_key(key: str, first_slot: int) -> str:
    """The official name of clipkit state_dict key `key` (first_slot: 1 with the conv stem)."""
    m = re.match(r"^visual\.blocks\.(\d+)\.", key)
    if m:  # clipkit counts visual blocks from 0; official slots count the stem as slot 0
        return f"visual.transformer.resblocks.{int(m.group(1)) + first_slot}.{key[m.end() :]}"
    for pattern, repl in _OFFICIAL_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return key


def to_official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The official layout: every shared tensor appears under both visual.* and transformer.*."""
    first = model.visual.first_slot
    return {official_key(k, first): v for k, v in model.state_dict().items()}


@dataclass
class LoadReport:
    layout: str  # "official" or "clipkit"
    missing_keys: list[str]
    unexpected_keys: list[str]
    tied_checked: int  # shared tensors whose duplicate copies in the file were compared equal


def _strip_module(state_dict: dict) -> dict:
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from DDP
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def _summary(keys: list[str]) -> str:
    return f"{keys[:3]}" + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


@torch.no_grad()
def load_tied_state_dict(
    model: nn.Module, state_dict: dict, key_of: Callable[[str], str], strict: bool = True
) -> tuple[list[str], list[str], int]:
    """Copy `state_dict[key_of(k)]` into every model tensor `k`; both copies of a tied tensor must
    be equal. All checks run before the first copy, so a refused file leaves the model untouched.

    Returns (missing, unexpected, number of tied tensors checked)."""
    targets = {key_of(k): t for k, t in model.state_dict(keep_vars=True).items()}
    # BN's num_batches_tracked only counts steps: files without it still fit
    missing = sorted(k for k in set(targets) - set(state_dict) if "num_batches_tracked" not in k)
    unexpected = sorted(set(state_dict) - set(targets))
    if strict and (missing or unexpected):
        raise ConfigError(
            f"MS-CLIP weights do not fit this config: missing {_summary(missing)}, "
            f"unexpected {_summary(unexpected)}; pick the matching --model preset"
        )
    groups: dict[int, list[str]] = {}  # one group per model tensor: the file keys feeding it
    for key, tensor in targets.items():
        if key in state_dict:
            groups.setdefault(id(tensor), []).append(key)
    for keys in groups.values():
        src, dst = state_dict[keys[0]], targets[keys[0]]
        if not isinstance(src, torch.Tensor) or src.shape != dst.shape:
            got = tuple(src.shape) if isinstance(src, torch.Tensor) else type(src).__name__
            raise ConfigError(
                f"MS-CLIP weights: {keys[0]} is {got} in the file, {tuple(dst.shape)} in the "
                "model (check --model, --image-size and --context-length)"
            )
        for other in keys[1:]:
            if not torch.equal(src, state_dict[other]):
                raise ConfigError(
                    f"MS-CLIP weights: shared tensor stored twice with different values "
                    f"({keys[0]} != {other}); the file was not written by a tied model"
                )
    for keys in groups.values():
        targets[keys[0]].copy_(state_dict[keys[0]])
    return missing, unexpected, sum(len(keys) > 1 for keys in groups.values())


def load_official_state_dict(model: nn.Module, state_dict: dict, strict: bool = True):
    """Load a state_dict of the official code into clipkit's MS-CLIP (tied copies checked)."""
    first = model.visual.first_slot
    report = load_tied_state_dict(
        model, _strip_module(state_dict), lambda k: official_key(k, first), strict
    )
    return LoadReport("official", *report)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a weights file: unwrapped from `state_dict` / `model`, no `module.`."""
    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e):  # not a pickle at all, rather than a forbidden class in one
            raise ConfigError(f"{p} is not a readable weights file (corrupt or foreign)") from None
        raise ConfigError(
            f"{p} holds pickled objects that a safe load (weights_only) refuses; "
            "save only the state_dict (tensors)"
        ) from None
    except Exception as e:  # the safe unpickler meets arbitrary bytes (a text file: KeyError)
        raise ConfigError(f"{p} is not a readable weights file ({type(e).__name__})") from None
    for wrapper in ("state_dict", "model"):  # official trainer dumps; clipkit checkpoints
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj:
        raise ConfigError(f"{p} holds no state_dict (a dict of tensors)")
    return _strip_module(obj)


def is_official_layout(state_dict: dict) -> bool:
    return any(k.startswith(_OFFICIAL_PREFIXES) for k in state_dict)


def load_weights_file(model: nn.Module, path: str | Path) -> LoadReport:
    """Load a clipkit-layout or official-layout MS-CLIP weights file, detected by its keys."""
    state_dict = read_state_dict(path)
    if is_official_layout(state_dict):
        return load_official_state_dict(model, state_dict)
    if not set(state_dict) & set(model.state_dict()):
        raise ConfigError(
            f"{path} is neither a clipkit nor an official MS-CLIP state_dict "
            f"(keys like {_summary(sorted(state_dict))})"
        )
    return LoadReport("clipkit", *load_tied_state_dict(model, state_dict, lambda k: k))
