"""``stad merge-models``: one model from models that each hold some of its scales.

Every scale of a model is fitted on its own (its students, their seeds and its target
normalization depend only on the scale, the data and the settings), so scales fitted in
separate runs — on separate machines or GPUs, or one added later — make the same model as one
run that fits them all. This command checks that the runs were alike in everything but their
patch sizes, and joins them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stad.artifacts import Artifact, load_artifact, save_artifact
from stad.errors import ArtifactError, UsageError
from stad.fsutil import output_lock
from stad.model import model_from_tensors

CALIBRATION_TENSORS = ("calib", "calib_map")
"""Per-scale tensors a merged model leaves out: a calibration covers every scale at once (the
image threshold is taken on the fused map), so a merged model is calibrated anew."""


def _scales(artifact: Artifact, path: Path) -> list[int]:
    found = sorted({int(m.group(1)) for name in artifact.tensors
                    if (m := re.match(r"student\.p(\d+)\.", name))})
    if not found:
        raise ArtifactError(f"{path} holds no students: give models from `stad fit-students`")
    return found


def _fitted_alike(artifact: Artifact) -> dict[str, Any]:
    """What two runs must share for their scales to make one model: the data (but not where it
    lay), the seed, the student settings but the patch sizes, the image preprocessing and the
    teacher's provenance (but not the file it was read from)."""
    data = dict(artifact.info.get("data", {}))
    data.pop("root", None)
    teacher = {k: v for k, v in artifact.info.get("teacher", {}).items()
               if k not in ("source", "stad_version")}
    students = {k: v for k, v in artifact.config.get("students", {}).items()
                if k not in ("patch_sizes", "checkpoint_every")}
    return {"data": data, "seed": artifact.seed, "students": students,
            "preprocessing": artifact.preprocessing, "teacher": teacher}


def merge_models(paths: Sequence[Path], *, out: Path) -> dict[str, Any]:
    """``stad merge-models``: write to ``out`` the model whose scales are those of the models at
    ``paths`` (each scale in exactly one of them), uncalibrated.

    Raises:
        UsageError: fewer than two models, a scale in two of them, or models fitted on other
            data or with other settings (the message names the first that differs).
        ArtifactError: a file that is not a model artifact.
    """
    if len(paths) < 2:
        raise UsageError("merge-models needs at least two models to merge")
    loaded = [(Path(p), load_artifact(p, kind="model")) for p in paths]
    scales = {path: _scales(artifact, path) for path, artifact in loaded}
    first_path, first = loaded[0]
    reference = _fitted_alike(first)
    owner: dict[int, Path] = {}
    tensors: dict[str, Any] = {}
    scales_info: dict[str, Any] = {}
    for path, artifact in loaded:
        here = _fitted_alike(artifact)
        if here != reference:
            key, want, got = _first_difference(reference, here)
            raise UsageError(f"{path} was fitted with {key} = {_short(got)} and {first_path} with "
                             f"{_short(want)}: only models fitted on the same data with the same "
                             "settings (but their patch sizes) can be merged")
        for p in scales[path]:
            if p in owner:
                raise UsageError(f"p={p} is in both {owner[p]} and {path}: give each scale "
                                 "in one model only")
            owner[p] = path
            tensors.update({name: t for name, t in artifact.tensors.items()
                            if name.split(".")[1:2] == [f"p{p}"]
                            and name.split(".")[0] not in CALIBRATION_TENSORS})
            scale_info = artifact.info.get("students", {}).get("scales", {}).get(f"p{p}")
            if scale_info is not None:
                scales_info[f"p{p}"] = scale_info
    patch_sizes = sorted(owner)
    try:  # complete and sound before anything is written
        model_from_tensors(tensors, first.preprocessing, calibration=False)
    except ArtifactError as exc:
        raise ArtifactError(f"the scales of {', '.join(str(p) for p, _ in loaded)} do not make "
                            f"a model: {exc}") from None
    config = {**first.config, "students": {**first.config.get("students", {}),
                                           "patch_sizes": patch_sizes}}
    info = {k: v for k, v in first.info.items() if k != "calibration"}
    # What each run computed in ("auto" resolves per machine) and how it was distributed
    # stays with that run's entry in merged_from.
    precisions = {a.info.get("students", {}).get("precision") for _, a in loaded}
    info["students"] = {"precision": precisions.pop() if len(precisions) == 1 else "mixed",
                        "scales": dict(sorted(scales_info.items(),
                                              key=lambda kv: int(kv[0][1:])))}
    info["seconds"] = round(sum(_seconds(a) for _, a in loaded), 1)
    info["merged_from"] = [
        {"path": str(path), "patch_sizes": scales[path], "seconds": a.info.get("seconds"),
         **{k: v for k, v in a.info.get("students", {}).items() if k != "scales"}}
        for path, a in loaded]
    with output_lock(out):  # checks that out can be written, then holds it
        save_artifact(out, Artifact(kind="model", tensors=tensors, config=config,
                                    preprocessing=first.preprocessing, seed=first.seed,
                                    info=info))
    return {"artifact": str(out), "kind": "model", "patch_sizes": patch_sizes,
            "from": {f"p{p}": str(path) for p, path in sorted(owner.items())}}


_MISSING = type("_Missing", (), {"__repr__": lambda self: "(not set)"})()


def _first_difference(a: Any, b: Any, where: str = "") -> tuple[str, Any, Any]:
    """The dotted key at which a and b (equal-looking dicts) first differ, and the two values
    (a key one of them lacks shows as ``(not set)``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key, _MISSING) != b.get(key, _MISSING):
                return _first_difference(a.get(key, _MISSING), b.get(key, _MISSING),
                                         f"{where}.{key}" if where else str(key))
    return where, a, b


def _seconds(artifact: Artifact) -> float:
    """The run's recorded fitting time (0 where none, or not a number, is recorded)."""
    value = artifact.info.get("seconds")
    return float(value) if isinstance(value, (int, float)) else 0.0


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
