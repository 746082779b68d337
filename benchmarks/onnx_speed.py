"""End-to-end scoring speed of a model in PyTorch (fp32, and bf16 where the CPU has it) and
exported to ONNX (onnxruntime), on the same image files, with the largest map difference.

    python benchmarks/onnx_speed.py --model model.safetensors --images DIR [--threads 2]

Each backend scores every image of ``--images`` (read, resize, networks, map resized back,
score) through ``stad.load_model(...).score``, once to warm up and then ``--rounds`` times;
the best round counts. Prints one JSON object on stdout (images/s per backend, the ONNX file's
size, the largest |map difference| relative to the map's spread, identical verdicts).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import stad
from stad.images import is_image_file


def _timed(model: stad.Model, paths: list[Path], rounds: int) -> tuple[float, list]:
    results = model.score(paths)  # warm-up (and the results compared)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        model.score(paths)
        best = min(best, time.perf_counter() - start)
    return len(paths) / best, results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = sorted(p for p in args.images.rglob("*") if is_image_file(p))
    out: dict = {"model": str(args.model), "images": len(paths), "threads": args.threads,
                 "torch": torch.__version__}
    torch_model = stad.load_model(args.model, device="cpu", batch_size=args.batch_size)
    out["torch_fp32_images_per_s"], reference = _timed(torch_model, paths, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        exported = torch_model.export(onnx_path)
        out["onnx_bytes"] = exported["bytes"]
        onnx_model = stad.load_model(onnx_path, batch_size=args.batch_size)
        out["onnx_images_per_s"], got = _timed(onnx_model, paths, args.rounds)
    out["max_map_difference_of_spread"] = max(
        float(np.abs(a.map - b.map).max() / max(float(a.map.max() - a.map.min()), 1e-12))
        for a, b in zip(reference, got, strict=True))
    out["verdicts_identical"] = all(a.anomalous == b.anomalous
                                    for a, b in zip(reference, got, strict=True))
    print(json.dumps(out, indent=2))
    print(f"torch fp32 {out['torch_fp32_images_per_s']:.2f} img/s, onnxruntime "
          f"{out['onnx_images_per_s']:.2f} img/s, max map difference "
          f"{out['max_map_difference_of_spread']:.2e} of the spread", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
