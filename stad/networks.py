"""The patch networks of Uninformed Students, and their dense (one descriptor per pixel) form.

A patch network maps a p×p RGB patch to one d-dimensional descriptor (d = ``out_dim``, 128 in the
paper). Teacher and students share the architecture; there is one per patch size p ∈ {17, 33, 65}
(Bergmann et al., CVPR 2020; docs/method.md §1):

    p = 17: conv 6×6·128 → conv 5×5·256 → conv 5×5·256 → conv 4×4·d
    p = 33: conv 5×5·128 → pool → conv 5×5·256 → pool → conv 2×2·256 → conv 4×4·d
    p = 65: conv 5×5·128 → pool → conv 5×5·128 → pool → conv 5×5·256 → pool → conv 4×4·256
            → conv 1×1·d

"pool" is a 2×2 max-pool with stride 2 (floor mode); every conv except the last is followed by a
leaky ReLU with slope 5e-3. No conv is padded.

The same parameters are evaluated in two ways:

- ``PatchNetwork.forward``: (N, 3, p, p) patches → (N, d) descriptors, the strided network.
- ``PatchNetwork.dense``: (N, 3, H, W) images → (N, d, H, W), the patch network at every pixel in
  one pass. Every pool gets stride 1 and every later conv and pool is dilated by the product of the
  strides before it (docs/method.md §2), which is exactly what Fast Dense Feature Extraction
  (Bailer et al., BMVC 2017) computes, without the unwarping.

Alignment: ``dense(x)[:, :, r, c] == forward(patch)`` where ``patch`` is the p×p window centred at
pixel (r, c): rows r-a .. r+p-1-a and cols c-a .. c+p-1-a of the image, a = (p - 1) // 2, read from
the image padded with ``padding_mode``. Because pooling floors, the p = 33 network only reads the
first 32×32 of its patch and the p = 65 network the first 60×60 (its ``receptive_field``); the
equality still holds with the full patch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LEAKY_SLOPE",
    "PADDING_MODES",
    "PATCH_SIZES",
    "Decoder",
    "FusedNetworks",
    "Layer",
    "PatchNetwork",
    "build_network",
    "count_macs",
    "layer_plan",
]

PATCH_SIZES: tuple[int, ...] = (17, 33, 65)
LEAKY_SLOPE = 5e-3
PADDING_MODES: tuple[str, ...] = ("reflect", "replicate", "zeros")
PaddingMode = Literal["reflect", "replicate", "zeros"]

# The architectures of docs/method.md §1: (kernel, out_channels) per conv, "pool" for a 2×2/2
# max-pool.
# "d" is the descriptor dimension (out_dim). The paper's p = 65 table has two typos; this is the
# consistent reading (see docs/method.md §1).
_ARCHITECTURES: dict[int, tuple[tuple[int, int | str] | str, ...]] = {
    17: ((6, 128), (5, 256), (5, 256), (4, "d")),
    33: ((5, 128), "pool", (5, 256), "pool", (2, 256), (4, "d")),
    65: ((5, 128), "pool", (5, 128), "pool", (5, 256), "pool", (4, 256), (1, "d")),
}


@dataclass(frozen=True)
class Layer:
    """One layer of a patch network, with its dilation in the dense form.

    ``kind`` is "conv" or "pool" (2×2 max-pool; stride 2 in ``forward``, stride 1 in ``dense``).
    ``dilation`` is the product of the strides of the pools before this layer. ``activation`` says
    whether a leaky ReLU follows (every conv but the last).
    """

    kind: Literal["conv", "pool"]
    kernel: int
    in_channels: int
    out_channels: int
    dilation: int
    activation: bool


def _check_patch_size(patch_size: int) -> None:
    if patch_size not in PATCH_SIZES:
        valid = ", ".join(str(p) for p in PATCH_SIZES)
        raise ValueError(f"patch size must be one of {valid}, got {patch_size!r}")


def layer_plan(patch_size: int, out_dim: int = 128) -> tuple[Layer, ...]:
    """The layers of the network for ``patch_size``, in order, with their dense-form dilations."""
    _check_patch_size(patch_size)
    if out_dim < 1:
        raise ValueError(f"out_dim must be a positive integer, got {out_dim!r}")
    spec = _ARCHITECTURES[patch_size]
    last_conv = max(i for i, s in enumerate(spec) if s != "pool")
    layers: list[Layer] = []
    channels, dilation = 3, 1
    for i, s in enumerate(spec):
        if isinstance(s, str):  # "pool"
            layers.append(Layer("pool", 2, channels, channels, dilation, False))
            dilation *= 2  # everything after a stride-2 pool reads every other pixel
        else:
            kernel, width = s
            out = out_dim if width == "d" else int(width)
            layers.append(Layer("conv", kernel, channels, out, dilation, i != last_conv))
            channels = out
    return tuple(layers)


def _receptive_field(layers: tuple[Layer, ...]) -> int:
    # Height (= width) of the input window one output pixel depends on; 17, 32, 60 for p = 17, 33,
    # 65. Smaller than p for 33 and 65 because the pools floor.
    return 1 + sum(layer.dilation * (layer.kernel - 1) for layer in layers)


class PatchNetwork(nn.Module):
    """A teacher or student patch network for one patch size (docs/method.md §1).

    Parameters are the convs in ``self.convs`` (state-dict keys ``convs.{i}.weight`` and
    ``convs.{i}.bias``). ``forward`` and ``dense`` use the same parameters.
    """

    def __init__(
        self, patch_size: int, out_dim: int = 128, *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.layers = layer_plan(patch_size, out_dim)
        self.patch_size = patch_size
        self.out_dim = out_dim
        self.receptive_field = _receptive_field(self.layers)
        # nn.Conv2d draws default weights from the global generator, which reset_parameters
        # then replaces: those draws must not move a caller's seeded random stream.
        with torch.random.fork_rng(devices=[]):
            self.convs = nn.ModuleList(
                nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel)
                for layer in self.layers
                if layer.kind == "conv"
            )
        self.reset_parameters(generator=generator)

    def reset_parameters(self, *, generator: torch.Generator | None = None) -> None:
        """Draw fresh weights: Kaiming-normal (fan-in) for the activation that follows, zero bias.

        Hidden convs use the gain of a leaky ReLU with slope 5e-3 and the last conv, which has no
        activation, a linear gain, so that activations keep roughly unit scale through the network
        and a fresh student's outputs start on the scale of its normalized targets
        (docs/method.md §4)."""
        conv_layers = [layer for layer in self.layers if layer.kind == "conv"]
        for conv, layer in zip(self.convs, conv_layers, strict=True):
            nonlinearity = "leaky_relu" if layer.activation else "linear"
            nn.init.kaiming_normal_(
                conv.weight, a=LEAKY_SLOPE, nonlinearity=nonlinearity, generator=generator
            )
            nn.init.zeros_(conv.bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """Descriptors of patches: (N, 3, p, p) → (N, out_dim)."""
        _check_images(patches)
        if patches.shape[-2:] != (self.patch_size, self.patch_size):
            p = self.patch_size
            raise ValueError(
                f"expected patches of shape (N, 3, {p}, {p}), got {tuple(patches.shape)}"
            )
        x = patches
        convs = iter(self.convs)
        for layer in self.layers:
            if layer.kind == "pool":
                x = F.max_pool2d(x, kernel_size=2, stride=2)
                continue
            x = next(convs)(x)
            if layer.activation:
                x = F.leaky_relu(x, LEAKY_SLOPE)
        return x.flatten(1)  # (N, out_dim, 1, 1) -> (N, out_dim)

    def dense(self, images: torch.Tensor, *, padding_mode: PaddingMode = "reflect") -> torch.Tensor:
        """One descriptor per pixel, in one pass: (N, 3, H, W) → (N, out_dim, H, W), any H, W ≥ 1.

        ``dense(images)[:, :, r, c]`` equals ``forward`` on the p×p patch centred at (r, c): rows
        ``r - a .. r + p - 1 - a`` and cols ``c - a .. c + p - 1 - a``, a = (p - 1) // 2, of the
        image extended by ``padding_mode``:

        - "reflect": mirror without repeating the edge pixel (``numpy.pad(mode="reflect")``),
          repeated as often as needed, so it works for pads larger than the image (a one-pixel
          side is extended as a constant);
        - "replicate": repeat the edge pixel;
        - "zeros": zeros.

        Each pool runs with stride 1 and each later conv and pool is dilated by the product of the
        strides before it (docs/method.md §2). The image is padded by a on top/left and
        ``receptive_field - 1 - a`` on bottom/right, the pixels the patch network actually reads.
        """
        return self.dense_valid(self.pad(images, padding_mode=padding_mode))

    def pad(self, images: torch.Tensor, *, padding_mode: PaddingMode = "reflect") -> torch.Tensor:
        """The image extended as ``dense`` extends it: (N, 3, H, W) → (N, 3, H+rf−1, W+rf−1).

        a = (p − 1) // 2 rows/cols on top/left and ``receptive_field − 1 − a`` on bottom/right.
        """
        _check_images(images)
        if padding_mode not in PADDING_MODES:
            modes = ", ".join(PADDING_MODES)
            raise ValueError(f"padding_mode must be one of {modes}, got {padding_mode!r}")
        a = (self.patch_size - 1) // 2
        b = self.receptive_field - 1 - a
        return _pad(images, (a, b, a, b), padding_mode)

    def dense_valid(self, images: torch.Tensor) -> torch.Tensor:
        """Dense descriptors where the whole receptive field lies inside the input, no padding.

        (N, 3, H, W) → (N, out_dim, H − rf + 1, W − rf + 1) with rf = ``receptive_field``.
        ``dense_valid(pad(x)) == dense(x)``; on a crop of ``pad(x)`` it gives the descriptors of
        the crop's interior with their full context, which is how students train on crops.
        """
        # Channels-last activations and weights: the dilated convolutions run 1.3–1.6× faster
        # on CPU this way (docs/benchmarks.md); the weight copies are tiny next to the convs.
        x = images.contiguous(memory_format=torch.channels_last)
        convs = iter(self.convs)
        for layer in self.layers:
            if layer.kind == "pool":
                x = F.max_pool2d(x, kernel_size=2, stride=1, dilation=layer.dilation)
                continue
            conv = next(convs)
            weight = conv.weight.contiguous(memory_format=torch.channels_last)
            x = F.conv2d(x, weight, conv.bias, dilation=layer.dilation)
            if layer.activation:
                x = F.leaky_relu(x, LEAKY_SLOPE)
        return x  # (N, out_dim, H - rf + 1, W - rf + 1), channels-last strides


class FusedNetworks(nn.Module):
    """K patch networks of one patch size evaluated as one network (grouped convolutions).

    The networks read the same input, so the first conv of all K is one conv with their weights
    concatenated along the output channels; every later conv runs with ``groups=K``, group k
    holding network k's weights; pools act per channel and are unchanged. One pass costs the
    same arithmetic as K separate ``dense_valid`` passes but reads the input once and launches
    K times fewer kernels. The weights are copied at construction: build a new one when the
    networks' parameters change (``stad.model.Scale`` does that). Inference only.
    """

    def __init__(self, nets: Sequence[PatchNetwork]) -> None:
        super().__init__()
        if not nets or len({(n.patch_size, n.out_dim) for n in nets}) != 1:
            raise ValueError("fusing needs one or more networks of one patch size and out_dim")
        first = nets[0]
        self.layers, self.patch_size, self.out_dim = first.layers, first.patch_size, first.out_dim
        self.receptive_field, self.count = first.receptive_field, len(nets)
        for i in range(len(first.convs)):
            # (K·C_out, C_in, k, k), channels-last like dense_valid's weights.
            weight = torch.cat([n.convs[i].weight.detach() for n in nets])
            self.register_buffer(f"weight{i}", weight.contiguous(memory_format=torch.channels_last))
            self.register_buffer(f"bias{i}", torch.cat([n.convs[i].bias.detach() for n in nets]))

    def pad(self, images: torch.Tensor, *, padding_mode: PaddingMode = "reflect") -> torch.Tensor:
        """As :meth:`PatchNetwork.pad` (the same for every network of the patch size)."""
        return PatchNetwork.pad(self, images, padding_mode=padding_mode)  # type: ignore[arg-type]

    def dense_valid(self, images: torch.Tensor) -> torch.Tensor:
        """Every network's ``dense_valid``: (N, 3, H, W) → (N, K, out_dim, H − rf + 1, W − rf + 1).

        ``out[:, k]`` equals ``nets[k].dense_valid(images)`` up to rounding: the same products
        and sums, possibly accumulated in another order by another kernel.
        """
        _check_images(images)
        x = images.contiguous(memory_format=torch.channels_last)
        i = 0
        for layer in self.layers:
            if layer.kind == "pool":
                x = F.max_pool2d(x, kernel_size=2, stride=1, dilation=layer.dilation)
                continue
            x = F.conv2d(x, getattr(self, f"weight{i}"), getattr(self, f"bias{i}"),
                         dilation=layer.dilation, groups=1 if i == 0 else self.count)
            if layer.activation:
                x = F.leaky_relu(x, LEAKY_SLOPE)
            i += 1
        return x.unflatten(1, (self.count, self.out_dim))  # (N, K·D, h, w) -> (N, K, D, h, w)

    def dense(self, images: torch.Tensor, *, padding_mode: PaddingMode = "reflect") -> torch.Tensor:
        """Every network's ``dense``: (N, 3, H, W) → (N, K, out_dim, H, W)."""
        return self.dense_valid(self.pad(images, padding_mode=padding_mode))


