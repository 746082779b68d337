"""Tests of stad.images: reading untrusted image and mask files, and making network input.

Each test writes its own small files with Pillow from a seeded numpy generator. Expected values
come from the conversion table in docs/datasets.md ("Image files"): 8-bit values are divided by
255, 16-bit values by 65535, alpha is dropped and grayscale is copied to R, G and B.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from support import mutated

from stad.errors import DataError, StadError
from stad.images import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    MAX_PIXELS,
    MAX_SIDE,
    as_rgb,
    load_image,
    load_mask,
    to_tensor,
)


def _check_rgb(arr: np.ndarray, shape: tuple[int, int]) -> None:
    assert arr.dtype == np.float32
    assert arr.shape == (*shape, 3)
    assert np.isfinite(arr).all()
    assert arr.min() >= 0.0 and arr.max() <= 1.0


# ---- modes -------------------------------------------------------------------------------------


def test_rgb_png_is_exact(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    arr = load_image(tmp_path / "rgb.png")
    _check_rgb(arr, (6, 9))
    np.testing.assert_array_equal(arr, pixels.astype(np.float32) / 255.0)


def test_grayscale_l_is_copied_to_three_channels(tmp_path: Path) -> None:
    gray = np.random.default_rng(1).integers(0, 256, (5, 7), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "l.png")
    arr = load_image(tmp_path / "l.png")
    _check_rgb(arr, (5, 7))
    for c in range(3):
        np.testing.assert_array_equal(arr[..., c], gray.astype(np.float32) / 255.0)


def test_la_drops_alpha(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, (4, 4), dtype=np.uint8)
    alpha = rng.integers(0, 256, (4, 4), dtype=np.uint8)
    Image.fromarray(np.stack([gray, alpha], axis=2), mode="LA").save(tmp_path / "la.png")
    arr = load_image(tmp_path / "la.png")
    _check_rgb(arr, (4, 4))
    for c in range(3):
        np.testing.assert_array_equal(arr[..., c], gray.astype(np.float32) / 255.0)


def test_rgba_drops_alpha_keeping_stored_colours(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (4, 5, 4), dtype=np.uint8)
    rgba[0, 0, 3] = 0  # fully transparent: the colour is still the stored one
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    arr = load_image(tmp_path / "rgba.png")
    _check_rgb(arr, (4, 5))
    np.testing.assert_array_equal(arr, rgba[..., :3].astype(np.float32) / 255.0)


def test_palette_is_converted(tmp_path: Path) -> None:
    palette = [255, 0, 0, 0, 128, 255, 10, 20, 30]
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    img = Image.fromarray(indices, mode="P")
    img.putpalette(palette)
    img.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as check:
        assert check.mode == "P"
    arr = load_image(tmp_path / "p.png")
    _check_rgb(arr, (2, 3))
    colours = np.array(palette, dtype=np.float32).reshape(3, 3) / 255.0
    np.testing.assert_array_equal(arr, colours[indices])


def test_16_bit_grayscale_is_scaled_by_65535(tmp_path: Path) -> None:
    values = np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as check:
        assert check.mode in ("I;16", "I")  # Pillow's mode for a 16-bit grayscale PNG
    arr = load_image(tmp_path / "g16.png")
    _check_rgb(arr, (2, 2))
    assert arr[1, 0, 0] == 1.0  # 65535 → 1
    assert arr[0, 0, 0] == 0.0
    assert arr[0, 1, 0] == pytest.approx(0.5, abs=1e-4)  # 32768 / 65535 = 0.500008
    assert arr[1, 1, 0] == pytest.approx(1000 / 65535, rel=1e-6)
    np.testing.assert_array_equal(arr[..., 0], arr[..., 2])


def test_32_bit_grayscale_is_read_as_16_bit_or_refused(tmp_path: Path) -> None:
    # One bright pixel used to rescale the whole image by itself: other greys for one scene
    values = np.array([[0, 32768], [65535, 1000]], dtype=np.int32)
    Image.fromarray(values, mode="I").save(tmp_path / "g32.tif")
    with Image.open(tmp_path / "g32.tif") as check:
        assert check.mode == "I"
    np.testing.assert_array_equal(load_image(tmp_path / "g32.tif")[..., 0],
                                  (values / 65535).astype(np.float32))
    values[0, 0] = 260_000
    Image.fromarray(values, mode="I").save(tmp_path / "bright.tif")
    with pytest.raises(DataError, match=r"bright\.tif is a 32-bit grey image with values up to "
                       r"260000; stad reads grey images of at most 16 bits"):
        load_image(tmp_path / "bright.tif")


def test_a_float_tiff_is_read_as_a_float_array_is(tmp_path: Path) -> None:
    # Values beyond [0, 1] were clipped, so a float TIFF of 0-255 greys scored as a white
    # image, while the same pixels as an array were refused.
    values = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    with Image.open(tmp_path / "f.tif") as check:
        assert check.mode == "F"
    np.testing.assert_array_equal(load_image(tmp_path / "f.tif")[..., 1], values)
    for bad in (255.0, -0.5, np.nan):
        values[0, 0] = bad
        Image.fromarray(values, mode="F").save(tmp_path / "f255.tif")
        with pytest.raises(DataError, match=r"f255\.tif is a 32-bit float image with values "
                           r"outside \[0, 1\]"):
            load_image(tmp_path / "f255.tif")
        with pytest.raises(DataError, match=r"outside \[0, 1\]"):
            as_rgb(values)


def test_exif_orientation_is_not_applied(tmp_path: Path) -> None:
    """docs/datasets.md: pixels are read in the order the file stores them; an EXIF
    Orientation tag (6: shown turned 90° clockwise) does not rotate the image."""
    pixels = np.random.default_rng(3).integers(0, 256, (4, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(pixels).save(tmp_path / "turned.png", exif=exif)
    with Image.open(tmp_path / "turned.png") as check:
        assert check.getexif().get(0x0112) == 6  # the tag is in the file
    arr = load_image(tmp_path / "turned.png")
    _check_rgb(arr, (4, 7))
    np.testing.assert_array_equal(arr, pixels.astype(np.float32) / 255.0)


def _png_header_only(path: Path, side: int) -> Path:
    """A PNG signature and IHDR (CRCs right) claiming side² RGB pixels, with no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(
        ">IIBBBBB", side, side, 8, 2, 0, 0, 0)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("theirs, after", [
    (1000, MAX_PIXELS), (None, None), (10**12, 10**12), (89_478_485, MAX_PIXELS)])
