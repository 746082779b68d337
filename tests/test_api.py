"""The public Python API (docs/api.md): load_model, Model.score/calibrate/save, Result, and the
steps with keyword settings; and every ```python example in README.md and docs/ runs."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import stad
import stad.api
from stad.artifacts import load_artifact, save_artifact
from stad.calibration import resolve_smooth_sigma
from stad.cli import app
from stad.commands.common import resume_command
from stad.datasets.synthetic import generate
from stad.devices import resolve_device
from stad.errors import ArtifactError, DataError, UsageError
from stad.handcrafted import gaussian_blur

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Settings that only shrink the work (as tests/test_docs.py appends flags to commands).
SHRINK = {"teacher": {"image_size": 32, "iterations": 2, "batch_size": 8, "patch_sizes": [17]},
          "students": {"patch_sizes": [17], "epochs": 1, "image_size": 32, "n_students": 2}}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with tiny synthetic data under data/, a model fitted and calibrated through
    the keyword API, a part.png to score and anomaly-free images in good/."""
    tmp = tmp_path_factory.mktemp("api")
    generate(tmp / "data", categories=["grain"], image_size=32, n_train=6, n_val=2,
             n_test_good=2, n_test_per_defect=1, seed=1)
    model = tmp / "model.safetensors"
    fitted = stad.fit_students(model, teacher="random", dataset="synthetic", category="grain",
                               root=tmp / "data", students=SHRINK["students"])
    assert fitted["kind"] == "model" and fitted["n_fit"] == 6 and fitted["patch_sizes"] == [17]
    calibration = stad.calibrate(model)
    assert calibration["method"] == "fpr" and calibration["n_images"] == 2
    shutil.copy(next((tmp / "data" / "grain" / "test").glob("*/000.png")), tmp / "part.png")
    (tmp / "good").mkdir()
    for i, png in enumerate(sorted((tmp / "data" / "grain" / "val").rglob("*.png"))):
        shutil.copy(png, tmp / "good" / f"{i}.png")
    return tmp


def test_score_a_file_as_the_cli_does(world: Path) -> None:
    model = stad.load_model(world / "model.safetensors", device="cpu")
    assert model.patch_sizes == [17] and model.image_size == 32 and model.threshold is not None
    result = model.score(world / "part.png")
    assert isinstance(result, stad.Result)
    assert result.map.shape == (32, 32) and result.map.dtype == np.float32
    # The default image score: the mean of the map's top 1 % (10 of its 1 024 pixels).
    assert model.calibration["image_score"] == "topk_mean"
    assert result.score == pytest.approx(float(np.sort(result.map.ravel())[-10:].mean()))
    assert result.anomalous == (result.score > model.threshold)
    assert set(result.scales) == {"p17"} and result.maps["p17"].shape == (32, 32)
    out = CliRunner().invoke(app, ["score", "--model", str(world / "model.safetensors"),
                                   str(world / "part.png"), "--json", "--device", "cpu"])
    record = json.loads(out.stdout.splitlines()[0])
    record.pop("schema_version")
    assert record == result.to_dict()


def test_the_image_score_follows_the_rule_the_model_was_calibrated_with(
        world: Path, tmp_path: Path) -> None:
    results = {}
    for rule in ("topk_mean", "max"):
        out = CliRunner().invoke(app, [
            "calibrate", "--model", str(world / "model.safetensors"), "--device", "cpu",
            "--out", str(tmp_path / f"{rule}.safetensors"), "--image-score", rule])
        assert out.exit_code == 0, out.output
        model = stad.load_model(tmp_path / f"{rule}.safetensors", device="cpu")
        assert model.calibration["image_score"] == rule
        results[rule] = model.score(world / "part.png")
    top, peak = results["topk_mean"], results["max"]
    # The same map; the score is its maximum by one rule, the mean of its top 1 % by the other.
    np.testing.assert_array_equal(peak.map, top.map)
    assert peak.score == pytest.approx(float(peak.map.max())) and peak.score > top.score
    assert top.score == pytest.approx(float(np.sort(top.map.ravel())[-10:].mean()))
    # From Python: load_model's keywords give the rule a later calibrate records.
    model = stad.load_model(tmp_path / "topk_mean.safetensors", device="cpu", image_score="max")
    assert model.calibrate(sorted((world / "good").glob("*.png")))["image_score"] == "max"
    assert model.score(world / "part.png").score == pytest.approx(float(peak.map.max()))


