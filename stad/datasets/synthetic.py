"""The embedded ``synthetic`` dataset: procedural textures with realistic defects, no downloads.

(One file although long: the textures, the defects and the writer share the seeded drawing
helpers, and :data:`GENERATOR_VERSION` versions all of them together.)

Everything is generated from a seed by numpy + scipy.ndimage and written as PNG by Pillow, in
the MVTec AD layout plus a ``val/good`` split for calibration (docs/datasets-synthetic.md)::

    root/<category>/train/good/000.png
    root/<category>/val/good/000.png
    root/<category>/test/good/000.png
    root/<category>/test/<defect>/000.png
    root/<category>/ground_truth/<defect>/000_mask.png   (8-bit L, 0 or 255)
    root/<category>/.stad-synthetic.json                  (written last: "this category is done")

Each image is a fresh random instance of its category's texture family (new phase, new noise,
slight colour jitter), so a model has to learn the texture rather than memorize a picture. A
defect is blended in as ``image = clean + alpha * (effect - clean)``; its mask is
``alpha >= 0.5``, so it covers every pixel changed by at least half of the effect, and pixels
more than :func:`edge_px` pixels (3 at 128², chessboard distance) away from the mask are left
bit-for-bit equal.

Seeding: every image has its own ``numpy.random.Generator`` seeded from
``(seed, category, split, defect, index)``, so images do not depend on how many others are
generated: changing ``n_train`` leaves the test set byte-identical. A defective image first
draws its clean texture from that stream, then the defect: :func:`render_sample` returns both.
"""

from __future__ import annotations

import io
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image
from scipy import ndimage

from stad.datasets.base import API_VERSION, Sample, Split
from stad.datasets.mvtec import mvtec_samples
from stad.errors import DataError, UsageError
from stad.fsutil import atomic_write_bytes, cache_dir

GENERATOR_VERSION = 1
"""Bumped whenever the same seed and parameters would produce different files."""

CATEGORIES: tuple[str, ...] = ("weave", "grain", "granite")
"""Texture families: twill fabric, wood grain, speckled stone."""

DEFECTS: tuple[str, ...] = ("scratch", "stain", "hole", "paste")
"""Defect kinds, each a folder of ``test/`` with masks in ``ground_truth/``."""

MARKER = ".stad-synthetic.json"
MIN_IMAGE_SIZE = 32

Array = np.ndarray


@dataclass(frozen=True)
class SyntheticParams:
    """Everything besides the seed that decides a category's files (recorded in the marker)."""

    image_size: int = 128
    n_train: int = 40
    n_val: int = 10
    n_test_good: int = 10
    n_test_per_defect: int = 6

    def check(self) -> None:
        if self.image_size < MIN_IMAGE_SIZE:
            raise UsageError(f"synthetic image_size must be at least {MIN_IMAGE_SIZE}, "
                             f"got {self.image_size}")
        for name in ("n_train", "n_val", "n_test_good", "n_test_per_defect"):
            if getattr(self, name) < 0:
                raise UsageError(f"synthetic {name} must be >= 0, got {getattr(self, name)}")
        if self.n_train < 1:
            raise UsageError("synthetic n_train must be at least 1")


# --------------------------------------------------------------------------- random fields


def _rng(seed: int, category: str, split: str, defect: str, index: int) -> np.random.Generator:
    # crc32 of the names (not hash(): that is salted per process) keys a stream per image.
    key = [GENERATOR_VERSION, seed, zlib.crc32(category.encode()), zlib.crc32(split.encode()),
           zlib.crc32(defect.encode()), index]
    return np.random.default_rng(np.random.SeedSequence(key))


def _field(rng: np.random.Generator, n: int, sigma: float | tuple[float, float]) -> Array:
    """Stationary smooth Gaussian noise of shape (n, n), unit std, periodic (``wrap``)."""
    f = ndimage.gaussian_filter(rng.standard_normal((n, n)), sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-12)


def _smoothstep(lo: float, hi: float, x: Array) -> Array:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _jitter(rng: np.random.Generator, rgb: Sequence[float], amount: float) -> Array:
    return np.clip(np.asarray(rgb) * (1.0 + amount * rng.standard_normal(3)), 0.0, 1.0)


