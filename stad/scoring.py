"""Anomaly maps, image scores, calibration and verdicts (METHOD.md §5).

The map of an image: resize it to the model's image size, compute per scale ẽ + ṽ (the
regression error and predictive variance standardized with statistics from anomaly-free
validation images), average the scales, and resize the map back to the image's own size.
The image score is the maximum of that map by default (``score.image_score = "max"``) or the
mean of its top ``topk_fraction`` of pixels (``"topk_mean"``, less sensitive to one hot pixel).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from stad.config import ScoreSettings, Settings
from stad.console import NULL_REPORTER, Reporter, warn
from stad.errors import DataError, UsageError
from stad.handcrafted import gaussian_kernel, smooth
from stad.images import load_image, to_tensor
from stad.model import Inference, Model, standardized


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware: a CUDA GPU that supports it, or a CPU for
    which oneDNN has a bf16 path (AVX-512 CPUs). Elsewhere bf16 autocast is emulated, and was
    measured 20× slower than fp32 (docs/benchmarks.md, "bf16 without hardware support")."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        try:  # not counting emulation (pre-Ampere GPUs emulate it)
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no such argument
            return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → ``bf16`` where the device computes it natively (:func:`native_bf16`), else
    ``fp32``; ``fp32`` and ``bf16`` as given."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


@dataclass
class ImageMaps:
    """The maps of one image at its own resolution: ``maps["fused"]``, ``maps["p17"]``, ..."""

    path: Path
    maps: dict[str, np.ndarray]  # each (H, W) float32
    image: np.ndarray  # (H, W, 3) float32 in [0, 1], as read (for overlays)


def prepare(path: Path, model: Model) -> tuple[torch.Tensor, np.ndarray]:
    """Read one image as the artifact's preprocessing says: (3, S, S), and the image as read."""
    image = load_image(path)
    pre = model.preprocessing
    return to_tensor(image, size=pre["image_size"], mean=pre["mean"], std=pre["std"]), image


def configure(model: Model, cfg: ScoreSettings) -> Model:
    """Set how ``model`` computes maps from the ``score`` settings (batch, tiles, precision)."""
    model.inference = Inference(batch_size=cfg.batch_size, tile_size=cfg.tile_size,
                                precision=cfg.precision, fused=cfg.fused)
    return model


@dataclass
class ImageError:
    """An image that could not be read (yielded by :func:`iter_results` in its place)."""

    path: Path
    error: DataError


Prepared = tuple[Path, "tuple[torch.Tensor, np.ndarray] | DataError"]


def _prepare_all(paths: Sequence[Path], model: Model) -> list[Prepared]:
    out: list[Prepared] = []
    for path in paths:
        try:
            out.append((Path(path), prepare(Path(path), model)))
        except DataError as exc:
            out.append((Path(path), exc))
    return out


def prepared_batches(model: Model, paths: Sequence[Path], batch_size: int
                     ) -> Iterator[list[Prepared]]:
    """The images read and resized in batches, in order; each item is (path, (tensor, image))
    or (path, DataError). The next batch is decoded in a background thread while the caller
    runs the networks on this one (decoding and resizing release the GIL)."""
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stad-read") as pool:
        pending = pool.submit(_prepare_all, chunks[0], model)
        try:
            for nxt in [*chunks[1:], None]:
                batch = pending.result()
                if nxt is not None:
                    pending = pool.submit(_prepare_all, nxt, model)
                yield batch
        finally:
            pending.cancel()


@torch.inference_mode()
def iter_results(model: Model, paths: Sequence[Path], *, device: torch.device,
                 batch_size: int | None = None, reporter: Reporter = NULL_REPORTER,
                 what: str = "scoring") -> Iterator[ImageMaps | ImageError]:
    """Maps of each image, in order, computed ``batch_size`` images per pass (default: the
    model's ``inference.batch_size``); an unreadable image yields an :class:`ImageError` in
    its place. Results are yielded as each batch finishes."""
    task = reporter.task(what, len(paths))
    for batch in prepared_batches(model, paths, batch_size or model.inference.batch_size):
        good = [(path, item) for path, item in batch if not isinstance(item, DataError)]
        maps: dict[str, torch.Tensor] = {}
        if good:
            x = torch.stack([t for _, (t, _) in good]).to(device)
            maps = model.maps(x)
        i = 0
        for path, item in batch:
            if isinstance(item, DataError):
                yield ImageError(path, item)
                continue
            image = item[1]
            one = {k: v[i:i + 1] for k, v in maps.items()}
            i += 1
            if tuple(one["fused"].shape[-2:]) != image.shape[:2]:
                one = {k: F.interpolate(v[:, None].float(), size=image.shape[:2],
                                        mode="bilinear", align_corners=False)[:, 0]
                       for k, v in one.items()}
            yield ImageMaps(path, {k: v[0].float().cpu().numpy() for k, v in one.items()},
                            image)
        task.advance(len(batch))
    task.done()


