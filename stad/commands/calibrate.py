"""``stad calibrate``: standardization statistics and an image threshold, stored in the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stad.api import Model
from stad.artifacts import check_artifact_output, record
from stad.calibration import check_threshold_method, validation_samples
from stad.commands.common import with_model_data
from stad.config import Settings
from stad.console import NULL_REPORTER, Reporter
from stad.datasets.selection import select_data


def calibrate(settings: Settings, *, model_path: Path, out: Path | None = None,
              reporter: Reporter = NULL_REPORTER) -> dict[str, Any]:
    """``stad calibrate``: standardization statistics and an image threshold, stored in the model.

    The data selection defaults to what the model was fitted on.
    """
    cfg = settings.calibrate
    check_threshold_method(cfg.threshold_method, cfg.threshold)
    if out is not None:
        check_artifact_output(out)
    model = Model.load(model_path, device=settings.device, score=settings.score,
                       calibration=False)  # replaced here
    settings = with_model_data(settings, model.info, model_path)
    selection = select_data(settings)
    val = validation_samples(selection, model.info)
    test = selection.samples("test") if cfg.threshold_method == "f1" else []
    calibration = model.calibrate(
        [s.image for s in val], method=cfg.threshold_method, target_fpr=cfg.target_fpr,
        threshold=cfg.threshold, normalize=cfg.normalize,
        target_pixel_fpr=cfg.target_pixel_fpr, smooth_sigma=cfg.smooth_sigma,
        variance_weight=cfg.variance_weight, tta=cfg.tta,
        test_images=[s.image for s in test],
        test_labels=[s.label == "anomalous" for s in test],
        source=record(record(model.info, "data", model_path), "validation", model_path
                      ).get("source"), reporter=reporter)
    target = model.save(out or model_path)
    return {"artifact": str(target), **calibration}
