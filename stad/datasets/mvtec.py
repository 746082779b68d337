"""The MVTec AD layout (Bergmann et al., CVPR 2019)::

    ROOT/CATEGORY/train/good/*.png                     normal training images
    ROOT/CATEGORY/val/good/*.png                       optional (our extension): normal images
                                                       for calibration
    ROOT/CATEGORY/test/good/*.png                      normal test images
    ROOT/CATEGORY/test/DEFECT/NAME.png                 anomalous test images
    ROOT/CATEGORY/ground_truth/DEFECT/NAME_mask.png    their masks

Every anomalous test image must pair with its mask and every mask with an image; anything
else is a :class:`~stad.errors.DataError` that names the files.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from stad.datasets.base import API_VERSION, NORMAL_DEFECT, Sample, Split, check_pairs
from stad.errors import DataError
from stad.images import is_image_file

GOOD = NORMAL_DEFECT  # the folder of normal images, and their defect type


def image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden files skipped). A link
    to nothing is kept, so that reading it names it (it was skipped without a word)."""
    return sorted(p for p in folder.iterdir()
                  if (p.is_file() or (p.is_symlink() and not p.exists()))
                  and not p.name.startswith(".") and is_image_file(p))


def visible_dirs(folder: Path) -> list[Path]:
    """Sub-folders of ``folder`` that are not hidden, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _category_dir(root: Path, category: str) -> Path:
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a folder; "
                        "pass --root (root= in Python) pointing at the dataset")
    path = root / category
    if not (path / "train" / GOOD).is_dir():
        found = ", ".join(mvtec_categories(root)) or "none"
        # --root given as the category's own folder (mvtec/bottle, not mvtec)
        hint = (f"; {root} is a category folder itself: pass --root {root.absolute().parent}"
                if (root / "train" / GOOD).is_dir() else "")
        raise DataError(f"category '{category}' not found under {root} "
                        f"(no {path / 'train' / GOOD}); categories there: {found}{hint}")
    return path


def mvtec_categories(root: Path) -> list[str]:
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a folder")
    return sorted(p.name for p in visible_dirs(root) if (p / "train" / GOOD).is_dir())


def mvtec_samples(root: Path, category: str, split: Split) -> Iterator[Sample]:
    """Samples of one split of an MVTec-layout category (shared with the synthetic set)."""
    base = _category_dir(root, category)
    if split in ("train", "val"):
        folder = base / split / GOOD
        if split == "val" and not folder.is_dir():
            return
        for path in image_files(folder):
            yield Sample(image=path, mask=None, label="normal", split=split)
        return
    test_dir = base / "test"
    if not test_dir.is_dir():
        return
    gt_dir = base / "ground_truth"
    defects = sorted(p.name for p in visible_dirs(test_dir))
    unpaired_images: list[Path] = []
    unpaired_masks: list[Path] = []
    good_masks: list[Path] = []  # MVTec AD gives normal images no mask
    out: list[Sample] = []
    for defect in defects:
        images = image_files(test_dir / defect)
        if defect == GOOD:
            out.extend(Sample(image=p, mask=None, label="normal", split="test") for p in images)
            continue
        # NAME_mask.png, its suffix in any case (as image suffixes are read: 000_mask.PNG); a
        # second mask of one name (000_mask.png beside 000_mask.PNG) is one without an image
        masks: dict[str, Path] = {}
        for p in image_files(gt_dir / defect) if (gt_dir / defect).is_dir() else []:
            if masks.setdefault(p.stem + p.suffix.lower(), p) != p:
                unpaired_masks.append(p)
        for path in images:
            mask = masks.pop(f"{path.stem}_mask.png", None)
            if mask is None:
                unpaired_images.append(path)
            else:
                out.append(Sample(image=path, mask=mask, label="anomalous", split="test",
                                  defect=defect))
        unpaired_masks.extend(masks.values())
    if gt_dir.is_dir():
        for folder in visible_dirs(gt_dir):
            if folder.name == GOOD:
                good_masks.extend(image_files(folder))
            elif folder.name not in defects:
                unpaired_masks.extend(image_files(folder))
    check_pairs(base, {"defect images without a mask (expected ground_truth/DEFECT/"
                       "NAME_mask.png)": unpaired_images,
                       "masks without an image": unpaired_masks,
                       "masks in ground_truth/good (normal images have none: move them to "
                       "their defect's folder or remove them)": good_masks})
    yield from out


class MVTecAdapter:
    """Built-in adapter for data in the MVTec AD layout."""

    api_version: ClassVar[int] = API_VERSION
    description: ClassVar[str] = "MVTec AD layout: CATEGORY/{train,test,ground_truth}/..."

    def categories(self, root: Path) -> list[str]:
        return mvtec_categories(root)

    def samples(self, root: Path, category: str, split: Split) -> Iterator[Sample]:
        return mvtec_samples(root, category, split)
