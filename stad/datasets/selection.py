"""Selecting data: turn ``--dataset/--root/--category`` into samples, and summarize them."""

from __future__ import annotations

import functools
import hashlib
import os
import stat
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stad.config import Settings
from stad.datasets.base import SPLITS, Sample, Split
from stad.datasets.registry import Adapter, get_adapter
from stad.errors import DataError, UsageError


@dataclass(frozen=True)
class Listing:
    """What :meth:`DataSelection.scan` found."""

    count: int
    sha256: str


def relative_name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as recorded in artifacts (as given when outside it).

    An adapter may list absolute or resolved paths under a relative root, or the other way
    round: both are made absolute, and where the root lies behind a link, resolved, before the
    path is given up as outside it."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        pass
    absolute, real = _root_forms(str(root), os.getcwd())
    for made, base in ((os.path.abspath, absolute), (os.path.realpath, real)):
        if base is None:
            continue
        try:
            return str(Path(made(path)).relative_to(base))
        except ValueError:
            continue
    return str(path)


@functools.lru_cache(maxsize=16)
def _root_forms(root: str, cwd: str) -> tuple[str, str | None]:
    """A root made absolute, and resolved where that differs (None: no link on its way); once
    per root and current folder, not once per image (a list file names millions)."""
    absolute = os.path.abspath(root)
    real = os.path.realpath(root)
    return absolute, (real if real != absolute else None)


def relative_names(samples: Sequence[Sample], root: Path) -> list[str]:
    """:func:`relative_name` of each sample's image."""
    return [relative_name(s.image, root) for s in samples]


@dataclass(frozen=True)
class DataSelection:
    """An adapter, a root and a category: everything a command needs to list samples."""

    adapter: Adapter
    root: Path
    category: str

    def samples(self, split: Split) -> list[Sample]:
        return self.adapter.list_samples(self.root, self.category, split)

    def iter_samples(self, split: Split) -> Iterator[Sample]:
        """The samples as the adapter yields them, without holding them all (large sets)."""
        return self.adapter.samples(self.root, self.category, split)

    def scan(self, split: Split) -> Listing:
        """One pass over a split without holding it: how many images, and a SHA-256 over
        their paths (relative to the root), sizes and modification times. A missing file is a
        :class:`DataError` naming it."""
        h = hashlib.sha256()
        count = 0
        # Names relative to the root's folder (a list file's paths are relative to its own), so
        # that the same data reached another way, or moved, has the same identity.
        base = self.root if self.root.is_dir() else self.root.parent
        for sample in self.iter_samples(split):
            try:
                st = os.stat(sample.image)
            except OSError as exc:
                raise DataError(f"cannot read {sample.image}: {exc.strerror}") from None
            except ValueError:  # a NUL character in a listed name
                raise DataError(f"cannot read {str(sample.image)!r}: not a valid file name"
                                ) from None
            h.update(f"{relative_name(sample.image, base)}\0{st.st_size}\0{st.st_mtime_ns}\n"
                     .encode())
            count += 1
        return Listing(count=count, sha256=h.hexdigest())

    def describe(self) -> str:
        return f"{self.adapter.name}:{self.root}/{self.category}"


def select_data(settings: Settings) -> DataSelection:
    """Resolve the dataset settings, loading the adapter.

    An adapter may offer ``default_root()`` (the synthetic set uses stad's cache); any other
    adapter needs ``--root``. Without ``--category``, the root's only category is taken; with
    several, that is a usage error listing them; with none, a data error naming the root.
    """
    adapter = get_adapter(settings.dataset)
    root = settings.root
    if root is None:
        root = adapter.default_root()
        if root is None:
            raise UsageError(f"dataset '{settings.dataset}' needs a data root: pass --root PATH "
                             "(root=PATH in Python), set STAD_ROOT or put root = \"PATH\" in the "
                             "config file")
    root = Path(root).expanduser()
    category = settings.category
    if category is None:
        categories = adapter.categories(root)
        if len(categories) == 1:  # nothing to choose (the collection adapter's "all")
            return DataSelection(adapter=adapter, root=root, category=categories[0])
        if not categories:  # the root is not what the adapter reads: the data's fault
            raise DataError(f"dataset '{settings.dataset}' finds no categories under {root}; "
                            "check --root, root= in Python (docs/datasets.md names each layout)")
        raise UsageError(f"pass --category NAME (category=NAME in Python); categories under "
                         f"{root}: {', '.join(categories)}")
    return DataSelection(adapter=adapter, root=root, category=category)


def _check_listed(sample: Sample) -> None:
    """That a listed image, and its mask, are files (not whether they decode: that costs a
    read of each)."""
    for kind, path in (("image", sample.image), ("mask", sample.mask)):
        if path is None:
            continue
        of = f" of image {sample.image}" if kind == "mask" else ""
        try:
            mode = os.stat(path).st_mode
        except ValueError:  # a NUL character in a listed name
            raise DataError(f"{kind} {str(path)!r}{of} is not a valid file name") from None
        except FileNotFoundError:
            raise DataError(f"{kind} {path}{of} ({sample.split} split) does not exist") from None
        except OSError as exc:
            raise DataError(f"{kind} {path}{of} ({sample.split} split) cannot be read: "
                            f"{exc.strerror}") from None
        if not stat.S_ISREG(mode):
            problem = ("is a folder, not a file" if stat.S_ISDIR(mode)
                       else "is not a regular file (a FIFO, device or socket)")
            raise DataError(f"{kind} {path}{of} ({sample.split} split) {problem}")


def summarize(selection: DataSelection) -> dict[str, Any]:
    """Counts per split, defect type and masks; listing all splits validates their pairing and
    that every listed image and mask is a file."""
    splits: dict[str, Any] = {}
    for split in SPLITS:
        counts: Counter[str] = Counter()
        defects: Counter[str] = Counter()
        # counted as listed (a collection is large); val and test are held, as calibrate and
        # evaluate hold them, so that an image listed twice is refused here too
        for s in (selection.iter_samples(split) if split == "train"
                  else selection.samples(split)):
            _check_listed(s)
            counts.update(images=1, normal=s.label == "normal",
                          anomalous=s.label == "anomalous", masks=s.mask is not None)
            defects[s.defect] += 1
        splits[split] = {**{k: counts[k] for k in ("images", "normal", "anomalous", "masks")},
                         "defects": dict(sorted(defects.items()))}
    return {
        "dataset": selection.adapter.name,
        "root": str(selection.root),
        "category": selection.category,
        "splits": splits,
    }