# --------------------------------------------------------------------------- textures
# Each texture function returns a float (n, n, 3) image in [0, 1]. Feature sizes are given at
# 128² and scaled by s = n / 128, so other sizes show the same field of view.


def _weave(rng: np.random.Generator, n: int, variant: bool = False) -> Array:
    """2/2 twill: indigo warp and ecru weft threads, diagonal ribs, fibre noise, slubs."""
    s = n / 128
    p = 8.0 * s * (1.0 + 0.015 * rng.standard_normal())  # thread pitch in pixels
    ox, oy = rng.uniform(0.0, 4.0 * p, size=2)  # twill repeat is 4 threads
    u = (np.arange(n) + ox) / p
    v = (np.arange(n) + oy) / p
    uu, vv = np.meshgrid(u, v)  # (n, n): uu varies along x (columns)
    i, j = np.floor(uu), np.floor(vv)
    fu, fv = uu - i, vv - j
    phase = np.mod(i - j, 4)
    warp_top = phase < 2  # the vertical thread floats over two weft threads
    # Position along a float (0..1): threads dip where they pass under a crossing thread.
    t_warp = (np.mod(j - i + 1, 4) + fv) / 2
    t_weft = (np.mod(i - j - 2, 4) + fu) / 2
    across_warp = np.sin(np.pi * fu) ** 0.6
    across_weft = np.sin(np.pi * fv) ** 0.6
    along_warp = np.sin(np.pi * np.clip(t_warp, 0, 1)) ** 0.5
    along_weft = np.sin(np.pi * np.clip(t_weft, 0, 1)) ** 0.5
    # Per-thread brightness (slubs) and fibres stretched along each thread's direction.
    slub_w = rng.normal(0.0, 0.05, size=n + 8)
    slub_f = rng.normal(0.0, 0.05, size=n + 8)
    fib_w = _field(rng, n, (2.5 * s, 0.6 * s))  # (sigma_y, sigma_x): vertical streaks
    fib_f = _field(rng, n, (0.6 * s, 2.5 * s))
    ii = (i - i.min()).astype(int)
    jj = (j - j.min()).astype(int)
    shade_w = (0.30 + 0.70 * across_warp) * (0.72 + 0.28 * along_warp)
    shade_w = shade_w * (1.0 + slub_w[ii] + 0.07 * fib_w)
    shade_f = (0.30 + 0.70 * across_weft) * (0.72 + 0.28 * along_weft)
    shade_f = shade_f * (1.0 + slub_f[jj] + 0.07 * fib_f)
    warp = _jitter(rng, (0.20, 0.30, 0.52), 0.04)
    weft = _jitter(rng, (0.86, 0.82, 0.72), 0.02)
    if variant:  # a different cloth for pasted patches: same weave, other dyes
        warp, weft = _jitter(rng, (0.55, 0.20, 0.16), 0.05), _jitter(rng, (0.80, 0.74, 0.50), 0.03)
    img = np.where(warp_top[..., None], shade_w[..., None] * warp, shade_f[..., None] * weft)
    mottle = _field(rng, n, 12.0 * s)
    return img * (1.0 + 0.03 * mottle[..., None])


def _grain(rng: np.random.Generator, n: int, variant: bool = False) -> Array:
    """Flat-sawn wood: wavy growth rings with dark latewood, fibre streaks and pores."""
    s = n / 128
    period = 11.0 * s * (1.0 + 0.03 * rng.standard_normal())
    yy = np.arange(n, dtype=float)[:, None] + rng.uniform(0.0, period)
    warp = 3.0 * s * _field(rng, n, (12.0 * s, 45.0 * s)) + 1.0 * s * _field(rng, n, 4.0 * s)
    ring = np.mod((yy + warp) / period, 1.0)
    # Earlywood darkens slowly into a narrow latewood band, then drops back sharply.
    late = 0.35 * ring**2 + 0.65 * _smoothstep(0.72, 0.9, ring) * _smoothstep(1.0, 0.95, ring)
    fibres = _field(rng, n, (0.5 * s, 10.0 * s))  # long thin horizontal streaks
    pores = _field(rng, n, (0.6 * s, 2.5 * s)) > 2.3
    light = _jitter(rng, (0.82, 0.64, 0.43), 0.015)
    dark = _jitter(rng, (0.50, 0.31, 0.16), 0.015)
    if variant:
        light, dark = _jitter(rng, (0.70, 0.50, 0.40), 0.03), _jitter(rng, (0.36, 0.20, 0.14), 0.03)
    img = light * (1.0 - late[..., None]) + dark * late[..., None]
    img = img * (1.0 + 0.06 * fibres[..., None]) * np.where(pores, 0.8, 1.0)[..., None]
    return img