def test_regions_masks_and_the_pixel_threshold(world: Path, tmp_path: Path) -> None:
    model = stad.load_model(world / "model.safetensors", device="cpu")
    pixel = model.calibration["pixel_threshold"]
    assert model.calibration["target_pixel_fpr"] == 0.001 and pixel is not None
    normal = [r.map for r in model.score(sorted((world / "good").glob("*.png")))]
    values = np.concatenate([m.ravel() for m in normal])
    assert np.count_nonzero(values > pixel) <= 0.001 * values.size  # set on these images
    low = model.score(world / "part.png")
    assert low.pixel_threshold == pixel
    assert sum(r.area for r in low.regions) == int(low.mask.sum())
    peaks = [r.peak for r in low.regions]
    assert peaks == sorted(peaks, reverse=True)
    if low.regions:
        assert low.regions[0].peak == pytest.approx(float(low.map.max()))
    # The CLI: regions in the records, a mask PNG beside the maps, small regions left out.
    args = ["score", "--model", str(world / "model.safetensors"), str(world / "part.png"),
            "--json", "--device", "cpu", "--maps", str(tmp_path / "maps")]
    out = CliRunner().invoke(app, args)
    record = json.loads(out.stdout.splitlines()[0])
    assert record["regions"] == [r.to_dict() for r in low.regions]
    mask = np.asarray(Image.open(next((tmp_path / "maps").glob("*_mask.png"))))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(mask > 0, low.mask)
    big = max([r.area for r in low.regions], default=0) + 1
    out = CliRunner().invoke(app, [*args[:-2], "--min-region-area", str(big)])
    assert json.loads(out.stdout.splitlines()[0])["regions"] == []


def test_images_in_memory_score_as_their_files(world: Path) -> None:
    model = stad.load_model(world / "model.safetensors", device="cpu")
    rgb = np.asarray(Image.open(world / "part.png").convert("RGB"))
    inputs = [world / "part.png", Image.fromarray(rgb), rgb, rgb.astype(np.float32) / 255,
              np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])]
    results = model.score(inputs)
    assert [r.path for r in results] == [str(world / "part.png"), None, None, None, None]
    assert len({r.score for r in results}) == 1
    batch = model.score(np.stack([rgb, rgb[::-1]]))  # (N, H, W, C): a batch
    assert len(batch) == 2 and batch[0].score == results[0].score
    gray = model.score(rgb[:, :, 0])
    assert gray.map.shape == (32, 32)
    big = np.asarray(Image.fromarray(rgb).resize((48, 40)))
    assert model.score(big).map.shape == (40, 48)  # the map at the input's own size


@pytest.mark.parametrize("bad, message", [
    (np.full((8, 8, 3), 2.0, np.float32), "outside \\[0, 1\\]"),
    (np.zeros((8, 8, 2), np.uint8), "shape \\(8, 8, 2\\)"),
    (np.zeros((8, 8), np.int64), "dtype int64"),
    (42, "int, not an image"),
])
def test_bad_images_in_memory_are_data_errors(world: Path, bad, message: str) -> None:
    model = stad.load_model(world / "model.safetensors", device="cpu")
    with pytest.raises(DataError, match=message):
        model.score(bad)


