"""Teacher diagnostics: statistics of a teacher's descriptors that reveal collapse.

A teacher whose descriptors are constant, or vary along only a few directions, gives the
students nothing to regress: every patch looks alike and anomalies cannot stand out. Measured
on N random p×p patches of a set of standardized images (B = the descriptors, (N, d)):

- ``effective_rank``: exp of the Shannon entropy of the normalized eigenvalue spectrum of the
  d×d covariance of B (Roy & Vetterli, EUSIPCO 2007), between 1 (one direction) and d (all
  directions equally used); 0 when B is constant.
- ``effective_rank_corr``: the same of the correlation matrix of B's non-constant channels.
  Students regress the teacher's descriptors standardized per channel (docs/method.md §4), so this
  is the rank they see: a teacher with one loud channel and 127 quiet, informative ones has a
  low ``effective_rank`` but a high ``effective_rank_corr``. The collapse warning uses it.
- ``mean_abs_corr``: mean |c_ij| over i ≠ j of the correlation matrix of B's non-constant
  channels (1 when fewer than two channels vary).
- ``constant_fraction``: share of channels whose std over the N patches is below 1e-3 × the
  largest channel std (or below 1e-8): channels that carry nothing.
- ``retrieval_top1``: for each of the N patches, an augmented copy (the patch moved by up to
  ``shift`` pixels plus Gaussian noise of std ``noise``, the triplet positive of
  :mod:`stad.training.teacher`) must have the patch itself as nearest neighbour (Euclidean)
  among the N originals; ``retrieval_chance`` = 1/N. Ties count as misses.

:func:`collapse_warnings` turns them into warning lines (thresholds in :data:`THRESHOLDS`).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

from stad.networks import PatchNetwork

__all__ = ["THRESHOLDS", "collapse_warnings", "descriptor_statistics", "teacher_diagnostics"]

THRESHOLDS = {
    "effective_rank_fraction": 0.05,  # flag effective_rank_corr < 0.05 · d
    "mean_abs_corr": 0.9,  # flag mean |corr| > 0.9
    "constant_fraction": 0.5,  # flag more than half the channels constant
    "retrieval_over_chance": 5.0,  # flag top-1 retrieval < 5 × chance
}


def _generator(seed: int, patch_size: int) -> torch.Generator:
    digest = hashlib.sha256(f"stad.diagnostics:{seed}:{patch_size}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def descriptor_statistics(desc: torch.Tensor) -> dict[str, float]:
    """Effective rank, mean |off-diagonal correlation| and constant fraction of (N, d)."""
    x = desc.double()
    n, d = x.shape
    std = x.std(0, unbiased=False)
    constant = std <= max(1e-8, 1e-3 * std.max().item())
    centred = x - x.mean(0)
    rank = _effective_rank(centred.T @ centred / max(n - 1, 1))
    live = ~constant
    z = centred[:, live] / std[live]  # (n, live channels)
    c = z.T @ z / n
    k = c.shape[0]
    corr = 1.0 if k < 2 else ((c.abs().sum() - c.diagonal().abs().sum()) / (k * (k - 1))).item()
    return {"effective_rank": rank, "effective_rank_corr": _effective_rank(c) if k else 0.0,
            "dim": d, "mean_abs_corr": corr, "constant_fraction": constant.double().mean().item()}


def _effective_rank(matrix: torch.Tensor) -> float:
    """exp(entropy of the normalized eigenvalues) of a symmetric PSD matrix; 0 for zero."""
    eig = torch.linalg.eigvalsh(matrix).clamp_min(0)
    total = eig.sum().item()
    if total <= 1e-20:
        return 0.0
    q = eig / total
    q = q[q > 0]
    return math.exp(-(q * q.log()).sum().item())


@torch.no_grad()
def teacher_diagnostics(net: PatchNetwork, images: torch.Tensor, *, n_patches: int = 256,
                        shift: int = 2, noise: float = 0.1, seed: int = 0,
                        batch: int = 256) -> dict[str, Any]:
    """Diagnostics of one teacher on standardized images (M, 3, S, S), S ≥ p + 2·shift.

    Draws ``n_patches`` patch locations (at least ``shift`` pixels from the border, so every
    augmented copy fits without clamping) from a generator seeded from (seed, p): the same
    call gives the same figures. Runs on the device of ``net``.

    Returns:
        {"patch_size", "n_patches", "effective_rank", "effective_rank_corr", "dim",
        "effective_rank_fraction" (of the correlation matrix, out of d),
        "mean_abs_corr", "constant_fraction", "retrieval_top1", "retrieval_chance"}
    """
    p = net.patch_size
    m, size = images.shape[0], images.shape[-1]
    if size < p + 2 * shift:
        raise ValueError(f"images of {size}×{size} are too small for p={p} with shift {shift}")
    device = next(net.parameters()).device
    gen = _generator(seed, p)
    span = size - p - 2 * shift + 1
    idx = torch.randint(m, (n_patches,), generator=gen)
    rows = torch.randint(span, (n_patches,), generator=gen) + shift
    cols = torch.randint(span, (n_patches,), generator=gen) + shift
    dr = torch.randint(-shift, shift + 1, (n_patches,), generator=gen)
    dc = torch.randint(-shift, shift + 1, (n_patches,), generator=gen)
    jitter = torch.randn(n_patches, 3, p, p, generator=gen) * noise

    ar = torch.arange(p)
    src = images.cpu()

    def crop(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        rr = (r[:, None] + ar)[:, :, None]  # (N, p, 1)
        cc = (c[:, None] + ar)[:, None, :]  # (N, 1, p)
        return src[idx[:, None, None], :, rr, cc].permute(0, 3, 1, 2)  # (N, 3, p, p)

    def describe(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(x[i: i + batch].to(device)).float().cpu()
                          for i in range(0, len(x), batch)])

    was_training = net.training
    net.eval()
    try:
        original = describe(crop(rows, cols))  # (N, d)
        augmented = describe(crop(rows + dr, cols + dc) + jitter)
    finally:
        net.train(was_training)
    stats = descriptor_statistics(original)
    dist = torch.cdist(augmented.double(), original.double())  # (N, N)
    best = dist.min(1, keepdim=True).values
    # A hit needs the original to be the unique nearest neighbour: ties (a constant teacher)
    # count as misses, so a collapsed teacher scores 0, not a lucky 1/N.
    unique = (dist <= best).sum(1) == 1
    hit = (dist.diagonal() <= best[:, 0]) & unique
    return {"patch_size": p, "n_patches": n_patches, **stats,
            "effective_rank_fraction": stats["effective_rank_corr"] / stats["dim"],
            "retrieval_top1": hit.double().mean().item(), "retrieval_chance": 1 / n_patches}


def collapse_warnings(diag: dict[str, Any]) -> list[str]:
    """One line per sign of collapse in :func:`teacher_diagnostics` output (empty: none)."""
    p, d = diag["patch_size"], diag["dim"]
    where = f"teacher p={p}"
    advice = ("students regress little but noise from such a teacher: pretrain it longer or "
              "with another --target (handcrafted, or resnet18 with --backbone-weights), or "
              "compare with --teacher random")
    out = []
    if diag["effective_rank_fraction"] < THRESHOLDS["effective_rank_fraction"]:
        out.append(f"{where}: descriptors span few directions (effective rank "
                   f"{diag['effective_rank_corr']:.1f} of {d} after standardizing each "
                   f"channel); {advice}")
    if diag["constant_fraction"] > THRESHOLDS["constant_fraction"]:
        out.append(f"{where}: {diag['constant_fraction']:.0%} of the {d} descriptor channels "
                   f"are constant; {advice}")
    if diag["mean_abs_corr"] > THRESHOLDS["mean_abs_corr"]:
        out.append(f"{where}: descriptor channels are nearly all correlated (mean |corr| "
                   f"{diag['mean_abs_corr']:.2f}); {advice}")
    chance = diag["retrieval_chance"]
    if diag["retrieval_top1"] < THRESHOLDS["retrieval_over_chance"] * chance:
        out.append(f"{where}: a slightly moved, noisy patch finds itself among "
                   f"{diag['n_patches']} random patches only {diag['retrieval_top1']:.1%} of "
                   f"the time (chance {chance:.1%}); {advice}")
    return out
