"""Pictures of anomaly maps without matplotlib: a heat-map colour scale and overlays."""

from __future__ import annotations

import numpy as np

# Control points of a perceptually ordered dark-to-bright scale (close to matplotlib's
# "inferno"): black → purple → red → orange → pale yellow.
_STOPS = np.array([
    [0.0, 0.0, 0.0],
    [0.34, 0.06, 0.43],
    [0.73, 0.21, 0.33],
    [0.98, 0.55, 0.04],
    [0.99, 1.0, 0.64],
], dtype=np.float32)


def heat(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Colour a (H, W) map: ``lo`` and below black, ``hi`` and above pale yellow.

    Returns a uint8 (H, W, 3) array.
    """
    span = hi - lo if hi > lo else 1.0
    t = np.clip((values - lo) / span, 0.0, 1.0) * (len(_STOPS) - 1)
    i = np.minimum(t.astype(np.int64), len(_STOPS) - 2)
    f = (t - i)[..., None]
    rgb = _STOPS[i] * (1 - f) + _STOPS[i + 1] * f
    return (rgb * 255 + 0.5).astype(np.uint8)


def overlay(image: np.ndarray, values: np.ndarray, lo: float, hi: float,
            alpha: float = 0.5) -> np.ndarray:
    """The heat map blended over an (H, W, 3) float image in [0, 1], only where it is above ``lo``.

    Returns a uint8 (H, W, 3) array.
    """
    colours = heat(values, lo, hi).astype(np.float32) / 255
    weight = alpha * np.clip((values - lo) / (hi - lo if hi > lo else 1.0), 0, 1)[..., None]
    out = image * (1 - weight) + colours * weight
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def display_range(values: np.ndarray, pixel_threshold: float | None,
                  threshold: float | None = None) -> tuple[float, float]:
    """The range a map is coloured over: 0 (the mean of normal pixels after standardization)
    to the pixel threshold, so that colours mean the same in every image and the pixels that
    join defect regions are the fully coloured ones. A calibration without a pixel threshold:
    the image threshold (under the top-1 % image score it sits below some normal pixels);
    none at all: the map's own maximum."""
    hi = next((t for t in (pixel_threshold, threshold) if t is not None and t > 0),
              float(values.max()))
    return 0.0, max(hi, 1e-6)