def test_threshold_override_and_streaming(world: Path) -> None:
    model = stad.load_model(world / "model.safetensors", device="cpu")
    result = model.score(world / "part.png")
    for t, verdict in ((result.score - 1e-3, True), (result.score, False)):
        other = model.score(world / "part.png", threshold=t)
        assert other.threshold == t and other.anomalous is verdict
    paths = sorted((world / "good").glob("*.png"))
    streamed = list(model.iter_score(iter(paths)))
    assert [r.path for r in streamed] == [str(p) for p in paths]


def test_calibrate_in_python_save_and_reload(world: Path, tmp_path: Path) -> None:
    model = stad.load_model(world / "model.safetensors", device="cpu")
    normal = sorted((world / "good").glob("*.png"))
    calibration = model.calibrate(normal, method="fpr", target_fpr=0.4, normalize="global")
    scores = [r.score for r in model.score(normal)]
    assert calibration["normalize"] == "global" and calibration["n_images"] == len(normal)
    assert sum(s > model.threshold for s in scores) <= 0.4 * len(normal)
    manual = model.calibrate(normal, method="manual", threshold=1.5, normalize="global")
    assert manual["threshold"] == 1.5 == model.threshold
    old_umask = os.umask(0o022)
    try:
        saved = model.save(tmp_path / "again.safetensors")
    finally:
        os.umask(old_umask)
    assert saved.stat().st_mode & 0o777 == 0o644
    again = stad.load_model(saved, device="cpu")
    assert again.threshold == 1.5 and again.calibration["normalize"] == "global"
    assert again.score(world / "part.png").score == pytest.approx(
        model.score(world / "part.png").score, rel=1e-5)
    with pytest.raises(UsageError, match="--method manual"):
        model.calibrate(normal, method="fpr", threshold=1.0)
    with pytest.raises(UsageError, match="needs test_images"):
        model.calibrate(normal, method="f1")


def test_the_calibrated_smoothing_applies_to_every_map(world: Path, tmp_path: Path) -> None:
    model = stad.load_model(world / "model.safetensors", device="cpu")
    normal = sorted((world / "good").glob("*.png"))
    part = world / "part.png"
    model.calibrate(normal, normalize="global", smooth_sigma=0)
    raw = model.score(part)
    calibration = model.calibrate(normal, normalize="global", smooth_sigma=1.5)
    smoothed = model.score(part)
    assert calibration["smooth_sigma"] == 1.5 == model.networks.smooth_sigma
    # The statistics do not depend on σ, so each smoothed map is the raw one blurred (the
    # part is at the model's size: no resizing between).
    for key in ("fused", *(f"p{p}" for p in model.patch_sizes)):
        want = gaussian_blur(torch.from_numpy(raw.maps[key] if key != "fused" else raw.map), 1.5)
        got = smoothed.maps[key] if key != "fused" else smoothed.map
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    assert smoothed.map.max() < raw.map.max()  # the peak is spread
    # Every normal image keeps the score calibration gave it: the threshold holds.
    assert max(r.score for r in model.score(normal)) == pytest.approx(
        calibration["normal_scores"]["max"], abs=0)
    again = stad.load_model(model.save(tmp_path / "smoothed.safetensors"), device="cpu")
    assert again.networks.smooth_sigma == 1.5
    assert again.score(part).score == smoothed.score
    with pytest.raises(UsageError, match="smooth_sigma"):
        model.calibrate(normal, smooth_sigma=-1)
    assert model.networks.smooth_sigma == 1.5  # a refused calibration changes nothing
    # "auto" (the default) is the model's image size / 64, recorded as the number it was.
    size = model.image_size
    assert model.calibrate(normal)["smooth_sigma"] == size / 64 == model.networks.smooth_sigma
    assert stad.load_model(model.save(tmp_path / "auto.safetensors"),
                           device="cpu").networks.smooth_sigma == size / 64


@pytest.mark.parametrize("sigma, size, expected", [("auto", 128, 2.0), ("auto", 256, 4.0),
                                                   ("auto", 64, 1.0), ("auto", 8192, 64.0),
                                                   (3, 256, 3.0), (0.0, 128, 0.0)])
