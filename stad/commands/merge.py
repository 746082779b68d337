"""``stad merge-models``: one model from models that each hold some of its scales.

Every scale of a model is fitted on its own (its students, their seeds and its target
normalization depend only on the scale, the data and the settings), so scales fitted in
separate runs — on separate machines or GPUs, or one added later — make the same model as one
run that fits them all. This command checks that the runs were alike in everything but their
patch sizes, and joins them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from stad.artifacts import Artifact, check_artifact_output, load_artifact, record, save_artifact
from stad.errors import ArtifactError, UsageError
from stad.fsutil import output_lock
from stad.images import check_preprocessing
from stad.model import (
    model_from_tensors,
    parse_scale_name,
    scale_name,
    scale_order,
    student_scales,
)

CALIBRATION_TENSORS = ("calib", "calib_map")
"""Per-scale tensors a merged model leaves out: a calibration covers every scale at once (the
image threshold is taken on the fused map), so a merged model is calibrated anew."""


def _scales(artifact: Artifact, path: Path) -> list[str]:
    found = student_scales(artifact.tensors)
    if not found:
        raise ArtifactError(f"{path} holds no students: give models from `stad fit-students`")
    return found


# Keys of a teacher's record that say when and where its run took place, not what it made.
_CIRCUMSTANTIAL = frozenset({"seconds", "root", "path", "listing_sha256"})


def _portable(value: Any) -> Any:
    """``value`` without :data:`_CIRCUMSTANTIAL` keys at any depth."""
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items() if k not in _CIRCUMSTANTIAL}
    if isinstance(value, list):
        return [_portable(v) for v in value]
    return value


def _fitted_alike(artifact: Artifact, path: Path) -> dict[str, Any]:
    """What two runs must share for their scales to make one model: the data (but not where it
    lay), the seed, the student settings but the patch sizes and the image size, the image
    standardization and the teacher's provenance (but not the file it was read from)."""
    data = dict(record(artifact.info, "data", path))
    data.pop("root", None)
    # The teacher's provenance without its timings and places: teachers pretrained alike
    # (bit-identical) in two runs took different seconds, in other folders.
    teacher = _portable({k: v for k, v in record(artifact.info, "teacher", path).items()
                        if k not in ("source", "stad_version")})
    students = {k: v for k, v in record(artifact.config, "students", path).items()
                if k not in ("patch_sizes", "checkpoint_every", "image_size")}
    preprocessing = {k: v for k, v in artifact.preprocessing.items() if k != "image_size"}
    return {"data": data, "seed": artifact.seed, "students": students,
            "preprocessing": preprocessing, "teacher": teacher}


def _renamed(name: str, size: int, full: int) -> str:
    """A scale's name in the merged model of image size ``full``, from a model of ``size``."""
    p, own = parse_scale_name(name)
    if own is None and size != full:
        if full % size:
            raise UsageError(f"a model of image size {size} cannot join one of {full}: the "
                             "smaller size must divide the larger")
        return scale_name(p, size)
    return name


