"""A large image collection for pretraining teachers, listed as it is read::

    ROOT/                    a folder: every image below it, at any depth
    ROOT.txt                 or a list file: one image path per line

A folder is walked depth-first, each folder's entries in name order, hidden entries and
symbolic links to folders skipped. A list file's paths are relative to the list file's folder
(absolute paths are kept); blank lines and lines starting with ``#`` are skipped; a listed path
that is not an image file is a :class:`~stad.errors.DataError` naming the line.

Nothing is listed ahead: :meth:`CollectionAdapter.samples` yields each image as the walk or the
read reaches it. A list file is read one line at a time; a folder walk holds the sorted names
of one folder per level of depth, so a flat folder of a million files is better given as a
list file. The only category is ``all``; every image is a
normal ``train`` sample, and ``val`` and ``test`` are empty. For a shuffled order, list the
images in a file and shuffle it (``find DIR -name '*.jpg' | shuf > list.txt``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from stad.datasets.base import API_VERSION, Sample, Split
from stad.errors import DataError
from stad.images import is_image_file

CATEGORY = "all"


def walk_images(folder: Path) -> Iterator[Path]:
    """Image files below ``folder`` in a stable order, found as the walk reaches them."""
    try:
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list {folder}: {exc.strerror}") from None
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from walk_images(Path(entry.path))
        elif entry.is_file() and is_image_file(Path(entry.name)):
            yield Path(entry.path)


def listed_images(list_file: Path) -> Iterator[Path]:
    """The image paths of a list file, read line by line."""
    base = list_file.parent
    try:
        with list_file.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                path = Path(text)
                if "\0" in text:
                    raise DataError(f"{list_file}:{number}: {text!r} holds a NUL character, "
                                    "which no file name can; fix or remove the line")
                if not is_image_file(path):
                    raise DataError(f"{list_file}:{number}: {text!r} is not an image file (its "
                                    "name must end in .png, .jpg, …); fix or remove the line")
                yield path if path.is_absolute() else base / path
    except UnicodeDecodeError:
        raise DataError(f"{list_file} is not a UTF-8 text file listing images, one per "
                        "line") from None
    except OSError as exc:
        raise DataError(f"cannot read {list_file}: {exc.strerror}") from None


def _check_root(root: Path) -> None:
    if not (root.is_dir() or root.is_file()):
        raise DataError(f"collection root {root} is neither a folder nor a list file; pass "
                        "--root a folder of images or a text file listing them")


class CollectionAdapter:
    """A folder tree or a list file of images, streamed (for ``stad pretrain-teacher``)."""

    api_version: ClassVar[int] = API_VERSION
    description: ClassVar[str] = ("a folder tree or a list file of images, streamed (for "
                                  "pretrain-teacher on large collections)")

    def categories(self, root: Path) -> list[str]:
        _check_root(root)
        return [CATEGORY]

    def samples(self, root: Path, category: str, split: Split) -> Iterator[Sample]:
        if category != CATEGORY:
            raise DataError(f"the collection dataset has one category, '{CATEGORY}', not "
                            f"'{category}'; pass --category {CATEGORY} (category='{CATEGORY}' in "
                            "Python)")
        _check_root(root)
        paths = walk_images(root) if root.is_dir() else listed_images(root)
        if split != "train":
            return
        for path in paths:
            yield Sample(image=path, mask=None, label="normal", split="train")
