"""Speed benchmark: machine peak, dense inference, dense vs patch-wise, student training.

Prints a table on stderr and one JSON object on stdout. Run from the repository root:

    python benchmarks/speed.py                 # full run, 256×256 (a few minutes on 2 cores)
    python benchmarks/speed.py --quick         # smaller sizes, for a smoke test
    python benchmarks/speed.py --device cuda   # on a GPU

Throughput is counted from the architecture (``stad.networks.count_macs``; 1 MAC = 2 FLOP), so
"share of peak" compares the networks with the best large GEMM / 5×5 convolution measured on the
same machine in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from stad.networks import PATCH_SIZES, build_network, count_macs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of a large GEMM and of a dense 5×5 convolution."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    gemm = 2 * n**3 / timed(lambda: a @ b, device, repeats) / 1e9
    x = torch.randn(1, 256, 64, 64, device=device, dtype=dtype)
    w = torch.randn(256, 256, 5, 5, device=device, dtype=dtype)
    flops = 2 * 256 * 256 * 25 * 60 * 60
    conv = flops / timed(lambda: F.conv2d(x, w), device, repeats) / 1e9
    return {"gemm_gflops": gemm, "conv5x5_gflops": conv, "peak_gflops": max(gemm, conv)}


def dense_inference(p: int, size: int, device: torch.device, precision: str, repeats: int
                    ) -> dict[str, float]:
    net = build_network(p).to(device).eval()
    x = torch.randn(1, 3, size, size, device=device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.inference_mode(), ctx:
        seconds = timed(lambda: net.dense(x), device, repeats)
    flops = 2 * count_macs(p, size, size)
    return {"seconds": seconds, "images_per_s": 1 / seconds, "gflops": flops / seconds / 1e9}


def patchwise(p: int, size: int, device: torch.device, n_patches: int) -> float:
    """Seconds to evaluate ``forward`` on every pixel's patch, extrapolated from a sample."""
    net = build_network(p).to(device).eval()
    patches = torch.randn(n_patches, 3, p, p, device=device)
    with torch.inference_mode():
        seconds = timed(lambda: net(patches), device, 1)
    return seconds * size * size / n_patches


def training(p: int, crop: int, device: torch.device, precision: str, repeats: int
             ) -> dict[str, float]:
    """One step of 3 students on a batch of 4 crops (forward, backward, Adam)."""
    students = [build_network(p).to(device).train() for _ in range(3)]
    rf = students[0].receptive_field
    x = torch.randn(4, 3, crop + rf - 1, crop + rf - 1, device=device)
    target = torch.randn(4, 128, crop, crop, device=device)
    opt = torch.optim.Adam([q for s in students for q in s.parameters()], lr=1e-4)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        with ctx:
            outs = [s.dense_valid(x) for s in students]
        loss = sum((o.float() - target).pow(2).sum(1).mean() for o in outs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    seconds = timed(step, device, repeats)
    pixels = 4 * crop * crop
    # forward + backward ≈ 3 forwards; MACs of the valid region (the halo is extra work).
    flops = 3 * 3 * 2 * count_macs(p, crop, crop) * 4
    return {"seconds": seconds, "pixels_per_s": pixels / seconds, "gflops": flops / seconds / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    args = parser.parse_args()
    device = torch.device(args.device)
    size, repeats, gemm_n = (args.size, args.repeats, 4096)
    if args.quick:
        size, repeats, gemm_n = 64, 1, 1024
    result: dict[str, object] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": str(device) if device.type == "cpu"
                    else torch.cuda.get_device_name(device)},
        "size": size,
    }
    peaks = {name: peak(device, dt, gemm_n, repeats) for name, dt in DTYPES.items()}
    result["peak"] = peaks
    rows = []
    for precision in DTYPES:
        total = 0.0
        for p in PATCH_SIZES:
            r = dense_inference(p, size, device, precision, repeats)
            r["share_of_peak"] = r["gflops"] / peaks[precision]["peak_gflops"]
            result[f"dense_{precision}_p{p}"] = r
            total += r["seconds"] * 4  # teacher + 3 students per scale
            rows.append((f"dense p={p} {precision}", r["images_per_s"], r["gflops"],
                         r["share_of_peak"]))
        flops = sum(2 * count_macs(p, size, size) * 4 for p in PATCH_SIZES)
        ens = {"images_per_s": 1 / total, "gflops": flops / total / 1e9}
        ens["share_of_peak"] = ens["gflops"] / peaks[precision]["peak_gflops"]
        result[f"ensemble_{precision}"] = ens
        rows.append((f"ensemble (3×4 nets) {precision}", ens["images_per_s"], ens["gflops"],
                     ens["share_of_peak"]))
    speedups = {}
    for p in PATCH_SIZES:
        patch_s = patchwise(p, size, device, 256 if args.quick else 2048)
        speedups[f"p{p}"] = patch_s / result[f"dense_fp32_p{p}"]["seconds"]  # type: ignore
    result["dense_vs_patchwise_speedup"] = speedups
    for precision in DTYPES:
        r = training(17, 32 if args.quick else 64, device, precision, repeats)
        r["share_of_peak"] = r["gflops"] / peaks[precision]["peak_gflops"]
        result[f"train_p17_{precision}"] = r
        rows.append((f"train 3 students p=17 {precision}", r["pixels_per_s"], r["gflops"],
                     r["share_of_peak"]))
    if device.type == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["peak_memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'measure':34s} {'per s':>12s} {'GFLOP/s':>9s} {'of peak':>8s}", file=sys.stderr)
    for name, per_s, gflops, share in rows:
        print(f"{name:34s} {per_s:12.3f} {gflops:9.1f} {share:8.1%}", file=sys.stderr)
    for name, pk in peaks.items():
        print(f"peak {name}: GEMM {pk['gemm_gflops']:.0f}, conv 5×5 {pk['conv5x5_gflops']:.0f} "
              "GFLOP/s", file=sys.stderr)
    print("dense vs patch-wise speed-up: "
          + ", ".join(f"{k} {v:.0f}×" for k, v in speedups.items()), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
