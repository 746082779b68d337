"""The benchmark script documented in docs/benchmarks.md runs and prints what it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_speed_benchmark_quick_run():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed.py"), "--quick"],
                            capture_output=True, text=True, timeout=600, check=True)
    data = json.loads(result.stdout)
    for key in ("peak", "ensemble_fp32", "ensemble_bf16", "dense_vs_patchwise_speedup",
                "train_p17_fp32", "peak_memory_mib"):
        assert key in data
    assert data["peak"]["fp32"]["peak_gflops"] > 0
    assert all(v > 1 for v in data["dense_vs_patchwise_speedup"].values())
    assert "ensemble (3×4 nets) fp32" in result.stderr
