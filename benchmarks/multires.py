"""Multi-resolution fusion benchmark: the scales of several calibrated models of one category,
fitted at different image sizes, fused into one map, and evaluated on the labelled test split.

Each model scores every test image through the public API (its maps come back at the image's
own size); a scale is named by its patch size and its model's image size, ``p17@256``. A
combination's map is the unweighted mean of its scales' maps, as a model fuses its own scales
(docs/method.md §5); each scale keeps its own model's calibration and smoothing, and the fused
map's image score is stad's default rule whatever rule a model was calibrated with. Prints one JSON
object per combination on stdout (AU-PRO up to ``--fpr-limit``, image AUROC, AU-PRO per defect
type) and a table on stderr. Run from the repository root:

    python benchmarks/multires.py --root DATA --category gravel \\
        gravel-128.safetensors gravel-256.safetensors \\
        --combo p17@128,p33@128 --combo p17@256,p17@128,p33@128

Without ``--combo``: each model's own scales, then every scale of every model together.
``--reference 6,10`` adds the no-training ImageNet nearest neighbour of quality.py
(:class:`quality.BackboneReference`, EfficientNet-Lite0 after those blocks; needs
``stad[imagenet]``; on the CPU in float32 whatever ``--device`` and ``--precision`` say) as one
more scale, ``ref6+10@256``, standardized by one mean and std, those of the pixels of its maps of
the ``val`` images (as ``calibrate --normalize global`` would; the models' scales keep their
own calibration); a deviation from the paper measured beside the students, not a part of stad.
Bad
input (an uncalibrated model, an unreadable image, an unknown scale) stops it with one line
naming it. docs/quality.md, "Scales at two image sizes" and "The backbone's nearest neighbour
as a fourth scale", report what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality.py lives beside this file

import quality  # noqa: E402

import stad  # noqa: E402
from stad.datasets.registry import get_adapter  # noqa: E402
from stad.errors import StadError  # noqa: E402
from stad.evaluation import compute_metrics  # noqa: E402


def scale_maps(models: Sequence[Path], images: Sequence[Path], precision: str = "fp32",
               device: str = "auto") -> tuple[list[dict[str, np.ndarray]], list[list[str]]]:
    """Per image, every scale's map of every model, keyed ``p{patch size}@{image size}``;
    and each model's scale names."""
    out: list[dict[str, np.ndarray]] = [{} for _ in images]
    groups: list[list[str]] = []
    for path in models:
        model = stad.load_model(path, device=device, precision=precision)
        keys = [_sized(name, model.image_size) for name in model.scales]
        held = sorted(set(keys) & {k for g in groups for k in g})
        if held:
            sys.exit(f"error: {path}: scale {', '.join(held)} is in another model too; "
                     "give each scale once")
        groups.append(keys)
        for maps, result in zip(out, model.iter_score(images), strict=True):
            maps.update({_sized(name, model.image_size): amap
                         for name, amap in result.maps.items()})
    return out, groups


def reference_maps(dataset: str, root: Path, category: str, blocks: Sequence[int], size: int,
                   images: Sequence[Path], seed: int = 0) -> tuple[str, list[np.ndarray]]:
    """The Lite0 nearest-neighbour scale of ``images``: its name and maps, standardized by
    the mean and std of the pixels of its maps of the category's ``val`` images."""
    adapter = get_adapter(dataset)
    val = adapter.list_samples(root, category, "val")
    if not val:
        sys.exit(f"error: --reference needs the val images of {category!r} under {root}")
    reference = quality.BackboneReference.fit(
        "efficientnet-lite0", blocks, size,
        [s.image for s in adapter.list_samples(root, category, "train")], seed)
    held = np.stack([reference.map(quality.load_image(s.image)) for s in val]).astype(np.float64)
    mean, std = held.mean(), max(held.std(), 1e-12)
    name = f"ref{'+'.join(map(str, blocks))}@{size}"
    return name, [((reference.map(quality.load_image(p)) - mean) / std).astype(np.float32)
                  for p in images]


def _sized(name: str, image_size: int) -> str:
    """A model's scale name with its image size: ``p17`` of a 256² model is ``p17@256``; a
    scale already at its own size (``p17@128``) keeps its name."""
    return name if "@" in name else f"{name}@{image_size}"


def combine(maps: Sequence[dict[str, np.ndarray]], samples: Sequence[stad.Sample],
            combo: Sequence[str], fpr_limit: float) -> dict[str, object]:
    """Metrics of the unweighted mean of ``combo``'s maps (image score: stad's default rule)."""
    items = [quality.evaluated(sample, {"fused": np.mean([scales[k] for k in combo], axis=0,
                                                         dtype=np.float32)})
             for sample, scales in zip(samples, maps, strict=True)]
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
    parser.add_argument("--dataset", default="mvtec", help="dataset adapter")
    parser.add_argument("--root", type=Path, required=True, help="dataset root folder")
    parser.add_argument("--category", required=True, help="category in the dataset")
    parser.add_argument("--combo", action="append", default=[],
                        help="comma-separated scales, e.g. p17@256,p33@128 (repeatable)")
    parser.add_argument("--fpr-limit", type=float, default=0.3,
                        help="AU-PRO is integrated up to this false-positive rate")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="of the networks that compute the maps (bf16: where the CPU has "
                        "native bf16, e.g. AMX)")
    parser.add_argument("--reference", metavar="A,B",
                        help="add the Lite0 nearest-neighbour map after blocks A and B as a "
                        "scale (e.g. 6,10; needs stad[imagenet])")
    parser.add_argument("--reference-size", type=int, default=256,
                        help="image size of --reference (default 256)")
    args = parser.parse_args(argv)
    if args.reference_size < 32:
        parser.error(f"--reference-size must be at least 32, got {args.reference_size}")
    if args.reference is not None:
        try:
            args.reference = quality.reference_blocks(args.reference, "--reference")
        except ValueError as exc:
            parser.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 < args.fpr_limit <= 1:
        sys.exit(f"error: --fpr-limit must be in (0, 1], got {args.fpr_limit}")
    combos = [[k.strip() for k in c.split(",")] for c in args.combo]
    for combo in combos:
        if len(set(combo)) != len(combo):
            sys.exit(f"error: --combo {','.join(combo)} names a scale twice")
    try:
        samples = get_adapter(args.dataset).list_samples(args.root, args.category, "test")
        if not samples:
            sys.exit(f"error: no test images for {args.category!r} under {args.root}")
        if args.reference:  # first: a missing package or val split stops it before the models
            name, refs = reference_maps(args.dataset, args.root, args.category, args.reference,
                                        args.reference_size, [s.image for s in samples])
        maps, groups = scale_maps(args.models, [s.image for s in samples], args.precision,
                                  args.device)
        if args.reference:
            for scales, ref in zip(maps, refs, strict=True):
                scales[name] = ref
            groups.append([name])
    except StadError as exc:
        sys.exit(f"error: {exc}")
    scales = [k for g in groups for k in g]
    if not combos:
        combos = [*groups, scales] if len(groups) > 1 else groups
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