DESCRIPTOR_DIM = 128
"""The descriptor dimension d of the networks stad trains (the paper's)."""


def planned_shapes(patch_size: int, out_dim: int = DESCRIPTOR_DIM) -> dict[str, tuple[int, ...]]:
    """The state dict's names and shapes of ``build_network(patch_size, out_dim)``, from its
    plan alone: nothing is allocated or drawn."""
    convs = [layer for layer in layer_plan(patch_size, out_dim) if layer.kind == "conv"]
    shapes: dict[str, tuple[int, ...]] = {}
    for i, layer in enumerate(convs):
        shapes[f"convs.{i}.weight"] = (layer.out_channels, layer.in_channels, layer.kernel,
                                       layer.kernel)
        shapes[f"convs.{i}.bias"] = (layer.out_channels,)
    return shapes


def state_mismatch(expected: Mapping[str, Sequence[int]], given: Mapping[str, torch.Tensor]
                   ) -> str | None:
    """The first way ``given`` (a state dict read from a file) differs from ``expected`` (the
    names and shapes of a network's, e.g. :func:`planned_shapes`): a missing or unexpected
    key, or a shape; ``None`` when the names and shapes are the same."""
    for key, shape in expected.items():  # in the network's order: the first layer first
        planned = tuple(shape)
        if key not in given:
            return f"missing {key}"
        if tuple(given[key].shape) != planned:
            return f"{key} is {list(given[key].shape)}, not {list(planned)}"
    extra = [k for k in given if k not in expected]
    return f"unexpected {extra[0]}" if extra else None


