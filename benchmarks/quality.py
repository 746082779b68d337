"""Quality benchmark: AU-PRO@0.3 and image AUROC of stad on real-image sets, per teacher option.

For each set (benchmarks/realsets.py; also the ``synthetic`` categories by name) and each
teacher option (``random`` or a teacher artifact from ``stad pretrain-teacher``) it runs the
library pipeline as the CLI does -- ``fit``, ``calibrate``, ``evaluate`` from
:mod:`stad.commands` with settings from :func:`stad.config.resolve_settings` -- and the
per-pixel Gaussian colour baseline (no learning: :func:`fit_gaussian`). With ``--knn`` it also
scores each teacher's own descriptors without students (:func:`descriptor_knn`): how far the
descriptor space separates the defects at all. Prints a table on stderr and one JSON object on
stdout. Run from the repository root:

    python benchmarks/quality.py                          # all real sets, random teacher
    python benchmarks/quality.py --teachers random,teacher.safetensors --sets brick coffee
    python benchmarks/quality.py --baseline-only          # the Gaussian baseline alone
    python benchmarks/quality.py --teachers builtin --knn-only --sets gravel  # no students
    python benchmarks/quality.py --quick                  # tiny sizes, a smoke test
    # the fast preset's own scales (p = 17 at 256², p = 17 and 33 at 128²) on the 256² sets:
    python benchmarks/quality.py --teachers builtin --image-size 256 --patch-sizes 17,17@128,33@128

The defaults (``--image-size 128 --patch-sizes 17,33``) are the fast preset of 2026-12-05,
which most figures in docs/quality.md were measured with.

Generated sets are kept under ``--data`` (default ``$STAD_CACHE/realsets``, i.e.
``~/.cache/stad/realsets``) in a folder named after the generation parameters, and reused.
The environment's ``STAD_*`` settings are ignored: the figures depend on the flags only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # realsets.py lives beside this file

import realsets  # noqa: E402

from stad.backbones import BACKBONES  # noqa: E402
from stad.config import CalibrateSettings, ScoreSettings, resolve_settings  # noqa: E402
from stad.console import Reporter  # noqa: E402
from stad.datasets import synthetic  # noqa: E402
from stad.datasets.registry import get_adapter  # noqa: E402
from stad.errors import UsageError  # noqa: E402
from stad.evaluation import Evaluated, compute_metrics  # noqa: E402
from stad.fsutil import cache_dir  # noqa: E402
from stad.images import load_image, load_mask  # noqa: E402
from stad.model import TTA, scale_name  # noqa: E402
from stad.scoring import image_score  # noqa: E402
from stad.training.checkpoint import SUFFIX  # noqa: E402

QUICK = {"image_size": 32, "n_train": 6, "n_val": 2, "n_test_good": 2, "n_test_per_defect": 1,
         "epochs": 1, "patch_sizes": "17", "students": 2, "crop": 0, "sets": ["brick", "coins"]}
DEFAULT_RULE = ScoreSettings()
"""How every map here becomes an image score: stad's default (``score.image_score``; the top
1 % mean since 2026-12-06, the maximum before, which earlier figures in docs/quality.md use)."""

# --------------------------------------------------------------------------- Gaussian baseline

RIDGE_ABS = (2.0 / 255) ** 2
"""Added to every covariance diagonal: a 2-grey-level floor, so that a pixel that never varies
in training (or a grey image's rank-1 colour covariance) does not give infinite distances."""
RIDGE_REL = 0.01
"""Plus this share of the pixel's mean channel variance."""


@dataclass(frozen=True)
class GaussianModel:
    """Per pixel position: mean colour ``mean`` (H, W, 3) and inverse covariance
    ``precision`` (H, W, 3, 3)."""

    mean: np.ndarray
    precision: np.ndarray


def fit_gaussian(images: np.ndarray) -> GaussianModel:
    """Fit a Gaussian to the RGB values at each pixel position over training images.

    Args:
        images: (N, H, W, 3) float array in [0, 1], N >= 1.

    Returns:
        The :class:`GaussianModel`: full 3×3 covariance per pixel, regularized by
        ``(RIDGE_REL · trace/3 + RIDGE_ABS) · I``.
    """
    images = np.asarray(images, dtype=np.float64)
    mean = images.mean(axis=0)
    centred = images - mean
    cov = np.einsum("nhwc,nhwd->hwcd", centred, centred) / max(len(images) - 1, 1)
    ridge = RIDGE_REL * np.trace(cov, axis1=-2, axis2=-1) / 3 + RIDGE_ABS  # (H, W)
    cov = cov + ridge[..., None, None] * np.eye(3)
    return GaussianModel(mean=mean, precision=np.linalg.inv(cov))


def gaussian_map(model: GaussianModel, image: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each pixel's colour to its position's Gaussian: (H, W)."""
    d = np.asarray(image, dtype=np.float64) - model.mean
    return np.sqrt(np.einsum("hwc,hwcd,hwd->hw", d, model.precision, d))


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] == (size, size):
        return image
    return np.stack([np.asarray(Image.fromarray(image[..., c]).resize(
        (size, size), Image.Resampling.BILINEAR)) for c in range(3)], axis=-1)


def _map_to(amap: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if amap.shape == shape[:2]:
        return amap
    img = Image.fromarray(amap.astype(np.float32), mode="F")
    return np.asarray(img.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def evaluated(sample: Any, maps: dict[str, np.ndarray]) -> Evaluated:
    """A test sample with its maps (at the image's size): mask read at that size (none: all
    normal), image score of each map by stad's default rule, as a model calibrated with
    default settings scores it (so the baselines are ranked as stad's own maps are)."""
    shape = maps["fused"].shape
    mask = load_mask(sample.mask, shape) if sample.mask is not None else np.zeros(shape, bool)
    return Evaluated(sample, maps, mask, {k: image_score(m, DEFAULT_RULE) for k, m in maps.items()})


def baseline(dataset: str, root: Path, category: str, image_size: int) -> dict[str, Any]:
    """The Gaussian baseline on one category: fit on ``train``, evaluate on ``test`` with
    stad's evaluation code (image score by stad's default rule)."""
    adapter = get_adapter(dataset)
    start = time.perf_counter()
    train = adapter.list_samples(root, category, "train")
    model = fit_gaussian(np.stack([_resized(load_image(s.image), image_size) for s in train]))
    fitted = time.perf_counter()
    items = []
    for sample in adapter.list_samples(root, category, "test"):
        image = load_image(sample.image)
        amap = _map_to(gaussian_map(model, _resized(image, image_size)), image.shape)
        items.append(evaluated(sample, {"fused": amap}))
    result = _summary(compute_metrics(items, fpr_limit=0.3))
    result["seconds"] = {"fit": round(fitted - start, 2),
                         "evaluate": round(time.perf_counter() - fitted, 2)}
    return result


# --------------------------------------------------------------------------- descriptor kNN

KNN_BANK = 20_000
"""Training descriptors per scale (sampled at random) that :func:`descriptor_knn` compares with."""


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096
                     ) -> torch.Tensor:
    """Euclidean distance from each of (Q, D) ``queries`` to its nearest row of (B, D) ``bank``:
    (Q,), computed ``chunk`` queries at a time."""
    bank = bank.float()
    bank_sq = bank.pow(2).sum(1)
    out = []
    for q in queries.float().split(chunk):
        d2 = q.pow(2).sum(1, keepdim=True) - 2 * q @ bank.T + bank_sq
        out.append(d2.min(1).values.clamp_min(0).sqrt())
    return torch.cat(out)


@dataclass(frozen=True)
class DescriptorBank:
    """One scale's nearest-neighbour reference: the teacher, the normalization of its
    descriptors over the training images (docs/method.md §4) and a sample of those descriptors."""

    scale: Any  # stad.model.Scale: the teacher with its descriptor mean and std
    bank: torch.Tensor  # (B, D) normalized training descriptors

    @classmethod
    @torch.inference_mode()
    def fit(cls, net: Any, train: torch.Tensor, size: int, generator: torch.Generator
            ) -> DescriptorBank:
        """Normalize as for the students (:func:`stad.training.students.teacher_targets`) and keep
        ``size`` of the training pixels' descriptors, sampled with ``generator``."""
        from stad.model import Scale
        from stad.training.students import teacher_targets

        targets, mean, std = teacher_targets(net, train)
        flat = targets.permute(0, 2, 3, 1).reshape(-1, targets.shape[1])
        pick = torch.randperm(len(flat), generator=generator)[:size].to(flat.device)
        scale = Scale(net.patch_size, net, mean=mean.to(train.device), std=std.to(train.device))
        return cls(scale, flat[pick].float())

    @torch.inference_mode()
    def distances(self, x: torch.Tensor, batch: int = 4) -> torch.Tensor:
        """(N, 3, H, W) images → (N, H, W): each pixel's distance from its normalized
        descriptor to the nearest one in the bank."""
        maps = []
        for chunk in x.split(batch):
            y = self.scale.normalized_teacher(chunk)
            q = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
            maps.append(nearest_distance(q, self.bank).view(len(chunk), *y.shape[2:]))
        return torch.cat(maps)


def descriptor_knn(dataset: str, root: Path, category: str, teacher: str,
                   args: argparse.Namespace) -> dict[str, Any]:
    """The teacher's descriptors scored without students, as a reference for the models.

    Per scale a :class:`DescriptorBank` of :data:`KNN_BANK` training descriptors (sampled,
    seeded). A pixel's score is the distance of its normalized descriptor to the nearest one
    in the bank, standardized by the mean and std of the scores of the ``val`` images; the
    fused map is the mean over scales, its image score by stad's default rule.
    Computed in float32 on ``args.device``. Low figures mean that the descriptors themselves
    hardly tell the defects from normal texture by their density.
    """
    from stad.images import to_tensor
    from stad.model import resolve_teachers
    from stad.training.students import load_batch

    adapter = get_adapter(dataset)
    device = torch.device(args.device)
    patch_sizes = sorted(int(p) for p in args.patch_sizes.split(","))
    start = time.perf_counter()
    nets, _, _ = resolve_teachers(teacher, patch_sizes, args.fit_seed)
    size = args.image_size
    train, val = (load_batch(adapter.list_samples(root, category, split), size).to(device)
                  for split in ("train", "val"))
    tests = adapter.list_samples(root, category, "test")
    images = [load_image(s.image) for s in tests]  # decoded once: tensors and map sizes
    test = torch.stack([to_tensor(image, size=size) for image in images]).to(device)
    generator = torch.Generator().manual_seed(args.fit_seed)
    per_scale: dict[str, torch.Tensor] = {}
    for p in patch_sizes:
        bank = DescriptorBank.fit(nets[p].to(device).eval(), train, KNN_BANK, generator)
        reference = bank.distances(val).double()
        per_scale[f"p{p}"] = ((bank.distances(test).double() - reference.mean())
                              / reference.std().clamp_min(1e-12)).cpu()
    scored = time.perf_counter()
    maps = {**per_scale, "fused": torch.stack(list(per_scale.values())).mean(0)}
    items = []
    for i, (sample, image) in enumerate(zip(tests, images, strict=True)):
        items.append(evaluated(sample, {k: _map_to(v[i].float().numpy(), image.shape)
                                         for k, v in maps.items()}))
    result = _summary(compute_metrics(items, fpr_limit=0.3))
    result["seconds"] = {"descriptors": round(scored - start, 2),
                         "evaluate": round(time.perf_counter() - scored, 2)}
    return result


BACKBONE_BANK = 40_000
"""Training feature vectors kept by :class:`BackboneReference` at most (the issue's reference:
40 000); all of them where the training images give fewer."""


@dataclass(frozen=True)
class BackboneReference:
    """The no-training ImageNet reference of issue 16: EfficientNet-Lite features after two
    blocks (the second upsampled bilinearly to the first's grid), 3×3 average pooled, of images
    at ``size``²; a pixel's score is its feature's distance to the nearest of the training
    features (at most :data:`BACKBONE_BANK` of them, sampled and seeded where there are more),
    upsampled to ``size``², smoothed by a Gaussian of σ = 4 px and resized to the image's own
    size. No students and no teacher: what the backbone's features alone separate. Computed
    on the CPU in float32. Needs ``stad[imagenet]``; a block the backbone lacks is a
    UsageError."""

    net: Any  # stad.backbones' EfficientNet-Lite, in eval mode
    blocks: tuple[int, ...]
    size: int
    bank: torch.Tensor  # (B, C) training features

    @classmethod
    @torch.inference_mode()
    def fit(cls, backbone: str, blocks: Sequence[int], size: int, train: Sequence[Path],
            seed: int) -> BackboneReference:
        """The bank from the ``train`` images' features: all of them, or ``BACKBONE_BANK`` drawn
        at random (seeded) where there are more."""
        from stad.distillation import load_backbone

        net, _ = load_backbone(backbone)
        n = net.n_blocks
        if not blocks or not all(0 <= b < n for b in blocks):
            raise UsageError(f"reference blocks {','.join(map(str, blocks))}: {backbone} has "
                             f"blocks 0..{n - 1}")
        empty = cls(net.eval(), tuple(blocks), size, torch.empty(0))
        feats = torch.cat([empty.features([load_image(p) for p in train[i:i + 8]])
                           for i in range(0, len(train), 8)])
        bank = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
        pick = torch.randperm(len(bank), generator=torch.Generator().manual_seed(seed))
        return replace(empty, bank=bank[pick[:BACKBONE_BANK]])

    @torch.inference_mode()
    def features(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, C, h, w) pooled features of decoded images, resized to ``size``²."""
        from stad.distillation import to_backbone_input
        from stad.images import to_tensor

        x = torch.stack([to_tensor(image, size=self.size) for image in images])
        maps = self.net.features(to_backbone_input(x), self.blocks)
        grid = maps[0].shape[-2:]
        maps = [m if m.shape[-2:] == grid else torch.nn.functional.interpolate(
            m, size=grid, mode="bilinear", align_corners=False) for m in maps]
        return torch.nn.functional.avg_pool2d(torch.cat(maps, 1), 3, 1, 1)

    @torch.inference_mode()
    def map(self, image: np.ndarray) -> np.ndarray:
        """One decoded image's map, (H, W) at the image's own size."""
        from stad.handcrafted import gaussian_blur

        f = self.features([image])
        q = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        d = nearest_distance(q, self.bank).view(1, 1, *f.shape[-2:])
        d = torch.nn.functional.interpolate(d, size=(self.size, self.size), mode="bilinear",
                                            align_corners=False)[:, 0]
        return _map_to(gaussian_blur(d.double(), 4.0)[0].float().numpy(), image.shape)


def backbone_knn(dataset: str, root: Path, category: str, args: argparse.Namespace
                 ) -> dict[str, Any]:
    """:class:`BackboneReference` on one category (the issue's: Lite0 blocks 4 and 10 at 256²;
    ``args.reference_backbone``, ``args.reference_block_list`` and ``args.reference_size``
    choose another), its map evaluated as a model's fused map."""
    start = time.perf_counter()
    adapter = get_adapter(dataset)
    reference = BackboneReference.fit(
        args.reference_backbone, args.reference_block_list, args.reference_size,
        [s.image for s in adapter.list_samples(root, category, "train")], args.fit_seed)
    items = [evaluated(sample, {"fused": reference.map(load_image(sample.image))})
             for sample in adapter.list_samples(root, category, "test")]
    result = _summary(compute_metrics(items, fpr_limit=0.3))
    result["seconds"] = {"evaluate": round(time.perf_counter() - start, 2)}
    return result


# --------------------------------------------------------------------------- stad pipeline


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    maps = metrics["maps"]
    return {
        "au_pro": {k: v.get("au_pro") for k, v in maps.items()},
        "image_auroc": {k: v.get("image_auroc") for k, v in maps.items()},
        "pixel_auroc": maps["fused"].get("pixel_auroc"),
        "defects_au_pro": {d: v.get("au_pro") for d, v in maps["fused"]["defects"].items()},
    }


def run_stad(dataset: str, root: Path, category: str, teacher: str, args: argparse.Namespace,
             work: Path, epochs: int | None = None) -> dict[str, dict[str, Any]]:
    """fit once, then calibrate and evaluate once per ``args.normalize_list`` entry,
    ``args.smooth_list`` σ, ``args.weight_list`` variance weight and ``args.tta_list``
    views, through
    :mod:`stad.commands`, timing each step; results keyed by the label of each (normalization,
    σ, weight). The model is deleted afterwards unless
    ``args.keep_models`` names a folder to keep it in."""
    from stad.commands.calibrate import calibrate
    from stad.commands.evaluate import evaluate
    from stad.commands.train import fit_students as fit

    def settings_for(normalize: str, sigma: float | str | None = None,
                     weight: float | None = None, tta: str | None = None) -> Any:
        return resolve_settings({
            "dataset": dataset, "root": root, "category": category, "seed": args.fit_seed,
            "device": args.device,
            "students": {"preset": args.preset, "patch_sizes": args.patch_sizes,
                         "image_size": args.image_size, "epochs": epochs,
                         "crop_size": (args.image_size if args.crop == 0 else args.crop),
                         "n_students": args.students, "lr_schedule": args.lr_schedule,
                         "min_steps": args.min_steps},
            "calibrate": {"normalize": normalize, "smooth_sigma": sigma,
                          "variance_weight": weight, "tta": tta},
            "score": {"precision": args.precision}}, environ={})

    folder = args.keep_models or work
    folder.mkdir(parents=True, exist_ok=True)
    label = Path(teacher).stem if teacher != "random" else "random"
    prefix = f"{category}-{label}-{epochs if epochs is not None else 'preset'}ep-"
    stopped = sorted(folder.glob(f"{prefix}*{SUFFIX}")) if args.resume else []
    model = (folder / (stopped[0].name[:-len(SUFFIX)] + ".safetensors") if stopped
             else folder / f"{prefix}{len(list(folder.iterdir()))}.safetensors")
    start = time.perf_counter()
    fit(settings_for(args.normalize_list[0]), teacher=teacher, out=model, resume=bool(stopped),
        reporter=Reporter(None, lines=True))  # notes and progress lines on stderr
    fit_seconds = round(time.perf_counter() - start, 1)
    out = {}
    for normalize, sigma, weight, tta in ((n, s, w, t) for n in args.normalize_list
                                          for s in args.smooth_list for w in args.weight_list
                                          for t in args.tta_list):
        settings = settings_for(normalize, sigma, weight, tta)
        seconds = {"fit": fit_seconds}
        start = time.perf_counter()
        used = calibrate(settings, model_path=model)["smooth_sigma"]
        seconds["calibrate"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        result = evaluate(settings, model_path=model)
        seconds["evaluate"] = round(time.perf_counter() - start, 1)
        label = ", ".join([f"{normalize} normalization"] * (len(args.normalize_list) > 1)
                          + [f"smooth σ {sigma if sigma == 'auto' else f'{sigma:g}'}"]
                          * (len(args.smooth_list) > 1)
                          + [f"variance weight {weight:g}"] * (len(args.weight_list) > 1)
                          + [f"tta {tta}"] * (len(args.tta_list) > 1))
        out[label] = {**_summary(result), "smooth_sigma": used,
                      "variance_weight": settings.calibrate.variance_weight,
                      "tta": settings.calibrate.tta, "seconds": seconds}
    if args.keep_models is None:
        model.unlink()
    else:
        for r in out.values():
            r["model"] = str(model)  # calibrated as the last normalization says
    return out


# --------------------------------------------------------------------------- data and main


def prepare(name: str, base: Path, params: realsets.Params, seed: int) -> tuple[str, Path]:
    """Generate (or reuse) a set; returns the adapter name and root to read it with."""
    tag = (f"{params.image_size}px-seed{seed}-{params.n_train}-{params.n_val}-"
           f"{params.n_test_good}-{params.n_test_per_defect}")
    root = base / tag
    if name in realsets.SETS:
        realsets.ensure_set(root, name, seed=seed, params=params)
        return "mvtec", root
    root = root / "synthetic"
    synthetic.ensure_generated(root, name, seed=seed, image_size=params.image_size,
                               n_train=params.n_train, n_val=params.n_val,
                               n_test_good=params.n_test_good,
                               n_test_per_defect=params.n_test_per_defect)
    return "synthetic", root


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else "–"


def _progress(name: str, method: str, r: dict[str, Any]) -> None:
    # One line as each run ends, so that a long run shows its figures before the table.
    defects = ", ".join(f"{d} {_fmt(v)}" for d, v in r["defects_au_pro"].items())
    print(f"[{name}] {method}: AU-PRO {_fmt(r['au_pro'].get('fused'))} ({defects}), image "
          f"AUROC {_fmt(r['image_auroc'].get('fused'))}, seconds {r['seconds']}", file=sys.stderr)


def table(results: dict[str, dict[str, Any]], scales: Sequence[str]) -> str:
    head = ["set", "method", "AU-PRO fused", *(f"AU-PRO {s}" for s in scales),
            "img AUROC", "seconds"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for name, methods in results.items():
        for method, r in methods.items():
            secs = "+".join(f"{v:g}" for v in r["seconds"].values())
            lines.append(" | ".join([name, method, _fmt(r["au_pro"].get("fused")),
                                     *(_fmt(r["au_pro"].get(s)) for s in scales),
                                     _fmt(r["image_auroc"].get("fused")), secs]))
    return "\n".join(lines)


def reference_blocks(value: str, option: str = "--reference-blocks") -> tuple[int, ...]:
    """``option``'s "A,B" as block numbers; ValueError names the option."""
    try:
        blocks = tuple(int(b) for b in value.split(","))
    except ValueError:
        blocks = ()
    if not blocks or min(blocks) < 0:
        raise ValueError(f"{option} {value!r}: give block numbers, e.g. 4,10")
    return blocks


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_sets = ",".join(realsets.TUNED)
    parser.add_argument("--sets", nargs="+", default=None,
                        help=f"sets (default {default_sets}; held out: "
                             f"{', '.join(realsets.HELD_OUT)}); "
                             "also synthetic categories "
                             f"({', '.join(synthetic.CATEGORIES)})")
    parser.add_argument("--teachers", default="random",
                        help="comma-separated: 'random', 'builtin' and/or teacher artifact files")
    parser.add_argument("--baseline-only", action="store_true",
                        help="only the Gaussian baseline (no teacher runs)")
    parser.add_argument("--knn", action="store_true",
                        help="also score each teacher's descriptors by their distance to the "
                             "nearest training descriptor, without students")
    parser.add_argument("--knn-only", action="store_true",
                        help="the Gaussian baseline and --knn, no student fits")
    parser.add_argument("--reference", action="store_true",
                        help="also the no-training EfficientNet-Lite0 nearest-neighbour "
                        "reference (backbone_knn; needs stad[imagenet])")
    parser.add_argument("--reference-size", type=int, default=256,
                        help="image size of --reference (default 256, the issue's)")
    parser.add_argument("--reference-backbone", default="efficientnet-lite0",
                        choices=sorted(BACKBONES),
                        help="backbone of --reference (default the issue's Lite0)")
    parser.add_argument("--reference-blocks", default="4,10", metavar="A,B",
                        help="blocks of --reference, the second upsampled to the first's grid "
                        "(default 4,10: Lite0's last of the stride-8 and stride-16 stages; "
                        "Lite2's are 6,14)")
    parser.add_argument("--data", type=Path, default=None,
                        help="where generated sets are kept (default $STAD_CACHE/realsets)")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--patch-sizes", default="17,33",
                        help="the students' scales (default 17,33); 17@64 is p = 17 on the "
                        "images reduced to 64², as in `stad fit-students --patch-sizes`")
    parser.add_argument("--image-size", type=int, default=None, help="default 128")
    parser.add_argument("--epochs", default=None,
                        help="default: the preset's; comma-separated: one run per value")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="of calibrate and evaluate (score.precision)")
    parser.add_argument("--crop", type=int, default=None,
                        help="training crop size (0: whole images); default: the preset's")
    parser.add_argument("--students", type=int, default=None, help="students per scale")
    parser.add_argument("--lr-schedule", default=None, choices=["constant", "cosine"],
                        help="default: the preset's")
    parser.add_argument("--min-steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--normalize", default="position",
                        help="calibrate.normalize: position (default), global, or both "
                             "comma-separated (one fit, calibrated and evaluated per value)")
    parser.add_argument("--smooth-sigma", default=None,
                        help="calibrate.smooth_sigma (numbers or auto), comma-separated for one "
                             "calibration and evaluation per value (default: stad's, auto)")
    parser.add_argument("--variance-weight", default=None,
                        help="calibrate.variance_weight (0 to 1), comma-separated for one "
                             "calibration and evaluation per value (default: stad's, 0)")
    parser.add_argument("--tta", default="none",
                        help="calibrate.tta (none, hflip, vflip, flips, dihedral), "
                             "comma-separated for one calibration and evaluation per value "
                             "(default: stad's, none)")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0,
                        help="draws the sets and, unless --fit-seed is given, seeds the fits")
    parser.add_argument("--fit-seed", type=int, default=None, metavar="N",
                        help="seeds all but the data: the teachers drawn at random, the "
                             "students' fit, the nearest-neighbour samples (default: --seed); "
                             "refits of the same sets measure how far a fit moves the figures")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep-models", type=Path, default=None, metavar="DIR",
                        help="keep each fitted model in DIR (default: deleted after evaluation)")
    parser.add_argument("--resume", action="store_true",
                        help="continue each fit that a stopped run left as a checkpoint in "
                        "--keep-models DIR (run the same command again with --resume)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args(argv)
    if args.resume and args.keep_models is None:
        parser.error("--resume continues the checkpoints kept in --keep-models DIR; give it")
    quick = QUICK if args.quick else {}
    defaults = realsets.Params()
    for key, normal in (("image_size", defaults.image_size), ("epochs", None), ("crop", None),
                        ("students", None), ("n_train", defaults.n_train)):
        if getattr(args, key) is None:
            setattr(args, key, quick.get(key, normal))
    if args.quick:
        args.patch_sizes = QUICK["patch_sizes"]
    if args.fit_seed is None:
        args.fit_seed = args.seed
    sets = args.sets or quick.get("sets") or list(realsets.TUNED)
    args.sets = list(dict.fromkeys(v for item in sets for v in item.split(",") if v))
    known = set(realsets.SETS) | set(synthetic.CATEGORIES)
    unknown = [s for s in args.sets if s not in known]
    if unknown:
        parser.error(f"unknown set(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    args.teacher_list = [] if args.baseline_only else [t for t in args.teachers.split(",") if t]
    args.knn = args.knn or args.knn_only
    try:
        args.reference_block_list = reference_blocks(args.reference_blocks)
    except ValueError as exc:
        parser.error(str(exc))
    if args.knn and args.baseline_only:
        parser.error("--knn scores teachers' descriptors; --baseline-only runs no teacher")
    try:  # checked as stad checks students.patch_sizes (17, or 17@128 at a smaller size)
        students = resolve_settings({"students": {"image_size": args.image_size,
                                                  "patch_sizes": args.patch_sizes}},
                                    environ={}).students
    except UsageError as e:
        parser.error(f"--image-size {args.image_size} --patch-sizes {args.patch_sizes}: {e}")
    args.scale_names = [scale_name(*scale) for scale in students.scales]
    if args.knn and any(size is not None for _, size in students.scales):
        parser.error("--knn scores each patch size at --image-size: give plain patch sizes")
    args.normalize_list = list(dict.fromkeys(v for v in args.normalize.split(",") if v))
    if not args.normalize_list or set(args.normalize_list) - {"global", "position"}:
        parser.error(f"--normalize takes global and/or position, not {args.normalize!r}")
    try:  # each value checked as stad checks calibrate.smooth_sigma
        args.smooth_list = [resolve_settings({"calibrate": {"smooth_sigma": v}}, environ={})
                            .calibrate.smooth_sigma
                            for v in str(args.smooth_sigma or "auto").split(",") if v]
    except UsageError as e:
        parser.error(f"--smooth-sigma: {e}")
    if not args.smooth_list:
        parser.error("--smooth-sigma takes 'auto' or numbers from 0 to 64, comma-separated")
    default_weight = CalibrateSettings().variance_weight
    try:  # each value checked as stad checks calibrate.variance_weight
        args.weight_list = [resolve_settings({"calibrate": {"variance_weight": v}}, environ={})
                            .calibrate.variance_weight
                            for v in str(args.variance_weight or default_weight).split(",") if v]
    except UsageError as e:
        parser.error(f"--variance-weight: {e}")
    if not args.weight_list:
        parser.error("--variance-weight takes numbers from 0 to 1, comma-separated")
    args.tta_list = list(dict.fromkeys(v for v in args.tta.split(",") if v))
    if not args.tta_list or set(args.tta_list) - set(TTA):
        parser.error(f"--tta takes {', '.join(TTA)}, comma-separated, not {args.tta!r}")
    try:
        args.epoch_list = ([None] if args.epochs is None
                           else [int(v) for v in str(args.epochs).split(",") if v])
    except ValueError:
        parser.error(f"--epochs takes whole numbers separated by commas, not {args.epochs!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    q = QUICK if args.quick else {}
    d = realsets.Params()
    params = realsets.Params(image_size=args.image_size, n_train=args.n_train,
                             n_val=q.get("n_val", d.n_val),
                             n_test_good=q.get("n_test_good", d.n_test_good),
                             n_test_per_defect=q.get("n_test_per_defect", d.n_test_per_defect))
    base = args.data or cache_dir() / "realsets"
    scales = args.scale_names
    results: dict[str, dict[str, Any]] = {}
    generation: dict[str, float] = {}
    total = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stad-quality-") as tmp:
        for name in args.sets:
            start = time.perf_counter()
            dataset, root = prepare(name, base, params, args.seed)
            generation[name] = round(time.perf_counter() - start, 1)
            results[name] = {"gaussian": baseline(dataset, root, name, args.image_size)}
            _progress(name, "gaussian", results[name]["gaussian"])
            if args.reference:
                key = f"{args.reference_backbone} kNN @ {args.reference_size}px"
                try:
                    results[name][key] = backbone_knn(dataset, root, name, args)
                except UsageError as exc:
                    sys.exit(f"error: --reference: {exc}")
                _progress(name, key, results[name][key])
            for teacher in args.teacher_list:
                if args.knn:
                    key = f"{teacher} (descriptor kNN)"
                    results[name][key] = descriptor_knn(dataset, root, name, teacher, args)
                    _progress(name, key, results[name][key])
                for epochs in [] if args.knn_only else args.epoch_list:
                    method = (teacher if len(args.epoch_list) == 1
                              else f"{teacher} @ {epochs} epochs")
                    print(f"[{name}] fitting {method} ...", file=sys.stderr)
                    runs = run_stad(dataset, root, name, teacher, args, Path(tmp), epochs)
                    for label, r in runs.items():
                        key = method if len(runs) == 1 else f"{method} ({label})"
                        results[name][key] = r
                        _progress(name, key, r)
    print(table(results, scales), file=sys.stderr)
    out = {
        "settings": {"preset": args.preset, "patch_sizes": args.patch_sizes,
                     "image_size": args.image_size, "epochs": args.epoch_list, "crop": args.crop,
                     "precision": args.precision, "normalize": args.normalize_list,
                     "smooth_sigma": args.smooth_list, "variance_weight": args.weight_list,
                     "tta": args.tta_list, "knn": args.knn,
                     "reference": args.reference and args.reference_size,
                     "reference_backbone": args.reference and args.reference_backbone,
                     "reference_blocks": args.reference and args.reference_blocks,
                     "students": args.students, "lr_schedule": args.lr_schedule,
                     "min_steps": args.min_steps, "seed": args.seed, "fit_seed": args.fit_seed,
                     "device": args.device,
                     "data": asdict(params), "teachers": args.teacher_list},
        "data_root": str(base),
        "generate_seconds": generation,
        "results": results,
        "total_seconds": round(time.perf_counter() - total, 1),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
