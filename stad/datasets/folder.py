"""A user's own data in plain folders::

    ROOT/CATEGORY/train/                 normal images for fitting (required)
    ROOT/CATEGORY/val/                   normal images for calibration (optional)
    ROOT/CATEGORY/test/normal/           normal test images (optional)
    ROOT/CATEGORY/test/anomalous/        anomalous test images (optional), either directly
                                         (defect type "anomalous") or in one sub-folder per
                                         defect type (not named "good", the normal images')
    ROOT/CATEGORY/masks/                 masks of the anomalous images (optional)

Pairing rule: the mask of ``test/anomalous/[DEFECT/]NAME.EXT`` is
``masks/[DEFECT/]NAME.png`` or ``masks/[DEFECT/]NAME_mask.png`` (any image suffix). When
``masks/`` exists, every anomalous image must have exactly one mask and every mask an image;
without ``masks/``, anomalous images carry no pixel annotation (image-level metrics only).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from stad.datasets.base import (
    ANOMALOUS_DEFECT,
    API_VERSION,
    NORMAL_DEFECT,
    Sample,
    Split,
    check_pairs,
)
from stad.datasets.mvtec import image_files, visible_dirs
from stad.errors import DataError

ANOMALOUS = ANOMALOUS_DEFECT


def _category_dir(root: Path, category: str) -> Path:
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a folder")
    path = root / category
    if not (path / "train").is_dir():
        found = ", ".join(FolderAdapter().categories(root)) or "none"
        raise DataError(f"category '{category}' not found under {root} "
                        f"(no {path / 'train'}); categories there: {found}")
    return path


def _mask_index(folder: Path) -> dict[str, list[Path]]:
    """Masks in ``folder`` by the stem of the image they belong to."""
    index: dict[str, list[Path]] = {}
    for mask in image_files(folder):
        stem = mask.stem[: -len("_mask")] if mask.stem.endswith("_mask") else mask.stem
        index.setdefault(stem, []).append(mask)
    return index


def _anomalous(base: Path) -> Iterator[Sample]:
    test = base / "test" / ANOMALOUS
    if not test.is_dir():
        return
    groups = [(ANOMALOUS, test, base / "masks")]
    groups += [(d.name, d, base / "masks" / d.name) for d in visible_dirs(test)]
    if (test / NORMAL_DEFECT) in [folder for _, folder, _ in groups]:
        raise DataError(f"{test / NORMAL_DEFECT}: a defect type may not be named "
                        f"'{NORMAL_DEFECT}', the name of normal images; rename the folder")
    has_masks = (base / "masks").is_dir()
    missing: list[Path] = []
    ambiguous: list[Path] = []
    extra: list[Path] = []
    out: list[Sample] = []
    for defect, folder, mask_dir in groups:
        index = _mask_index(mask_dir) if has_masks and mask_dir.is_dir() else {}
        for image in image_files(folder):
            masks = index.pop(image.stem, [])
            if has_masks and not masks:
                missing.append(image)
            if len(masks) > 1:
                ambiguous.extend(masks)
            out.append(Sample(image=image, mask=masks[0] if masks else None,
                              label="anomalous", split="test", defect=defect))
        extra.extend(m for ms in index.values() for m in ms)
    if has_masks:
        defects = {name for name, _, _ in groups}
        for folder in visible_dirs(base / "masks"):
            if folder.name not in defects:
                extra.extend(image_files(folder))
    check_pairs(base, {"anomalous images without a mask in masks/": missing,
                       "several masks for one image": ambiguous,
                       "masks without an image": extra})
    yield from out


class FolderAdapter:
    """Built-in adapter for plain folders of normal and anomalous images."""

    api_version: ClassVar[int] = API_VERSION
    description: ClassVar[str] = (
        "your own folders: CATEGORY/{train,val,test/normal,test/anomalous,masks}"
    )

    def categories(self, root: Path) -> list[str]:
        if not root.is_dir():
            raise DataError(f"dataset root {root} does not exist or is not a folder")
        return sorted(p.name for p in visible_dirs(root) if (p / "train").is_dir())

    def samples(self, root: Path, category: str, split: Split) -> Iterator[Sample]:
        base = _category_dir(root, category)
        if split in ("train", "val"):
            folder = base / split
            if folder.is_dir():
                for image in image_files(folder):
                    yield Sample(image=image, mask=None, label="normal", split=split)
            return
        normal = base / "test" / "normal"
        if normal.is_dir():
            for image in image_files(normal):
                yield Sample(image=image, mask=None, label="normal", split="test")
        yield from _anomalous(base)