def merge_models(paths: Sequence[Path], *, out: Path) -> dict[str, Any]:
    """``stad merge-models``: write to ``out`` the model whose scales are those of the models at
    ``paths`` (each scale in exactly one of them), uncalibrated.

    Models fitted at different image sizes may be merged: the merged model takes the largest
    size S, and the scales of a model of size s < S (a divisor of S) become scales at s
    (``p17`` of a 128² model is ``p17@128`` of a 256² one), which see the images reduced to s
    as images are resized to a model's size (:func:`stad.model.reduce_to`): what a model of
    size s sees of an S × S image.

    Raises:
        UsageError: fewer than two models, a scale in two of them, models fitted on other
            data or with other settings (the message names the first that differs), image
            sizes that do not divide the largest, or teachers of one patch size that differ.
        ArtifactError: a file that is not a model artifact.
    """
    if len(paths) < 2:
        raise UsageError("merge-models needs at least two models to merge")
    check_artifact_output(out)  # before loading the models
    loaded = [(Path(p), load_artifact(p, kind="model")) for p in paths]
    for path, artifact in loaded:
        check_preprocessing(artifact.preprocessing, f"model {path}")
    full = max(int(a.preprocessing["image_size"]) for _, a in loaded)
    largest = next((path, a) for path, a in loaded if a.preprocessing["image_size"] == full)
    scales = {path: _scales(artifact, path) for path, artifact in loaded}
    first_path, first = loaded[0]
    reference = _fitted_alike(first, first_path)
    owner: dict[str, Path] = {}
    tensors: dict[str, Any] = {}
    scales_info: dict[str, Any] = {}
    teacher_from: dict[str, Path] = {}
    for path, artifact in loaded:
        here = _fitted_alike(artifact, path)
        if here != reference:
            key, want, got = _first_difference(reference, here)
            raise UsageError(f"{path} was fitted with {key} = {_short(got)} and {first_path} with "
                             f"{_short(want)}: only models fitted on the same data with the same "
                             "settings (but their patch sizes and image size) can be merged")
        size = int(artifact.preprocessing["image_size"])
        for k in scales[path]:
            new = _renamed(k, size, full)
            if new in owner:
                raise UsageError(f"{new} is in both {owner[new]} and {path}: give each scale "
                                 "in one model only")
            owner[new] = path
            for name, t in artifact.tensors.items():
                kind, _, rest = name.partition(".")
                if kind in (*CALIBRATION_TENSORS, "teacher") or rest.split(".")[0] != k:
                    continue
                tensors[f"{kind}.{new}{rest[len(k):]}"] = t
            teacher = f"p{parse_scale_name(k)[0]}"
            for name, t in artifact.tensors.items():
                if name.split(".")[:2] != ["teacher", teacher]:
                    continue
                if name in tensors and not torch.equal(tensors[name], t):
                    raise UsageError(f"{path} and {teacher_from[teacher]} hold different "
                                        f"teachers for {teacher}: merge models fitted with "
                                        "the same teacher")
                tensors[name] = t
            teacher_from.setdefault(teacher, path)
            scale_info = record(record(artifact.info, "students", path), "scales", path).get(k)
            if scale_info is not None:
                scales_info[new] = scale_info
    names = sorted(owner, key=scale_order)
    preprocessing = largest[1].preprocessing
    try:  # complete and sound before anything is written
        model_from_tensors(tensors, preprocessing, calibration=False)
    except ArtifactError as exc:
        raise ArtifactError(f"the scales of {', '.join(str(p) for p, _ in loaded)} do not make "
                            f"a model: {exc}") from None
    base = largest[1]
    config = {**base.config, "students": {
        **base.config.get("students", {}),
        "patch_sizes": [p if s is None else f"{p}@{s}"
                        for p, s in map(parse_scale_name, names)]}}
    info = {k: v for k, v in base.info.items() if k != "calibration"}
    # What each run computed in ("auto" resolves per machine) and how it was distributed
    # stays with that run's entry in merged_from.
    precisions = {record(a.info, "students", path).get("precision") for path, a in loaded}
    info["students"] = {"precision": precisions.pop() if len(precisions) == 1 else "mixed",
                        "scales": dict(sorted(scales_info.items(),
                                              key=lambda kv: scale_order(kv[0])))}
    info["seconds"] = round(sum(_seconds(a) for _, a in loaded), 1)
    info["merged_from"] = [
        {"path": str(path), "image_size": a.preprocessing["image_size"],
         "patch_sizes": sorted({parse_scale_name(k)[0] for k in scales[path]}),
         "scales": scales[path], "seconds": a.info.get("seconds"),
         **{k: v for k, v in record(a.info, "students", path).items() if k != "scales"}}
        for path, a in loaded]
    with output_lock(out):  # checks that out can be written, then holds it
        save_artifact(out, Artifact(kind="model", tensors=tensors, config=config,
                                    preprocessing=preprocessing, seed=base.seed, info=info))
    return {"artifact": str(out), "kind": "model",
            "patch_sizes": sorted({parse_scale_name(k)[0] for k in names}), "scales": names,
            "image_size": full, "from": {k: str(owner[k]) for k in names}}


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