def test_auto_smoothing_follows_the_image_size(sigma, size: int, expected: float) -> None:
    assert resolve_smooth_sigma(sigma, size) == expected


_MISSING = object()


def _stored_calibration(world: Path, path: Path, key: str, value: object = _MISSING) -> Path:
    """The world's model saved at ``path`` with ``info.calibration[key]`` set to ``value``, or
    left out (a calibration from before the setting) without one."""
    artifact = load_artifact(world / "model.safetensors", kind="model")
    calibration = {k: v for k, v in artifact.info["calibration"].items() if k != key}
    if value is not _MISSING:
        calibration[key] = value
    save_artifact(path, replace(artifact, info={**artifact.info, "calibration": calibration}))
    return path


@pytest.mark.parametrize("stored, expected", [(None, 0.0), (3, 3.0)])
def test_older_calibrations_have_no_smoothing(world: Path, tmp_path: Path, stored, expected
                                              ) -> None:
    path = _stored_calibration(world, tmp_path / "old.safetensors", "smooth_sigma",
                               _MISSING if stored is None else stored)
    assert stad.load_model(path, device="cpu").networks.smooth_sigma == expected


@pytest.mark.parametrize("bad", [-1, "2", float("nan"), 1e9, True])
def test_a_damaged_smoothing_sigma_is_an_artifact_error(world: Path, tmp_path: Path, bad
                                                         ) -> None:
    path = _stored_calibration(world, tmp_path / "bad.safetensors", "smooth_sigma", bad)
    with pytest.raises(ArtifactError, match="smooth_sigma .*recalibrate"):
        stad.load_model(path, device="cpu")


def test_the_variance_weight_scales_the_variance_term_of_every_map(world: Path,
                                                                   tmp_path: Path) -> None:
    model = stad.load_model(world / "model.safetensors", device="cpu")
    normal = sorted((world / "good").glob("*.png"))
    part = world / "part.png"
    maps = {}
    for w in (0.0, 0.5, 1.0):
        calibration = model.calibrate(normal, normalize="global", smooth_sigma=0,
                                      variance_weight=w)
        assert calibration["variance_weight"] == w == model.networks.variance_weight
        maps[w] = model.score(part).maps
        # The threshold still holds every normal image's calibrated score.
        assert max(r.score for r in model.score(normal)) == pytest.approx(
            calibration["normal_scores"]["max"], abs=0)
    # Each scale's map is ẽ + w·ṽ with statistics that do not depend on w: linear in w, and
    # at w = 0 the standardized error alone.
    for p in model.patch_sizes:
        key = f"p{p}"
        np.testing.assert_allclose(maps[0.5][key], (maps[0.0][key] + maps[1.0][key]) / 2,
                                   rtol=1e-5, atol=1e-5)
        assert np.abs(maps[1.0][key] - maps[0.0][key]).max() > 1e-3
    stats = model.calibration["statistics"]
    assert {f"p{p}" for p in model.patch_sizes} == set(stats)
    model.calibrate(normal, normalize="global", smooth_sigma=0, variance_weight=0.5)
    again = stad.load_model(model.save(tmp_path / "w.safetensors"), device="cpu")
    assert again.networks.variance_weight == 0.5 == again.calibration["variance_weight"]
    np.testing.assert_allclose(again.score(part).maps[f"p{model.patch_sizes[0]}"],
                               maps[0.5][f"p{model.patch_sizes[0]}"], rtol=1e-5, atol=1e-5)
    # The default scores by the error alone.
    assert model.calibrate(normal)["variance_weight"] == 0.0 == model.networks.variance_weight
    with pytest.raises(UsageError, match="variance_weight"):
        model.calibrate(normal, variance_weight=1.5)
    assert model.networks.variance_weight == 0.0  # a refused calibration changes nothing


