"""Tests of stad.training.teacher: teacher pretraining (docs/method.md §3) on tiny data, CPU only.

Images are smooth random fields (8×8 noise upsampled bicubically to 48×48) written by each test,
so that a patch shifted by two pixels still looks like itself. The ResNet-18 "backbone" is a
randomly initialized torchvision ResNet-18: the tests check plumbing (loading, hashing, errors,
which terms are on), not what an ImageNet-distilled teacher learns.
"""

from __future__ import annotations

import hashlib
import math
import pathlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from support import smooth_noise_samples
from torch import nn

import stad.training.imagebuffer as imagebuffer
import stad.training.targets
import stad.training.teacher as teacher_mod
from stad.config import resolve_settings
from stad.console import Reporter
from stad.errors import ArtifactError, DataError, StadError, TrainingError, UsageError
from stad.handcrafted import HandcraftedBank
from stad.model import load_teachers, teacher_tensors
from stad.training.teacher import (
    NO_BACKBONE_NOTE,
    compactness_loss,
    pretrain_teachers,
    resnet18_features,
    triplet_loss,
    variance_loss,
)


class _Task:
    def __init__(self, total: int) -> None:
        self.total = total
        self.losses: list[float] = []
        self.finished = False

    def advance(self, n: int = 1, **info: Any) -> None:
        if "loss" in info:
            self.losses.append(info["loss"])

    def done(self) -> None:
        self.finished = True


class Recorder(Reporter):
    """A reporter that keeps the notes and every task's per-iteration losses."""

    def __init__(self) -> None:
        super().__init__(None)
        self.notes: list[str] = []
        self.tasks: dict[str, _Task] = {}

    def note(self, text: str) -> None:
        self.notes.append(text)

    def task(self, description: str, total: int) -> _Task:  # type: ignore[override]
        self.tasks[description] = _Task(total)
        return self.tasks[description]


_samples = smooth_noise_samples


def _settings(seed: int = 0, **teacher: Any):
    # Diagnostics are off unless a test asks for them (they cost more than 3 iterations).
    values = {"patch_sizes": [17], "iterations": 3, "batch_size": 8, "image_size": 48,
              "target": "none", "diagnostic_patches": 0, **teacher}
    return resolve_settings({"seed": seed, "teacher": values}, environ={})


