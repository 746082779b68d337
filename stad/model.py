"""The fitted student–teacher model in memory: per scale a teacher, M students, the teacher's
descriptor normalization and the calibration statistics; and the anomaly maps (docs/method.md §5).

Artifact layout (tensor names in the ``model`` safetensors file; a ``teacher`` file holds only
the ``teacher.*`` entries):

=================================  =========================================================
``teacher.p{P}.convs.{i}.*``        teacher of patch size P
``student.{K}.{m}.convs.{i}.*``     student m of scale K
``norm.{K}.mean`` / ``.std``        (128,) per-channel statistics of the teacher's descriptors
                                    over the training images (docs/method.md §4)
``calib.{K}``                       (4,) e_mean, e_std, v_mean, v_std on validation images
``calib_map.{K}``                   (4, s, s) the same per pixel position of the scale's map
                                    (only after ``stad calibrate --normalize position``)
=================================  =========================================================

A scale K is named ``p{P}`` when it works at the model's image size S, and ``p{P}@{s}`` when
it works on the images reduced to s × s, s a divisor of S (resampled as images are resized:
:func:`reduce_to`): the same teacher then covers S / s times as much of the image. Its map
is upsampled to S × S before the fusion. Scales at two sizes let one model see fine texture
and large structure (docs/model.md, "Scales at their own image size").

How the maps are computed (``Networks.inference``, from the ``score`` settings) never changes
what is stored: images larger than ``tile_size`` are scored in overlapping tiles that give the
untiled map exactly; ``fused`` runs a scale's teacher and students as one grouped network (weights
copied from them, rebuilt when they change); ``precision="bf16"`` runs the networks under bf16
autocast (an approximation; fp32 is exact).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from stad.artifacts import load_artifact, prefixed, record, with_prefix
from stad.config import scale_size_fits
from stad.errors import ArtifactError, UsageError
from stad.handcrafted import gaussian_blur
from stad.images import DEFAULT_MEAN, DEFAULT_STD, check_preprocessing
from stad.networks import (
    PATCH_SIZES,
    FusedNetworks,
    PatchNetwork,
    build_network,
    planned_shapes,
    state_mismatch,
)

PADDING = "reflect"


def scale_name(patch_size: int, image_size: int | None = None) -> str:
    """``p17`` (a scale at the model's image size, ``image_size`` None) or ``p17@128``."""
    return f"p{patch_size}" if image_size is None else f"p{patch_size}@{image_size}"


# The widest descriptor an artifact may hold (the paper's is 128): a bound on what a file can ask
# stad to allocate.
MAX_DESCRIPTOR_DIM = 4096
_SCALE_NAME = re.compile(r"p([1-9]\d*)(?:@([1-9]\d*))?")


def parse_scale_name(name: str) -> tuple[int, int | None]:
    """``"p17"`` → (17, None), ``"p17@128"`` → (17, 128); ValueError for anything else."""
    m = _SCALE_NAME.fullmatch(name)
    if m is None:
        raise ValueError(f"{name!r} is not a scale name (p17, p17@128)")
    return int(m.group(1)), None if m.group(2) is None else int(m.group(2))


def scale_order(name: str) -> tuple[int, int, int]:
    """Sort key of scale names: by patch size, the model-size scale first, then larger sizes."""
    p, size = parse_scale_name(name)
    return (p, 0, 0) if size is None else (p, 1, -size)


def reduce_to(x: torch.Tensor, image_size: int | None) -> torch.Tensor:
    """Images (N, C, S, S) reduced to a scale's ``image_size`` (None: as they are), resampled
    as :func:`stad.images.to_tensor` resizes an image (bilinear, antialiased), so that a scale
    at s × s sees what a model of size s sees of an S × S image.

    Written as two products with constant resampling matrices (:func:`resampling_matrix`)
    rather than an antialiased interpolation, which ONNX export does not know."""
    if image_size is None or x.shape[-1] == image_size:
        return x
    h, w = int(x.shape[-2]), int(x.shape[-1])
    k = w // image_size
    if k < 1 or w != k * image_size or h % k:
        raise ValueError(f"images of {(h, w)} pixels cannot be reduced to {image_size}²: "
                         "the size must divide theirs")
    rows = torch.tensor(resampling_matrix(h, h // k), dtype=x.dtype, device=x.device)
    cols = torch.tensor(resampling_matrix(w, w // k), dtype=x.dtype, device=x.device)
    return rows @ x @ cols.T


@functools.lru_cache(maxsize=32)
def resampling_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 weights of the antialiased bilinear reduction of n_in samples to
    n_out, as ``F.interpolate(..., mode="bilinear", antialias=True, align_corners=False)``
    (and Pillow) compute it: a triangle filter stretched by n_in / n_out, cut at the edges
    and renormalized. Computed in numpy, so that it enters an ONNX export as a constant."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    out = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        taps = np.arange(lo, hi)
        weights = np.clip(1 - np.abs((taps - center + 0.5) / support), 0, None)
        out[i, lo:hi] = weights / weights.sum()
    return out


TTA: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "hflip": ((0, False), (0, True)),
    "vflip": ((0, False), (2, True)),
    "flips": ((0, False), (0, True), (2, True), (2, False)),
    "dihedral": tuple((k, f) for k in range(4) for f in (False, True)),
}
"""Test-time augmentation (``calibrate.tta``): the views of an image whose e and v are
averaged, each a (k, mirror) pair: mirrored left to right if ``mirror``, then turned by k × 90°
counter-clockwise. ``vflip`` is the mirror turned by 180° (upside down); ``flips`` is the
image, its two mirrors and its turn by 180°; ``dihedral`` adds the turns by 90° (square maps
only). Valid where the anomaly-free images look the same under those views (textures); on
an aligned object a mirrored view is itself an anomaly."""


@dataclass(frozen=True)
class Inference:
    """How maps are computed (the ``score`` settings of the same names).

    ``batch_size``: images per network pass. ``tile_size``: images whose height or width
    exceeds it are scored in tiles of at most tile_size × tile_size output pixels (None: never
    tiled); the result is the same.
    """

    batch_size: int = 4
    tile_size: int | None = None
    precision: Literal["fp32", "bf16"] = "fp32"
    fused: bool = False


@dataclass
class Scale:
    """Everything one patch size contributes to the map."""

    patch_size: int
    teacher: PatchNetwork
    students: list[PatchNetwork] = field(default_factory=list)
    mean: torch.Tensor | None = None  # (D,) teacher descriptor mean over training images
    std: torch.Tensor | None = None  # (D,)
    calib: torch.Tensor | None = None  # (4,) e_mean, e_std, v_mean, v_std
    calib_map: torch.Tensor | None = None  # (4, s, s) per position; None: ``calib`` everywhere
    image_size: int | None = None  # the size it works at; None: the model's (module docstring)
    _fused: FusedNetworks | None = field(default=None, init=False, repr=False)
    _fused_key: tuple[Any, ...] = field(default=(), init=False, repr=False)

    @property
    def name(self) -> str:
        """``p17``, or ``p17@128`` for a scale at another size than the model's."""
        return scale_name(self.patch_size, self.image_size)

    def normalized_teacher(self, x: torch.Tensor) -> torch.Tensor:
        """(y − μ)/σ of docs/method.md §4: (N, 3, H, W) → (N, D, H, W)."""
        assert self.mean is not None and self.std is not None
        y = self.teacher.dense(x, padding_mode=PADDING)
        return (y - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def error_and_variance(self, x: torch.Tensor, *, tile_size: int | None = None,
                           precision: str = "fp32", fused: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Regression error e and predictive variance v per pixel (docs/method.md §5).

        e = ‖μ̄ − (y − μ)/σ‖², v = (1/M) Σ‖μ_i‖² − ‖μ̄‖², with μ̄ the mean of the M students'
        outputs μ_i. Returns two (N, H, W) tensors for (N, 3, H, W) images.

        The image is padded once; with ``tile_size`` it is then cut into crops of the padded
        image whose interiors are tile_size × tile_size output tiles, each crop carrying the
        receptive field's context, so every pixel sees exactly the input it sees untiled.
        Tiled images are computed one at a time, so peak memory follows the tile, not the image
        or the batch.
        """
        n, _, h, w = x.shape
        padded = self.teacher.pad(x, padding_mode=PADDING)  # (N, 3, H + rf − 1, W + rf − 1)
        step_h = h if tile_size is None else min(h, tile_size)
        step_w = w if tile_size is None else min(w, tile_size)
        if (step_h, step_w) == (h, w):
            return self._error_and_variance_valid(padded, precision, fused)
        grow = self.teacher.receptive_field - 1
        e = v = None
        for i in range(n):  # one image at a time: a tile is work enough for any batch
            for r in range(0, h, step_h):
                for c in range(0, w, step_w):
                    rows, cols = min(step_h, h - r), min(step_w, w - c)
                    crop = padded[i:i + 1, :, r:r + rows + grow, c:c + cols + grow]
                    te, tv = self._error_and_variance_valid(crop, precision, fused)
                    if e is None or v is None:
                        e, v = te.new_empty((n, h, w)), tv.new_empty((n, h, w))
                    e[i, r:r + rows, c:c + cols] = te[0]
                    v[i, r:r + rows, c:c + cols] = tv[0]
        assert e is not None and v is not None
        return e, v

    def _error_and_variance_valid(self, padded: torch.Tensor, precision: str, fused: bool
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """e and v of the valid region of an already padded input: (N, H', W') each."""
        assert self.mean is not None and self.std is not None
        autocast = torch.autocast(padded.device.type, dtype=torch.bfloat16,
                                  enabled=precision == "bf16")
        with autocast:
            if fused:
                both = self.fused_networks().dense_valid(padded)  # (N, 1 + M, D, H', W')
                y, outs = both[:, 0], both[:, 1:].transpose(0, 1)
            else:
                y = self.teacher.dense_valid(padded)
                outs = torch.stack([s.dense_valid(padded) for s in self.students])
        y, outs = _widen(y), _widen(outs)  # (N, D, H', W'), (M, N, D, H', W')
        target = (y - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        mean = outs.mean(0)
        e = (mean - target).pow(2).sum(1)
        # (1/M) Σ‖μ_i‖² − ‖μ̄‖² computed as (1/M) Σ‖μ_i − μ̄‖², the same quantity without
        # the cancellation of two large terms (exactly 0 when the students agree).
        v = (outs - mean).pow(2).sum(2).mean(0)
        return e, v

    def fused_networks(self) -> FusedNetworks:
        """The teacher and students as one grouped network, rebuilt when any weight changed."""
        nets = [self.teacher, *self.students]
        key = tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device)
                    for net in nets for t in net.parameters())
        if self._fused is None or key != self._fused_key:
            self._fused, self._fused_key = FusedNetworks(nets), key
        return self._fused

    def standardize(self, e: torch.Tensor, v: torch.Tensor, variance_weight: float = 1.0
                    ) -> torch.Tensor:
        """ẽ + w·ṽ with the calibration statistics (docs/method.md §5; w = ``variance_weight``,
        1 the paper's); same shape as ``e``.

        With per-position statistics (``calib_map``), each pixel of the (N, S, S) maps is
        standardized with its own position's mean and spread."""
        if self.calib_map is not None:
            if tuple(e.shape[-2:]) != tuple(self.calib_map.shape[-2:]):
                raise ValueError(f"{self.name}: maps of size {tuple(e.shape[-2:])} "
                                 f"cannot use per-position statistics of size "
                                 f"{tuple(self.calib_map.shape[-2:])}")
            return standardized(e, v, self.calib_map, variance_weight)
        if self.calib is None:
            raise ArtifactError(f"the model is not calibrated for {self.name}: "
                                "run `stad calibrate` first")
        return standardized(e, v, self.calib, variance_weight)

    def score(self, x: torch.Tensor, variance_weight: float = 1.0) -> torch.Tensor:
        """Per-scale anomaly score ẽ + w·ṽ (docs/method.md §5): (N, 3, H, W) → (N, H, W)."""
        return self.standardize(*self.error_and_variance(x), variance_weight)


def standardized(e: torch.Tensor, v: torch.Tensor, stats: torch.Tensor,
                 variance_weight: float = 1.0) -> torch.Tensor:
    """ẽ + w·ṽ = (e − e_mean)/e_std + w·(v − v_mean)/v_std with ``stats`` (e_mean, e_std,
    v_mean, v_std) of shape (4,) (one value each) or (4, H, W) (one per position of (N, H, W)
    maps) and w = ``variance_weight`` (1: the paper's sum; 0: the error alone, v unused)."""
    e_mean, e_std, v_mean, v_std = stats.unbind(0)
    score = (e - e_mean) / e_std
    if variance_weight:
        score = score + variance_weight * ((v - v_mean) / v_std)
    return score


@dataclass
class Networks:
    """The networks and statistics of a multi-scale student–teacher model, keyed by scale name
    (``p17``, ``p17@128``: :func:`scale_name`; the public :class:`stad.Model` wraps them with
    their artifact and calibration)."""

    scales: dict[str, Scale]
    preprocessing: dict[str, Any]
    inference: Inference = field(default_factory=Inference)
    smooth_sigma: float = 0.0
    """σ (pixels of the S × S maps) of the Gaussian that smooths each scale's map before the
    fusion (a scale at size s uses σ·s/S on its own map); part of the calibration
    (``calibrate.smooth_sigma``), 0 for none."""
    variance_weight: float = 1.0
    """w in each scale's score ẽ + w·ṽ; part of the calibration (``calibrate.variance_weight``;
    1, the paper's, for calibrations made before the setting)."""
    tta: str = "none"
    """The views (a key of :data:`TTA`) whose e and v are averaged; part of the calibration
    (``calibrate.tta``), "none" for calibrations made before the setting."""

    @property
    def scale_names(self) -> list[str]:
        """The scales' names in order (:func:`scale_order`)."""
        return sorted(self.scales, key=scale_order)

    @property
    def patch_sizes(self) -> list[int]:
        """The distinct patch sizes of the scales (their teachers)."""
        return sorted({s.patch_size for s in self.scales.values()})

    @property
    def image_size(self) -> int:
        """S, the side of the square the images are resized to."""
        return int(self.preprocessing["image_size"])

    def to(self, device: torch.device | str) -> Networks:
        for s in self.scales.values():
            s.teacher.to(device)
            for st in s.students:
                st.to(device)
            for name in ("mean", "std", "calib", "calib_map"):
                t = getattr(s, name)
                if t is not None:
                    setattr(s, name, t.to(device))
        return self

    def eval(self) -> Networks:
        for s in self.scales.values():
            s.teacher.eval()
            for st in s.students:
                st.eval()
        return self

    def maps(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Anomaly maps of a batch: per scale (key ``"p17"`` ...) and fused (``"fused"``).

        The fused map is the unweighted mean of the per-scale maps (docs/method.md §5). With
        ``size``, maps are resized bilinearly to (H, W) (the input's own resolution).

        Args:
            x: (N, 3, h, w) standardized images at the model's image size.
        Returns:
            dict of (N, H, W) float tensors.
        """
        ev = self.error_and_variance(x)
        return self.fuse({k: self.scales[k].standardize(*ev[k], self.variance_weight)
                          for k in self.scale_names}, size)

    def error_and_variance(self, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per scale, e and v of :meth:`Scale.error_and_variance` as ``self.inference``
        says, averaged over the views of :attr:`tta`: (N, 3, H, W) → two (N, h, w) tensors
        each (h = H for a scale at the model's size, its own size for the others)."""
        views = TTA[self.tta]
        if len(views) == 1:
            return self._error_and_variance(x)
        if any(k % 2 for k, _ in views) and x.shape[-1] != x.shape[-2]:
            raise ValueError(f"tta {self.tta!r} turns images by 90° and needs square inputs, "
                             f"got {tuple(x.shape[-2:])}")
        total: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for k, mirror in views:
            view = turned(x.flip(-1) if mirror else x, k)
            for name, (e, v) in self._error_and_variance(view).items():
                e, v = turned(e, -k), turned(v, -k)
                if mirror:
                    e, v = e.flip(-1), v.flip(-1)
                total[name] = ((total[name][0] + e, total[name][1] + v) if name in total
                               else (e, v))
        return {name: (e / len(views), v / len(views)) for name, (e, v) in total.items()}

    def _error_and_variance(self, x: torch.Tensor
                            ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        run = self.inference
        reduced: dict[int | None, torch.Tensor] = {}
        out = {}
        for name in self.scale_names:
            scale = self.scales[name]
            if scale.image_size not in reduced:
                reduced[scale.image_size] = reduce_to(x, scale.image_size)
            out[name] = scale.error_and_variance(reduced[scale.image_size],
                                                 tile_size=run.tile_size,
                                                 precision=run.precision, fused=run.fused)
        return out

    def fuse(self, per_scale: dict[str, torch.Tensor], size: tuple[int, int] | None = None
             ) -> dict[str, torch.Tensor]:
        """Per-scale maps (keyed by scale name) → ``{"p17": ..., "fused": ...}``, each smoothed
        with ``smooth_sigma`` (scaled to its own size) and brought to the size of the largest
        (the model's resolution), then resized to ``size`` (bilinear) if given. The fused map is
        their unweighted mean (docs/method.md §5)."""
        out = {}
        for k in sorted(per_scale, key=scale_order):
            m, side = per_scale[k], parse_scale_name(k)[1]
            # S / s for a scale at size s: a Python int, so that an ONNX export traces the
            # upsampling as a constant of its fixed size.
            factor = 1 if side is None else self.image_size // side
            m = gaussian_blur(m, self.smooth_sigma / factor)
            if factor != 1:
                m = F.interpolate(m[:, None], scale_factor=float(factor), mode="bilinear",
                                  align_corners=False)[:, 0]
            out[k] = m
        out["fused"] = torch.stack(list(out.values())).mean(0)
        if size is not None and tuple(out["fused"].shape[-2:]) != tuple(size):
            out = {k: F.interpolate(v[:, None], size=size, mode="bilinear",
                                    align_corners=False)[:, 0] for k, v in out.items()}
        return out


def turned(x: torch.Tensor, k: int) -> torch.Tensor:
    """``torch.rot90(x, k, (-2, -1))`` (k × 90° counter-clockwise) from flips and a transpose,
    which ONNX export knows (it has no rot90)."""
    k %= 4
    if k == 1:
        return x.flip(-1).transpose(-2, -1)
    if k == 2:
        return x.flip(-2).flip(-1)
    if k == 3:
        return x.transpose(-2, -1).flip(-1)
    return x


def teacher_tensors(teachers: Mapping[int, PatchNetwork]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p, net in teachers.items():
        out.update(with_prefix(net.state_dict(), f"teacher.p{p}"))
    return out


def load_teachers(tensors: Mapping[str, torch.Tensor], *,
                  patch_sizes: Sequence[int] | None = None) -> dict[int, PatchNetwork]:
    """The teachers stored in an artifact's tensors, frozen and in eval mode."""
    names = {k.split(".")[1] for k in tensors if k.startswith("teacher.")}
    bad = sorted(n for n in names if not re.fullmatch(r"p[1-9]\d{0,3}", n))
    if bad:
        raise ArtifactError(f"the artifact holds teacher tensors of a scale named {bad[0]!r}; "
                            "stad names them teacher.pP (P the patch size)")
    found = sorted(int(n[1:]) for n in names)
    wanted = list(patch_sizes) if patch_sizes is not None else found
    missing = [p for p in wanted if p not in found]
    if missing:
        raise ArtifactError(f"the artifact has teachers for p={found}, not for p={missing}; "
                            "pretrain those scales or choose patch sizes (--patch-sizes) among the "
                            "ones it has")
    out = {}
    for p in wanted:
        out[p] = _load_net(p, prefixed(tensors, f"teacher.p{p}"), f"teacher p={p}")
        out[p].requires_grad_(False).eval()
    return out


def _load_net(p: int, state: Mapping[str, torch.Tensor], what: str) -> PatchNetwork:
    # The descriptor dimension is whatever the last conv produces (128 in the paper).
    last = max((k for k in state if k.endswith(".weight")), default=None,
               key=lambda k: int(k.split(".")[1]) if k.split(".")[1].isdigit() else -1)
    if last is None:
        raise ArtifactError(f"the artifact holds no weights for the {what}")
    out_dim = int(state[last].shape[0]) if state[last].dim() else 0
    if out_dim > MAX_DESCRIPTOR_DIM:
        raise ArtifactError(f"the {what} has {out_dim}-d descriptors ({last}), more than the "
                            f"{MAX_DESCRIPTOR_DIM} stad reads")
    # The shapes are checked against the network's plan before the network is built: a tensor
    # of no elements can claim any size of layer for free.
    try:
        planned = planned_shapes(p, max(out_dim, 1))
    except ValueError as exc:  # a patch size stad has no network for
        raise ArtifactError(f"the {what}: {exc}") from None
    problem = state_mismatch(planned, state)
    if problem is not None:
        raise ArtifactError(f"the {what} weights do not fit the architecture: {problem}")
    # Its initial weights are replaced: drawn from a generator of its own, not the caller's.
    net = build_network(p, out_dim, generator=torch.Generator())
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net


def scale_tensors(scale: Scale) -> dict[str, torch.Tensor]:
    """A scale's students and normalization, named as in the model artifact."""
    k = scale.name
    out: dict[str, torch.Tensor] = {}
    for m, student in enumerate(scale.students):
        out.update(with_prefix(student.state_dict(), f"student.{k}.{m}"))
    assert scale.mean is not None and scale.std is not None
    out[f"norm.{k}.mean"], out[f"norm.{k}.std"] = scale.mean, scale.std
    return out


def model_tensors(model: Networks) -> dict[str, torch.Tensor]:
    out = teacher_tensors({s.patch_size: s.teacher for s in model.scales.values()})
    for k, s in model.scales.items():
        out.update(scale_tensors(s))
        if s.calib is not None:
            out[f"calib.{k}"] = s.calib
        if s.calib_map is not None:
            out[f"calib_map.{k}"] = s.calib_map
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def student_scales(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the scales whose students an artifact's tensors hold, in order."""
    names = {k.split(".")[1] for k in tensors if k.startswith("student.")}
    bad = sorted(n for n in names if not _SCALE_NAME.fullmatch(n))
    if bad:
        raise ArtifactError(f"the artifact holds students of {bad[0]!r}, which is not a scale "
                            "name (p17, p17@128)")
    return sorted(names, key=scale_order)


def check_scale_size(name: str, image_size: int) -> int | None:
    """The size a scale named ``name`` works at in a model of ``image_size`` (None: the
    model's own); ArtifactError where it is not a divisor of the model's, smaller than it and
    at least 17."""
    size = parse_scale_name(name)[1]
    if size is not None and not scale_size_fits(size, image_size):
        raise ArtifactError(f"scale {name} does not fit a model of image size {image_size}: "
                            "its size must be a smaller divisor of the model's, at least 17")
    return size


def model_from_tensors(tensors: Mapping[str, torch.Tensor], preprocessing: dict[str, Any],
                       *, calibration: bool = True) -> Networks:
    """The model an artifact's tensors hold; ``calibration=False`` leaves its calibration
    statistics out (``stad calibrate`` replaces them, so damaged ones must not stop it).

    Refused (:class:`ArtifactError`) before anything is scored with it: a malformed
    preprocessing record, networks or normalization that hold a NaN or an infinity (a
    diverged fit or an altered file would score every image NaN), and a normalization of
    another shape than the teacher's descriptors or with spreads that are not positive."""
    check_preprocessing(preprocessing, "the model artifact")
    for name, t in tensors.items():
        if name.startswith(("calib.", "calib_map.")) or not t.is_floating_point():
            continue  # calibration statistics: checked by _calibration, when they are used
        if not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"the model artifact's tensor {name} holds NaN or infinite "
                                "values (a diverged fit, or the file was altered): fit it again")
    teachers = load_teachers(tensors)
    full = int(preprocessing.get("image_size", 0))
    scales: dict[str, Scale] = {}
    for k in student_scales(tensors):
        p = parse_scale_name(k)[0]
        if p not in teachers:
            raise ArtifactError(f"the model artifact has students for {k} but no teacher for "
                                f"p={p}")
        size = check_scale_size(k, full)
        ids = sorted({int(n.split(".")[2]) for n in tensors if n.startswith(f"student.{k}.")})
        students = [_load_net(p, prefixed(tensors, f"student.{k}.{m}"),
                              f"student {m} {k}").requires_grad_(False).eval() for m in ids]
        if len(students) < 2 or any(f"norm.{k}.{stat}" not in tensors
                                    for stat in ("mean", "std")):
            raise ArtifactError(f"the model artifact lacks students or normalization for {k}")
        mean, std = tensors[f"norm.{k}.mean"], tensors[f"norm.{k}.std"]
        d = teachers[p].out_dim
        for stat, t in (("mean", mean), ("std", std)):
            if tuple(t.shape) != (d,):
                raise ArtifactError(f"the model artifact's norm.{k}.{stat} has shape "
                                    f"{tuple(t.shape)}, not ({d},) as its teacher's "
                                    "descriptors: fit it again")
        if not bool((std > 0).all()):
            raise ArtifactError(f"the model artifact's tensor norm.{k}.std holds spreads that "
                                "are not positive: fit it again")
        side = full if size is None else size
        scales[k] = Scale(p, teachers[p], students, mean.float(), std.float(),
                          _calibration(tensors, f"calib.{k}", (4,)) if calibration else None,
                          _calibration(tensors, f"calib_map.{k}", (4, side, side))
                          if calibration else None, image_size=size)
    unused = sorted(set(teachers) - {s.patch_size for s in scales.values()})
    if unused:
        raise ArtifactError(f"the model artifact lacks students or normalization for p={unused[0]}")
    return Networks(scales=scales, preprocessing=preprocessing)


MIN_SPREAD = 1e-30
"""Stored spreads below this are refused: dividing by them would overflow float32 (calibration
never stores a spread below 1e-12)."""


def _calibration(tensors: Mapping[str, torch.Tensor], name: str, shape: tuple[Any, ...]
                 ) -> torch.Tensor | None:
    """Calibration statistics (e_mean, e_std, v_mean, v_std) stored under ``name``, checked
    before use: a float tensor of ``shape``, finite, spreads >= MIN_SPREAD."""
    t = tensors.get(name)
    if t is None:
        return None
    if not t.is_floating_point() or tuple(t.shape) != shape:
        raise ArtifactError(f"{name} is a {t.dtype} tensor of shape {tuple(t.shape)}, not a "
                            f"float tensor of shape {shape}; recalibrate the model "
                            f"(stad calibrate)")
    t = t.float()
    if not bool(torch.isfinite(t).all()) or not bool((t[[1, 3]] >= MIN_SPREAD).all()):
        raise ArtifactError(f"{name} holds non-finite values or spreads below {MIN_SPREAD:g}; "
                            "recalibrate the model (stad calibrate)")
    return t


def _widen(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 network output (autocast) as float32 for the error and variance sums."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


# ---- which teachers a command uses ----------------------------------------------------------

RANDOM_TEACHER = "random"
BUILTIN_TEACHER = "builtin"


def builtin_teacher_path() -> Path:
    """The teacher artifact shipped inside the package (how it was made: docs/quality.md,
    "The shipped teacher")."""
    return Path(__file__).resolve().parent / "assets" / "teacher.safetensors"


def teacher_path(name: str | Path) -> Path:
    """The file a ``--teacher`` / ``--init`` value names: ``builtin`` is the shipped teacher."""
    if not str(name).strip():
        raise UsageError("the teacher is empty: give a teacher or model artifact, "
                         f"'{BUILTIN_TEACHER}' or '{RANDOM_TEACHER}'")
    return builtin_teacher_path() if str(name) == BUILTIN_TEACHER else Path(name)


def resolve_teachers(teacher: str | Path | None, patch_sizes: Sequence[int] | None, seed: int
                     ) -> tuple[dict[int, PatchNetwork], dict[str, Any], dict[str, Any]]:
    """The teachers a command works with: ``teacher`` is a teacher or model artifact,
    ``random`` (randomly initialized, seeded by ``seed``) or ``builtin`` / None (the shipped
    teacher). ``patch_sizes`` None: every scale the artifact has (random: all three).

    Returns:
        the frozen teachers by patch size, their source (for the artifact's info), and the
        artifact's own info (empty for random teachers).
    """
    name = BUILTIN_TEACHER if teacher is None else str(teacher)
    if name == RANDOM_TEACHER:
        sizes = list(patch_sizes or PATCH_SIZES)
        nets = {p: build_network(p, generator=torch.Generator().manual_seed(seed + p))
                .eval().requires_grad_(False) for p in sizes}
        return nets, {"source": RANDOM_TEACHER, "seed": seed}, {}
    path = teacher_path(name)
    if name == BUILTIN_TEACHER and not path.is_file():
        raise ArtifactError(f"the built-in teacher {path} is missing from this installation: "
                            "reinstall stad, or pass --teacher FILE (from `stad "
                            f"pretrain-teacher`) or --teacher {RANDOM_TEACHER} (teacher= in "
                            "Python)")
    artifact = load_artifact(path, kind=("teacher", "model"))
    pre = check_preprocessing(artifact.preprocessing, f"teacher {path}")
    if [pre["mean"], pre["std"]] != [list(DEFAULT_MEAN), list(DEFAULT_STD)]:
        raise ArtifactError(f"teacher {path} was pretrained on images standardized with mean "
                            f"{pre['mean']} and std {pre['std']}, not stad's {list(DEFAULT_MEAN)} "
                            f"and {list(DEFAULT_STD)}: its students would see other inputs; "
                            "pretrain it with this stad")
    bad = [k for k, v in artifact.tensors.items() if k.startswith("teacher.")
           and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # a diverged or altered teacher would stop training with a misleading advice
        raise ArtifactError(f"teacher {path}'s tensor {bad[0]} holds NaN or infinite values (a "
                            "diverged pretraining, or the file was altered): pretrain it again")
    try:
        nets = load_teachers(artifact.tensors, patch_sizes=patch_sizes)
    except ArtifactError as exc:
        raise ArtifactError(f"teacher {path}: {exc}") from None
    # A model records its teacher's pretraining info under teacher.info.
    info = (record(record(artifact.info, "teacher", path), "info", path)
            if artifact.kind == "model" else artifact.info)
    source = {"source": BUILTIN_TEACHER if name == BUILTIN_TEACHER else str(path),
              "kind": artifact.kind, "target": info.get("target"),
              "stad_version": artifact.stad_version, "info": info}
    return nets, source, info
