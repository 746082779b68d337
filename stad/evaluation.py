"""``stad evaluate``: metrics of a model on a labelled test split (the report folder:
:mod:`stad.report`).

Maps are compared with the ground truth at the ground truth's resolution (docs/method.md §6): each
map is computed at the model's image size and resized bilinearly to its image's own size, which
is the mask's size (a mask of another size is a data error).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stad import metrics
from stad.config import Settings
from stad.console import NULL_REPORTER, Reporter
from stad.datasets.base import Sample
from stad.errors import DataError
from stad.images import load_mask
from stad.model import Networks
from stad.scoring import image_score, iter_maps


@dataclass
class Evaluated:
    sample: Sample
    maps: dict[str, np.ndarray]
    mask: np.ndarray
    scores: dict[str, float]


def collect(model: Networks, samples: Sequence[Sample], settings: Settings, *,
            device: torch.device, reporter: Reporter = NULL_REPORTER) -> list[Evaluated]:
    """Maps, masks and image scores of every test sample."""
    out = []
    paths = [s.image for s in samples]
    for sample, m in zip(samples, iter_maps(model, paths, device=device, reporter=reporter,
                                            what="evaluating"), strict=True):
        shape = m.maps["fused"].shape
        mask = load_mask(sample.mask, shape) if sample.mask is not None else np.zeros(shape, bool)
        if sample.label == "normal" and mask.any():
            raise DataError(f"mask {sample.mask} of the normal image {sample.image} marks "
                            f"{int(mask.sum())} pixel(s) anomalous; a normal image's mask must be "
                            "all zero (or none)")
        scores = {k: image_score(v, settings.score) for k, v in m.maps.items()}
        out.append(Evaluated(sample, m.maps, mask, scores))
    return out


def _metrics(items: Sequence[Evaluated], key: str, fpr_limit: float,
             pixel_threshold: float | None = None) -> dict[str, Any]:
    labels = [e.sample.label == "anomalous" for e in items]
    scores = [e.scores[key] for e in items]
    out: dict[str, Any] = {"n_images": len(items), "n_anomalous": int(sum(labels))}
    if 0 < sum(labels) < len(labels):
        out["image_auroc"] = metrics.image_auroc(scores, labels)
        out["image_ap"] = metrics.average_precision(scores, labels)
    # Pixel metrics use normal images and anomalous images that have a mask.
    pix = [e for e in items if e.sample.label == "normal" or e.sample.mask is not None]
    if any(e.mask.any() for e in pix):
        maps = [e.maps[key] for e in pix]
        masks = [e.mask for e in pix]
        out["pixel_auroc"] = metrics.pixel_auroc(maps, masks)
        out["pixel_ap"] = metrics.pixel_average_precision(maps, masks)
        pro = metrics.au_pro(maps, masks, fpr_limit=fpr_limit)
        out["au_pro"] = pro.au_pro
        out["n_regions"] = pro.n_regions
        if pixel_threshold is not None:
            out.update(segmentation(maps, masks, pixel_threshold))
    return out


def segmentation(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], threshold: float
                 ) -> dict[str, float]:
    """Pixel F1 and IoU of ``map > threshold`` against the masks, over all their pixels:
    F1 = 2TP / (2TP + FP + FN), IoU = TP / (TP + FP + FN) (1 when both are empty)."""
    tp = fp = fn = 0
    for amap, mask in zip(maps, masks, strict=True):
        pred = amap > threshold
        tp += int(np.count_nonzero(pred & mask))
        fp += int(np.count_nonzero(pred & ~mask))
        fn += int(np.count_nonzero(~pred & mask))
    if tp + fp + fn == 0:
        return {"pixel_f1": 1.0, "pixel_iou": 1.0}
    return {"pixel_f1": 2 * tp / (2 * tp + fp + fn), "pixel_iou": tp / (tp + fp + fn)}


def compute_metrics(items: Sequence[Evaluated], fpr_limit: float,
                    pixel_threshold: float | None = None) -> dict[str, Any]:
    """Per map (each scale and ``fused``): overall and per defect type (with the good images);
    with ``pixel_threshold``, the fused map's pixel F1 and IoU at it (:func:`segmentation`)."""
    if not items:
        raise DataError("the test split is empty: nothing to evaluate")
    keys = list(items[0].maps)
    defects = sorted({e.sample.defect for e in items if e.sample.label == "anomalous"})
    normal = [e for e in items if e.sample.label == "normal"]
    result: dict[str, Any] = {"fpr_limit": fpr_limit, "maps": {}}
    for key in keys:
        pixel = pixel_threshold if key == "fused" else None
        entry = _metrics(items, key, fpr_limit, pixel)
        entry["defects"] = {d: _metrics(normal + [e for e in items if e.sample.defect == d
                                                  and e.sample.label == "anomalous"],
                                        key, fpr_limit, pixel) for d in defects}
        result["maps"][key] = entry
    return result
