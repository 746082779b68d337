"""``stad fit-students``: train M students per scale to regress the teacher (METHOD.md §4).

Per scale: the frozen teacher's dense descriptors of every training image are computed once
(not once per student and epoch), their per-channel mean and std give the normalization, and
the normalized targets are kept in memory in float16. The M students of a scale are trained
together, each on its own loss, mean over pixels of ‖S_i(x) − (y − μ)/σ‖²: one Adam over all
their parameters is the same as M separate ones, because no parameter is shared.

With ``crop_size`` (the fast preset) a step trains on random crops of the target maps; the
student then sees the crop with its full context (the padded image around it, ``dense_valid``),
so each output pixel regresses exactly the target the teacher produced for the full image.

With a :class:`~stad.training.checkpoint.Checkpoint` the state is saved every
``checkpoint_every`` epochs, after every scale but the last, and when a stop is requested (then
:class:`~stad.errors.Interrupted` is raised). A resumed run continues to the same weights, bit
for bit on the same machine: the students and Adam's state are restored, and the sampling, whose
generator is seeded per (seed, scale, epoch), is replayed up to the step the checkpoint was at.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stad.artifacts import prefixed, with_prefix
from stad.config import Settings
from stad.console import NULL_REPORTER, Reporter
from stad.datasets.base import Sample
from stad.devices import resolve_precision
from stad.distributed import SINGLE, World
from stad.errors import DataError, TrainingError
from stad.images import DEFAULT_MEAN, DEFAULT_STD, load_image, to_tensor
from stad.model import PADDING, Networks, Scale
from stad.networks import PatchNetwork, build_network
from stad.training.checkpoint import (
    Checkpoint,
    last_good,
    load_optimizer,
    optimizer_tensors,
    tensors_sha256,
)


@dataclass
class FitResult:
    model: Networks
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
def teacher_targets(teacher: PatchNetwork, images: torch.Tensor, *, batch: int = 4,
                    world: World = SINGLE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalized teacher descriptors of every image, and the normalization (METHOD.md §4).

    In a distributed run ``images`` is this rank's shard; the mean and std are over the
    images of all ranks (their sums are added up), so every rank normalizes alike.

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
    d = teacher.out_dim
    counts = torch.tensor([float(count)], dtype=torch.float64)
    sums = world.sum(torch.cat([total, total_sq, counts]).to(images.device)).cpu()
    total, total_sq, count = sums[:d], sums[d:2 * d], float(sums[-1])
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
    checkpoint: Checkpoint | None = None,
    world: World = SINGLE,
) -> tuple[Scale, dict[str, Any]]:
    """Fit the students of one scale on standardized images (N, 3, S, S).

    In a distributed run ``images`` is this rank's shard; each rank draws its batches from it
    (an epoch is ``ceil(total / ranks)`` images per rank, a short shard repeats its first
    ones), the students are wrapped in DistributedDataParallel, which averages the gradients,
    so every rank holds the same weights after every step.

    With ``checkpoint``: continues the scale in progress of ``checkpoint.resumed`` if it is this
    one; saves every ``checkpoint.every`` epochs but the last; after a step at which
    ``checkpoint.stop.poll()`` is true, saves and raises :class:`~stad.errors.Interrupted`,
    except after the last step of the scale (the caller then decides).

    Raises:
        TrainingError: a non-finite loss, naming the step and the last good checkpoint.
    """
    cfg = settings.students
    p = teacher.patch_size
    teacher = teacher.to(device).eval().requires_grad_(False)
    targets, mean, std = teacher_targets(teacher, images.to(device), world=world)
    padded = teacher.pad(images, padding_mode=PADDING).to(device)  # crops cut with context
    size = images.shape[-1]
    crop = cfg.crop_size if cfg.crop_size is not None and cfg.crop_size < size else None
    span = crop if crop is not None else size
    students = []
    for m in range(cfg.n_students):
        gen = torch.Generator().manual_seed(_seed(settings.seed, p, m))
        students.append(build_network(p, teacher.out_dim, generator=gen).to(device).train())
    ensemble: nn.Module = _Ensemble(students)
    if world.size > 1:
        ensemble = DistributedDataParallel(
            ensemble, device_ids=[device.index] if device.type == "cuda" else None)
    params = [q for s in students for q in s.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(images)
    total = int(world.sum(torch.tensor([n], device=device)).item())
    per_rank = math.ceil(total / world.size)  # = n in a plain run
    steps_per_epoch = math.ceil(per_rank / cfg.batch_size)
    # min_steps (the fast preset): a small set gets more epochs, so that every scale trains
    # for at least that many optimizer steps whatever the number of images.
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch))

    # Where to start: the beginning, or the checkpoint's epoch and step within it.
    first_epoch, first_step, epoch_loss, seconds = 0, 0, 0.0, 0.0
    history: list[float] = []
    resume = checkpoint.progress if checkpoint is not None else None
    if resume is not None and resume.get("scale") == p:
        assert checkpoint is not None and checkpoint.resumed is not None
        tensors = checkpoint.resumed.tensors
        for m, s in enumerate(students):
            s.load_state_dict(prefixed(tensors, f"student.p{p}.{m}"))
        load_optimizer(opt, tensors, f"adam.p{p}")
        first_epoch, first_step = resume["epoch"], resume["step"]
        epoch_loss, seconds = resume["epoch_loss"], resume["seconds"]
        history = list(resume["history"])
        saved_ranks = resume.get("ranks", 1)
        if saved_ranks != world.size and first_step:
            # Another number of processes splits an epoch into other steps: continue at the
            # same share of the epoch (the rest of it is sampled anew, so not bit-identical).
            first_step = min(steps_per_epoch,
                             round(first_step * steps_per_epoch / resume["steps_per_epoch"]))
            reporter.note(f"p={p}: the checkpoint was made on {saved_ranks} process(es), this "
                          f"run has {world.size}; continuing at step {first_step} of "
                          f"{steps_per_epoch} of epoch {first_epoch + 1}")

    def where(epoch: int, step: int) -> str:
        if step == 0:
            return f"p={p} after epoch {epoch} of {epochs}"
        return f"p={p}, epoch {epoch + 1} of {epochs} after step {step} of {steps_per_epoch}"

    def save(epoch: int, step: int) -> None:
        # epoch, step: the epoch in progress (0-based) and the steps of it already done.
        assert checkpoint is not None
        tensors = optimizer_tensors(opt, f"adam.p{p}")
        for m, s in enumerate(students):
            tensors.update(with_prefix(s.state_dict(), f"student.p{p}.{m}"))
        progress = {"scale": p, "epoch": epoch, "step": step, "epoch_loss": epoch_loss,
                    "history": history, "seconds": seconds + time.perf_counter() - start,
                    "ranks": world.size, "steps_per_epoch": steps_per_epoch}
        checkpoint.save(tensors, progress, where=where(epoch, step))

    task = reporter.task(f"students p={p}", epochs * steps_per_epoch)
    task.advance(first_epoch * steps_per_epoch + first_step)
    start = time.perf_counter()
    for epoch in range(first_epoch, epochs):
        # One stream per (seed, scale, epoch), and per rank beyond the first.
        gen = torch.Generator().manual_seed(
            _seed(settings.seed, p, 1000 + epoch, *([world.rank] if world.rank else [])))
        order = torch.randperm(n, generator=gen).tolist()
        order = (order * math.ceil(per_rank / n))[:per_rank]
        skip = first_step if epoch == first_epoch else 0
        if skip == 0:
            epoch_loss = 0.0
        stop = False
        for step in range(steps_per_epoch):
            b = step * cfg.batch_size
            idx = order[b:b + cfg.batch_size]
            corners = _crops(len(idx), size, crop, gen)
            if step < skip:
                continue  # done before the checkpoint: only its draws are replayed
            rf = teacher.receptive_field
            x = torch.stack([padded[i, :, r:r + span + rf - 1, c:c + span + rf - 1]
                             for i, (r, c) in zip(idx, corners, strict=True)])
            t = torch.stack([targets[i, :, r:r + span, c:c + span]
                             for i, (r, c) in zip(idx, corners, strict=True)]).float()
            with _autocast(device, cfg.precision):
                outs = ensemble(x)
            losses = [(o.float() - t).pow(2).sum(1).mean() for o in outs]
            loss = torch.stack(losses).sum()
            if world.any(not bool(torch.isfinite(loss)), device):
                raise TrainingError(
                    f"non-finite student loss at p={p}, epoch {epoch + 1} of {epochs}, "
                    f"step {step + 1} of {steps_per_epoch}; lower students.lr and start again "
                    f"(without --resume); {last_good(checkpoint)}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            epoch_loss += loss.item() / len(students) * len(idx)
            task.advance(1, epoch=epoch + 1, loss=loss.item() / len(students))
            stop = checkpoint is not None and world.any(checkpoint.stop.poll(), device)
            if stop and checkpoint is not None and step + 1 < steps_per_epoch:
                save(epoch, step + 1)
                raise checkpoint.interrupted(where(epoch, step + 1))
        history.append(float(world.sum(torch.tensor([epoch_loss], dtype=torch.float64,
                                                     device=device)).item())
                       / (per_rank * world.size))
        if checkpoint is not None and epoch + 1 < epochs and (
                stop or (epoch + 1) % checkpoint.every == 0):
            save(epoch + 1, 0)
            if stop:
                raise checkpoint.interrupted(where(epoch + 1, 0))
    task.done()
    for s in students:
        s.eval().requires_grad_(False)
    scale = Scale(p, teacher, students, mean.to(device), std.to(device))
    return scale, {"loss_per_epoch": history, "epochs": epochs,
                   "seconds": round(seconds + time.perf_counter() - start, 2)}


class _Ensemble(nn.Module):
    """The M students of a scale as one module (what DDP wraps): x → their M outputs."""

    def __init__(self, students: Sequence[PatchNetwork]) -> None:
        super().__init__()
        self.students = nn.ModuleList(students)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [s.dense_valid(x) for s in self.students]


def _autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast for the networks (losses stay in fp32), or a disabled context; ``auto``
    is bf16 only where the device computes it natively (:func:`stad.devices.resolve_precision`)."""
    bf16 = resolve_precision(precision, device) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


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
    checkpoint: Checkpoint | None = None,
    world: World = SINGLE,
) -> FitResult:
    """Fit the students of every scale in ``settings.students.patch_sizes``.

    In a distributed run every rank reads only its shard of ``fit_samples``, and at the end
    the ranks compare a digest of their weights (a mismatch is a :class:`TrainingError`).

    With ``checkpoint`` (see :func:`train_scale`) the scales the resumed checkpoint finished are
    taken from it, and a checkpoint is also saved after every scale but the last.

    Raises:
        DataError: no images. TrainingError: a non-finite loss. Interrupted: a stop was
        requested (after saving the checkpoint).
    """
    cfg = settings.students
    if not fit_samples:
        raise DataError("no training images to fit on")
    size = cfg.image_size
    if len(fit_samples) < world.size:
        raise DataError(f"{len(fit_samples)} training images cannot be shared by {world.size} "
                        "processes: run on fewer")
    images = load_batch(world.shard(fit_samples), size)
    scales: dict[int, Scale] = {}
    # What the networks computed in: "auto" resolved for this device.
    info: dict[str, Any] = {"scales": {}, "precision": resolve_precision(cfg.precision, device)}
    for k, p in enumerate(cfg.patch_sizes):
        name = f"p{p}"
        done = checkpoint.resumed_scale(name) if checkpoint is not None else None
        if done is not None:
            assert checkpoint is not None and checkpoint.resumed is not None
            scale, scale_info = _finished_scale(teachers[p], checkpoint.resumed.tensors,
                                                cfg.n_students, device), done
        else:
            scale, scale_info = train_scale(teachers[p], images, settings, reporter=reporter,
                                            device=device, checkpoint=checkpoint, world=world)
            reporter.note(f"p={p}: final loss {scale_info['loss_per_epoch'][-1]:.4g} "
                          f"({scale_info['seconds']:.0f} s)")
        scales[p] = scale
        info["scales"][name] = scale_info
        if checkpoint is not None:
            checkpoint.finish(name, _scale_tensors(scale), scale_info)
            if done is None and k + 1 < len(cfg.patch_sizes):
                where = f"the end of scale p={p}"
                checkpoint.save({}, None, where=where)
                if checkpoint.stop.requested:
                    raise checkpoint.interrupted(where)
    if world.size > 1:
        digest = tensors_sha256({k: v for s in scales.values()
                                 for k, v in _scale_tensors(s).items()})
        digests = world.gather(digest)
        if len(set(digests)) != 1:
            raise TrainingError(f"the {world.size} processes ended with different weights "
                                f"({', '.join(d[:12] for d in digests)}); this is a bug, "
                                "please report it with the command line")
        info["distributed"] = {"ranks": world.size, "backend": world.backend,
                               "weights_sha256": digest}
    preprocessing = {"image_size": size, "mean": list(DEFAULT_MEAN), "std": list(DEFAULT_STD)}
    return FitResult(Networks(scales=scales, preprocessing=preprocessing), info)


def _scale_tensors(scale: Scale) -> dict[str, torch.Tensor]:
    """A finished scale's students and normalization, named as in the model artifact."""
    p = scale.patch_size
    out: dict[str, torch.Tensor] = {}
    for m, student in enumerate(scale.students):
        out.update(with_prefix(student.state_dict(), f"student.p{p}.{m}"))
    assert scale.mean is not None and scale.std is not None
    out[f"norm.p{p}.mean"], out[f"norm.p{p}.std"] = scale.mean, scale.std
    return out


def _finished_scale(teacher: PatchNetwork, tensors: dict[str, torch.Tensor], n_students: int,
                    device: torch.device) -> Scale:
    """A scale a checkpoint holds as finished, as :func:`train_scale` would have returned it."""
    p = teacher.patch_size
    students = []
    for m in range(n_students):
        net = build_network(p, teacher.out_dim)
        net.load_state_dict(prefixed(tensors, f"student.p{p}.{m}"))
        students.append(net.to(device).eval().requires_grad_(False))
    return Scale(p, teacher.to(device).eval().requires_grad_(False), students,
                 tensors[f"norm.p{p}.mean"].to(device), tensors[f"norm.p{p}.std"].to(device))

