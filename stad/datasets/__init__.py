"""Dataset adapters: the public contract and the registry that finds them."""

from stad.datasets.base import (
    API_VERSION,
    LABELS,
    SPLITS,
    DatasetAdapter,
    Label,
    Sample,
    Split,
    check_pairs,
)

__all__ = ["API_VERSION", "LABELS", "SPLITS", "DatasetAdapter", "Label", "Sample", "Split",
           "check_pairs"]
