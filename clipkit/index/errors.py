"""The errors the index package raises, one per way a caller can get it wrong."""


class IndexMismatchError(ValueError):
    """Queries don't fit the index: wrong dimension, or more neighbours asked than stored."""


class IndexBudgetError(ValueError):
    """No index kind fits the memory budget."""


class IndexFileError(ValueError):
    """An index file faiss cannot read: truncated, corrupt, or not a faiss index."""
