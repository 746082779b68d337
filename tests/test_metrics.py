"""Tests of stad.metrics: hand-computed PRO curves, a brute-force reference, sklearn wrappers.

Every expected number says where it comes from: a curve worked out by hand in the comment
beside it, the brute-force reference below (written from the procedure's description in
docs/method.md §6, one threshold at a time), or scikit-learn called directly.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from stad.metrics import (
    ProResult,
    au_pro,
    average_precision,
    image_auroc,
    pixel_auroc,
    pixel_average_precision,
    roc_curve,
)

# --------------------------------------------------------------------------------------
# Independent reference: one threshold at a time, straight from the definition
# --------------------------------------------------------------------------------------


def reference_au_pro(maps, masks, fpr_limit):
    """AU-PRO by brute force: for every distinct score t, count pixels >= t with masks."""
    maps = [np.asarray(m, dtype=np.float64) for m in maps]
    regions = []  # one boolean mask (in its own image) per connected component
    for i, gt in enumerate(masks):
        labelled, n = ndimage.label(gt, structure=np.ones((3, 3)))
        regions += [(i, labelled == k) for k in range(1, n + 1)]
    normal = [~np.asarray(gt, dtype=bool) for gt in masks]
    n_normal = sum(int(nm.sum()) for nm in normal)

    fprs, pros = [0.0], [0.0]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        pros.append(np.mean([np.mean(maps[i][r] >= t) for i, r in regions]))
        fprs.append(
            sum(int((m[nm] >= t).sum()) for m, nm in zip(maps, normal, strict=True)) / n_normal
        )
    fprs, pros = np.array(fprs), np.array(pros)

    # Keep the points up to the limit; if the limit falls inside a segment, add the point
    # on that segment at the limit (linear interpolation), then integrate with trapezoids.
    keep = fprs <= fpr_limit
    x, y = list(fprs[keep]), list(pros[keep])
    if x[-1] < fpr_limit:
        after = int(np.argmax(fprs > fpr_limit))
        x0, x1, y0, y1 = fprs[after - 1], fprs[after], pros[after - 1], pros[after]
        x.append(fpr_limit)
        y.append(y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    return np.trapezoid(y, x) / fpr_limit, fprs, pros


def random_case(seed, n_images=4, size=20, decimals=1):
    """Blob masks (some images defect-free) and noisy maps, rounded to create many ties."""
    rng = np.random.default_rng(seed)
    blobs = ndimage.gaussian_filter(rng.standard_normal((n_images, size, size)), (0, 1.5, 1.5))
    masks = blobs > 0.25
    masks[0] = False  # a defect-free image: its pixels count in the FPR too
    maps = masks * rng.uniform(0.5, 1.5) + rng.normal(0.0, 0.6, masks.shape)
    if decimals is not None:
        maps = np.round(maps, decimals)
    return list(maps), list(masks)


# --------------------------------------------------------------------------------------
# AU-PRO: hand-computed cases
# --------------------------------------------------------------------------------------


def test_single_region_full_curve():
    # Region = the two pixels scoring 0.9 and 0.3; normal = 0.8, 0.4, 0.2, 0.1 (4 pixels).
    # Thresholds, decreasing: 0.9 -> (fpr 0, pro 1/2), 0.8 -> (1/4, 1/2), 0.4 -> (1/2, 1/2),
    # 0.3 -> (1/2, 1), 0.2 -> (3/4, 1), 0.1 -> (1, 1); the curve starts at (0, 0).
    scores = np.array([[0.9, 0.3, 0.8], [0.1, 0.2, 0.4]])
    mask = np.array([[1, 1, 0], [0, 0, 0]], dtype=bool)
    r = au_pro([scores], [mask], fpr_limit=1.0)
    np.testing.assert_array_equal(r.fpr, [0, 0, 0.25, 0.5, 0.5, 0.75, 1])
    np.testing.assert_array_equal(r.pro, [0, 0.5, 0.5, 0.5, 1, 1, 1])
    np.testing.assert_array_equal(r.thresholds, [np.inf, 0.9, 0.8, 0.4, 0.3, 0.2, 0.1])
    assert (r.n_regions, r.n_normal_pixels) == (1, 4)
    # Area to 1: 0.5 * 0.5 (pro 1/2 over fpr [0, 1/2]) + 1 * 0.5 (pro 1 over [1/2, 1]).
    assert r.au_pro == pytest.approx(0.75, abs=1e-12)
    # Limit 0.5 sits on a vertical step: only 0.5 * 0.5 counts; / 0.5 -> 0.5.
    assert au_pro([scores], [mask], fpr_limit=0.5).au_pro == pytest.approx(0.5, abs=1e-12)
    # Limit 0.3: pro is 1/2 on [0, 0.5], so area 0.15, / 0.3 -> 0.5.
    assert au_pro([scores], [mask], fpr_limit=0.3).au_pro == pytest.approx(0.5, abs=1e-12)


def test_regions_are_averaged_not_pixels():
    # Region A = 1 pixel scoring 0.9; region B = 3 pixels (an L) scoring 0.2; 11 normal
    # pixels: one 0.5, ten 0.1. At t = 0.9 region-averaged PRO = (1 + 0) / 2 = 1/2, where a
    # pixel-weighted overlap would be 1 / 4. Curve: (0,0), (0,1/2), (1/11,1/2), (1/11,1), (1,1).
    mask = np.array([[1, 0, 0, 0, 0], [0, 0, 0, 1, 1], [0, 0, 0, 1, 0]], dtype=bool)
    scores = np.full(mask.shape, 0.1)
    scores[0, 0] = 0.9
    scores[mask & (np.arange(5) >= 3)] = 0.2
    scores[2, 2] = 0.5
    r = au_pro([scores], [mask])
    assert r.n_regions == 2
    np.testing.assert_allclose(r.pro, [0, 0.5, 0.5, 1, 1], atol=1e-15)
    np.testing.assert_allclose(r.fpr, [0, 0, 1 / 11, 1 / 11, 1], atol=1e-15)
    # Area to 0.3: 1/2 * 1/11 + 1 * (0.3 - 1/11) = 0.3 - 1/22; / 0.3 -> 28/33.
    assert r.au_pro == pytest.approx(28 / 33, abs=1e-12)


def test_regions_pool_across_images_and_fpr_is_global():
    # Image 1: region R1 (1 px, 0.9), normals 0.1 x3. Image 2: region R2 (3 px: 0.7, 0.7,
    # 0.2), normal 0.6. Image 3 (no defect): normals 0.5, 0.1 x3. Normals: 8 over all images.
    # t=0.9 -> (0, 1/2); 0.7 -> (0, (1 + 2/3)/2 = 5/6); 0.6 -> (1/8, 5/6);
    # 0.5 -> (2/8, 5/6); 0.2 -> (2/8, 1); 0.1 -> (1, 1).
    maps = [[[0.9, 0.1, 0.1, 0.1]], [[0.7, 0.7, 0.2, 0.6]], [[0.5, 0.1, 0.1, 0.1]]]
    masks = [[[1, 0, 0, 0]], [[1, 1, 1, 0]], [[0, 0, 0, 0]]]
    r = au_pro([np.array(m) for m in maps], [np.array(g, dtype=bool) for g in masks])
    assert (r.n_regions, r.n_normal_pixels) == (2, 8)
    np.testing.assert_allclose(r.fpr, [0, 0, 0, 1 / 8, 2 / 8, 2 / 8, 1], atol=1e-15)
    np.testing.assert_allclose(r.pro, [0, 1 / 2, 5 / 6, 5 / 6, 5 / 6, 1, 1], atol=1e-15)
    # Area to 0.3: 5/6 * 1/4 + 1 * 0.05 = 31/120; / 0.3 -> 31/36.
    assert r.au_pro == pytest.approx(31 / 36, abs=1e-12)


def test_diagonal_pixels_form_one_region():
    # (0,0)-(0,1) touch by an edge, (0,1)-(1,2) only by a corner: one region of 3 pixels with
    # 8-connectivity (two regions with 4-connectivity). Only (1,2) scores high (0.9), so
    # PRO(0.9) = 1/3 (with 4-connectivity it would be (0 + 1) / 2 = 1/2).
    mask = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=bool)
    scores = np.array([[0.2, 0.2, 0.5], [0.1, 0.1, 0.9], [0.1, 0.1, 0.1]])
    r = au_pro([scores], [mask])
    assert r.n_regions == 1
    # Curve: (0,0), (0,1/3), (1/6,1/3), (1/6,1), (1,1). Area to 0.3: 1/3 * 1/6 + 1 * (0.3 -
    # 1/6) = 17/90; / 0.3 -> 17/27.
    np.testing.assert_allclose(r.pro, [0, 1 / 3, 1 / 3, 1, 1], atol=1e-15)
    assert r.au_pro == pytest.approx(17 / 27, abs=1e-12)


def test_tied_scores_enter_together():
    # Region of 2 pixels scoring 0.8 and 0.5; normals 0.5, 0.5, 0.1, 0.1. At t = 0.5 the
    # anomalous and both normal 0.5s enter at once: a single point (1/2, 1), no matter how
    # the pixels are ordered. Curve: (0,0), (0,1/2), (1/2,1), (1,1).
    for scores, mask in [
        ([[0.8, 0.5, 0.5, 0.5, 0.1, 0.1]], [[1, 1, 0, 0, 0, 0]]),
        ([[0.5, 0.1, 0.5, 0.1, 0.5, 0.8]], [[0, 0, 0, 0, 1, 1]]),
    ]:
        r = au_pro([np.array(scores)], [np.array(mask, dtype=bool)], fpr_limit=1.0)
        np.testing.assert_array_equal(r.fpr, [0, 0, 0.5, 1])
        np.testing.assert_array_equal(r.pro, [0, 0.5, 1, 1])
        # Area to 1: (1/2 + 1)/2 * 1/2 + 1 * 1/2 = 0.875.
        assert r.au_pro == pytest.approx(0.875, abs=1e-12)
        # Limit 0.3 interpolates on the tie's diagonal: PRO(0.3) = 1/2 + 0.3 = 0.8; area
        # (0.5 + 0.8)/2 * 0.3 = 0.195; / 0.3 -> 0.65.
        r = au_pro([np.array(scores)], [np.array(mask, dtype=bool)], fpr_limit=0.3)
        assert r.au_pro == pytest.approx(0.65, abs=1e-12)


def test_constant_map_is_the_diagonal():
    # All pixels tie: the curve is (0,0) -> (1,1), so the area to L is L^2 / 2 and
    # AU-PRO = L / 2 (0.15 at the default 0.3).
    rng = np.random.default_rng(0)
    masks = rng.random((3, 8, 8)) > 0.7
    r = au_pro(np.zeros((3, 8, 8)), masks)
    np.testing.assert_array_equal(r.fpr, [0, 1])
    np.testing.assert_array_equal(r.pro, [0, 1])
    assert r.au_pro == pytest.approx(0.15, abs=1e-12)


# A curve whose segment (0.2, 0.4) -> (0.4, 0.8) straddles 0.3. One region of 5 pixels (row
# 0) scoring 0.9, 0.9, 0.5, 0.5, 0.05; ten normals: 0.7 x2, 0.5 x2, 0.1 x6. Thresholds:
# 0.9 -> (0, 0.4), 0.7 -> (0.2, 0.4), 0.5 -> (0.4, 0.8), 0.1 -> (1, 0.8), 0.05 -> (1, 1).
KNEE_SCORES = np.array(
    [[0.9, 0.9, 0.5, 0.5, 0.05], [0.7, 0.7, 0.5, 0.5, 0.1], [0.1, 0.1, 0.1, 0.1, 0.1]]
)
KNEE_MASK = np.array([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=bool)


@pytest.mark.parametrize(
    ("fpr_limit", "expected"),
    [
        # 0.2 is a point: area 0.4 * 0.2 = 0.08; / 0.2 -> 0.4.
        (0.2, 0.4),
        # 0.25: PRO(0.25) = 0.4 + 0.4 * 0.05/0.2 = 0.5; area 0.08 + (0.4 + 0.5)/2 * 0.05
        # = 0.1025; / 0.25 -> 0.41.
        (0.25, 0.41),
        # 0.3: PRO(0.3) = 0.6; area 0.08 + (0.4 + 0.6)/2 * 0.1 = 0.13; / 0.3 -> 13/30
        # (cutting at 0.2 instead would give 0.08/0.3, a step at 0.4 would give 0.4).
        (0.3, 13 / 30),
        # 0.4: area 0.08 + (0.4 + 0.8)/2 * 0.2 = 0.2; / 0.4 -> 0.5.
        (0.4, 0.5),
        # 1.0: 0.2 + 0.8 * 0.6 = 0.68 (the step to (1, 1) is vertical, no area).
        (1.0, 0.68),
    ],
)
def test_interpolation_at_the_limit(fpr_limit, expected):
    r = au_pro([KNEE_SCORES], [KNEE_MASK], fpr_limit=fpr_limit)
    np.testing.assert_allclose(r.fpr, [0, 0, 0.2, 0.4, 1, 1], atol=1e-15)
    np.testing.assert_allclose(r.pro, [0, 0.4, 0.4, 0.8, 0.8, 1], atol=1e-15)
    assert r.fpr_limit == fpr_limit
    assert r.au_pro == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_perfect_and_inverted_maps(fpr_limit):
    # Every anomalous pixel above every normal one: PRO reaches 1 at FPR 0 -> 1 (up to the
    # rounding of the sum of 1/size steps).
    # Reversed: PRO stays 0 until FPR reaches 1 -> exactly 0.
    rng = np.random.default_rng(1)
    masks = ndimage.gaussian_filter(rng.standard_normal((3, 16, 16)), (0, 1, 1)) > 0.3
    noise = rng.random(masks.shape)
    perfect = masks + noise * 0.5  # anomalous in [1, 1.5), normal in [0, 0.5)
    assert au_pro(perfect, masks, fpr_limit=fpr_limit).au_pro == pytest.approx(1.0, abs=1e-12)
    assert au_pro(-perfect, masks, fpr_limit=fpr_limit).au_pro == 0.0


def test_accepts_float32_and_int_maps_and_01_masks():
    # Same pixels as test_single_region_full_curve in other dtypes: 0.75 at limit 1.
    scores = np.array([[9, 3, 8], [1, 2, 4]])
    mask = np.array([[1, 1, 0], [0, 0, 0]])
    assert au_pro([scores], [mask], fpr_limit=1.0).au_pro == pytest.approx(0.75)
    assert au_pro([scores.astype(np.float32)], [mask], fpr_limit=1.0).au_pro == pytest.approx(0.75)


def test_result_is_read_only():
    r = au_pro([KNEE_SCORES], [KNEE_MASK])
    assert isinstance(r, ProResult)
    with pytest.raises(ValueError):
        r.pro[0] = 1.0
    with pytest.raises(AttributeError):
        r.au_pro = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------------------
# AU-PRO against the brute-force reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fpr_limit", [0.01, 0.3, 1.0])
def test_matches_reference_with_ties(seed, fpr_limit):
    maps, masks = random_case(seed, decimals=1)
    expected, fprs, pros = reference_au_pro(maps, masks, fpr_limit)
    r = au_pro(maps, masks, fpr_limit=fpr_limit)
    np.testing.assert_allclose(r.fpr, fprs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r.pro, pros, rtol=0, atol=1e-12)
    assert abs(r.au_pro - expected) < 1e-9


@pytest.mark.parametrize("seed", range(3))
def test_matches_reference_without_ties(seed):
    # Unrounded scores: every pixel is its own threshold.
    maps, masks = random_case(100 + seed, n_images=3, size=12, decimals=None)
    expected, _, _ = reference_au_pro(maps, masks, 0.3)
    r = au_pro(maps, masks)
    assert r.fpr.size == 3 * 12 * 12 + 1
    assert abs(r.au_pro - expected) < 1e-9


# --------------------------------------------------------------------------------------
# AU-PRO errors
# --------------------------------------------------------------------------------------


def test_no_region_is_an_error():
    with pytest.raises(ValueError, match="at least one anomalous region"):
        au_pro([np.zeros((4, 4))], [np.zeros((4, 4), dtype=bool)])


def test_no_normal_pixel_is_an_error():
    with pytest.raises(ValueError, match="anomaly-free pixels"):
        au_pro([np.zeros((4, 4))], [np.ones((4, 4), dtype=bool)])


@pytest.mark.parametrize(
    ("maps", "masks", "match"),
    [
        ([np.zeros((4, 4))], [np.zeros((8, 8), bool)], "resolution"),
        ([np.zeros((4, 4))] * 2, [np.zeros((4, 4), bool)], "2 maps but 1 masks"),
        ([], [], "no maps"),
        (np.zeros((4, 4)), np.zeros((4, 4), bool), r"\(N, H, W\)"),
        ([np.full((2, 2), np.nan)], [np.eye(2, dtype=bool)], "NaN"),
        ([np.zeros((2, 2))], [np.eye(2) * 255], "not binary"),
    ],
)
def test_bad_input_is_an_error(maps, masks, match):
    with pytest.raises(ValueError, match=match):
        au_pro(maps, masks)


@pytest.mark.parametrize("fpr_limit", [0.0, -0.1, 1.5])
def test_fpr_limit_out_of_range(fpr_limit):
    with pytest.raises(ValueError, match="fpr_limit"):
        au_pro([KNEE_SCORES], [KNEE_MASK], fpr_limit=fpr_limit)


# --------------------------------------------------------------------------------------
# ROC / PR wrappers against scikit-learn directly
# --------------------------------------------------------------------------------------


def test_image_metrics_match_sklearn():
    rng = np.random.default_rng(2)
    labels = rng.random(50) > 0.6
    scores = labels * 0.7 + rng.normal(size=50)
    assert image_auroc(scores, labels) == skm.roc_auc_score(labels, scores)
    assert average_precision(scores, labels) == skm.average_precision_score(labels, scores)
    fpr, tpr = roc_curve(scores, labels)
    sk_fpr, sk_tpr, _ = skm.roc_curve(labels, scores)
    np.testing.assert_array_equal(fpr, sk_fpr)
    np.testing.assert_array_equal(tpr, sk_tpr)


def test_image_auroc_by_hand():
    # Pairs (anomalous, normal): (0.9 > 0.1), (0.9 > 0.5), (0.4 > 0.1), (0.4 < 0.5): 3/4.
    assert image_auroc([0.9, 0.4, 0.1, 0.5], [1, 1, 0, 0]) == 0.75


def test_pixel_metrics_match_sklearn_on_all_pixels():
    maps, masks = random_case(3, decimals=None)
    flat_scores = np.concatenate([m.ravel() for m in maps]).astype(np.float32)
    flat_labels = np.concatenate([g.ravel() for g in masks])
    assert pixel_auroc(maps, masks) == pytest.approx(
        skm.roc_auc_score(flat_labels, flat_scores), abs=1e-12
    )
    assert pixel_average_precision(maps, masks) == pytest.approx(
        skm.average_precision_score(flat_labels, flat_scores), abs=1e-12
    )


@pytest.mark.parametrize("metric", [image_auroc, average_precision, roc_curve])
def test_image_metrics_need_both_classes(metric):
    with pytest.raises(ValueError, match="both normal and anomalous images.*all 3 are normal"):
        metric([0.1, 0.2, 0.3], [0, 0, 0])
    with pytest.raises(ValueError, match="all 2 are anomalous"):
        metric([0.1, 0.2], [True, True])


@pytest.mark.parametrize("metric", [image_auroc, average_precision, roc_curve])
def test_image_metrics_reject_bad_input(metric):
    with pytest.raises(ValueError, match="equal length"):
        metric([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        metric([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="not binary"):
        metric([0.1, 0.2], [0, 2])


@pytest.mark.parametrize("metric", [pixel_auroc, pixel_average_precision])
def test_pixel_metrics_need_both_classes_and_matching_shapes(metric):
    with pytest.raises(ValueError, match="anomalous pixels.*are normal"):
        metric([np.zeros((3, 3))], [np.zeros((3, 3), bool)])
    with pytest.raises(ValueError, match="resolution"):
        metric([np.zeros((3, 3))], [np.eye(4, dtype=bool)])
