"""The torch generators' state: the CPU generator, and the device's CUDA generator on a GPU.
Checkpoints save it (exact resume); exact accumulation replays it (one micro-batch's random
draws, e.g. FLIP's token choice, the same in both passes)."""

from __future__ import annotations

import torch


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Put the generators back; a CUDA state is restored only where a GPU runs the step."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