@pytest.mark.parametrize("stored, expected", [(None, 1.0), (0, 0.0), (0.25, 0.25)])
def test_older_calibrations_add_the_variance(world: Path, tmp_path: Path, stored, expected
                                             ) -> None:
    path = _stored_calibration(world, tmp_path / "old.safetensors", "variance_weight",
                               _MISSING if stored is None else stored)
    assert stad.load_model(path, device="cpu").networks.variance_weight == expected


@pytest.mark.parametrize("bad", [-0.5, "0", float("nan"), 2, True])
def test_a_damaged_variance_weight_is_an_artifact_error(world: Path, tmp_path: Path, bad
                                                        ) -> None:
    path = _stored_calibration(world, tmp_path / "bad.safetensors", "variance_weight", bad)
    with pytest.raises(ArtifactError, match="variance_weight .*recalibrate"):
        stad.load_model(path, device="cpu")


@pytest.mark.parametrize("tta", ["hflip", "vflip", "flips", "dihedral"])
def test_tta_averages_the_error_over_the_views_of_every_map(world: Path, tmp_path: Path,
                                                           tta: str) -> None:
    model = stad.load_model(world / "model.safetensors", device="cpu")
    normal = sorted((world / "good").glob("*.png"))
    part = torch.from_numpy(np.asarray(Image.open(world / "part.png").convert("RGB"),
                                       np.float32) / 255).permute(2, 0, 1)[None]
    # By hand: e of each view, mapped back, averaged. A view is (dims flipped, then turns).
    views = {"hflip": [((), 0), ((-1,), 0)], "vflip": [((), 0), ((-2,), 0)],
             "flips": [((), 0), ((-1,), 0), ((-2,), 0), ((-2, -1), 0)],
             "dihedral": [(d, k) for k in range(4) for d in ((), (-1,))]}[tta]

    def view(x: torch.Tensor, dims: tuple[int, ...], k: int) -> torch.Tensor:
        return torch.rot90(x.flip(dims) if dims else x, k, (-2, -1))

    def back(x: torch.Tensor, dims: tuple[int, ...], k: int) -> torch.Tensor:
        x = torch.rot90(x, -k, (-2, -1))
        return x.flip(dims) if dims else x

    model.networks.tta = "none"
    p = model.scales[0]
    want = sum(back(model.networks.error_and_variance(view(part, d, k))[p][0], d, k)
               for d, k in views)
    model.networks.tta = tta
    got = model.networks.error_and_variance(part)[p][0]
    torch.testing.assert_close(got, want / len(views), rtol=1e-5, atol=1e-5)
    # Calibrated with it, every map uses it, the threshold still holds, and it is stored.
    calibration = model.calibrate(normal, normalize="global", tta=tta)
    assert calibration["tta"] == tta == model.networks.tta
    assert max(r.score for r in model.score(normal)) == pytest.approx(
        calibration["normal_scores"]["max"], abs=0)
    again = stad.load_model(model.save(tmp_path / "tta.safetensors"), device="cpu")
    assert again.networks.tta == tta
    assert again.score(world / "part.png").score == model.score(world / "part.png").score
    plain = stad.load_model(world / "model.safetensors", device="cpu")
    assert plain.networks.tta == "none"
    assert np.abs(plain.score(world / "part.png").map
                  - again.score(world / "part.png").map).max() > 1e-3
    with pytest.raises(UsageError, match="tta"):
        model.calibrate(normal, tta="rot45")  # type: ignore[arg-type]
    assert model.networks.tta == tta  # a refused calibration changes nothing


def test_older_calibrations_have_no_views(world: Path, tmp_path: Path) -> None:
    path = _stored_calibration(world, tmp_path / "old.safetensors", "tta")
    assert stad.load_model(path, device="cpu").networks.tta == "none"


@pytest.mark.parametrize("bad", ["rot45", 2, None])
def test_a_damaged_tta_is_an_artifact_error(world: Path, tmp_path: Path, bad) -> None:
    path = _stored_calibration(world, tmp_path / "bad.safetensors", "tta", bad)
    with pytest.raises(ArtifactError, match="tta .*recalibrate"):
        stad.load_model(path, device="cpu")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None, "0.5"])
