"""Bad inputs and their exit codes: the table of docs/bad-inputs.md, and the rows no other test
file covers.

The first tests check the table itself: every ``tests/FILE.py::test_name`` it cites exists, and
every exit code it gives is one of docs/exit-codes.md. The others run the commands as a user
does (``typer.testing.CliRunner`` on ``stad.cli.app``) on a tiny synthetic category and one
model fitted once for this module (32 px, p = 17, 2 students, 1 epoch, random teacher).
"""

from __future__ import annotations

import ast
import errno
import functools
import importlib.metadata as md
import io
import json
import os
import re
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as st_save
from support import FAILS_HALF_WAY, FAILS_LISTING
from typer.testing import CliRunner, Result

import stad.datasets.registry as registry
import stad.fsutil as fsutil
from stad.artifacts import FORMAT_VERSION
from stad.cli import app
from stad.datasets.synthetic import generate
from stad.errors import (
    EXIT_ANOMALY,
    EXIT_ARTIFACT,
    EXIT_DATA,
    EXIT_OK,
    EXIT_PLUGIN,
    EXIT_SKIPPED,
    EXIT_USAGE,
    DataError,
)
from stad.images import MAX_PIXELS

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "docs" / "bad-inputs.md"
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


# ---- the table in docs/bad-inputs.md -----------------------------------------------------------


@dataclass(frozen=True)
class Row:
    cells: list[str]
    code: str
    tests: list[tuple[str, str]]


def _rows() -> list[Row]:
    """Body rows of every table in docs/bad-inputs.md whose header has 'exit' and 'checked by'."""
    rows: list[Row] = []
    header: list[str] | None = None
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if set("".join(cells)) <= set("-: "):
            continue  # the separator under the header
        if "exit" in header and "checked by" in header:
            assert len(cells) == len(header), line
            code = cells[header.index("exit")]
            rows.append(Row(cells, code, TEST_REF.findall(cells[header.index("checked by")])))
    return rows


def _documented_codes() -> set[int]:
    text = (REPO / "docs" / "exit-codes.md").read_text(encoding="utf-8")
    return {int(c) for c in re.findall(r"^\|\s*(\d+)\s*\|", text, flags=re.M)}


@functools.cache
def _test_names(path: Path) -> frozenset[str]:
    """Test functions of a file, at module level or in a class (parametrized ids not included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and \
                node.name.startswith("test_"):
            names.add(node.name)
    return frozenset(names)


def test_table_rows_cite_existing_tests() -> None:
    rows = _rows()
    assert len(rows) >= 30, "docs/bad-inputs.md lost its table"
    for row in rows:
        assert row.tests, f"row without a test: {row.cells[0]}"
        for file, name in row.tests:
            path = REPO / file
            assert path.is_file(), f"{row.cells[0]}: {file} does not exist"
            assert name in _test_names(path), f"{row.cells[0]}: {file} has no {name}"


def test_table_exit_codes_are_documented() -> None:
    documented = _documented_codes()
    assert {0, 1, 2, 3, 4, 5, 6, 10, 130} <= documented  # the parse found the table
    for row in _rows():
        assert row.code.isdigit() and int(row.code) in documented, (row.cells[0], row.code)


def test_every_test_here_is_in_the_table() -> None:
    cited = {name for row in _rows() for file, name in row.tests
             if file == "tests/test_bad_inputs.py"}
    own = {"test_table_rows_cite_existing_tests", "test_table_exit_codes_are_documented",
           "test_every_test_here_is_in_the_table"}
    assert _test_names(Path(__file__)) - own == cited


# ---- helpers and the shared model --------------------------------------------------------------

DATA = ["--dataset", "synthetic", "--category", "grain"]
FIT = ["--patch-sizes", "17", "--epochs", "1", "--image-size", "32", "--students", "2",
       "--preset", "fast"]


def _clean_env() -> dict[str, str | None]:
    # CliRunner removes variables given as None: the user's STAD_* settings stay out.
    return {k: None for k in os.environ if k.startswith("STAD_") and k != "STAD_CACHE"}


def _run(*args: object, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], env={**_clean_env(), **(env or {})})


def _expect(result: Result, code: int) -> Result:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    if code not in (EXIT_OK, EXIT_SKIPPED, EXIT_ANOMALY):
        lines = result.stderr.strip().splitlines()
        assert lines and lines[-1].startswith("stad: error:"), result.stderr
    return result


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class Fitted:
    data: Path  # synthetic root holding 'grain' (only read by the tests)
    model: Path  # calibrated
    uncalibrated: Path
    image: Path  # one good test image


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Fitted:
    """A tiny calibrated model and its data, made once for this module; tests only read them."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    data = tmp / "data"
    generate(data, categories=["grain"], image_size=32, n_train=6, n_val=2, n_test_good=2,
             n_test_per_defect=1, seed=1)
    uncalibrated = tmp / "uncalibrated.safetensors"
    _expect(_run("fit-students", *DATA, "--root", data, "--teacher", "random", *FIT,
                 "--out", uncalibrated), EXIT_OK)
    model = tmp / "model.safetensors"
    shutil.copy(uncalibrated, model)
    _expect(_run("calibrate", "--model", model), EXIT_OK)
    return Fitted(data, model, uncalibrated, data / "grain" / "test" / "good" / "000.png")