def _resnet18_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # torchvision draws its init from the global RNG
    return {k: v.contiguous() for k, v in torchvision.models.resnet18(weights=None)
            .state_dict().items()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- without a backbone ------------------------------------------------------------------------


def test_without_backbone_trains_on_metric_and_compactness(tmp_path: Path) -> None:
    rec = Recorder()
    teachers, info = pretrain_teachers(_settings(iterations=4), _samples(tmp_path), reporter=rec)

    assert NO_BACKBONE_NOTE in rec.notes
    assert info["distillation"] is False and info["backbone"] is None
    assert info["target"] == "none" and info["handcrafted"] is None
    # lambda_metric None means 1 without distillation; kd is off.
    assert info["lambdas"] == {"kd": 0.0, "metric": 1.0, "compact": 1.0, "variance": 0.0}
    assert info["data"]["n_images"] == 4 and info["iterations"] == 4
    loss = info["losses"]["p17"]
    assert math.isfinite(loss["first"]) and math.isfinite(loss["last"])
    assert len(loss["curve"]) == 4 and all(math.isfinite(v) for v in loss["curve"])
    assert loss["terms"]["kd"] == 0.0
    # One task per scale, advanced once per iteration with its loss.
    task = rec.tasks["teacher p=17"]
    assert task.total == 4 and len(task.losses) == 4 and task.finished
    assert task.losses[0] == loss["first"] and task.losses[-1] == loss["last"]

    net = teachers[17]
    assert not net.training and not any(q.requires_grad for q in net.parameters())
    assert net(torch.zeros(2, 3, 17, 17)).shape == (2, 128)


def test_explicit_lambda_metric_zero_without_backbone(tmp_path: Path) -> None:
    rec = Recorder()
    _, info = pretrain_teachers(_settings(iterations=1, lambda_metric=0.0), _samples(tmp_path),
                                reporter=rec)
    assert info["lambdas"] == {"kd": 0.0, "metric": 0.0, "compact": 1.0, "variance": 0.0}
    assert any("compactness only" in n for n in rec.notes)


def test_loss_falls(tmp_path: Path) -> None:
    # A tiny regression problem: distil a (random) ResNet-18 with compactness off and a larger
    # lr. On these sizes the signed compactness sum of a batch of 8 jumps by hundreds from one
    # iteration to the next, and the triplet term is already zero at initialization (random
    # descriptors are farther apart than the margin), so neither makes a clean falling curve.
    path = tmp_path / "resnet18.safetensors"
    save_file(_resnet18_state(), path)
    settings = _settings(iterations=12, lr=1e-3, lambda_compact=0.0, backbone_weights=str(path),
                         target="auto")
    rec = Recorder()
    pretrain_teachers(settings, _samples(tmp_path), reporter=rec)
    losses = rec.tasks["teacher p=17"].losses
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    # Adam's first step overshoots (iteration 2 is the highest); compare with the start too.
    assert last < 0.5 * first and last < 0.5 * losses[0], losses


def test_bf16_precision_runs_the_networks_under_autocast(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # teacher.precision = "bf16": the teacher and decoder forward under bf16 autocast (what
    # makes a distilled p = 65 affordable on a CPU with bf16 units), the losses and the weights
    # stay fp32, the loss still falls, and info says which precision ran.
    path = tmp_path / "resnet18.safetensors"
    save_file(_resnet18_state(), path)
    seen: list[tuple[bool, torch.dtype]] = []
    real = teacher_mod._Pretrainee.forward

    def spy(self, patches, batch):
        out = real(self, patches, batch)
        seen.append((torch.is_autocast_enabled("cpu"), out[0].dtype))
        return out

    monkeypatch.setattr(teacher_mod._Pretrainee, "forward", spy)
    rec = Recorder()
    settings = _settings(iterations=12, lr=1e-3, lambda_compact=0.0, backbone_weights=str(path),
                         target="auto", precision="bf16")
    teachers, info = pretrain_teachers(settings, _samples(tmp_path), reporter=rec)
    assert seen and all(enabled and dtype == torch.bfloat16 for enabled, dtype in seen)
    assert info["precision"] == "bf16"
    assert all(v.dtype == torch.float32 for v in teachers[17].state_dict().values())
    losses = rec.tasks["teacher p=17"].losses
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-4:]) < 0.5 * losses[0], losses
    # fp32, the default, runs without autocast.
    seen.clear()
    _, info = pretrain_teachers(_settings(), _samples(tmp_path))
    assert info["precision"] == "fp32" and seen and not any(enabled for enabled, _ in seen)


