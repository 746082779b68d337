"""The public contract between stad and dataset adapters (built-in or third-party plugins).

An adapter is a class registered under the entry-point group ``stad.datasets``. stad
instantiates it with no arguments and calls :meth:`DatasetAdapter.categories` and
:meth:`DatasetAdapter.samples`. An adapter only *lists* files; stad reads and checks the
images and masks itself (:mod:`stad.images`), so adapters stay small.

Bump :data:`API_VERSION` only for an incompatible change; stad refuses adapters whose
``api_version`` it does not know, naming the plugin's distribution and version.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Protocol, runtime_checkable

from stad.errors import DataError

API_VERSION = 1
"""The adapter API version this stad speaks."""

Label = Literal["normal", "anomalous"]
Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
NORMAL_DEFECT = "good"
"""The defect type of normal images (MVTec AD's name)."""
ANOMALOUS_DEFECT = "anomalous"
"""The defect type of an anomalous image whose adapter names none."""
LABELS: tuple[Label, ...] = ("normal", "anomalous")


def is_path(value: object) -> bool:
    """Whether a plugin gave a path: a non-empty ``str`` or ``os.PathLike``."""
    return isinstance(value, str | os.PathLike) and bool(os.fspath(value))


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    Attributes:
        image: path of the image file.
        mask: path of its ground-truth mask (non-zero = anomalous pixel), or ``None``. A
            ``None`` mask on an anomalous test image means "no pixel annotation"; on a
            normal image it means "all pixels normal".
        label: ``"normal"`` or ``"anomalous"``.
        split: ``"train"`` (anomaly-free, for fitting), ``"val"`` (anomaly-free, for
            calibration) or ``"test"`` (labelled, for evaluation).
        defect: the defect type, used to break metrics down: ``"good"`` for normal images;
            left out, ``"good"`` for a normal image and ``"anomalous"`` for an anomalous one.
            An anomalous image may not be named ``"good"``.
    """

    image: Path
    mask: Path | None
    label: Label
    split: Split
    defect: str = ""

    def __post_init__(self) -> None:
        for name, value in (("image", self.image), ("mask", self.mask)):
            if (value is None and name == "mask") or is_path(value):
                continue
            raise ValueError(f"Sample.{name} must be a path (str or os.PathLike)"
                             f"{' or None' if name == 'mask' else ''}, got "
                             f"{type(value).__name__} {value!r:.60}")
        if self.label not in LABELS:
            raise ValueError(f"Sample.label must be one of {LABELS}, got {self.label!r}")
        if self.split not in SPLITS:
            raise ValueError(f"Sample.split must be one of {SPLITS}, got {self.split!r}")
        if self.split in ("train", "val") and self.label != "normal":
            raise ValueError(f"{self.split} samples must be normal: {self.image}")
        if not self.defect:  # frozen: set once, here
            object.__setattr__(self, "defect", NORMAL_DEFECT if self.label == "normal"
                               else ANOMALOUS_DEFECT)
        if self.label == "anomalous" and self.defect == NORMAL_DEFECT:
            raise ValueError(f"Sample.defect {NORMAL_DEFECT!r} is the defect type of normal "
                             f"images; name the defect of this anomalous one: {self.image}")


@runtime_checkable
class DatasetAdapter(Protocol):
    """What a dataset adapter provides.

    Class attributes:
        api_version: the :data:`API_VERSION` the adapter was written for.
        description: one line shown by ``stad datasets list``.

    Optional method ``default_root() -> Path``: the root to use when the user gives no
    ``--root`` (the built-in synthetic set generates its data under stad's cache).

    Errors: raise :class:`stad.errors.DataError` with a message naming the file or folder
    when the data on disk does not fit the layout (missing root or category, unpaired
    masks). Any other exception is reported as a fault of the plugin (exit code 5).
    """

    api_version: ClassVar[int]
    description: ClassVar[str]

    def categories(self, root: Path) -> list[str]:
        """The categories found under ``root`` (sorted)."""
        ...

    def samples(self, root: Path, category: str, split: Split) -> Iterator[Sample]:
        """The samples of one category and split, in a stable order."""
        ...


SHOWN = 5  # files named in an error about unpaired files; the rest are counted


def check_pairs(base: Path, problems: Mapping[str, Sequence[Path]]) -> None:
    """Raise one :class:`~stad.errors.DataError` for the files of a test split that did not
    pair: ``problems`` maps what is wrong ("defect images without a mask") to the files, and
    every non-empty entry is named, as ``"{base}: WHAT: N file(s): a, b and 3 more; ..."``.
    The built-in adapters and the BTAD plugin report through it; does nothing when all lists
    are empty."""
    parts = []
    for what, paths in problems.items():
        if paths:
            shown = ", ".join(str(p) for p in paths[:SHOWN])
            more = f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else ""
            parts.append(f"{what}: {len(paths)} file(s): {shown}{more}")
    if parts:
        raise DataError(f"{base}: " + "; ".join(parts))
