"""A stad dataset adapter for BTAD, the beanTech Anomaly Detection set (Mishra et al., 2021).

BTAD has three products; each is a category::

    ROOT/01/train/ok/0000.bmp            normal training images
    ROOT/01/test/ok/0000.bmp             normal test images
    ROOT/01/test/ko/0000.bmp             anomalous test images
    ROOT/01/ground_truth/ko/0000.png     their masks: same stem as the image, any image suffix

Product 01 and 03 images are ``.bmp``, product 02 images ``.png``; masks are ``.png`` except
product 03's in some releases (``.bmp``), so suffixes are never assumed. BTAD has no
validation split: stad holds part of ``train`` back for calibration itself.

This file is also the example for plugin authors: it imports only the public contract
(:mod:`stad.datasets` and :class:`stad.errors.DataError`), lists files without opening them
(stad reads and checks the images) and raises ``DataError`` naming the files whenever the
folder does not fit the layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from stad.datasets import Sample, Split, check_pairs
from stad.errors import DataError

__all__ = ["BTADAdapter"]
__version__ = "0.1.0"

# Our own list: stad's image helpers are not part of the adapter contract.
IMAGE_SUFFIXES = frozenset({".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".webp"})
NORMAL, ANOMALOUS = "ok", "ko"  # BTAD's folder names


def _images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` sorted by name; none if it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_SUFFIXES)


class BTADAdapter:
    """Lists the images and masks of a BTAD download (``--dataset btad``)."""

    # The adapter API this was written for, as a number: stad.datasets.API_VERSION would
    # always equal the installed stad's, and so never let stad refuse an outdated plugin.
    api_version: ClassVar[int] = 1
    description: ClassVar[str] = "BTAD (beanTech): PRODUCT/{train/ok,test/{ok,ko},ground_truth/ko}"

    def categories(self, root: Path) -> list[str]:
        """The product folders under ``root`` that have ``train/ok`` (``["01", "02", "03"]``)."""
        if not root.is_dir():
            raise DataError(f"BTAD root {root} does not exist or is not a folder; "
                            "pass --root pointing at the folder that holds 01/, 02/ and 03/")
        return sorted(p.name for p in root.iterdir()
                      if not p.name.startswith(".") and (p / "train" / NORMAL).is_dir())

    def samples(self, root: Path, category: str, split: Split) -> Iterator[Sample]:
        """The samples of one product and split, sorted by file name.

        ``train`` is ``train/ok``; ``val`` is empty; ``test`` is ``test/ok`` (normal, no mask)
        followed by ``test/ko`` (anomalous, defect ``"ko"``, mask from ``ground_truth/ko``).
        The whole split is checked before anything is yielded, so a bad folder fails early.
        """
        base = root / category
        if not (base / "train" / NORMAL).is_dir():
            found = ", ".join(self.categories(root)) or "none"  # raises if root is missing
            raise DataError(f"BTAD category '{category}' not found: no folder "
                            f"{base / 'train' / NORMAL}; categories under {root}: {found}")
        if split == "train":
            return iter([Sample(image=p, mask=None, label="normal", split="train")
                         for p in _images(base / "train" / NORMAL)])
        if split == "val":
            return iter([])
        if split == "test":
            return iter(_test_samples(base))
        raise ValueError(f"unknown split {split!r}")  # stad never asks for one


def _by_stem(folder: Path) -> dict[str, list[Path]]:
    """The image files of ``folder`` grouped by name without suffix."""
    groups: dict[str, list[Path]] = {}
    for path in _images(folder):
        groups.setdefault(path.stem, []).append(path)
    return groups


def _test_samples(base: Path) -> list[Sample]:
    """``test/ok`` then ``test/ko``, each ko image paired with the one mask of the same stem."""
    normal = [Sample(image=p, mask=None, label="normal", split="test")
              for p in _images(base / "test" / NORMAL)]

    # Pair by stem: every stem needs exactly one image in test/ko and one mask in
    # ground_truth/ko. Suffixes differ between products and releases, so they are ignored.
    images = _by_stem(base / "test" / ANOMALOUS)
    masks = _by_stem(base / "ground_truth" / ANOMALOUS)
    no_mask = sorted(p for stem, group in images.items() if stem not in masks for p in group)
    no_image = sorted(m for stem, group in masks.items() if stem not in images for m in group)
    ambiguous = sorted(p for stem in images.keys() & masks.keys()
                       if len(images[stem]) + len(masks[stem]) > 2
                       for p in images[stem] + masks[stem])  # 0000.png beside 0000.bmp

    check_pairs(base, {
        "anomalous images without a mask (expected in ground_truth/ko/ under the same name)":
            no_mask,
        "masks without an image in test/ko/": no_image,
        "names with more than one image or mask (keep one of each)": ambiguous})
    # ``images`` was filled from a sorted listing, so this keeps the order of file names.
    anomalous = [Sample(image=images[stem][0], mask=masks[stem][0], label="anomalous",
                        split="test", defect=ANOMALOUS) for stem in images]
    return normal + anomalous