def test_same_seed_same_weights_other_seed_different(tmp_path: Path) -> None:
    samples = _samples(tmp_path)
    a, info_a = pretrain_teachers(_settings(seed=3), samples)
    b, info_b = pretrain_teachers(_settings(seed=3), samples)
    c, _ = pretrain_teachers(_settings(seed=4), samples)
    sa, sb, sc = (t[17].state_dict() for t in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert info_a["losses"]["p17"]["curve"] == info_b["losses"]["p17"]["curve"]
    assert not torch.equal(sa["convs.0.weight"], sc["convs.0.weight"])


def test_several_scales_round_trip_through_artifact_tensors(tmp_path: Path) -> None:
    settings = _settings(patch_sizes=[33, 65], iterations=1, batch_size=2, image_size=72)
    teachers, info = pretrain_teachers(settings, _samples(tmp_path, n=2, size=72))
    assert sorted(teachers) == [33, 65] and set(info["losses"]) == {"p33", "p65"}
    loaded = load_teachers(teacher_tensors(teachers))
    x = torch.randn(2, 3, 65, 65, generator=torch.Generator().manual_seed(0))
    for p in (33, 65):
        assert torch.equal(loaded[p](x[:, :, :p, :p]), teachers[p](x[:, :, :p, :p]))


# --- with a ResNet-18 backbone file ------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_backbone_file_turns_distillation_on(tmp_path: Path, suffix: str) -> None:
    state = _resnet18_state()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)

    backbone, sha = resnet18_features(path)
    assert sha == _sha256(path)
    assert not backbone.training and not any(q.requires_grad for q in backbone.parameters())
    reference = torchvision.models.resnet18(weights=None)
    reference.load_state_dict(state)
    reference.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), reference.eval()(x))  # the pooled 512-d feature

    rec = Recorder()
    _, info = pretrain_teachers(_settings(iterations=2, backbone_weights=str(path),
                                          target="auto"), _samples(tmp_path), reporter=rec)
    assert info["distillation"] is True and info["target"] == "resnet18"
    assert info["backbone"] == {"path": str(path), "sha256": _sha256(path)}
    # The paper's weights.
    assert info["lambdas"] == {"kd": 1.0, "metric": 0.0, "compact": 1.0, "variance": 0.0}
    assert not rec.notes
    assert info["losses"]["p17"]["terms"]["kd"] > 0 and math.isfinite(info["losses"]["p17"]["last"])


def test_backbone_with_other_head_and_old_batchnorm_keys_loads(tmp_path: Path) -> None:
    # fc is not used (any number of classes fits); pre-1.0 checkpoints lack num_batches_tracked.
    state = {k: v for k, v in _resnet18_state().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.zeros(10, 512), torch.zeros(10)
    path = tmp_path / "r18.safetensors"
    save_file(state, path)
    backbone, _ = resnet18_features(path)
    assert backbone(torch.zeros(1, 3, 64, 64)).shape == (1, 512)


def _write(path: Path, write: Any) -> Path:
    write(path)
    return path


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        pytest.param(lambda d: d / "absent.pth", UsageError, "do not exist", id="missing"),
        pytest.param(lambda d: _write(d / "junk.pth", lambda p: p.write_bytes(b"not weights")),
                     ArtifactError, "cannot be loaded", id="garbage-pth"),
        pytest.param(lambda d: _write(d / "junk.safetensors", lambda p: p.write_bytes(b"x" * 64)),
                     ArtifactError, "not a readable safetensors", id="garbage-safetensors"),
        pytest.param(lambda d: _write(d / "linear.safetensors",
                                      lambda p: save_file({"weight": torch.zeros(3, 3)}, p)),
                     ArtifactError, "not a ResNet-18 state dict", id="linear"),
        pytest.param(lambda d: _write(d / "ckpt.pth", lambda p: torch.save(
            {"epoch": torch.tensor(3), "state_dict": {"w": torch.zeros(1)}}, p)),
                     ArtifactError, "not a state dict of tensors", id="checkpoint"),
        pytest.param(lambda d: _write(d / "obj.pth", lambda p: torch.save(
            {"x": pathlib.PurePosixPath("a")}, p)), ArtifactError, "weights only",
                     id="pickled-object"),
        pytest.param(lambda d: _write(d / "shape.pth", lambda p: torch.save(
            {**_resnet18_state(), "conv1.weight": torch.zeros(64, 3, 3, 3)}, p)),
                     ArtifactError, "not a ResNet-18 state dict", id="wrong-shape"),
        pytest.param(lambda d: _write(d / "r18.bin", lambda p: p.write_bytes(b"")), UsageError,
                     ".safetensors or .pth", id="suffix"),
        pytest.param(lambda d: d, UsageError, "must be a .safetensors", id="folder"),
    ],
)
def test_backbone_file_errors_name_the_file(tmp_path: Path, make: Any, error: type,
                                            words: str) -> None:
    path = make(tmp_path)
    with pytest.raises(error) as exc:
        resnet18_features(path)
    assert isinstance(exc.value, StadError)
    assert str(path) in str(exc.value) and words in str(exc.value)


