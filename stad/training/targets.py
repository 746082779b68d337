"""The distillation targets of teacher pretraining (docs/method.md §3, Lk) and how Lk is computed.

:class:`Distillation` holds one scale's target and its linear decoder: the handcrafted bank
(:mod:`stad.handcrafted`), a frozen ResNet-18 read from a local file
(:func:`resnet18_features`), or EfficientNet-Lite features (:mod:`stad.distillation`), either
dense (per-pixel block outputs of every buffered image) or pooled (the resized patch).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from stad.artifacts import read_state_dict
from stad.backbones import EfficientNetLite
from stad.config import TeacherSettings
from stad.distillation import BACKBONES, DenseTargets, PooledTargets, blocks_for
from stad.distributed import World
from stad.errors import ArtifactError
from stad.handcrafted import HandcraftedBank
from stad.networks import Decoder

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


def crop(images: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
          p: int) -> torch.Tensor:
    """Patches of ``images`` (N, 3, S, S) with top-left corners (rows, cols): (B, 3, p, p)."""
    ar = torch.arange(p, device=images.device)
    r = (rows[:, None] + ar)[:, :, None]  # (B, p, 1)
    c = (cols[:, None] + ar)[:, None, :]  # (B, 1, p)
    # Advanced indices around a slice put the broadcast dims first: (B, p, p, 3).
    return images[idx[:, None, None], :, r, c].permute(0, 3, 1, 2).contiguous()



def resolve_target(cfg: TeacherSettings) -> str:
    """``teacher.target`` with ``auto`` resolved: ``resnet18`` when ``backbone_weights`` is
    given, else ``handcrafted``. (The one line to change for another default.)"""
    if cfg.target != "auto":
        return cfg.target
    return "resnet18" if cfg.backbone_weights is not None else "handcrafted"


def decoder_for(generator: torch.Generator, out_dim: int) -> Decoder:
    # nn.Linear's default initialization, but drawn from the scale's generator.
    decoder = Decoder(out_dim=out_dim)
    lin = decoder.linear
    nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(lin.in_features)
    nn.init.uniform_(lin.bias, -bound, bound, generator=generator)
    return decoder


def sample_patches(p: int, images: torch.Tensor, seed: int, n: int = BANK_SAMPLE
                    ) -> torch.Tensor:
    """n random p×p patches of ``images``, drawn from a generator of their own (the training
    stream is the same with or without them): where a target's statistics are estimated."""
    # A fixed salt (not the module's name): changing it would change every seeded teacher.
    digest = hashlib.sha256(f"stad.teacher.bank:{seed}:{p}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    corners = images.shape[-1] - p + 1
    idx = torch.randint(images.shape[0], (n,), generator=gen)
    rows = torch.randint(corners, (n,), generator=gen)
    cols = torch.randint(corners, (n,), generator=gen)
    dev = images.device
    return crop(images, idx.to(dev), rows.to(dev), cols.to(dev), p)


def handcrafted_target(p: int, images: torch.Tensor, seed: int, components: int = 0
                       ) -> HandcraftedBank:
    """The handcrafted target of scale p, standardized (and with ``components``, whitened) on
    BANK_SAMPLE random patches (WHITEN_SAMPLE when whitened, for the covariance)."""
    n = WHITEN_SAMPLE if components else BANK_SAMPLE
    return HandcraftedBank(p, components).to(images.device).fit(
        sample_patches(p, images, seed, n))




class Distillation:
    """Lk of one scale: its target and decoder (none when distillation is off).

    Built from the first buffered ``images`` of this rank; in a distributed run the target's
    statistics are rank 0's. The decoder's initialization is drawn from the scale's generator
    after the teacher's, as in every run of the same seed.
    """

    def __init__(self, p: int, images: torch.Tensor, cfg: TeacherSettings, seed: int,
                 target: str, backbone: nn.Module | None, lambda_kd: float, *,
                 generator: torch.Generator, device: torch.device, world: World) -> None:
        self.p, self.kd_input_size = p, cfg.kd_input_size
        self.dense: DenseTargets | None = None
        self.fixed: nn.Module | None = None  # a target module applied to the patches
        if lambda_kd > 0 and target == "handcrafted":
            self.fixed = handcrafted_target(p, images, seed, cfg.target_whiten)
        elif lambda_kd > 0 and target == "resnet18":
            self.fixed = backbone
        elif lambda_kd > 0 and target in BACKBONES:
            assert isinstance(backbone, EfficientNetLite)
            blocks = blocks_for(p, backbone, cfg.target_blocks)
            if cfg.distill == "dense":
                self.dense = DenseTargets(backbone, blocks, images)
            else:
                self.fixed = PooledTargets(backbone, blocks, cfg.kd_input_size,
                                           sample_patches(p, images, seed))
        self.decoder: Decoder | None = None
        if self.dense is not None or self.fixed is not None:
            # The target's dimension: the bank's, the backbone blocks', or ResNet-18's 512.
            dim = self.dense.dim if self.dense is not None else getattr(self.fixed, "dim", 512)
            self.decoder = decoder_for(generator, dim).to(device).train()
        self._share_statistics(world)

    def _share_statistics(self, world: World) -> None:
        if isinstance(self.fixed, HandcraftedBank):
            for tensor in self.fixed.buffers():
                world.broadcast(tensor)
        elif isinstance(self.fixed, PooledTargets):
            for tensor in (self.fixed.mean, self.fixed.std):
                world.broadcast(tensor)
        if self.dense is not None and world.size > 1:  # every rank standardizes as rank 0
            stats = [(mean.clone(), std.clone()) for mean, std in self.dense.stats]
            for mean, std in stats:
                world.broadcast(mean)
                world.broadcast(std)
            self.dense.set_stats(stats)

    def update(self, images: torch.Tensor, slots: Sequence[int]) -> None:
        """Buffer slots that now hold other images (a stream): their dense targets anew."""
        if self.dense is not None and slots:
            self.dense.update(images, slots)

    def loss(self, decoded: torch.Tensor | None, patches: torch.Tensor, idx: torch.Tensor,
             rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor | None:
        """‖D(T(patch)) − target‖², mean over the batch; None when distillation is off.

        ``patches`` (B, 3, p, p) were cut at top-left corners (rows, cols) of buffered image
        ``idx``; a dense target is read at the patch's centre pixel (stad.networks alignment).
        """
        if decoded is None:
            return None
        if self.dense is not None:
            half = (self.p - 1) // 2
            goal = self.dense.at(idx, rows + half, cols + half)
        else:
            with torch.no_grad():
                if isinstance(self.fixed, HandcraftedBank | PooledTargets):
                    goal = self.fixed(patches)  # (B, 484), or (B, k) whitened
                else:
                    assert self.fixed is not None
                    kd_in = F.interpolate(patches, size=(self.kd_input_size,) * 2,
                                          mode="bilinear", align_corners=False)
                    goal = self.fixed(kd_in)  # (B, 512)
        return (decoded - goal).pow(2).sum(1).mean()
