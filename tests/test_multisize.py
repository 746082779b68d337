"""Scales at their own image size (``p17@32`` in a 64² model): the scale sees the images
reduced as images are resized to a model's size (antialiased bilinear); its map is smoothed
with σ scaled to its size and upsampled to the model's before the fusion; fitted, calibrated,
stored, merged and exported like any scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import stad
from stad.artifacts import load_artifact, save_artifact
from stad.cli import app
from stad.datasets.synthetic import generate
from stad.errors import EXIT_USAGE, ArtifactError, UsageError
from stad.handcrafted import gaussian_blur
from stad.model import (
    Inference,
    Networks,
    Scale,
    model_from_tensors,
    model_tensors,
    parse_scale_name,
    reduce_to,
    scale_name,
)
from stad.networks import build_network

PRE = {"image_size": 36, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def _networks(seed: int = 0) -> Networks:
    """p17 at 36² and p17@18, p33@18 (one p17 teacher shared, as in an artifact)."""
    g = torch.Generator().manual_seed(seed)
    teachers = {p: build_network(p, 8, generator=g).double().eval() for p in (17, 33)}
    scales = {}
    for p, size in ((17, None), (17, 18), (33, 18)):
        students = [build_network(p, 8, generator=g).double().eval() for _ in range(2)]
        calib = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
        scales[scale_name(p, size)] = Scale(p, teachers[p], students,
                                            torch.randn(8, generator=g).double(),
                                            torch.rand(8, generator=g).double() + 0.5, calib,
                                            image_size=size)
    return Networks(scales=scales, preprocessing=dict(PRE), smooth_sigma=1.0)


def _x(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 36, 36, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def test_scale_names() -> None:
    assert scale_name(17) == "p17" and scale_name(17, 128) == "p17@128"
    assert parse_scale_name("p33@64") == (33, 64) and parse_scale_name("p65") == (65, None)
    with pytest.raises(ValueError, match="not a scale name"):
        parse_scale_name("p17@")
    assert _networks().scale_names == ["p17", "p17@18", "p33@18"]
    assert _networks().patch_sizes == [17, 33]


def _reduced(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)


def test_a_smaller_scale_sees_the_reduced_image_and_is_upsampled_into_the_fusion() -> None:
    model = _networks()
    x = _x()
    with torch.inference_mode():
        ev = model.error_and_variance(x)
        maps = model.maps(x)
        small = model.scales["p17@18"]
        e, v = small.error_and_variance(_reduced(x, 18))
    assert ev["p17"][0].shape == (2, 36, 36) and ev["p17@18"][0].shape == (2, 18, 18)
    torch.testing.assert_close(ev["p17@18"][0], e)
    torch.testing.assert_close(ev["p17@18"][1], v)
    # σ = 1 at 36² is σ = 0.5 on the 18² map, which is then upsampled bilinearly to 36².
    want = F.interpolate(gaussian_blur(small.standardize(e, v, 1.0), 0.5)[:, None],
                         size=(36, 36), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(maps["p17@18"], want)
    full = gaussian_blur(model.scales["p17"].standardize(*ev["p17"], 1.0), 1.0)
    torch.testing.assert_close(maps["p17"], full)
    torch.testing.assert_close(maps["fused"], (maps["p17"] + maps["p17@18"] + maps["p33@18"]) / 3)
    # Resized to an image's own size at the end, as every map is.
    assert model.maps(x, size=(40, 30))["p33@18"].shape == (2, 40, 30)


def test_tiles_and_views_work_per_scale() -> None:
    model = _networks(seed=2)
    x = _x(1, seed=3)
    with torch.inference_mode():
        whole = model.error_and_variance(x)
        model.inference = Inference(tile_size=8)
        tiled = model.error_and_variance(x)
        for k in whole:
            torch.testing.assert_close(tiled[k][0], whole[k][0], rtol=1e-10, atol=1e-10)
        model.inference = Inference()
        model.tta = "hflip"
        viewed = model.error_and_variance(x)
        model.tta = "dihedral"
        all_views = model.error_and_variance(x)
        model.tta = "none"
        mirrored = model.error_and_variance(x.flip(-1))
        turned = [model.error_and_variance(torch.rot90(v, k, (-2, -1)))
                  for k in range(4) for v in (x, x.flip(-1))]
    for k in whole:  # the mean of the image's and its mirror's e, mirrored back
        torch.testing.assert_close(viewed[k][0], (whole[k][0] + mirrored[k][0].flip(-1)) / 2)
        # the eight views: a turn of the reduced image is the reduction of the turned one
        back = [torch.rot90(t[k][0], -(i // 2), (-2, -1)) for i, t in enumerate(turned)]
        back = [b.flip(-1) if i % 2 else b for i, b in enumerate(back)]
        torch.testing.assert_close(all_views[k][0], torch.stack(back).mean(0))


def test_a_model_of_smaller_scales_only_fuses_at_its_own_size() -> None:
    # No scale at the model's 36²: the maps still come out at 36², smoothed with σ·s/S.
    model = _networks()
    model.scales = {k: v for k, v in model.scales.items() if "@" in k}
    x = _x()
    with torch.inference_mode():
        maps = model.maps(x)
        e, v = model.scales["p33@18"].error_and_variance(_reduced(x, 18))
    assert maps["fused"].shape == maps["p17@18"].shape == (2, 36, 36)
    want = F.interpolate(gaussian_blur(model.scales["p33@18"].standardize(e, v, 1.0), 0.5)[:, None],
                         size=(36, 36), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(maps["p33@18"], want)


def test_reduce_to_resamples_as_images_are_resized() -> None:
    # What stad.images.to_tensor does to an image resized to a model's size, so that a scale
    # at 18² in a 36² model sees what an 18² model sees of a 36² image; at any factor.
    x = _x()
    assert reduce_to(x, None) is x
    for size in (18, 12, 9):
        torch.testing.assert_close(reduce_to(x, size), _reduced(x, size), rtol=0, atol=1e-12)
    y = torch.randn(1, 3, 27, 27, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(reduce_to(y, 9), _reduced(y, 9), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="must divide"):
        reduce_to(x, 10)


def test_artifact_tensors_round_trip_with_per_position_statistics_at_each_size() -> None:
    model = _networks()
    model.scales["p17@18"].calib_map = torch.rand(4, 18, 18) + 0.5
    tensors = model_tensors(model)
    assert "student.p17@18.1.convs.0.weight" in tensors and "calib_map.p17@18" in tensors
    assert sum(k.startswith("teacher.p17.") for k in tensors) == sum(
        1 for _ in model.scales["p17"].teacher.state_dict())  # one shared teacher per size
    loaded = model_from_tensors(tensors, dict(PRE))
    assert loaded.scale_names == model.scale_names
    assert loaded.scales["p33@18"].image_size == 18 and loaded.scales["p17"].image_size is None
    assert loaded.scales["p17@18"].calib_map.shape == (4, 18, 18)
    with pytest.raises(ArtifactError, match="p17@18 does not fit a model of image size 24"):
        model_from_tensors(tensors, {**PRE, "image_size": 24})
    bad = dict(tensors)
    bad["calib_map.p17@18"] = torch.rand(4, 36, 36) + 0.5  # the model's size, not the scale's
    with pytest.raises(ArtifactError, match=r"calib_map\.p17@18 .*shape \(4, 18, 18\)"):
        model_from_tensors(bad, dict(PRE))
    # Scale names that are not names, or sizes that cannot be, are refused in one line.
    for name, message in (("p17@0", "not a scale name"), ("p017", "not a scale name"),
                          ("x17", "not a scale name"), ("p17@8", "at least 17")):
        renamed = {k.replace("p17@18", name): v for k, v in tensors.items()}
        with pytest.raises(ArtifactError, match=message):
            model_from_tensors(renamed, dict(PRE))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("multisize")
    generate(tmp / "data", categories=["grain"], image_size=64, n_train=6, n_val=2,
             n_test_good=2, n_test_per_defect=1, seed=3)
    return tmp


STUDENTS = {"epochs": 1, "n_students": 2, "batch_size": 2}


def test_fit_calibrate_score_and_export_a_model_with_scales_at_two_sizes(data: Path) -> None:
    model_path = data / "two.safetensors"
    result = stad.fit_students(model_path, teacher="random", dataset="synthetic",
                               category="grain", root=data / "data",
                               students={**STUDENTS, "image_size": 64,
                                         "patch_sizes": "17,33@32,17@32"})
    assert result["scales"] == ["p17", "p17@32", "p33@32"]
    artifact = load_artifact(model_path)
    assert artifact.config["students"]["patch_sizes"] == [17, "17@32", "33@32"]
    assert list(artifact.info["students"]["scales"]) == ["p17", "p17@32", "p33@32"]
    stad.calibrate(model_path)
    model = stad.load_model(model_path, device="cpu")
    assert model.scales == ["p17", "p17@32", "p33@32"] and model.image_size == 64
    assert model.networks.scales["p33@32"].calib_map.shape == (4, 32, 32)
    assert set(model.calibration["statistics"]) == set(model.scales)
    image = next((data / "data").rglob("test/*/*.png"))
    scored = model.score(image)
    assert set(scored.maps) == set(scored.scales) == set(model.scales)
    assert scored.map.shape == scored.maps["p33@32"].shape == (64, 64)
    # The calibrated threshold holds on the fused map: the normal images' scores sit below
    # what the fpr rule allows (all of them for two images at 1 %).
    normal = [data / "data" / "grain" / "val" / "good" / p.name
              for p in sorted((data / "data" / "grain" / "val" / "good").iterdir())]
    assert all(model.score(p).score <= model.threshold + 1e-6 for p in normal)
    pytest.importorskip("onnxruntime", reason="the onnx extra is part of the test extra")
    onnx_path = data / "two.onnx"
    out = CliRunner().invoke(app, ["export", "--model", str(model_path), "--out",
                                   str(onnx_path), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout.splitlines()[0])["scales"] == model.scales
    exported = stad.load_model(onnx_path)
    assert exported.scales == model.scales
    a, b = model.score(image), exported.score(image)
    spread = float(a.map.max() - a.map.min())
    assert abs(a.score - b.score) <= 1e-4 * spread
    for k in model.scales:
        assert float(abs(a.maps[k] - b.maps[k]).max()) <= 1e-4 * spread
    # Without its scale names, the metadata's patch sizes (what older exports hold) do not
    # name the graph's three maps: refused rather than mislabelled.
    import onnx

    proto = onnx.load(str(onnx_path))
    kept = [p for p in proto.metadata_props if p.key != "stad.scales"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, str(data / "unnamed.onnx"))
    with pytest.raises(ArtifactError, match="names 2 scales, its graph gives 3"):
        stad.load_model(data / "unnamed.onnx")


def test_the_cli_takes_scales_at_a_size_and_refuses_sizes_that_do_not_divide(data: Path
                                                                              ) -> None:
    runner = CliRunner()
    good = data / "cli.safetensors"
    out = runner.invoke(app, ["fit-students", "--dataset", "synthetic", "--root",
                              str(data / "data"), "--category", "grain", "--teacher", "random",
                              "--image-size", "64", "--patch-sizes", "17@32,17", "--epochs",
                              "1", "--students", "2", "--out", str(good), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout.splitlines()[-1])["scales"] == ["p17", "p17@32"]
    out = runner.invoke(app, ["fit-students", "--dataset", "synthetic", "--root",
                              str(data / "data"), "--category", "grain", "--teacher", "random",
                              "--image-size", "64", "--patch-sizes", "17,17@48",
                              "--out", str(data / "bad.safetensors")])
    assert out.exit_code == EXIT_USAGE
    assert "17@48" in out.output and "divisor of students.image_size 64" in out.output
    assert not (data / "bad.safetensors").exists()


def test_models_fitted_at_two_sizes_merge(data: Path, tmp_path: Path) -> None:
    small, large = tmp_path / "small.safetensors", tmp_path / "large.safetensors"
    for path, size, sizes in ((small, 32, [17, 33]), (large, 64, [17])):
        stad.fit_students(path, teacher="random", dataset="synthetic", category="grain",
                          root=data / "data",
                          students={**STUDENTS, "image_size": size, "patch_sizes": sizes})
    stad.calibrate(small)  # a merged model leaves calibrations out
    out = tmp_path / "merged.safetensors"
    result = stad.merge_models([small, large], out=out)
    assert result["scales"] == ["p17", "p17@32", "p33@32"] and result["image_size"] == 64
    merged, parts = load_artifact(out), {p: load_artifact(p) for p in (small, large)}
    assert merged.preprocessing["image_size"] == 64
    for name, t in parts[small].tensors.items():
        kind = name.split(".")[0]
        scale = name.split(".")[1]
        if kind in ("student", "norm"):  # renamed to the scale at 32²
            assert torch.equal(merged.tensors[name.replace(f".{scale}.", f".{scale}@32.", 1)], t)
        elif kind == "teacher":  # shared by the p17 scales: one copy, its own name
            assert torch.equal(merged.tensors[name], t)
    assert not any(k.startswith("calib") for k in merged.tensors)
    assert "norm.p33@32.mean" in merged.tensors and "teacher.p33.convs.0.weight" in merged.tensors
    for name, t in parts[large].tensors.items():
        assert torch.equal(merged.tensors[name], t)
    assert merged.config["students"]["patch_sizes"] == [17, "17@32", "33@32"]
    assert [m["image_size"] for m in merged.info["merged_from"]] == [32, 64]
    stad.calibrate(out)
    assert stad.load_model(out, device="cpu").scales == ["p17", "p17@32", "p33@32"]
    # A size that does not divide the largest cannot join.
    odd = tmp_path / "odd.safetensors"
    stad.fit_students(odd, teacher="random", dataset="synthetic", category="grain",
                      root=data / "data",
                      students={**STUDENTS, "image_size": 48, "patch_sizes": [33]})
    with pytest.raises(UsageError, match="image size 48 cannot join one of 64"):
        stad.merge_models([large, odd], out=tmp_path / "x.safetensors")
    # Nor can models whose teachers of one patch size differ.
    changed = load_artifact(small)
    changed.tensors["teacher.p17.convs.0.weight"] = \
        changed.tensors["teacher.p17.convs.0.weight"] + 1
    save_artifact(tmp_path / "changed.safetensors", changed)
    with pytest.raises(UsageError, match="different teachers for p17"):
        stad.merge_models([tmp_path / "changed.safetensors", large],
                          out=tmp_path / "y.safetensors")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()
