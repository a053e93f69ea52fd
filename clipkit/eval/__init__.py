"""Evaluation: zero-shot classification, linear and VQT probes, retrieval.

Kept free of heavy imports (torch) so the CLI can read the defaults below without loading it."""

from dataclasses import dataclass

DEFAULT_BATCH = 64  # images per batch when embedding for evaluation (CLI --batch-size default)


@dataclass(frozen=True)
class LoaderSettings:
    """How an evaluation reads its images (CLI: --batch-size, --workers, --max-bad-fraction)."""

    batch_size: int = DEFAULT_BATCH
    workers: int = 2  # DataLoader worker processes
    max_bad_fraction: float = 0.01  # unreadable images are skipped; stop past this share
