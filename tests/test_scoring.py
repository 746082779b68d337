"""Scoring, calibration and thresholds (docs/method.md §5) on tiny untrained models."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stad import calibration, scoring
from stad.calibration import (
    calibrate_model,
    check_threshold_method,
    f1_threshold,
    fpr_threshold,
    position_statistics,
)
from stad.config import ScoreSettings
from stad.errors import DataError, UsageError
from stad.handcrafted import gaussian_blur, gaussian_kernel
from stad.model import Inference, Networks, Scale, turned
from stad.networks import build_network
from stad.scoring import ImageError, ImageMaps, image_score, iter_maps, iter_results


def _model(seed: int = 0, sizes=(17,)) -> Networks:
    g = torch.Generator().manual_seed(seed)
    scales = {}
    for p in sizes:
        teacher = build_network(p, 16, generator=g).eval()
        students = [build_network(p, 16, generator=g).eval() for _ in range(3)]
        scales[f"p{p}"] = Scale(p, teacher, students, torch.zeros(16), torch.ones(16))
    pre = {"image_size": 24, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    return Networks(scales=scales, preprocessing=pre)


def _images(tmp_path: Path, n: int, seed: int, size=(30, 26)) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = tmp_path / f"{seed}_{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_error_and_variance_follow_the_formulas():
    model = _model(sizes=(17,))
    scale = model.scales["p17"]
    x = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        e, v = scale.error_and_variance(x)
        outs = torch.stack([s.dense(x) for s in scale.students])  # (M, N, D, H, W)
        target = scale.teacher.dense(x)
    mean = outs.mean(0)
    torch.testing.assert_close(e, ((mean - target) ** 2).sum(1))
    # v = (1/M) Σ‖μ_i‖² − ‖μ̄‖² is the trace of the students' covariance: Σ_d Var_i(μ_i,d).
    torch.testing.assert_close(v, outs.var(0, correction=0).sum(1), atol=1e-4, rtol=1e-4)
    assert e.shape == v.shape == (2, 20, 20)


def test_calibration_standardizes_and_matches_scoring(tmp_path: Path):
    model = _model(sizes=(17, 33))
    paths = _images(tmp_path, 3, seed=2)
    rule = ScoreSettings()
    stats, scores, _ = calibrate_model(model, paths, rule, device=torch.device("cpu"),
                                    batch_size=2)
    # After calibration, ẽ and ṽ over the calibration pixels have mean 0 and std 1 each.
    x = torch.stack([__import__("stad.scoring", fromlist=["prepare"]).prepare(p, model)[0]
                     for p in paths])
    for p, scale in model.scales.items():
        with torch.inference_mode():
            e, v = scale.error_and_variance(x)
        e_mean, e_std, v_mean, v_std = stats[p].tolist()
        assert abs(float(((e - e_mean) / e_std).mean())) < 1e-4
        assert float(((v - v_mean) / v_std).std(correction=0)) == pytest.approx(1, abs=1e-4)
    # The one-pass scores equal those of scoring the same images afterwards.
    again = [image_score(m.maps["fused"], rule)
             for m in iter_maps(model, paths, device=torch.device("cpu"))]
    np.testing.assert_allclose(scores, again, rtol=1e-5, atol=1e-5)


def test_maps_are_at_the_image_resolution(tmp_path: Path):
    model = _model()
    calibrate_model(model, _images(tmp_path, 2, seed=3), ScoreSettings(),
                    device=torch.device("cpu"))
    (m,) = iter_maps(model, _images(tmp_path, 1, seed=4, size=(41, 57)),
                     device=torch.device("cpu"))
    assert m.maps["fused"].shape == (41, 57) and set(m.maps) == {"p17", "fused"}
    np.testing.assert_allclose(m.maps["fused"], m.maps["p17"])  # one scale: fused = it


def test_constant_error_does_not_divide_by_zero(tmp_path: Path, capsys):
    model = _model()
    scale = model.scales["p17"]
    for s in scale.students:  # students identical to the teacher: e = v = 0 everywhere
        s.load_state_dict(scale.teacher.state_dict())
    stats, scores, _ = calibrate_model(model, _images(tmp_path, 2, seed=5), ScoreSettings(),
                                    device=torch.device("cpu"))
    assert stats["p17"][1] == 1.0 and stats["p17"][3] == 1.0
    assert all(np.isfinite(scores))
    assert "constant" in capsys.readouterr().err


def test_position_statistics_per_pixel_with_and_without_pooling():
    rng = np.random.default_rng(0)
    e = torch.from_numpy(rng.gamma(2.0, 1.0, (5, 12, 12))) * torch.linspace(1, 4, 12)
    v = torch.from_numpy(rng.gamma(3.0, 0.5, (5, 12, 12)))
    sums = torch.stack([e.sum(0), e.pow(2).sum(0), v.sum(0), v.pow(2).sum(0)])
    g = torch.tensor([e.mean(), e.std(correction=0), v.mean(), v.std(correction=0)])
    # No pooling, no prior: each position's own mean and (population) spread.
    got = position_statistics(sums, 5, g, sigma=0, prior=0)
    torch.testing.assert_close(got, torch.stack([e.mean(0), e.std(0, correction=0),
                                                 v.mean(0), v.std(0, correction=0)]).float())
    # The prior shrinks each variance towards the global one, by weight k against n images.
    got = position_statistics(sums, 5, g, sigma=0, prior=3)
    want = ((5 * e.var(0, correction=0) + 3 * g[1] ** 2) / 8).sqrt().float()
    torch.testing.assert_close(got[1], want)
    torch.testing.assert_close(got[0], e.mean(0).float())
    # Pooling over neighbours: a position's mean is the weighted mean around it.
    pooled = position_statistics(sums, 5, g, sigma=2, prior=0)
    torch.testing.assert_close(pooled[0], gaussian_blur(e.mean(0), 2).float())
    assert (pooled[1] > 0).all()


def test_gaussian_blur_keeps_constants_and_smooths():
    flat = torch.full((2, 9, 9), 3.0)
    torch.testing.assert_close(gaussian_blur(flat, 1.5), flat)
    spike = torch.zeros(1, 15, 15)
    spike[0, 7, 7] = 1.0
    out = gaussian_blur(spike, 1.0)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-6)  # far from the edges: mass kept
    assert out[0, 7, 7] < 0.2 and out[0, 7, 8] == pytest.approx(out[0, 8, 7])
    assert gaussian_blur(spike, 0) is spike


def test_gaussian_blur_of_a_batch_is_each_map_blurred_alone():
    # Calibration smooths maps one at a time, scoring in batches: the threshold set on the
    # first must hold for the second bit for bit.
    maps = torch.randn(5, 23, 19, generator=torch.Generator().manual_seed(0))
    batch = gaussian_blur(maps, 2.0)
    for i in range(len(maps)):
        assert torch.equal(batch[i:i + 1], gaussian_blur(maps[i:i + 1], 2.0))
    # The separable sum is the 2-D Gaussian with replicated edges.
    k = gaussian_kernel(2.0, torch.float64)
    r = len(k) // 2
    padded = F.pad(maps[:1, None].double(), (r, r, r, r), mode="replicate")
    want = F.conv2d(padded, (k[:, None] * k[None, :])[None, None])[:, 0]
    torch.testing.assert_close(batch[:1].double(), want, rtol=1e-5, atol=1e-5)


def test_per_position_calibration_standardizes_each_position(tmp_path: Path, monkeypatch):
    # Without pooling or prior, each position's ẽ and ṽ over the calibration images have
    # mean 0 and spread 1 exactly.
    monkeypatch.setattr(calibration, "POSITION_SIGMA", 0.0)
    monkeypatch.setattr(calibration, "POSITION_PRIOR", 0.0)
    model = _model(sizes=(17, 33))
    paths = _images(tmp_path, 4, seed=12)
    rule = ScoreSettings()
    stats, scores, _ = calibrate_model(model, paths, rule, device=torch.device("cpu"),
                                    normalize="position")
    for p, scale in model.scales.items():
        assert scale.calib_map is not None and tuple(scale.calib_map.shape) == (4, 24, 24)
        torch.testing.assert_close(scale.calib, stats[p])
    x = torch.stack([scoring.prepare(p, model)[0] for p in paths])
    with torch.inference_mode():
        for scale in model.scales.values():
            e, v = scale.error_and_variance(x)
            z = scale.standardize(e, torch.zeros_like(v))  # ẽ + (0 − v_mean)/v_std
            assert scale.calib_map is not None
            ez = z + scale.calib_map[2] / scale.calib_map[3]  # ẽ alone
            torch.testing.assert_close(ez.mean(0), torch.zeros(24, 24), atol=1e-4, rtol=0)
            torch.testing.assert_close(ez.pow(2).mean(0), torch.ones(24, 24), atol=1e-3,
                                       rtol=0)
            assert ez.shape == (4, 24, 24)
    assert len(scores) == 4 and all(np.isfinite(scores))  # (leave-one-out: tested below)
    # Recalibrating globally removes them.
    calibrate_model(model, paths, rule, device=torch.device("cpu"))
    assert all(s.calib_map is None for s in model.scales.values())


def test_per_position_statistics_must_match_the_map():
    scale = _model().scales["p17"]
    scale.calib_map = torch.ones(4, 24, 24)
    with pytest.raises(ValueError, match="per-position"):
        scale.standardize(torch.zeros(1, 20, 20), torch.zeros(1, 20, 20))


def test_per_position_statistics_round_trip_and_are_checked_on_load(tmp_path: Path):
    from stad.errors import ArtifactError
    from stad.model import model_from_tensors, model_tensors

    model = _model()
    calibrate_model(model, _images(tmp_path, 2, seed=14), ScoreSettings(),
                    device=torch.device("cpu"), normalize="position")
    tensors = model_tensors(model)
    loaded = model_from_tensors(tensors, model.preprocessing)
    torch.testing.assert_close(loaded.scales["p17"].calib_map, model.scales["p17"].calib_map)
    for name, bad in (("calib_map.p17", torch.ones(4, 20, 20)),
                      ("calib_map.p17", torch.ones(4, 24, 24, dtype=torch.int32)),
                      ("calib.p17", torch.ones(3))):
        with pytest.raises(ArtifactError, match=rf"{name.replace('.', '[.]')} is a .* shape"):
            model_from_tensors({**tensors, name: bad}, model.preprocessing)
    for name in ("calib_map.p17", "calib.p17"):
        for value in (float("nan"), 0.0, 1e-40):
            broken = tensors[name].clone()
            broken.view(4, -1)[1, -1] = value
            with pytest.raises(ArtifactError, match="recalibrate"):
                model_from_tensors({**tensors, name: broken}, model.preprocessing)
            # ... unless the calibration is left out, as stad calibrate does.
            plain = model_from_tensors({**tensors, name: broken}, model.preprocessing,
                                       calibration=False)
            assert plain.scales["p17"].calib is None and plain.scales["p17"].calib_map is None


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_normal_scores_leave_their_own_image_out(tmp_path: Path, monkeypatch, weight: float):
    # Without the prior (which uses all images' global spread), image i's score must be
    # what a model calibrated per position on the other images gives it, with the same
    # weight of the variance term.
    monkeypatch.setattr(calibration, "POSITION_PRIOR", 0.0)
    paths = _images(tmp_path, 4, seed=16)
    rule = ScoreSettings()
    model = _model(sizes=(17, 33))
    _, scores, _ = calibrate_model(model, paths, rule, device=torch.device("cpu"),
                                normalize="position", variance_weight=weight)
    for i in (0, 3):
        others = _model(sizes=(17, 33))
        calibrate_model(others, paths[:i] + paths[i + 1:], rule, device=torch.device("cpu"),
                        normalize="position", variance_weight=weight)
        (m,) = iter_maps(others, [paths[i]], device=torch.device("cpu"))
        assert scores[i] == pytest.approx(image_score(m.maps["fused"], rule), rel=1e-4)
    # In-sample scores would be lower: each image's own peaks would be standardized away.
    (m,) = iter_maps(model, [paths[0]], device=torch.device("cpu"))
    assert image_score(m.maps["fused"], rule) < scores[0]


def test_calibration_refuses_no_images_and_unknown_normalizations(tmp_path: Path):
    model = _model()
    with pytest.raises(DataError, match="no anomaly-free images"):
        calibrate_model(model, [], ScoreSettings(), device=torch.device("cpu"),
                        normalize="position")
    with pytest.raises(UsageError, match="normalize"):
        calibrate_model(model, _images(tmp_path, 1, seed=18), ScoreSettings(),
                        device=torch.device("cpu"), normalize="pixel")  # type: ignore[arg-type]


def test_image_score_rules():
    amap = np.zeros((10, 10), np.float32)
    amap[0, :5] = [5, 4, 3, 2, 1]
    assert image_score(amap, ScoreSettings(image_score="max")) == 5
    # top 3% of 100 pixels = 3 pixels: (5 + 4 + 3) / 3
    rule = ScoreSettings(image_score="topk_mean", topk_fraction=0.03)
    assert image_score(amap, rule) == pytest.approx(4.0)
    # docs/model.md: k = round(n · 1 %), halves to even, at least 1
    top1 = ScoreSettings()
    for n, k in ((25, 1), (149, 1), (150, 2), (250, 2), (350, 4)):
        ramp = np.arange(n, dtype=np.float32)
        assert image_score(ramp, top1) == pytest.approx(ramp[-k:].mean()), (n, k)


def test_fpr_threshold():
    scores = [0.1, 0.5, 0.2, 0.9, 0.3, 0.4, 0.8, 0.7, 0.6, 1.0]
    # 10 normal images: FPR 0.2 allows 2 above the threshold → the 3rd largest, 0.8.
    assert fpr_threshold(scores, 0.2) == 0.8
    assert sum(s > fpr_threshold(scores, 0.2) for s in scores) == 2
    # Below 1/10 no image may score above it: the maximum.
    assert fpr_threshold(scores, 0.01) == 1.0


def test_a_threshold_goes_with_the_manual_method_only():
    check_threshold_method("manual", 2.5)
    check_threshold_method("fpr", None)
    # Said in both the command line's and Python's names: the check serves both.
    with pytest.raises(UsageError, match=r"--threshold, threshold=.*not by 'fpr'"):
        check_threshold_method("fpr", 2.5)
    with pytest.raises(UsageError, match=r"needs a threshold: --threshold T, or threshold=T"):
        check_threshold_method("manual", None)


def test_f1_threshold():
    scores = [0.1, 0.2, 0.3, 0.6, 0.7, 0.35]
    labels = [False, False, False, True, True, True]
    t = f1_threshold(scores, labels)
    # Perfect split between 0.3 and 0.35: every threshold in [0.3, 0.35) gives F1 = 1.
    assert 0.3 <= t < 0.35
    pred = [s > t for s in scores]
    assert pred == labels


def test_batched_results_keep_order_and_report_bad_files(tmp_path: Path):
    model = _model()
    calibrate_model(model, _images(tmp_path, 2, seed=6), ScoreSettings(),
                    device=torch.device("cpu"))
    paths = _images(tmp_path, 4, seed=7)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    order = [paths[0], bad, paths[1], paths[2], paths[3]]
    cpu = torch.device("cpu")
    results = list(iter_results(model, order, device=cpu, batch_size=2))
    assert [r.path for r in results] == order
    assert isinstance(results[1], ImageError) and "bad.png" in str(results[1].error)
    # Each map equals the map of the image scored alone (batching changes nothing).
    for r, path in zip([results[0], *results[2:]], [paths[0], *paths[1:]], strict=True):
        assert isinstance(r, ImageMaps)
        (alone,) = iter_maps(model, [path], device=cpu, batch_size=1)
        np.testing.assert_allclose(r.maps["fused"], alone.maps["fused"], rtol=1e-5, atol=1e-5)
    # iter_maps yields the images before the bad one, then raises its DataError.
    it = iter_maps(model, order, device=cpu, batch_size=2)
    assert next(it).path == paths[0]
    with pytest.raises(DataError, match="bad.png"):
        next(it)


def test_next_batch_is_read_in_the_background_and_results_stream(tmp_path: Path,
                                                                monkeypatch):
    model = _model()
    calibrate_model(model, _images(tmp_path, 2, seed=8), ScoreSettings(),
                    device=torch.device("cpu"))
    readers: list[str] = []
    real_prepare, real_maps = scoring.prepare, model.maps
    passes: list[int] = []

    def spy_prepare(path, m, what="image"):
        readers.append(threading.current_thread().name)
        return real_prepare(path, m, what)

    def spy_maps(x):
        passes.append(x.shape[0])
        return real_maps(x)

    monkeypatch.setattr(scoring, "prepare", spy_prepare)
    monkeypatch.setattr(model, "maps", spy_maps)
    model.inference = Inference(batch_size=2)  # the model's batch size is the default
    it = iter_maps(model, _images(tmp_path, 5, seed=9), device=torch.device("cpu"))
    next(it)
    assert passes == [2]  # the first result comes after the first batch only
    assert list(it) and passes == [2, 2, 1]
    assert readers and all(name.startswith("stad-read") for name in readers)


def test_bf16_maps_are_close_to_fp32(tmp_path: Path):
    model = _model(sizes=(17, 33))
    calibrate_model(model, _images(tmp_path, 2, seed=10), ScoreSettings(),
                    device=torch.device("cpu"))
    paths = _images(tmp_path, 2, seed=11)
    cpu = torch.device("cpu")
    exact = [m.maps["fused"] for m in iter_maps(model, paths, device=cpu)]
    model.inference = Inference(precision="bf16")
    approx = [m.maps["fused"] for m in iter_maps(model, paths, device=cpu)]
    for a, b in zip(approx, exact, strict=True):
        assert a.dtype == np.float32
        diff = np.abs(a - b)
        # bf16 keeps 8 bits of mantissa: the maps move, but by a fraction of their spread.
        assert 0 < diff.max() < 0.2 * (b.max() - b.min())


@pytest.mark.parametrize("k", range(-4, 6))
def test_turned_is_rot90(k: int) -> None:
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    assert torch.equal(turned(x, k), torch.rot90(x, k, (-2, -1)))


def test_every_tta_name_has_its_views() -> None:
    from typing import get_args

    from stad.config import TtaName
    from stad.model import TTA

    assert list(get_args(TtaName)) == list(TTA)
    for name, views in TTA.items():  # the image itself, then distinct views
        assert views[0] == (0, False) and len(set(views)) == len(views), name
