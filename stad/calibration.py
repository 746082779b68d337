"""Calibration (docs/method.md §5): the statistics that standardize e and v, and the image
threshold.

:func:`calibrate_model` computes per scale the mean and spread of the regression error e and
the predictive variance v over anomaly-free images (globally, or per map position), and the
normal images' scores; :func:`fpr_threshold` and :func:`f1_threshold` turn scores into a
threshold; :func:`validation_samples` finds the images ``fit-students`` held back for it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from stad.artifacts import finite_number, record
from stad.config import SMOOTH_SIGMA_SHARE, ScoreSettings
from stad.console import NULL_REPORTER, Reporter, warn
from stad.datasets.base import Sample
from stad.datasets.selection import DataSelection, relative_names
from stad.errors import ArtifactError, DataError, UsageError
from stad.handcrafted import gaussian_blur
from stad.model import TTA, Networks, standardized
from stad.regions import TopValues
from stad.scoring import image_score, prepared_batches


class Calibrated(NamedTuple):
    """What :func:`calibrate_model` found: the statistics per scale name, the normal images'
    scores, and the pixel threshold (None unless asked for)."""

    stats: dict[str, torch.Tensor]
    scores: list[float]
    pixel_threshold: float | None


@torch.inference_mode()
def calibrate_model(model: Networks, paths: Sequence[Path], rule: ScoreSettings, *,
                    device: torch.device, batch_size: int | None = None,
                    normalize: Literal["global", "position"] = "global",
                    pixel_fpr: float | None = None,
                    smooth_sigma: float | Literal["auto"] = 0.0,
                    variance_weight: float = 1.0, tta: str = "none",
                    reporter: Reporter = NULL_REPORTER) -> Calibrated:
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

    ``smooth_sigma`` (``"auto"``: :func:`resolve_smooth_sigma`) becomes the model's
    :attr:`~stad.model.Networks.smooth_sigma`: each scale's standardized map is smoothed with
    it before the fusion, in the scores and pixel threshold found here as in every map scored
    later. ``variance_weight`` becomes the model's :attr:`~stad.model.Networks.variance_weight`,
    w in each scale's score ẽ + w·ṽ (1: the paper's; 0: the regression error alone). ``tta``
    (a key of :data:`stad.model.TTA`) becomes the model's :attr:`~stad.model.Networks.tta`:
    the views whose e and v are averaged, before the statistics are taken.

    With ``pixel_fpr``, also the pixel threshold that at most that share of the normal
    images' pixels exceed (on the same maps as the scores; :class:`stad.regions.TopValues`).

    Returns:
        the statistics per scale name, the image scores of the normal images, and the pixel
        threshold (None without ``pixel_fpr``).
    """
    if normalize not in ("global", "position"):
        raise UsageError(f"calibrate.normalize must be global or position, not {normalize!r}")
    if not paths:
        raise DataError("no anomaly-free images to calibrate on: the validation split is empty")
    if tta not in TTA:
        raise UsageError(f"calibrate.tta must be one of {', '.join(TTA)}, not {tta!r}")
    model.tta = tta
    at, kept = _accumulate(model, paths, device, batch_size, reporter)
    model.smooth_sigma = resolve_smooth_sigma(smooth_sigma, model.preprocessing["image_size"])
    model.variance_weight = float(variance_weight)
    stats = {}
    for k in model.scale_names:
        stats[k] = _global_statistics(at[k], len(kept), k)
        model.scales[k].calib = stats[k].to(device)
        model.scales[k].calib_map = (_position_statistics(at[k], len(kept), stats[k], k)
                                     .to(device) if normalize == "position" else None)
    leave_out = normalize == "position" and len(kept) > 1
    if normalize == "position" and len(kept) == 1:
        warn("calibrated on one normal image: the per-position statistics are its own, which "
             "standardize its peaks away, so a threshold set on its score comes out too low "
             "and normal images are flagged; calibrate on more images (ten or more)")
    scores = []
    pixels = (TopValues(pixel_fpr, sum(h * w for _, (h, w) in kept))
              if pixel_fpr is not None else None)
    for ev_one, shape in kept:
        per_scale = {}
        for k, (e, v) in ev_one.items():
            if leave_out:
                own = _moments(e, v)[0].cpu()
                others = _position_statistics(at[k] - own, len(kept) - 1, stats[k], k)
                per_scale[k] = standardized(e, v, others.to(device), model.variance_weight)
            else:
                per_scale[k] = model.scales[k].standardize(e, v, model.variance_weight)
        fused = model.fuse(per_scale, shape)["fused"][0].float().cpu().numpy()
        scores.append(image_score(fused, rule))
        if pixels is not None:
            pixels.add(fused)
    return Calibrated(stats, scores, None if pixels is None else pixels.threshold())


Kept = list[tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], tuple[int, int]]]