def iter_maps(model: Model, paths: Sequence[Path], *, device: torch.device,
              batch_size: int | None = None, reporter: Reporter = NULL_REPORTER,
              what: str = "scoring") -> Iterator[ImageMaps]:
    """Maps of each image, in order, as :func:`iter_results`; an unreadable image raises its
    :class:`~stad.errors.DataError` once the images before it have been yielded."""
    for item in iter_results(model, paths, device=device, batch_size=batch_size,
                             reporter=reporter, what=what):
        if isinstance(item, ImageError):
            raise item.error
        yield item


def image_score(amap: np.ndarray, cfg: ScoreSettings) -> float:
    """The image score of a map: its maximum, or the mean of its top ``topk_fraction``."""
    if cfg.image_score == "max":
        return float(amap.max())
    flat = amap.ravel()
    k = max(1, int(round(flat.size * cfg.topk_fraction)))
    return float(np.partition(flat, flat.size - k)[-k:].mean())


@torch.inference_mode()
def calibrate_model(model: Model, paths: Sequence[Path], rule: ScoreSettings, *,
                    device: torch.device, batch_size: int | None = None,
                    normalize: Literal["global", "position"] = "global",
                    reporter: Reporter = NULL_REPORTER) -> tuple[dict[int, torch.Tensor],
                                                                 list[float]]:
    """Calibrate ``model`` in place on anomaly-free images, in one pass over them.

    Per scale, (e_mean, e_std, v_mean, v_std) over all pixels of the images become the
    scale's ``calib``; then the same e and v give each image's fused map and its score (the
    map resized to the image's own size, as :func:`iter_maps` does). A zero spread (a constant
    e or v, e.g. a single tiny image) would divide by zero in the standardization; it is
    replaced by 1 with a warning, which leaves that term unscaled.

    With ``normalize="position"``, each pixel position of the model's S × S maps also gets
    its own statistics (``calib_map``, :func:`position_statistics`), which the maps then use:
    for aligned images, where some places (edges, prints) are always harder to regress than
    others. ``"global"`` (the paper's) removes any per-position statistics.

    Each normal image's score is computed with per-position statistics from the *other*
    images (leave one out; with one image, its own): a position's statistics fitted on an image
    would standardize that image's own peaks away and set an ``fpr`` threshold too low.

    Returns:
        the statistics per patch size, and the image scores of the normal images.
    """
    if normalize not in ("global", "position"):
        raise UsageError(f"calibrate.normalize must be global or position, not {normalize!r}")
    if not paths:
        raise DataError("no anomaly-free images to calibrate on: the validation split is empty")
    at: dict[int, torch.Tensor] = {}  # per position: Σe, Σe², Σv, Σv² over the images
    kept: list[tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], tuple[int, int]]] = []
    task = reporter.task("calibrating", len(paths))
    for batch in prepared_batches(model, paths, batch_size or model.inference.batch_size):
        prepared = []
        for _, item in batch:
            if isinstance(item, DataError):
                raise item
            prepared.append(item)
        x = torch.stack([t for t, _ in prepared]).to(device)
        ev = model.error_and_variance(x)
        for p, (e, v) in ev.items():
            here = _moments(e, v).sum(0).cpu()
            at[p] = at[p] + here if p in at else here
        for i, (_, image) in enumerate(prepared):
            kept.append(({p: (e[i:i + 1], v[i:i + 1]) for p, (e, v) in ev.items()},
                         image.shape[:2]))
        task.advance(len(prepared))
    task.done()
    stats = {}
    for p in model.patch_sizes:
        se, se2, sv, sv2 = at[p].sum((1, 2))
        count = len(kept) * at[p][0].numel()  # pixels summed
        e_mean, v_mean = se / count, sv / count
        e_std = (se2 / count - e_mean**2).clamp_min(0).sqrt()
        v_std = (sv2 / count - v_mean**2).clamp_min(0).sqrt()
        if e_std < 1e-12 or v_std < 1e-12:
            warn(f"p={p}: regression error or variance is constant on the calibration images; "
                 "its standardization uses a spread of 1")
        e_std = e_std if e_std >= 1e-12 else torch.tensor(1.0, dtype=torch.float64)
        v_std = v_std if v_std >= 1e-12 else torch.tensor(1.0, dtype=torch.float64)
        stats[p] = torch.stack([e_mean, e_std, v_mean, v_std]).float()
        model.scales[p].calib = stats[p].to(device)
        model.scales[p].calib_map = (_position_statistics(at[p], len(kept), stats[p], p)
                                     .to(device) if normalize == "position" else None)
    scores = []
    leave_out = normalize == "position" and len(kept) > 1
    for ev_one, shape in kept:
        per_scale = {}
        for p, (e, v) in ev_one.items():
            if leave_out:
                own = _moments(e, v)[0].cpu()
                others = _position_statistics(at[p] - own, len(kept) - 1, stats[p], p)
                per_scale[p] = standardized(e, v, others.to(device))
            else:
                per_scale[p] = model.scales[p].standardize(e, v)
        fused = model.fuse(per_scale, shape)["fused"]
        scores.append(image_score(fused[0].float().cpu().numpy(), rule))
    return stats, scores


