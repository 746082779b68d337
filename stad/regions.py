"""Where the defect is: the pixel threshold set on normal images, and the connected regions of
an anomaly map above it.

``stad calibrate`` sets the pixel threshold so that a target share of the held-back normal
images' pixels (``calibrate.target_pixel_fpr``) lie above it (:class:`TopValues`, one pass,
bounded memory). A scored image's defect regions are the 8-connected components of its fused
map above that threshold (:func:`find_regions`): bounding box, area in pixels and as a share of
the image, peak and mean score, sorted by peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity


@dataclass(frozen=True)
class Region:
    """One connected region of an anomaly map above the pixel threshold.

    ``bbox`` is (x0, y0, x1, y1) in pixels of the image, x1 and y1 exclusive."""

    bbox: tuple[int, int, int, int]
    area: int
    area_fraction: float
    peak: float
    mean: float

    def to_dict(self) -> dict[str, Any]:
        return {"bbox": list(self.bbox), "area": self.area,
                "area_fraction": self.area_fraction, "peak": self.peak, "mean": self.mean}


def find_regions(amap: np.ndarray, threshold: float, *, min_area: int = 1) -> list[Region]:
    """The 8-connected components of ``amap > threshold`` with at least ``min_area`` pixels,
    sorted by peak score (highest first)."""
    mask = amap > threshold
    labels, n = ndimage.label(mask, structure=EIGHT)
    if n == 0:
        return []
    flat = labels.ravel()
    areas = np.bincount(flat, minlength=n + 1)[1:]
    sums = np.bincount(flat, weights=amap.ravel().astype(np.float64), minlength=n + 1)[1:]
    peaks = ndimage.maximum(amap, labels, np.arange(1, n + 1))
    out = []
    for i, box in enumerate(ndimage.find_objects(labels)):
        if box is None or areas[i] < min_area:
            continue
        rows, cols = box
        out.append(Region(bbox=(cols.start, rows.start, cols.stop, rows.stop),
                          area=int(areas[i]), area_fraction=float(areas[i] / amap.size),
                          peak=float(peaks[i]), mean=float(sums[i] / areas[i])))
    return sorted(out, key=lambda r: -r.peak)


class TopValues:
    """The threshold that at most a target share of all pixels of many maps exceed, in one
    pass over the maps with memory that follows that share, not the number of maps.

    ``total`` is the number of pixels the maps will hold in all (calibration knows every image's
    size before it computes their maps). The threshold is the k-th largest value, k =
    floor(share · total) (counting from 0, so that at most share · total pixels lie above it,
    as :func:`stad.calibration.fpr_threshold` counts images); it is among the k + 1 largest of
    the map it comes from, so each map's k + 1 largest values are all that is kept.
    """

    def __init__(self, share: float, total: int) -> None:
        if not 0 < share < 1:
            raise ValueError(f"the share of pixels above the threshold must lie in (0, 1), "
                             f"not {share}")
        self.share, self.total, self.count = share, total, 0
        self.k = math.floor(share * total)
        self.kept: list[np.ndarray] = []

    def add(self, amap: np.ndarray) -> None:
        values = np.asarray(amap, dtype=np.float32).ravel()
        self.count += values.size
        self.kept.append(_largest(values, self.k + 1))
        if len(self.kept) > 64:  # merged, so that memory stays near 64 · (k + 1) values
            self.kept = [_largest(np.concatenate(self.kept), self.k + 1)]

    def threshold(self) -> float:
        if self.count != self.total:
            raise ValueError(f"{self.count} pixels seen, {self.total} announced")
        values = np.sort(np.concatenate(self.kept))[::-1]
        return float(values[min(self.k, len(values) - 1)])


def _largest(values: np.ndarray, k: int) -> np.ndarray:
    return values if values.size <= k else np.partition(values, values.size - k)[-k:]
