"""Tests of stad.networks: architecture, parameter counts, dense/patch equality, MAC counts.

The reference for ``dense`` is deliberately naive and independent of its code: pad the image with
``numpy.pad``, cut the p×p patch centred at every pixel, and run the strided ``forward`` on each.
Float32 with atol 1e-4 (descriptors are of order 1-10) keeps the patch-wise reference fast enough.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from stad.networks import (
    PADDING_MODES,
    PATCH_SIZES,
    Decoder,
    PatchNetwork,
    build_network,
    count_macs,
    planned_shapes,
)

NUMPY_MODE = {"reflect": "reflect", "replicate": "edge", "zeros": "constant"}


def _network(patch_size: int, seed: int, out_dim: int = 128) -> PatchNetwork:
    return build_network(patch_size, out_dim, generator=torch.Generator().manual_seed(seed)).eval()


def _images(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _padded(net: PatchNetwork, images: torch.Tensor, mode: str) -> torch.Tensor:
    """The images padded so that padded[r:r+p, c:c+p] is the patch centred at (r, c)."""
    a = (net.patch_size - 1) // 2
    b = net.patch_size - 1 - a
    pad = ((0, 0), (0, 0), (a, b), (a, b))
    return torch.from_numpy(np.pad(images.numpy(), pad, mode=NUMPY_MODE[mode]))


@torch.no_grad()
def _patchwise(net: PatchNetwork, images: torch.Tensor, mode: str) -> torch.Tensor:
    """``forward`` on the patch centred at every pixel: (N, 3, H, W) → (N, d, H, W)."""
    n, _, h, w = images.shape
    p = net.patch_size
    columns = F.unfold(_padded(net, images, mode), p)  # (N, 3·p·p, H·W), (channel, row, col) order
    patches = columns.transpose(1, 2).reshape(n * h * w, 3, p, p)
    out = torch.cat([net(chunk) for chunk in patches.split(256)])  # (N·H·W, d)
    return out.reshape(n, h, w, -1).permute(0, 3, 1, 2)


# --- architecture -------------------------------------------------------------------------------


@pytest.mark.parametrize("patch_size", PATCH_SIZES)
@pytest.mark.parametrize("out_dim", [128, 16])
def test_forward_shape(patch_size: int, out_dim: int) -> None:
    net = _network(patch_size, seed=0, out_dim=out_dim)
    out = net(_images((3, 3, patch_size, patch_size), seed=1))
    assert out.shape == (3, out_dim)
    assert (net.patch_size, net.out_dim) == (patch_size, out_dim)


@pytest.mark.parametrize("patch_size", PATCH_SIZES)
def test_forward_rejects_wrong_shapes(patch_size: int) -> None:
    net = _network(patch_size, seed=0)
    p = patch_size
    for shape in [(1, 3, p + 1, p), (1, 3, p, p - 1), (1, 1, p, p), (3, p, p)]:
        with pytest.raises(ValueError, match="expected"):
            net(torch.zeros(shape))


# Hand counts from the table in docs/method.md §1: weights k·k·c_in·c_out plus c_out biases
# per conv.
#   p=17: 6·6·3·128+128 + 5·5·128·256+256 + 5·5·256·256+256 + 4·4·256·128+128           = 2 996 480
#   p=33: 5·5·3·128+128 + 5·5·128·256+256 + 2·2·256·256+256 + 4·4·256·128+128           = 1 616 000
#   p=65: 5·5·3·128+128 + 5·5·128·128+128 + 5·5·128·256+256 + 4·4·256·256+256 + 256·128+128
#                                                                                       = 2 320 640
@pytest.mark.parametrize(
    ("patch_size", "exact", "paper"),
    [(17, 2_996_480, 3.0e6), (33, 1_616_000, 1.6e6), (65, 2_320_640, 2.3e6)],
)
def test_parameter_counts(patch_size: int, exact: int, paper: float) -> None:
    count = sum(t.numel() for t in _network(patch_size, seed=0).parameters())
    assert count == exact
    assert abs(count - paper) / paper < 0.02  # the paper's rounded figures


@pytest.mark.parametrize("bad", [0, 16, 32, 64, 129, -17])
def test_bad_patch_size(bad: int) -> None:
    with pytest.raises(ValueError, match="17, 33, 65"):
        build_network(bad)
    with pytest.raises(ValueError, match="17, 33, 65"):
        count_macs(bad, 8, 8)


@pytest.mark.parametrize(("patch_size", "window"), [(17, 17), (33, 32), (65, 60)])
def test_floor_pooling_window(patch_size: int, window: int) -> None:
    # With floor pooling the network reads only the top-left window×window of its patch.
    net = _network(patch_size, seed=0)
    assert net.receptive_field == window
    patch = _images((1, 3, patch_size, patch_size), seed=1)
    outside = patch.clone()
    outside[:, :, window:, :] = 7.0
    outside[:, :, :, window:] = -7.0
    inside = patch.clone()
    inside[:, :, window - 1, window - 1] += 1.0
    with torch.no_grad():
        assert torch.equal(net(outside), net(patch))
        assert not torch.allclose(net(inside), net(patch))


def test_initialization_is_reproducible() -> None:
    a, b, c = _network(33, seed=5), _network(33, seed=5), _network(33, seed=6)
    for (name, ta), tb, tc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(ta, tb), name
        if name.endswith("weight"):
            assert not torch.equal(ta, tc), name
        else:
            assert not ta.any(), name  # biases start at zero


def test_decoder_shape() -> None:
    torch.manual_seed(0)
    decoder = Decoder()
    out = decoder(_images((5, 128), seed=1))
    assert out.shape == (5, 512)
    assert sum(t.numel() for t in decoder.parameters()) == 128 * 512 + 512


# --- dense extraction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch_size", "height", "width"), [(17, 13, 19), (33, 13, 19), (65, 9, 11)]
)
def test_dense_equals_patchwise_at_every_pixel(patch_size: int, height: int, width: int) -> None:
    # Sizes that are not multiples of the pooling strides (4 for p=33, 8 for p=65).
    net = _network(patch_size, seed=0)
    images = _images((2, 3, height, width), seed=1)
    with torch.no_grad():
        dense = net.dense(images)
    assert dense.shape == (2, 128, height, width)
    torch.testing.assert_close(dense, _patchwise(net, images, "reflect"), rtol=1e-5, atol=1e-4)


def test_dense_equals_patchwise_float64_tight() -> None:
    # In float64 the two evaluations agree to rounding, not just to float32's 1e-4.
    net = _network(33, seed=7).double()
    images = _images((2, 3, 5, 6), seed=8).double()
    with torch.no_grad():
        dense = net.dense(images)
    torch.testing.assert_close(dense, _patchwise(net, images, "reflect"), rtol=0, atol=1e-10)


def test_dense_equals_patchwise_tall_image_p65() -> None:
    # 70 rows: every row phase mod 8 several times, and rows whose 60-pixel window is wholly inside.
    net = _network(65, seed=2)
    images = _images((2, 3, 70, 4), seed=3)
    with torch.no_grad():
        dense = net.dense(images)
    torch.testing.assert_close(dense, _patchwise(net, images, "reflect"), rtol=1e-5, atol=1e-4)


def test_dense_equals_patchwise_sampled_pixels_large_p65() -> None:
    # A 75×78 image, checked at the corners, the centre and random pixels (interior in both axes).
    net = _network(65, seed=4)
    images = _images((2, 3, 75, 78), seed=5)
    with torch.no_grad():
        dense = net.dense(images)
    padded = _padded(net, images, "reflect")
    rng = np.random.default_rng(6)
    pixels = [(0, 0), (0, 77), (74, 0), (74, 77), (37, 39)]
    pixels += [tuple(int(v) for v in rc) for rc in rng.integers((75, 78), size=(20, 2))]
    patches = torch.stack([padded[:, :, r : r + 65, c : c + 65] for r, c in pixels], dim=1)
    with torch.no_grad():
        expected = net(patches.reshape(-1, 3, 65, 65)).reshape(2, len(pixels), 128)
    got = torch.stack([dense[:, :, r, c] for r, c in pixels], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", PADDING_MODES)
def test_padding_modes(mode: str) -> None:
    net = _network(17, seed=0)
    images = _images((2, 3, 6, 7), seed=1)
    with torch.no_grad():
        dense = net.dense(images, padding_mode=mode)
    torch.testing.assert_close(dense, _patchwise(net, images, mode), rtol=1e-5, atol=1e-4)


def test_padding_modes_differ_at_the_border_only() -> None:
    net = _network(17, seed=0)
    images = _images((1, 3, 20, 20), seed=1)
    with torch.no_grad():
        outs = [net.dense(images, padding_mode=mode) for mode in PADDING_MODES]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            # pixels 8..11 see no padding (a = 8 on each side), the others do.
            torch.testing.assert_close(outs[i][..., 8:12, 8:12], outs[j][..., 8:12, 8:12])
            assert not torch.allclose(outs[i][..., 0, 0], outs[j][..., 0, 0])


def test_default_padding_is_reflect() -> None:
    net = _network(33, seed=0)
    images = _images((1, 3, 5, 6), seed=1)
    with torch.no_grad():
        assert torch.equal(net.dense(images), net.dense(images, padding_mode="reflect"))


@pytest.mark.parametrize("patch_size", PATCH_SIZES)
@pytest.mark.parametrize(("height", "width"), [(1, 1), (1, 5), (5, 2), (3, 4)])
def test_dense_tiny_images(patch_size: int, height: int, width: int) -> None:
    # The pads (up to 32 pixels) exceed these images: reflection repeats as numpy.pad's does.
    net = _network(patch_size, seed=0)
    images = _images((2, 3, height, width), seed=1)
    for mode in ["reflect", "replicate"] if (height, width) == (1, 5) else ["reflect"]:
        with torch.no_grad():
            dense = net.dense(images, padding_mode=mode)
        assert dense.shape == (2, 128, height, width)
        torch.testing.assert_close(dense, _patchwise(net, images, mode), rtol=1e-5, atol=1e-4)


def test_dense_rejects_bad_input() -> None:
    net = _network(17, seed=0)
    with pytest.raises(ValueError, match="padding_mode"):
        net.dense(torch.zeros(1, 3, 4, 4), padding_mode="circular")  # type: ignore[arg-type]
    for shape in [(3, 4, 4), (1, 1, 4, 4), (1, 3, 0, 4)]:
        with pytest.raises(ValueError, match="expected"):
            net.dense(torch.zeros(shape))


def test_dense_gradient_reaches_every_parameter() -> None:
    # Students train through dense (docs/method.md §4): every parameter must get a gradient.
    net = _network(65, seed=0)
    net.dense(_images((1, 3, 4, 5), seed=1)).square().mean().backward()
    for name, param in net.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# --- cost ---------------------------------------------------------------------------------------


def test_count_macs_by_hand_p17() -> None:
    # p=17 has no pools: the 256×256 image is padded to 272×272 and each conv shrinks it by k - 1.
    expected = (
        6 * 6 * 3 * 128 * 267**2
        + 5 * 5 * 128 * 256 * 263**2
        + 5 * 5 * 256 * 256 * 259**2
        + 4 * 4 * 256 * 128 * 256**2
    )
    assert count_macs(17, 256, 256) == expected


@pytest.mark.parametrize("patch_size", PATCH_SIZES)
def test_count_macs_matches_torch_flop_counter(patch_size: int) -> None:
    # torch's FlopCounterMode counts 2 FLOPs per conv multiply-accumulate.
    net = _network(patch_size, seed=0)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net.dense(_images((1, 3, 7, 9), seed=1))
    assert counter.get_total_flops() == 2 * count_macs(patch_size, 7, 9)


@pytest.mark.parametrize(
    ("patch_size", "method_gmac", "tolerance"), [(17, 202, 0.005), (33, 118, 0.03), (65, 185, 0.06)]
)
def test_count_macs_near_method_figures(
    patch_size: int, method_gmac: float, tolerance: float
) -> None:
    # docs/method.md §2 quotes ≈202/118/185 GMAC at 256×256; our exact counts (checked against
    # torch's flop counter above) are 201.9/115.5/175.2. We pad only the pixels the network
    # reads (16/31/59 in all, not p - 1) and the stride-1 pools shrink the map too; padding by
    # p - 1 and ignoring the pools gives 201.9/118.0/187.3, close to docs/method.md's figures,
    # which are approximate.
    gmac = count_macs(patch_size, 256, 256) / 1e9
    assert abs(gmac - method_gmac) / method_gmac < tolerance
    ensemble = sum(4 * count_macs(p, 256, 256) for p in PATCH_SIZES) / 1e12
    assert abs(ensemble - 2.0) < 0.05  # method.md: 3 scales × (1 teacher + 3 students) ≈ 2.0 TMAC


@pytest.mark.parametrize("patch_size", PATCH_SIZES)
def test_the_planned_shapes_are_the_networks_and_building_one_keeps_the_global_stream(
        patch_size: int) -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    net = build_network(patch_size, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.rand(3), expected)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == \
        planned_shapes(patch_size, 64)
