"""The teacher's metric-learning and regularization losses (docs/method.md §3; Bergmann et al., CVPR
2020, eq. 2-3), and the variance term we add against collapse."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _sq_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # (B, d), (C, d) → (B, C) squared distances; differentiable at 0, unlike cdist.
    return (x.pow(2).sum(1)[:, None] + y.pow(2).sum(1)[None, :] - 2 * x @ y.T).clamp_min(0)


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, *,
                 margin: float, normalize: bool = False, hardest: bool = False,
                 exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Lm of Bergmann et al. (eq. 2): mean of max(0, δ + δ⁺ − δ⁻) over the batch.

    δ⁺ = ‖a − p⁺‖², δ⁻ = min(‖a − p⁻‖², ‖p⁺ − p⁻‖²) (the harder of the two negatives). With
    ``normalize`` the descriptors (B, d) are first L2-normalized and scaled by sqrt(d), so the
    distances lie in [0, 4d] whatever the descriptors' scale. With ``hardest`` (ours) δ⁻ is the
    smallest such distance to any of the B negatives, except where ``exclude`` (B, B) is true
    (negative j cut from the anchor i's own image); a row with no negative left adds 0.
    """
    if normalize:
        scale = math.sqrt(anchor.shape[1])
        anchor, positive, negative = (F.normalize(x, dim=1) * scale
                                      for x in (anchor, positive, negative))
    d_pos = (anchor - positive).pow(2).sum(1)
    if hardest:
        d_all = torch.minimum(_sq_dist(anchor, negative), _sq_dist(positive, negative))  # (B, B)
        if exclude is not None:
            d_all = d_all.masked_fill(exclude, math.inf)
        d_neg = d_all.min(1).values
    else:
        d_neg = torch.minimum((anchor - negative).pow(2).sum(1),
                              (positive - negative).pow(2).sum(1))
    return F.relu(margin + d_pos - d_neg).mean()


def variance_loss(descriptors: torch.Tensor, *, target: float = 1.0,
                  eps: float = 1e-4) -> torch.Tensor:
    """Lv (ours; the variance term of VICReg, Bardes et al., ICLR 2022): the mean over the d
    channels of max(0, target − sqrt(var + eps)), var over the batch (B, d). Zero when every
    channel varies by at least ``target``; largest (≈ target) for a constant output."""
    std = torch.sqrt(descriptors.var(0, unbiased=False) + eps)
    return F.relu(target - std).mean()


def compactness_loss(descriptors: torch.Tensor, *, eps: float = 1e-5,
                     squared: bool = False) -> torch.Tensor:
    """Lc of Bergmann et al. (eq. 3): Σ_{i≠j} c_ij, c the d×d correlation matrix of (B, d).

    Each dimension is standardized over the batch, z = (y − mean) / sqrt(var + eps), and
    c = zᵀz / B. The sum is signed and not averaged, as in the paper: it lies in [−d, d(d − 1)]
    (the lower bound because Σ_ij c_ij = ‖Σ_i z_·i‖² / B ≥ 0). It is at that bound as soon as
    the channels sum to a constant, whatever else they do, so it does not stop channels from
    being copies of a few directions.

    ``squared`` (ours, the redundancy term of Barlow Twins, Zbontar et al., ICML 2021):
    Σ_{i≠j} c_ij² / (d − 1), in [0, d]; 0 only for uncorrelated channels, d for channels
    that are all ± the same.
    """
    b = descriptors.shape[0]
    mean = descriptors.mean(0)
    var = descriptors.var(0, unbiased=False)
    z = (descriptors - mean) / torch.sqrt(var + eps)  # (B, d)
    c = z.T @ z / b  # (d, d)
    if squared:
        return (c.pow(2).sum() - c.diagonal().pow(2).sum()) / max(c.shape[0] - 1, 1)
    return c.sum() - c.diagonal().sum()
