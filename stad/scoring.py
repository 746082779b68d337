"""Anomaly maps, image scores, calibration and verdicts (docs/method.md §5).

The map of an image: resize it to the model's image size, compute per scale ẽ + ṽ (the
regression error and predictive variance standardized with statistics from anomaly-free
validation images), average the scales, and resize the map back to the image's own size.
The image score is the mean of the map's top ``topk_fraction`` of pixels by default
(``score.image_score = "topk_mean"``: less sensitive to one hot pixel; docs/model.md gives the
measurement) or its maximum (``"max"``, as docs/method.md §5 has it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stad.config import ScoreSettings
from stad.console import NULL_REPORTER, Reporter
from stad.errors import DataError
from stad.images import as_rgb, load_image, to_tensor
from stad.model import Inference, Networks


@dataclass
class ImageMaps:
    """The maps of one image at its own resolution: ``maps["fused"]``, ``maps["p17"]``, ...

    ``path`` is the file it was read from, None for an image given in memory."""

    path: Path | None
    maps: dict[str, np.ndarray]  # each (H, W) float32
    image: np.ndarray  # (H, W, 3) float32 in [0, 1], as read (for overlays)


def is_path(item: Any) -> bool:
    """Whether an image input names a file (else it is a PIL image or an array)."""
    return isinstance(item, (str, os.PathLike))


def prepare(item: Any, model: Networks, what: str = "image") -> tuple[torch.Tensor, np.ndarray]:
    """Read one image (a file path, a PIL image or an array; :func:`stad.images.as_rgb`) as the
    artifact's preprocessing says: (3, S, S), and the image as read."""
    image = load_image(item) if is_path(item) else as_rgb(item, what)
    pre = model.preprocessing
    return to_tensor(image, size=pre["image_size"], mean=pre["mean"], std=pre["std"]), image


def configure(model: Networks, cfg: ScoreSettings) -> Networks:
    """Set how ``model`` computes maps from the ``score`` settings (batch, tiles, precision)."""
    model.inference = Inference(batch_size=cfg.batch_size, tile_size=cfg.tile_size,
                                precision=cfg.precision, fused=cfg.fused)
    return model


@dataclass
class ImageError:
    """An image that could not be read (yielded by :func:`iter_results` in its place)."""

    path: Path | None
    error: DataError


Prepared = tuple["Path | None", "tuple[torch.Tensor, np.ndarray] | DataError"]


def _prepare_all(items: Sequence[Any], model: Networks, start: int) -> list[Prepared]:
    out: list[Prepared] = []
    for i, item in enumerate(items, start):
        path = Path(item) if is_path(item) else None
        try:
            out.append((path, prepare(item, model, f"image {i} (in memory)")))
        except DataError as exc:
            out.append((path, exc))
    return out


def prepared_batches(model: Networks, paths: Sequence[Any], batch_size: int
                     ) -> Iterator[list[Prepared]]:
    """The images read and resized in batches, in order; each item is (path, (tensor, image))
    or (path, DataError), path None for an image given in memory (:func:`prepare`). The next
    batch is decoded in a background thread while the caller runs the networks on this one
    (decoding and resizing release the GIL)."""
    starts = list(range(0, len(paths), batch_size))
    if not starts:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stad-read") as pool:
        pending = pool.submit(_prepare_all, paths[:batch_size], model, 0)
        try:
            for nxt in [*starts[1:], None]:
                batch = pending.result()
                if nxt is not None:
                    pending = pool.submit(_prepare_all, paths[nxt:nxt + batch_size], model, nxt)
                yield batch
        finally:
            pending.cancel()


@torch.inference_mode()
def iter_results(model: Networks, paths: Sequence[Path], *, device: torch.device,
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


def iter_maps(model: Networks, paths: Sequence[Path], *, device: torch.device,
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
