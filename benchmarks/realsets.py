"""Anomaly sets made from the real photographs that scikit-image ships, in the MVTec AD layout.

No download: the source photos are PNG/JPEG files inside the scikit-image wheel
(``skimage/data/``), read here directly with Pillow; ``skimage.data``'s loader functions (which
may fetch other images with pooch) are never called. Layout (the ``mvtec`` adapter reads it)::

    root/<set>/train/good/000.png
    root/<set>/val/good/000.png                  (calibration images, used by fit-students)
    root/<set>/test/good/000.png
    root/<set>/test/<defect>/000.png
    root/<set>/ground_truth/<defect>/000_mask.png (8-bit L, 0 or 255)
    root/<set>/.stad-realsets.json                (written last: "this set is done")

Sets (docs/quality.md):

* texture-like -- ``brick``, ``grass``, ``gravel`` (512×512 grey photos): random crops of
  :data:`TEXTURE_CROP` px, flipped (and turned by 90° where the texture is isotropic), mild
  exposure jitter, resized to ``image_size``. Train, val and test crops come from three
  disjoint rectangles of the photo (:func:`texture_regions`), so a test image is never a
  re-crop of a training image.
* held out -- ``tissue`` (scikit-image's 512×512 colour ``ihc`` photo of stained tissue, a
  texture like the others, turned too), ``moon`` (the 512×512 grey lunar surface: pits and
  dents lit from one side; flipped as brick is, not turned) and ``retina`` (a 1411×1411
  colour fundus photo, framed as the objects are): no setting is chosen on them; they are
  scored once for each shipped default, and only when named (``--sets tissue moon retina``;
  the CLIs' default is :data:`TUNED`).
* object-like -- ``coffee`` (a cup on a saucer, colour) and ``coins`` (a tray of coins, grey):
  the same framing every time, as on a production line, with a sub-pixel random shift of up to
  :data:`MAX_SHIFT` px (at 128²), small brightness and contrast changes and sensor noise.

Defects (:data:`DEFECTS`), chosen to differ in kind from the ``synthetic`` adapter's
(scratch, stain, hole, paste: added marks and material): ``crack`` (a thin dark branching
fracture), ``blur`` (texture lost: a smoothed region), ``warp`` (a local twist or dent: same
colours, bent structure), ``foreign`` (a piece of a different photo with an irregular
outline) and ``speck`` (the same, small: 0.1–0.5 % of the image). A defect is drawn on the
noise-free view; the same sensor noise is then added to the
clean and the defective image. The mask is where the written pixels really differ, by more
than :data:`TOLERANCE` grey levels in some channel, closed by 2 px inside the defect's footprint
(so a blurred flat spot inside a blurred region is not a hole): every pixel outside the mask
is within ``TOLERANCE`` of the clean image, and pixels outside the footprint are bit-identical.

Seeding as in ``stad.datasets.synthetic``: each image has its own generator keyed by
``(seed, set, split, defect, index)``; identical parameters give byte-identical files.

    python benchmarks/realsets.py --out DATA [--sets brick coins] [--image-size 128] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from stad.fsutil import atomic_write_bytes

GENERATOR_VERSION = 2  # 2: the small ``speck`` defect
"""Bumped whenever the same seed and parameters would produce different files."""

MARKER = ".stad-realsets.json"
TEXTURE_CROP = 160
"""Side (px of the source photo) of a texture crop, resized to ``image_size``."""
MAX_SHIFT = 3.0
"""Largest translation (px at 128²) of an object view."""
NOISE = 1.5 / 255
"""Std of the sensor noise added to every image."""
TOLERANCE = 6
"""Grey levels (of 255) a pixel may change by and still count as unchanged."""
MIN_AREA = 0.003
"""Smallest mask, as a share of the image: smaller defects are redrawn."""
MIN_AREA_OF = {"speck": 0.0008}
"""... except for the small defects, which are small on purpose."""
MIN_CONTRAST = 20
"""Smallest mean change (grey levels, largest channel) over a mask: fainter ones are redrawn."""
MIN_IMAGE_SIZE = 32

Array = np.ndarray


@dataclass(frozen=True)
class SetSpec:
    source: str  # file name in skimage/data
    kind: str  # "texture" or "object"
    turns: bool = False  # textures: may a crop be turned by 90° (isotropic texture)?
    held_out: bool = False  # never used to choose a setting: scored once per shipped default


SETS: dict[str, SetSpec] = {
    "brick": SetSpec("brick.png", "texture"),  # bricks stand upright: flips only
    "grass": SetSpec("grass.png", "texture", turns=True),
    "gravel": SetSpec("gravel.png", "texture", turns=True),
    "coffee": SetSpec("coffee.png", "object"),
    "coins": SetSpec("coins.png", "object"),
    # Stained tissue under a microscope (scikit-image's `ihc`), an unaligned colour texture.
    "tissue": SetSpec("ihc.png", "texture", turns=True, held_out=True),
    # Since session 35, two more held out: the lunar surface (`moon`), a grey surface with pits
    # and dents like a cast or blasted part, flipped as brick is, not turned; and a fundus
    # photo of the retina (`retina`, colour), an object with fine branching vessels.
    "moon": SetSpec("moon.png", "texture", held_out=True),
    "retina": SetSpec("retina.jpg", "object", held_out=True),
}
TUNED: tuple[str, ...] = tuple(name for name, spec in SETS.items() if not spec.held_out)
"""The sets settings are chosen on (the default of the CLIs)."""
HELD_OUT: tuple[str, ...] = tuple(name for name in SETS if name not in TUNED)
"""The others: scored only when named."""
DEFECTS: tuple[str, ...] = ("crack", "blur", "warp", "foreign", "speck")
DONORS: tuple[str, ...] = ("chelsea.png", "astronaut.png", "rocket.jpg", "ihc.png",
                           "motorcycle_left.png")
"""Photos the ``foreign`` pieces are cut from (never a set's own source)."""


@dataclass(frozen=True)
class Params:
    """Everything besides the seed that decides a set's files (recorded in the marker)."""

    image_size: int = 128
    n_train: int = 60
    n_val: int = 10
    n_test_good: int = 12
    n_test_per_defect: int = 8

    def check(self) -> None:
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {self.image_size}")
        if min(self.n_train, self.n_val, self.n_test_good, self.n_test_per_defect) < 0:
            raise ValueError("image counts must be >= 0")
        if self.n_train < 1:
            raise ValueError("n_train must be at least 1")


# --------------------------------------------------------------------------- sources


def data_dir() -> Path:
    """scikit-image's bundled data folder (inside the installed wheel)."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise RuntimeError("scikit-image is not installed: pip install 'stad[bench]'")
    return Path(spec.origin).parent / "data"


@cache
def _photo(name: str) -> Image.Image:
    """A bundled photo as an ``L`` or ``RGB`` Pillow image (alpha dropped)."""
    path = data_dir() / name
    if not path.is_file():
        raise RuntimeError(f"{path} is not bundled with this scikit-image; "
                           "it would need a download, which this benchmark never does")
    with Image.open(path) as img:
        img.load()
        return img.convert("L" if img.mode in ("L", "LA", "I;16") else "RGB")


def _sha256(name: str) -> str:
    return hashlib.sha256((data_dir() / name).read_bytes()).hexdigest()


def _as_float(img: Image.Image) -> Array:
    """(H, W, C) float in [0, 1]; C = 1 for grey, 3 for colour."""
    arr = np.asarray(img, dtype=np.float64) / 255.0
    return arr[..., None] if arr.ndim == 2 else arr


def texture_regions(height: int, width: int, crop: int = TEXTURE_CROP
                    ) -> dict[str, tuple[int, int, int, int]]:
    """Disjoint rectangles ``(y0, y1, x0, x1)`` (half-open) that train, val and test crops of
    a texture photo are drawn from: train the left 56 %, test the top of the rest, val its
    bottom, with 8 px gaps.

    Raises:
        ValueError: the photo is too small for a ``crop`` in each rectangle.
    """
    gap = 8
    xs, ys = round(0.56 * width), round(0.6 * height)
    regions = {"train": (0, height, 0, xs), "test": (0, ys, xs + gap, width),
               "val": (ys + gap, height, xs + gap, width)}
    for split, (y0, y1, x0, x1) in regions.items():
        if y1 - y0 < crop or x1 - x0 < crop:
            raise ValueError(f"a {width}×{height} photo is too small for disjoint {crop}-px "
                             f"crops: the {split} region is {x1 - x0}×{y1 - y0}")
    return regions


# --------------------------------------------------------------------------- views


def _rng(seed: int, name: str, split: str, defect: str, index: int) -> np.random.Generator:
    # crc32 of the names (not hash(): that is salted per process) keys a stream per image.
    key = [GENERATOR_VERSION, seed, zlib.crc32(name.encode()), zlib.crc32(split.encode()),
           zlib.crc32(defect.encode()), index]
    return np.random.default_rng(np.random.SeedSequence(key))


def _texture_view(rng: np.random.Generator, name: str, split: str, n: int
                  ) -> tuple[Array, tuple[int, int, int, int]]:
    photo = _photo(SETS[name].source)
    y0, y1, x0, x1 = texture_regions(photo.height, photo.width)[split]
    y = int(rng.integers(y0, y1 - TEXTURE_CROP + 1))
    x = int(rng.integers(x0, x1 - TEXTURE_CROP + 1))
    crop = photo.crop((x, y, x + TEXTURE_CROP, y + TEXTURE_CROP))
    img = _as_float(crop.resize((n, n), Image.Resampling.LANCZOS))
    sym = int(rng.integers(8 if SETS[name].turns else 4))
    if sym & 1:
        img = img[:, ::-1]
    if sym & 2:
        img = img[::-1]
    if sym & 4:  # with a flip, a transpose is a 90° turn
        img = img.transpose(1, 0, 2)
    img = np.clip(img * (1.0 + 0.03 * rng.standard_normal()), 0.0, 1.0)
    return img, (y, y + TEXTURE_CROP, x, x + TEXTURE_CROP)


def _object_view(rng: np.random.Generator, name: str, n: int) -> Array:
    photo = _photo(SETS[name].source)
    shift = MAX_SHIFT * n / 128
    # The largest centred square that still leaves room for the shift, in source pixels.
    side = (min(photo.width, photo.height) - 2) / (1 + 2 * shift / n)
    dx, dy = rng.uniform(-shift, shift, size=2) * side / n
    cx, cy = photo.width / 2 + dx, photo.height / 2 + dy
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    img = _as_float(photo.resize((n, n), Image.Resampling.LANCZOS, box=box))
    gain, contrast = 1.0 + 0.03 * rng.standard_normal(2)
    mean = img.mean()
    return np.clip((mean + (img - mean) * contrast) * gain, 0.0, 1.0)


# --------------------------------------------------------------------------- defects
# Each defect function takes (rng, clean image (n, n, C)) and returns (effect, alpha): what the
# defect looks like and how much of it replaces the clean image, alpha in [0, 1]; alpha > 0 is
# the defect's footprint. Feature sizes are given at 128² and scaled by s = n / 128.


def _field(rng: np.random.Generator, n: int, sigma: float) -> Array:
    """Smooth Gaussian noise (n, n), unit std."""
    f = ndimage.gaussian_filter(rng.standard_normal((n, n)), sigma)
    return (f - f.mean()) / (f.std() + 1e-12)


def _grid(n: int) -> tuple[Array, Array]:
    yy, xx = np.mgrid[0:n, 0:n].astype(float)
    return yy, xx


def _centre(rng: np.random.Generator, img: Array, structured: bool) -> Array:
    """(y, x) in the middle 60 % of the image; with ``structured``, drawn in proportion to
    local gradient energy, so that a blur or a warp lands where there is something to lose."""
    n = img.shape[0]
    lo, hi = round(0.2 * n), round(0.8 * n)
    if not structured:
        return rng.uniform(lo, hi, size=2)
    grey = img.mean(axis=-1)
    energy = ndimage.gaussian_filter(np.hypot(*np.gradient(grey)) ** 2, 4.0 * n / 128)
    energy = energy[lo:hi, lo:hi].ravel() + 1e-12
    k = int(rng.choice(energy.size, p=energy / energy.sum()))
    return np.array([lo + k // (hi - lo), lo + k % (hi - lo)], float) + rng.uniform(-0.5, 0.5, 2)


def _blob(rng: np.random.Generator, n: int, centre: Array, radius: float, wobble: float
          ) -> Array:
    """Signed distance (px, < 0 inside) to an ellipse with a wavy outline."""
    yy, xx = _grid(n)
    theta, aspect = rng.uniform(0, np.pi), rng.uniform(0.55, 1.0)
    dy, dx = yy - centre[0], xx - centre[1]
    a = dx * np.cos(theta) + dy * np.sin(theta)
    b = -dx * np.sin(theta) + dy * np.cos(theta)
    rho = np.hypot(a / radius, b / (radius * aspect))
    rho = rho + wobble * _field(rng, n, 0.35 * radius)
    return (rho - 1.0) * radius * np.sqrt(aspect)


def _crack(rng: np.random.Generator, img: Array, donors: Sequence[str]) -> tuple[Array, Array]:
    """A thin dark fracture: a jagged random walk that forks once or twice, thinner branches."""
    n = img.shape[0]
    s, sup = n / 128, 4  # drawn on a 4× finer grid, then averaged down: antialiased
    canvas = np.zeros((n * sup, n * sup))
    walkers = [(_centre(rng, img, False), rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.5) * n,
                max(1.0, rng.uniform(1.1, 1.7) * s))]  # at least 1 px at small sizes
    walkers.append((walkers[0][0], walkers[0][1] + np.pi, rng.uniform(0.1, 0.25) * n,
                    walkers[0][3]))  # it runs both ways from where it started
    n_forks = 0
    while walkers:
        pos, heading, length, width = walkers.pop()
        pos, dev = pos.copy(), 0.0
        points = []
        for _ in range(int(length / 0.5)):
            # The direction wanders slowly and zig-zags around it (mean-reverting): jagged
            # but going somewhere, like a fracture, not a curl.
            heading += rng.normal(0.0, 0.02)
            dev += -0.1 * dev + rng.normal(0.0, 0.12)
            step = heading + dev
            pos += 0.5 * np.array([np.sin(step), np.cos(step)])
            if not (0 <= pos[0] < n and 0 <= pos[1] < n):
                break
            points.append(pos.copy())
            if n_forks < 2 and rng.uniform() < 0.012:
                n_forks += 1
                turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.0)
                walkers.append((pos.copy(), heading + turn, rng.uniform(0.1, 0.25) * n,
                                0.7 * width))
        if not points:
            continue
        line = np.zeros_like(canvas, bool)
        idx = np.clip((np.array(points) * sup).astype(int), 0, n * sup - 1)
        line[idx[:, 0], idx[:, 1]] = True
        near = ndimage.distance_transform_edt(~line) <= width * sup / 2
        canvas = np.maximum(canvas, near)
    alpha = canvas.reshape(n, sup, n, sup).mean(axis=(1, 3))
    effect = img * rng.uniform(0.15, 0.4)
    return effect, alpha


def _blur(rng: np.random.Generator, img: Array, donors: Sequence[str]) -> tuple[Array, Array]:
    """Texture lost: a blob (soft 3 px edge) smoothed as if worn, polished or smeared."""
    n = img.shape[0]
    s = n / 128
    dist = _blob(rng, n, _centre(rng, img, True), rng.uniform(0.09, 0.15) * n, 0.12)
    sigma = max(1.5, rng.uniform(2.5, 4.0) * s)
    effect = ndimage.gaussian_filter(img, (sigma, sigma, 0), mode="reflect")
    t = np.clip(0.5 - dist / (3.0 * s), 0.0, 1.0)
    return effect, t * t * (3 - 2 * t)


def _warp(rng: np.random.Generator, img: Array, donors: Sequence[str]) -> tuple[Array, Array]:
    """A local twist (swirl) or dent (bulge): the same pixels, moved; structure bent."""
    n = img.shape[0]
    cy, cx = _centre(rng, img, True)
    radius = rng.uniform(0.09, 0.15) * n
    yy, xx = _grid(n)
    dy, dx = yy - cy, xx - cx
    t = np.clip(1.0 - np.hypot(dy, dx) / radius, 0.0, 1.0)
    fall = t * t * (3 - 2 * t)  # 1 at the centre, 0 (exactly) from the radius on
    if rng.uniform() < 0.65:
        angle = rng.choice([-1.0, 1.0]) * rng.uniform(1.2, 2.2) * fall
        sy = cy + dy * np.cos(angle) + dx * np.sin(angle)
        sx = cx - dy * np.sin(angle) + dx * np.cos(angle)
    else:  # magnify the middle: sample nearer the centre
        k = 1.0 - rng.uniform(0.4, 0.6) * fall
        sy, sx = cy + dy * k, cx + dx * k
    effect = np.stack([ndimage.map_coordinates(img[..., c], [sy, sx], order=1, mode="reflect")
                       for c in range(img.shape[-1])], axis=-1)
    return effect, (fall > 0).astype(float)


def _foreign(rng: np.random.Generator, img: Array, donors: Sequence[str]) -> tuple[Array, Array]:
    """A piece of another photo with a ragged outline (debris, a flake, a stuck fragment); its
    colours are pulled halfway to the host's, grey on grey hosts."""
    return _piece(rng, img, donors, rng.uniform(0.07, 0.13), 0.25)


def _speck(rng: np.random.Generator, img: Array, donors: Sequence[str]) -> tuple[Array, Array]:
    """A small foreign piece: a radius of 1.8–4 % of the side, so 0.1–0.5 % of the image, as
    the smallest defects on real inspection photos (a 20 px hole in a 900 px photo becomes
    3–4 px at 128²)."""
    return _piece(rng, img, donors, rng.uniform(0.018, 0.04), 0.15)


def _piece(rng: np.random.Generator, img: Array, donors: Sequence[str], radius: float,
           wobble: float) -> tuple[Array, Array]:
    """A piece of a donor photo in a blob of ``radius`` (a share of the side)."""
    n = img.shape[0]
    s = n / 128
    photo = _photo(donors[int(rng.integers(len(donors)))])
    side = rng.uniform(0.25, 0.5) * min(photo.width, photo.height)
    x, y = rng.uniform(0, photo.width - side), rng.uniform(0, photo.height - side)
    piece = _as_float(photo.resize((n, n), Image.Resampling.LANCZOS, box=(x, y, x + side,
                                                                          y + side)))
    if img.shape[-1] == 1 and piece.shape[-1] == 3:
        piece = piece @ np.array([[0.299], [0.587], [0.114]])
    elif img.shape[-1] == 3 and piece.shape[-1] == 1:
        piece = np.repeat(piece, 3, axis=-1)
    dist = _blob(rng, n, _centre(rng, img, False), radius * n, wobble)
    inside = dist < 0
    piece = piece + 0.5 * (img[inside].mean(axis=0) - piece[inside].mean(axis=0))
    return np.clip(piece, 0.0, 1.0), np.clip(0.5 - dist / (1.5 * s), 0.0, 1.0)


_DEFECT_FNS: dict[str, Callable[[np.random.Generator, Array, Sequence[str]],
                                tuple[Array, Array]]] = {
    "crack": _crack, "blur": _blur, "warp": _warp, "foreign": _foreign, "speck": _speck}


# --------------------------------------------------------------------------- samples


def _to_u8(img: Array) -> Array:
    u8 = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    return u8[..., 0] if u8.shape[-1] == 1 else u8


def change(clean: Array, image: Array) -> Array:
    """Per pixel, the largest absolute difference over channels of two uint8 images: (H, W)."""
    diff = np.abs(clean.astype(np.int16) - image.astype(np.int16))
    return diff.max(axis=-1) if diff.ndim == 3 else diff


def render_sample(name: str, *, seed: int = 0, split: str = "train", defect: str = "good",
                  index: int = 0, image_size: int = 128) -> dict[str, Any]:
    """Render one image of a set in memory, exactly as :func:`generate` writes it.

    Returns:
        ``clean`` and ``image`` (uint8, (H, W) for grey sets or (H, W, 3)), ``mask`` (uint8
        (H, W), 0 or 255) and ``footprint`` (bool (H, W), where the defect could have changed
        anything; pixels outside it are bit-identical in ``clean`` and ``image``). For good
        samples ``image`` equals ``clean`` and the mask and footprint are empty. ``crop``: for
        texture sets, the rectangle ``(y0, y1, x0, x1)`` of the source photo the image was cut
        from, else ``None``.
    """
    if name not in SETS:
        raise ValueError(f"unknown set {name!r}; choose from {', '.join(SETS)}")
    if defect != "good" and (split != "test" or defect not in DEFECTS):
        raise ValueError(f"defect {defect!r} in split {split!r}: defects are "
                         f"{', '.join(DEFECTS)}, in split 'test' only")
    n = image_size
    rng = _rng(seed, name, split, defect, index)
    crop = None
    if SETS[name].kind == "texture":
        clean, crop = _texture_view(rng, name, split, n)
    else:
        clean = _object_view(rng, name, n)
    noise = NOISE * rng.standard_normal(clean.shape)
    clean_u8 = _to_u8(clean + noise)
    empty = np.zeros((n, n), bool)
    if defect == "good":
        return {"clean": clean_u8, "image": clean_u8.copy(), "mask": empty.astype(np.uint8),
                "footprint": empty, "crop": crop}
    donors = [d for d in DONORS if d != SETS[name].source]
    best: tuple[float, Array, Array, Array] | None = None
    for _attempt in range(40):
        # A defect too small or too faint to annotate is redrawn (same stream); should every
        # draw fail, the most visible one is kept.
        effect, alpha = _DEFECT_FNS[defect](rng, clean, donors)
        image_u8 = _to_u8(clean + alpha[..., None] * (effect - clean) + noise)
        diff = change(clean_u8, image_u8)
        footprint = alpha > 0
        # Close 2-px gaps inside the footprint: flat pixels amid changed ones are part of it.
        closed = ndimage.binary_fill_holes(ndimage.binary_closing(
            diff > TOLERANCE, np.ones((3, 3), bool), iterations=2))
        mask = (diff > TOLERANCE) | (closed & footprint)
        min_area = MIN_AREA_OF.get(defect, MIN_AREA)
        contrast = float(diff[mask].mean()) if mask.sum() >= min_area * n * n else 0.0
        if best is None or contrast > best[0]:
            best = (contrast, image_u8, mask, footprint)
        if contrast >= MIN_CONTRAST:
            break
    assert best is not None
    _, image_u8, mask, footprint = best
    return {"clean": clean_u8, "image": image_u8, "mask": mask.astype(np.uint8) * 255,
            "footprint": footprint, "crop": crop}


# --------------------------------------------------------------------------- files


def _write_png(path: Path, array: Array) -> None:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def _plan(params: Params) -> list[tuple[str, str, int]]:
    """(split, defect, index) of every image of a set, in writing order."""
    plan = [("train", "good", i) for i in range(params.n_train)]
    plan += [("val", "good", i) for i in range(params.n_val)]
    plan += [("test", "good", i) for i in range(params.n_test_good)]
    plan += [("test", d, i) for d in DEFECTS for i in range(params.n_test_per_defect)]
    return plan


def _marker(name: str, seed: int, params: Params) -> dict[str, object]:
    spec = SETS[name]
    photo = _photo(spec.source)
    out: dict[str, object] = {
        "generator": "benchmarks/realsets.py", "version": GENERATOR_VERSION, "set": name,
        "seed": seed, "params": asdict(params), "defects": list(DEFECTS), "kind": spec.kind,
        "source": {"file": f"skimage/data/{spec.source}", "sha256": _sha256(spec.source),
                   "size": [photo.width, photo.height]}}
    if spec.kind == "texture":
        out["regions"] = {k: list(v) for k, v in texture_regions(photo.height,
                                                                 photo.width).items()}
    return out


def generate_set(root: Path, name: str, *, seed: int = 0, params: Params = Params()) -> Path:
    """(Re)write one set under ``root``; the marker is removed first and written last."""
    params.check()
    set_dir = Path(root) / name
    (set_dir / MARKER).unlink(missing_ok=True)
    for split, defect, index in _plan(params):
        sample = render_sample(name, seed=seed, split=split, defect=defect, index=index,
                               image_size=params.image_size)
        _write_png(set_dir / split / defect / f"{index:03d}.png", sample["image"])
        if defect != "good":
            _write_png(set_dir / "ground_truth" / defect / f"{index:03d}_mask.png",
                       sample["mask"])
    text = json.dumps(_marker(name, seed, params), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(set_dir / MARKER, text.encode())
    return set_dir


def ensure_set(root: Path, name: str, *, seed: int = 0, params: Params = Params()) -> Path:
    """Generate a set unless ``root`` already holds it with this seed and these parameters."""
    set_dir = Path(root) / name
    try:
        recorded = json.loads((set_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = None
    if recorded != _marker(name, seed, params) or not all(
            (set_dir / s / d / f"{i:03d}.png").is_file() for s, d, i in _plan(params)):
        generate_set(root, name, seed=seed, params=params)
    return set_dir


def _names(values: Sequence[str]) -> list[str]:
    names = [v for item in values for v in item.split(",") if v]
    unknown = [v for v in names if v not in SETS]
    if unknown:
        raise SystemExit(f"realsets: unknown set(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(SETS)}")
    return list(dict.fromkeys(names))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="root folder to write")
    parser.add_argument("--sets", nargs="+", default=list(TUNED),
                        help=f"sets to write (default: {', '.join(TUNED)}; also the held-out "
                        f"{', '.join(HELD_OUT)})")
    defaults = Params()
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--n-train", type=int, default=defaults.n_train)
    parser.add_argument("--n-val", type=int, default=defaults.n_val)
    parser.add_argument("--n-test-good", type=int, default=defaults.n_test_good)
    parser.add_argument("--n-test-per-defect", type=int, default=defaults.n_test_per_defect)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    params = Params(args.image_size, args.n_train, args.n_val, args.n_test_good,
                    args.n_test_per_defect)
    try:
        params.check()
    except ValueError as exc:
        parser.error(str(exc))
    for name in _names(args.sets):
        path = generate_set(args.out, name, seed=args.seed, params=params)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