def _granite(rng: np.random.Generator, n: int, variant: bool = False) -> Array:
    """Polished granite: pinkish-grey matrix with feldspar, quartz and mica grains."""
    s = n / 128 * (2.0 if variant else 1.0)  # the variant is a coarser-grained stone
    base_a = _jitter(rng, (0.60, 0.57, 0.56), 0.02)
    base_b = _jitter(rng, (0.70, 0.60, 0.57), 0.02)
    mix = _smoothstep(-1.5, 1.5, _field(rng, n, 9.0 * s))[..., None]
    img = base_a * (1.0 - mix) + base_b * mix
    # (colour, grain sigma in px at 128², threshold on unit-variance noise ≈ covered share)
    layers = (
        ((0.80, 0.52, 0.46), 2.2, 0.70),  # feldspar, ~24 %
        ((0.90, 0.89, 0.86), 1.5, 0.95),  # quartz, ~17 %
        ((0.10, 0.10, 0.11), 1.1, 1.20),  # mica, ~12 %
    )
    if variant:
        layers = (((0.30, 0.30, 0.34), 2.2, 0.60), ((0.92, 0.92, 0.90), 1.5, 0.70),
                  ((0.08, 0.08, 0.09), 1.1, 1.30))
    for rgb, sigma, thr in layers:
        cover = _smoothstep(thr - 0.12, thr + 0.12, _field(rng, n, sigma * s))[..., None]
        colour = _jitter(rng, rgb, 0.03) * (1.0 + 0.08 * _field(rng, n, 1.5 * sigma * s))[..., None]
        img = img * (1.0 - cover) + colour * cover
    return img


_TEXTURES: dict[str, Callable[..., Array]] = {"weave": _weave, "grain": _grain,
                                              "granite": _granite}


def _texture(category: str, rng: np.random.Generator, n: int, variant: bool = False) -> Array:
    img = _TEXTURES[category](rng, n, variant)
    img = img * (1.0 + 0.03 * rng.standard_normal())  # slight exposure jitter per image
    return np.clip(img, 0.0, 1.0)


# --------------------------------------------------------------------------- defects
# Each defect function returns (effect, alpha): effect is an (n, n, 3) image of what the
# defect looks like everywhere, alpha in [0, 1] how much of it replaces the clean image.
# render_sample() zeroes alpha beyond edge_px() of the mask, so those pixels stay unchanged.


def _centre(rng: np.random.Generator, n: int) -> Array:
    return rng.uniform(0.2 * n, 0.8 * n, size=2)  # (x, y)


def _grid(n: int) -> tuple[Array, Array]:
    yy, xx = np.mgrid[0:n, 0:n].astype(float)
    return xx, yy


def _blob(rng: np.random.Generator, n: int, radius: float, wobble: float,
          wobble_sigma: float) -> tuple[Array, Array, Array]:
    """Signed distance (px, < 0 inside) to a random ellipse with a wavy outline, plus the
    unit direction (dx, dy) from its centre."""
    xx, yy = _grid(n)
    cx, cy = _centre(rng, n)
    theta = rng.uniform(0, np.pi)
    aspect = rng.uniform(0.6, 1.0)
    dx, dy = xx - cx, yy - cy
    a = dx * np.cos(theta) + dy * np.sin(theta)
    b = -dx * np.sin(theta) + dy * np.cos(theta)
    rho = np.sqrt((a / radius) ** 2 + (b / (radius * aspect)) ** 2)
    rho = rho + wobble * _field(rng, n, wobble_sigma)
    dist = (rho - 1.0) * radius * np.sqrt(aspect)
    norm = np.hypot(dx, dy) + 1e-6
    return dist, dx / norm, dy / norm