def build_network(
    patch_size: int, out_dim: int = DESCRIPTOR_DIM, *, generator: torch.Generator | None = None
) -> PatchNetwork:
    """A freshly initialized patch network for ``patch_size`` ∈ PATCH_SIZES (ValueError otherwise).

    ``generator`` makes the initialization reproducible without touching the global RNG.
    """
    return PatchNetwork(patch_size, out_dim, generator=generator)


class Decoder(nn.Module):
    """The linear decoder used only in teacher pretraining: (N, in_dim) → (N, out_dim).

    It maps a teacher descriptor onto the 512-d ResNet-18 feature it distils (docs/method.md §3).
    PyTorch's default ``nn.Linear`` initialization.
    """

    def __init__(self, in_dim: int = 128, out_dim: int = 512) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, descriptors: torch.Tensor) -> torch.Tensor:
        return self.linear(descriptors)


def count_macs(patch_size: int, height: int, width: int, *, out_dim: int = 128) -> int:
    """Multiply–accumulates of ``PatchNetwork.dense`` on one height×width image.

    Counts the conv weights × output positions of the dense form (bias adds, activations and
    max-pools are not counted). At 256×256: about 202, 118 and 185 GMAC for p = 17, 33, 65
    (docs/method.md §2).
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be at least 1×1, got {height}×{width}")
    layers = layer_plan(patch_size, out_dim)
    grow = _receptive_field(layers) - 1
    h, w = height + grow, width + grow  # the padded input
    macs = 0
    for layer in layers:
        shrink = layer.dilation * (layer.kernel - 1)
        h, w = h - shrink, w - shrink
        if layer.kind == "conv":
            macs += layer.in_channels * layer.out_channels * layer.kernel**2 * h * w
    assert (h, w) == (height, width)
    return macs


def _check_images(x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")


def _pad(x: torch.Tensor, pad: tuple[int, int, int, int], mode: str) -> torch.Tensor:
    """Pad (N, C, H, W) by (top, bottom, left, right) pixels; reflect works for any pad size."""
    top, bottom, left, right = pad
    if mode == "zeros":
        return F.pad(x, (left, right, top, bottom))
    rows = _source_index(x.shape[2], top, bottom, mode, x.device)
    cols = _source_index(x.shape[3], left, right, mode, x.device)
    return x.index_select(2, rows).index_select(3, cols)


def _source_index(n: int, before: int, after: int, mode: str, device: torch.device) -> torch.Tensor:
    """For each position of a padded axis, the index of the pixel of the n-pixel axis it copies."""
    i = torch.arange(-before, n + after, device=device)
    if mode == "replicate" or n == 1:
        return i.clamp(0, n - 1)
    # reflect: the mirrored extension is periodic with period 2(n - 1).
    period = 2 * (n - 1)
    j = i.remainder(period)
    return torch.where(j < n, j, period - j)