def _accumulate(model: Networks, paths: Sequence[Any], device: torch.device,
                batch_size: int | None, reporter: Reporter
                ) -> tuple[dict[str, torch.Tensor], Kept]:
    """One pass over the images: per scale the per-position sums Σe, Σe², Σv, Σv² (4, s, s),
    and each image's e and v with its own size (for its score)."""
    at: dict[str, torch.Tensor] = {}
    kept: Kept = []
    task = reporter.task("calibrating", len(paths))
    for batch in prepared_batches(model, paths, batch_size or model.inference.batch_size):
        prepared = []
        for _, item in batch:
            if isinstance(item, DataError):
                raise item
            prepared.append(item)
        x = torch.stack([t for t, _ in prepared]).to(device)
        ev = model.error_and_variance(x)
        for k, (e, v) in ev.items():
            here = _moments(e, v).sum(0).cpu()
            at[k] = at[k] + here if k in at else here
        for i, (_, image) in enumerate(prepared):
            kept.append(({k: (e[i:i + 1], v[i:i + 1]) for k, (e, v) in ev.items()},
                         image.shape[:2]))
        task.advance(len(prepared))
    task.done()
    return at, kept


def _global_statistics(sums: torch.Tensor, n_images: int, scale: str) -> torch.Tensor:
    """(e_mean, e_std, v_mean, v_std) over every pixel of the images, float32 (4,); a zero
    spread is replaced by 1, with a warning."""
    se, se2, sv, sv2 = sums.sum((1, 2))
    count = n_images * sums[0].numel()  # pixels summed
    e_mean, v_mean = se / count, sv / count
    e_std = (se2 / count - e_mean**2).clamp_min(0).sqrt()
    v_std = (sv2 / count - v_mean**2).clamp_min(0).sqrt()
    if e_std < 1e-12 or v_std < 1e-12:
        warn(f"{scale}: regression error or variance is constant on the calibration images; "
             "its standardization uses a spread of 1")
    e_std = e_std if e_std >= 1e-12 else torch.tensor(1.0, dtype=torch.float64)
    v_std = v_std if v_std >= 1e-12 else torch.tensor(1.0, dtype=torch.float64)
    return torch.stack([e_mean, e_std, v_mean, v_std]).float()


