"""Multi-resolution fusion benchmark: the scales of several calibrated models of one category,
fitted at different image sizes, fused into one map, and evaluated on the labelled test split.

Each model scores every test image through the public API (its maps come back at the image's
own size); a scale is named by its patch size and its model's image size, ``p17@256``. A
combination's map is the unweighted mean of its scales' maps, as a model fuses its own scales
(METHOD.md §5); each scale keeps its own model's calibration and smoothing. Prints one JSON
object per combination on stdout (AU-PRO up to ``--fpr-limit``, image AUROC, AU-PRO per defect
type) and a table on stderr. Run from the repository root:

    python benchmarks/multires.py --root DATA --category gravel \\
        gravel-128.safetensors gravel-256.safetensors \\
        --combo p17@128,p33@128 --combo p17@256,p17@128,p33@128

Without ``--combo``: each model's own scales, then every scale of every model together.
docs/quality.md, "Scales at two image sizes", reports what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import stad
from stad.config import ScoreSettings
from stad.datasets.registry import get_adapter
from stad.evaluation import Evaluated, compute_metrics
from stad.images import load_mask
from stad.scoring import image_score


def scale_maps(models: Sequence[Path], images: Sequence[Path], precision: str = "fp32"
               ) -> list[dict[str, np.ndarray]]:
    """Per image, every scale's map of every model, keyed ``p{patch size}@{image size}``."""
    out: list[dict[str, np.ndarray]] = [{} for _ in images]
    for path in models:
        model = stad.load_model(path, device="cpu", precision=precision)
        for maps, result in zip(out, model.iter_score(images), strict=True):
            for name, amap in result.maps.items():
                key = f"{name}@{model.image_size}"
                if key in maps:
                    sys.exit(f"error: scale {key} is in two models; give each scale once")
                maps[key] = amap
    return out


def combine(maps: Sequence[dict[str, np.ndarray]], samples: Sequence[stad.Sample],
            combo: Sequence[str], fpr_limit: float) -> dict[str, object]:
    """Metrics of the unweighted mean of ``combo``'s maps (image score: the map's maximum)."""
    items = []
    for sample, scales in zip(samples, maps, strict=True):
        fused = np.mean([scales[k] for k in combo], axis=0, dtype=np.float32)
        mask = (load_mask(sample.mask, fused.shape) if sample.mask is not None
                else np.zeros(fused.shape, bool))
        items.append(Evaluated(sample, {"fused": fused}, mask,
                               {"fused": image_score(fused, ScoreSettings())}))
    result = compute_metrics(items, fpr_limit)["maps"]["fused"]
    return {"combo": ",".join(combo), "au_pro": result.get("au_pro"),
            "image_auroc": result.get("image_auroc"),
            "defects": {d: v.get("au_pro") for d, v in result["defects"].items()}}


def _fmt(value: object) -> str:
    """A metric to three decimals; "–" where the split cannot give it (no defect masks)."""
    return "–" if value is None else f"{value:.3f}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="calibrated model artifacts")
    parser.add_argument("--dataset", default="mvtec")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--combo", action="append", default=[],
                        help="comma-separated scales, e.g. p17@256,p33@128 (repeatable)")
    parser.add_argument("--fpr-limit", type=float, default=0.3)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="of the networks that compute the maps (bf16: where the CPU has "
                        "native bf16, e.g. AMX)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    samples = get_adapter(args.dataset).list_samples(args.root, args.category, "test")
    if not samples:
        sys.exit(f"error: no test images for {args.category!r} under {args.root}")
    maps = scale_maps(args.models, [s.image for s in samples], args.precision)
    scales = list(maps[0])
    combos = [c.split(",") for c in args.combo]
    if not combos:
        by_size: dict[str, list[str]] = {}
        for key in scales:
            by_size.setdefault(key.split("@")[1], []).append(key)
        combos = [*by_size.values(), scales] if len(by_size) > 1 else [scales]
    for combo in combos:
        unknown = sorted(set(combo) - set(scales))
        if unknown:
            sys.exit(f"error: --combo names {', '.join(unknown)}; the models hold "
                     f"{', '.join(scales)}")
    print(f"{'scales':<40} {'AU-PRO':>7} {'img AUROC':>9}  per defect", file=sys.stderr)
    for combo in combos:
        row = combine(maps, samples, combo, args.fpr_limit)
        print(json.dumps({"category": args.category, **row}), flush=True)
        defects = " ".join(f"{d} {_fmt(v)}" for d, v in row["defects"].items())
        print(f"{row['combo']:<40} {_fmt(row['au_pro']):>7} {_fmt(row['image_auroc']):>9}  "
              f"{defects}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
