"""Selecting data: turn ``--dataset/--root/--category`` into samples, and summarize them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stad.config import Settings
from stad.datasets.base import SPLITS, Sample, Split
from stad.datasets.registry import Adapter, get_adapter
from stad.errors import UsageError


@dataclass(frozen=True)
class DataSelection:
    """An adapter, a root and a category: everything a command needs to list samples."""

    adapter: Adapter
    root: Path
    category: str

    def samples(self, split: Split) -> list[Sample]:
        return self.adapter.list_samples(self.root, self.category, split)

    def describe(self) -> str:
        return f"{self.adapter.name}:{self.root}/{self.category}"


def select_data(settings: Settings) -> DataSelection:
    """Resolve the dataset settings, loading the adapter.

    An adapter may offer ``default_root()`` (the synthetic set uses stad's cache); any other
    adapter needs ``--root``. A missing category is a usage error listing the ones found.
    """
    adapter = get_adapter(settings.dataset)
    root = settings.root
    if root is None:
        root = adapter.default_root()
        if root is None:
            raise UsageError(f"dataset '{settings.dataset}' needs a data root: pass --root PATH, "
                             "set STAD_ROOT or put root = \"PATH\" in the config file")
    root = Path(root).expanduser()
    category = settings.category
    if category is None:
        found = ", ".join(adapter.categories(root)) or "none found"
        raise UsageError(f"pass --category (categories under {root}: {found})")
    return DataSelection(adapter=adapter, root=root, category=category)


def summarize(selection: DataSelection) -> dict[str, Any]:
    """Counts per split, defect type and masks; listing all splits validates their pairing."""
    splits: dict[str, Any] = {}
    for split in SPLITS:
        samples = selection.samples(split)
        splits[split] = {
            "images": len(samples),
            "normal": sum(s.label == "normal" for s in samples),
            "anomalous": sum(s.label == "anomalous" for s in samples),
            "masks": sum(s.mask is not None for s in samples),
            "defects": dict(sorted(Counter(s.defect for s in samples).items())),
        }
    return {
        "dataset": selection.adapter.name,
        "root": str(selection.root),
        "category": selection.category,
        "splits": splits,
    }
