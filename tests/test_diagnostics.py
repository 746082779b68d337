"""Tests of stad.diagnostics and ``stad inspect-teacher``: collapse is detected, a random
teacher is not flagged.

Collapsed teachers are built by hand from a random p=17 network: zeroing its last conv's
weights leaves only the bias (a constant output), and giving every output channel of the last
conv the same weights and bias makes all 128 channels equal (rank 1). The "natural-ish" images
are photographs scikit-image ships (no download).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data as skdata
from typer.testing import CliRunner

from stad.cli import app
from stad.diagnostics import collapse_warnings, descriptor_statistics, teacher_diagnostics
from stad.images import to_tensor
from stad.networks import build_network


def _photos(size: int = 64) -> torch.Tensor:
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    return torch.stack([to_tensor(np.asarray(p, dtype=np.float32) / 255, size=size)
                        for p in photos])


def _random_teacher(seed: int = 0) -> torch.nn.Module:
    return build_network(17, generator=torch.Generator().manual_seed(seed)).eval()


# --- the statistics on hand-made descriptors ---------------------------------------------------


def test_effective_rank_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    # Two orthogonal directions with equal variance: spectrum (½, ½) → exp(ln 2) = 2.
    a, b = torch.randn(4000, 1, generator=g), torch.randn(4000, 1, generator=g)
    two = torch.cat([a, b, torch.zeros(4000, 6)], dim=1)
    assert descriptor_statistics(two)["effective_rank"] == pytest.approx(2, abs=0.1)
    # One direction: rank 1, every live channel correlated ±1 (x, 2x + 1, −x).
    one = torch.cat([a, 2 * a + 1, -a], dim=1)
    stats = descriptor_statistics(one)
    assert stats["effective_rank"] == pytest.approx(1, abs=1e-6)
    assert stats["mean_abs_corr"] == pytest.approx(1, abs=1e-6)
    # Isotropic in 8 dimensions: close to 8 (sampling noise lowers it a little).
    iso = descriptor_statistics(torch.randn(20000, 8, generator=g))
    assert 7.9 < iso["effective_rank"] <= 8 and iso["mean_abs_corr"] < 0.03
    # One loud channel and seven quiet independent ones: the covariance sees about one
    # direction, the correlation matrix (what standardized students see) about eight.
    loud = torch.randn(20000, 8, generator=g) * torch.tensor([100.0] + [1.0] * 7)
    stats = descriptor_statistics(loud)
    assert stats["effective_rank"] < 1.1 and stats["effective_rank_corr"] > 7.9
    # Constant: rank 0, all channels constant, correlation undefined → 1.
    const = descriptor_statistics(torch.ones(50, 4) * 3)
    assert const == {"effective_rank": 0.0, "effective_rank_corr": 0.0, "dim": 4,
                     "mean_abs_corr": 1.0, "constant_fraction": 1.0}
    # Half the channels constant.
    assert descriptor_statistics(torch.cat([torch.randn(100, 2, generator=g),
                                            torch.zeros(100, 2)], 1))["constant_fraction"] == 0.5


# --- teachers ----------------------------------------------------------------------------------


def test_random_teacher_is_not_flagged() -> None:
    diag = teacher_diagnostics(_random_teacher(), _photos(), n_patches=128)
    assert diag["dim"] == 128 and diag["retrieval_chance"] == 1 / 128
    # Measured: effective rank 19.3 of 128 (of the correlation matrix: higher), mean |corr|
    # 0.23, retrieval 0.53 (chance 0.008).
    assert diag["effective_rank"] > 0.05 * 128 and diag["effective_rank_corr"] > 0.05 * 128
    assert diag["constant_fraction"] == 0.0 and diag["mean_abs_corr"] < 0.9
    assert diag["retrieval_top1"] > 10 * diag["retrieval_chance"]
    assert collapse_warnings(diag) == []
    # The same call gives the same figures.
    assert teacher_diagnostics(_random_teacher(), _photos(), n_patches=128) == diag


def test_constant_teacher_is_flagged() -> None:
    net = _random_teacher()
    with torch.no_grad():
        net.convs[-1].weight.zero_()  # output = bias for every patch
    diag = teacher_diagnostics(net, _photos(), n_patches=64)
    assert diag["effective_rank"] == 0.0 and diag["constant_fraction"] == 1.0
    assert diag["retrieval_top1"] == 0.0  # every distance ties: no unique nearest neighbour
    lines = collapse_warnings(diag)
    assert len(lines) == 4 and all(line.startswith("teacher p=17: ") for line in lines)
    assert any("effective rank 0.0 of 128" in line for line in lines)
    assert all("another --target" in line for line in lines)


def test_rank_one_teacher_is_flagged() -> None:
    net = _random_teacher()
    with torch.no_grad():
        last = net.convs[-1]
        last.weight.copy_(last.weight[:1].expand_as(last.weight))
        last.bias.fill_(0.0)
    diag = teacher_diagnostics(net, _photos(), n_patches=64)
    assert diag["effective_rank"] == pytest.approx(1.0, abs=1e-3)
    assert diag["effective_rank_corr"] == pytest.approx(1.0, abs=1e-3)
    assert diag["mean_abs_corr"] == pytest.approx(1.0, abs=1e-6)
    lines = collapse_warnings(diag)
    assert any("effective rank 1.0 of 128" in line for line in lines)
    assert any("mean |corr| 1.00" in line for line in lines)


def test_retrieval_counts_the_right_neighbour() -> None:
    # With no shift and no noise the copy is the patch itself: a random teacher retrieves all
    # (distinct patches of photographs have distinct descriptors).
    diag = teacher_diagnostics(_random_teacher(), _photos(), n_patches=32, shift=0, noise=0.0)
    assert diag["retrieval_top1"] == 1.0
    with pytest.raises(ValueError, match="too small"):
        teacher_diagnostics(_random_teacher(), _photos(size=20), shift=2)


# --- the command -------------------------------------------------------------------------------


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env={"STAD_TEACHER__IMAGE_SIZE": "48"})
    return result.exit_code, result.stdout, result.stderr


def test_inspect_random_teacher_json(tiny_data: Path) -> None:
    code, out, _ = _run("inspect-teacher", "--teacher", "random", "--dataset", "synthetic",
                        "--root", str(tiny_data), "--category", "grain", "--patch-sizes", "17",
                        "--patches", "32", "--json")
    assert code == 0
    record = json.loads(out)
    assert record["teacher"]["source"] == "random"
    assert record["data"]["n_images"] == 6 and record["data"]["image_size"] == 48
    diag = record["diagnostics"]["p17"]
    assert diag["n_patches"] == 32 and 0 < diag["effective_rank"] <= 128
    assert math.isclose(diag["retrieval_chance"], 1 / 32)


def test_inspect_collapsed_artifact_warns(tiny_data: Path, tmp_path: Path) -> None:
    from stad.artifacts import Artifact, save_artifact
    from stad.images import preprocessing
    from stad.model import teacher_tensors

    net = _random_teacher()
    with torch.no_grad():
        net.convs[-1].weight.zero_()
    path = tmp_path / "flat.safetensors"
    save_artifact(path, Artifact(kind="teacher", tensors=teacher_tensors({17: net}), config={},
                                 preprocessing=preprocessing(32), seed=0,
                                 info={"target": "none"}))
    code, out, err = _run("inspect-teacher", "--teacher", str(path), "--dataset", "synthetic",
                          "--root", str(tiny_data), "--category", "grain", "--patches", "16")
    assert code == 0, err
    assert "p17: effective rank 0.0/128" in out and "[collapse?]" in out
    assert "warning: teacher p=17: descriptors span few directions" in err


@pytest.mark.parametrize(("args", "code", "words"), [
    (["--teacher", "missing.safetensors"], 4, "does not exist"),
    (["--teacher", "random", "--patches", "1"], 2, "at least 2"),
    (["--teacher", "random", "--patch-sizes", "65"], 2, "smaller than patch size 65"),
])
def test_inspect_errors(tiny_data: Path, args: list[str], code: int, words: str) -> None:
    got, _, err = _run("inspect-teacher", *args, "--dataset", "synthetic", "--root",
                       str(tiny_data), "--category", "grain")
    assert got == code and words in err