def _moments(e: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(N, H, W) e and v → (N, 4, H, W) float64: e, e², v, v² at each pixel."""
    e, v = e.double(), v.double()
    return torch.stack([e, e.pow(2), v, v.pow(2)], 1)


def _position_statistics(sums: torch.Tensor, n_images: int, global_stats: torch.Tensor,
                         scale: str) -> torch.Tensor:
    # With the module's settings (read at call time), and checked: a non-finite e or v on a
    # calibration image would otherwise give a model that loading refuses.
    out = position_statistics(sums, n_images, global_stats, sigma=POSITION_SIGMA,
                              prior=POSITION_PRIOR)
    if not bool(torch.isfinite(out).all()):
        raise DataError(f"{scale}: the regression error or variance is not finite on the "
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


def resolve_smooth_sigma(sigma: float | Literal["auto"], image_size: int) -> float:
    """``calibrate.smooth_sigma`` in pixels of a model of ``image_size``: ``"auto"`` is
    ``image_size`` × :data:`~stad.config.SMOOTH_SIGMA_SHARE` (at most 64), a number itself."""
    if sigma == "auto":
        return min(64.0, image_size * SMOOTH_SIGMA_SHARE)
    return float(sigma)


def _stored_number(calibration: dict[str, Any], key: str, default: float, top: float,
                   path: Any) -> float:
    """``calibration[key]`` (``default`` when absent: a calibration older than the setting),
    checked: a finite number in [0, ``top``], else an :class:`ArtifactError` naming it."""
    value = calibration.get(key, default)
    if not finite_number(value) or not 0 <= value <= top:
        raise ArtifactError(f"{path}: the calibration's {key} {value!r} is not a number in "
                            f"[0, {top:g}]; recalibrate the model (stad calibrate)")
    return float(value)


def stored_smooth_sigma(calibration: dict[str, Any], path: Any) -> float:
    """The smoothing σ a stored calibration was made with (0 for calibrations older than the
    setting), checked: a finite number in [0, 64], else an :class:`ArtifactError`."""
    return _stored_number(calibration, "smooth_sigma", 0.0, 64, path)


def stored_variance_weight(calibration: dict[str, Any], path: Any) -> float:
    """w of a stored calibration's scores ẽ + w·ṽ (1, the paper's, for calibrations older than
    the setting), checked: a finite number in [0, 1], else an :class:`ArtifactError`."""
    return _stored_number(calibration, "variance_weight", 1.0, 1, path)


def stored_rule(calibration: Any, path: Any) -> dict[str, Any]:
    """The threshold, pixel threshold and image-score rule of a stored calibration (a model's
    or an ONNX export's ``calibration``), checked before any image is scored: a threshold that
    is missing or not a finite number would give every image a wrong verdict. Raises an
    :class:`ArtifactError` naming what is wrong."""
    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"{path}: the calibration's {what}; recalibrate the model "
                             "(stad calibrate)")

    if not isinstance(calibration, dict):
        raise bad(f"record is a {type(calibration).__name__}, not a table")

    def number(key: str, value: Any) -> float:
        if not finite_number(value):
            raise bad(f"{key} {value!r} is not a finite number")
        return float(value)

    threshold = number("threshold", calibration.get("threshold"))
    pixel = calibration.get("pixel_threshold")
    rule = calibration.get("image_score")
    if rule not in ("max", "topk_mean"):
        raise bad(f"image_score {rule!r} is not max or topk_mean")
    fraction = number("topk_fraction", calibration.get("topk_fraction"))
    if not 0 < fraction <= 1:
        raise bad(f"topk_fraction {fraction!r} is not in (0, 1]")
    return {"threshold": threshold, "image_score": rule, "topk_fraction": fraction,
            "pixel_threshold": None if pixel is None else number("pixel_threshold", pixel)}


def stored_tta(calibration: dict[str, Any], path: Any) -> str:
    """The test-time augmentation a stored calibration was made with ("none" for calibrations
    older than the setting), checked: a key of :data:`stad.model.TTA`, else an
    :class:`ArtifactError`."""
    value = calibration.get("tta", "none")
    if not isinstance(value, str) or value not in TTA:
        raise ArtifactError(f"{path}: the calibration's tta {value!r} is not one of "
                            f"{', '.join(TTA)}; recalibrate the model (stad calibrate)")
    return value


def describe_calibration(calibration: Mapping[str, Any] | None) -> str:
    """How a stored calibration makes its maps and image scores, in words: "position
    normalization, smoothing σ 2, error only, image score: top 1 % mean" ("" for none)."""
    if not calibration:
        return ""
    sigma = calibration.get("smooth_sigma") or 0
    weight = calibration.get("variance_weight", 1.0)
    terms = ("error only" if weight == 0 else "error + variance" if weight == 1
             else f"error + {weight:g} × variance")
    tta = calibration.get("tta", "none")
    return (f"{calibration.get('normalize', 'global')} normalization, "
            + (f"smoothing σ {sigma:g}" if sigma else "no smoothing") + f", {terms}"
            + (f", {tta} views averaged" if tta != "none" else "") + _describe_rule(calibration))


def _describe_rule(calibration: Mapping[str, Any]) -> str:
    """", image score: maximum" or ", image score: top 1 % mean" ("" where not recorded)."""
    rule = calibration.get("image_score")
    if rule is None:
        return ""
    if rule == "max":
        return ", image score: maximum"
    fraction = calibration.get("topk_fraction", ScoreSettings().topk_fraction)
    return f", image score: top {100 * float(fraction):g} % mean"


def check_threshold_method(method: str, threshold: float | None) -> None:
    """A manual threshold needs ``threshold`` and no other method takes one."""
    # One message for the command line and Python (the same names, spelled two ways).
    if threshold is not None and method != "manual":
        raise UsageError(f"a threshold (--threshold, threshold=) is taken only by the manual "
                         f"method (--method manual, method='manual'), not by {method!r}: give "
                         "one or the other")
    if method == "manual" and threshold is None:
        raise UsageError("the manual method (--method manual, method='manual') needs a "
                         "threshold: --threshold T, or threshold=T")


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


def validation_samples(selection: DataSelection, info: dict[str, Any]) -> list[Sample]:
    """The anomaly-free images fit-students kept for calibration (recorded in the model)."""
    val = record(record(info, "data", "the model"), "validation", "the model")
    if val.get("source") == "adapter val split":
        return selection.samples("val")
    wanted = val.get("images") or []
    if not isinstance(wanted, list) or not all(isinstance(w, str) for w in wanted):
        raise ArtifactError("the model has malformed stad metadata: data.validation.images "
                            "is not a list of names; produce it again")
    if not wanted:
        raise DataError("the model holds no record of validation images (students.val_fraction "
                        "was 0); refit with a held-back share or give the dataset a val split")
    train = selection.samples("train")
    by_name = dict(zip(relative_names(train, selection.root), train, strict=True))
    # a model fitted before relative_name made both sides absolute recorded the absolute path
    # of an image that its adapter listed absolute under a relative root
    by_name.update((os.path.abspath(s.image), s) for s in train if os.path.isabs(s.image))
    missing = [w for w in wanted if w not in by_name]
    if missing:
        raise DataError(f"validation images recorded in the model are missing from "
                        f"{selection.describe()}: {', '.join(missing[:5])}")
    return [by_name[w] for w in wanted]