def _png_bytes(size: int = 32, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3),
                                                         dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ---- images given to score ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["zero-byte", "truncated", "text"])
def test_unreadable_image_given_to_score(fitted: Fitted, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "bad.png"
    data = {"zero-byte": b"", "truncated": _png_bytes()[:200],
            "text": b"this is not an image\n"}[kind]
    path.write_bytes(data)
    result = _expect(_run("score", "--model", fitted.model, path), EXIT_DATA)
    assert str(path) in result.stderr


@pytest.mark.parametrize("side", [20_000, 40_000])
def test_image_header_claiming_too_many_pixels(fitted: Fitted, tmp_path: Path,
                                               side: int) -> None:
    # A valid PNG signature and IHDR (CRCs right) for side² pixels, and no pixel data: Pillow
    # warns above MAX_PIXELS and refuses above twice that; stad refuses both before decoding.
    assert side * side > MAX_PIXELS

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))

    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(
        ">IIBBBBB", side, side, 8, 2, 0, 0, 0)) + chunk(b"IEND", b""))
    result = _expect(_run("score", "--model", fitted.model, path), EXIT_DATA)
    assert "bomb.png" in result.stderr


def test_non_image_file_named_on_the_command_line(fitted: Fitted, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("camera 3\n")
    result = _expect(_run("score", "--model", fitted.model, notes), EXIT_DATA)
    assert "notes.txt" in result.stderr


def test_non_image_files_in_a_folder_are_skipped_silently(fitted: Fitted,
                                                          tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(fitted.image, folder / "a.png")
    (folder / "notes.txt").write_text("camera 3\n")
    (folder / "Thumbs.db").write_bytes(b"\0" * 16)
    (folder / ".hidden.png").write_bytes(b"")  # hidden: skipped although its suffix is .png
    result = _expect(_run("score", "--model", fitted.model, "--json", folder), EXIT_OK)
    assert [Path(r["path"]).name for r in _jsonl(result.stdout)] == ["a.png"]
    for name in ("notes.txt", "Thumbs.db", ".hidden.png"):
        assert name not in result.stderr


def test_links_in_a_scored_folder_are_followed_and_a_broken_one_reported(
        fitted: Fitted, tmp_path: Path) -> None:
    # A CI gate scored only the folder's own files: a linked folder of images was left out
    # without a word (exit 0 where its anomalous image gave 10), and so was a broken link.
    parts = tmp_path / "parts"
    parts.mkdir()
    shutil.copy(fitted.image, parts / "b.png")
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(fitted.image, folder / "a.png")
    (folder / "linked").symlink_to(parts, target_is_directory=True)
    (folder / "up").symlink_to(tmp_path, target_is_directory=True)  # a loop: in/up/in/...
    result = _expect(_run("score", "--model", fitted.model, "--json", folder), EXIT_OK)
    scored = sorted(Path(r["path"]).relative_to(folder).as_posix()
                    for r in _jsonl(result.stdout))
    assert scored == ["a.png", "linked/b.png"]  # each folder once, whichever way it is reached
    (folder / "gone.png").symlink_to(tmp_path / "deleted.png")
    result = _expect(_run("score", "--model", fitted.model, folder), EXIT_DATA)
    assert "gone.png" in result.stderr
    result = _expect(_run("score", "--model", fitted.model, "--on-error", "skip", folder),
                     EXIT_SKIPPED)
    assert "gone.png" in result.stderr


def test_a_maps_folder_inside_a_scored_folder_is_not_scored(fitted: Fitted,
                                                           tmp_path: Path) -> None:
    # Scored on the next run, its heat maps and overlays turned a passing gate into exit 10.
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(fitted.image, folder / "a.png")
    for _ in range(2):
        result = _expect(_run("score", "--model", fitted.model, "--json", "--maps",
                              folder / "maps", folder), EXIT_OK)
        assert [Path(r["path"]).name for r in _jsonl(result.stdout)] == ["a.png"]
    assert len(list((folder / "maps").iterdir())) >= 2


def test_folder_without_images_given_to_score(fitted: Fitted, tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here\n")
    result = _expect(_run("score", "--model", fitted.model, folder), EXIT_DATA)
    assert "no image files" in result.stderr


def test_missing_input_given_to_score(fitted: Fitted, tmp_path: Path) -> None:
    result = _expect(_run("score", "--model", fitted.model, tmp_path / "nowhere.png"), EXIT_DATA)
    assert "does not exist" in result.stderr


def test_images_smaller_than_the_patch_are_scored(fitted: Fitted, tmp_path: Path) -> None:
    # p = 17 is the model's largest patch size; every image is resized to the model's image
    # size (32 here) and the network pads the border, so any image of at least 1×1 is scored
    # and its map comes back at the image's own size.
    rng = np.random.default_rng(3)
    sizes = [(1, 1), (5, 5), (16, 16), (1, 40)]
    paths = []
    for h, w in sizes:
        path = tmp_path / f"tiny_{h}x{w}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    maps = tmp_path / "maps"
    result = _expect(_run("score", "--model", fitted.model, "--json", "--maps", maps, *paths),
                     EXIT_OK)
    records = _jsonl(result.stdout)
    assert [Path(r["path"]).name for r in records] == [p.name for p in paths]
    for record, shape in zip(records, sizes, strict=True):
        assert np.isfinite(record["score"])
        assert np.asarray(Image.open(record["map"])).shape == shape


def test_fail_on_anomaly_wins_over_skipped_inputs(fitted: Fitted, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(fitted.image, folder / "a.png")
    (folder / "b.png").write_bytes(b"")
    args = ["score", "--model", fitted.model, "--on-error", "skip", folder]
    _expect(_run(*args, "--threshold", "1e9", "--fail-on-anomaly"), EXIT_SKIPPED)
    result = _expect(_run(*args, "--threshold", "-1e9", "--fail-on-anomaly"), EXIT_ANOMALY)
    assert "b.png" in result.stderr


@pytest.mark.parametrize("command", ["pretrain-teacher", "fit-students"])
def test_unreadable_training_image(fitted: Fitted, tmp_path: Path, command: str) -> None:
    data = tmp_path / "data"
    shutil.copytree(fitted.data, data)
    bad = data / "grain" / "train" / "good" / "002.png"
    bad.write_bytes(bad.read_bytes()[:100])
    extra = {"pretrain-teacher": ["--patch-sizes", "17", "--iterations", "2"],
             "fit-students": ["--teacher", "random", *FIT]}[command]
    result = _expect(_run(command, *DATA, "--root", data, *extra, "--out",
                          tmp_path / "out.safetensors",
                          env={"STAD_TEACHER__IMAGE_SIZE": "32"}), EXIT_DATA)
    assert "002.png" in result.stderr


# ---- masks, read by evaluate -------------------------------------------------------------------


@pytest.mark.parametrize("problem", ["size", "not binary"])
def test_bad_mask_given_to_evaluate(fitted: Fitted, tmp_path: Path, problem: str) -> None:
    data = tmp_path / "data"
    shutil.copytree(fitted.data, data)
    mask = sorted((data / "grain" / "ground_truth").rglob("*.png"))[0]
    if problem == "size":
        Image.new("L", (16, 16), 255).save(mask)
        expected = "16×16"
    else:
        values = np.zeros((32, 32), np.uint8)
        values[:4], values[4:8] = 128, 255
        Image.fromarray(values).save(mask)
        expected = "not binary"
    result = _expect(_run("evaluate", "--model", fitted.model, "--root", data), EXIT_DATA)
    assert mask.name in result.stderr and expected in result.stderr



def test_a_normal_image_whose_mask_marks_anomalous_pixels(fitted: Fitted, tmp_path: Path) -> None:
    """A plugin may give normal images a mask; one that marks pixels contradicts the label and
    would count those pixels as missed defects."""
    from stad.api import load_model
    from stad.config import Settings
    from stad.datasets.base import Sample
    from stad.evaluation import collect

    mask = tmp_path / "mask.png"
    values = np.zeros((32, 32), np.uint8)
    values[:2, :3] = 255
    Image.fromarray(values).save(mask)
    model = load_model(fitted.model, device="cpu")
    sample = Sample(image=fitted.image, mask=mask, label="normal", split="test")
    with pytest.raises(DataError) as info:
        collect(model.networks, [sample], Settings(), device=model.device)
    assert str(info.value) == (f"mask {mask} of the normal image {fitted.image} marks 6 pixel(s) "
                               "anomalous; a normal image's mask must be all zero (or none)")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(mask)  # an empty mask is fine
    (item,) = collect(model.networks, [sample], Settings(), device=model.device)
    assert not item.mask.any()


# ---- artifacts ---------------------------------------------------------------------------------


def _damaged(kind: str, model: Path, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.safetensors"
    data = model.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "bit-flipped":
        flipped = bytearray(data)
        flipped[-1] ^= 0x01  # the last byte of tensor data
        path.write_bytes(bytes(flipped))
    elif kind == "newer format":
        path.write_bytes(st_save({"w": torch.zeros(2)}, metadata={
            "stad.kind": "model", "stad.format_version": str(FORMAT_VERSION + 1),
            "stad.version": "99.0"}))
    else:
        assert kind == "missing"
    return path


ARTIFACT_ARGS = {
    "score": ["score", "--model", "{artifact}", "{image}"],
    "calibrate": ["calibrate", "--model", "{artifact}", "--out", "{tmp}/out.safetensors"],
    "evaluate": ["evaluate", "--model", "{artifact}"],
    "fit-students": ["fit-students", *DATA, "--root", "{data}", "--teacher", "{artifact}",
                     "--out", "{tmp}/out.safetensors"],
    "pretrain-teacher": ["pretrain-teacher", *DATA, "--root", "{data}", "--patch-sizes", "17",
                         "--iterations", "1", "--init", "{artifact}",
                         "--out", "{tmp}/out.safetensors"],
}


@pytest.mark.parametrize("command", sorted(ARTIFACT_ARGS))
@pytest.mark.parametrize("kind", ["missing", "truncated", "bit-flipped", "newer format"])
def test_damaged_artifact(fitted: Fitted, tmp_path: Path, kind: str, command: str) -> None:
    artifact = _damaged(kind, fitted.model, tmp_path)
    args = [a.format(artifact=artifact, image=fitted.image, tmp=tmp_path, data=fitted.data)
            for a in ARTIFACT_ARGS[command]]
    result = _expect(_run(*args), EXIT_ARTIFACT)
    assert str(artifact) in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_model_given_as_teacher_is_accepted(fitted: Fitted, tmp_path: Path) -> None:
    # fit-students --teacher reads a teacher or a model artifact; from a model it reuses the
    # teachers (stad.model.resolve_teachers loads kind=("teacher", "model")).
    out = tmp_path / "refit.safetensors"
    _expect(_run("fit-students", *DATA, "--root", fitted.data, "--teacher", fitted.model, *FIT,
                 "--out", out), EXIT_OK)
    from safetensors.torch import load_file

    before, after = load_file(str(fitted.model)), load_file(str(out))
    names = [k for k in before if k.startswith("teacher.")]
    assert names and all(torch.equal(before[k], after[k]) for k in names)


def test_uncalibrated_model_given_to_evaluate(fitted: Fitted) -> None:
    result = _expect(_run("evaluate", "--model", fitted.uncalibrated), EXIT_USAGE)
    assert "stad calibrate" in result.stderr


# ---- settings and options ----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "named"), [
    ("[students]\nepochz = 3\n", "students.epochz"),
    ('[students]\nepochs = "ten"\n', "students.epochs"),
])
def test_bad_config_file_through_the_cli(fitted: Fitted, tmp_path: Path, text: str,
                                         named: str) -> None:
    config = tmp_path / "stad.toml"
    config.write_text(text, encoding="utf-8")
    result = _expect(_run("datasets", "show", *DATA, "--root", fitted.data, "--config", config),
                     EXIT_USAGE)
    assert named in result.stderr and str(config) in result.stderr


def test_stad_variable_of_the_wrong_type(fitted: Fitted) -> None:
    result = _expect(_run("datasets", "show", *DATA, "--root", fitted.data,
                          env={"STAD_STUDENTS__EPOCHS": "ten"}), EXIT_USAGE)
    assert "students.epochs" in result.stderr and "environment" in result.stderr


@pytest.mark.parametrize(("args", "named"), [
    (["calibrate", "--method", "manual"], "--threshold"),
    (["calibrate", "--method", "fpr", "--threshold", "1.5"], "--threshold"),
    (["calibrate", "--method", "manual", "--threshold", "1.5", "--target-fpr", "0.5"],
     "--target-fpr"),
    (["calibrate", "--method", "f1", "--target-fpr", "0.5"], "--target-fpr"),
    (["calibrate", "--method", "bogus"], "threshold_method"),
    (["calibrate", "--target-fpr", "2"], "target_fpr"),
    (["score", "--on-error", "maybe", "{image}"], "--on-error"),
    (["fit-students", "--root", "{data}", *DATA, "--teacher", "random", "--image-size", "8",
      "--out", "{tmp}/m.safetensors"], "image_size"),
    (["pretrain-teacher", "--root", "{data}", *DATA, "--patch-sizes", "17", "--iterations",
      "1", "--init", "random", "--out", "{tmp}/t.safetensors"], "teacher.init"),
])
def test_conflicting_or_bad_options(fitted: Fitted, tmp_path: Path, args: list[str],
                                    named: str) -> None:
    if args[0] not in ("fit-students", "pretrain-teacher"):
        args = [args[0], "--model", "{model}", *args[1:]]
    if args[0] == "calibrate":
        args = [*args, "--out", "{tmp}/calibrated.safetensors"]
    args = [a.format(model=fitted.model, image=fitted.image, data=fitted.data, tmp=tmp_path)
            for a in args]
    result = _expect(_run(*args), EXIT_USAGE)
    assert named in result.stderr
    assert not list(tmp_path.glob("*.safetensors"))


def test_option_of_the_wrong_type(fitted: Fitted, tmp_path: Path) -> None:
    # Typer's own parsing: it prints a usage box (not stad's one line) and exits 2.
    result = _run("fit-students", *DATA, "--root", fitted.data, "--teacher", "random",
                  "--epochs", "ten", "--out", tmp_path / "m.safetensors")
    assert result.exit_code == EXIT_USAGE and "--epochs" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args", [
    ["score", "--model", "{model}", "--maps=", "{image}"],
    ["score", "--model", "{model}", "--output", " ", "{image}"],
    ["score", "--model", "{model}", ""],
    ["calibrate", "--model", "{model}", "--out="],
    ["evaluate", "--model", "{model}", "--report="],
    ["merge-models", "{model}", ""],
    ["export", "--model", "{model}", "--out="],
    ["fit-students", *DATA, "--root=", "--teacher", "random"],
    ["fit-students", *DATA, "--root", "{data}", "--teacher", ""],
    ["pretrain-teacher", *DATA, "--root", "{data}", "--init", ""],
    ["datasets", "show", *DATA, "--config="],
])
def test_an_empty_file_or_folder_name_is_refused(fitted: Fitted, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 args: list[str]) -> None:
    # `--maps=$DIR` with DIR unset: read as Path(""), i.e. ".", the maps went into the
    # current folder and `--output ""` named it. Refused, and nothing is written there.
    monkeypatch.chdir(tmp_path)
    result = _run(*[a.format(model=fitted.model, image=fitted.image, data=fitted.data)
                    for a in args])
    assert result.exit_code == EXIT_USAGE, (result.output, result.exception)
    assert "empty" in result.stderr and "Traceback" not in result.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("env", "named"), [({"STAD_ROOT": ""}, "STAD_ROOT"),
                                            ({"STAD_CONFIG": ""}, "STAD_CONFIG"),
                                            ({"STAD_TEACHER__BACKBONE_WEIGHTS": " "},
                                             "STAD_TEACHER__BACKBONE_WEIGHTS")])
