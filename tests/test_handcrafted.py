"""Tests of stad.handcrafted: the fixed descriptor bank that a teacher can distil offline.

Patches are random standardized tensors or hand-built ramps and half-planes whose features can
be worked out by hand (a horizontal ramp has every gradient at angle 0, so all its orientation
mass lies in bin 0).
"""

from __future__ import annotations

import pytest
import torch

from stad.handcrafted import BLOCKS, CANONICAL, DIM, HandcraftedBank


def _smooth_patches(n: int, p: int, seed: int) -> torch.Tensor:
    # Smooth random fields: 6×6 noise upsampled to p×p, standardized units.
    g = torch.Generator().manual_seed(seed)
    small = torch.randn(n, 3, 6, 6, generator=g)
    return torch.nn.functional.interpolate(small, size=(p, p), mode="bicubic",
                                           align_corners=False)


@pytest.mark.parametrize("p", [17, 33, 65])
def test_shapes_do_not_depend_on_patch_size(p: int) -> None:
    bank = HandcraftedBank(p)
    out = bank(_smooth_patches(5, p, seed=p))
    assert out.shape == (5, DIM) and bank.dim == DIM
    assert DIM == sum(BLOCKS.values()) == 484 and 256 <= DIM <= 768
    # The patch network reads only its receptive field, and so does the bank.
    assert bank.crop == {17: 17, 33: 32, 65: 60}[p]
    assert torch.isfinite(out).all()


def test_deterministic_and_independent_of_batch() -> None:
    x = _smooth_patches(6, 33, seed=1)
    a, b = HandcraftedBank(33), HandcraftedBank(33)
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), a(x))
    # Each patch's features depend on that patch only.
    torch.testing.assert_close(a(x[2:3]), a(x)[2:3])


def test_finite_on_degenerate_patches() -> None:
    bank = HandcraftedBank(17).fit(_smooth_patches(64, 17, seed=2))
    for x in (torch.zeros(2, 3, 17, 17), torch.full((2, 3, 17, 17), 1e4),
              torch.randn(2, 3, 17, 17, generator=torch.Generator().manual_seed(0)) * 1e3):
        assert torch.isfinite(bank(x)).all() and torch.isfinite(bank.raw(x)).all()
    # A constant patch: colour means are its value, stds ~0, no gradient, no blob, no texture.
    raw = bank.raw(torch.full((1, 3, 17, 17), 0.5))[0]
    assert torch.allclose(raw[:63], torch.full((63,), 0.5), atol=1e-5)
    assert raw[63:126].max() < 2e-3  # sqrt(0 + 1e-6)
    start = BLOCKS["colour"]
    assert raw[start: start + BLOCKS["orientation"] + BLOCKS["blob"]].abs().max() < 1e-4


def test_orientation_histogram_by_hand() -> None:
    # A ramp rising along x (columns) has every gradient at angle 0: bin 0 of 8 holds all the
    # mass of the whole-patch histogram; rising along y (rows) puts it in bin 2 (90°); falling
    # along x in bin 4 (180°).
    ramp = torch.linspace(-1, 1, 17)
    bank = HandcraftedBank(17)
    start = BLOCKS["colour"]  # the first 8 orientation values: σ = 1, the 1×1 cell
    for image, expected in ((ramp.expand(17, 17), 0), (ramp[:, None].expand(17, 17), 2),
                            (-ramp.expand(17, 17), 4)):
        hist = bank.raw(image.expand(1, 3, 17, 17))[0, start: start + 8]
        assert int(hist.argmax()) == expected
        assert hist[expected] > 0.95 * hist.sum()


def test_translation_sensitive() -> None:
    # A bright left half and a bright right half have the same whole-patch colour mean and
    # orientation mass, but the grid cells see where the bright side is.
    left = torch.full((1, 3, 32, 32), -1.0)
    left[..., :16] = 1.0
    right = left.flip(-1)
    bank = HandcraftedBank(33).fit(_smooth_patches(128, 33, seed=3))
    a, b = bank.raw(left)[0], bank.raw(right)[0]
    torch.testing.assert_close(a[:3], b[:3])  # 1×1 colour means: both 0
    assert (bank(left) - bank(right)).norm() > 0.5 * bank(left).norm()

    # A patch moved by 3 pixels on a smooth field differs far more than one with noise alone.
    field = _smooth_patches(1, 40, seed=4)
    x, moved = field[..., :33, :33], field[..., 3:36, :33]
    noisy = x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    assert (bank(x) - bank(moved)).norm() > 5 * (bank(x) - bank(noisy)).norm()


def test_fit_standardizes_and_balances_blocks() -> None:
    patches = _smooth_patches(512, 17, seed=6)
    bank = HandcraftedBank(17).fit(patches)
    out = bank(patches)
    assert out.mean(0).abs().max() < 1e-3
    # Every block carries the same total variance, DIM / 5 (each dimension has unit variance
    # before the block weight; the bank's std is unbiased, as here).
    start = 0
    for size in BLOCKS.values():
        total = out[:, start: start + size].var(0).sum().item()
        assert total == pytest.approx(DIM / len(BLOCKS), rel=1e-3)
        start += size


def test_whitened_target_has_unit_covariance_along_the_leading_directions() -> None:
    patches = _smooth_patches(600, 17, seed=8)
    plain = HandcraftedBank(17).fit(patches)
    bank = HandcraftedBank(17, components=24).fit(patches)
    assert bank.dim == 24 and plain.dim == DIM
    out = bank(patches)
    assert out.shape == (600, 24)
    torch.testing.assert_close(torch.cov(out.T), torch.eye(24), atol=1e-4, rtol=0)
    # It is the standardized bank's top principal subspace: the whitened outputs, scaled
    # back by their std in the plain bank, reconstruct the part of the plain output that
    # the 24 leading directions explain, i.e. projecting the plain output on that subspace
    # loses less variance than on any other 24 directions (here: than on the first 24 axes).
    z = plain(patches)
    z = z - z.mean(0)
    basis, _ = torch.linalg.qr(torch.linalg.lstsq(z, out - out.mean(0)).solution)
    kept = (z @ basis).pow(2).sum()
    assert kept > 0.95 * torch.linalg.svdvals(z)[:24].pow(2).sum()
    assert kept > (z[:, :24]).pow(2).sum()
    # Signs fixed: each direction's largest entry is positive.
    top = bank.projection.gather(0, bank.projection.abs().argmax(0, keepdim=True))
    assert (top > 0).all()
    # Deterministic, signs included.
    torch.testing.assert_close(HandcraftedBank(17, components=24).fit(patches)(patches), out)


def test_whitening_refuses_too_few_patches_and_too_many_components() -> None:
    with pytest.raises(ValueError, match="more than 24 patches"):
        HandcraftedBank(17, components=24).fit(_smooth_patches(20, 17, seed=9))
    with pytest.raises(ValueError, match="components"):
        HandcraftedBank(17, components=DIM + 1)


def test_canonical_size_is_used_for_every_scale() -> None:
    # Upsampling to CANONICAL for p = 17 and downsampling for p = 65 read the same content: a
    # p=65 patch that is the p=17 patch blown up gives nearly the same raw colour block.
    small = _smooth_patches(1, 17, seed=7)
    big = torch.nn.functional.interpolate(small, size=(60, 60), mode="bilinear",
                                          align_corners=False)
    big = torch.nn.functional.pad(big, (0, 5, 0, 5), mode="replicate")
    a = HandcraftedBank(17).raw(small)[0, :63]
    b = HandcraftedBank(65).raw(big)[0, :63]
    assert CANONICAL == 32
    torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)
