"""Settings in one pydantic model, from flags > ``STAD_*`` environment > TOML file > defaults.

Every command reads the same :class:`Settings`. A TOML config file uses the same keys as the
model: top-level data keys (``dataset``, ``root``, ``category``, ``seed``, ``device``) and one
table per stage (``[teacher]``, ``[students]``, ``[calibrate]``, ``[score]``, ``[evaluate]``).
Environment variables are ``STAD_<KEY>`` for top-level keys and ``STAD_<TABLE>__<KEY>`` for keys
of a table (``STAD_STUDENTS__EPOCHS=5``). Unknown keys are errors everywhere (``extra="forbid"``):
a misspelt setting must never be silently ignored.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from stad.errors import UsageError
from stad.fsutil import read_regular_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "STAD_"
# STAD_* variables that are not settings: the config file, tracebacks, the data cache.
ENV_OPTIONS = frozenset({"STAD_CONFIG", "STAD_DEBUG", "STAD_CACHE"})
# The patch sizes the networks are built for: stad.networks.PATCH_SIZES, repeated here because
# settings are read without torch (tests/test_config.py checks that the two agree).
PATCH_SIZES = (17, 33, 65)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _split_ints(value: Any) -> Any:
    """Accept ``"17,33"`` (from the environment or a flag) as well as a list."""
    if isinstance(value, str):
        return [int(v) for v in value.replace(" ", "").split(",") if v]
    return value


def _nonempty_path(value: Any) -> Any:
    """A file or folder setting: an empty string (``STAD_ROOT=`` or ``root = ""``) is refused
    rather than read as ".", the current folder."""
    if isinstance(value, str) and not value.strip():
        raise ValueError("is empty: give a file or folder name, or leave the setting out")
    return value


def _check_patch_sizes(value: list[int]) -> list[int]:
    bad = [p for p in value if p not in PATCH_SIZES]
    if bad or not value:
        raise ValueError(f"patch sizes must be a non-empty subset of {PATCH_SIZES}, got {value}")
    return sorted(set(value))


def parse_scale(value: int | str) -> tuple[int, int | None]:
    """A student scale as written in ``students.patch_sizes``: ``17`` (at the model's image
    size) → (17, None), ``"17@128"`` (at 128²) → (17, 128). ValueError for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, None
    if isinstance(value, float) and value.is_integer():  # 17.0 from a settings file
        return int(value), None
    text = str(value).strip().removeprefix("p")
    p, at, size = text.partition("@")
    try:
        return int(p), int(size) if at else None
    except ValueError:
        raise ValueError(f"{value!r} is not a patch size (17) or a patch size at an image size "
                         "(17@128)") from None


MIN_SCALE_SIZE = 17
"""The smallest image size a scale may work at (as ``students.image_size``)."""

MAX_IMAGE_SIZE = 4096
"""The largest image size the networks may work at (16 times the paper's 256): a bound on what a
setting, or a model file, can ask a run to compute and hold."""


def scale_size_fits(size: int, image_size: int) -> bool:
    """Whether a scale may work at ``size`` in a model of ``image_size``: a smaller divisor of
    it, at least :data:`MIN_SCALE_SIZE` (the settings and the artifact loader both check it)."""
    return MIN_SCALE_SIZE <= size < image_size and image_size % size == 0


def _split_scales(value: Any) -> Any:
    """Accept ``"17,17@128,33@128"`` as well as a list; plain sizes become ints."""
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    if isinstance(value, list):
        out: list[int | str] = []
        for v in value:
            p, size = parse_scale(v)
            out.append(p if size is None else f"{p}@{size}")
        return out
    return value


def _check_scales(value: list[int | str]) -> list[int | str]:
    scales = [parse_scale(v) for v in value]
    bad = [v for v, (p, _) in zip(value, scales, strict=True) if p not in PATCH_SIZES]
    if bad or not value:
        raise ValueError(f"patch sizes must be a non-empty subset of {PATCH_SIZES}, each "
                         f"optionally at an image size (17@128), got {value}")
    small = [v for v, (_, size) in zip(value, scales, strict=True)
             if size is not None and size < MIN_SCALE_SIZE]
    if small:
        raise ValueError(f"{small[0]}: the image size of a scale must be at least "
                         f"{MIN_SCALE_SIZE}")
    unique = {scale: v for scale, v in zip(scales, value, strict=True)}
    return [unique[k] for k in sorted(unique, key=lambda k: (k[0], k[1] is not None,
                                                             -(k[1] or 0)))]


