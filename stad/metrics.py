"""Evaluation of anomaly maps and image scores, as the MVTec AD evaluation script does it.

Everything here is numpy (and scikit-learn for the ROC/PR wrappers); nothing knows about
networks. The procedures follow ``docs/method.md`` §6 and the public MVTec AD evaluation code
(``pro_curve_util.compute_pro`` and ``generic_util.trapezoid``); ``docs/evaluation.md``
states them in prose.

* :func:`au_pro` -- area under the per-region-overlap curve up to a false positive rate
  (Bergmann et al., CVPR 2020, §4.1; the paper's headline metric, integrated to FPR 0.3).
* :func:`image_auroc`, :func:`average_precision` -- image-level ROC AUC and AUC-PR from one
  score per image (stad's image score: by default the mean of the map's top 1 %,
  or its maximum, ``docs/method.md`` §5).
* :func:`pixel_auroc`, :func:`pixel_average_precision` -- the same over every pixel.
* :func:`roc_curve` -- false/true positive rates, for plots.

Maps are compared with the ground truth at the ground truth's resolution: resizing a map
to its mask is the caller's job, and a shape mismatch is an error, not a silent resize.
Invalid input raises :class:`ValueError` with a message that says what to fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

# 8-connectivity: pixels that touch at a corner belong to the same ground-truth region.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

DEFAULT_FPR_LIMIT = 0.3
"""Integration limit of AU-PRO used by the paper and MVTec AD (``docs/method.md`` §6)."""


@dataclass(frozen=True, eq=False)
class ProResult:
    """The PRO curve of a test set and the normalized area under it.

    Attributes:
        au_pro: area under PRO over FPR in ``[0, fpr_limit]``, divided by ``fpr_limit``
            (in ``[0, 1]``; 1 is perfect, a constant map scores ``fpr_limit / 2``).
        fpr: false positive rate at each threshold, non-decreasing, shape ``(K + 1,)``.
        pro: per-region overlap at each threshold, non-decreasing, shape ``(K + 1,)``.
        thresholds: the ``K`` distinct scores in decreasing order, preceded by ``+inf``
            for the curve's start ``(0, 0)``; ``fpr[i]``/``pro[i]`` count scores
            ``>= thresholds[i]``. Shape ``(K + 1,)``.
        fpr_limit: the integration limit used.
        n_regions: number of ground-truth regions (connected components) in the test set.
        n_normal_pixels: number of anomaly-free pixels (the FPR's denominator).

    The arrays are read-only. The curve is the full one (up to ``(1, 1)``), not cut at
    ``fpr_limit``.
    """

    au_pro: float
    fpr: np.ndarray
    pro: np.ndarray
    thresholds: np.ndarray
    fpr_limit: float
    n_regions: int
    n_normal_pixels: int


# --------------------------------------------------------------------------------------
# AU-PRO
# --------------------------------------------------------------------------------------


def _region_steps(mask_list: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """Per pixel of all masks (flattened in order), how much PRO rises when the threshold
    passes its score, and whether it is normal; and the number of regions. A region of size
    s gives 1/s to each of its pixels, so a fully detected region contributes 1; the division
    by the number of regions comes after labelling all images."""
    n_pixels = sum(m.size for m in mask_list)
    pro_step = np.zeros(n_pixels, dtype=np.float64)
    is_normal = np.empty(n_pixels, dtype=bool)
    n_regions = 0
    start = 0
    for mask in mask_list:
        labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        labels = labels.ravel()
        stop = start + labels.size
        if n:
            sizes = np.bincount(labels)  # sizes[0] counts the normal pixels, unused
            inside = labels > 0
            pro_step[start:stop][inside] = 1.0 / sizes[labels[inside]]
        is_normal[start:stop] = labels == 0
        n_regions += n
        start = stop
    return pro_step, is_normal, n_regions


def _pro_curve(scores: np.ndarray, pro_step: np.ndarray, is_normal: np.ndarray,
               n_regions: int, n_normal: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The PRO curve: (fpr, pro, thresholds), read-only, from (0, 0) at +inf to (1, 1)."""
    # Decreasing order of score: walking it lowers the threshold one pixel at a time.
    order = np.argsort(scores)[::-1]
    scores = scores[order]
    region_sum = np.cumsum(pro_step[order])  # sum over regions of the fraction found
    false_positives = np.cumsum(is_normal[order], dtype=np.int64)

    # Ties: a threshold t admits every pixel scoring >= t at once, so only the last
    # position of each run of equal scores is a point of the curve.
    last_of_run = np.append(scores[1:] != scores[:-1], True)
    pro = region_sum[last_of_run] / n_regions
    fpr = false_positives[last_of_run] / n_normal
    thresholds = scores[last_of_run]

    # The lowest threshold admits every pixel: (1, 1) exactly, whatever the rounding of
    # the cumulative sums; clip keeps rounding from overshooting elsewhere.
    pro[-1] = 1.0
    np.clip(pro, 0.0, 1.0, out=pro)
    fpr = np.concatenate(([0.0], fpr))
    pro = np.concatenate(([0.0], pro))
    thresholds = np.concatenate(([np.inf], thresholds.astype(np.float64)))
    for array in (fpr, pro, thresholds):
        array.flags.writeable = False
    return fpr, pro, thresholds


def au_pro(
    maps: Sequence[ArrayLike] | np.ndarray,
    masks: Sequence[ArrayLike] | np.ndarray,
    *,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
) -> ProResult:
    """Area under the per-region-overlap (PRO) curve up to ``fpr_limit``, normalized.

    The MVTec AD procedure (``docs/method.md`` §6):

    1. Regions are the connected components of each image's mask with 8-connectivity,
       labelled per image; the regions of all images form one pool of ``R`` regions.
    2. For a threshold ``t``, ``PRO(t)`` is the mean over the ``R`` regions of the fraction
       of the region's pixels scoring ``>= t`` (every region counts the same, whatever its
       size), and ``FPR(t)`` is the fraction of *all* anomaly-free pixels of the test set,
       including those of defective images, scoring ``>= t``.
    3. Every distinct score is a threshold; pixels with equal scores enter together. The
       curve starts at ``(0, 0)`` and ends at ``(1, 1)``.
    4. The area under PRO over FPR in ``[0, fpr_limit]`` is integrated with trapezoids,
       PRO being linearly interpolated at exactly ``fpr_limit``, and divided by
       ``fpr_limit``.

    All pixel scores are sorted once, so the cost is ``O(P log P)`` for ``P`` pixels: each
    pixel adds ``1 / (R * size of its region)`` to PRO or ``1 / (normal pixels)`` to FPR
    when the threshold passes its score, and the curve is a cumulative sum of those steps.

    Args:
        maps: anomaly maps, a sequence of 2-D float arrays or one ``(N, H, W)`` array.
            Higher means more anomalous.
        masks: ground truth of the same shapes, boolean (or 0/1): ``True`` = anomalous.
        fpr_limit: upper integration limit on the FPR axis, in ``(0, 1]``.

    Returns:
        The :class:`ProResult` with the area, the full curve and the counts.

    Raises:
        ValueError: shapes differ, a score is not finite, a mask is not binary,
            ``fpr_limit`` is out of range, or the test set has no anomalous region or no
            anomaly-free pixel.
    """
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    map_list, mask_list = _check_pairs(maps, masks)

    pro_step, is_normal, n_regions = _region_steps(mask_list)
    n_normal = int(is_normal.sum())
    if n_regions == 0:
        raise ValueError(
            "AU-PRO needs at least one anomalous region, but every mask is empty; "
            "evaluate on a test set that contains defective images with masks"
        )
    if n_normal == 0:
        raise ValueError(
            "AU-PRO needs anomaly-free pixels to measure false positives, but every pixel "
            "of every mask is anomalous"
        )
    fpr, pro, thresholds = _pro_curve(np.concatenate([m.ravel() for m in map_list]),
                                      pro_step, is_normal, n_regions, n_normal)
    area = _area_up_to(fpr, pro, fpr_limit)
    return ProResult(
        au_pro=float(area / fpr_limit),
        fpr=fpr,
        pro=pro,
        thresholds=thresholds,
        fpr_limit=fpr_limit,
        n_regions=n_regions,
        n_normal_pixels=n_normal,
    )


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the polyline (x, y) for x in [x[0], x_max].

    ``x`` is non-decreasing and may repeat (vertical steps, which add no area). If ``x_max``
    falls between two points, ``y`` is interpolated linearly there (MVTec's
    ``generic_util.trapezoid`` with ``x_max``).
    """
    # Points with x <= x_max form a prefix of the curve; x[n_in] is the first one past it.
    n_in = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:n_in], y[:n_in]
    area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))
    if xs[-1] < x_max:  # x_max lies strictly inside the segment (x[n_in - 1], x[n_in])
        x0, x1, y0, y1 = x[n_in - 1], x[n_in], y[n_in - 1], y[n_in]
        y_at_limit = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += (x_max - x0) * (y0 + y_at_limit) / 2.0
    return area


# --------------------------------------------------------------------------------------
# ROC and precision-recall (thin wrappers over scikit-learn)
# --------------------------------------------------------------------------------------


def image_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of image scores (``docs/method.md`` §6).

    Args:
        scores: one score per image, shape ``(N,)``; higher means more anomalous.
        labels: ``True``/1 for an anomalous image, ``False``/0 for a normal one, ``(N,)``.

    Raises:
        ValueError: lengths differ, a score is not finite, or only one class is present.
    """
    from sklearn.metrics import roc_auc_score  # imported here: keeps `import stad` light

    s, y = _check_scores(scores, labels, what="image")
    return float(roc_auc_score(y, s))


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Average precision (area under the precision-recall curve) of image scores.

    scikit-learn's step-wise definition, ``sum_n (R_n - R_{n-1}) P_n``, not a trapezoid.
    Arguments and errors as :func:`image_auroc`.
    """
    from sklearn.metrics import average_precision_score

    s, y = _check_scores(scores, labels, what="image")
    return float(average_precision_score(y, s))


def pixel_auroc(
    maps: Sequence[ArrayLike] | np.ndarray, masks: Sequence[ArrayLike] | np.ndarray
) -> float:
    """Area under the ROC curve over every pixel of the test set.

    Args:
        maps: anomaly maps, a sequence of 2-D float arrays or one ``(N, H, W)`` array.
        masks: ground truth of the same shapes, boolean (or 0/1).

    Raises:
        ValueError: as :func:`au_pro`, or the pixels are all normal or all anomalous.
    """
    from sklearn.metrics import roc_auc_score

    s, y = _flatten_pixels(maps, masks)
    return float(roc_auc_score(y, s))


def pixel_average_precision(
    maps: Sequence[ArrayLike] | np.ndarray, masks: Sequence[ArrayLike] | np.ndarray
) -> float:
    """Average precision over every pixel of the test set. Arguments as :func:`pixel_auroc`."""
    from sklearn.metrics import average_precision_score

    s, y = _flatten_pixels(maps, masks)
    return float(average_precision_score(y, s))


def roc_curve(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates of image scores at every useful threshold, for plots.

    Returns ``(fpr, tpr)``, both non-decreasing from 0 to 1 (scikit-learn's ``roc_curve``,
    collinear points dropped). Arguments and errors as :func:`image_auroc`.
    """
    from sklearn.metrics import roc_curve as sk_roc_curve

    s, y = _check_scores(scores, labels, what="image")
    fpr, tpr, _ = sk_roc_curve(y, s)
    return fpr, tpr


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------


def _check_pairs(
    maps: Sequence[ArrayLike] | np.ndarray, masks: Sequence[ArrayLike] | np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Validate maps against masks; return them as lists of 2-D float and bool arrays."""
    for name, value in (("maps", maps), ("masks", masks)):
        if isinstance(value, np.ndarray) and value.ndim != 3:
            raise ValueError(
                f"{name} must be a sequence of 2-D arrays or one (N, H, W) array, got an "
                f"array of shape {value.shape} (wrap a single image as [image])"
            )
    if len(maps) != len(masks):
        raise ValueError(f"got {len(maps)} maps but {len(masks)} masks")
    if len(maps) == 0:
        raise ValueError("got no maps to evaluate")

    map_list: list[np.ndarray] = []
    mask_list: list[np.ndarray] = []
    for i, (m, g) in enumerate(zip(maps, masks, strict=True)):
        m = np.asarray(m)
        g = np.asarray(g)
        if m.ndim != 2 or m.shape != g.shape:
            raise ValueError(
                f"map {i} has shape {m.shape} but its mask has shape {g.shape}; maps must be "
                "2-D and at the mask's resolution (resize the map first)"
            )
        if not np.issubdtype(m.dtype, np.floating):
            m = m.astype(np.float64)
        if not np.isfinite(m).all():
            raise ValueError(f"map {i} contains NaN or infinite scores")
        map_list.append(m)
        mask_list.append(_as_bool_mask(g, f"mask {i}"))
    # One dtype for the concatenation; float32 maps stay float32 (half the memory).
    dtype = np.result_type(*(m.dtype for m in map_list))
    return [m.astype(dtype, copy=False) for m in map_list], mask_list


def _as_bool_mask(g: np.ndarray, name: str) -> np.ndarray:
    """A boolean view of a mask; numeric masks must hold only 0 and 1."""
    if g.dtype == bool:
        return g
    if not np.isin(g, (0, 1)).all():
        raise ValueError(
            f"{name} is not binary (values other than 0 and 1, e.g. 0/255 or soft masks); "
            "pass a boolean mask such as `mask > 0`"
        )
    return g.astype(bool)


def _flatten_pixels(
    maps: Sequence[ArrayLike] | np.ndarray, masks: Sequence[ArrayLike] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """All pixel scores (float32, to halve memory on millions of pixels) and labels."""
    map_list, mask_list = _check_pairs(maps, masks)
    scores = np.concatenate([m.ravel() for m in map_list]).astype(np.float32, copy=False)
    labels = np.concatenate([g.ravel() for g in mask_list])
    _check_both_classes(labels, what="pixel")
    return scores, labels


def _check_scores(
    scores: ArrayLike, labels: ArrayLike, *, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Validate one score and one 0/1 label per item; return float64 scores, bool labels."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1 or s.shape != y.shape:
        raise ValueError(
            f"scores and labels must be 1-D and of equal length, got shapes {s.shape} and {y.shape}"
        )
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    y = _as_bool_mask(y, "labels")
    _check_both_classes(y, what=what)
    return s, y


def _check_both_classes(labels: np.ndarray, *, what: str) -> None:
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        only = "anomalous" if n_pos else "normal"
        raise ValueError(
            f"{what}-level ROC/PR metrics need both normal and anomalous {what}s, but all "
            f"{labels.size} are {only}"
        )