def test_an_empty_path_setting_is_refused(fitted: Fitted, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          env: dict[str, str], named: str) -> None:
    # STAD_ROOT= was read as ".": the synthetic adapter generated its data there.
    monkeypatch.chdir(tmp_path)
    result = _expect(_run("datasets", "show", *DATA, env=env), EXIT_USAGE)
    assert named in result.stderr and "empty" in result.stderr
    assert not list(tmp_path.iterdir())


def test_every_file_or_folder_parameter_refuses_an_empty_value() -> None:
    # A new Path option declared with typer.Option instead of cli._path_option would read ""
    # as "." again.
    import typing

    import stad.cli as cli
    commands = [c.callback for c in cli.app.registered_commands]
    commands += [c.callback for g in cli.app.registered_groups
                 for c in g.typer_instance.registered_commands]
    checked = 0
    for callback in commands:
        for name, hint in typing.get_type_hints(callback, include_extras=True).items():
            if typing.get_origin(hint) is not typing.Annotated:
                continue
            base, *meta = typing.get_args(hint)
            if "Path" in str(base):
                info = next(m for m in meta if hasattr(m, "parser"))
                assert info.parser is cli._path, f"{callback.__name__}: {name}"
                checked += 1
    assert checked >= 18


DEVICE_ARGS = {
    "score": ["score", "--model", "{model}", "{image}"],
    "calibrate": ["calibrate", "--model", "{model}", "--out", "{tmp}/out.safetensors"],
    "evaluate": ["evaluate", "--model", "{model}"],
    "fit-students": ["fit-students", *DATA, "--root", "{data}", "--teacher", "random",
                     "--out", "{tmp}/out.safetensors"],
    "pretrain-teacher": ["pretrain-teacher", *DATA, "--root", "{data}",
                         "--out", "{tmp}/out.safetensors"],
}


