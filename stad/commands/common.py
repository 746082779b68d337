"""What several commands share: names relative to the data root, the data a model was fitted
on, the command line that resumes a run, and reading and writing model artifacts."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

from stad.artifacts import Artifact, record, save_artifact
from stad.config import Settings
from stad.console import warn
from stad.datasets.selection import DataSelection
from stad.errors import ArtifactError
from stad.model import Networks, model_tensors


def data_info(selection: DataSelection) -> dict[str, Any]:
    """The data a model was fitted on, as recorded in it: the root made absolute (not
    resolved: links stay as given), so that later commands run from another folder find it."""
    return {"dataset": selection.adapter.name, "root": os.path.abspath(selection.root),
            "category": selection.category}


def resume_command(command: str) -> str:
    """How to continue an interrupted run: this command line plus ``--resume`` when it was
    run as ``stad COMMAND ...`` (or ``python -m stad``), else in words."""
    argv = sys.argv[1:]
    if command in argv and Path(sys.argv[0]).name in ("stad", "__main__.py"):
        line = shlex.join(["stad", *(a for a in argv if a != "--resume"), "--resume"])
        if int(os.environ.get("WORLD_SIZE", "1") or "1") > 1:
            return f"start it under torchrun again (any number of processes) as {line}"
        return line
    return (f"run the same `stad {command}` command again with --resume, or call "
            f"stad.{command.replace('-', '_')}(...) again with resume=True")


def save_model(path: Path, model: Networks, settings: Settings, info: dict[str, Any]) -> None:
    save_artifact(path, Artifact(kind="model", tensors=model_tensors(model),
                                 config=settings.model_dump(mode="json"),
                                 preprocessing=model.preprocessing, seed=settings.seed,
                                 info=info))


def with_model_data(settings: Settings, info: dict[str, Any], what: object = "the model"
                    ) -> Settings:
    """Dataset, root and category default to those the model (its ``info``) was fitted on.
    Where a setting (an option, a config file or a ``STAD_*`` variable) names another dataset
    or category, it is used and a warning says so: an exported ``STAD_CATEGORY`` would
    otherwise calibrate a model on another category's images without a word."""
    data = record(info, "data", what)
    for key in ("dataset", "root", "category"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ArtifactError(f"{what} has malformed stad metadata: data.{key} is a JSON "
                                f"{type(data[key]).__name__}, not a string; produce it again")
    given = settings.model_fields_set
    chosen = settings.model_copy(update={
        "dataset": settings.dataset if "dataset" in given else data.get("dataset", "mvtec"),
        "root": settings.root if settings.root is not None else data.get("root"),
        "category": settings.category if settings.category is not None else data.get("category"),
    })
    for key, env in (("dataset", "STAD_DATASET"), ("category", "STAD_CATEGORY")):
        fitted, now = data.get(key), getattr(chosen, key)
        if fitted is not None and now is not None and str(now) != str(fitted):
            warn(f"the model was fitted on {key} {fitted!r}; using {now!r} as set by --{key}, "
                 f"a config file or {env}")
    return chosen
