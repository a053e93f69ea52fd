"""What the data layer needs to know about a model to feed it: image size and normalisation,
resize rules, and the tokenizer with its context length. The model factory produces it from an
architecture (`factory.preprocess(arch)`); the data layer never reads an architecture."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preprocess:
    """open_clip's preprocessing settings for one model, plus its tokenizer's."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str | None = "bicubic"  # open_clip names: bicubic, bilinear, random
    resize_mode: str | None = "shortest"  # open_clip names: shortest, longest, squash
    context_length: int = 77
    hf_tokenizer_name: str | None = None  # a Hugging Face tokenizer for HF text towers