def _scratch(rng: np.random.Generator, img: Array, category: str) -> tuple[Array, Array]:
    """A thin curved line (quadratic Bézier), tapered at both ends, lighter or darker."""
    n = img.shape[0]
    s = n / 128
    p0 = _centre(rng, n)
    angle = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.3, 0.6) * n
    p2 = p0 + length * np.array([np.cos(angle), np.sin(angle)])
    bend = rng.uniform(-0.3, 0.3) * length
    p1 = (p0 + p2) / 2 + bend * np.array([-np.sin(angle), np.cos(angle)])
    t = np.linspace(0.0, 1.0, 33)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # (33, 2)
    a, ab = pts[:-1], pts[1:] - pts[:-1]  # segments (32, 2)
    xx, yy = _grid(n)
    p = np.stack([xx.ravel(), yy.ravel()], axis=1)  # (n*n, 2)
    ap = p[:, None, :] - a[None]  # (n*n, 32, 2)
    tt = np.clip((ap * ab).sum(-1) / (ab * ab).sum(-1), 0.0, 1.0)
    d = np.linalg.norm(ap - tt[..., None] * ab, axis=-1)
    k = d.argmin(axis=1)
    dist = d[np.arange(len(k)), k].reshape(n, n)
    pos = ((k + tt[np.arange(len(k)), k]) / len(a)).reshape(n, n)  # 0..1 along the line
    width = rng.uniform(2.5, 4.0) * s * (0.35 + 0.65 * np.clip(4.0 * np.minimum(pos, 1 - pos),
                                                                 0, 1))
    alpha = np.clip(width / 2 + 0.5 - dist, 0.0, 1.0)  # 1 px antialiased edge
    if rng.uniform() < 0.6:  # scraped: lighter, less saturated
        grey = img.mean(axis=-1, keepdims=True)
        effect = img + (0.3 * grey + 0.7 * 0.95 - img) * rng.uniform(0.65, 0.85)
    else:  # gouged: darker
        effect = img * rng.uniform(0.15, 0.3)
    return np.clip(effect, 0, 1), alpha


def _stain(rng: np.random.Generator, img: Array, category: str) -> tuple[Array, Array]:
    """A soft-edged discoloured blob with a darker drying ring, texture showing through."""
    n = img.shape[0]
    s = n / 128
    radius = rng.uniform(0.11, 0.19) * n
    dist, _, _ = _blob(rng, n, radius, 0.15, 5.0 * s)
    edge = 3.0 * s  # soft edge width (px): alpha goes 1 -> 0 over it
    alpha = np.clip(0.5 - dist / edge, 0.0, 1.0)
    alpha = alpha * alpha * (3 - 2 * alpha)
    ring = np.exp(-((dist + 2.0 * s) / (2.5 * s)) ** 2)  # darker rim just inside the edge
    mottle = 1.0 + 0.12 * _field(rng, n, 3.0 * s)
    kind = rng.integers(3)
    if kind == 0:  # coffee / rust: brown tint
        tint = _jitter(rng, (0.62, 0.42, 0.24), 0.05)
        strength = (rng.uniform(0.55, 0.75) + 0.2 * ring) * mottle
        effect = img * (1 - strength[..., None] * (1 - tint))
    elif kind == 1:  # oil: darker, slightly greenish
        tint = _jitter(rng, (0.40, 0.42, 0.34), 0.05)
        strength = (rng.uniform(0.6, 0.8) + 0.2 * ring) * mottle
        effect = img * (1 - strength[..., None] * (1 - tint))
    else:  # bleach: faded towards a pale grey
        strength = (rng.uniform(0.5, 0.7) - 0.15 * ring) * mottle
        pale = 0.35 * img.mean(axis=-1, keepdims=True) + 0.65 * 0.92
        effect = img + strength[..., None] * (pale - img)
    return np.clip(effect, 0, 1), alpha


