"""Speed benchmark: machine peak, dense inference, fused students, dense vs patch-wise,
student training, end-to-end ``stad score`` and the memory of tiled scoring.

Prints a table on stderr and one JSON object on stdout. Run from the repository root:

    python benchmarks/speed.py                 # full run, 256×256 (a few minutes on 2 cores)
    python benchmarks/speed.py --quick         # smaller sizes, for a smoke test
    python benchmarks/speed.py --device cuda   # on a GPU
    python benchmarks/speed.py --parts fused,score --threads 1   # some parts, one thread

Parts: peak, dense, fused, patchwise, train, teacher, score, tiled (see ``--help``). ``tiled``
runs the full ensemble on one ``--tiled-size``² image in a fresh process and reports its peak
resident memory; at 2048² that is tens of minutes on 2 CPU cores, so it is not in the default parts.

Throughput is counted from the architecture (``stad.networks.count_macs``; 1 MAC = 2 FLOP), so
"share of peak" compares the networks with the best large GEMM / 5×5 convolution measured on the
same machine in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stad.devices import native_bf16
from stad.model import Inference, Networks, Scale
from stad.networks import PATCH_SIZES, FusedNetworks, build_network, count_macs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PARTS = ("peak", "dense", "fused", "patchwise", "train", "teacher", "score", "tiled")
DEFAULT_PARTS = ("peak", "dense", "fused", "patchwise", "train", "score")
N_STUDENTS = 3


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


def teacher_step(p: int, batch: int, device: torch.device, precision: str, repeats: int
                 ) -> dict[str, float]:
    """One teacher pretraining step (dense distillation's shape: the strided network on a
    batch of p×p patches, a 1×1 decoder to a 152-d target, backward, Adam)."""
    net = build_network(p).to(device).train()
    decoder = torch.nn.Linear(128, 152).to(device)
    x = torch.randn(batch, 3, p, p, device=device)
    target = torch.randn(batch, 152, device=device)
    opt = torch.optim.Adam([*net.parameters(), *decoder.parameters()], lr=2e-4)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = decoder(net(x))
        loss = (out.float() - target).pow(2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return {"seconds": timed(step, device, repeats)}


def ensemble_separate_vs_fused(size: int, device: torch.device, precision: str, repeats: int
                               ) -> dict[str, dict[str, float]]:
    """The full ensemble (per scale the teacher and 3 students), as separate networks and as
    one :class:`FusedNetworks` per scale, timed back to back on the same padded input."""
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    seconds = {"separate": 0.0, "fused": 0.0}
    for p in PATCH_SIZES:
        nets = [build_network(p).to(device).eval() for _ in range(1 + N_STUDENTS)]
        fused = FusedNetworks(nets)
        x = nets[0].pad(torch.randn(1, 3, size, size, device=device))
        with torch.inference_mode(), ctx:
            seconds["separate"] += timed(
                lambda nets=nets, x=x: [n.dense_valid(x) for n in nets], device, repeats)
            seconds["fused"] += timed(lambda f=fused, x=x: f.dense_valid(x), device, repeats)
    flops = sum(2 * count_macs(p, size, size) * (1 + N_STUDENTS) for p in PATCH_SIZES)
    return {k: {"seconds": v, "images_per_s": 1 / v, "gflops": flops / v / 1e9}
            for k, v in seconds.items()}


def _random_model(size: int, device: torch.device) -> Networks:
    """A calibrated full-ensemble model with random weights (speed does not depend on them)."""
    g = torch.Generator().manual_seed(0)
    scales = {}
    for p in PATCH_SIZES:
        teacher, *students = [build_network(p, generator=g).eval()
                              for _ in range(1 + N_STUDENTS)]
        scales[f"p{p}"] = Scale(p, teacher, students, torch.zeros(128), torch.ones(128),
                          torch.tensor([0.0, 1.0, 0.0, 1.0]))
    pre = {"image_size": size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    return Networks(scales=scales, preprocessing=pre).to(device).eval()


def score_end_to_end(size: int, n_images: int, batch_size: int, device: torch.device,
                     precision: str, rounds: int) -> dict[str, float]:
    """Images/s of ``stad.commands.score.score`` (load the model, read PNGs, resize, all scales,
    fuse, verdicts, maps written) against the networks alone (``Networks.error_and_variance`` on the
    prepared tensors) on the same images; best of ``rounds`` interleaved runs after a warm-up."""
    from stad.artifacts import Artifact, save_artifact
    from stad.commands.score import score
    from stad.config import ScoreSettings, Settings
    from stad.model import model_tensors
    from stad.scoring import prepare

    model = _random_model(size, device)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        from PIL import Image

        for i in range(n_images):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        path = Path(tmp) / "model.safetensors"
        rule = ScoreSettings()  # stad's default (this benchmark took the maximum before 2026-12-06)
        calibration = {"threshold": 0.0, "image_score": rule.image_score,
                       "topk_fraction": rule.topk_fraction}
        save_artifact(path, Artifact(kind="model", tensors=model_tensors(model),
                                     config=Settings().model_dump(mode="json"),
                                     preprocessing=model.preprocessing, seed=0,
                                     info={"calibration": calibration}))
        settings = Settings(device=device.type,
                            score={"batch_size": batch_size, "precision": precision})
        paths = sorted(folder.iterdir())
        x = torch.stack([prepare(p, model)[0] for p in paths]).to(device)
        model.inference = Inference(batch_size=batch_size, precision=precision)

        def networks() -> None:
            with torch.inference_mode():
                for chunk in x.split(batch_size):
                    model.error_and_variance(chunk)

        def end_to_end() -> None:
            records = list(score(settings, model_path=path, inputs=[folder],
                                 maps_dir=Path(tmp) / "maps"))
            assert len(records) == n_images and all("score" in r for r in records)

        networks()  # warm-up
        net_s = e2e_s = float("inf")
        for _ in range(rounds):  # interleaved, so that a busy spell hits both alike
            start = time.perf_counter()
            networks()
            _sync(device)
            net_s = min(net_s, time.perf_counter() - start)
            start = time.perf_counter()
            end_to_end()
            e2e_s = min(e2e_s, time.perf_counter() - start)
    return {"network_images_per_s": n_images / net_s, "score_images_per_s": n_images / e2e_s,
            "ratio": net_s / e2e_s, "n_images": n_images, "batch_size": batch_size}


def peak_rss_mib() -> float:
    """Peak resident memory of this process: VmHWM on Linux (``ru_maxrss`` would also count
    the parent's memory at the fork that started a child process)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tiled_memory(size: int, tile: int, precision: str, threads: int) -> dict[str, float]:
    """Peak resident memory of scoring one size² image with the full ensemble in tiles, run in
    a fresh process (so that nothing else this benchmark did counts)."""
    code = (
        "import sys, time, torch\n"
        "sys.path.insert(0, 'benchmarks')\n"
        "from speed import _random_model, peak_rss_mib\n"
        "from stad.model import Inference\n"
        f"torch.set_num_threads({threads})\n"
        "m = _random_model(256, torch.device('cpu'))\n"
        f"m.inference = Inference(tile_size={tile}, precision='{precision}')\n"
        "base = peak_rss_mib()\n"
        f"x = torch.randn(1, 3, {size}, {size})\n"
        "t = time.perf_counter()\n"
        "with torch.inference_mode():\n"
        "    ev = m.error_and_variance(x)\n"
        "print(time.perf_counter() - t, base, peak_rss_mib())\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=root).stdout.split()
    return {"size": size, "tile_size": tile, "precision": precision, "seconds": float(out[0]),
            "rss_before_mib": float(out[1]), "peak_rss_mib": float(out[2])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--precisions", default="auto",
                        help="for the dense, fused, train, teacher and score parts: comma-"
                        "separated fp32,bf16; auto (default): fp32, and bf16 where the device "
                        "computes it natively (emulated bf16 is ~20x slower: docs/benchmarks.md)")
    parser.add_argument("--score-images", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4, help="of the score part")
    parser.add_argument("--tiled-size", type=int, default=2048)
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--tiled-precision", default="fp32")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        parser.error(f"unknown parts {sorted(parts - set(PARTS))}; choose among {PARTS}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.precisions == "auto":
        precisions = ["fp32", "bf16"] if native_bf16(device) else ["fp32"]
    else:
        precisions = args.precisions.split(",")
    size, repeats, gemm_n, n_score = (args.size, args.repeats, 4096, args.score_images)
    if args.quick:
        size, repeats, gemm_n, n_score = 64, 1, 1024, 4
    result: dict[str, object] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": str(device) if device.type == "cpu"
                    else torch.cuda.get_device_name(device)},
        "size": size,
        "parts": sorted(parts),
    }
    peaks: dict[str, dict[str, float]] = {}
    if "peak" in parts:
        peaks = {name: peak(device, DTYPES[name], gemm_n, repeats) for name in precisions}
        result["peak"] = peaks
    rows: list[tuple[str, float, float | None, float | None]] = []

    def share(gflops: float, precision: str) -> float | None:
        return gflops / peaks[precision]["peak_gflops"] if precision in peaks else None

    def row(name: str, per_s: float, gflops: float | None, precision: str) -> None:
        rows.append((name, per_s, gflops, None if gflops is None else share(gflops, precision)))

    if "dense" in parts:
        for precision in precisions:
            total = 0.0
            for p in PATCH_SIZES:
                r = dense_inference(p, size, device, precision, repeats)
                r["share_of_peak"] = share(r["gflops"], precision)  # type: ignore[assignment]
                result[f"dense_{precision}_p{p}"] = r
                total += r["seconds"] * (1 + N_STUDENTS)
                row(f"dense p={p} {precision}", r["images_per_s"], r["gflops"], precision)
            flops = sum(2 * count_macs(p, size, size) * (1 + N_STUDENTS) for p in PATCH_SIZES)
            ens = {"images_per_s": 1 / total, "gflops": flops / total / 1e9,
                   "share_of_peak": share(flops / total / 1e9, precision)}
            result[f"ensemble_{precision}"] = ens
            row(f"ensemble (3×4 nets) {precision}", ens["images_per_s"], ens["gflops"],
                precision)
    if "fused" in parts:
        for precision in precisions:
            both = ensemble_separate_vs_fused(size, device, precision, repeats)
            result[f"ensemble_separate_vs_fused_{precision}"] = both
            for kind, r in both.items():
                row(f"ensemble {kind} {precision}", r["images_per_s"], r["gflops"], precision)
    if "patchwise" in parts:
        speedups = {}
        for p in PATCH_SIZES:
            dense_s = dense_inference(p, size, device, "fp32", repeats)["seconds"]
            patch_s = patchwise(p, size, device, 256 if args.quick else 2048)
            speedups[f"p{p}"] = patch_s / dense_s
        result["dense_vs_patchwise_speedup"] = speedups
    if "train" in parts:
        for precision in precisions:
            r = training(17, 32 if args.quick else 64, device, precision, repeats)
            r["share_of_peak"] = share(r["gflops"], precision)  # type: ignore[assignment]
            result[f"train_p17_{precision}"] = r
            row(f"train 3 students p=17 {precision}", r["pixels_per_s"], r["gflops"],
                precision)
    if "teacher" in parts:
        for precision in precisions:
            for p in PATCH_SIZES:
                r = teacher_step(p, 16 if args.quick else 64, device, precision, repeats)
                result[f"teacher_step_p{p}_{precision}"] = r
                row(f"teacher steps p={p} {precision}", 1 / r["seconds"], None, precision)
    if "score" in parts:
        for precision in precisions:
            r = score_end_to_end(size, n_score, args.batch_size, device, precision,
                                 rounds=max(1, repeats - 1))
            result[f"score_end_to_end_{precision}"] = r
            row(f"networks only, {n_score} images {precision}", r["network_images_per_s"],
                None, precision)
            row(f"stad score end to end {precision}", r["score_images_per_s"], None, precision)
    if "tiled" in parts:
        tile = min(args.tile_size, 64) if args.quick else args.tile_size
        tiled_size = 128 if args.quick else args.tiled_size
        threads = args.threads or torch.get_num_threads()
        result["tiled_memory"] = tiled_memory(tiled_size, tile, args.tiled_precision, threads)
    if device.type == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["peak_memory_mib"] = peak_rss_mib()
    print(f"{'measure':38s} {'per s':>12s} {'GFLOP/s':>9s} {'of peak':>8s}", file=sys.stderr)
    for name, per_s, gflops, part in rows:
        flops_text = "" if gflops is None else f"{gflops:.1f}"
        share_text = "" if part is None else f"{part:.1%}"
        print(f"{name:38s} {per_s:12.3f} {flops_text:>9s} {share_text:>8s}", file=sys.stderr)
    for name, pk in peaks.items():
        print(f"peak {name}: GEMM {pk['gemm_gflops']:.0f}, conv 5×5 {pk['conv5x5_gflops']:.0f} "
              "GFLOP/s", file=sys.stderr)
    if "dense_vs_patchwise_speedup" in result:
        print("dense vs patch-wise speed-up: " + ", ".join(
            f"{k} {v:.0f}×" for k, v in result["dense_vs_patchwise_speedup"].items()),  # type: ignore
            file=sys.stderr)
    for precision in precisions:
        r = result.get(f"score_end_to_end_{precision}")
        if isinstance(r, dict):
            print(f"stad score / networks only ({precision}): {r['ratio']:.1%}", file=sys.stderr)
    if "tiled_memory" in result:
        t = result["tiled_memory"]
        print(f"tiled scoring of one {t['size']}² image, tile {t['tile_size']}, "  # type: ignore
              f"{t['precision']}: peak RSS {t['peak_rss_mib']:.0f} MiB in {t['seconds']:.0f} s",
              file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