class TeacherSettings(_Section):
    """``stad pretrain-teacher`` (docs/method.md §3). Paper: λk = λc = 1, λm = 0, 50 000 iterations.

    ``target`` is what the teacher distils: ``resnet18`` (the paper; needs
    ``backbone_weights``), ``efficientnet-lite0/1/2`` (ImageNet features from the registry
    package or ``backbone_weights``; :mod:`stad.distillation`), ``handcrafted`` (a fixed bank
    of handcrafted descriptors, :mod:`stad.handcrafted`, no download) or ``none`` (metric
    learning and compactness only);
    ``auto`` is ``resnet18`` when ``backbone_weights`` is given, else ``handcrafted``.
    ``lambda_metric`` defaults to ``None``: 0 (the paper) when distillation is on, 1 when it is
    off, since compactness alone would leave nothing to learn. The fields after
    ``checkpoint_every`` fill in what the paper leaves unstated (docs/model.md, "Teacher
    pretraining").
    """

    patch_sizes: list[int] = Field(default=list(PATCH_SIZES))
    iterations: int = Field(default=50_000, ge=1)
    batch_size: int = Field(default=64, ge=2)
    lr: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=1e-5, ge=0)
    lambda_kd: float = Field(default=1.0, ge=0)
    lambda_metric: float | None = Field(
        default=None, ge=0, description="None: 0 with distillation, 1 without"
    )
    lambda_compact: float = Field(default=1.0, ge=0)
    compactness: Literal["signed", "squared"] = Field(
        default="signed", description="signed: Σ c_ij (the paper); squared: Σ c_ij² / (d − 1), "
        "which only uncorrelated channels minimize"
    )
    triplet_margin: float = Field(default=1.0, ge=0)
    target: Literal["auto", "resnet18", "efficientnet-lite0", "efficientnet-lite1",
                    "efficientnet-lite2", "handcrafted", "none"] = Field(
        default="auto", description="auto: resnet18 with backbone_weights, else handcrafted"
    )
    backbone_weights: Path | None = None
    init: str | None = Field(
        default=None, description="teacher artifact, or 'builtin', whose teachers the scales "
        "start from (the decoder starts afresh); None: a seeded random initialization"
    )
    _paths = field_validator("backbone_weights", "init", mode="before")(_nonempty_path)
    distill: Literal["dense", "patch"] = Field(
        default="dense", description="efficientnet targets: dense (the feature maps at the patch "
        "centre, one backbone pass per image) or patch (the paper's: pooled features of the "
        "resized patch)"
    )
    target_blocks: dict[int, list[int]] = Field(
        default_factory=dict, description="efficientnet targets: backbone blocks distilled per "
        "patch size, e.g. {33: [4, 7]}; absent sizes take stad.distillation.DEFAULT_BLOCKS"
    )
    target_whiten: int = Field(
        default=0, ge=0, le=484, description="handcrafted target: distil its k leading principal "
        "components, each scaled to unit variance; 0: the standardized bank as is"
    )
    image_size: int = Field(default=256, ge=17, le=MAX_IMAGE_SIZE,
                            description="images are resized to this first")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        default="fp32", description="the teacher and decoder under bf16 autocast (losses in fp32);"
        " auto: bf16 where the device computes it natively, else fp32")
    checkpoint_every: int = Field(default=500, ge=1, description="iterations between checkpoints")
    kd_input_size: int = Field(
        default=64, ge=32, description="patches are resized to this for ResNet-18 (unstated)"
    )
    positive_shift: int = Field(
        default=2, ge=0, description="max translation (pixels) of the triplet positive"
    )
    positive_noise: float = Field(
        default=0.1, ge=0, description="std of Gaussian noise on the positive (standardized units)"
    )
    descriptor_norm: bool = Field(
        default=False, description="L2-normalize descriptors (× sqrt(d)) inside the triplet loss"
    )
    triplet_negatives: Literal["random", "hardest"] = Field(
        default="random", description="hardest: the closest negative of the whole batch"
    )
    lambda_variance: float = Field(
        default=0.0, ge=0, description="weight of a hinge on each descriptor channel's std < 1"
    )
    diagnostic_patches: int = Field(
        default=256, ge=0, description="patches for the collapse diagnostics per scale; 0: off"
    )
    buffer_images: int = Field(
        default=512, ge=2, description="decoded images held per process; a larger set is "
        "streamed through a buffer of this many (0.75 MiB each at 256²)"
    )
    buffer_refresh: int = Field(
        default=1, ge=1, description="buffer images replaced by new ones of the stream per "
        "iteration (when streaming)"
    )

    _split = field_validator("patch_sizes", mode="before")(_split_ints)
    _check = field_validator("patch_sizes")(_check_patch_sizes)


