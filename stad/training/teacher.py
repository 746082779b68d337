"""``stad pretrain-teacher``: pretrain one teacher per patch size on random patches
(docs/method.md §3).

(Long because one scale's loop, :class:`_ScaleRun`, and the run over the scales share the
checkpoint format documented here; the losses and targets live in
:mod:`stad.training.losses` and :mod:`stad.training.targets`.)

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

With a :class:`~stad.training.checkpoint.Checkpoint` the state (weights, Adam, the
generator's state and the losses so far) is saved every ``checkpoint_every`` iterations,
after every scale but the last, and when a stop is requested; a resumed run continues to the
same weights, bit for bit on the same machine.
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
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stad.artifacts import file_sha256, prefixed, with_prefix
from stad.backbones import EfficientNetLite
from stad.config import Settings, TeacherSettings
from stad.console import NULL_REPORTER, Reporter, warn
from stad.datasets.base import Sample
from stad.devices import autocast, resolve_precision
from stad.diagnostics import collapse_warnings, teacher_diagnostics
from stad.distillation import BACKBONES, blocks_for, describe, load_backbone
from stad.distributed import SINGLE, World
from stad.errors import ArtifactError, DataError, TrainingError, UsageError
from stad.handcrafted import BLOCKS
from stad.handcrafted import DIM as HANDCRAFTED_DIM
from stad.images import preprocessing as image_preprocessing
from stad.model import RANDOM_TEACHER, load_teachers, resolve_teachers, teacher_path
from stad.networks import DESCRIPTOR_DIM, Decoder, PatchNetwork, build_network
from stad.training.checkpoint import (
    Checkpoint,
    check_finite,
    load_optimizer,
    optimizer_tensors,
    save_or_stop,
    stop_requested,
    tensors_sha256,
)
from stad.training.imagebuffer import ImageBuffer, ImageSource, load_images
from stad.training.losses import compactness_loss, triplet_loss, variance_loss
from stad.training.targets import Distillation, crop, resnet18_features, resolve_target

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


# --- training ----------------------------------------------------------------------------------


def _lambdas(cfg: TeacherSettings, distillation: bool) -> dict[str, float]:
    metric = cfg.lambda_metric
    if metric is None:
        metric = 0.0 if distillation else 1.0
    return {"kd": cfg.lambda_kd if distillation else 0.0, "metric": float(metric),
            "compact": cfg.lambda_compact, "variance": cfg.lambda_variance}


def _generator(seed: int, patch_size: int, *rank_and_start: int) -> torch.Generator:
    # A stable stream per (seed, scale), independent of Python's hash seed and the global RNG;
    # ranks > 0 of a distributed run add (rank, first iteration). The "stad.teacher" prefix is
    # a fixed salt (the module's old name): changing it would change every seeded teacher.
    key = ":".join(str(k) for k in (seed, patch_size, *rank_and_start))
    digest = hashlib.sha256(f"stad.teacher:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


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


TERMS = ("kd", "metric", "compact", "variance")


class _ScaleRun:
    """The pretraining of one scale's teacher on patches of the images in ``buffer`` (this
    rank's share of the training images; refreshed every iteration when they do not all fit).

    In a distributed run every rank starts from the same weights, draws its own patches
    (ranks > 0 from a stream of their own, and with a buffer of their own, both started
    afresh on a resume), the distillation target is standardized as rank 0 estimates it
    (:class:`~stad.training.targets.Distillation`), and DDP averages the gradients.

    ``target`` is the resolved distillation target; distillation runs when ``lambdas["kd"]`` >
    0. With ``checkpoint``: continues its scale in progress if it is this one, saves every
    ``checkpoint.every`` iterations but the last, and saves and raises
    :class:`~stad.errors.Interrupted` after an iteration at which ``checkpoint.stop.poll()`` is
    true (but the last).
    """

    def __init__(self, p: int, buffer: ImageBuffer, settings: Settings,
                 lambdas: dict[str, float], target: str, backbone: nn.Module | None, *,
                 device: torch.device, checkpoint: Checkpoint | None, world: World,
                 init: PatchNetwork | None = None) -> None:
        self.p, self.buffer, self.cfg, self.lambdas = p, buffer, settings.teacher, lambdas
        self.device, self.checkpoint, self.world, self.seed = device, checkpoint, world, \
            settings.seed
        self.gen = _generator(settings.seed, p)
        # Drawn from the generator even when ``init`` replaces the weights, so that the
        # patches drawn next are the same either way.
        self.teacher = build_network(p, generator=self.gen).to(device).train()
        if init is not None:
            self.teacher.load_state_dict(init.state_dict())
        buffer.start()  # the first images of the share (a resumed buffer is restored below)
        self.kd = Distillation(p, buffer.images, self.cfg, settings.seed, target, backbone,
                               lambdas["kd"], generator=self.gen, device=device, world=world)
        params = list(self.teacher.parameters())
        if self.kd.decoder is not None:
            params += list(self.kd.decoder.parameters())
        # What DDP wraps (teacher and decoder, one forward); a plain run calls it directly.
        self.step: nn.Module = _Pretrainee(self.teacher, self.kd.decoder)
        if world.size > 1:
            self.step = DistributedDataParallel(
                self.step, device_ids=[device.index] if device.type == "cuda" else None)
        # fused: one kernel per step instead of a dozen element-wise passes (faster on CPU too).
        self.opt = torch.optim.Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                    fused=device.type in ("cpu", "cuda"))
        self.history: list[float] = []
        self.terms: dict[str, list[float]] = {k: [] for k in TERMS}
        self.first, self.seconds, self.start = 0, 0.0, time.perf_counter()

    def resume(self) -> None:
        """Continue the checkpoint's scale in progress if it is this one. The networks were
        built from the fresh generator (drawing their init from it), as in an uninterrupted
        run; now weights, Adam and the generator continue."""
        resume = self.checkpoint.progress if self.checkpoint is not None else None
        if resume is None or resume.get("scale") != self.p:
            return
        assert self.checkpoint is not None and self.checkpoint.resumed is not None
        p, cfg = self.p, self.cfg
        if resume["iteration"] > cfg.iterations:
            raise UsageError(f"the checkpoint has trained p={p} for {resume['iteration']} "
                             f"iterations, more than teacher.iterations {cfg.iterations}: "
                             f"resume with --iterations {resume['iteration']} or more (in Python: "
                             f"teacher={{'iterations': {resume['iteration']}}})")
        tensors = self.checkpoint.resumed.tensors
        self.teacher.load_state_dict(prefixed(tensors, f"teacher.p{p}"))
        if self.kd.decoder is not None:
            self.kd.decoder.load_state_dict(prefixed(tensors, f"decoder.p{p}"))
        load_optimizer(self.opt, tensors, f"adam.p{p}")
        self.gen.set_state(tensors[f"generator.p{p}"].clone())
        state = tensors.get(f"buffer.p{p}")  # absent when the saving run did not stream
        if self.buffer.streaming and self.world.main and state is not None:
            self.buffer.start(state)
            self.kd.update(self.buffer.images, range(self.buffer.images.shape[0]))
        self.first, self.seconds = resume["iteration"], resume["seconds"]
        losses = tensors[f"losses.p{p}"].tolist()  # (first, 4 or 5): total, kd, metric, …
        self.history = [row[0] for row in losses]
        for j, key in enumerate(TERMS, start=1):
            self.terms[key] = [row[j] if j < len(row) else 0.0 for row in losses]

    def save(self, done: int) -> str:
        """Checkpoint the scale after ``done`` iterations; returns where that is, in words."""
        assert self.checkpoint is not None
        p = self.p
        # total, kd, metric, compact (the format before Lv), then variance only when it is on.
        keys = ["kd", "metric", "compact"] + (["variance"] if self.lambdas["variance"] > 0
                                               else [])
        tensors = {**with_prefix(self.teacher.state_dict(), f"teacher.p{p}"),
                   **optimizer_tensors(self.opt, f"adam.p{p}"),
                   f"generator.p{p}": self.gen.get_state(),
                   f"losses.p{p}": torch.tensor([self.history, *(self.terms[k] for k in keys)],
                                                dtype=torch.float64).T}
        if self.kd.decoder is not None:
            tensors.update(with_prefix(self.kd.decoder.state_dict(), f"decoder.p{p}"))
        if self.buffer.streaming:
            tensors[f"buffer.p{p}"] = self.buffer.state()
        where = f"p={p} after iteration {done} of {self.cfg.iterations}"
        elapsed = self.seconds + time.perf_counter() - self.start
        self.checkpoint.save(tensors, {"scale": p, "iteration": done, "seconds": elapsed},
                             where=where)
        return where

    def draw(self) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor | None]:
        """One batch: anchors (and with metric learning positives and negatives), the anchors'
        image indices and corners, and the negatives' images. Every index and the noise come
        from the scale's CPU generator, then move to the device."""
        images, gen, p, batch, dev = (self.buffer.images, self.gen, self.p, self.cfg.batch_size,
                                      self.device)
        n = images.shape[0]
        corners = images.shape[-1] - p + 1  # top-left corners per axis at which a patch fits
        idx = torch.randint(n, (batch,), generator=gen)
        rows = torch.randint(corners, (batch,), generator=gen)
        cols = torch.randint(corners, (batch,), generator=gen)
        parts = [crop(images, idx.to(dev), rows.to(dev), cols.to(dev), p)]
        if self.lambdas["metric"] <= 0:
            return parts, idx, rows, cols, None
        # p⁺: the same location moved by up to `shift` pixels (kept inside the image) plus
        # noise; p⁻: a random patch of another image (n ≥ 2 is checked by the caller).
        shift = self.cfg.positive_shift
        rows_pos = rows + torch.randint(-shift, shift + 1, (batch,), generator=gen)
        cols_pos = cols + torch.randint(-shift, shift + 1, (batch,), generator=gen)
        noise = torch.randn(batch, 3, p, p, generator=gen) * self.cfg.positive_noise
        other = (idx + torch.randint(1, n, (batch,), generator=gen)) % n
        rows_neg = torch.randint(corners, (batch,), generator=gen)
        cols_neg = torch.randint(corners, (batch,), generator=gen)
        parts.append(crop(images, idx.to(dev), rows_pos.clamp(0, corners - 1).to(dev),
                          cols_pos.clamp(0, corners - 1).to(dev), p) + noise.to(dev))
        parts.append(crop(images, other.to(dev), rows_neg.to(dev), cols_neg.to(dev), p))
        return parts, idx, rows, cols, other

    def losses(self, parts: list[torch.Tensor], idx: torch.Tensor, rows: torch.Tensor,
               cols: torch.Tensor, other: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Each unweighted term of the loss on one batch (zero where its weight is)."""
        cfg, dev, batch = self.cfg, self.device, self.cfg.batch_size
        # One forward for anchors, positives and negatives: (len(parts)·B, d), and the
        # anchors decoded for distillation.
        with autocast(dev, cfg.precision):  # the networks in bf16 if asked; losses in fp32
            flat, decoded = self.step(torch.cat(parts), batch)
        flat = flat.float()
        decoded = decoded.float() if decoded is not None else None
        desc = flat.split(batch)
        zero = desc[0].new_zeros(())
        kd = self.kd.loss(decoded, parts[0], idx.to(dev), rows.to(dev), cols.to(dev))
        out = {"kd": zero if kd is None else kd, "metric": zero, "compact": zero,
               "variance": zero}
        if other is not None:
            hardest = cfg.triplet_negatives == "hardest"
            exclude = (other[None, :] == idx[:, None]).to(dev) if hardest else None
            out["metric"] = triplet_loss(desc[0], desc[1], desc[2], margin=cfg.triplet_margin,
                                         normalize=cfg.descriptor_norm, hardest=hardest,
                                         exclude=exclude)
        if self.lambdas["compact"] > 0:
            out["compact"] = compactness_loss(desc[0], squared=cfg.compactness == "squared")
        if self.lambdas["variance"] > 0:
            # On the descriptors as the triplet sees them: normalized × sqrt(d) or raw.
            anchors = (F.normalize(desc[0], dim=1) * math.sqrt(desc[0].shape[1])
                       if cfg.descriptor_norm else desc[0])
            out["variance"] = variance_loss(anchors)
        return out

    def iteration(self, it: int) -> float:
        """One optimizer step; returns the loss."""
        terms = self.losses(*self.draw())
        loss = sum((self.lambdas[k] * terms[k] for k in TERMS), terms["kd"].new_zeros(()))
        value = loss.item()
        check_finite(math.isfinite(value), self.world, self.device, self.checkpoint,
                     f"non-finite teacher loss at p={self.p}, iteration {it + 1} of "
                     f"{self.cfg.iterations} (" + ", ".join(
                         f"{k} {terms[k].item():.4g}" for k in TERMS) + "); lower teacher.lr "
                     "or check the images and start again (without resuming)")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.history.append(value)
        for k in TERMS:
            self.terms[k].append(terms[k].item())
        return value

    def run(self, reporter: Reporter) -> tuple[PatchNetwork, dict[str, Any]]:
        self.resume()
        if self.world.rank:
            self.gen = _generator(self.seed, self.p, self.world.rank, self.first)
        total = self.cfg.iterations
        task = reporter.task(f"teacher p={self.p}", total)
        task.advance(self.first)
        self.start = time.perf_counter()
        positions = list(self.buffer.positions)
        for it in range(self.first, total):
            self.buffer.refresh(self.gen)  # streams only: new images into slots drawn by gen
            if self.buffer.positions != positions:
                self.kd.update(self.buffer.images, [
                    k for k, (a, b) in enumerate(zip(positions, self.buffer.positions,
                                                     strict=True)) if a != b])
                positions = list(self.buffer.positions)
            task.advance(1, loss=self.iteration(it))
            save_or_stop(self.checkpoint,
                         stop=stop_requested(self.checkpoint, self.world, self.device),
                         last=it + 1 == total, due=self.checkpoint is not None
                         and (it + 1) % self.checkpoint.every == 0,
                         save=lambda done=it + 1: self.save(done))
        task.done()
        return self.teacher.cpu().eval().requires_grad_(False), self.info()

    def info(self) -> dict[str, Any]:
        self.seconds += time.perf_counter() - self.start
        info: dict[str, Any] = {
            "first": self.history[0],
            "last": self.history[-1],
            "curve": _curve(self.history),
            # Each unweighted term, averaged over the last 1/20 of the run: which dominates.
            "terms": {k: _curve(v)[-1] for k, v in self.terms.items()},
            "seconds": round(self.seconds, 3),
        }
        if self.buffer.streaming:
            info["skipped"] = skipped = self.buffer.skipped()
            if skipped["count"]:
                warn(f"teacher p={self.p}: skipped {skipped['count']} unreadable image(s) of "
                     f"the stream, first: {'; '.join(skipped['first'])}")
        return info


def diagnose(net: PatchNetwork, images: torch.Tensor, settings: Settings,
             n_patches: int | None = None) -> dict[str, Any]:
    """Diagnostics of a teacher (``n_patches`` patches, by default
    ``teacher.diagnostic_patches``), with a warning printed per sign of collapse: what
    pretraining reports after each scale and ``stad inspect-teacher`` prints."""
    cfg = settings.teacher
    # The augmented copy must fit inside the image without clamping.
    shift = max(0, min(cfg.positive_shift, (images.shape[-1] - net.patch_size) // 2))
    diag = teacher_diagnostics(net, images, n_patches=n_patches or cfg.diagnostic_patches,
                               shift=shift, noise=cfg.positive_noise, seed=settings.seed)
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
    init: dict[int, PatchNetwork] | None = None,
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
                                 f"{trained} (in Python: teacher={{'iterations': {trained}}})")
            teachers[p] = load_teachers(checkpoint.resumed.tensors, patch_sizes=[p])[p]
            losses[name] = done
        else:
            teachers[p], losses[name] = _ScaleRun(
                p, buffer, settings, lambdas, target, backbone, device=device,
                checkpoint=checkpoint, world=world,
                init=init[p] if init is not None else None).run(reporter)
        if cfg.diagnostic_patches > 1:
            # On the first images of the share, whether or not the scale was resumed.
            buffer.start()
            diagnostics[name] = diagnose(teachers[p], buffer.images, settings)
        if checkpoint is not None:
            checkpoint.finish(name, with_prefix(teachers[p].state_dict(), f"teacher.{name}"),
                              losses[name])
            if done is None and k + 1 < len(cfg.patch_sizes):
                where = f"the end of scale p={p}"
                checkpoint.save({}, None, where=where)
                if checkpoint.stop.requested:
                    raise checkpoint.interrupted(where)
    return teachers, losses, diagnostics


def _initial_teachers(cfg: TeacherSettings
                      ) -> tuple[dict[int, PatchNetwork] | None, dict[str, Any] | None]:
    """The teachers ``teacher.init`` names (one per scale of this run) and their provenance:
    the file, its SHA-256, and what its own info says it was trained on; (None, None)
    without ``init``."""
    if cfg.init is None:
        return None, None
    if cfg.init == RANDOM_TEACHER:
        raise UsageError("teacher.init takes a teacher artifact or 'builtin'; leave it unset "
                         "for a random initialization")
    path = teacher_path(cfg.init)
    try:
        nets, source, info = resolve_teachers(cfg.init, cfg.patch_sizes, seed=0)
    except ArtifactError as exc:
        text = str(exc)
        raise ArtifactError(text if str(path) in text
                            else f"teacher.init (--init) {path}: {text}") from None
    for p, net in nets.items():
        # The one thing a stored teacher of the same p can differ in (stad.model._load_net).
        if net.out_dim != DESCRIPTOR_DIM:
            raise ArtifactError(f"teacher.init (--init) {path}: its p={p} teacher gives "
                                f"{net.out_dim}-d descriptors, pretrain-teacher trains "
                                f"{DESCRIPTOR_DIM}-d ones; "
                                "leave teacher.init (--init) unset")
    return nets, {"source": source["source"], "sha256": file_sha256(path),
                  "target": info.get("target"),
                  "iterations": {f"p{p}": trained_iterations(info, p) for p in nets}}


def trained_iterations(info: dict[str, Any], p: int) -> int | None:
    """How many iterations a teacher artifact's scale ``p`` was pretrained for, counting the
    teachers it was started from (``init``), from its info: a ``pretrain-teacher`` artifact's,
    or one built by benchmarks/default_teacher.py (per scale, under ``scales``). None where
    the info does not say."""
    def obj(value: Any) -> dict[str, Any]:  # metadata of another shape says nothing
        return value if isinstance(value, dict) else {}

    def count(value: Any) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    entry = obj(obj(info.get("scales")).get(f"p{p}")) or info
    own = count(entry.get("iterations"))
    if own is None:
        return None
    start = entry.get("init")
    if not start:
        return own
    before = count(obj(obj(start).get("iterations")).get(f"p{p}"))
    return own + before if before is not None else None


def _backbone(cfg: TeacherSettings, target: str, device: torch.device, reporter: Reporter
              ) -> tuple[nn.Module | None, dict[str, str] | None]:
    """The frozen network distillation reads (ResNet-18 or EfficientNet-Lite) and its
    provenance, refusing settings that cannot be honoured before any training."""
    if cfg.target_whiten and target != "handcrafted":
        raise UsageError(f"teacher.target_whiten (--target-whiten) applies to the handcrafted "
                         f"target, not {target}: drop it or choose --target handcrafted")
    if target == "resnet18" and cfg.backbone_weights is None:
        raise UsageError("teacher target resnet18 distils a ResNet-18 read from a local file: "
                         "pass --backbone-weights FILE, or choose --target handcrafted (no "
                         "download) or none")
    if target == "resnet18" and cfg.lambda_kd > 0:
        assert cfg.backbone_weights is not None
        net, sha256 = resnet18_features(cfg.backbone_weights)
        return net.to(device), {"path": str(Path(cfg.backbone_weights).absolute()),
                                "sha256": sha256}
    if target in BACKBONES and cfg.lambda_kd > 0:
        lite, info = load_backbone(target, cfg.backbone_weights)
        lite = lite.to(device)
        for p in cfg.patch_sizes:
            blocks_for(p, lite, cfg.target_blocks)  # refused before any training
        return lite, info
    if target not in ("resnet18", *BACKBONES) and cfg.backbone_weights is not None:
        reporter.note(f"teacher target is {target}: the backbone weights are not used")
    return None, None


def _note_distillation(target: str, distillation: bool, lambdas: dict[str, float],
                       reporter: Reporter) -> None:
    """Say when distillation is off, and refuse a loss that is all zero."""
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


def _check_counts(lambdas: dict[str, float], count: int, world: World) -> None:
    if lambdas["metric"] > 0 and count < 2 * world.size:
        raise DataError("metric learning draws its negative patches from another image, but "
                        f"there is only one image{' per process' if world.size > 1 else ''}; "
                        "add images or set teacher.lambda_metric = 0")
    if count < world.size:
        raise DataError(f"{count} images cannot be shared by {world.size} processes: "
                        "run on fewer")


def _same_teachers(teachers: dict[int, PatchNetwork], world: World) -> dict[str, Any] | None:
    """In a distributed run, check that every rank ended with the same weights."""
    if world.size == 1:
        return None
    digest = tensors_sha256({f"p{p}.{k}": v for p, net in teachers.items()
                             for k, v in net.state_dict().items()})
    digests = world.gather(digest)
    if len(set(digests)) != 1:
        raise TrainingError(f"the {world.size} processes ended with different teachers "
                            f"({', '.join(d[:12] for d in digests)}); this is a bug, "
                            "please report it with the command line")
    return {"ranks": world.size, "backend": world.backend, "weights_sha256": digest}


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

    ``samples`` may be an :class:`~stad.training.imagebuffer.ImageSource` that lists them again on
    demand (a large collection): when more than ``teacher.buffer_images`` images fall to a
    process, patches come from a buffer of that many decoded images, ``teacher.buffer_refresh``
    of which are replaced by the next images of the stream at every iteration
    (:mod:`stad.training.imagebuffer`). In a distributed run (``world``) every rank reads only its
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
            ``init`` (with ``teacher.init``: {"source", "sha256", "target", "iterations"},
            the starting teacher's target and, per scale, the iterations it had been trained
            for, its own starting teachers' included: :func:`trained_iterations`; else None),
            ``diagnostics`` ({"p17": figures and "warnings"}, empty when off), ``data``
            ({"n_images", "image_size"}), ``iterations``, ``batch_size``, ``seconds``.

    Raises:
        UsageError: patch sizes larger than ``image_size``, all loss weights zero, target
            resnet18 without a backbone file, a missing backbone file. ArtifactError: an
            unusable backbone file, or a ``teacher.init`` that is missing, not a teacher or
            model, lacks a scale of this run or has another architecture. DataError: no
            images, unreadable images (a stream skips them, counted in
            ``losses[pP]["skipped"]``), or one image with metric learning on.
            TrainingError: a non-finite loss (naming the scale, the iteration and the last
            good checkpoint).
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
    init, init_info = _initial_teachers(cfg)
    target = resolve_target(cfg)
    backbone, backbone_info = _backbone(cfg, target, device, reporter)
    distillation = target != "none" and cfg.lambda_kd > 0
    lambdas = _lambdas(cfg, distillation)
    _note_distillation(target, distillation, lambdas, reporter)
    _check_counts(lambdas, source.count, world)

    start = time.perf_counter()
    buffer = ImageBuffer(source, size=cfg.image_size, capacity=cfg.buffer_images,
                         refresh=cfg.buffer_refresh, world=world, device=device,
                         reporter=reporter)
    with buffer:
        teachers, losses, diagnostics = _pretrain_scales(
            settings, buffer, lambdas, target, backbone, reporter=reporter, device=device,
            checkpoint=checkpoint, world=world, init=init)
    distributed = _same_teachers(teachers, world)
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
        "data": {"n_images": source.count, "streamed": buffer.streaming,
                 **image_preprocessing(cfg.image_size)},
        "iterations": cfg.iterations,
        "init": init_info,
        "batch_size": cfg.batch_size,
        "precision": resolve_precision(cfg.precision, device),
        "seconds": round(time.perf_counter() - start, 3),
    }