@pytest.mark.parametrize("command", sorted(DEVICE_ARGS))
def test_device_cuda_without_a_gpu(fitted: Fitted, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    # Pretend there is no GPU, so that this holds on GPU machines too.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = [a.format(model=fitted.model, image=fitted.image, data=fitted.data, tmp=tmp_path)
            for a in DEVICE_ARGS[command]]
    for how in ({"args": ["--device", "cuda"]}, {"env": {"STAD_DEVICE": "cuda"}},
                {"args": ["--device", "cuda:1"]}):
        result = _expect(_run(*args, *how.get("args", []), env=how.get("env")), EXIT_USAGE)
        assert "cuda" in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


# ---- bad inputs stad does not handle yet (exit 1 or 0 today; see docs/bad-inputs.md) ----------


def test_nan_threshold_is_refused(fitted: Fitted, tmp_path: Path) -> None:
    # NaN compares false with every score: no image could ever be judged anomalous.
    result = _expect(_run("score", "--model", fitted.model, "--threshold", "nan",
                          "--fail-on-anomaly", fitted.image), EXIT_USAGE)
    assert "threshold" in result.stderr
    out = tmp_path / "nan.safetensors"
    result = _expect(_run("calibrate", "--model", fitted.model, "--method", "manual",
                          "--threshold", "nan", "--out", out), EXIT_USAGE)
    assert "threshold" in result.stderr and not out.exists()


