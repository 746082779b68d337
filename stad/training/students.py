"""``stad fit-students``: train M students per scale to regress the teacher (docs/method.md §4).

(Somewhat over 400 lines: the data split, the targets, one scale's fit and the run over the
scales share the checkpoint format described below.)

Per scale: the frozen teacher's dense descriptors of every training image are computed once
(not once per student and epoch; twice for the batches whose float32 outputs do not fit in half
the available memory, :func:`teacher_targets`), their per-channel mean and std give the
normalization, and the normalized targets are kept in memory in float16. The M students of a
scale are trained together, each on its own loss, mean over pixels of ‖S_i(x) − (y − μ)/σ‖²:
one Adam over all their parameters is the same as M separate ones, because no parameter is
shared.

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
import os
import time
from collections.abc import Callable, Sequence
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
from stad.devices import autocast, available_memory, resolve_precision
from stad.distributed import SINGLE, World
from stad.errors import DataError, TrainingError
from stad.images import DEFAULT_MEAN, DEFAULT_STD, load_image, to_tensor
from stad.images import preprocessing as image_preprocessing
from stad.model import PADDING, Networks, Scale, reduce_to, scale_name, scale_tensors
from stad.networks import PatchNetwork, build_network
from stad.training.checkpoint import (
    Checkpoint,
    check_finite,
    load_optimizer,
    optimizer_tensors,
    save_or_stop,
    stop_requested,
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
                    world: World = SINGLE, hold_bytes: int | None = None,
                    note: Callable[[str], None] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalized teacher descriptors of every image, and the normalization (docs/method.md §4).

    In a distributed run ``images`` is this rank's shard; the mean and std are over the
    images of all ranks (their sums are added up), so every rank normalizes alike.

    One teacher pass gives the statistics; its float32 outputs are held for the normalization
    while they fit in ``hold_bytes`` (None: :func:`_hold_budget`, at most half the memory
    available on the device), and the batches from the first that does not fit on are computed
    again afterwards. On one device the targets are the same bytes whatever the budget: a batch
    computed again is the same computation (tested on the CPU). Holding every output regardless
    peaked at three times the targets' memory (13.4 GiB for 200 images at 256²); computing all
    of them twice took 9 more minutes. ``note`` is told how many were computed twice, if any.

    Returns:
        targets (N, D, H, W) float16, mean (D,), std (D,) over all pixels of all images.
    """
    d = teacher.out_dim
    shape = (len(images), d, *images.shape[-2:])
    if hold_bytes is None:
        hold_bytes = _hold_budget(images.device, world, math.prod(shape) * 2)

    def output(i: int) -> torch.Tensor:
        return teacher.dense(images[i:i + batch], padding_mode=PADDING)

    starts = range(0, len(images), batch)
    total = torch.zeros(d, dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    count, held_bytes, holding = 0, 0, True
    held: dict[int, torch.Tensor] = {}
    for i in starts:
        y = output(i)
        total += y.double().sum((0, 2, 3)).cpu()
        total_sq += y.double().pow(2).sum((0, 2, 3)).cpu()
        count += y.shape[0] * y.shape[2] * y.shape[3]
        size = y.numel() * y.element_size()
        holding = holding and held_bytes + size <= hold_bytes
        if holding:
            held[i], held_bytes = y, held_bytes + size
    counts = torch.tensor([float(count)], dtype=torch.float64)
    sums = world.sum(torch.cat([total, total_sq, counts]).to(images.device)).cpu()
    total, total_sq, count = sums[:d], sums[d:2 * d], float(sums[-1])
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(0).sqrt()
    # A dead channel (constant output) would divide by zero; give it unit scale instead.
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    m = mean.float().view(1, -1, 1, 1).to(images.device)
    s = std.float().view(1, -1, 1, 1).to(images.device)
    n_held = sum(len(y) for y in held.values())
    if note is not None and n_held < len(images):
        note(f"the teacher's outputs of {len(images) - n_held} of {len(images)} images did not "
             f"fit in the memory set aside for them ({hold_bytes / 2**30:.1f} GiB) and are "
             "computed a second time; more free memory makes the fit faster")
    targets = torch.empty(shape, dtype=torch.float16, device=images.device)
    for i in starts:
        # popped, so that each held output is freed as soon as it is written
        y = held.pop(i) if i in held else output(i)
        targets[i:i + len(y)] = ((y - m) / s).half()
        del y
    return targets, mean.float(), std.float()


def _hold_budget(device: torch.device, world: World, targets_bytes: int) -> int:
    """Bytes of teacher outputs :func:`teacher_targets` may hold: half the memory available
    on ``device`` (:func:`stad.devices.available_memory`), and no more than leaves room for
    the targets (``targets_bytes``) beside them. On a CPU the memory is split among the
    processes of the run that share the machine (torchrun's ``LOCAL_WORLD_SIZE``; all of them
    where it is not set); each GPU of a distributed run has its own."""
    available = available_memory(device)
    if device.type != "cuda" and world.size > 1:
        available //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or world.size))
    return max(0, min(available // 2, available - targets_bytes))


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
    image_size: int | None = None,
) -> tuple[Scale, dict[str, Any]]:
    """Fit the students of one scale on standardized images (N, 3, S, S).

    ``image_size``: the scale works on the images reduced to that size
    (:func:`stad.model.reduce_to`; None: as they are).

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
    run = _ScaleFit(teacher, images, settings, device=device, checkpoint=checkpoint,
                    world=world, image_size=image_size, reporter=reporter)
    run.resume(reporter)
    return run.run(reporter)


class _ScaleFit:
    """The M students of one scale and their optimizer, trained epoch by epoch
    (:func:`train_scale`)."""

    def __init__(self, teacher: PatchNetwork, images: torch.Tensor, settings: Settings, *,
                 device: torch.device, checkpoint: Checkpoint | None, world: World,
                 image_size: int | None = None, reporter: Reporter = NULL_REPORTER) -> None:
        cfg = self.cfg = settings.students
        self.seed, self.device, self.checkpoint, self.world = settings.seed, device, \
            checkpoint, world
        self.p = p = teacher.patch_size
        self.image_size, self.name = image_size, scale_name(p, image_size)
        # p=17, or p=17@128 for a scale at another size; its random streams differ by size.
        self.label = _label(p, image_size)
        self.stream = (p,) if image_size is None else (p, image_size)
        images = reduce_to(images, image_size)
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.targets, self.mean, self.std = teacher_targets(
            self.teacher, images.to(device), world=world,
            note=lambda text: reporter.note(f"{self.label}: {text}"))
        # crops are cut with their context
        self.padded = self.teacher.pad(images, padding_mode=PADDING).to(device)
        self.size = size = images.shape[-1]
        self.crop = cfg.crop_size if cfg.crop_size is not None and cfg.crop_size < size else None
        self.students = []
        for m in range(cfg.n_students):
            gen = torch.Generator().manual_seed(_seed(settings.seed, *self.stream, m))
            self.students.append(build_network(p, teacher.out_dim, generator=gen).to(device)
                                 .train())
        self.ensemble: nn.Module = _Ensemble(self.students)
        if world.size > 1:
            self.ensemble = DistributedDataParallel(
                self.ensemble, device_ids=[device.index] if device.type == "cuda" else None)
        self.opt = torch.optim.Adam([q for s in self.students for q in s.parameters()],
                                    lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.n = len(images)
        total = int(world.sum(torch.tensor([self.n], device=device)).item())
        self.per_rank = math.ceil(total / world.size)  # = n in a plain run
        self.steps_per_epoch = math.ceil(self.per_rank / cfg.batch_size)
        # min_steps (the fast preset): a small set gets more epochs, so that every scale trains
        # for at least that many optimizer steps whatever the number of images.
        self.epochs = max(cfg.epochs, math.ceil(cfg.min_steps / self.steps_per_epoch))
        # Where to start: the beginning, or the checkpoint's epoch and step within it.
        self.first_epoch, self.first_step, self.epoch_loss, self.seconds = 0, 0, 0.0, 0.0
        self.history: list[float] = []
        self.start = time.perf_counter()

    def resume(self, reporter: Reporter) -> None:
        resume = self.checkpoint.progress if self.checkpoint is not None else None
        # Checkpoints made before scales at other sizes name the scale by its patch size.
        if resume is None or resume.get("scale") not in (
                self.name, self.p if self.image_size is None else self.name):
            return
        assert self.checkpoint is not None and self.checkpoint.resumed is not None
        tensors = self.checkpoint.resumed.tensors
        for m, s in enumerate(self.students):
            s.load_state_dict(prefixed(tensors, f"student.{self.name}.{m}"))
        load_optimizer(self.opt, tensors, f"adam.{self.name}")
        self.first_epoch, self.first_step = resume["epoch"], resume["step"]
        self.epoch_loss, self.seconds = resume["epoch_loss"], resume["seconds"]
        self.history = list(resume["history"])
        saved_ranks = resume.get("ranks", 1)
        if saved_ranks != self.world.size and self.first_step:
            # Another number of processes splits an epoch into other steps: continue at the
            # same share of the epoch (the rest of it is sampled anew, so not bit-identical).
            self.first_step = min(self.steps_per_epoch, round(
                self.first_step * self.steps_per_epoch / resume["steps_per_epoch"]))
            reporter.note(f"{self.label}: the checkpoint was made on {saved_ranks} process(es), "
                          f"this run has {self.world.size}; continuing at step "
                          f"{self.first_step} of {self.steps_per_epoch} of epoch "
                          f"{self.first_epoch + 1}")

    def where(self, epoch: int, step: int) -> str:
        if step == 0:
            return f"{self.label} after epoch {epoch} of {self.epochs}"
        return (f"{self.label}, epoch {epoch + 1} of {self.epochs} after step {step} of "
                f"{self.steps_per_epoch}")

    def save(self, epoch: int, step: int) -> str:
        """Checkpoint at ``step`` steps into (0-based) ``epoch``; returns where, in words."""
        assert self.checkpoint is not None
        k = self.name
        tensors = optimizer_tensors(self.opt, f"adam.{k}")
        for m, s in enumerate(self.students):
            tensors.update(with_prefix(s.state_dict(), f"student.{k}.{m}"))
        progress = {"scale": k, "epoch": epoch, "step": step, "epoch_loss": self.epoch_loss,
                    "history": self.history,
                    "seconds": self.seconds + time.perf_counter() - self.start,
                    "ranks": self.world.size, "steps_per_epoch": self.steps_per_epoch}
        where = self.where(epoch, step)
        self.checkpoint.save(tensors, progress, where=where)
        return where

    def step(self, idx: list[int], corners: list[tuple[int, int]], epoch: int, step: int
             ) -> float:
        """One optimizer step on the crops at ``corners`` of images ``idx``; the mean loss of
        a student."""
        span = self.crop if self.crop is not None else self.size
        rf = self.teacher.receptive_field
        x = torch.stack([self.padded[i, :, r:r + span + rf - 1, c:c + span + rf - 1]
                         for i, (r, c) in zip(idx, corners, strict=True)])
        t = torch.stack([self.targets[i, :, r:r + span, c:c + span]
                         for i, (r, c) in zip(idx, corners, strict=True)]).float()
        with autocast(self.device, self.cfg.precision):
            outs = self.ensemble(x)
        loss = torch.stack([(o.float() - t).pow(2).sum(1).mean() for o in outs]).sum()
        check_finite(bool(torch.isfinite(loss)), self.world, self.device, self.checkpoint,
                     f"non-finite student loss at {self.label}, epoch {epoch + 1} of "
                     f"{self.epochs}, step {step + 1} of {self.steps_per_epoch}; lower "
                     "students.lr and start again (without resuming)")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(epoch * self.steps_per_epoch + step)
        self.opt.step()
        return loss.item() / len(self.students)

    def lr_at(self, k: int) -> float:
        """The learning rate of (0-based) optimizer step ``k`` of the scale's run: a function
        of ``k`` alone, so a resumed run continues the schedule exactly."""
        return scheduled_lr(k, self.epochs * self.steps_per_epoch, self.cfg.lr,
                            self.cfg.lr_schedule)

    def epoch(self, epoch: int, task: Any) -> bool:
        """The steps of one epoch (those after the checkpoint's, on resume); whether a stop
        was asked for at its last step."""
        cfg, world = self.cfg, self.world
        # One stream per (seed, scale, epoch), and per rank beyond the first.
        gen = torch.Generator().manual_seed(
            _seed(self.seed, *self.stream, 1000 + epoch, *([world.rank] if world.rank else [])))
        order = torch.randperm(self.n, generator=gen).tolist()
        order = (order * math.ceil(self.per_rank / self.n))[:self.per_rank]
        skip = self.first_step if epoch == self.first_epoch else 0
        if skip == 0:
            self.epoch_loss = 0.0
        stop = False
        for step in range(self.steps_per_epoch):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            corners = _crops(len(idx), self.size, self.crop, gen)
            if step < skip:
                continue  # done before the checkpoint: only its draws are replayed
            loss = self.step(idx, corners, epoch, step)
            self.epoch_loss += loss * len(idx)
            task.advance(1, epoch=epoch + 1, loss=loss)
            stop = stop_requested(self.checkpoint, world, self.device)
            save_or_stop(self.checkpoint, stop=stop, last=step + 1 == self.steps_per_epoch,
                         due=False, save=lambda s=step + 1: self.save(epoch, s))
        return stop

    def run(self, reporter: Reporter) -> tuple[Scale, dict[str, Any]]:
        task = reporter.task(f"students {self.label}", self.epochs * self.steps_per_epoch)
        task.advance(self.first_epoch * self.steps_per_epoch + self.first_step)
        self.start = time.perf_counter()
        for epoch in range(self.first_epoch, self.epochs):
            stop = self.epoch(epoch, task)
            self.history.append(float(self.world.sum(torch.tensor(
                [self.epoch_loss], dtype=torch.float64, device=self.device)).item())
                / (self.per_rank * self.world.size))
            save_or_stop(self.checkpoint, stop=stop, last=epoch + 1 == self.epochs,
                         due=self.checkpoint is not None
                         and (epoch + 1) % self.checkpoint.every == 0,
                         save=lambda e=epoch + 1: self.save(e, 0))
        task.done()
        for s in self.students:
            s.eval().requires_grad_(False)
        scale = Scale(self.p, self.teacher, self.students, self.mean.to(self.device),
                      self.std.to(self.device), image_size=self.image_size)
        return scale, {"loss_per_epoch": self.history, "epochs": self.epochs,
                       "seconds": round(self.seconds + time.perf_counter() - self.start, 2)}


class _Ensemble(nn.Module):
    """The M students of a scale as one module (what DDP wraps): x → their M outputs."""

    def __init__(self, students: Sequence[PatchNetwork]) -> None:
        super().__init__()
        self.students = nn.ModuleList(students)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [s.dense_valid(x) for s in self.students]


def scheduled_lr(k: int, total: int, lr: float, schedule: str) -> float:
    """``students.lr_schedule`` at (0-based) step ``k`` of ``total``: ``constant`` is ``lr``;
    ``cosine`` rises linearly over the first 5 % of the steps (at least one) to ``lr``, then
    falls along a half cosine to zero at step ``total``."""
    if schedule == "constant":
        return lr
    warm = max(1, round(0.05 * total))
    if k < warm:
        return lr * (k + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (k - warm) / max(1, total - warm)))


def _label(p: int, image_size: int | None) -> str:
    """A scale in messages: ``p=17``, or ``p=17@128`` for one at another size."""
    return f"p={p}" if image_size is None else f"p={p}@{image_size}"


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
    """Fit the students of every scale in ``settings.students.patch_sizes`` (a scale at
    another image size on the images reduced to it).

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
    scales: dict[str, Scale] = {}
    # What the networks computed in: "auto" resolved for this device.
    info: dict[str, Any] = {"scales": {}, "precision": resolve_precision(cfg.precision, device)}
    for k, (p, scale_size) in enumerate(cfg.scales):
        name = scale_name(p, scale_size)
        label = _label(p, scale_size)
        done = checkpoint.resumed_scale(name) if checkpoint is not None else None
        if done is not None:
            assert checkpoint is not None and checkpoint.resumed is not None
            scale, scale_info = _finished_scale(teachers[p], checkpoint.resumed.tensors,
                                                cfg.n_students, device, scale_size), done
        else:
            scale, scale_info = train_scale(teachers[p], images, settings, reporter=reporter,
                                            device=device, checkpoint=checkpoint, world=world,
                                            image_size=scale_size)
            reporter.note(f"{label}: final loss {scale_info['loss_per_epoch'][-1]:.4g} "
                          f"({scale_info['seconds']:.0f} s)")
        scales[name] = scale
        info["scales"][name] = scale_info
        if checkpoint is not None:
            checkpoint.finish(name, scale_tensors(scale), scale_info)
            if done is None and k + 1 < len(cfg.scales):
                where = f"the end of scale {label}"
                checkpoint.save({}, None, where=where)
                if checkpoint.stop.requested:
                    raise checkpoint.interrupted(where)
    if world.size > 1:
        digest = tensors_sha256({k: v for s in scales.values()
                                 for k, v in scale_tensors(s).items()})
        digests = world.gather(digest)
        if len(set(digests)) != 1:
            raise TrainingError(f"the {world.size} processes ended with different weights "
                                f"({', '.join(d[:12] for d in digests)}); this is a bug, "
                                "please report it with the command line")
        info["distributed"] = {"ranks": world.size, "backend": world.backend,
                               "weights_sha256": digest}
    preprocessing = image_preprocessing(size)
    return FitResult(Networks(scales=scales, preprocessing=preprocessing), info)


def _finished_scale(teacher: PatchNetwork, tensors: dict[str, torch.Tensor], n_students: int,
                    device: torch.device, image_size: int | None = None) -> Scale:
    """A scale a checkpoint holds as finished, as :func:`train_scale` would have returned it."""
    p = teacher.patch_size
    k = scale_name(p, image_size)
    students = []
    for m in range(n_students):
        net = build_network(p, teacher.out_dim)
        net.load_state_dict(prefixed(tensors, f"student.{k}.{m}"))
        students.append(net.to(device).eval().requires_grad_(False))
    return Scale(p, teacher.to(device).eval().requires_grad_(False), students,
                 tensors[f"norm.{k}.mean"].to(device), tensors[f"norm.{k}.std"].to(device),
                 image_size=image_size)