def test_missing_keys_are_reported_briefly(tmp_path: Path) -> None:
    state = {k: v for k, v in _resnet18_state().items() if not k.startswith("layer4.")}
    path = tmp_path / "partial.safetensors"
    save_file(state, path)
    with pytest.raises(ArtifactError, match=r"missing keys layer4\..*in all\)"):
        resnet18_features(path)


def test_pickle_is_never_executed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A pickle whose loading would call pathlib.Path.touch: weights_only must refuse it.
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (pathlib.Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Evil()}, path)
    with pytest.raises(ArtifactError):
        resnet18_features(path)
    assert not marker.exists()


# --- refusals and failures ---------------------------------------------------------------------


def test_non_finite_loss_raises_training_error(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = imagebuffer.load_image

    def nan_image(path: Any) -> np.ndarray:
        image = real(path)
        image[:] = np.nan
        return image

    monkeypatch.setattr(imagebuffer, "load_image", nan_image)
    with pytest.raises(TrainingError, match=r"p=17, iteration 1 of 3"):
        pretrain_teachers(_settings(), _samples(tmp_path))


def test_patch_larger_than_image_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="image_size 48 is smaller than patch size 65"):
        pretrain_teachers(_settings(patch_sizes=[65]), _samples(tmp_path))


def test_metric_learning_needs_two_images(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="another image"):
        pretrain_teachers(_settings(), _samples(tmp_path, n=1))
    with pytest.raises(DataError, match="no images"):
        pretrain_teachers(_settings(), [])


# --- the loss terms on hand-computed cases -----------------------------------------------------


def test_compactness_loss_hand_computed() -> None:
    x = torch.tensor([1.0, -1.0, 2.0, -2.0])
    y = torch.tensor([1.0, 1.0, -1.0, -1.0])  # orthogonal to x after centring: c_xy = 0
    # Off-diagonal sum of the 2×2 correlation matrix: 2·c_12 (eps makes c_12 slightly < ±1).
    assert compactness_loss(torch.stack([x, 2 * x + 1], 1)).item() == pytest.approx(2, abs=1e-4)
    assert compactness_loss(torch.stack([x, -x], 1)).item() == pytest.approx(-2, abs=1e-4)
    assert compactness_loss(torch.stack([x, y], 1)).item() == pytest.approx(0, abs=1e-6)
    # Three copies of one dimension: all 6 off-diagonal entries are 1.
    assert compactness_loss(torch.stack([x, x, x], 1)).item() == pytest.approx(6, abs=1e-4)
    # Squared: Σ_{i≠j} c_ij² / (d − 1). ± copies are as bad as copies (d), uncorrelated is 0,
    # and the signed sum's floor (x, −x: −2, as low as it goes) is its ceiling.
    sq = {"squared": True}
    assert compactness_loss(torch.stack([x, x, x], 1), **sq).item() == pytest.approx(3, abs=1e-3)
    assert compactness_loss(torch.stack([x, -x], 1), **sq).item() == pytest.approx(2, abs=1e-3)
    assert compactness_loss(torch.stack([x, y], 1), **sq).item() == pytest.approx(0, abs=1e-6)
    # A general case against torch.corrcoef (z has correlation 0.6 with x; eps is negligible).
    z = 0.6 * x / x.norm() + 0.8 * y / y.norm()
    three = torch.stack([x, z, y.roll(1) - y.roll(1).mean()], 1)
    c = torch.corrcoef(three.T)
    expected = (c.pow(2).sum() - 3) / 2
    assert compactness_loss(three, **sq).item() == pytest.approx(expected.item(), abs=1e-4)


