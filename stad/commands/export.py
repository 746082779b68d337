"""``stad export``: a calibrated model as one ONNX graph (:mod:`stad.export`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stad.api import Model
from stad.calibration import validation_samples
from stad.commands.common import with_model_data
from stad.config import Settings
from stad.datasets.selection import select_data
from stad.export import check_export_path, check_format, check_quantize


def export(settings: Settings, *, model_path: Path, out: Path, format: str = "onnx",
           quantize: str | None = None) -> dict[str, Any]:
    """``stad export``: the model as ONNX; with ``quantize="int8"`` its convolutions in int8,
    calibrated on the held-back anomaly-free images the model records (the data selection
    defaults to what the model was fitted on, as for ``stad calibrate``)."""
    check_format(format)
    check_quantize(quantize)
    check_export_path(out, model_path)  # before the model is read
    model = Model.load(model_path, device="cpu")
    model.score_rule()  # an uncalibrated model is refused before any image is read
    images: list[Any] = []
    if quantize is not None:
        settings = with_model_data(settings, model.info, model_path)
        images = [s.image for s in validation_samples(select_data(settings), model.info)]
    return model.export(out, format=format, quantize=quantize,  # type: ignore[arg-type]
                        calibration_images=images)
