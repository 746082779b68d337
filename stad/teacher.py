"""``stad pretrain-teacher``: pretrain one teacher per patch size on random patches (METHOD.md §3).

Per scale p the teacher T (a :class:`~stad.networks.PatchNetwork`) is trained on random p×p
patches of generic images with the loss of Bergmann et al. (CVPR 2020, eq. 1-3)

    L = λk·Lk + λm·Lm + λc·Lc

- Lk, knowledge distillation: ‖D(T(p)) − P(p)‖², D the linear :class:`~stad.networks.Decoder`
  (128 → 512) and P(p) the 512-d global-average-pooled feature of a frozen ResNet-18 whose weights
  the user gives as a local file (:func:`resnet18_features`); the patch is resized bilinearly to
  ``kd_input_size`` for it (the paper does not say). Without a file distillation is off.
- Lm, metric learning (triplet): mean over the batch of max(0, δ + δ⁺ − δ⁻) with
  δ⁺ = ‖T(p) − T(p⁺)‖² and δ⁻ = min(‖T(p) − T(p⁻)‖², ‖T(p⁺) − T(p⁻)‖²); p⁺ is p shifted by up
  to ``positive_shift`` pixels plus Gaussian noise, p⁻ a patch of another image.
- Lc, compactness: Σ_{i≠j} c_ij over the d×d correlation matrix of the batch's descriptors.

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

from stad.artifacts import prefixed, read_state_dict, with_prefix
from stad.checkpoint import Checkpoint, last_good, load_optimizer, optimizer_tensors
from stad.config import Settings, TeacherSettings
from stad.console import NULL_REPORTER, Reporter
from stad.datasets.base import Sample
from stad.errors import ArtifactError, DataError, TrainingError, UsageError
from stad.images import DEFAULT_MEAN, DEFAULT_STD, load_image, to_tensor
from stad.model import load_teachers
from stad.networks import Decoder, PatchNetwork, build_network

__all__ = [
    "compactness_loss",
    "load_images",
    "pretrain_teachers",
    "resnet18_features",
    "triplet_loss",
]

CURVE_POINTS = 20  # info["losses"][...]["curve"]: the mean loss of each 1/20 of the run
NO_BACKBONE_NOTE = ("distillation is off: no --backbone-weights given; "
                    "training on metric learning and compactness only")


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


def load_images(samples: Sequence[Sample], size: int, *, reporter: Reporter = NULL_REPORTER
                ) -> torch.Tensor:
    """Every image decoded once, resized to size×size and standardized: (N, 3, size, size).

    Memory is N · 3 · size² · 4 bytes (0.75 MiB per image at 256).
    """
    task = reporter.task("teacher: reading images", len(samples))
    out = torch.empty(len(samples), 3, size, size)
    for k, sample in enumerate(samples):
        out[k] = to_tensor(load_image(sample.image), size=size)
        task.advance(1)
    task.done()
    return out


def _crop(images: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
          p: int) -> torch.Tensor:
    """Patches of ``images`` (N, 3, S, S) with top-left corners (rows, cols): (B, 3, p, p)."""
    ar = torch.arange(p, device=images.device)
    r = (rows[:, None] + ar)[:, :, None]  # (B, p, 1)
    c = (cols[:, None] + ar)[:, None, :]  # (B, 1, p)
    # Advanced indices around a slice put the broadcast dims first: (B, p, p, 3).
    return images[idx[:, None, None], :, r, c].permute(0, 3, 1, 2).contiguous()


# --- losses ------------------------------------------------------------------------------------


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, *,
                 margin: float, normalize: bool = False) -> torch.Tensor:
    """Lm of Bergmann et al. (eq. 2): mean of max(0, δ + δ⁺ − δ⁻) over the batch.

    δ⁺ = ‖a − p⁺‖², δ⁻ = min(‖a − p⁻‖², ‖p⁺ − p⁻‖²) (the harder of the two negatives). With
    ``normalize`` the descriptors (B, d) are first L2-normalized and scaled by sqrt(d), so the
    distances lie in [0, 4d] whatever the descriptors' scale.
    """
    if normalize:
        scale = math.sqrt(anchor.shape[1])
        anchor, positive, negative = (F.normalize(x, dim=1) * scale
                                      for x in (anchor, positive, negative))
    d_pos = (anchor - positive).pow(2).sum(1)
    d_neg = torch.minimum((anchor - negative).pow(2).sum(1), (positive - negative).pow(2).sum(1))
    return F.relu(margin + d_pos - d_neg).mean()


def compactness_loss(descriptors: torch.Tensor, *, eps: float = 1e-5) -> torch.Tensor:
    """Lc of Bergmann et al. (eq. 3): Σ_{i≠j} c_ij, c the d×d correlation matrix of (B, d).

    Each dimension is standardized over the batch, z = (y − mean) / sqrt(var + eps), and
    c = zᵀz / B. The sum is signed and not averaged, as in the paper: it lies in [−d, d(d − 1)]
    (the lower bound because Σ_ij c_ij = ‖Σ_i z_·i‖² / B ≥ 0).
    """
    b = descriptors.shape[0]
    mean = descriptors.mean(0)
    var = descriptors.var(0, unbiased=False)
    z = (descriptors - mean) / torch.sqrt(var + eps)  # (B, d)
    c = z.T @ z / b  # (d, d)
    return c.sum() - c.diagonal().sum()


# --- training ----------------------------------------------------------------------------------


def _lambdas(cfg: TeacherSettings, distillation: bool) -> dict[str, float]:
    metric = cfg.lambda_metric
    if metric is None:
        metric = 0.0 if distillation else 1.0
    return {"kd": cfg.lambda_kd if distillation else 0.0, "metric": float(metric),
            "compact": cfg.lambda_compact}


def _generator(seed: int, patch_size: int) -> torch.Generator:
    # A stable stream per (seed, scale), independent of Python's hash seed and the global RNG.
    digest = hashlib.sha256(f"stad.teacher:{seed}:{patch_size}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _decoder(generator: torch.Generator) -> Decoder:
    # nn.Linear's default initialization, but drawn from the scale's generator.
    decoder = Decoder()
    lin = decoder.linear
    nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(lin.in_features)
    nn.init.uniform_(lin.bias, -bound, bound, generator=generator)
    return decoder


def _curve(history: Sequence[float]) -> list[float]:
    parts = np.array_split(np.asarray(history, dtype=np.float64), min(CURVE_POINTS, len(history)))
    return [float(part.mean()) for part in parts]


def _pretrain_scale(
    p: int,
    images: torch.Tensor,
    settings: Settings,
    lambdas: dict[str, float],
    backbone: nn.Module | None,
    *,
    reporter: Reporter,
    device: torch.device,
    checkpoint: Checkpoint | None = None,
) -> tuple[PatchNetwork, dict[str, Any]]:
    """Train the teacher of one scale on standardized images (N, 3, S, S) already on device.

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
    if backbone is not None:
        decoder = _decoder(gen).to(device).train()
        params += list(decoder.parameters())
    # fused: one kernel per step instead of a dozen element-wise passes (faster on CPU too).
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                           fused=device.type in ("cpu", "cuda"))

    n, size, batch = images.shape[0], images.shape[-1], cfg.batch_size
    corners = size - p + 1  # top-left corners per axis at which a p×p patch fits
    metric = lambdas["metric"] > 0
    shift = cfg.positive_shift
    history: list[float] = []
    terms: dict[str, list[float]] = {"kd": [], "metric": [], "compact": []}
    first, seconds = 0, 0.0
    resume = checkpoint.progress if checkpoint is not None else None
    if resume is not None and resume.get("scale") == p:
        # The networks were built above from the fresh generator (drawing their init from it),
        # as in an uninterrupted run; now weights, Adam and the generator continue.
        assert checkpoint is not None and checkpoint.resumed is not None
        tensors = checkpoint.resumed.tensors
        teacher.load_state_dict(prefixed(tensors, f"teacher.p{p}"))
        if decoder is not None:
            decoder.load_state_dict(prefixed(tensors, f"decoder.p{p}"))
        load_optimizer(opt, tensors, f"adam.p{p}")
        gen.set_state(tensors[f"generator.p{p}"].clone())
        first, seconds = resume["iteration"], resume["seconds"]
        losses = tensors[f"losses.p{p}"].tolist()  # (first, 4): total, kd, metric, compact
        history = [row[0] for row in losses]
        for j, key in enumerate(("kd", "metric", "compact"), start=1):
            terms[key] = [row[j] for row in losses]

    def save(done: int) -> str:
        assert checkpoint is not None
        tensors = {**with_prefix(teacher.state_dict(), f"teacher.p{p}"),
                   **optimizer_tensors(opt, f"adam.p{p}"),
                   f"generator.p{p}": gen.get_state(),
                   f"losses.p{p}": torch.tensor([history, terms["kd"], terms["metric"],
                                                 terms["compact"]], dtype=torch.float64).T}
        if decoder is not None:
            tensors.update(with_prefix(decoder.state_dict(), f"decoder.p{p}"))
        where = f"p={p} after iteration {done} of {cfg.iterations}"
        checkpoint.save(tensors, {"scale": p, "iteration": done,
                                  "seconds": seconds + time.perf_counter() - start}, where=where)
        return where

    task = reporter.task(f"teacher p={p}", cfg.iterations)
    task.advance(first)
    start = time.perf_counter()
    for it in range(first, cfg.iterations):
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
        # One forward for anchors, positives and negatives: (len(parts)·B, d).
        desc = teacher(torch.cat(parts)).split(batch)

        zero = desc[0].new_zeros(())
        loss_kd = loss_metric = zero
        if backbone is not None and decoder is not None:
            with torch.no_grad():
                kd_in = F.interpolate(parts[0], size=(cfg.kd_input_size,) * 2, mode="bilinear",
                                      align_corners=False)
                target = backbone(kd_in)  # (B, 512)
            loss_kd = (decoder(desc[0]) - target).pow(2).sum(1).mean()
        if metric:
            loss_metric = triplet_loss(desc[0], desc[1], desc[2], margin=cfg.triplet_margin,
                                       normalize=cfg.descriptor_norm)
        loss_compact = compactness_loss(desc[0]) if lambdas["compact"] > 0 else zero
        loss = (lambdas["kd"] * loss_kd + lambdas["metric"] * loss_metric
                + lambdas["compact"] * loss_compact)

        value = loss.item()
        if not math.isfinite(value):
            raise TrainingError(
                f"non-finite teacher loss at p={p}, iteration {it + 1} of {cfg.iterations} "
                f"(kd {loss_kd.item():.4g}, metric {loss_metric.item():.4g}, compact "
                f"{loss_compact.item():.4g}); lower teacher.lr or check the images and start "
                f"again (without --resume); {last_good(checkpoint)}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(value)
        terms["kd"].append(loss_kd.item())
        terms["metric"].append(loss_metric.item())
        terms["compact"].append(loss_compact.item())
        task.advance(1, loss=value)
        stop = checkpoint is not None and checkpoint.stop.poll()
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
    return teacher, info


def pretrain_teachers(
    settings: Settings,
    samples: Sequence[Sample],
    *,
    reporter: Reporter = NULL_REPORTER,
    device: torch.device = torch.device("cpu"),
    checkpoint: Checkpoint | None = None,
) -> tuple[dict[int, PatchNetwork], dict[str, Any]]:
    """Pretrain one teacher per ``settings.teacher.patch_sizes`` on patches of ``samples``.

    Distillation is on when ``teacher.backbone_weights`` names a ResNet-18 file and
    ``lambda_kd`` > 0; otherwise the teachers train on metric learning and compactness only
    (``lambda_metric`` ``None`` then means 1), and a note says so. With ``checkpoint`` the
    run is checkpointed and resumed (module docstring); the scales the resumed checkpoint
    finished are taken from it.

    Returns:
        teachers: {p: PatchNetwork} on the CPU, eval mode, ``requires_grad`` False.
        info: ``losses`` ({"p17": {"first", "last", "curve", "terms", "seconds"}}), ``lambdas``
            (the effective ones), ``distillation``, ``backbone`` ({"path", "sha256"} or None),
            ``data`` ({"n_images", "image_size"}), ``iterations``, ``batch_size``, ``seconds``.

    Raises:
        UsageError: patch sizes larger than ``image_size``, all loss weights zero, a missing
            backbone file. ArtifactError: an unusable backbone file. DataError: no images,
            unreadable images, or one image with metric learning on. TrainingError: a
            non-finite loss (naming the scale, the iteration and the last good checkpoint).
            Interrupted: a stop was requested (after saving the checkpoint).
    """
    cfg = settings.teacher
    too_big = [p for p in cfg.patch_sizes if p > cfg.image_size]
    if too_big:
        raise UsageError(f"teacher.image_size {cfg.image_size} is smaller than patch size "
                         f"{too_big[0]}; raise teacher.image_size or drop it from "
                         "teacher.patch_sizes")
    if not samples:
        raise DataError("no images to pretrain the teacher on")

    backbone_info: dict[str, str] | None = None
    backbone: nn.Module | None = None
    if cfg.backbone_weights is not None and cfg.lambda_kd > 0:
        backbone, sha256 = resnet18_features(cfg.backbone_weights)
        backbone = backbone.to(device)
        backbone_info = {"path": str(cfg.backbone_weights), "sha256": sha256}
    distillation = backbone is not None
    lambdas = _lambdas(cfg, distillation)
    if not distillation:
        if cfg.backbone_weights is not None:
            reporter.note("distillation is off: teacher.lambda_kd = 0, so the backbone weights "
                          "are not used")
        elif lambdas["metric"] > 0:
            reporter.note(NO_BACKBONE_NOTE)
        else:
            reporter.note("distillation is off (no --backbone-weights) and lambda_metric = 0: "
                          "training on compactness only")
    if not any(v > 0 for v in lambdas.values()):
        raise UsageError(f"every teacher loss weight is zero ({lambdas}); set lambda_kd with "
                         "backbone weights, lambda_metric or lambda_compact above zero")
    if lambdas["metric"] > 0 and len(samples) < 2:
        raise DataError("metric learning draws its negative patches from another image, but "
                        "there is only one image; add images or set teacher.lambda_metric = 0")

    start = time.perf_counter()
    images = load_images(samples, cfg.image_size, reporter=reporter).to(device)
    teachers: dict[int, PatchNetwork] = {}
    losses: dict[str, Any] = {}
    for k, p in enumerate(cfg.patch_sizes):
        name = f"p{p}"
        done = checkpoint.resumed_scale(name) if checkpoint is not None else None
        if done is not None:
            assert checkpoint is not None and checkpoint.resumed is not None
            teachers[p] = load_teachers(checkpoint.resumed.tensors, patch_sizes=[p])[p]
            losses[name] = done
        else:
            teachers[p], losses[name] = _pretrain_scale(
                p, images, settings, lambdas, backbone, reporter=reporter, device=device,
                checkpoint=checkpoint)
        if checkpoint is not None:
            checkpoint.finish(name, with_prefix(teachers[p].state_dict(), f"teacher.{name}"),
                              losses[name])
            if done is None and k + 1 < len(cfg.patch_sizes):
                where = f"the end of scale p={p}"
                checkpoint.save({}, None, where=where)
                if checkpoint.stop.requested:
                    raise checkpoint.interrupted(where)
    return teachers, {
        "losses": losses,
        "lambdas": lambdas,
        "distillation": distillation,
        "backbone": backbone_info,
        "data": {"n_images": len(samples), "image_size": cfg.image_size,
                 "mean": list(DEFAULT_MEAN), "std": list(DEFAULT_STD)},
        "iterations": cfg.iterations,
        "batch_size": cfg.batch_size,
        "seconds": round(time.perf_counter() - start, 3),
    }
