"""Evaluation: zero-shot classification, linear and VQT probes, retrieval.

Kept free of imports so the CLI can read the defaults below without loading torch."""

DEFAULT_BATCH = 64  # images per batch when embedding for evaluation (CLI --batch-size default)
