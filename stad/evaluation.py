"""``stad evaluate``: metrics of a model on a labelled test split, and the report folder.

Maps are compared with the ground truth at the ground truth's resolution (METHOD.md §6): each
map is computed at the model's image size and resized bilinearly to its image's own size, which
is the mask's size (a mask of another size is a data error).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stad import metrics
from stad.config import Settings
from stad.console import NULL_REPORTER, Reporter
from stad.datasets.base import Sample
from stad.errors import DataError
from stad.fsutil import atomic_write_bytes, atomic_write_text
from stad.images import load_image, load_mask
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


# ---- the report folder ----------------------------------------------------------------------

_COLUMNS = ("au_pro", "pixel_auroc", "image_auroc", "image_ap", "pixel_ap", "pixel_f1",
            "pixel_iou")


def markdown(result: dict[str, Any], title: str) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "–"

    lim = result["fpr_limit"]
    head = ["map", f"AU-PRO@{lim:g}", "pixel AUROC", "image AUROC", "image AP", "pixel AP",
            "pixel F1", "pixel IoU"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, entry in result["maps"].items():
        lines.append(f"| {key} | " + " | ".join(fmt(entry.get(c)) for c in _COLUMNS) + " |")
    lines += ["", "## Per defect type (fused map, with all good images)", "",
              "| defect | images | " + " | ".join(head[1:]) + " |",
              "|" + "---|" * (len(head) + 1)]
    for d, entry in result["maps"]["fused"]["defects"].items():
        lines.append(f"| {d} | {entry['n_anomalous']} | "
                     + " | ".join(fmt(entry.get(c)) for c in _COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def grid(items: Sequence[Evaluated], threshold: float | None, k: int = 4) -> np.ndarray:
    """Rows of image | overlay | ground truth for the best and worst cases.

    Order: the k highest-scoring anomalous images (found), the k lowest-scoring anomalous
    images (missed), the k highest-scoring normal images (false alarms).
    """
    from PIL import Image

    from stad.visualize import display_range, overlay

    anomalous = sorted((e for e in items if e.sample.label == "anomalous"),
                       key=lambda e: -e.scores["fused"])
    normal = sorted((e for e in items if e.sample.label == "normal"),
                    key=lambda e: -e.scores["fused"])
    chosen = anomalous[:k] + anomalous[::-1][:k] + normal[:k]
    side = 160
    rows = []
    for e in chosen:
        image = load_image(e.sample.image)
        lo, hi = display_range(threshold, e.maps["fused"])
        tiles = [(image * 255).astype(np.uint8), overlay(image, e.maps["fused"], lo, hi),
                 np.repeat((e.mask * 255).astype(np.uint8)[..., None], 3, axis=2)]
        row = [np.asarray(Image.fromarray(t).resize((side, side))) for t in tiles]
        rows.append(np.concatenate(row, axis=1))
    if not rows:
        return np.zeros((side, 3 * side, 3), np.uint8)
    return np.concatenate(rows, axis=0)


def write_report(folder: Path, result: dict[str, Any], items: Sequence[Evaluated],
                 *, title: str, threshold: float | None) -> list[str]:
    """metrics.json, report.md, examples.png and (with matplotlib) roc.png and pro.png."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    atomic_write_text(folder / "metrics.json", json.dumps(result, indent=2) + "\n")
    text = markdown(result, title)
    plots = _plots(folder, items, result["fpr_limit"])
    text += ("\n![ROC](roc.png) ![PRO](pro.png)\n" if plots else
             "\n(ROC and PRO plots skipped: install matplotlib, `pip install stad[plots]`)\n")
    text += ("\n## Examples\n\nRows: best-detected anomalies, missed anomalies, highest-scoring "
             "normal images. Columns: image, fused map over the image, ground truth.\n\n"
             "![examples](examples.png)\n")
    atomic_write_text(folder / "report.md", text)
    atomic_write_bytes(folder / "examples.png", _png(grid(items, threshold)))
    written += ["metrics.json", "report.md", "examples.png", *plots]
    return [str(folder / w) for w in written]


def _plots(folder: Path, items: Sequence[Evaluated], fpr_limit: float) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    labels = [e.sample.label == "anomalous" for e in items]
    keys = list(items[0].maps)
    fig, ax = plt.subplots(figsize=(5, 4))
    if 0 < sum(labels) < len(labels):
        for key in keys:
            fpr, tpr = metrics.roc_curve([e.scores[key] for e in items], labels)
            ax.plot(fpr, tpr, label=key)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="image ROC")
    ax.legend()
    _save_fig(fig, folder / "roc.png")
    fig, ax = plt.subplots(figsize=(5, 4))
    pix = [e for e in items if e.sample.label == "normal" or e.sample.mask is not None]
    if any(e.mask.any() for e in pix):
        for key in keys:
            pro = metrics.au_pro([e.maps[key] for e in pix], [e.mask for e in pix],
                                 fpr_limit=fpr_limit)
            ax.plot(pro.fpr, pro.pro, label=f"{key} ({pro.au_pro:.3f})")
    ax.axvline(fpr_limit, color="grey", linestyle=":")
    ax.set(xlim=(0, min(1.0, 2 * fpr_limit)), xlabel="false positive rate (pixels)",
           ylabel="per-region overlap", title="PRO curve")
    ax.legend()
    _save_fig(fig, folder / "pro.png")
    plt.close("all")
    return ["roc.png", "pro.png"]


def _save_fig(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
