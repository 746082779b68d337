"""End-to-end scoring speed of a model in PyTorch (fp32, and bf16 where the CPU computes it
natively) and exported to ONNX (onnxruntime, fp32 and int8), on the same image files, with
each backend's largest map difference from PyTorch fp32 and whether the verdicts agree.

    python benchmarks/onnx_speed.py --model model.safetensors --images DIR [--threads 2]
        [--backends torch-fp32,torch-bf16,onnx-fp32,onnx-int8] [--evaluate]

Each backend scores every image of ``--images`` (read, resize, networks, map resized back,
score) through ``stad.load_model(...).score``, once to warm up and then ``--rounds`` times;
the best round counts. ``onnx-int8`` is exported with ``stad export --quantize int8`` (its
activation ranges set on the held-back images the model records, so the model's data must
be where it was fitted). ``--evaluate`` also runs ``stad evaluate`` per backend on the model's
labelled test split (fused AU-PRO, image AUROC). Prints one JSON object on stdout; the
figures are in docs/benchmarks.md ("ONNX export").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import stad
from stad.config import resolve_settings
from stad.devices import native_bf16
from stad.images import is_image_file

BACKENDS = ("torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8")


def _timed(model: stad.Model, paths: list[Path], rounds: int) -> tuple[float, list]:
    results = model.score(paths)  # warm-up (and the results compared)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        model.score(paths)
        best = min(best, time.perf_counter() - start)
    return len(paths) / best, results


def _model_file(backend: str, model: Path, tmp: Path
                ) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The file to load for ``backend`` (exported into ``tmp`` for the ONNX ones), the score
    settings to load it with, and the export's figures."""
    if backend.startswith("torch"):
        return model, {"device": "cpu", "precision": backend.split("-")[1]}, {}
    from stad.commands.export import export

    out = tmp / f"{backend}.onnx"
    quantize = "int8" if backend == "onnx-int8" else None
    start = time.perf_counter()
    export(resolve_settings({}, environ={}), model_path=model, out=out, quantize=quantize)
    return out, {}, {"export_seconds": round(time.perf_counter() - start, 1),
                     "bytes": out.stat().st_size}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated, from " + ", ".join(BACKENDS)
                        + " (torch-bf16 is skipped where bf16 is emulated)")
    parser.add_argument("--evaluate", action="store_true",
                        help="also stad evaluate per backend on the model's test split")
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown or "torch-fp32" not in backends:
        parser.error(f"--backends: from {', '.join(BACKENDS)}, torch-fp32 included (the "
                     f"reference); not {', '.join(unknown) or args.backends}")
    torch.set_num_threads(args.threads)
    paths = sorted(p for p in args.images.rglob("*") if is_image_file(p))
    out: dict[str, Any] = {"model": str(args.model), "images": len(paths),
                           "threads": args.threads, "torch": torch.__version__,
                           "native_bf16": native_bf16(torch.device("cpu")), "backends": {}}
    if "torch-bf16" in backends and not out["native_bf16"]:
        backends.remove("torch-bf16")
        out["skipped"] = {"torch-bf16": "this CPU emulates bf16 (20x slower than fp32)"}
    reference: list = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in sorted(backends, key=BACKENDS.index):  # torch-fp32 first
            path, load, figures = _model_file(backend, args.model, Path(tmp))
            model = stad.load_model(path, batch_size=args.batch_size, **load)
            figures["images_per_s"], results = _timed(model, paths, args.rounds)
            if backend == "torch-fp32":
                reference = results
            figures["max_map_difference_of_spread"] = max(
                float(np.abs(a.map - b.map).max() / max(float(a.map.max() - a.map.min()), 1e-12))
                for a, b in zip(reference, results, strict=True))
            figures["verdicts_identical"] = all(a.anomalous == b.anomalous
                                                for a, b in zip(reference, results, strict=True))
            if args.evaluate:
                metrics = stad.evaluate(path, device="cpu", score={
                    "precision": load["precision"]} if "precision" in load else {})
                fused = metrics["maps"]["fused"]
                figures.update(au_pro=fused["au_pro"], image_auroc=fused["image_auroc"],
                               test_images=fused.get("n_images"))
            out["backends"][backend] = figures
            print(f"{backend}: {figures['images_per_s']:.2f} images/s, max map difference "
                  f"{figures['max_map_difference_of_spread']:.2e} of the spread, verdicts "
                  f"{'identical' if figures['verdicts_identical'] else 'DIFFER'}"
                  + (f", AU-PRO {figures['au_pro']:.4f}" if args.evaluate else ""),
                  file=sys.stderr)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
