"""``stad evaluate``: metrics on the labelled test split, and the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stad.api import Model
from stad.commands.common import data_info, with_model_data
from stad.config import Settings
from stad.console import NULL_REPORTER, Reporter
from stad.datasets.selection import select_data
from stad.errors import DataError
from stad.fsutil import check_output_dir


def evaluate(settings: Settings, *, model_path: Path, report: Path | None = None,
             reporter: Reporter = NULL_REPORTER) -> dict[str, Any]:
    """``stad evaluate``: metrics on the adapter's labelled test split, optionally a report.

    The data selection defaults to what the model was fitted on.
    """
    from stad.evaluation import collect, compute_metrics
    from stad.report import write_report

    if report is not None:
        check_output_dir(report, create=False)  # made by write_report
    model = Model.load(model_path, device=settings.device, score=settings.score)
    calibration, rule = model.score_rule()
    settings = with_model_data(settings.model_copy(update={"score": rule}), model.info,
                               model_path)
    selection = select_data(settings)
    test = selection.samples("test")
    if not test:
        raise DataError(f"no test images in {selection.describe()}")
    items = collect(model.networks, test, settings, device=model.device, reporter=reporter)
    try:
        result = compute_metrics(items, settings.evaluate.fpr_limit,
                                 calibration.get("pixel_threshold"))
    except ValueError as exc:
        raise DataError(f"cannot evaluate {selection.describe()}: {exc}") from None
    result = {"model": str(model_path), **data_info(selection), **result}
    if report is not None:
        result["report"] = write_report(
            report, result, items, threshold=calibration["threshold"],
            pixel_threshold=calibration.get("pixel_threshold"), info=model.info,
            title=f"stad evaluation: {selection.describe()}")
    return result