def _hole(rng: np.random.Generator, img: Array, category: str) -> tuple[Array, Array]:
    """A dark hole with a frayed outline: inside, a dark bottom and the lit far wall; outside,
    a raised lip that catches the light on one side and is shadowed on the other."""
    n = img.shape[0]
    s = n / 128
    radius = rng.uniform(0.08, 0.13) * n
    dist, ux, uy = _blob(rng, n, radius, 0.07, 2.0 * s)
    a = rng.uniform(0, 2 * np.pi)
    facing = ux * np.cos(a) + uy * np.sin(a)  # +1 on the side of the outline facing the light
    inside = np.clip(0.5 - dist, 0.0, 1.0)  # 1 px antialiased outline
    wall = np.clip(1.0 + dist / (0.3 * radius), 0.0, 1.0) * np.clip(-facing, 0.0, 1.0)
    bottom = 0.04 * (1.0 + 0.3 * _field(rng, n, 2.0 * s))
    interior = bottom[..., None] + img * (0.1 + 0.5 * wall[..., None])
    rim_w = 3.0 * s
    rim = np.clip(1.0 - dist / rim_w, 0.0, 1.0) * (dist > 0)  # 1 at the outline, 0 at rim_w
    lip = img * (0.8 + 0.45 * facing[..., None]) + 0.12 * np.clip(facing, 0, 1)[..., None]
    effect = interior * inside[..., None] + lip * (1 - inside[..., None])
    alpha = np.maximum(inside, rim)
    return np.clip(effect, 0, 1), alpha


def _paste(rng: np.random.Generator, img: Array, category: str) -> tuple[Array, Array]:
    """A rectangular or oval patch of foreign material: the same texture turned by 90° (or a
    coarser/other-dyed variant), occasionally another family altogether."""
    n = img.shape[0]
    xx, yy = _grid(n)
    cx, cy = _centre(rng, n)
    w, h = rng.uniform(0.17, 0.32, size=2) * n
    theta = rng.uniform(0, np.pi)
    a = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    b = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    if rng.uniform() < 0.5:
        dist = np.maximum(np.abs(a) - w / 2, np.abs(b) - h / 2)
    else:
        dist = (np.sqrt((2 * a / w) ** 2 + (2 * b / h) ** 2) - 1.0) * min(w, h) / 2
    alpha = np.clip(0.5 - dist, 0.0, 1.0)
    choice = rng.uniform()
    if choice < 0.25:
        other = CATEGORIES[(CATEGORIES.index(category) + rng.integers(1, len(CATEGORIES)))
                           % len(CATEGORIES)]
        patch = _texture(other, rng, n)
        # Pull its colour halfway to the host's, so the patch is a texture change, not a lamp.
        patch = patch + 0.5 * (img.mean(axis=(0, 1)) - patch.mean(axis=(0, 1)))
    elif category == "granite" or choice < 0.5:
        patch = _texture(category, rng, n, variant=True)
    else:
        # Turned by 90° and, like a patch cut from another bolt, a little lighter or darker.
        shade = 1.0 + rng.choice([-1.0, 1.0]) * rng.uniform(0.1, 0.2)
        patch = np.rot90(_texture(category, rng, n), k=1) * shade
    return np.clip(patch, 0, 1), alpha


_DEFECT_FNS: dict[str, Callable[[np.random.Generator, Array, str], tuple[Array, Array]]] = {
    "scratch": _scratch, "stain": _stain, "hole": _hole, "paste": _paste}


# --------------------------------------------------------------------------- samples


def _to_u8(img: Array) -> Array:
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def edge_px(image_size: int) -> int:
    """Width (px) of the soft fringe a defect may have outside its mask."""
    return max(2, round(3 * image_size / 128))