# Presets fill the student settings a user did not set (by flag, environment or file).
STUDENT_PRESETS: dict[str, dict[str, Any]] = {
    # docs/method.md §4: 256×256, 100 epochs, Adam 1e-4, wd 1e-5, batch of one whole image.
    "paper": {"image_size": 256, "epochs": 100, "lr": 1e-4, "lr_schedule": "constant",
              "crop_size": None, "batch_size": 1, "precision": "fp32", "min_steps": 0},
    # CPU-friendly: random crops (same per-pixel loss), few epochs at a higher learning rate
    # with a cosine decay, but at least 900 steps a scale, two students a scale (the third
    # gained at most 0.005 AU-PRO once they train that long), bf16 autocast where native. The
    # paper's three relative scales at 1.5 fits' cost: p=17 at 256² for fine texture, p=17 and
    # p=33 on the images reduced to 128² for the objects' larger structure; no p=65 (docs/usage.md,
    # "Presets"; docs/quality.md, "The students' schedule and budget", "More steps, fewer
    # students" and "The fast preset with scales at two image sizes").
    "fast": {"image_size": 256, "epochs": 3, "min_steps": 900, "n_students": 2, "lr": 1e-3,
             "lr_schedule": "cosine", "crop_size": 64, "batch_size": 4, "precision": "auto",
             "patch_sizes": [17, "17@128", "33@128"]},
}