def test_a_damaged_threshold_is_an_artifact_error_on_load(world: Path, tmp_path: Path,
                                                          bad) -> None:
    # A NaN threshold compares false with every score: every image would be judged normal.
    path = _stored_calibration(world, tmp_path / "bad.safetensors", "threshold", bad)
    with pytest.raises(ArtifactError, match="threshold .*recalibrate"):
        stad.load_model(path, device="cpu")


def test_uncalibrated_models_and_bad_settings_are_usage_errors(world: Path) -> None:
    model = stad.api.Model.load(world / "model.safetensors", device="cpu", calibration=False)
    assert model.calibration is None and model.threshold is None
    with pytest.raises(UsageError, match="not calibrated"):
        model.score(world / "part.png")
    with pytest.raises(UsageError, match="not calibrated"):  # at the call, not at next()
        model.iter_score([world / "part.png"])
    calibrated = stad.load_model(world / "model.safetensors", device="cpu")
    with pytest.raises(UsageError, match="threshold must be a finite number"):
        calibrated.iter_score([world / "part.png"], threshold=float("nan"))
    with pytest.raises(UsageError, match="batch_siz"):
        stad.load_model(world / "model.safetensors", batch_siz=2)
    with pytest.raises(UsageError, match="students"):
        stad.fit_students(world / "x.safetensors", students={"n_students": 1})


def test_evaluate_with_keywords(world: Path, tmp_path: Path) -> None:
    metrics = stad.evaluate(world / "model.safetensors", report=tmp_path / "report")
    fused = metrics["maps"]["fused"]
    assert 0.0 <= fused["image_auroc"] <= 1.0
    assert 0.0 <= fused["pixel_iou"] <= fused["pixel_f1"] <= 1.0  # IoU ≤ F1 always
    assert "pixel_f1" not in metrics["maps"]["p17"]  # the pixel threshold is the fused map's
    assert (tmp_path / "report" / "metrics.json").is_file()


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def test_the_api_page_has_examples() -> None:
    blocks = python_blocks(REPO / "docs" / "api.md")
    assert len(blocks) >= 4 and any("stad.load_model(" in b for b in blocks)


@pytest.mark.parametrize("doc", [d for d in DOCS if python_blocks(d)], ids=lambda d: d.name)
def test_documented_python_runs(doc: Path, world: Path, tmp_path: Path, monkeypatch) -> None:
    """Each file's ```python blocks, in order, in one namespace, in a copy of the world;
    ``root`` is predefined as an empty folder (the docs' name for "your data folder")."""
    real = stad.api._settings

    def shrunk(settings, keywords):
        merged = {**keywords, **{k: {**keywords.get(k, {}), **v} for k, v in SHRINK.items()}}
        return real(settings, merged)

    monkeypatch.setattr(stad.api, "_settings", shrunk)
    here = tmp_path / "world"
    shutil.copytree(world, here)
    monkeypatch.chdir(here)
    namespace: dict = {"root": here / "root"}
    for block in python_blocks(doc):
        exec(compile(block, f"{doc.name} example", "exec"), namespace)


def test_keyword_settings_keep_none_and_a_failed_calibration_changes_nothing(
        world: Path) -> None:
    model = stad.load_model(world / "model.safetensors", device="cpu", tile_size=None)
    assert model.networks.inference.tile_size is None  # None: never tiled, not the default
    with pytest.raises(UsageError, match="finite"):
        model.score(world / "part.png", threshold=float("nan"))
    before = model.score(world / "part.png")
    normal = sorted((world / "good").glob("*.png"))
    with pytest.raises(DataError, match="both normal and anomalous"):
        model.calibrate(normal, method="f1", test_images=normal, test_labels=[False, False])
    after = model.score(world / "part.png")  # the old calibration, statistics included
    assert after.score == before.score and after.threshold == before.threshold


