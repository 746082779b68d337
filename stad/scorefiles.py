"""The files of ``stad score``: its inputs (files and folders), shards, the JSON Lines records it
appends to and resumes from, and the maps it writes."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stad.errors import DataError, UsageError
from stad.fsutil import atomic_write_bytes, same_file, short_name


def expand_inputs(inputs: Sequence[Path], *, leave_out: Path | None = None) -> list[Path]:
    """Image files named directly, plus the image files under named folders (recursively,
    sorted; files without an image suffix and hidden files in folders are skipped).

    Links to folders are followed, each folder once (a link back up does not loop); a link
    to nothing is kept, so that reading it reports it. ``leave_out``: a folder not searched
    (``--maps``, whose pictures would be scored on the next run)."""
    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise DataError(f"input {path} does not exist") from None
        except (OSError, ValueError) as exc:  # a name too long, no permission, a NUL
            raise DataError(f"input {path} cannot be read: "
                            f"{getattr(exc, 'strerror', None) or exc}") from None
        if stat.S_ISDIR(mode):
            if leave_out is not None and same_file(path, leave_out):
                raise UsageError(f"input folder {path} is the --maps folder, whose pictures "
                                 "are not scored: write the maps to another folder")
            found = _images_below(path, leave_out)
            if not found:
                from stad.images import IMAGE_SUFFIXES

                raise DataError(f"folder {path} holds no image files (looked for "
                                f"{', '.join(sorted(IMAGE_SUFFIXES))})")
            out.extend(found)
        else:
            out.append(path)
    return out


def _images_below(folder: Path, leave_out: Path | None) -> list[Path]:
    from stad.images import is_image_file

    def identity(path: str | Path) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    seen = {identity(leave_out)} if leave_out is not None else set()
    seen.discard(None)
    found: list[Path] = []

    def unreadable(exc: OSError) -> None:
        raise DataError(f"folder {exc.filename} cannot be read: {exc.strerror}")

    for top, dirs, files in os.walk(folder, onerror=unreadable, followlinks=True):
        here = identity(top)
        if here in seen:  # reached again through a link, or the folder left out
            dirs[:] = []
            continue
        seen.add(here)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(top) / f for f in files
                     if not f.startswith(".") and is_image_file(Path(f)))
    return sorted(found)


NAME_MAX = 255  # bytes of a file name on common file systems
MAP_SUFFIXES = ("_heat.png", "_overlay.png", "_map.tiff", "_mask.png")  # one image's maps


def map_names(paths: Sequence[Path]) -> dict[Path, str]:
    """The base name of each image's maps (``--maps``): the last three parts of its path as
    given, without the suffix, joined by ``__`` (``test__good__000``), and where two different
    files would share that, enough more of their parts (and their suffixes) to tell them apart
    (``bottle__test__good__000``, ``test__good__000.png``); as a last resort a hash of the
    path. The same file named twice gets one name. A name that would make a map's file name
    longer than file systems allow (255 bytes) is cut, with a hash of the whole name
    (:func:`~stad.fsutil.short_name`).

    Computed over all the inputs of a run, so that every shard of it names alike."""
    parts: dict[str, list[str]] = {}  # per file (its absolute path): the parts first given
    for p in paths:
        parts.setdefault(os.path.abspath(p),
                         [q for q in Path(p).parts if q not in ("/", "..", ".")] or ["image"])

    def name(file: str, depth: int, suffix: bool) -> str:
        given = parts[file]
        last = given[-1] if suffix else Path(given[-1]).stem
        return "__".join([*given[:-1], last][-depth:])

    def hashed(file: str, base: str) -> str:
        return f"{base}-{hashlib.sha256(os.fsencode(file)).hexdigest()[:8]}"

    groups: dict[str, list[str]] = defaultdict(list)
    for file in sorted(parts):
        groups[name(file, 3, False)].append(file)
    chosen: dict[str, str] = {}
    for base, files in groups.items():
        if len(files) == 1:
            chosen[files[0]] = base
            continue
        names = [hashed(f, base) for f in files]
        deepest = max(len(parts[f]) for f in files)
        for depth, suffix in ((d, s) for d in range(3, max(deepest, 3) + 1)
                              for s in (False, True)):
            candidates = [name(f, depth, suffix) for f in files]
            if len(set(candidates)) == len(files):
                names = candidates
                break
        chosen.update(zip(files, names, strict=True))
    taken = Counter(chosen.values())  # a longer name may equal another group's: hash both
    for file, given in list(chosen.items()):
        if taken[given] > 1:
            chosen[file] = hashed(file, given)
    return {p: short_name(chosen[os.path.abspath(p)], NAME_MAX - max(map(len, MAP_SUFFIXES)))
            for p in paths}


def write_maps(folder: Path, name: str, amap: Any, image: Any, threshold: float | None,
               pixel_threshold: float | None = None, mask: Any = None) -> str:
    """Heat map, overlay (PNG, coloured up to the pixel threshold: ``display_range``) and the
    raw float map (32-bit TIFF) of one image as ``folder/NAME_heat.png``, ``NAME_overlay.png``
    and ``NAME_map.tiff`` (``name`` from :func:`map_names`), and with ``mask`` (bool (H, W):
    the map above the pixel threshold) a binary mask PNG (0 and 255) ``NAME_mask.png``; each
    written atomically."""
    import io

    from PIL import Image

    from stad.visualize import display_range, heat, overlay

    lo, hi = display_range(amap, pixel_threshold, threshold)
    base = folder / name
    arrays = (heat(amap, lo, hi), overlay(image, amap, lo, hi), amap.astype("float32"),
              None if mask is None else mask.astype("uint8") * 255)
    outputs = [(suffix, array, mode) for suffix, array, mode
               in zip(MAP_SUFFIXES, arrays, ("RGB", "RGB", "F", "L"), strict=True)
               if array is not None]
    for suffix, array, mode in outputs:
        buf = io.BytesIO()
        Image.fromarray(array, mode=mode if mode == "F" else None).save(
            buf, format="TIFF" if mode == "F" else "PNG")
        atomic_write_bytes(Path(str(base) + suffix), buf.getvalue())
    return str(base) + "_map.tiff"


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` → (K, N) with 0 ≤ K < N (``stad score --shard``)."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard must be K/N with whole numbers, e.g. 0/4; got {text!r}"
                         ) from None
    if n < 1 or not 0 <= k < n:
        raise UsageError(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def in_shard(path: Path, shard: tuple[int, int]) -> bool:
    """Whether ``path`` (as given) belongs to shard K of N: by a hash of the path, so that the
    N shards cover any set of inputs exactly once, whatever order each machine lists them in."""
    k, n = shard
    digest = hashlib.sha256(str(path).encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % n == k


Judged = tuple[float | None, float | None]
"""The thresholds a record was judged at: (``threshold``, ``pixel_threshold``)."""


def recorded(output: Path) -> tuple[dict[str, tuple[bool, Judged]], int | None]:
    """The paths already scored in a JSON Lines ``--output`` file (records without an error),
    each with its verdict (``anomalous``) and the thresholds it was judged at; and where the
    file's last line was cut short by a crash, the size up to it (else None), for
    :func:`drop_cut_line`."""
    from stad.artifacts import finite_number  # a threshold that is missing, NaN, beyond floats
    # or not a number (a damaged or crafted file) counts as none

    if not output.exists():
        return {}, None
    done: dict[str, tuple[bool, Judged]] = {}
    seen: dict[Judged, Judged] = {}  # one tuple per pair of thresholds, shared by its records
    complete = 0  # bytes up to the last newline
    with open(output, "rb") as f:
        for raw in f:  # one line at a time: memory stays that of the paths, not of the file
            if not raw.endswith(b"\n"):
                break
            complete += len(raw)
            try:
                record = json.loads(raw.decode("utf-8", "replace"))
            except (ValueError, RecursionError):  # a damaged line, or one nested beyond reason
                continue
            if isinstance(record, dict) and "path" in record and "error" not in record:
                image, pixel = (float(v) if finite_number(v) else None for v in
                                (record.get("threshold"), record.get("pixel_threshold")))
                judged = (image, pixel)
                done[str(record["path"])] = (record.get("anomalous") is True,
                                             seen.setdefault(judged, judged))
        size = f.seek(0, os.SEEK_END)
    return done, (complete if size != complete else None)


def drop_cut_line(output: Path, at: int | None) -> None:
    """Remove the last line cut short by a crash (``at`` from :func:`recorded`), so that
    appending goes on cleanly."""
    if at is not None:
        with open(output, "r+b") as f:
            f.truncate(at)


def kept_records(paths: Sequence[Path], output: Path, judged: Judged
                 ) -> tuple[list[Path], dict[str, bool], int]:
    """``--skip-existing``: the paths still to score, those that ``output`` has a record of
    (with their verdicts), and how many records the file holds. Records go by the path as
    given (as shards do): a resumed run names its inputs as the first did. Records of these
    inputs judged at other thresholds (``judged``: this run's image and pixel thresholds) are
    a usage error, which leaves the file as it was: it would mix verdicts of two thresholds.
    A record without a threshold is kept."""
    done, cut = recorded(output)
    todo: list[Path] = []
    kept: dict[str, bool] = {}
    for p in paths:
        record = done.get(str(p))
        if record is None:
            todo.append(p)
            continue
        anomalous, (threshold, pixel) = record
        for name, was, now in (("threshold", threshold, judged[0]),
                               ("pixel threshold", pixel, judged[1])):
            if was is not None and now is not None and was != now:
                raise UsageError(
                    f"--output {output} records {p} judged at {name} {was!r}, this run judges "
                    f"at {now!r}: resume with the same model and --threshold, or write to a "
                    "new file (without --skip-existing)")
        kept[str(p)] = anomalous
    drop_cut_line(output, cut)
    return todo, kept, len(done)