@pytest.mark.parametrize("command", ["score --maps", "evaluate --report", "calibrate --out",
                                     "fit-students --out"])
def test_output_path_under_a_file(fitted: Fitted, tmp_path: Path, command: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    target = blocker / "inside"
    args = {
        "score --maps": ["score", "--model", fitted.model, "--maps", target, fitted.image],
        "evaluate --report": ["evaluate", "--model", fitted.model, "--report", blocker],
        "calibrate --out": ["calibrate", "--model", fitted.model, "--out",
                            target / "m.safetensors"],
        "fit-students --out": ["fit-students", *DATA, "--root", fitted.data, "--teacher",
                               "random", *FIT, "--out", target / "m.safetensors"],
    }[command]
    result = _expect(_run(*args), EXIT_USAGE)
    assert "a-file" in result.stderr


def test_output_path_that_is_a_folder(fitted: Fitted, tmp_path: Path) -> None:
    folder = tmp_path / "taken"
    folder.mkdir()
    result = _expect(_run("calibrate", "--model", fitted.model, "--out", folder), EXIT_USAGE)
    assert "taken" in result.stderr and folder.is_dir()


def test_a_full_disk_is_a_one_line_error_naming_the_output(
        fitted: Fitted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "calibrated.safetensors"
    out.write_bytes(b"the earlier file")

    def full(path: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsutil, "_fsync_file", full)
    result = _expect(_run("calibrate", "--model", fitted.model, "--out", out), EXIT_USAGE)
    assert "calibrated.safetensors" in result.stderr and "No space left" in result.stderr
    assert out.read_bytes() == b"the earlier file"
    assert [p.name for p in tmp_path.iterdir()] == ["calibrated.safetensors"]


def test_a_full_disk_while_score_writes_its_records(
        fitted: Fitted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `--output` is appended to in place, not replaced: the records before the failing one
    # stay, and --skip-existing goes on from them once there is space again.
    import stad.commands.score as score_mod

    images = tmp_path / "in"
    images.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        shutil.copy(fitted.image, images / name)
    out = tmp_path / "records.jsonl"

    class Disk(io.FileIO):  # the file system: room for the first record and 9 more bytes
        room = -1

        def write(self, data) -> int:  # type: ignore[override]
            if Disk.room < 0:
                Disk.room = len(data) + 9
            if Disk.room == 0:  # and for every later try, closing the file too
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n = min(len(data), Disk.room)
            Disk.room -= n
            return super().write(bytes(data[:n]))

    monkeypatch.setattr(score_mod, "open", lambda path, mode, encoding: io.TextIOWrapper(
        io.BufferedWriter(Disk(path, mode)), encoding=encoding), raising=False)
    result = _expect(_run("score", "--model", fitted.model, "--output", out, images),
                     EXIT_USAGE)
    assert "records.jsonl" in result.stderr and "No space left" in result.stderr
    assert "--skip-existing" in result.stderr
    monkeypatch.undo()
    _expect(_run("score", "--model", fitted.model, "--output", out, "--skip-existing", images),
            EXIT_OK)
    names = sorted(Path(r["path"]).name for r in _jsonl(out.read_text()) if "path" in r)
    assert names == ["a.png", "b.png", "c.png"]


def test_score_output_naming_the_model_is_refused(fitted: Fitted, tmp_path: Path) -> None:
    # `--output` is JSON Lines: written over the model, it would destroy it.
    model = tmp_path / "model.safetensors"
    shutil.copy(fitted.model, model)
    result = _expect(_run("score", "--model", model, "--output", model, fitted.image),
                     EXIT_USAGE)
    assert "--model" in result.stderr and model.read_bytes() == fitted.model.read_bytes()


def test_an_output_folder_without_write_permission(fitted: Fitted, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # As root every folder is writable, so the permission is taken away by a stand-in.
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(fsutil.os, "access", lambda path, mode, **kw: (
        not (Path(path) == locked and mode & os.W_OK) and real(path, mode, **kw)))
    for args in (["score", "--model", fitted.model, "--output", locked / "s.jsonl",
                  fitted.image],
                 ["calibrate", "--model", fitted.model, "--out", locked / "m.safetensors"],
                 ["score", "--model", fitted.model, "--maps", locked, fitted.image]):
        result = _expect(_run(*args), EXIT_USAGE)
        assert "locked" in result.stderr and "permission" in result.stderr
    assert not list(locked.iterdir())


def test_seed_out_of_range(fitted: Fitted, tmp_path: Path) -> None:
    for seed in ("-1", str(2**63), "99999999999999999999999"):
        result = _expect(_run("fit-students", *DATA, "--root", fitted.data, "--teacher",
                              "random", *FIT, "--seed", seed, "--out", tmp_path / "m.safetensors"),
                         EXIT_USAGE)
        assert "seed" in result.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_maps_of_images_with_the_same_name_are_kept_apart(fitted: Fitted,
                                                          tmp_path: Path) -> None:
    # Two categories' test folders hold the same file names, and a.png and a.bmp share a
    # stem: each image must get its own maps, and each record must point at its own.
    inputs = [tmp_path / "x" / "test" / "good" / "000.png",
              tmp_path / "y" / "test" / "good" / "000.png",
              tmp_path / "x" / "test" / "good" / "000.bmp"]
    for i, path in enumerate(inputs):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.open(io.BytesIO(_png_bytes(seed=i))).save(path)
    result = _expect(_run("score", "--model", fitted.model, "--json", "--maps",
                          tmp_path / "maps", *inputs), EXIT_OK)
    records = _jsonl(result.stdout)
    assert [r["path"] for r in records] == [str(p) for p in inputs]
    maps = [r["map"] for r in records]
    assert len(set(maps)) == 3
    written = [np.asarray(Image.open(m)) for m in maps]  # three images, three maps
    assert all(w.shape == (32, 32) for w in written)
    assert not any(np.array_equal(written[i], written[j]) for i, j in ((0, 1), (0, 2), (1, 2)))
    assert len(list((tmp_path / "maps").glob("*_map.tiff"))) == 3


def test_config_file_nested_too_deeply(fitted: Fitted, tmp_path: Path) -> None:
    config = tmp_path / "deep.toml"
    config.write_text("a = " + "[" * 20000 + "]" * 20000 + "\n")
    result = _expect(_run("score", "--model", fitted.model, "--config", config, fitted.image),
                     EXIT_USAGE)
    assert "deep.toml" in result.stderr


def test_unreadable_dataset_folder(fitted: Fitted, monkeypatch: pytest.MonkeyPatch) -> None:
    # A folder without read permission is the data's fault (exit 3, named), not the adapter's.
    # As root every folder is readable, so listing it fails through a stand-in.
    blocked = fitted.data / "grain" / "test" / "good"
    real = Path.iterdir

    def iterdir(self: Path):
        if self == blocked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    result = _expect(_run("datasets", "show", "--dataset", "mvtec", "--root", fitted.data,
                          "--category", "grain"), EXIT_DATA)
    assert str(blocked) in result.stderr and "Permission denied" in result.stderr


def test_names_too_long_or_with_control_characters(fitted: Fitted, tmp_path: Path) -> None:
    long = "n" * 300
    result = _expect(_run("score", "--model", fitted.model, "--output", tmp_path / long,
                          fitted.image), EXIT_USAGE)
    assert "too long" in result.stderr
    _expect(_run("score", "--model", fitted.model, tmp_path / f"{long}.png"), EXIT_DATA)
    # the longest legal names can be written: their temporary and lock files' are cut short
    for legal in (tmp_path / ("m" * 240 + ".safetensors"),
                  tmp_path / ("\u00e9" * 120 + ".safetensors")):  # 252 bytes in UTF-8
        _expect(_run("calibrate", "--model", fitted.model, "--out", legal), EXIT_OK)
        assert legal.is_file()
    # a name with a newline and a tab cannot forge a line or a column of the output
    folder = tmp_path / "spoof"
    folder.mkdir()
    shutil.copy(fitted.image, folder / "part7.png\t0.0000\tok\nzz_.png")
    result = _expect(_run("score", "--model", fitted.model, folder), EXIT_OK)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].count("\t") == 2, lines
    assert lines[0].startswith(str(folder / "part7.png\\t0.0000\\tok\\nzz_.png"))


# ---- models altered by hand (metadata or tensors; the digest made valid) -----------------------

_DROP = object()


def _altered(model: Path, out: Path, *, calibration: dict | None = None, info: object = None,
             preprocessing: dict | None = None,
             tensors: dict[str, torch.Tensor | None] | None = None) -> Path:
    from dataclasses import replace

    from stad.artifacts import load_artifact, save_artifact

    artifact = load_artifact(model, kind="model")
    new_info = artifact.info if info is None else info
    if calibration is not None:
        merged = {**artifact.info["calibration"], **calibration}
        new_info = {**artifact.info, "calibration": {k: v for k, v in merged.items()
                                                     if v is not _DROP}}
    new_tensors = {**artifact.tensors, **(tensors or {})}
    save_artifact(out, replace(
        artifact, info=new_info, preprocessing={**artifact.preprocessing, **(preprocessing or {})},
        tensors={k: t for k, t in new_tensors.items() if t is not None}))
    return out


@pytest.mark.parametrize(("change", "named"), [
    ({"threshold": float("nan")}, "threshold"),
    ({"threshold": None}, "threshold"),
    ({"threshold": _DROP}, "threshold"),
    ({"threshold": "high"}, "threshold"),
    ({"topk_fraction": 5}, "topk_fraction"),
    ({"topk_fraction": _DROP}, "topk_fraction"),
    ({"image_score": "bogus"}, "image_score"),
    ({"pixel_threshold": "x"}, "pixel_threshold"),
])
def test_damaged_calibration_record(fitted: Fitted, tmp_path: Path, change: dict,
                                    named: str) -> None:
    # A threshold that is not a number would judge every image normal, exit 0.
    model = _altered(fitted.model, tmp_path / "m.safetensors", calibration=change)
    result = _expect(_run("score", "--model", model, "--json", "--fail-on-anomaly",
                          fitted.image), EXIT_ARTIFACT)
    assert named in result.stderr and "recalibrate" in result.stderr
    assert not result.stdout.strip()


@pytest.mark.parametrize("damage", ["student NaN", "teacher inf", "norm std 0",
                                    "preprocessing std 0", "preprocessing size",
                                    "info a list", "calibration a list", "norm std missing",
                                    "norm mean of another shape", "student misnamed"])
def test_model_with_non_finite_or_malformed_contents(fitted: Fitted, tmp_path: Path,
                                                     damage: str) -> None:
    # Written by hand with a valid digest: each would score NaN (or crash) without the checks.
    from stad.artifacts import load_artifact

    tensors = load_artifact(fitted.model).tensors

    def spoilt(prefix: str, value: float) -> dict[str, torch.Tensor | None]:
        name = next(k for k in sorted(tensors) if k.startswith(prefix))
        t = tensors[name].clone()
        t.view(-1)[0] = value
        return {name: t}

    kwargs = {
        "student NaN": {"tensors": spoilt("student.", float("nan"))},
        "teacher inf": {"tensors": spoilt("teacher.", float("inf"))},
        "norm std 0": {"tensors": spoilt("norm.p17.std", 0.0)},
        "preprocessing std 0": {"preprocessing": {"std": [0.2, 0.0, 0.2]}},
        "preprocessing size": {"preprocessing": {"image_size": "abc"}},
        "info a list": {"info": [1, 2]},
        "calibration a list": {"info": {"calibration": [1, 2]}},
        "norm std missing": {"tensors": {"norm.p17.std": None}},
        "norm mean of another shape": {"tensors": {"norm.p17.mean": torch.zeros(3)}},
        "student misnamed": {"tensors": {"student.pabc.0.convs.0.weight": torch.zeros(1)}},
    }[damage]
    model = _altered(fitted.model, tmp_path / "m.safetensors", **kwargs)
    result = _expect(_run("score", "--model", model, "--json", fitted.image), EXIT_ARTIFACT)
    assert not result.stdout.strip() and str(model) in result.stderr


# ---- plugins -----------------------------------------------------------------------------------






@pytest.mark.parametrize(("source", "args"), [
    (FAILS_LISTING, ["datasets", "show"]),  # no --category: stad lists the categories
    (FAILS_HALF_WAY, ["fit-students", "--category", "c", "--teacher", "random",
                      "--out", "{tmp}/m.safetensors"]),
])
def test_plugin_failing_in_a_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     source: str, args: list[str]) -> None:
    module = f"stadtest_bad_inputs_{os.getpid()}_{abs(hash(source)) % 10**8}"
    (tmp_path / f"{module}.py").write_text(source, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = md.EntryPoint(name="flaky", value=f"{module}:Adapter", group=registry.GROUP)
    monkeypatch.setattr(registry, "_entry_points", lambda: [entry])
    try:
        result = _expect(_run(*(a.format(tmp=tmp_path) for a in args), "--dataset", "flaky",
                              "--root", tmp_path), EXIT_PLUGIN)
    finally:
        sys.modules.pop(module, None)
    assert "'flaky'" in result.stderr