def test_arrays_of_any_byte_order_and_truncated_pil_images(world: Path, tmp_path: Path
                                                           ) -> None:
    model = stad.load_model(world / "model.safetensors", device="cpu")
    rgb = np.asarray(Image.open(world / "part.png").convert("RGB"))
    wide = (rgb.astype(np.uint16) * 257).astype(">u2")  # big-endian 16-bit
    assert model.score(wide).score == pytest.approx(model.score(rgb).score, rel=1e-5)
    data = (world / "part.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    lazy = Image.open(tmp_path / "cut.png")  # opened, not decoded
    with pytest.raises(DataError, match="cannot be decoded"):
        model.score(lazy)
    lazy.close()


def test_one_image_where_a_list_is_taken_and_other_plausible_slips(world: Path) -> None:
    # Found by a review as a user would write them: each gave wrong figures or a foreign error.
    model = stad.load_model(world / "model.safetensors", device=torch.device("cpu"))
    part = world / "part.png"
    rgb = np.asarray(Image.open(part).convert("RGB"))
    one = model.score(rgb)
    # an (H, W, 3) array is one image, not H images of W pixels, wherever images are taken
    streamed = list(model.iter_score(rgb))
    assert len(streamed) == 1 and streamed[0].map.shape == (32, 32)
    assert streamed[0].score == pytest.approx(one.score, rel=1e-6)
    assert [r.path for r in model.iter_score(part)] == [str(part)]
    assert [r.path for r in model.score(iter([part, part]))] == [str(part)] * 2  # a generator
    normal = sorted((world / "good").glob("*.png"))
    assert model.calibrate(np.asarray(Image.open(normal[0]).convert("RGB")),
                           normalize="global")["n_images"] == 1
    # a calibration handed out is a copy: changing it changes no verdict
    model.calibrate(normal, normalize="global")
    handed = model.calibration
    handed["threshold"] = -1.0
    model.calibrate(normal, normalize="global")["threshold"] = -1.0
    assert model.threshold > -1.0 and model.score(part).threshold == model.threshold
    # results compare by identity (their arrays have no single truth value)
    results = model.score([part, part])
    assert results[0] != results[1] and results.index(results[1]) == 1
    assert len({results[0], results[1]}) == 2
    # a NumPy threshold becomes a float (the record is JSON); a non-number is a usage error
    chosen = model.score(part, threshold=np.float32(0.5))
    assert type(chosen.threshold) is float and json.dumps(chosen.to_dict())
    for bad in ("0.5", True, float("nan")):
        with pytest.raises(UsageError, match="threshold must be a finite number"):
            model.score(part, threshold=bad)
    # things that iterate but are not images, and empty names and lists (a later review)
    for bad in (b"part.png", bytearray(b"x"), io.BytesIO(part.read_bytes()), {"a": 1}):
        with pytest.raises(UsageError, match="paths, PIL images or arrays"):
            model.score(bad)
    for bad in ("", [part, " "]):
        with pytest.raises(UsageError, match="path is empty"):
            model.score(bad)
    with pytest.raises(UsageError, match="normal_images is empty"):
        model.calibrate([])
    with pytest.raises(UsageError, match="not 'good'"):  # bool("good") is True
        model.calibrate(normal, method="f1", test_images=[part, part],
                        test_labels=["good", "bad"])
    # a PIL image closed before it was read is a data error, not Pillow's AssertionError
    with Image.open(part) as closed:
        pass
    with pytest.raises(DataError, match="closed before it was loaded"):
        model.score(closed)


def test_settings_keep_the_presets_scales_following_the_image_size(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings made with a preset hold what it filled in; keywords on top must not take those
    # values as given: the scales it fitted to one image size follow a new one, and another
    # preset brings its own scales.
    from stad.config import STUDENT_PRESETS, settings_from

    monkeypatch.setitem(STUDENT_PRESETS, "fast", {**STUDENT_PRESETS["fast"], "image_size": 256,
                                                  "patch_sizes": [17, "17@128", "33@128"]})
    base = settings_from({"students": {"preset": "fast", "image_size": 128}})
    assert base.students.patch_sizes == [17, "17@64", "33@64"]
    for keywords, image_size, scales in (
            ({"image_size": 64}, 64, [17, "17@32", "33@32"]),
            ({"image_size": 256}, 256, [17, "17@128", "33@128"]),
            ({"epochs": 5}, 128, [17, "17@64", "33@64"]),
            ({"preset": "paper"}, 128, STUDENT_PRESETS["paper"].get("patch_sizes", [17, 33, 65]))):
        students = stad.api._settings(base, {"students": keywords}).students
        assert (students.image_size, students.patch_sizes) == (image_size, scales), keywords
    given = settings_from({"students": {"preset": "fast", "image_size": 128,
                                        "patch_sizes": "17,17@32"}})
    assert stad.api._settings(given, {"students": {"epochs": 5}}).students.patch_sizes == [
        17, "17@32"]  # scales the user gave stay


def test_loading_and_fitting_leave_the_callers_random_stream_and_imports_alone(
        world: Path, tmp_path: Path) -> None:
    # A network's default initialization drew from the global generator before its own
    # replaced it, and load_model's shape check built one on the meta device, whose normal_
    # imported torch._dynamo (2.3 of a 3.1 s load; it also sets environment variables).
    code = ("import sys, torch, stad\n"
            "torch.manual_seed(0); a = torch.rand(3)\n"
            "torch.manual_seed(0)\n"
            f"stad.load_model({str(world / 'model.safetensors')!r}).score("
            f"{str(world / 'part.png')!r})\n"
            "print(torch.equal(a, torch.rand(3)), 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.split() == ["True", "False"], out.stderr
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    stad.fit_students(tmp_path / "m.safetensors", teacher="random", dataset="synthetic",
                      category="grain", root=world / "data", students=SHRINK["students"])
    assert torch.equal(torch.rand(3), expected)


def test_the_steps_write_nothing_but_log_their_notes(world: Path, tmp_path: Path, capsys,
                                                     caplog) -> None:
    # A program that imports stad owns its stderr: the notes a command prints ("nothing to
    # resume: no checkpoint", "final loss") go to the "stad" logger, shown where the caller
    # asks for them.
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="stad"):
        stad.fit_students(tmp_path / "m.safetensors", teacher="random", dataset="synthetic",
                          category="grain", root=world / "data", students=SHRINK["students"],
                          resume=True)
    assert capsys.readouterr() == ("", "")
    notes = [r.getMessage() for r in caplog.records if r.name == "stad"]
    assert any("no checkpoint" in n for n in notes) and any("final loss" in n for n in notes)
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "stad")


def test_errors_a_python_caller_meets_name_the_keyword_too(world: Path, tmp_path: Path,
                                                            monkeypatch) -> None:
    # The steps share their checks with the command line; a message that named only `--root`
    # or `--resume` told a Python caller of a flag they cannot pass.
    out = tmp_path / "m.safetensors"
    with pytest.raises(UsageError, match=r"--root PATH \(root=PATH in Python\)"):
        stad.fit_students(out, dataset="mvtec", category="bottle")
    with pytest.raises(UsageError, match=r"category=NAME in Python"):
        stad.fit_students(out, dataset="synthetic", root=world / "data")
    with pytest.raises(UsageError, match=r"\(--device, device=\) must be"):
        resolve_device("tpu9")  # what Model.load(device=...) and load_model call
    assert not out.exists()

    monkeypatch.setattr(sys, "argv", ["my_script.py", "fit-students"])
    assert resume_command("fit-students").endswith(
        "or call stad.fit_students(...) again with resume=True")
    monkeypatch.setattr(sys, "argv", ["/usr/bin/stad", "fit-students", "--out", "m x"])
    assert resume_command("fit-students") == "stad fit-students --out 'm x' --resume"
