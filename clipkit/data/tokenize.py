"""Captions -> token ids (B, L), with open_clip's tokenizers: CLIP's BPE, or the Hugging Face
tokenizer of an HF text tower."""

from __future__ import annotations

from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

from clipkit.data.preprocess import Preprocess


def build_tokenizer(pp: Preprocess):
    """The tokenizer for the model `pp` describes, padding/truncating to its context length."""
    if pp.hf_tokenizer_name:
        return HFTokenizer(pp.hf_tokenizer_name, context_length=pp.context_length)
    return SimpleTokenizer(context_length=pp.context_length)
