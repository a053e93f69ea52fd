"""clipkit: contrastive language-image pretraining, evaluation and retrieval in one toolkit."""

__version__ = "0.1.0"
