"""Defect regions, the pixel threshold and pixel F1/IoU (stad.regions, stad.evaluation)."""

from __future__ import annotations

import numpy as np
import pytest

from stad.evaluation import segmentation
from stad.regions import TopValues, find_regions


def test_regions_are_8_connected_sorted_by_peak_and_measured() -> None:
    amap = np.zeros((6, 8), np.float32)
    amap[1, 1], amap[2, 2] = 3.0, 2.0  # touching diagonally: one region
    amap[4, 5:8] = [1.0, 5.0, 1.5]  # a second region with the higher peak
    amap[0, 7] = 0.4  # below the threshold
    regions = find_regions(amap, 0.5)
    assert [r.peak for r in regions] == [5.0, 3.0]
    second, first = regions
    assert second.bbox == (5, 4, 8, 5) and second.area == 3
    assert second.mean == pytest.approx(2.5) and second.area_fraction == pytest.approx(3 / 48)
    assert first.bbox == (1, 1, 3, 3) and first.area == 2
    assert first.to_dict() == {"bbox": [1, 1, 3, 3], "area": 2, "area_fraction": 2 / 48,
                               "peak": 3.0, "mean": 2.5}
    assert [r.peak for r in find_regions(amap, 0.5, min_area=3)] == [5.0]
    assert find_regions(amap, 10.0) == []


@pytest.mark.parametrize("share", [0.001, 0.01, 0.3])
def test_pixel_threshold_is_exact_over_many_maps(share: float) -> None:
    rng = np.random.default_rng(0)
    maps = [rng.standard_normal((int(rng.integers(5, 40)), 30)).astype(np.float32)
            for _ in range(150)]  # more than 64 maps: the kept values are merged
    maps[3][:] += 10  # the largest values all in one map
    top = TopValues(share, sum(m.size for m in maps))
    for m in maps:
        top.add(m)
    t = top.threshold()
    values = np.concatenate([m.ravel() for m in maps])
    assert np.count_nonzero(values > t) <= share * values.size
    assert np.count_nonzero(values >= t) > share * values.size  # the smallest such value
    with pytest.raises(ValueError, match="announced"):
        TopValues(share, 10).threshold()


def test_pixel_f1_and_iou() -> None:
    masks = [np.array([[True, True], [False, False]]), np.zeros((2, 2), bool)]
    maps = [np.array([[0.9, 0.1], [0.8, 0.0]]), np.array([[0.0, 0.0], [0.0, 0.7]])]
    got = segmentation(maps, masks, 0.5)  # TP 1, FP 2, FN 1
    assert got == {"pixel_f1": pytest.approx(2 / 5), "pixel_iou": pytest.approx(1 / 4)}
    assert segmentation([np.zeros((2, 2))], [np.zeros((2, 2), bool)], 0.5) == {
        "pixel_f1": 1.0, "pixel_iou": 1.0}