def test_triplet_loss_hand_computed() -> None:
    a = torch.tensor([[0.0, 0.0]])
    pos = torch.tensor([[1.0, 0.0]])
    # δ⁺ = 1; δ⁻ = min(‖a − n‖², ‖p⁺ − n‖²) = min(9, 4) = 4: max(0, 1 + 1 − 4) = 0.
    assert triplet_loss(a, pos, torch.tensor([[3.0, 0.0]]), margin=1.0).item() == 0.0
    # δ⁻ = min(2.25, 0.25) = 0.25 (the positive is the closer one): 1 + 1 − 0.25 = 1.75.
    assert triplet_loss(a, pos, torch.tensor([[1.5, 0.0]]), margin=1.0).item() == 1.75
    # Normalized (× sqrt(d)): the scale of each descriptor no longer matters.
    a2, p2, n2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 1.0]])
    expected = triplet_loss(a2, p2, n2, margin=1.0, normalize=True).item()
    assert triplet_loss(10 * a2, 3 * p2, 7 * n2, margin=1.0, normalize=True).item() == (
        pytest.approx(expected))
    # By hand: â = (√2, 0), p̂ = (1, 1), n̂ = (0, √2): δ⁺ = (√2 − 1)² + 1, ‖â − n̂‖² = 4,
    # ‖p̂ − n̂‖² = 1 + (1 − √2)² = δ⁺, so the loss is the margin, 1.
    assert expected == pytest.approx(1.0)


# --- targets, anti-collapse terms and diagnostics (issue 8) ------------------------------------


def test_auto_target_without_backbone_distils_the_handcrafted_bank(tmp_path: Path) -> None:
    rec = Recorder()
    teachers, info = pretrain_teachers(_settings(iterations=2, target="auto"),
                                       _samples(tmp_path), reporter=rec)
    assert teacher_mod.resolve_target(_settings(target="auto").teacher) == "handcrafted"
    assert info["target"] == "handcrafted" and info["distillation"] is True
    assert info["backbone"] is None and info["handcrafted"]["dim"] == 484
    assert info["lambdas"] == {"kd": 1.0, "metric": 0.0, "compact": 1.0, "variance": 0.0}
    assert not rec.notes
    assert info["losses"]["p17"]["terms"]["kd"] > 0
    assert teachers[17](torch.zeros(1, 3, 17, 17)).shape == (1, 128)  # the decoder is dropped


def test_handcrafted_loss_falls(tmp_path: Path) -> None:
    # The bank is a fixed, learnable target: distillation error falls (compactness off, as in
    # test_loss_falls, so that the curve is the regression's).
    settings = _settings(iterations=12, lr=1e-3, lambda_compact=0.0, target="handcrafted")
    rec = Recorder()
    pretrain_teachers(settings, _samples(tmp_path), reporter=rec)
    losses = rec.tasks["teacher p=17"].losses
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses


