"""Reading images and masks from untrusted files, and turning them into network input.

Every image stad reads goes through :func:`load_image`: whatever its mode, it comes back as an
RGB float array in [0, 1]. Conversions (documented in docs/datasets.md):

- ``L`` / ``LA`` / ``1`` (grayscale, bilevel): the gray value is copied to R, G and B;
- ``I;16`` and ``I`` (16- and 32-bit grayscale): divided by 65535, then as ``L``; an ``I``
  image with values above 65535 is refused (scaling it by its own brightest pixel, as stad
  did, gave two files of the same scene other greys);
- ``RGBA`` / ``LA`` / ``PA``: the alpha channel is dropped (colour values kept as stored);
- ``P`` (palette), ``CMYK``, ``YCbCr``, ``HSV``, ``LAB``: converted to RGB by Pillow.

A file that cannot be read (missing, empty, truncated, not an image, too large) raises
:class:`~stad.errors.DataError` naming the file.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from stad.artifacts import finite_number
from stad.config import MAX_IMAGE_SIZE
from stad.errors import ArtifactError, DataError
from stad.fsutil import NotARegularFile, read_regular_file

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
# The decoders stad lets Pillow use, whatever a file's suffix: Pillow would otherwise try all of
# its plugins, among them EPS, which runs Ghostscript on the file. (Pillow's JPEG decoder also
# opens the multi-picture JPEGs of many cameras, as MPO.)
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
# Refuse decompression bombs: 16 384² pixels is far above any inspection image.
MAX_SIDE = 16_384
MAX_PIXELS = MAX_SIDE * MAX_SIDE

# Channel statistics used to standardize input; recorded in every artifact.
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)


def preprocessing(size: int) -> dict[str, Any]:
    """How images become network input, as every artifact records it: resized to ``size``²,
    standardized with :data:`DEFAULT_MEAN` and :data:`DEFAULT_STD`."""
    return {"image_size": size, "mean": list(DEFAULT_MEAN), "std": list(DEFAULT_STD)}


def check_preprocessing(pre: Any, what: str) -> dict[str, Any]:
    """A recorded ``preprocessing`` (:func:`preprocessing`) checked before images are scored with
    it: a side of at least 17 pixels, three finite means, three finite positive spreads; else
    an :class:`~stad.errors.ArtifactError` naming ``what`` (the artifact)."""
    def numbers(key: str) -> bool:
        value = pre.get(key)
        return isinstance(value, list) and len(value) == 3 and all(map(finite_number, value))

    size = pre.get("image_size") if isinstance(pre, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or not 17 <= size <= MAX_IMAGE_SIZE:
        problem = f"image_size {size!r} is not a whole number from 17 to {MAX_IMAGE_SIZE}"
    elif not numbers("mean") or not numbers("std") or min(pre["std"]) <= 0:
        problem = (f"mean {pre.get('mean')!r} and std {pre.get('std')!r} are not three finite "
                   "numbers each, the spreads positive")
    else:
        return pre
    raise ArtifactError(f"{what} has a malformed preprocessing record: {problem}; produce it "
                        "again")


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has an image suffix stad reads (folders are filtered with this)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def _open(path: Path, kind: str = "image") -> Image.Image:
    # Pillow refuses images above twice its limit while opening them, before stad can; a limit
    # below stad's is raised to it (never lowered, and None, no limit, is kept), once for all
    # threads. No warning filter is set: that would not be thread-safe.
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and limit < MAX_PIXELS:
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        # read once, as a regular file only: a FIFO would block Pillow's open for ever, a device
        # feed it without end; a file is no larger than its decoded image
        data = read_regular_file(path)
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:  # the header only
            if img.width * img.height > MAX_PIXELS:
                raise DataError(f"{kind} {path} claims {img.width}×{img.height} pixels, more than "
                                f"the {MAX_SIDE}² stad reads; make it smaller")
            img.load()  # decode now, so that truncation is found here
            return img.copy() if img.mode != "P" else img.convert("RGBA")
    except FileNotFoundError:
        raise DataError(f"{kind} {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{kind} {path} is a folder, not an image file") from None
    except NotARegularFile as exc:
        raise DataError(f"{kind} {path} is {exc.strerror}") from None
    except MemoryError:  # within MAX_PIXELS, but more than this machine holds
        raise DataError(f"{kind} {path} does not fit in memory; make it smaller") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # the warning: if
        # the user's filters make it an error; Pillow raises the error above twice its limit
        raise DataError(f"{kind} {path} has more than the {MAX_SIDE}² pixels stad reads; make it "
                        "smaller") from None
    except UnidentifiedImageError:
        raise DataError(f"{kind} {path} is not a readable image (stad reads PNG, JPEG, BMP, "
                        "TIFF and WebP)") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise DataError(f"{kind} {path} cannot be decoded ({exc}); is it truncated?") from None


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB.

    Returns:
        float32 array of shape (H, W, 3) with values in [0, 1].
    """
    path = Path(path)
    img = _open(path)
    try:
        return _pil_to_rgb(img, f"image {path}")
    except MemoryError:  # within MAX_PIXELS, but more than this machine can hold as floats
        raise DataError(f"image {path} ({img.width}×{img.height}) does not fit in memory as "
                        "RGB floats; make it smaller") from None