def test_pillows_limit_is_raised_to_stads_never_lowered_and_stad_refuses_above_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, theirs: int | None,
        after: int | None) -> None:
    # Pillow's decompression-bomb limit is global: stad may raise it (else Pillow would refuse
    # images stad reads) but leaves a higher one, or None, as the user set it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", theirs)
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "small.png")
    assert load_image(tmp_path / "small.png").shape == (40, 50, 3)
    assert Image.MAX_IMAGE_PIXELS == after
    # Above stad's own limit, refused by stad whatever Pillow's limit (None too), before
    # decoding. (Pillow warns first where its limit is stad's; `stad` filters that warning.)
    side = MAX_SIDE + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(DataError, match=f"bomb.png claims {side}×{side} pixels"):
            load_image(_png_header_only(tmp_path / "bomb.png", side))
    # Far above (twice Pillow's limit, where that is stad's), Pillow refuses it while opening;
    # and with warnings made errors, Pillow's warning is not let out either.
    for big in (2 * MAX_SIDE, MAX_SIDE + 2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(DataError, match=f"(more than the {MAX_SIDE}²|claims)"):
                load_image(_png_header_only(tmp_path / "bigger.png", big))


def test_bilevel_mode_1(tmp_path: Path) -> None:
    bits = np.random.default_rng(4).random((8, 8)) > 0.5
    Image.fromarray(bits).convert("1").save(tmp_path / "b.png")
    with Image.open(tmp_path / "b.png") as check:
        assert check.mode == "1"
    arr = load_image(tmp_path / "b.png")
    _check_rgb(arr, (8, 8))
    np.testing.assert_array_equal(arr[..., 1], bits.astype(np.float32))


def test_rgb_jpeg(tmp_path: Path) -> None:
    Image.new("RGB", (16, 8), (200, 100, 50)).save(tmp_path / "rgb.jpg", quality=95)
    arr = load_image(tmp_path / "rgb.jpg")
    _check_rgb(arr, (8, 16))
    np.testing.assert_allclose(arr.mean(axis=(0, 1)), np.array([200, 100, 50]) / 255, atol=0.03)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    # Pillow's CMYK → RGB: R = 255 - C, G = 255 - M, B = 255 - Y (K = 0): full magenta ink
    # leaves red and blue.
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as check:
        assert check.mode == "CMYK"
    arr = load_image(tmp_path / "cmyk.jpg")
    _check_rgb(arr, (8, 8))
    np.testing.assert_allclose(arr.mean(axis=(0, 1)), [1.0, 0.0, 1.0], atol=0.05)


# ---- unreadable files --------------------------------------------------------------------------


def _valid_png(seed: int = 0, size: int = 16) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _data_error(path: Path) -> str:
    with pytest.raises(DataError) as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _data_error(path)


@pytest.mark.parametrize("keep", [0.5, 0.9, 40 / 1000])
def test_truncated_png(tmp_path: Path, keep: float) -> None:
    data = _valid_png(seed=5, size=32)
    path = tmp_path / "cut.png"
    path.write_bytes(data[: max(33, int(len(data) * keep))])
    _data_error(path)


def test_text_file_with_png_suffix(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    assert "not a readable image" in _data_error(path)


def test_missing_file(tmp_path: Path) -> None:
    assert "does not exist" in _data_error(tmp_path / "missing.png")


def test_folder(tmp_path: Path) -> None:
    folder = tmp_path / "looks_like.png"
    folder.mkdir()
    assert "folder" in _data_error(folder)


def test_same_errors_for_masks(tmp_path: Path) -> None:
    path = tmp_path / "mask.png"
    path.write_bytes(_valid_png()[:60])
    with pytest.raises(DataError, match="mask.png"):
        load_mask(path)
    with pytest.raises(DataError, match="missing"):
        load_mask(tmp_path / "missing.png")


# ---- masks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("high", [255, 1, 17])
def test_binary_mask(tmp_path: Path, high: int) -> None:
    truth = np.random.default_rng(6).random((6, 5)) > 0.5
    Image.fromarray(truth.astype(np.uint8) * high, mode="L").save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png", shape=(6, 5))
    assert mask.dtype == np.bool_ and mask.shape == (6, 5)
    np.testing.assert_array_equal(mask, truth)


def test_bilevel_mask_and_all_normal_mask(tmp_path: Path) -> None:
    truth = np.random.default_rng(7).random((4, 4)) > 0.5
    Image.fromarray(truth).convert("1").save(tmp_path / "b.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "b.png"), truth)
    Image.new("L", (4, 4), 0).save(tmp_path / "zero.png")
    assert not load_mask(tmp_path / "zero.png").any()


def test_rgb_mask_of_black_and_white(tmp_path: Path) -> None:
    truth = np.random.default_rng(8).random((4, 4)) > 0.5
    Image.fromarray(np.repeat(truth[..., None], 3, axis=2).astype(np.uint8) * 255).save(
        tmp_path / "rgb.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "rgb.png"), truth)


@pytest.mark.parametrize("values", [(0, 128, 255), (5, 255)])
def test_non_binary_mask(tmp_path: Path, values: tuple[int, ...]) -> None:
    arr = np.array([values * 3], dtype=np.uint8)
    path = tmp_path / "soft.png"
    Image.fromarray(arr, mode="L").save(path)
    with pytest.raises(DataError, match="not binary") as info:
        load_mask(path)
    assert str(path) in str(info.value)


def test_mask_of_the_wrong_size(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    Image.new("L", (4, 3), 255).save(path)
    with pytest.raises(DataError) as info:
        load_mask(path, shape=(8, 8))
    message = str(info.value)
    assert str(path) in message and "4×3" in message and "8×8" in message


# ---- to_tensor ---------------------------------------------------------------------------------


def test_to_tensor_shapes() -> None:
    image = np.random.default_rng(9).random((10, 14, 3), dtype=np.float32)
    assert to_tensor(image, size=None).shape == (3, 10, 14)
    assert to_tensor(image, size=8).shape == (3, 8, 8)
    assert to_tensor(image, size=32).shape == (3, 32, 32)
    assert to_tensor(image, size=8).dtype == torch.float32


def test_to_tensor_standardizes_with_the_given_statistics() -> None:
    image = np.random.default_rng(10).random((6, 6, 3), dtype=np.float32)
    x = to_tensor(image, size=None)
    mean = torch.tensor(DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(DEFAULT_STD).view(3, 1, 1)
    torch.testing.assert_close(x, (torch.from_numpy(image).permute(2, 0, 1) - mean) / std)
    identity = to_tensor(image, size=None, mean=(0, 0, 0), std=(1, 1, 1))
    torch.testing.assert_close(identity, torch.from_numpy(image).permute(2, 0, 1),
                               rtol=0, atol=0)


def test_to_tensor_resizing_keeps_a_constant_image_constant() -> None:
    image = np.full((9, 13, 3), 0.5, dtype=np.float32)
    image[..., 2] = 0.25
    x = to_tensor(image, size=5, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    torch.testing.assert_close(x[0], torch.zeros(5, 5))
    torch.testing.assert_close(x[2], torch.full((5, 5), -0.5))


# ---- fuzzing: every input ends in an image or a StadError --------------------------------------

_PNG = _valid_png(seed=11, size=8)


def _fix_crcs(data: bytes) -> bytes:
    """Recompute every PNG chunk CRC, so that mutations reach the decoder, not the CRC check."""
    out = bytearray(data)
    pos = 8
    while pos + 12 <= len(out):
        (length,) = struct.unpack(">I", out[pos: pos + 4])
        end = pos + 8 + length
        if end + 4 > len(out):
            break
        out[end: end + 4] = struct.pack(">I", zlib.crc32(bytes(out[pos + 4: end])))
        pos = end + 4
    return bytes(out)


@st.composite
def _mutated_png(draw: st.DrawFn) -> bytes:
    data = draw(mutated(_PNG))
    return _fix_crcs(data) if draw(st.booleans()) else data


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=256), _mutated_png()))
def test_load_image_never_raises_anything_but_stad_errors(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.png"
    path.write_bytes(data)
    with warnings.catch_warnings():
        # Pillow warns about odd metadata in some formats; stad does not make those errors.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        for load in (load_image, load_mask):
            try:
                result = load(path)
            except StadError:
                continue
            assert isinstance(result, np.ndarray)
            if load is load_image:
                _check_rgb(result, result.shape[:2])


EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 8 8
newpath 0 0 moveto 8 8 lineto stroke
showpage
"""


@pytest.mark.parametrize("fmt", ["EPS", "PPM", "GIF", "ICO"])
def test_only_the_documented_formats_are_decoded(tmp_path: Path, fmt: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the suffix: Pillow's EPS plugin would run Ghostscript on an attacker's file."""
    marker = tmp_path / "gs-ran"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    path = tmp_path / "part.png"
    if fmt == "EPS":
        path.write_bytes(EPS)
    else:
        Image.new("RGB", (8, 8), (10, 200, 30)).save(path, format=fmt)
    message = _data_error(path)
    assert "not a readable image (stad reads PNG, JPEG, BMP, TIFF and WebP)" in message
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "WEBP"])
def test_the_documented_formats_are_read_whatever_the_suffix(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "part.img"
    Image.new("RGB", (8, 8), (10, 200, 30)).save(path, format=fmt)
    assert load_image(path).shape == (8, 8, 3)


def test_an_image_too_large_for_memory_is_a_data_error(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Within the pixel limit, a small PNG can still decode to more floats than a machine holds:
    an error naming the file (exit 3, which `score --on-error skip` skips), not exit 1."""
    import stad.images as images

    path = tmp_path / "wide.png"
    Image.new("1", (300, 200)).save(path)

    def no_memory(img: Image.Image, what: str) -> np.ndarray:
        raise MemoryError("Unable to allocate 3.00 GiB")

    monkeypatch.setattr(images, "_pil_to_rgb", no_memory)
    assert _data_error(path) == (f"image {path} (300×200) does not fit in memory as RGB floats; "
                                 "make it smaller")
