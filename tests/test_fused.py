"""The fused form of a scale's networks (``stad.networks.FusedNetworks``) and its use in
``stad.model.Scale``: one grouped pass must equal the separate ``dense`` passes.

Float64 and 1e-10: the two forms do the same products and sums, so only rounding (of order 1e-13
here, descriptors being of order 1–100) may differ.
"""

from __future__ import annotations

import pytest
import torch

from stad.model import Scale
from stad.networks import PATCH_SIZES, FusedNetworks, PatchNetwork, build_network


def _nets(p: int, k: int, seed: int, out_dim: int = 8) -> list[PatchNetwork]:
    g = torch.Generator().manual_seed(seed)
    return [build_network(p, out_dim, generator=g).double().eval() for _ in range(k)]


@pytest.mark.parametrize("patch_size", PATCH_SIZES)
def test_fused_equals_separate_dense_passes(patch_size: int) -> None:
    nets = _nets(patch_size, 3, seed=patch_size)
    x = torch.randn(2, 3, 13, 11, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.inference_mode():
        fused = FusedNetworks(nets).dense(x)
        assert fused.shape == (2, 3, 8, 13, 11)
        for k, net in enumerate(nets):
            torch.testing.assert_close(fused[:, k], net.dense(x), rtol=0, atol=1e-10)


def test_fused_networks_must_match() -> None:
    with pytest.raises(ValueError, match="one patch size"):
        FusedNetworks([*_nets(17, 1, 0), *_nets(33, 1, 0)])
    with pytest.raises(ValueError, match="one patch size"):
        FusedNetworks([*_nets(17, 1, 0), *_nets(17, 1, 0, out_dim=4)])


@pytest.mark.parametrize("patch_size", PATCH_SIZES)
def test_scale_fused_error_and_variance(patch_size: int) -> None:
    teacher, *students = _nets(patch_size, 4, seed=7)
    scale = Scale(patch_size, teacher, students, torch.zeros(8), torch.ones(8))
    x = torch.randn(1, 3, 12, 15, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.inference_mode():
        e, v = scale.error_and_variance(x)
        ef, vf = scale.error_and_variance(x, fused=True)
    torch.testing.assert_close(ef, e, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(vf, v, rtol=1e-10, atol=1e-10)


def test_fused_copy_is_rebuilt_when_weights_change() -> None:
    teacher, *students = _nets(17, 3, seed=3)
    scale = Scale(17, teacher, students, torch.zeros(8), torch.ones(8))
    x = torch.randn(1, 3, 9, 9, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.inference_mode():
        first = scale.fused_networks()
        assert scale.fused_networks() is first  # unchanged weights: the cached copy
        e_before, _ = scale.error_and_variance(x, fused=True)
    # Students identical to the teacher (an in-place load): e and v must become 0.
    for s in scale.students:
        s.load_state_dict(teacher.state_dict())
    with torch.inference_mode():
        assert scale.fused_networks() is not first
        e, v = scale.error_and_variance(x, fused=True)
    assert e_before.abs().max() > 1e-3
    assert e.abs().max() < 1e-20 and v.abs().max() < 1e-20