def render_sample(category: str, *, seed: int = 0, split: str = "train", defect: str = "good",
                  index: int = 0, image_size: int = 128) -> tuple[Array, Array, Array]:
    """Render one image of the synthetic set in memory, exactly as :func:`generate` writes it.

    Args:
        category: one of :data:`CATEGORIES`.
        split: ``"train"``, ``"val"`` or ``"test"``; only ``"test"`` takes a defect.
        defect: ``"good"`` or one of :data:`DEFECTS`.

    Returns:
        ``(clean, image, mask)``: uint8 arrays of shape (H, W, 3), (H, W, 3) and (H, W) with
        H = W = ``image_size``. ``clean`` is the defect-free texture the defect was drawn on
        (equal to ``image`` for good samples); ``mask`` is 255 where ``alpha >= 0.5`` and 0
        elsewhere (all 0 for good samples).
    """
    _check(seed, [category], SyntheticParams(image_size=image_size))
    if defect != "good" and (split != "test" or defect not in DEFECTS):
        raise UsageError(f"synthetic defect {defect!r} in split {split!r}: defects are "
                         f"{', '.join(DEFECTS)}, in split 'test' only")
    n = image_size
    rng = _rng(seed, category, split, defect, index)
    clean = _texture(category, rng, n)
    if defect == "good":
        u8 = _to_u8(clean)
        return u8, u8.copy(), np.zeros((n, n), np.uint8)
    img = clean
    coverage = np.zeros((n, n))  # combined alpha of all regions
    n_regions = 2 if rng.uniform() < 0.3 else 1
    for _ in range(n_regions):
        # A region whose thresholded alpha is too small to annotate is redrawn (same stream).
        for _attempt in range(20):
            effect, alpha = _DEFECT_FNS[defect](rng, img, category)
            if (alpha >= 0.5).sum() >= 0.002 * n * n:
                break
        # The soft fringe (0 < alpha < 0.5) is cut off edge_px() px (chessboard distance)
        # outside the mask: pixels further away are never touched, whatever the shape.
        near = ndimage.binary_dilation(alpha >= 0.5, np.ones((3, 3), bool), edge_px(n))
        alpha = np.where(near, alpha, 0.0)
        img = img + alpha[..., None] * (effect - img)
        coverage = 1.0 - (1.0 - coverage) * (1.0 - alpha)
    mask = np.where(coverage >= 0.5, 255, 0).astype(np.uint8)
    return _to_u8(clean), _to_u8(img), mask


# --------------------------------------------------------------------------- files


def _write_png(path: Path, array: Array) -> None:
    # Encoded in memory, then written atomically (temporary file + os.replace) by fsutil.
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _plan(params: SyntheticParams) -> list[tuple[str, str, int]]:
    """(split, defect, index) of every image of a category, in writing order."""
    plan = [("train", "good", i) for i in range(params.n_train)]
    plan += [("val", "good", i) for i in range(params.n_val)]
    plan += [("test", "good", i) for i in range(params.n_test_good)]
    plan += [("test", d, i) for d in DEFECTS for i in range(params.n_test_per_defect)]
    return plan


def _paths(cat_dir: Path, split: str, defect: str, index: int) -> tuple[Path, Path | None]:
    image = cat_dir / split / defect / f"{index:03d}.png"
    mask = cat_dir / "ground_truth" / defect / f"{index:03d}_mask.png" if defect != "good" else None
    return image, mask


def _marker(category: str, seed: int, params: SyntheticParams) -> dict[str, object]:
    return {"generator": "stad.datasets.synthetic", "version": GENERATOR_VERSION,
            "category": category, "seed": seed, "params": asdict(params),
            "defects": list(DEFECTS)}


_OUR_NAME = re.compile(r"\d{3,}(_mask)?\.png")


def _generate_category(cat_dir: Path, category: str, seed: int, params: SyntheticParams) -> None:
    marker = cat_dir / MARKER
    marker.unlink(missing_ok=True)  # the category is incomplete until the marker is back
    written: set[Path] = set()
    for split, defect, index in _plan(params):
        image_path, mask_path = _paths(cat_dir, split, defect, index)
        _, image, mask = render_sample(category, seed=seed, split=split, defect=defect,
                                       index=index, image_size=params.image_size)
        image_path.parent.mkdir(parents=True, exist_ok=True)
        _write_png(image_path, image)
        written.add(image_path)
        if mask_path is not None:
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            _write_png(mask_path, mask)
            written.add(mask_path)
    # Numbered files of an earlier, larger generation would be listed as samples: remove them.
    for sub in ("train", "val", "test", "ground_truth"):
        for path in (cat_dir / sub).glob("*/*"):
            if path.is_file() and path not in written and _OUR_NAME.fullmatch(path.name):
                path.unlink()
    text = json.dumps(_marker(category, seed, params), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(marker, text.encode())


def _check(seed: int, categories: Sequence[str], params: SyntheticParams) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"synthetic seed must be a non-negative integer, got {seed!r}")
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise UsageError(f"unknown synthetic categor{'y' if len(unknown) == 1 else 'ies'} "
                         f"{', '.join(map(repr, unknown))}; choose from {', '.join(CATEGORIES)}")
    params.check()


