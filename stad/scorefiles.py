"""The files of ``stad score``: its inputs (files and folders), shards, the JSON Lines records it
appends to and resumes from, and the maps it writes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stad.errors import DataError, UsageError


def expand_inputs(inputs: Sequence[Path]) -> list[Path]:
    """Image files named directly, plus the image files under named folders (recursively,
    sorted; files without an image suffix and hidden files in folders are skipped)."""
    from stad.images import is_image_file

    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p)
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise DataError(f"folder {path} holds no image files "
                                f"(looked for .png, .jpg, .bmp, .tif, .webp)")
            out.extend(found)
        elif path.exists():
            out.append(path)
        else:
            raise DataError(f"input {path} does not exist")
    return out


def _map_name(path: Path) -> str:
    parts = [p for p in path.with_suffix("").parts if p not in ("/", "..", ".")]
    return "__".join(parts[-3:])


def write_maps(folder: Path, path: Path, amap: Any, image: Any, threshold: float | None,
               pixel_threshold: float | None = None, mask: Any = None) -> str:
    """Heat map, overlay (PNG, coloured up to the pixel threshold: ``display_range``) and the
    raw float map (32-bit TIFF) of one image, and with ``mask`` (bool (H, W): the map above
    the pixel threshold) a binary mask PNG (0 and 255); each written atomically."""
    import io

    from PIL import Image

    from stad.fsutil import atomic_write_bytes
    from stad.visualize import display_range, heat, overlay

    lo, hi = display_range(amap, pixel_threshold, threshold)
    base = folder / _map_name(path)
    outputs = [("_heat.png", heat(amap, lo, hi), "RGB"),
               ("_overlay.png", overlay(image, amap, lo, hi), "RGB"),
               ("_map.tiff", amap.astype("float32"), "F")]
    if mask is not None:
        outputs.append(("_mask.png", mask.astype("uint8") * 255, "L"))
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


def recorded_paths(output: Path) -> set[str]:
    """Paths already scored in a JSON Lines ``--output`` file (records without an error).

    A last line cut short by a crash is removed from the file, so appending goes on cleanly.
    """
    if not output.exists():
        return set()
    data = output.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(output, "r+b") as f:
            f.truncate(len(complete))
    done = set()
    for line in complete.decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "path" in record and "error" not in record:
            done.add(str(record["path"]))
    return done
