"""``stad fit-students``: train M students per scale to regress the teacher (METHOD.md §4).

Per scale: the frozen teacher's dense descriptors of every training image are computed once
(not once per student and epoch), their per-channel mean and std give the normalization, and
the normalized targets are kept in memory in float16. The M students of a scale are trained
together, each on its own loss, mean over pixels of ‖S_i(x) − (y − μ)/σ‖²: one Adam over all
their parameters is the same as M separate ones, because no parameter is shared.

With ``crop_size`` (the fast preset) a step trains on random crops of the target maps; the
student then sees the crop with its full context (the padded image around it, ``dense_valid``),
so each output pixel regresses exactly the target the teacher produced for the full image.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stad.config import Settings
from stad.console import NULL_REPORTER, Reporter
from stad.datasets.base import Sample
from stad.errors import DataError, TrainingError
from stad.images import DEFAULT_MEAN, DEFAULT_STD, load_image, to_tensor
from stad.model import PADDING, Model, Scale
from stad.networks import PatchNetwork, build_network


@dataclass
class FitResult:
    model: Model
    info: dict[str, Any] = field(default_factory=dict)


def split_train_val(train: Sequence[Sample], val: Sequence[Sample], *, fraction: float,
                    seed: int) -> tuple[list[Sample], list[Sample], str]:
    """The images to fit on and the ones kept for calibration.

    The adapter's ``val`` split is used when it has images; otherwise a share ``fraction`` of
    the training images (at least one) is held back, chosen by a seeded permutation so that
    ``calibrate`` finds the same ones. Returns (fit, held_out, source).
    """
    if val:
        return list(train), list(val), "adapter val split"
    if fraction <= 0:
        return list(train), [], "none"
    n_val = max(1, round(len(train) * fraction))
    if len(train) - n_val < 1:
        raise DataError(f"only {len(train)} training images: too few to hold back "
                        f"{n_val} for calibration; add images or set students.val_fraction = 0")
    order = np.random.default_rng(seed).permutation(len(train))
    held = sorted(order[:n_val].tolist())
    held_set = set(held)
    fit = [s for i, s in enumerate(train) if i not in held_set]
    return fit, [train[i] for i in held], f"held back {n_val} of {len(train)} training images"


def load_batch(samples: Sequence[Sample], size: int, mean: Sequence[float] = DEFAULT_MEAN,
               std: Sequence[float] = DEFAULT_STD) -> torch.Tensor:
    """Images read, resized and standardized: (N, 3, size, size)."""
    return torch.stack([to_tensor(load_image(s.image), size=size, mean=mean, std=std)
                        for s in samples])


@torch.inference_mode()
def teacher_targets(teacher: PatchNetwork, images: torch.Tensor, *, batch: int = 4
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalized teacher descriptors of every image, and the normalization (METHOD.md §4).

    Returns:
        targets (N, D, H, W) float16, mean (D,), std (D,) over all pixels of all images.
    """
    outs = []
    total = torch.zeros(teacher.out_dim, dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    count = 0
    for i in range(0, len(images), batch):
        y = teacher.dense(images[i:i + batch], padding_mode=PADDING)
        total += y.double().sum((0, 2, 3)).cpu()
        total_sq += y.double().pow(2).sum((0, 2, 3)).cpu()
        count += y.shape[0] * y.shape[2] * y.shape[3]
        outs.append(y)
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(0).sqrt()
    # A dead channel (constant output) would divide by zero; give it unit scale instead.
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    m = mean.float().view(1, -1, 1, 1)
    s = std.float().view(1, -1, 1, 1)
    targets = torch.cat([((y - m.to(y.device)) / s.to(y.device)).half() for y in outs])
    return targets, mean.float(), std.float()


def _crops(n: int, size: int, crop: int | None, gen: torch.Generator) -> list[tuple[int, int]]:
    if crop is None or crop >= size:
        return [(0, 0)] * n
    hi = size - crop + 1
    return [(int(torch.randint(hi, (1,), generator=gen)), int(torch.randint(hi, (1,),
                                                                           generator=gen)))
            for _ in range(n)]


def train_scale(
    teacher: PatchNetwork,
    images: torch.Tensor,
    settings: Settings,
    *,
    reporter: Reporter = NULL_REPORTER,
    device: torch.device = torch.device("cpu"),
) -> tuple[Scale, dict[str, Any]]:
    """Fit the students of one scale on standardized images (N, 3, S, S)."""
    cfg = settings.students
    p = teacher.patch_size
    teacher = teacher.to(device).eval().requires_grad_(False)
    targets, mean, std = teacher_targets(teacher, images.to(device))
    a = (p - 1) // 2
    padded = _pad_images(images, teacher, a).to(device)
    size = images.shape[-1]
    crop = cfg.crop_size if cfg.crop_size is not None and cfg.crop_size < size else None
    span = crop if crop is not None else size
    students = []
    for m in range(cfg.n_students):
        gen = torch.Generator().manual_seed(_seed(settings.seed, p, m))
        students.append(build_network(p, teacher.out_dim, generator=gen).to(device).train())
    params = [q for s in students for q in s.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(images)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    task = reporter.task(f"students p={p}", cfg.epochs * steps_per_epoch)
    history = []
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        gen = torch.Generator().manual_seed(_seed(settings.seed, p, 1000 + epoch))
        order = torch.randperm(n, generator=gen).tolist()
        epoch_loss = 0.0
        for b in range(0, n, cfg.batch_size):
            idx = order[b:b + cfg.batch_size]
            corners = _crops(len(idx), size, crop, gen)
            rf = teacher.receptive_field
            x = torch.stack([padded[i, :, r:r + span + rf - 1, c:c + span + rf - 1]
                             for i, (r, c) in zip(idx, corners, strict=True)])
            t = torch.stack([targets[i, :, r:r + span, c:c + span]
                             for i, (r, c) in zip(idx, corners, strict=True)]).float()
            with _autocast(device, cfg.precision):
                outs = [s.dense_valid(x) for s in students]
            losses = [(o.float() - t).pow(2).sum(1).mean() for o in outs]
            loss = torch.stack(losses).sum()
            if not torch.isfinite(loss):
                raise TrainingError(f"non-finite student loss at p={p}, epoch {epoch + 1}, "
                                    f"step {b // cfg.batch_size + 1}; lower students.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            epoch_loss += loss.item() / len(students) * len(idx)
            task.advance(1, epoch=epoch + 1, loss=loss.item() / len(students))
        history.append(epoch_loss / n)
    task.done()
    for s in students:
        s.eval().requires_grad_(False)
    scale = Scale(p, teacher, students, mean.to(device), std.to(device))
    return scale, {"loss_per_epoch": history, "seconds": round(time.perf_counter() - start, 2)}


def _autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast for the networks (losses stay in fp32), or a disabled context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _pad_images(images: torch.Tensor, net: PatchNetwork, a: int) -> torch.Tensor:
    return net.pad(images, padding_mode=PADDING)


def _seed(seed: int, *parts: int) -> int:
    # A distinct, stable stream per (seed, scale, student/epoch); no global RNG involved.
    h = seed
    for part in parts:
        h = (h * 1_000_003 + part) % (2**63)
    return h


def fit_students(
    settings: Settings,
    fit_samples: Sequence[Sample],
    teachers: dict[int, PatchNetwork],
    *,
    reporter: Reporter = NULL_REPORTER,
    device: torch.device = torch.device("cpu"),
) -> FitResult:
    """Fit the students of every scale in ``settings.students.patch_sizes``."""
    cfg = settings.students
    if not fit_samples:
        raise DataError("no training images to fit on")
    size = cfg.image_size
    images = load_batch(fit_samples, size)
    scales: dict[int, Scale] = {}
    info: dict[str, Any] = {"scales": {}}
    for p in cfg.patch_sizes:
        scale, scale_info = train_scale(teachers[p], images, settings, reporter=reporter,
                                        device=device)
        scales[p] = scale
        info["scales"][f"p{p}"] = scale_info
        reporter.note(f"p={p}: final loss {scale_info['loss_per_epoch'][-1]:.4g} "
                      f"({scale_info['seconds']:.0f} s)")
    preprocessing = {"image_size": size, "mean": list(DEFAULT_MEAN), "std": list(DEFAULT_STD)}
    return FitResult(Model(scales=scales, preprocessing=preprocessing), info)


def describe_samples(samples: Sequence[Sample]) -> list[str]:
    return [str(Path(s.image)) for s in samples]