def generate(root: str | os.PathLike[str], *, seed: int = 0,
             categories: Sequence[str] = CATEGORIES, image_size: int = 128, n_train: int = 40,
             n_val: int = 10, n_test_good: int = 10, n_test_per_defect: int = 6) -> None:
    """Write the synthetic dataset under ``root`` (MVTec AD layout plus ``val/good``).

    Always (re)writes the named categories; see :func:`ensure_generated` to skip finished ones.
    Identical ``seed`` and parameters give byte-identical files. Each category's marker
    ``.stad-synthetic.json`` is removed first and written last, so a category without one is
    incomplete. Stale numbered PNGs from an earlier, larger generation are deleted.

    Raises:
        UsageError: unknown category, ``image_size`` < 32, a negative count or ``n_train`` 0.
        DataError: ``root`` cannot be written.
    """
    params = SyntheticParams(image_size, n_train, n_val, n_test_good, n_test_per_defect)
    if isinstance(categories, str):  # one name, not a sequence of one-letter names
        categories = [categories]
    _check(seed, categories, params)
    root = Path(root)
    for category in dict.fromkeys(categories):
        try:
            _generate_category(root / category, category, seed, params)
        except OSError as exc:
            raise DataError(f"cannot write the synthetic dataset under {root / category}: "
                            f"{exc.strerror or exc}") from exc


def ensure_generated(root: str | os.PathLike[str], category: str, *, seed: int = 0,
                     image_size: int = 128, n_train: int = 40, n_val: int = 10,
                     n_test_good: int = 10, n_test_per_defect: int = 6) -> Path:
    """Generate one category under ``root`` unless it is already there, and return its folder.

    A category counts as there when its marker records this generator version, seed and
    parameters and every image and mask those parameters call for exists; otherwise it is
    (re)generated with :func:`generate`. Nothing is written when it is there.

    Raises:
        UsageError, DataError: as :func:`generate`.
    """
    params = SyntheticParams(image_size, n_train, n_val, n_test_good, n_test_per_defect)
    _check(seed, [category], params)
    cat_dir = Path(root) / category
    if not _is_current(cat_dir, category, seed, params):
        generate(root, seed=seed, categories=[category], **asdict(params))
    return cat_dir


def _is_current(cat_dir: Path, category: str, seed: int, params: SyntheticParams) -> bool:
    try:
        recorded = json.loads((cat_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if recorded != _marker(category, seed, params):
        return False
    for split, defect, index in _plan(params):
        image, mask = _paths(cat_dir, split, defect, index)
        if not image.is_file() or (mask is not None and not mask.is_file()):
            return False
    return True


class SyntheticAdapter:
    """Built-in adapter for the synthetic set: generated on first use, then read from disk.

    With no ``--root`` the data lives in stad's cache (``$STAD_CACHE/synthetic``, by default
    ``~/.cache/stad/synthetic``); with one, it is generated there. Generation uses seed 0 and
    the default sizes of :func:`generate`; call :func:`generate` for other settings.
    """

    api_version: ClassVar[int] = API_VERSION
    description: ClassVar[str] = "generated textures with defects (no download); the demo's data"

    def default_root(self) -> Path:
        return cache_dir() / "synthetic"

    def categories(self, root: Path) -> list[str]:
        return list(CATEGORIES)

    def samples(self, root: Path, category: str, split: Split) -> Iterator[Sample]:
        if category not in CATEGORIES:
            raise DataError(f"unknown synthetic category '{category}'; "
                            f"choose from {', '.join(CATEGORIES)}")
        if not (Path(root) / category / MARKER).is_file():
            # Generated on first use; data generated earlier (any parameters) is used as is.
            ensure_generated(root, category)
        return mvtec_samples(Path(root), category, split)