class StudentSettings(_Section):
    """``stad fit-students`` (docs/method.md §4)."""

    preset: Literal["paper", "fast"] = "paper"
    patch_sizes: list[int | str] = Field(
        default=list(PATCH_SIZES), description="the scales: patch sizes at image_size (17), or "
        "at a smaller divisor of it (17@128: the images reduced to 128² for that scale)")
    n_students: int = Field(default=3, ge=2, description="ensemble size M (≥ 2 for a variance)")
    image_size: int = Field(default=256, ge=17, le=MAX_IMAGE_SIZE)
    epochs: int = Field(default=100, ge=1)
    min_steps: int = Field(
        default=0, ge=0, description="more epochs when an epoch has few steps: every scale "
        "trains at least this many optimizer steps")
    lr: float = Field(default=1e-4, gt=0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant", description="constant (the paper's), or cosine: a linear warm-up "
        "over the first 5 % of the steps, then a cosine decay to zero at the last step")
    weight_decay: float = Field(default=1e-5, ge=0)
    crop_size: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=1, ge=1)
    val_fraction: float = Field(default=0.1, ge=0, lt=1, description="held back for calibrate")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        default="fp32", description="auto: bf16 where the device computes it natively (a GPU "
        "with bf16 units, an AVX-512 CPU), else fp32 (emulated bf16 is ~20× slower)")
    checkpoint_every: int = Field(default=1, ge=1, description="epochs between checkpoints")

    _split = field_validator("patch_sizes", mode="before")(_split_scales)
    _check = field_validator("patch_sizes")(_check_scales)

    @property
    def scales(self) -> list[tuple[int, int | None]]:
        """(patch size, image size) of each scale, None for the model's ``image_size``."""
        return [parse_scale(v) for v in self.patch_sizes]

    @property
    def teacher_patch_sizes(self) -> list[int]:
        """The distinct patch sizes, one teacher each."""
        return sorted({p for p, _ in self.scales})

    @model_validator(mode="after")
    def _check_scale_sizes(self) -> StudentSettings:
        for v, (_, size) in zip(self.patch_sizes, self.scales, strict=True):
            if size is not None and not scale_size_fits(size, self.image_size):
                raise ValueError(f"students.patch_sizes {v}: the image size of a scale must be "
                                 f"a smaller divisor of students.image_size "
                                 f"{self.image_size} (write {str(v).split('@')[0]} for a scale at "
                                 f"{self.image_size}²)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        preset = data.get("preset", "paper")
        values = STUDENT_PRESETS.get(preset) if isinstance(preset, str) else None
        if values is None:
            return data  # the Literal check reports the bad name
        if "epochs" in data and "min_steps" not in data:
            values = {**values, "min_steps": 0}  # epochs given: exactly that many
        if "image_size" in data and "patch_sizes" not in data:
            values = {**values, "patch_sizes": preset_scales_at(preset, data["image_size"])}
        return {**values, **data}


def preset_scales_at(preset: str, image_size: Any) -> list[Any]:
    """A preset's scales for an image size the user gives: a scale at a smaller size keeps
    its share of the image (the fast preset's ``17@128`` of 256² becomes ``17@64`` at 128²).
    ValueError, naming the size, where such a scale cannot follow it."""
    values = STUDENT_PRESETS[preset]
    scales = list(values.get("patch_sizes", PATCH_SIZES))
    try:  # read as the image_size field reads it ("128" from the environment)
        size = TypeAdapter(int).validate_python(image_size)
    except ValidationError:
        return scales  # the image_size field reports it
    out: list[Any] = []
    for v in scales:
        p, own = parse_scale(v)
        if own is None:
            out.append(v)
            continue
        factor = values["image_size"] // own
        if size % factor or not scale_size_fits(size // factor, size):
            raise ValueError(
                f"students.image_size {size}: the {preset} preset's scale {v} works at "
                f"1/{factor} of the image size: "
                f"give an image size that is a multiple of {factor} and at least "
                f"{factor * MIN_SCALE_SIZE}, or give students.patch_sizes")
        out.append(f"{p}@{size // factor}")
    return out


SMOOTH_SIGMA_SHARE = 1 / 64
"""``calibrate.smooth_sigma = "auto"`` (the default) is the model's image size times this: 2
pixels at 128², 4 at the presets' 256², 1 at the demo's 64², so the smoothing covers the
same share of the image at every resolution. Measured on the real-photo sets
(docs/quality.md, "Smoothing the maps")."""


TtaName = Literal["none", "hflip", "vflip", "flips", "dihedral"]
"""The names of ``calibrate.tta``'s sets of views (:data:`stad.model.TTA` defines them)."""


class CalibrateSettings(_Section):
    """``stad calibrate`` (docs/method.md §5)."""

    threshold_method: Literal["fpr", "f1", "manual"] = "fpr"
    target_fpr: float = Field(default=0.01, gt=0, lt=1)
    threshold: float | None = Field(default=None, allow_inf_nan=False)
    normalize: Literal["global", "position"] = Field(
        default="position", description="standardize e and v per pixel position (default) "
        "or with one mean and spread per scale (global, the paper's); docs/model.md")
    target_pixel_fpr: float = Field(
        default=0.001, gt=0, lt=1, description="the pixel threshold (defect regions and "
        "masks) lets at most this share of the normal images' pixels above it")
    smooth_sigma: float | Literal["auto"] = Field(
        default="auto", description="σ in pixels of the model's image size of the Gaussian "
        "that smooths each scale's map before the fusion (0: none, the paper's; auto: the "
        "image size / 64); docs/model.md")
    variance_weight: float = Field(
        default=0.0, ge=0, le=1, allow_inf_nan=False, description="w in each scale's score "
        "ẽ + w·ṽ: 0 scores by the students' regression error alone (the default, measured "
        "better on every real-photo set), 1 adds their predictive variance as the paper does; "
        "docs/model.md")
    tta: TtaName = Field(
        default="none", description="test-time augmentation: average each scale's error and "
        "variance over these views of the image (hflip: and its left-right mirror; vflip: "
        "upside down; flips: both mirrors and the turn by 180°; dihedral: also the turns by "
        "90°), here and in every map scored with this calibration; only for images whose "
        "normal look does not change under them (textures); docs/model.md")

    @field_validator("smooth_sigma", mode="before")
    @classmethod
    def _sigma(cls, value: Any) -> Any:
        # One message for both kinds of value (a union would report one error per member).
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            sigma = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            sigma = math.nan
        if not 0 <= sigma <= 64:  # also refuses NaN
            raise ValueError("should be 'auto' or a σ in pixels from 0 to 64")
        return sigma


class ScoreSettings(_Section):
    """``stad score``: how a map becomes an image score, and how maps are computed (these
    also apply to ``stad calibrate`` and ``stad evaluate``; docs/usage.md, "Speed and memory")."""

    image_score: Literal["max", "topk_mean"] = Field(
        default="topk_mean", description="how a map becomes an image score: the mean of its "
        "top topk_fraction of pixels (the default, measured better than the maximum on the "
        "real-photo sets) or its maximum (max, as docs/method.md §5 has it); docs/model.md")
    topk_fraction: float = Field(default=0.01, gt=0, le=1)
    min_region_area: int = Field(
        default=1, ge=1, description="defect regions smaller than this many pixels (of the "
        "image) are left out of records")
    batch_size: int = Field(default=4, ge=1, description="images per network pass")
    tile_size: int | None = Field(
        default=512, ge=64,
        description="images larger than this (at the model's image size) are scored in "
        "exact overlapping tiles; None: never tiled")
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32", description="bf16: autocast, about 2× faster on CPU, not exact")
    fused: bool = Field(
        default=False, description="a scale's networks as one grouped-conv network "
        "(slower on CPU, measured in docs/benchmarks.md)")

    @field_validator("tile_size", mode="before")
    @classmethod
    def _no_tiling(cls, value: Any) -> Any:
        # 0 (or "none") turns tiling off: TOML and the environment cannot spell None.
        return None if value in (0, "0") or str(value).lower() == "none" else value


class EvaluateSettings(_Section):
    """``stad evaluate`` (docs/method.md §6)."""

    fpr_limit: float = Field(default=0.3, gt=0, le=1)


class Settings(_Section):
    """All settings of stad; see the module docstring for where they come from."""

    dataset: str = "mvtec"
    root: Path | None = None
    category: str | None = None
    seed: int = Field(default=0, ge=0, le=2**63 - 1,
                      description="the random streams' seed, a whole number in [0, 2⁶³)")
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
                        description="auto, cpu, cuda or cuda:N (the GPU numbered N)")
    teacher: TeacherSettings = TeacherSettings()
    students: StudentSettings = StudentSettings()
    calibrate: CalibrateSettings = CalibrateSettings()
    score: ScoreSettings = ScoreSettings()
    evaluate: EvaluateSettings = EvaluateSettings()

    _root_path = field_validator("root", mode="before")(_nonempty_path)

    @field_validator("category")
    @classmethod
    def _folder_name(cls, value: str | None) -> str | None:
        # A shell completes a folder as `bottle/`: the category is the folder's name.
        return value.rstrip("/") or value if value is not None else None


SECTIONS = ("teacher", "students", "calibrate", "score", "evaluate")


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML config file; errors name the file."""
    try:
        return tomllib.loads(read_regular_file(path, allow_fifo=True).decode("utf-8"))
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except UnicodeDecodeError:
        raise UsageError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays recursively
        raise UsageError(f"config file {path} nests arrays or tables too deeply to be a "
                         "stad config") from None
    except OSError as exc:
        raise UsageError(f"config file {path} cannot be read: {exc.strerror}") from None


def env_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings from ``STAD_*`` variables; ``STAD_TABLE__KEY`` sets a key of a table.

    ``STAD_CONFIG`` (the config file), ``STAD_DEBUG`` and ``STAD_CACHE`` are options, not
    settings, and are skipped; any other unknown ``STAD_*`` variable is reported by validation.
    """
    out: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_OPTIONS:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if "__" in key:
            table, sub = key.split("__", 1)
            node = out.setdefault(table, {})
            if not isinstance(node, dict):
                plain = f"{ENV_PREFIX}{table.upper()}"
                raise UsageError(f"{plain} and {name} are both set: '{table}' is a table of "
                                 f"settings; unset {plain}")
            node[sub] = value
        elif isinstance(out.get(key), dict):
            raise UsageError(f"{name} and {ENV_PREFIX}{key.upper()}__* are both set: '{key}' "
                             f"is a table of settings; unset {name}")
        else:
            out[key] = value
    return out


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def resolve_settings(
    flags: Mapping[str, Any] | None = None,
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge the sources (flags > environment > file > defaults) and validate.

    Args:
        flags: values given on the command line, nested like the TOML file; ``None`` values
            (options not given) are dropped so that they do not hide lower sources.
        config_file: a TOML file, or ``None`` to use ``$STAD_CONFIG`` if set.
        environ: the environment (``os.environ`` by default).

    Raises:
        UsageError: a file that does not parse, an unknown key or a value of the wrong type.
    """
    environ = os.environ if environ is None else environ
    if config_file is None and "STAD_CONFIG" in environ:
        if not environ["STAD_CONFIG"].strip():  # a CI variable that never arrived
            raise UsageError("STAD_CONFIG is set but empty: name the config file, or unset it")
        config_file = Path(environ["STAD_CONFIG"])
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if config_file is not None:
        layers.append((f"config file {config_file}", read_config_file(config_file)))
    layers.append(("environment", env_settings(environ)))
    layers.append(("command line", _drop_none(flags or {})))
    return _validated(layers)


def _validated(layers: list[tuple[str, Mapping[str, Any]]]) -> Settings:
    """The layers merged in order (later ones win) and validated; a bad value is a usage
    error naming the layer it came from."""
    merged: dict[str, Any] = {}
    for _, layer in layers:
        merged = _merge(merged, layer)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise UsageError(_describe(exc, layers)) from None


def settings_from(values: Mapping[str, Any], source: str = "arguments") -> Settings:
    """Settings from nested values taken as given (None included: ``tile_size=None`` means
    never tiled), validated like :func:`resolve_settings`, without environment or file."""
    return _validated([(source, values)])


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, merging nested tables at every depth."""
    return _merge(dict(base), top)


def _drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            inner = _drop_none(value)
            if inner:
                out[key] = inner
        elif value is not None:
            out[key] = value
    return out


def _env_names(layer: Mapping[str, Any], loc: list[str]) -> list[str]:
    """The ``STAD_*`` variables that set ``loc`` (every key under it, for a table)."""
    node: Any = layer
    for depth, part in enumerate(loc):
        if not isinstance(node, Mapping):  # an item of the variable's value
            return [ENV_PREFIX + "__".join(loc[:depth]).upper()]
        node = node[part]
    if not isinstance(node, Mapping):
        return [ENV_PREFIX + "__".join(loc).upper()]
    return [name for key in node for name in _env_names(layer, [*loc, key])]


def _known_keys(loc: list[str]) -> str:
    """What to write instead of the unknown key at ``loc``: the nearest keys its table takes
    (or all of them), for the command line and Python alike."""
    def table(annotation: Any) -> type[BaseModel] | None:
        ok = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        return annotation if ok else None

    section: type[BaseModel] | None = Settings
    for part in loc[:-1]:
        field = section.model_fields.get(part) if section is not None else None
        section = table(field.annotation) if field is not None else None
    if section is None:
        return ""
    keys = sorted(section.model_fields)
    if len(loc) == 1:  # a table's key given at the top level (`epochs=3` to fit_students)
        tables = [name for name, field in Settings.model_fields.items()
                  if (model := table(field.annotation)) is not None
                  and loc[0] in model.model_fields]
        if tables:
            first = tables[0]
            return (f"; it belongs in a table: {' or '.join(f'{t}.{loc[0]}' for t in tables)} "
                    f"(in Python {first}={{'{loc[0]}': ...}}, in a config file under "
                    f"[{first}])")
    near = difflib.get_close_matches(loc[-1], keys, n=3)
    where = f"'{'.'.join(loc[:-1])}'" if len(loc) > 1 else "the top level"
    return (f"; did you mean {' or '.join(repr(k) for k in near)}?" if near
            else f"; {where} takes {', '.join(keys)}")


def _describe(exc: ValidationError, layers: list[tuple[str, Mapping[str, Any]]]) -> str:
    """One line per problem, naming the key and where its value came from."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
        key = ".".join(loc)
        source, layer = next(((name, layer) for name, layer in reversed(layers)
                              if _has(layer, loc)), ("defaults", {}))
        if source == "environment":  # the variable itself, as the user typed it
            source = f"environment variable {', '.join(_env_names(layer, loc))}"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown setting '{key}' (from {source}){_known_keys(loc)}")
        else:
            value = json.dumps(err.get("input"), default=str)
            message = err["msg"].removeprefix("Value error, ")  # our validators' own words
            parts.append(f"setting '{key}' = {value} (from {source}): {message}")
    return "; ".join(parts)


def _has(layer: Mapping[str, Any], loc: list[str]) -> bool:
    node: Any = layer
    for part in loc:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            return False
    return True
