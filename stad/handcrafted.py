"""A fixed bank of handcrafted patch descriptors: a distillation target that needs no download.

Teacher pretraining (docs/method.md §3) distils an ImageNet ResNet-18. Without its weights, the
teacher can instead regress this bank, computed on the fly for every training patch: what a
descriptor of local appearance should capture (colour, edges and their orientations, blobs,
oriented texture, local binary contrast), at several scales and over a spatial grid, so that
the teacher must tell patches apart by what is where in them. Nothing is learnt; the bank is a
pure function of the patch, plus a per-dimension standardization estimated once on a sample of
the training patches (:meth:`HandcraftedBank.fit`).

The patch (B, 3, p, p), standardized RGB, is first cut to the pixels the patch network reads
(its receptive field: 17, 32, 60 for p = 17, 33, 65) and resized to a canonical 32×32, so the
dimension (:data:`DIM`) and the filter scales, relative to the patch, are the same for every p.
Blocks, on the canonical grid (cells: the patch split into g×g equal cells, g ∈ ``grids``):

=============  =====================================================================  ====
block          what                                                                   dims
=============  =====================================================================  ====
colour         mean and std of each channel per cell, g ∈ {1, 2, 4}                    126
orientation    gradient-magnitude histograms, 8 orientations soft-binned (HOG/SIFT-     248
               like), of the grey image smoothed at σ = 1 (g ∈ {1, 2, 4}), σ = 2 and
               σ = 4 (g ∈ {1, 2})
blob           σ²-normalized Laplacian of Gaussian at σ ∈ {1, 2, 4}: mean and mean      30
               absolute response per cell, g ∈ {1, 2}
gabor          Gabor energy √(even² + odd²) at wavelengths 4 and 8 pixels, 4           40
               orientations, mean per cell, g ∈ {1, 2}
lbp            soft local binary pattern: for each of 8 neighbours at radius 2, the     40
               share of pixels brighter than the centre (sigmoid, τ = 0.1), g ∈ {1, 2}
=============  =====================================================================  ====

After standardization each block is scaled so that its total variance is the same, D / 5:
the 248 orientation dimensions weigh no more than the 30 blob dimensions.

Optionally (``components`` = k > 0) the target is **whitened**: the standardized features are
projected on their k leading principal directions (estimated in :meth:`HandcraftedBank.fit`),
each scaled to unit variance. Unwhitened, a regressor that only gets the few strongest
directions right already explains most of the target (on the pretraining photos the first
principal component holds a quarter of the variance, the first 16 hold 80 %); whitened, each of
the k directions weighs the same, so a teacher distilled from it must span all k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stad.networks import build_network

__all__ = ["BLOCKS", "CANONICAL", "DIM", "HandcraftedBank"]

CANONICAL = 32  # patches are resized to CANONICAL×CANONICAL before any filter
N_ORIENT = 8
GRADIENT_SCALES: tuple[tuple[float, tuple[int, ...]], ...] = ((1.0, (1, 2, 4)), (2.0, (1, 2)),
                                                              (4.0, (1, 2)))
LOG_SCALES = (1.0, 2.0, 4.0)
GABOR_WAVELENGTHS = (4.0, 8.0)
GABOR_ORIENT = 4
LBP_RADIUS, LBP_TAU = 2, 0.1


def _cells(grids: tuple[int, ...]) -> int:
    return sum(g * g for g in grids)


BLOCKS: dict[str, int] = {
    "colour": 2 * 3 * _cells((1, 2, 4)),
    "orientation": N_ORIENT * sum(_cells(g) for _, g in GRADIENT_SCALES),
    "blob": 2 * len(LOG_SCALES) * _cells((1, 2)),
    "gabor": len(GABOR_WAVELENGTHS) * GABOR_ORIENT * _cells((1, 2)),
    "lbp": 8 * _cells((1, 2)),
}
DIM = sum(BLOCKS.values())  # 484


def _pool(x: torch.Tensor, grids: tuple[int, ...]) -> torch.Tensor:
    """Mean of (B, C, H, W) over each cell of each g×g grid: (B, C · Σ g²)."""
    return torch.cat([F.adaptive_avg_pool2d(x, g).flatten(1) for g in grids], dim=1)


def gaussian_kernel(sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalized 1-D Gaussian of ``sigma`` over ±ceil(3σ) (at least ±1), computed in
    float64 and returned as ``dtype``."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-t.pow(2) / (2 * sigma**2))
    return (k / k.sum()).to(dtype)


def smooth(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) convolved with a 1-D ``kernel`` along rows, then columns; replicate
    padding keeps the size."""
    r = kernel.numel() // 2
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), kernel.view(1, 1, -1, 1))


