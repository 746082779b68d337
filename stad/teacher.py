"""``stad pretrain-teacher``: pretrain one teacher per patch size on random patches (METHOD.md §3).

Per scale p the teacher T (a :class:`~stad.networks.PatchNetwork`) is trained on random p×p
patches of generic images with the loss of Bergmann et al. (CVPR 2020, eq. 1-3)

    L = λk·Lk + λm·Lm + λc·Lc

- Lk, knowledge distillation: ‖D(T(p)) − P(p)‖², D the linear :class:`~stad.networks.Decoder`
  (128 → dim P) and P(p) the distillation target chosen by ``teacher.target``: the 512-d
  global-average-pooled feature of a frozen ResNet-18 whose weights the user gives as a local
  file (:func:`resnet18_features`; the patch is resized bilinearly to ``kd_input_size`` for it,
  the paper does not say), or the 484-d standardized :class:`~stad.handcrafted.HandcraftedBank`
  (no download). With target ``none`` distillation is off.
- Lm, metric learning (triplet): mean over the batch of max(0, δ + δ⁺ − δ⁻) with
  δ⁺ = ‖T(p) − T(p⁺)‖² and δ⁻ = min(‖T(p) − T(p⁻)‖², ‖T(p⁺) − T(p⁻)‖²); p⁺ is p shifted by up
  to ``positive_shift`` pixels plus Gaussian noise, p⁻ a patch of another image (or, with
  ``triplet_negatives = "hardest"``, the closest of the batch's negatives from other images).
- Lc, compactness: Σ_{i≠j} c_ij over the d×d correlation matrix of the batch's descriptors.
- Lv (ours, against collapse; weight ``lambda_variance``, 0 by default): the mean over channels of
  max(0, 1 − std), the std of each descriptor channel over the batch (VICReg's variance term).

At the end of each scale :func:`stad.diagnostics.teacher_diagnostics` measures the teacher
(effective rank, correlation, constant channels, retrieval of augmented patches) and a warning
names the scale when they show collapse.

Every image is decoded once, resized to ``image_size`` and standardized with the ImageNet channel
statistics (which is also what the ResNet-18 expects); patches are then cut by indexing. One
``torch.Generator`` per scale, seeded from (seed, p), draws the initialization and every sample,
so a seed gives the same teachers on the same machine. The choices are documented in
docs/model.md, "Teacher pretraining".

With a :class:`~stad.checkpoint.Checkpoint` the state (weights, Adam, the generator's state and
the losses so far) is saved every ``checkpoint_every`` iterations, after every scale but the
last, and when a stop is requested; a resumed run continues to the same weights, bit for bit on
the same machine.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stad.artifacts import prefixed, read_state_dict, with_prefix
from stad.backbones import EfficientNetLite
from stad.checkpoint import (
    Checkpoint,
    last_good,
    load_optimizer,
    optimizer_tensors,
    tensors_sha256,
)
from stad.config import Settings, TeacherSettings
from stad.console import NULL_REPORTER, Reporter, warn
from stad.datasets.base import Sample
from stad.diagnostics import collapse_warnings, teacher_diagnostics
from stad.distillation import (
    BACKBONES,
    DenseTargets,
    PooledTargets,
    blocks_for,
    describe,
    load_backbone,
)
from stad.distributed import SINGLE, World
from stad.errors import ArtifactError, DataError, TrainingError, UsageError
from stad.handcrafted import BLOCKS, HandcraftedBank
from stad.handcrafted import DIM as HANDCRAFTED_DIM
from stad.imagebuffer import ImageBuffer, ImageSource, load_images
from stad.images import DEFAULT_MEAN, DEFAULT_STD
from stad.model import load_teachers
from stad.networks import Decoder, PatchNetwork, build_network

__all__ = [
    "compactness_loss",
    "load_images",
    "pretrain_teachers",
    "resnet18_features",
    "resolve_target",
    "triplet_loss",
    "variance_loss",
]

CURVE_POINTS = 20  # info["losses"][...]["curve"]: the mean loss of each 1/20 of the run
NO_BACKBONE_NOTE = ("distillation is off (--target none): training on metric learning and "
                    "compactness only")
BANK_SAMPLE = 1024  # patches on which the handcrafted bank's standardization is estimated
WHITEN_SAMPLE = 4096  # ... and its whitening (484 dimensions: a covariance wants more)


# --- the frozen ResNet-18 of the distillation loss ---------------------------------------------


def resnet18_features(weights: Path) -> tuple[nn.Module, str]:
    """A frozen torchvision ResNet-18 that maps (N, 3, H, W) standardized images to (N, 512).

    The output is the global-average-pooled feature before ``fc`` (``fc`` is replaced by an
    identity, so checkpoints with any classification head fit). The module is in eval mode
    (batch-norm uses its running statistics) with ``requires_grad`` False.

    Args:
        weights: a ResNet-18 state dict, either ``.safetensors`` or a torchvision ``.pth``/``.pt``
            (read with ``torch.load(..., weights_only=True)``: tensors only, no code is run).

    Returns:
        (module, SHA-256 hex digest of the file's bytes, which are read once).

    Raises:
        UsageError: the file does not exist, is a folder or has another suffix.
        ArtifactError: it cannot be read or parsed, or is not a ResNet-18 state dict.
    """
    path = Path(weights)
    state, sha256 = read_state_dict(path, what="backbone weights")

    net = torchvision.models.resnet18(weights=None)
    net.fc = nn.Identity()
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a size mismatch: another architecture with the same names
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        raise ArtifactError(f"backbone weights {path} are not a ResNet-18 state dict: "
                            f"{first}") from None
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        keys = _keys("missing", missing) + _keys("unexpected", result.unexpected_keys)
        raise ArtifactError(f"backbone weights {path} are not a ResNet-18 state dict: "
                            f"{keys.rstrip('; ')}")
    return net.eval().requires_grad_(False), sha256


def _keys(what: str, keys: Sequence[str]) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:4]) + (f", … ({len(keys)} in all)" if len(keys) > 4 else "")
    return f"{what} keys {shown}; "


# --- data --------------------------------------------------------------------------------------


def _crop(images: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
          p: int) -> torch.Tensor:
    """Patches of ``images`` (N, 3, S, S) with top-left corners (rows, cols): (B, 3, p, p)."""
    ar = torch.arange(p, device=images.device)
    r = (rows[:, None] + ar)[:, :, None]  # (B, p, 1)
    c = (cols[:, None] + ar)[:, None, :]  # (B, 1, p)
    # Advanced indices around a slice put the broadcast dims first: (B, p, p, 3).
    return images[idx[:, None, None], :, r, c].permute(0, 3, 1, 2).contiguous()


# --- losses ------------------------------------------------------------------------------------


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


# --- training ----------------------------------------------------------------------------------


def resolve_target(cfg: TeacherSettings) -> str:
    """``teacher.target`` with ``auto`` resolved: ``resnet18`` when ``backbone_weights`` is
    given, else ``handcrafted``. (The one line to change for another default.)"""
    if cfg.target != "auto":
        return cfg.target
    return "resnet18" if cfg.backbone_weights is not None else "handcrafted"


def _lambdas(cfg: TeacherSettings, distillation: bool) -> dict[str, float]:
    metric = cfg.lambda_metric
    if metric is None:
        metric = 0.0 if distillation else 1.0
    return {"kd": cfg.lambda_kd if distillation else 0.0, "metric": float(metric),
            "compact": cfg.lambda_compact, "variance": cfg.lambda_variance}


def _generator(seed: int, patch_size: int, *rank_and_start: int) -> torch.Generator:
    # A stable stream per (seed, scale), independent of Python's hash seed and the global RNG;
    # ranks > 0 of a distributed run add (rank, first iteration).
    key = ":".join(str(k) for k in (seed, patch_size, *rank_and_start))
    digest = hashlib.sha256(f"stad.teacher:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _decoder(generator: torch.Generator, out_dim: int) -> Decoder:
    # nn.Linear's default initialization, but drawn from the scale's generator.
    decoder = Decoder(out_dim=out_dim)
    lin = decoder.linear
    nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(lin.in_features)
    nn.init.uniform_(lin.bias, -bound, bound, generator=generator)
    return decoder


def _sample_patches(p: int, images: torch.Tensor, seed: int, n: int = BANK_SAMPLE
                    ) -> torch.Tensor:
    """n random p×p patches of ``images``, drawn from a generator of their own (the training
    stream is the same with or without them): where a target's statistics are estimated."""
    digest = hashlib.sha256(f"stad.teacher.bank:{seed}:{p}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    corners = images.shape[-1] - p + 1
    idx = torch.randint(images.shape[0], (n,), generator=gen)
    rows = torch.randint(corners, (n,), generator=gen)
    cols = torch.randint(corners, (n,), generator=gen)
    dev = images.device
    return _crop(images, idx.to(dev), rows.to(dev), cols.to(dev), p)


def _bank(p: int, images: torch.Tensor, seed: int, components: int = 0) -> HandcraftedBank:
    """The handcrafted target of scale p, standardized (and with ``components``, whitened) on
    BANK_SAMPLE random patches (WHITEN_SAMPLE when whitened, for the covariance)."""
    n = WHITEN_SAMPLE if components else BANK_SAMPLE
    return HandcraftedBank(p, components).to(images.device).fit(
        _sample_patches(p, images, seed, n))


class _Pretrainee(nn.Module):
    """Teacher and distillation decoder as one module, the unit DistributedDataParallel wraps:
    patches (k·B, 3, p, p) → descriptors (k·B, d), and the first B decoded (or None)."""

    def __init__(self, teacher: PatchNetwork, decoder: Decoder | None) -> None:
        super().__init__()
        self.teacher = teacher
        self.decoder = decoder

    def forward(self, patches: torch.Tensor, batch: int
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        desc = self.teacher(patches)
        return desc, self.decoder(desc[:batch]) if self.decoder is not None else None


def _curve(history: Sequence[float]) -> list[float]:
    parts = np.array_split(np.asarray(history, dtype=np.float64), min(CURVE_POINTS, len(history)))
    return [float(part.mean()) for part in parts]


def _pretrain_scale(
    p: int,
    buffer: ImageBuffer,
    settings: Settings,
    lambdas: dict[str, float],
    target: str,
    backbone: nn.Module | None,
    *,
    reporter: Reporter,
    device: torch.device,
    checkpoint: Checkpoint | None = None,
    world: World = SINGLE,
) -> tuple[PatchNetwork, dict[str, Any]]:
    """Train the teacher of one scale on patches of the images in ``buffer`` (this rank's
    share of the training images; refreshed every iteration when they do not all fit).

    In a distributed run every rank starts from the same weights, draws its own patches
    (ranks > 0 from a stream of their own, and with a buffer of their own, both started
    afresh on a resume), the handcrafted target is standardized as rank 0 estimates it, and
    DDP averages the gradients.

    ``target`` is the resolved distillation target ("resnet18" with ``backbone``,
    "handcrafted" or "none"); distillation runs when ``lambdas["kd"]`` > 0.
    With ``checkpoint``: continues its scale in progress if it is this one, saves every
    ``checkpoint.every`` iterations but the last, and saves and raises
    :class:`~stad.errors.Interrupted` after an iteration at which ``checkpoint.stop.poll()`` is
    true (but the last).
    """
    cfg = settings.teacher
    gen = _generator(settings.seed, p)
    teacher = build_network(p, generator=gen).to(device).train()
    params = list(teacher.parameters())
    decoder = None
    kd_target: nn.Module | None = None
    buffer.start()  # the first images of the share (a resumed buffer is restored below)
    images = buffer.images
    dense: DenseTargets | None = None
    if lambdas["kd"] > 0 and target == "handcrafted":
        kd_target = _bank(p, images, settings.seed, cfg.target_whiten)
    elif lambdas["kd"] > 0 and target == "resnet18":
        kd_target = backbone
    elif lambdas["kd"] > 0 and target in BACKBONES:
        assert isinstance(backbone, EfficientNetLite)
        blocks = blocks_for(p, backbone, cfg.target_blocks)
        if cfg.distill == "dense":
            dense = DenseTargets(backbone, blocks, images)
        else:
            kd_target = PooledTargets(backbone, blocks, cfg.kd_input_size,
                                      _sample_patches(p, images, settings.seed))
    if dense is not None or kd_target is not None:
        # The target's dimension: the bank's, the backbone blocks', or ResNet-18's 512.
        dim = dense.dim if dense is not None else getattr(kd_target, "dim", 512)
        decoder = _decoder(gen, dim).to(device).train()
        params += list(decoder.parameters())
    if isinstance(kd_target, HandcraftedBank):
        for tensor in kd_target.buffers():
            world.broadcast(tensor)
    elif isinstance(kd_target, PooledTargets):
        for tensor in (kd_target.mean, kd_target.std):
            world.broadcast(tensor)
    if dense is not None and world.size > 1:  # every rank standardizes as rank 0 does
        stats = [(mean.clone(), std.clone()) for mean, std in dense.stats]
        for mean, std in stats:
            world.broadcast(mean)
            world.broadcast(std)
        dense.set_stats(stats)
    # What DDP wraps (teacher and decoder, one forward); a plain run calls it directly.
    step: nn.Module = _Pretrainee(teacher, decoder)
    if world.size > 1:
        step = DistributedDataParallel(
            step, device_ids=[device.index] if device.type == "cuda" else None)
    # fused: one kernel per step instead of a dozen element-wise passes (faster on CPU too).
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                           fused=device.type in ("cpu", "cuda"))

    n, size, batch = images.shape[0], images.shape[-1], cfg.batch_size
    corners = size - p + 1  # top-left corners per axis at which a p×p patch fits
    metric = lambdas["metric"] > 0
    shift = cfg.positive_shift
    history: list[float] = []
    terms: dict[str, list[float]] = {"kd": [], "metric": [], "compact": [], "variance": []}
    first, seconds = 0, 0.0
    resume = checkpoint.progress if checkpoint is not None else None
    if resume is not None and resume.get("scale") == p:
        # The networks were built above from the fresh generator (drawing their init from it),
        # as in an uninterrupted run; now weights, Adam and the generator continue.
        assert checkpoint is not None and checkpoint.resumed is not None
        if resume["iteration"] > cfg.iterations:
            raise UsageError(f"the checkpoint has trained p={p} for {resume['iteration']} "
                             f"iterations, more than teacher.iterations {cfg.iterations}: "
                             f"resume with --iterations {resume['iteration']} or more")
        tensors = checkpoint.resumed.tensors
        teacher.load_state_dict(prefixed(tensors, f"teacher.p{p}"))
        if decoder is not None:
            decoder.load_state_dict(prefixed(tensors, f"decoder.p{p}"))
        load_optimizer(opt, tensors, f"adam.p{p}")
        gen.set_state(tensors[f"generator.p{p}"].clone())
        state = tensors.get(f"buffer.p{p}")  # absent when the saving run did not stream
        if buffer.streaming and world.main and state is not None:
            buffer.start(state)
            images = buffer.images
            if dense is not None:
                dense.update(images, range(images.shape[0]))
        first, seconds = resume["iteration"], resume["seconds"]
        losses = tensors[f"losses.p{p}"].tolist()  # (first, 4 or 5): total, kd, metric, …
        history = [row[0] for row in losses]
        for j, key in enumerate(terms, start=1):
            terms[key] = [row[j] if j < len(row) else 0.0 for row in losses]

    def saved_terms() -> list[list[float]]:
        # total, kd, metric, compact (the format before Lv), then variance only when it is on.
        keys = ["kd", "metric", "compact"] + (["variance"] if lambdas["variance"] > 0 else [])
        return [terms[k] for k in keys]

    def save(done: int) -> str:
        assert checkpoint is not None
        tensors = {**with_prefix(teacher.state_dict(), f"teacher.p{p}"),
                   **optimizer_tensors(opt, f"adam.p{p}"),
                   f"generator.p{p}": gen.get_state(),
                   f"losses.p{p}": torch.tensor([history, *saved_terms()],
                                                dtype=torch.float64).T}
        if decoder is not None:
            tensors.update(with_prefix(decoder.state_dict(), f"decoder.p{p}"))
        if buffer.streaming:
            tensors[f"buffer.p{p}"] = buffer.state()
        where = f"p={p} after iteration {done} of {cfg.iterations}"
        checkpoint.save(tensors, {"scale": p, "iteration": done,
                                  "seconds": seconds + time.perf_counter() - start}, where=where)
        return where

    if world.rank:
        gen = _generator(settings.seed, p, world.rank, first)
    task = reporter.task(f"teacher p={p}", cfg.iterations)
    task.advance(first)
    start = time.perf_counter()
    positions = list(buffer.positions)
    for it in range(first, cfg.iterations):
        buffer.refresh(gen)  # streams only: new images into slots drawn from the generator
        if dense is not None and buffer.streaming and buffer.positions != positions:
            dense.update(images, [k for k, (a, b) in enumerate(zip(positions, buffer.positions,
                                                                   strict=True)) if a != b])
            positions = list(buffer.positions)
        # All indices and noise come from the scale's CPU generator, then move to the device.
        idx = torch.randint(n, (batch,), generator=gen)
        rows = torch.randint(corners, (batch,), generator=gen)
        cols = torch.randint(corners, (batch,), generator=gen)
        parts = [_crop(images, idx.to(device), rows.to(device), cols.to(device), p)]
        if metric:
            # p⁺: the same location moved by up to `shift` pixels (kept inside the image) plus
            # noise; p⁻: a random patch of another image (n ≥ 2 is checked by the caller).
            rows_pos = rows + torch.randint(-shift, shift + 1, (batch,), generator=gen)
            cols_pos = cols + torch.randint(-shift, shift + 1, (batch,), generator=gen)
            noise = torch.randn(batch, 3, p, p, generator=gen) * cfg.positive_noise
            other = (idx + torch.randint(1, n, (batch,), generator=gen)) % n
            rows_neg = torch.randint(corners, (batch,), generator=gen)
            cols_neg = torch.randint(corners, (batch,), generator=gen)
            parts.append(_crop(images, idx.to(device), rows_pos.clamp(0, corners - 1).to(device),
                               cols_pos.clamp(0, corners - 1).to(device), p) + noise.to(device))
            parts.append(_crop(images, other.to(device), rows_neg.to(device),
                               cols_neg.to(device), p))
        # One forward for anchors, positives and negatives: (len(parts)·B, d), and the
        # anchors decoded for distillation.
        flat, decoded = step(torch.cat(parts), batch)
        desc = flat.split(batch)

        zero = desc[0].new_zeros(())
        loss_kd = loss_metric = zero
        if dense is not None and decoded is not None:
            half = (p - 1) // 2  # the pixel whose patch this is (stad.networks alignment)
            goal = dense.at(idx.to(device), (rows + half).to(device), (cols + half).to(device))
            loss_kd = (decoded - goal).pow(2).sum(1).mean()
        elif kd_target is not None and decoded is not None:
            with torch.no_grad():
                if isinstance(kd_target, HandcraftedBank | PooledTargets):
                    goal = kd_target(parts[0])  # (B, 484), or (B, k) whitened
                else:
                    kd_in = F.interpolate(parts[0], size=(cfg.kd_input_size,) * 2,
                                          mode="bilinear", align_corners=False)
                    goal = kd_target(kd_in)  # (B, 512)
            loss_kd = (decoded - goal).pow(2).sum(1).mean()
        if metric:
            hardest = cfg.triplet_negatives == "hardest"
            exclude = (other[None, :] == idx[:, None]).to(device) if hardest else None
            loss_metric = triplet_loss(desc[0], desc[1], desc[2], margin=cfg.triplet_margin,
                                       normalize=cfg.descriptor_norm, hardest=hardest,
                                       exclude=exclude)
        loss_compact = (compactness_loss(desc[0], squared=cfg.compactness == "squared")
                        if lambdas["compact"] > 0 else zero)
        loss_variance = zero
        if lambdas["variance"] > 0:
            # On the descriptors as the triplet sees them: normalized × sqrt(d) or raw.
            anchors = (F.normalize(desc[0], dim=1) * math.sqrt(desc[0].shape[1])
                       if cfg.descriptor_norm else desc[0])
            loss_variance = variance_loss(anchors)
        loss = (lambdas["kd"] * loss_kd + lambdas["metric"] * loss_metric
                + lambdas["compact"] * loss_compact + lambdas["variance"] * loss_variance)

        value = loss.item()
        if world.any(not math.isfinite(value), device):
            raise TrainingError(
                f"non-finite teacher loss at p={p}, iteration {it + 1} of {cfg.iterations} "
                f"(kd {loss_kd.item():.4g}, metric {loss_metric.item():.4g}, compact "
                f"{loss_compact.item():.4g}, variance {loss_variance.item():.4g}); lower "
                f"teacher.lr or check the images and start again (without --resume); "
                f"{last_good(checkpoint)}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(value)
        terms["kd"].append(loss_kd.item())
        terms["metric"].append(loss_metric.item())
        terms["compact"].append(loss_compact.item())
        terms["variance"].append(loss_variance.item())
        task.advance(1, loss=value)
        stop = checkpoint is not None and world.any(checkpoint.stop.poll(), device)
        if checkpoint is not None and it + 1 < cfg.iterations and (
                stop or (it + 1) % checkpoint.every == 0):
            where = save(it + 1)
            if stop:
                raise checkpoint.interrupted(where)
    task.done()
    seconds += time.perf_counter() - start
    teacher = teacher.cpu().eval().requires_grad_(False)
    info = {
        "first": history[0],
        "last": history[-1],
        "curve": _curve(history),
        # Each unweighted term, averaged over the last 1/20 of the run: which one dominates.
        "terms": {k: _curve(v)[-1] for k, v in terms.items()},
        "seconds": round(seconds, 3),
    }
    if buffer.streaming:
        info["skipped"] = skipped = buffer.skipped()
        if skipped["count"]:
            warn(f"teacher p={p}: skipped {skipped['count']} unreadable image(s) of the "
                 f"stream, first: {'; '.join(skipped['first'])}")
    return teacher, info


def _diagnose(net: PatchNetwork, images: torch.Tensor, settings: Settings) -> dict[str, Any]:
    """Diagnostics of a finished teacher, with a warning per sign of collapse."""
    cfg = settings.teacher
    # The augmented copy must fit inside the image without clamping.
    shift = max(0, min(cfg.positive_shift, (images.shape[-1] - net.patch_size) // 2))
    diag = teacher_diagnostics(net, images, n_patches=cfg.diagnostic_patches, shift=shift,
                               noise=cfg.positive_noise, seed=settings.seed)
    diag["warnings"] = collapse_warnings(diag)
    for line in diag["warnings"]:
        warn(line)
    return diag


def _pretrain_scales(
    settings: Settings,
    buffer: ImageBuffer,
    lambdas: dict[str, float],
    target: str,
    backbone: nn.Module | None,
    *,
    reporter: Reporter,
    device: torch.device,
    checkpoint: Checkpoint | None,
    world: World,
) -> tuple[dict[int, PatchNetwork], dict[str, Any], dict[str, Any]]:
    """Every scale in turn (:func:`pretrain_teachers`): teachers, losses, diagnostics."""
    cfg = settings.teacher
    teachers: dict[int, PatchNetwork] = {}
    losses: dict[str, Any] = {}
    diagnostics: dict[str, Any] = {}
    for k, p in enumerate(cfg.patch_sizes):
        name = f"p{p}"
        done = checkpoint.resumed_scale(name) if checkpoint is not None else None
        if done is not None:
            assert checkpoint is not None and checkpoint.resumed is not None
            trained = checkpoint.resumed.config.get("teacher", {}).get("iterations")
            if trained != cfg.iterations:
                raise UsageError(f"the checkpoint finished p={p} at {trained} iterations; "
                                 f"teacher.iterations can change on resume only while the "
                                 f"first scale is in progress: resume with --iterations "
                                 f"{trained}")
            teachers[p] = load_teachers(checkpoint.resumed.tensors, patch_sizes=[p])[p]
            losses[name] = done
        else:
            teachers[p], losses[name] = _pretrain_scale(
                p, buffer, settings, lambdas, target, backbone, reporter=reporter,
                device=device, checkpoint=checkpoint, world=world)
        if cfg.diagnostic_patches > 1:
            # On the first images of the share, whether or not the scale was resumed.
            buffer.start()
            diagnostics[name] = _diagnose(teachers[p], buffer.images, settings)
        if checkpoint is not None:
            checkpoint.finish(name, with_prefix(teachers[p].state_dict(), f"teacher.{name}"),
                              losses[name])
            if done is None and k + 1 < len(cfg.patch_sizes):
                where = f"the end of scale p={p}"
                checkpoint.save({}, None, where=where)
                if checkpoint.stop.requested:
                    raise checkpoint.interrupted(where)
    return teachers, losses, diagnostics


def pretrain_teachers(
    settings: Settings,
    samples: Sequence[Sample] | ImageSource,
    *,
    reporter: Reporter = NULL_REPORTER,
    device: torch.device = torch.device("cpu"),
    checkpoint: Checkpoint | None = None,
    world: World = SINGLE,
) -> tuple[dict[int, PatchNetwork], dict[str, Any]]:
    """Pretrain one teacher per ``settings.teacher.patch_sizes`` on patches of ``samples``.

    ``samples`` may be an :class:`~stad.imagebuffer.ImageSource` that lists them again on
    demand (a large collection): when more than ``teacher.buffer_images`` images fall to a
    process, patches come from a buffer of that many decoded images, ``teacher.buffer_refresh``
    of which are replaced by the next images of the stream at every iteration
    (:mod:`stad.imagebuffer`). In a distributed run (``world``) every rank reads only its
    shard (every N-th image), and at the end the ranks compare a digest of their teachers.

    Distillation is on when ``lambda_kd`` > 0 and the target (:func:`resolve_target`) is
    ``resnet18`` (the ResNet-18 file ``teacher.backbone_weights``) or ``handcrafted``; with
    target ``none`` the teachers train on metric learning and compactness only
    (``lambda_metric`` ``None`` then means 1), and a note says so. After each scale the
    teacher is diagnosed (:mod:`stad.diagnostics`, ``teacher.diagnostic_patches`` patches) and
    every sign of collapse is printed as a warning. With ``checkpoint`` the run is checkpointed
    and resumed (module docstring); the scales the resumed checkpoint finished are taken from it.

    Returns:
        teachers: {p: PatchNetwork} on the CPU, eval mode, ``requires_grad`` False.
        info: ``losses`` ({"p17": {"first", "last", "curve", "terms", "seconds"}}), ``lambdas``
            (the effective ones), ``target`` ("resnet18", "handcrafted" or "none": what was
            distilled), ``distillation``, ``backbone`` ({"path", "sha256"} or None),
            ``handcrafted`` ({"dim", "blocks", "whiten", "target_dim"}: the bank's
            dimension, the whitened components (0: off), what was distilled; or None),
            ``diagnostics`` ({"p17": figures and "warnings"}, empty when off), ``data``
            ({"n_images", "image_size"}), ``iterations``, ``batch_size``, ``seconds``.

    Raises:
        UsageError: patch sizes larger than ``image_size``, all loss weights zero, target
            resnet18 without a backbone file, a missing backbone file. ArtifactError: an
            unusable backbone file. DataError: no images, unreadable images (a stream skips
            them, counted in ``losses[pP]["skipped"]``), or one image with
            metric learning on. TrainingError: a non-finite loss (naming the scale, the
            iteration and the last good checkpoint).
            Interrupted: a stop was requested (after saving the checkpoint).
    """
    cfg = settings.teacher
    too_big = [p for p in cfg.patch_sizes if p > cfg.image_size]
    if too_big:
        raise UsageError(f"teacher.image_size {cfg.image_size} is smaller than patch size "
                         f"{too_big[0]}; raise teacher.image_size or drop it from "
                         "teacher.patch_sizes")
    source = samples if isinstance(samples, ImageSource) else ImageSource.of(samples)
    if not source.count:
        raise DataError("no images to pretrain the teacher on")

    target = resolve_target(cfg)
    if cfg.target_whiten and target != "handcrafted":
        raise UsageError(f"teacher.target_whiten (--target-whiten) applies to the handcrafted "
                         f"target, not {target}: drop it or choose --target handcrafted")
    if target == "resnet18" and cfg.backbone_weights is None:
        raise UsageError("teacher target resnet18 distils a ResNet-18 read from a local file: "
                         "pass --backbone-weights FILE, or choose --target handcrafted (no "
                         "download) or none")
    backbone_info: dict[str, str] | None = None
    backbone: nn.Module | None = None
    if target == "resnet18" and cfg.lambda_kd > 0:
        assert cfg.backbone_weights is not None
        backbone, sha256 = resnet18_features(cfg.backbone_weights)
        backbone = backbone.to(device)
        backbone_info = {"path": str(cfg.backbone_weights), "sha256": sha256}
    elif target in BACKBONES and cfg.lambda_kd > 0:
        backbone, backbone_info = load_backbone(target, cfg.backbone_weights)
        backbone = backbone.to(device)
        for p in cfg.patch_sizes:
            blocks_for(p, backbone, cfg.target_blocks)  # refused before any training
    elif target not in ("resnet18", *BACKBONES) and cfg.backbone_weights is not None:
        reporter.note(f"teacher target is {target}: the backbone weights are not used")
    distillation = target != "none" and cfg.lambda_kd > 0
    lambdas = _lambdas(cfg, distillation)
    if not distillation:
        if target != "none":
            reporter.note(f"distillation is off: teacher.lambda_kd = 0, so the {target} target "
                          "is not used")
        elif lambdas["metric"] > 0:
            reporter.note(NO_BACKBONE_NOTE)
        else:
            reporter.note("distillation is off (--target none) and lambda_metric = 0: "
                          "training on compactness only")
    if not any(v > 0 for v in lambdas.values()):
        raise UsageError(f"every teacher loss weight is zero ({lambdas}); set lambda_kd with "
                         "backbone weights, lambda_metric or lambda_compact above zero")
    if lambdas["metric"] > 0 and source.count < 2 * world.size:
        raise DataError("metric learning draws its negative patches from another image, but "
                        f"there is only one image{' per process' if world.size > 1 else ''}; "
                        "add images or set teacher.lambda_metric = 0")
    if source.count < world.size:
        raise DataError(f"{source.count} images cannot be shared by {world.size} processes: "
                        "run on fewer")

    start = time.perf_counter()
    buffer = ImageBuffer(source, size=cfg.image_size, capacity=cfg.buffer_images,
                         refresh=cfg.buffer_refresh, world=world, device=device,
                         reporter=reporter)
    with buffer:
        teachers, losses, diagnostics = _pretrain_scales(
            settings, buffer, lambdas, target, backbone, reporter=reporter, device=device,
            checkpoint=checkpoint, world=world)
    distributed = None
    if world.size > 1:
        digest = tensors_sha256({f"p{p}.{k}": v for p, net in teachers.items()
                                 for k, v in net.state_dict().items()})
        digests = world.gather(digest)
        if len(set(digests)) != 1:
            raise TrainingError(f"the {world.size} processes ended with different teachers "
                                f"({', '.join(d[:12] for d in digests)}); this is a bug, "
                                "please report it with the command line")
        distributed = {"ranks": world.size, "backend": world.backend, "weights_sha256": digest}
    return teachers, {
        "losses": losses,
        "distributed": distributed,
        "lambdas": lambdas,
        "target": target if distillation else "none",
        "distillation": distillation,
        "backbone": backbone_info,
        "efficientnet": (describe(backbone_info or {}, cfg.distill, backbone,
                                  {p: blocks_for(p, backbone, cfg.target_blocks)
                                   for p in cfg.patch_sizes})
                         if distillation and isinstance(backbone, EfficientNetLite) else None),
        "handcrafted": ({"dim": HANDCRAFTED_DIM, "blocks": dict(BLOCKS),
                         "whiten": cfg.target_whiten,
                         "target_dim": cfg.target_whiten or HANDCRAFTED_DIM}
                        if distillation and target == "handcrafted" else None),
        "diagnostics": diagnostics,
        "data": {"n_images": source.count, "image_size": cfg.image_size,
                 "streamed": buffer.streaming,
                 "mean": list(DEFAULT_MEAN), "std": list(DEFAULT_STD)},
        "iterations": cfg.iterations,
        "batch_size": cfg.batch_size,
        "seconds": round(time.perf_counter() - start, 3),
    }