def _moments(e: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(N, H, W) e and v → (N, 4, H, W) float64: e, e², v, v² at each pixel."""
    e, v = e.double(), v.double()
    return torch.stack([e, e.pow(2), v, v.pow(2)], 1)


def _position_statistics(sums: torch.Tensor, n_images: int, global_stats: torch.Tensor, p: int
                         ) -> torch.Tensor:
    # With the module's settings (read at call time), and checked: a non-finite e or v on a
    # calibration image would otherwise give a model that loading refuses.
    out = position_statistics(sums, n_images, global_stats, sigma=POSITION_SIGMA,
                              prior=POSITION_PRIOR)
    if not bool(torch.isfinite(out).all()):
        raise DataError(f"p={p}: the regression error or variance is not finite on the "
                        "calibration images; the model cannot be calibrated per position")
    return out


POSITION_SIGMA = 2.0
"""Per-position statistics are pooled over a Gaussian window of this σ (model pixels)."""
POSITION_PRIOR = 2.0
"""... and each position's variance is shrunk towards the global one as if that had been
seen on this many images: ``(n·var_pos + k·var_global) / (n + k)``."""


def position_statistics(sums: torch.Tensor, n_images: int, global_stats: torch.Tensor, *,
                        sigma: float = POSITION_SIGMA, prior: float = POSITION_PRIOR
                        ) -> torch.Tensor:
    """Per-position (e_mean, e_std, v_mean, v_std) from per-position sums over n images.

    Args:
        sums: (4, S, S) Σe, Σe², Σv, Σv² over the images at each position.
        n_images: how many images were summed (≥ 1).
        global_stats: (4,) the global e_mean, e_std, v_mean, v_std (spreads > 0).

    The first and second moments are smoothed with a Gaussian of ``sigma`` pixels before the
    variance is taken (a position's neighbours count as more samples of it, and a structure
    that moves by a pixel between images widens the spread instead of flagging the shift); the
    variance is then shrunk towards the global one with weight ``prior``, so that few images
    cannot give a near-zero spread. Returns a (4, S, S) float32 tensor.
    """
    moments = gaussian_blur(sums.double() / n_images, sigma)
    g = global_stats.double()
    out = []
    for j in (0, 2):
        mean = moments[j]
        var = (moments[j + 1] - mean.pow(2)).clamp_min(0)
        var = (n_images * var + prior * g[j + 1].pow(2)) / (n_images + prior)
        out += [mean, var.sqrt().clamp_min(1e-12)]
    return torch.stack(out).float()


def gaussian_blur(t: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of the last two dimensions (edges replicated)."""
    if sigma <= 0:
        return t
    kernel = gaussian_kernel(sigma, t.dtype).to(t.device)
    return smooth(t.reshape(-1, 1, *t.shape[-2:]), kernel).reshape(t.shape)


def fpr_threshold(normal_scores: Sequence[float], target_fpr: float) -> float:
    """The smallest threshold at which at most ``target_fpr`` of normal images score above it.

    An image is anomalous when its score is > threshold. With n normal images, the FPR can only
    take values k/n, so the result is the k-th largest score with k = floor(target_fpr · n).
    """
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64))[::-1]
    if len(scores) == 0:
        raise DataError("no normal images to set a threshold on")
    k = int(np.floor(target_fpr * len(scores)))
    return float(scores[min(k, len(scores) - 1)])


def f1_threshold(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """The threshold (score > t is anomalous) that maximizes F1 on labelled images."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if y.all() or not y.any():
        raise DataError("an F1-optimal threshold needs both normal and anomalous images")
    candidates = np.unique(s)
    best_t, best_f1 = float(candidates[0]), -1.0
    for t in np.concatenate([[candidates[0] - 1.0], candidates]):
        pred = s > t
        tp = float(np.sum(pred & y))
        f1 = 2 * tp / (pred.sum() + y.sum())
        if f1 > best_f1:
            best_t, best_f1 = float(t), f1
    return best_t


def verdict_record(maps: ImageMaps, settings: Settings, threshold: float | None
                   ) -> dict[str, Any]:
    """The JSON record of one scored image (``stad score --json``)."""
    score = image_score(maps.maps["fused"], settings.score)
    per_scale = {k: image_score(v, settings.score) for k, v in maps.maps.items() if k != "fused"}
    return {
        "path": str(maps.path),
        "score": score,
        "threshold": threshold,
        "anomalous": None if threshold is None else bool(score > threshold),
        "scales": per_scale,
    }