def test_target_choices_and_refusals(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.safetensors"
    save_file(_resnet18_state(), path)
    with pytest.raises(UsageError, match="needs|--backbone-weights FILE"):
        pretrain_teachers(_settings(target="resnet18"), _samples(tmp_path))
    # Weights given but another target chosen: they are not read, and a note says so.
    rec = Recorder()
    _, info = pretrain_teachers(_settings(iterations=1, target="handcrafted",
                                          backbone_weights=str(path)), _samples(tmp_path),
                                reporter=rec)
    assert info["target"] == "handcrafted" and info["backbone"] is None
    assert any("backbone weights are not used" in n for n in rec.notes)
    # lambda_kd = 0 turns the target off.
    _, info = pretrain_teachers(_settings(iterations=1, target="handcrafted", lambda_kd=0.0),
                                _samples(tmp_path))
    assert info["target"] == "none" and info["lambdas"]["metric"] == 1.0
    with pytest.raises(UsageError, match="teacher.target"):
        _settings(target="imagenet")


def test_whitened_handcrafted_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[int] = []

    class Recording(HandcraftedBank):
        def __init__(self, patch_size: int, components: int = 0) -> None:
            built.append(components)
            super().__init__(patch_size, components)

    monkeypatch.setattr(stad.training.targets, "HandcraftedBank", Recording)
    _, info = pretrain_teachers(_settings(iterations=2, target="handcrafted", target_whiten=16),
                                _samples(tmp_path))
    assert built == [16]  # the bank that was distilled is the whitened one
    assert info["handcrafted"]["whiten"] == 16 and info["handcrafted"]["target_dim"] == 16
    assert info["losses"]["p17"]["terms"]["kd"] > 0
    # Whitening the ResNet-18 or no target is refused, naming the option.
    with pytest.raises(UsageError, match=r"target_whiten \(--target-whiten\) applies to the"):
        pretrain_teachers(_settings(target="none", target_whiten=16), _samples(tmp_path))


def test_squared_compactness_is_selectable(tmp_path: Path) -> None:
    rec = Recorder()
    _, info = pretrain_teachers(_settings(iterations=2, compactness="squared"),
                                _samples(tmp_path), reporter=rec)
    # Squared, the term is non-negative (the paper's signed sum is near −d once trained).
    assert 0 <= info["losses"]["p17"]["terms"]["compact"] <= 128
    with pytest.raises(UsageError, match="compactness"):
        _settings(compactness="abs")


def test_hardest_negatives_and_variance_term(tmp_path: Path) -> None:
    settings = _settings(iterations=3, triplet_negatives="hardest", descriptor_norm=True,
                         triplet_margin=10.0, lambda_variance=1.0)
    _, info = pretrain_teachers(settings, _samples(tmp_path))
    terms = info["losses"]["p17"]["terms"]
    assert info["lambdas"]["variance"] == 1.0
    assert terms["metric"] > 0 and math.isfinite(terms["variance"]) and terms["variance"] >= 0


def test_hardest_negative_by_hand() -> None:
    a = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    pos = torch.tensor([[1.0, 0.0], [10.0, 1.0]])
    neg = torch.tensor([[0.0, 3.0], [10.0, 2.0]])
    # Random (own) negatives: δ⁻ = min(9, 10) = 9 and min(4, 1) = 1;
    # losses max(0, 1 + 1 − 9) = 0 and max(0, 1 + 1 − 1) = 1: mean 0.5.
    assert triplet_loss(a, pos, neg, margin=1.0).item() == 0.5
    # Hardest over the batch: anchor 0 also sees neg 1 (δ = min(104, 85) = 85, not closer);
    # anchor 1 sees neg 0 (min(109, 85) = 85) — the own ones are the hardest: same 0.5.
    assert triplet_loss(a, pos, neg, margin=1.0, hardest=True).item() == 0.5
    # Excluding its own negative leaves anchor 1 with δ⁻ = 85 (loss 0); anchor 0 with 85 too.
    exclude = torch.eye(2, dtype=torch.bool)
    assert triplet_loss(a, pos, neg, margin=1.0, hardest=True, exclude=exclude).item() == 0.0
    # A row with every negative excluded contributes 0, not NaN.
    out = triplet_loss(a, pos, neg, margin=1.0, hardest=True,
                       exclude=torch.ones(2, 2, dtype=torch.bool))
    assert out.item() == 0.0


def test_variance_loss_by_hand() -> None:
    # Constant channels: std = sqrt(eps) = 0.01 → 1 − 0.01 per channel.
    assert variance_loss(torch.ones(8, 3)).item() == pytest.approx(0.99, abs=1e-6)
    # Channels of std 2 (±2): no penalty; std 0.5 (±0.5): 1 − sqrt(0.25 + 1e-4).
    x = torch.tensor([[2.0, 0.5], [-2.0, -0.5]])
    assert variance_loss(x).item() == pytest.approx((1 - math.sqrt(0.25 + 1e-4)) / 2, abs=1e-6)


def test_diagnostics_are_reported_per_scale(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    _, info = pretrain_teachers(_settings(iterations=1, diagnostic_patches=16),
                                _samples(tmp_path))
    diag = info["diagnostics"]["p17"]
    assert diag["n_patches"] == 16 and diag["dim"] == 128 and "warnings" in diag
    assert 0 < diag["effective_rank"] <= 128
    # Warnings go to stderr, one line each, as they are found.
    err = capsys.readouterr().err
    assert err.count("warning: teacher p=17") == len(diag["warnings"])


def test_collapsed_teacher_is_warned_about_at_the_end_of_pretraining(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Pretraining that ends in a constant teacher (its last conv zeroed) must be flagged.
    real = teacher_mod._ScaleRun.run

    def collapsing(*args: Any, **kwargs: Any) -> Any:
        net, info = real(*args, **kwargs)
        net.convs[-1].weight.zero_()
        return net, info

    monkeypatch.setattr(teacher_mod._ScaleRun, "run", collapsing)
    _, info = pretrain_teachers(_settings(iterations=1, diagnostic_patches=16),
                                _samples(tmp_path))
    assert len(info["diagnostics"]["p17"]["warnings"]) == 4
    assert "warning: teacher p=17: descriptors span few directions" in capsys.readouterr().err


# --- starting from a teacher (teacher.init) ----------------------------------------------------


def _teacher_file(path: Path, settings: Any, teachers: Any, info: dict[str, Any]) -> Path:
    from stad.artifacts import Artifact, save_artifact
    from stad.images import preprocessing

    save_artifact(path, Artifact(kind="teacher", tensors=teacher_tensors(teachers),
                                 config=settings.model_dump(mode="json"),
                                 preprocessing=preprocessing(48), seed=settings.seed,
                                 info=info))
    return path


def test_init_continues_from_the_given_teacher(tmp_path: Path) -> None:
    samples = _samples(tmp_path)
    first = _settings(seed=3)
    start, start_info = pretrain_teachers(first, samples)
    path = _teacher_file(tmp_path / "start.safetensors", first, start, start_info)
    # A negligible learning rate: one step away from where it started, not from a fresh init.
    go_on, info = pretrain_teachers(_settings(seed=3, init=str(path), lr=1e-12,
                                              iterations=1), samples)
    fresh, _ = pretrain_teachers(_settings(seed=3, lr=1e-12, iterations=1), samples)
    for k, v in start[17].state_dict().items():
        torch.testing.assert_close(go_on[17].state_dict()[k], v, atol=1e-8, rtol=0)
    assert not torch.allclose(fresh[17].state_dict()["convs.0.weight"],
                              start[17].state_dict()["convs.0.weight"])
    assert info["init"] == {"source": str(path), "sha256": _sha256(path), "target": "none",
                            "iterations": {"p17": 3}}
    assert pretrain_teachers(first, samples)[1]["init"] is None
    # A chain counts every run: 3 + 1 iterations before the next.
    again = _teacher_file(tmp_path / "again.safetensors", first, go_on, info)
    _, info = pretrain_teachers(_settings(init=str(again), iterations=1), samples)
    assert info["init"]["iterations"] == {"p17": 4}


def test_init_from_the_builtin_teacher(tmp_path: Path) -> None:
    from stad.artifacts import load_artifact
    from stad.model import builtin_teacher_path

    teachers, info = pretrain_teachers(_settings(init="builtin", lr=1e-12, iterations=1),
                                       _samples(tmp_path))
    builtin = load_teachers(load_file(builtin_teacher_path()), patch_sizes=[17])
    torch.testing.assert_close(teachers[17].state_dict()["convs.0.weight"],
                               builtin[17].state_dict()["convs.0.weight"], atol=1e-8, rtol=0)
    assert info["init"]["source"] == "builtin"
    assert info["init"]["sha256"] == _sha256(builtin_teacher_path())
    assert info["init"]["target"] == "efficientnet-lite0"
    # Counting the shipped p17's own starting teachers (benchmarks/default_teacher.py --init).
    shipped = load_artifact(builtin_teacher_path(), kind="teacher").info["scales"]["p17"]
    before = (shipped.get("init") or {}).get("iterations", {}).get("p17", 0)
    assert info["init"]["iterations"] == {"p17": before + shipped["iterations"]}
    assert info["init"]["iterations"]["p17"] >= 3000


def test_bad_init_is_refused_before_training(tmp_path: Path) -> None:
    samples = _samples(tmp_path)
    first = _settings()
    only17 = _teacher_file(tmp_path / "p17.safetensors", first, *pretrain_teachers(first, samples))
    with pytest.raises(ArtifactError, match="not for p=\\[33\\]"):
        pretrain_teachers(_settings(init=str(only17), patch_sizes=[17, 33]), samples)
    with pytest.raises(ArtifactError, match="missing.safetensors"):
        pretrain_teachers(_settings(init=str(tmp_path / "missing.safetensors")), samples)
    with pytest.raises(UsageError, match="teacher.init"):
        pretrain_teachers(_settings(init="random"), samples)
    # Another descriptor size: named, with the file.
    from stad.networks import build_network

    small = _teacher_file(tmp_path / "d64.safetensors", first, {17: build_network(17, 64)}, {})
    with pytest.raises(ArtifactError, match="d64.safetensors: its p=17 teacher gives 64-d"):
        pretrain_teachers(_settings(init=str(small)), samples)
    # The missing scale's message names the file too.
    with pytest.raises(ArtifactError, match="p17.safetensors"):
        pretrain_teachers(_settings(init=str(only17), patch_sizes=[17, 33]), samples)


def test_trained_iterations_count_a_chain_or_say_they_do_not_know() -> None:
    from stad.training.teacher import trained_iterations

    assert trained_iterations({"iterations": 5}, 17) == 5
    assert trained_iterations({"iterations": 5, "init": {"iterations": {"p17": 7}}}, 17) == 12
    assert trained_iterations({"iterations": 5, "init": {"iterations": {"p17": None}}}, 17) is None
    assert trained_iterations({"scales": {"p33": {"iterations": 3000}}}, 33) == 3000
    assert trained_iterations({}, 17) is None
    # metadata of another shape (a foreign or altered file) says nothing; it does not crash
    assert trained_iterations({"scales": "x"}, 17) is None
    assert trained_iterations({"iterations": 5, "init": "abc"}, 17) is None
    assert trained_iterations({"scales": {"p17": [1]}, "iterations": 4}, 17) == 4


def _crafted_teacher(path: Path, change: Any, kind: str = "teacher") -> Path:
    from stad.artifacts import Artifact, save_artifact
    from stad.images import preprocessing
    from stad.networks import build_network

    artifact = Artifact(kind=kind, tensors=teacher_tensors({17: build_network(17)}), config={},
                        preprocessing=preprocessing(32), seed=0, info={})
    change(artifact)
    save_artifact(path, artifact)
    return path


@pytest.mark.parametrize(("change", "words"), [
    (lambda a: a.tensors["teacher.p17.convs.0.weight"].view(-1)[0].fill_(float("nan")),
     "NaN or infinite"),
    (lambda a: a.preprocessing.update(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0]),
     "standardized with mean"),
    (lambda a: a.preprocessing.update(image_size="huge"), "malformed preprocessing"),
    # a size that would take hours and gigabytes to score a 40² image at
    (lambda a: a.preprocessing.update(image_size=8192),
     "image_size 8192 is not a whole number from 17 to 4096"),
])
def test_a_damaged_or_foreign_teacher_is_refused_on_load(tmp_path: Path, change: Any,
                                                        words: str) -> None:
    from stad.model import resolve_teachers

    path = _crafted_teacher(tmp_path / "t.safetensors", change)
    with pytest.raises(ArtifactError, match=words) as info:
        resolve_teachers(path, [17], 0)
    assert str(path) in str(info.value)


def test_a_model_with_malformed_teacher_metadata_is_refused(tmp_path: Path) -> None:
    from stad.model import resolve_teachers

    path = _crafted_teacher(tmp_path / "m.safetensors", lambda a: a.info.update(teacher="x"),
                            kind="model")
    with pytest.raises(ArtifactError, match="malformed stad metadata: teacher"):
        resolve_teachers(path, [17], 0)