def gaussian_blur(t: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing (:func:`gaussian_kernel`) of the last two dimensions, edges
    replicated; the identity for ``sigma <= 0``.

    Written as a weighted sum of shifted copies, not a convolution, so that each map's result
    is the same bit for bit whatever else is in the batch (a threshold set on maps smoothed one
    at a time must hold for maps smoothed in batches)."""
    if sigma <= 0:
        return t
    weights = gaussian_kernel(sigma, torch.float64).tolist()
    r = len(weights) // 2
    for dim in (-1, -2):
        n = t.shape[dim]
        base = torch.arange(n, device=t.device)
        out = None
        for i, w in enumerate(weights):
            term = t.index_select(dim, (base + (i - r)).clamp(0, n - 1)) * w
            out = term if out is None else out + term
        assert out is not None
        t = out
    return t


def _log_kernel(sigma: float) -> torch.Tensor:
    # σ²·∇²G, zero-sum so that a constant patch responds with 0 (scale-normalized LoG).
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    r2 = xx.pow(2) + yy.pow(2)
    k = (r2 / (2 * sigma**2) - 1) / (math.pi * sigma**2) * torch.exp(-r2 / (2 * sigma**2))
    return (k - k.mean()).float()


def _gabor_kernels() -> torch.Tensor:
    """Even and odd Gabor kernels, (2 · len(wavelengths) · orientations, 1, K, K), zero-mean."""
    size = 2 * math.ceil(GABOR_WAVELENGTHS[-1]) + 1  # σ = λ/2: ±2σ at the largest wavelength
    t = torch.arange(size, dtype=torch.float64) - size // 2
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    out = []
    for lam in GABOR_WAVELENGTHS:
        sigma = lam / 2
        for k in range(GABOR_ORIENT):
            theta = math.pi * k / GABOR_ORIENT
            u = xx * math.cos(theta) + yy * math.sin(theta)
            env = torch.exp(-(xx.pow(2) + yy.pow(2)) / (2 * sigma**2))
            for phase in (torch.cos, torch.sin):
                g = env * phase(2 * math.pi * u / lam)
                g = g - env * (g.sum() / env.sum())  # remove the DC response of the even part
                out.append(g / g.abs().sum())
    return torch.stack(out).float()[:, None]


class HandcraftedBank(nn.Module):
    """(B, 3, p, p) standardized patches → (B, :data:`DIM`) descriptors; no parameters.

    Deterministic, and differentiable only by accident: it is used under ``no_grad`` as a fixed
    distillation target. ``mean``/``std``/``weight`` (buffers) standardize the raw features;
    until :meth:`fit` is called they are 0, 1 and 1. With ``components`` = k > 0 the output is
    (B, k): the standardized features times ``projection`` (DIM, k), the whitening that
    :meth:`fit` estimates (until then the first k features).
    """

    def __init__(self, patch_size: int, components: int = 0) -> None:
        super().__init__()
        if not 0 <= components <= DIM:
            raise ValueError(f"components must be in [0, {DIM}], got {components}")
        self.patch_size = patch_size
        self.components = components
        # The patch network reads only its receptive field (floor pooling, docs/method.md §1): a
        # target that depends on pixels it never sees would be unpredictable noise.
        self.crop = build_network(patch_size).receptive_field
        self.dim = components or DIM
        for i, (sigma, _) in enumerate(GRADIENT_SCALES):
            self.register_buffer(f"gauss{i}", gaussian_kernel(sigma), persistent=False)
        for i, sigma in enumerate(LOG_SCALES):
            self.register_buffer(f"log{i}", _log_kernel(sigma)[None, None], persistent=False)
        self.register_buffer("gabor", _gabor_kernels(), persistent=False)
        self.register_buffer("mean", torch.zeros(DIM))
        self.register_buffer("std", torch.ones(DIM))
        self.register_buffer("weight", torch.ones(DIM))
        if components:
            self.register_buffer("projection", torch.eye(DIM)[:, :components].contiguous())

    # --- the raw features ---------------------------------------------------------------------

    def _canonical(self, patches: torch.Tensor) -> torch.Tensor:
        x = patches[:, :, : self.crop, : self.crop]
        if self.crop == CANONICAL:
            return x
        return F.interpolate(x, size=(CANONICAL, CANONICAL), mode="bilinear",
                             align_corners=False, antialias=self.crop > CANONICAL)

    @staticmethod
    def _filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) convolved with (C, 1, K, K), replicate padding: (B, C, H, W)."""
        r = kernel.shape[-1] // 2
        return F.conv2d(F.pad(x, (r, r, r, r), mode="replicate"), kernel)

    def raw(self, patches: torch.Tensor) -> torch.Tensor:
        """The unstandardized features, (B, DIM), blocks in the order of :data:`BLOCKS`."""
        x = self._canonical(patches.float())  # (B, 3, C, C)
        mean = _pool(x, (1, 2, 4))
        var = (_pool(x * x, (1, 2, 4)) - mean.pow(2)).clamp_min(0)
        feats = [mean, torch.sqrt(var + 1e-6)]

        grey = x.mean(1, keepdim=True)  # (B, 1, C, C)
        centres = torch.arange(N_ORIENT, device=x.device) * (2 * math.pi / N_ORIENT)
        for i, (_, grids) in enumerate(GRADIENT_SCALES):
            s = smooth(grey, getattr(self, f"gauss{i}"))
            p = F.pad(s, (1, 1, 1, 1), mode="replicate")
            gx = (p[:, :, 1:-1, 2:] - p[:, :, 1:-1, :-2]) / 2
            gy = (p[:, :, 2:, 1:-1] - p[:, :, :-2, 1:-1]) / 2
            mag = torch.sqrt(gx.pow(2) + gy.pow(2) + 1e-12)
            theta = torch.atan2(gy, gx)  # (B, 1, C, C), in (−π, π]
            # Soft binning: linear in the angle between the two nearest of 8 centres.
            delta = torch.remainder(theta - centres.view(1, -1, 1, 1) + math.pi, 2 * math.pi)
            w = (1 - (delta - math.pi).abs() / (2 * math.pi / N_ORIENT)).clamp_min(0)
            feats.append(_pool(mag * w, grids))  # (B, 8 · Σ g²)

        for i in range(len(LOG_SCALES)):
            r = self._filter(grey, getattr(self, f"log{i}"))
            feats += [_pool(r, (1, 2)), _pool(r.abs(), (1, 2))]

        g = self._filter(grey, self.gabor)  # (B, 2·W·O, C, C): even, odd interleaved
        energy = torch.sqrt(g[:, 0::2].pow(2) + g[:, 1::2].pow(2) + 1e-12)
        feats.append(_pool(energy, (1, 2)))

        centre = smooth(grey, self.gauss0)
        r = LBP_RADIUS
        p = F.pad(centre, (r, r, r, r), mode="replicate")
        size = centre.shape[-1]
        bits = []
        for k in range(8):
            dy = round(r * math.sin(2 * math.pi * k / 8))
            dx = round(r * math.cos(2 * math.pi * k / 8))
            neighbour = p[:, :, r + dy: r + dy + size, r + dx: r + dx + size]
            bits.append(torch.sigmoid((neighbour - centre) / LBP_TAU))
        feats.append(_pool(torch.cat(bits, dim=1), (1, 2)))
        return torch.cat(feats, dim=1)

    # --- standardized -------------------------------------------------------------------------

    @torch.no_grad()
    def fit(self, patches: torch.Tensor) -> HandcraftedBank:
        """Estimate the per-dimension mean and std on (N, 3, p, p) patches (N ≥ 2), and the
        block weights that give every block the same total variance; with ``components``, also
        the whitening projection (N > ``components``). Returns ``self``."""
        raw = self.raw(patches)
        self.mean.copy_(raw.mean(0))
        # A dimension that does not vary on the sample stays at its raw scale (std floor).
        self.std.copy_(raw.std(0).clamp_min(1e-4))
        weight = []
        for size in BLOCKS.values():
            weight.append(torch.full((size,), math.sqrt(DIM / (len(BLOCKS) * size))))
        self.weight.copy_(torch.cat(weight).to(self.weight))
        if self.components:
            if raw.shape[0] <= self.components:
                raise ValueError(f"whitening {self.components} components needs more than "
                                 f"{self.components} patches, got {raw.shape[0]}")
            z = self._standardize(raw).double()
            values, vectors = torch.linalg.eigh(z.T @ z / (z.shape[0] - 1))  # ascending
            values = values.flip(0)[: self.components]
            vectors = vectors.flip(1)[:, : self.components]
            # eigh's signs are arbitrary: make each direction's largest entry positive, so the
            # projection is a function of the sample, whatever the LAPACK build.
            sign = torch.sign(vectors.gather(0, vectors.abs().argmax(0, keepdim=True)))
            # The floor keeps a direction of (numerically) zero variance from being blown up.
            scale = values.clamp_min(values[0] * 1e-6).rsqrt()
            self.projection.copy_((vectors * sign * scale).to(self.projection))
        return self

    def _standardize(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.mean) / self.std * self.weight

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, 3, p, p) → (B, dim): ((raw − mean) / std) · block weight [· projection]."""
        z = self._standardize(self.raw(patches))
        return z @ self.projection if self.components else z
