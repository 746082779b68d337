"""Scoring in tiles (``Scale.error_and_variance(tile_size=...)``) gives the untiled map.

Each tile is a crop of the once-padded image that carries its receptive field, so tiled and
untiled maps are the same arithmetic; float64 and 1e-10 leave room only for rounding (kernels
may sum in another order for another input shape).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from stad.cli import app
from stad.config import ScoreSettings
from stad.model import Inference, Networks, Scale
from stad.networks import PATCH_SIZES, build_network


def _model(seed: int, sizes=PATCH_SIZES, m: int = 2) -> Networks:
    g = torch.Generator().manual_seed(seed)
    scales = {}
    for p in sizes:
        teacher, *students = [build_network(p, 8, generator=g).double().eval()
                              for _ in range(m + 1)]
        mean = torch.randn(8, generator=g)
        scales[f"p{p}"] = Scale(p, teacher, students, mean, torch.rand(8, generator=g) + 0.5)
    return Networks(scales=scales, preprocessing={})


def _x(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(("batch", "height", "width", "tile"), [(1, 21, 18, 16), (2, 9, 7, 5)])
def test_tiled_equals_untiled_at_every_scale(batch: int, height: int, width: int, tile: int
                                             ) -> None:
    # Sizes that are not multiples of the tile: the last row and column of tiles are partial.
    model = _model(seed=height)
    x = _x((batch, 3, height, width), seed=width)  # a batch: tiles are cut image by image
    with torch.inference_mode():
        whole = model.error_and_variance(x)
        model.inference = Inference(tile_size=tile)
        tiled = model.error_and_variance(x)
    for p in PATCH_SIZES:
        for a, b in zip(tiled[f"p{p}"], whole[f"p{p}"], strict=True):
            assert a.shape == (batch, height, width)
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_tiled_fused_equals_untiled_separate() -> None:
    model = _model(seed=1, sizes=(33,))
    x = _x((1, 3, 14, 11), seed=2)
    with torch.inference_mode():
        e, v = model.scales["p33"].error_and_variance(x)
        et, vt = model.scales["p33"].error_and_variance(x, tile_size=8, fused=True)
    torch.testing.assert_close(et, e, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(vt, v, rtol=1e-10, atol=1e-10)


def test_tiles_see_their_context() -> None:
    # A change at one pixel moves the tiled map exactly where it moves the untiled one: in the
    # pixels whose receptive field holds it, across tile borders (a tile without its halo
    # would miss the change next to its border).
    model = _model(seed=3, sizes=(17,))
    x = _x((1, 3, 24, 24), seed=4)
    y = x.clone()
    y[0, :, 8, 8] += 5.0  # a pixel at the corner of four 8×8 tiles
    with torch.inference_mode():
        model.inference = Inference(tile_size=8)
        moved = (model.error_and_variance(y)["p17"][0]
                 - model.error_and_variance(x)["p17"][0]).abs()
    changed = (moved > 1e-9)[0].nonzero()
    # p = 17 reads rows r−8 .. r+8, so the pixel (8, 8) reaches rows and cols 0 .. 16.
    assert changed.min().item() == 0 and changed.max().item() == 16


def test_tile_size_setting() -> None:
    assert ScoreSettings().tile_size == 512  # 256² images run untiled, larger ones in tiles
    assert ScoreSettings(tile_size=0).tile_size is None  # 0 / "none": never tile
    assert ScoreSettings(tile_size="none").tile_size is None
    assert ScoreSettings(tile_size=64).tile_size == 64


def test_tile_size_below_64_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"")  # never read: the setting is refused first
    result = CliRunner().invoke(app, ["score", "--tile-size", "10", str(image)])
    assert result.exit_code == 2
    assert "score.tile_size" in result.stderr and "64" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
