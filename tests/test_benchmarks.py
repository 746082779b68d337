"""The benchmark script documented in docs/benchmarks.md runs and prints what it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_speed_benchmark_quick_run():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed.py"), "--quick",
                             "--parts", "peak,dense,fused,patchwise,train,score,tiled"],
                            capture_output=True, text=True, timeout=900, check=True, cwd=REPO)
    data = json.loads(result.stdout)
    for key in ("peak", "ensemble_fp32", "ensemble_bf16", "dense_vs_patchwise_speedup",
                "train_p17_fp32", "peak_memory_mib", "ensemble_separate_vs_fused_fp32",
                "score_end_to_end_fp32", "tiled_memory"):
        assert key in data
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
                             "--compactness", "squared", "--target-whiten", "8"],
                            capture_output=True, text=True, timeout=600, check=True, cwd=REPO)
    assert json.loads(result.stdout.splitlines()[-1])["scales"] == [17]
    from stad.artifacts import load_artifact

    artifact = load_artifact(out, kind="teacher")
    info = artifact.info
    assert info["compactness"] == "squared" and info["target_whiten"] == 8
    settings = info["scales"]["p17"]["settings"]
    assert settings["compactness"] == "squared" and settings["target_whiten"] == 8
    assert info["scales"]["p17"]["iterations"] == 2
    assert all(t.dtype == torch.float16 for t in artifact.tensors.values())