def _pil_to_rgb(img: Image.Image, what: str) -> np.ndarray:
    """A decoded PIL image as RGB float32 (H, W, 3) in [0, 1], by the module's conversions."""
    if img.width < 1 or img.height < 1:
        raise DataError(f"{what} is empty ({img.width}×{img.height})")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        if arr.max() > 65535:
            raise DataError(f"{what} is a 32-bit grey image with values up to {arr.max():.0f}; "
                            "stad reads grey images of at most 16 bits (0-65535): convert it")
        gray = np.clip(arr / 65535.0, 0.0, 1.0).astype(np.float32)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "F":  # a float TIFF: read as a float array is (it was clipped to [0, 1])
        gray = np.asarray(img, dtype=np.float32)
        if not bool(np.isfinite(gray).all()) or gray.min() < 0.0 or gray.max() > 1.0:
            raise DataError(f"{what} is a 32-bit float image with values outside [0, 1] (or "
                            "not finite); scale it to [0, 1] or save it with 8 or 16 bits")
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA")
    rgb = img.convert("RGB")
    return np.asarray(rgb, dtype=np.float32) / 255.0


def as_rgb(image: Any, what: str = "image") -> np.ndarray:
    """An image in memory as :func:`load_image` returns a file: (H, W, 3) float32 in [0, 1].

    Accepts a PIL image (converted as a file of its mode would be) or a NumPy array laid out
    (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (alpha dropped): ``uint8`` scaled by 255,
    ``uint16`` by 65535, ``bool`` as 0/1, floating point taken as given and required to lie
    in [0, 1]. Anything else raises :class:`~stad.errors.DataError` naming ``what``.
    """
    if isinstance(image, Image.Image):
        try:
            try:
                image.load()
            except (AssertionError, AttributeError):  # Pillow's state of an image closed unread
                raise DataError(f"{what} cannot be decoded: Pillow has no pixels for it (was "
                                "it closed before it was loaded? call .load() first)") from None
            return _pil_to_rgb(image, what)
        except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
            raise DataError(f"{what} cannot be decoded ({exc}); is it truncated?") from None
    if not isinstance(image, np.ndarray):
        raise DataError(f"{what} is a {type(image).__name__}, not an image: pass a file path, "
                        "a PIL image or a NumPy array (H, W[, C])")
    arr = image
    if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        arr = arr[:, :, :3] if arr.shape[2] != 1 else arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)) or min(arr.shape[:2]) < 1:
        raise DataError(f"{what} is an array of shape {image.shape}; images are (H, W), "
                        "(H, W, 1), (H, W, 3) or (H, W, 4) arrays")
    kind, size = arr.dtype.kind, arr.dtype.itemsize  # any byte order
    if kind == "u" and size == 1:
        out = arr.astype(np.float32) / 255.0
    elif kind == "u" and size == 2:
        out = arr.astype(np.float32) / 65535.0
    elif kind == "b":
        out = arr.astype(np.float32)
    elif kind == "f":
        out = arr.astype(np.float32)
        if not bool(np.isfinite(out).all()) or out.min() < 0.0 or out.max() > 1.0:
            raise DataError(f"{what} is a float array with values outside [0, 1] (or not "
                            "finite); scale it to [0, 1] or pass uint8")
    else:
        raise DataError(f"{what} has dtype {arr.dtype}; pass uint8, uint16, bool or float in "
                        "[0, 1]")
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    return np.ascontiguousarray(out)


def load_mask(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask: 0 = normal, anything else = anomalous.

    Args:
        path: the mask file (8-bit, values 0 and one other value such as 255 or 1).
        shape: the (H, W) of its image; a mask of another size is an error.

    Returns:
        bool array of shape (H, W).
    """
    path = Path(path)
    img = _open(path, "mask")
    if img.mode not in ("L", "1", "P", "RGBA", "RGB", "LA", "I;16", "I"):
        raise DataError(f"mask {path} has unsupported mode {img.mode}")
    try:
        arr = np.asarray(img.convert("L") if img.mode not in ("L", "1") else img)
    except MemoryError:
        raise DataError(f"mask {path} does not fit in memory; make it smaller") from None
    if arr.ndim != 2:
        raise DataError(f"mask {path} is not single-channel")
    values = np.unique(arr)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        raise DataError(
            f"mask {path} is not binary (values {values[:6].tolist()}...); "
            "masks must hold 0 for normal pixels and one other value for anomalous ones"
        )
    if shape is not None and arr.shape != tuple(shape):
        raise DataError(
            f"mask {path} is {arr.shape[1]}×{arr.shape[0]} but its image is "
            f"{shape[1]}×{shape[0]}; masks must have their image's size"
        )
    return arr > 0


def to_tensor(
    image: np.ndarray,
    *,
    size: int | None,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
) -> torch.Tensor:
    """Resize (bilinear, antialiased) and standardize an (H, W, 3) image.

    Returns:
        float32 tensor of shape (3, size, size), or (3, H, W) when ``size`` is ``None``.
    """
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # (3, H, W)
    if size is not None and x.shape[1:] != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)[0]
    m = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return (x - m) / s
