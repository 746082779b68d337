"""Checkpoints, interruption and resuming (stad.training.checkpoint and its use by the two
trainings).

A stop is simulated without timing: ``StopFlag.poll`` is called exactly once per training step,
and a patched ``poll`` asks for the stop at a chosen step (once by sending the process a real
SIGINT, so the installed handler is exercised). The resumed run must end with the same tensors,
bit for bit, as an uninterrupted run: the same machine, fp32, one thread in every run.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from support import Notes
from typer.testing import CliRunner

import stad.training.students as students_mod
import stad.training.teacher as teacher_mod
from stad.artifacts import load_artifact, save_artifact
from stad.cli import app
from stad.commands.train import fit_students as fit
from stad.commands.train import pretrain_teacher
from stad.config import Settings, resolve_settings
from stad.datasets.synthetic import generate
from stad.errors import EXIT_INTERRUPTED, ArtifactError, Interrupted, TrainingError, UsageError
from stad.training.checkpoint import (
    Checkpoint,
    StopFlag,
    checkpoint_path,
    identity_differences,
    stop_on_signals,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Bit-identical results need the same reduction order in every run, the subprocess's too.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(root: Path, seed: int = 1) -> Path:
    generate(root, categories=["grain"], image_size=32, n_train=4, n_val=1, n_test_good=1,
             n_test_per_defect=1, seed=seed)
    return root


def _students(root: Path, **students: Any) -> Settings:
    # 4 fit images (the adapter's val split holds the fifth), batch 2: 2 steps per epoch. The
    # crops make every step draw from the epoch's generator, which a resume must replay; the
    # cosine schedule's rate depends on the step, which a resume must continue.
    values = {"patch_sizes": [17], "n_students": 2, "image_size": 24, "epochs": 2,
              "batch_size": 2, "crop_size": 12, "lr": 1e-3, "lr_schedule": "cosine",
              "checkpoint_every": 1, **students}
    return resolve_settings({"dataset": "synthetic", "root": root, "category": "grain",
                             "device": "cpu", "students": values}, environ={})


def _teacher(root: Path, **teacher: Any) -> Settings:
    values = {"patch_sizes": [17], "iterations": 4, "batch_size": 8, "image_size": 32,
              "checkpoint_every": 3, **teacher}
    return resolve_settings({"dataset": "synthetic", "root": root, "category": "grain",
                             "device": "cpu", "teacher": values}, environ={})


@contextmanager
def stop_at(step: int, *, real_signal: bool = False) -> Iterator[None]:
    """Inside the block, the run is asked to stop at its ``step``-th training step."""
    count = itertools.count(1)
    original = StopFlag.poll

    def poll(self: StopFlag) -> bool:
        if next(count) == step:
            if real_signal:
                os.kill(os.getpid(), signal.SIGINT)
                # Python runs the handler at the next bytecode boundary; wait for it (bounded).
                deadline = time.monotonic() + 10
                while not self.requested and time.monotonic() < deadline:
                    time.sleep(0.001)
            else:
                self.request(signal.SIGINT)
        return original(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StopFlag, "poll", poll)
        yield


@contextmanager
def saves() -> Iterator[list[str]]:
    """The ``where`` of every checkpoint saved inside the block."""
    seen: list[str] = []
    original = Checkpoint.save

    def save(self: Checkpoint, tensors: Any, progress: Any, *, where: str) -> None:
        seen.append(where)
        original(self, tensors, progress, where=where)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Checkpoint, "save", save)
        yield seen


def _info(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["stad.info"])


def assert_same_artifact(a: Path, b: Path, section: str) -> None:
    """Every tensor equal (torch.equal) and the same loss history; read with safetensors."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert sorted(ta) == sorted(tb)
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]
    ia, ib = _info(a)[section], _info(b)[section]
    if section == "students":
        assert ({k: v["loss_per_epoch"] for k, v in ia["scales"].items()}
                == {k: v["loss_per_epoch"] for k, v in ib["scales"].items()})
    else:
        assert ({k: v["curve"] for k, v in ia.items()} == {k: v["curve"] for k, v in ib.items()})


@pytest.fixture(scope="module")
def students_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Data and an uninterrupted fit of :func:`_students` (run with --resume and nothing to
    resume: it starts afresh with a note); its periodic checkpoint is gone afterwards."""
    tmp = tmp_path_factory.mktemp("reference")
    root = _data(tmp / "data")
    out = tmp / "model.safetensors"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    notes = Notes()
    try:
        with saves() as seen:
            result = fit(_students(root), teacher="random", out=out, resume=True,
                         reporter=notes)
    finally:
        torch.set_num_threads(threads)
    assert seen == ["p=17 after epoch 1 of 2"]  # every epoch but the last
    assert any("no checkpoint" in n and "starting afresh" in n for n in notes.notes), notes.notes
    assert result["resumed"] is False
    assert not checkpoint_path(out).exists()
    return root, out


# --- students ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("step", "where"), [
    (1, "p=17, epoch 1 of 2 after step 1 of 2"),  # in the middle of an epoch
    (2, "p=17 after epoch 1 of 2"),  # at an epoch boundary
    (3, "p=17, epoch 2 of 2 after step 1 of 2"),
])
def test_students_resume_to_the_same_weights(students_reference: tuple[Path, Path],
                                             tmp_path: Path, step: int, where: str) -> None:
    root, reference = students_reference
    out = tmp_path / "model.safetensors"
    ckpt = tmp_path / "model.ckpt.safetensors"
    with stop_at(step), pytest.raises(Interrupted) as info:
        fit(_students(root), teacher="random", out=out)
    message = str(info.value)
    assert f"stopped by SIGINT at {where}" in message
    assert str(ckpt) in message and "--resume" in message
    assert info.value.exit_code == EXIT_INTERRUPTED == 130
    assert ckpt.is_file() and not out.exists()
    saved = load_artifact(ckpt, kind="checkpoint")
    assert saved.info["where"] == where and saved.info["command"] == "fit-students"
    assert any(k.startswith("adam.p17.") for k in saved.tensors)
    with pytest.raises(ArtifactError, match="checkpoint artifact"):
        load_artifact(ckpt, kind="model")

    notes = Notes()
    result = fit(_students(root), teacher="random", out=out, resume=True, reporter=notes)
    assert result["resumed"] is True and any(where in n for n in notes.notes)
    assert not ckpt.exists()
    assert_same_artifact(reference, out, "students")


def test_students_resume_across_scales_and_twice(tmp_path: Path) -> None:
    root = _data(tmp_path / "data")
    settings = _students(root, patch_sizes=[17, 33], epochs=1)
    reference, out = tmp_path / "reference.safetensors", tmp_path / "model.safetensors"
    with saves() as seen:
        fit(settings, teacher="random", out=reference)
    assert seen == ["the end of scale p=17"]

    with stop_at(2), pytest.raises(Interrupted, match="at the end of scale p=17"):
        fit(settings, teacher="random", out=out)
    with stop_at(1), pytest.raises(Interrupted, match="p=33, epoch 1 of 1 after step 1 of 2"):
        fit(settings, teacher="random", out=out, resume=True)
    fit(settings, teacher="random", out=out, resume=True)
    assert not checkpoint_path(out).exists()
    assert_same_artifact(reference, out, "students")
    # the model's time counts the three runs (it counted the last alone), as its scales' do
    info = load_artifact(out, kind="model").info
    trained = sum(s["seconds"] for s in info["students"]["scales"].values())
    assert info["seconds"] >= trained - 0.1, (info["seconds"], trained)


def test_a_checkpoint_of_an_older_stad_counts_its_scales_seconds(tmp_path: Path) -> None:
    from stad.artifacts import Artifact
    from stad.training.checkpoint import Checkpoint

    old = Artifact(kind="checkpoint", tensors={}, config={}, preprocessing={}, seed=0,
                   info={"finished": {"p17": {"seconds": 1200.0}}, "progress": {"seconds": 600}})
    assert 1800 <= Checkpoint(path=tmp_path / "c", every=1, resumed=old).seconds() < 1810
    new = Artifact(kind="checkpoint", tensors={}, config={}, preprocessing={}, seed=0,
                   info={"seconds": 50.0, "finished": {"p17": {"seconds": 1200.0}}})
    assert 50 <= Checkpoint(path=tmp_path / "c", every=1, resumed=new).seconds() < 60


def test_students_resume_a_scale_at_another_size(tmp_path: Path) -> None:
    # p17@18 is a second p=17 scale, on the images reduced to 18²: its own checkpoint entries.
    root = _data(tmp_path / "data")
    settings = _students(root, patch_sizes=[17, "17@18"], epochs=1, image_size=36)
    reference, out = tmp_path / "reference.safetensors", tmp_path / "model.safetensors"
    fit(settings, teacher="random", out=reference)
    with stop_at(3), pytest.raises(Interrupted, match="p=17@18, epoch 1 of 1 after step 1 of 2"):
        fit(settings, teacher="random", out=out)
    saved = load_artifact(checkpoint_path(out))
    assert any(k.startswith("adam.p17@18.") for k in saved.tensors)
    assert saved.info["progress"]["scale"] == "p17@18"
    fit(settings, teacher="random", out=out, resume=True)
    assert_same_artifact(reference, out, "students")
    assert load_model_scales(out) == ["p17", "p17@18"]


def test_a_checkpoint_that_names_its_scale_by_patch_size_resumes(
        students_reference: tuple[Path, Path], tmp_path: Path) -> None:
    # Checkpoints written before scales at other sizes record progress["scale"] as 17.
    root, reference = students_reference
    out = tmp_path / "model.safetensors"
    with stop_at(1), pytest.raises(Interrupted):
        fit(_students(root), teacher="random", out=out)
    old = load_artifact(checkpoint_path(out))
    assert old.info["progress"]["scale"] == "p17"
    old.info["progress"]["scale"] = 17
    save_artifact(checkpoint_path(out), old)
    notes = Notes()
    fit(_students(root), teacher="random", out=out, resume=True, reporter=notes)
    assert any("epoch 1 of 2 after step 1 of 2" in n for n in notes.notes)
    assert_same_artifact(reference, out, "students")


def load_model_scales(path: Path) -> list[str]:
    import stad

    return stad.load_model(path, device="cpu").scales


def test_resume_refuses_other_settings_or_data(students_reference: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    import shutil

    root = shutil.copytree(students_reference[0], tmp_path / "data")
    out = tmp_path / "model.safetensors"
    with stop_at(1), pytest.raises(Interrupted):
        fit(_students(root), teacher="random", out=out)

    with pytest.raises(UsageError) as info:
        fit(_students(root, epochs=3, lr=2e-3), teacher="random", out=out, resume=True)
    message = str(info.value)
    assert "students.epochs: 2 in the checkpoint, 3 now" in message
    assert "students.lr: 0.001 in the checkpoint, 0.002 now" in message
    assert "without --resume (resume=False in Python)" in message

    image = sorted((root / "grain" / "train" / "good").glob("*.png"))[0]
    original = image.read_bytes()
    image.write_bytes(sorted((root / "grain" / "val" / "good").glob("*.png"))[0].read_bytes())
    with pytest.raises(UsageError, match="the same 4 training images by name, but their "
                                         "contents changed"):
        fit(_students(root), teacher="random", out=out, resume=True)
    image.write_bytes(original)

    # What does not change the result may differ; a moved data folder is the same data.
    moved = shutil.move(root, tmp_path / "moved")
    fit(_students(Path(moved), checkpoint_every=5), teacher="random", out=out, resume=True)
    assert_same_artifact(students_reference[1], out, "students")


def test_without_resume_an_old_checkpoint_is_replaced(students_reference: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    root = students_reference[0]
    out = tmp_path / "model.safetensors"
    with stop_at(1), pytest.raises(Interrupted):
        fit(_students(root), teacher="random", out=out)
    notes = Notes()
    result = fit(_students(root), teacher="random", out=out, reporter=notes)
    assert result["resumed"] is False
    assert any("holds an interrupted run" in n for n in notes.notes), notes.notes
    assert not checkpoint_path(out).exists()


def _poison_students(monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    """Student outputs become NaN from the ``after``-th forward pass (one per student and step)."""
    calls = itertools.count(1)
    build = students_mod.build_network

    def build_network(*args: Any, **kwargs: Any) -> Any:
        net = build(*args, **kwargs)
        dense_valid = net.dense_valid

        def poisoned(x: torch.Tensor) -> torch.Tensor:
            y = dense_valid(x)
            return y * float("nan") if next(calls) >= after else y

        net.dense_valid = poisoned
        return net

    monkeypatch.setattr(students_mod, "build_network", build_network)


def test_nan_student_loss_names_the_last_good_checkpoint(students_reference: tuple[Path, Path],
                                                        tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    root = students_reference[0]
    out = tmp_path / "model.safetensors"
    _poison_students(monkeypatch, after=2 * 2 + 1)  # 2 students: the third step, epoch 2
    with pytest.raises(TrainingError) as info:
        fit(_students(root), teacher="random", out=out)
    message = str(info.value)
    assert "non-finite student loss at p=17, epoch 2 of 2, step 1 of 2" in message
    assert (f"the last good checkpoint is {checkpoint_path(out)} (p=17 after epoch 1 of 2)"
            in message)
    assert load_artifact(checkpoint_path(out), kind="checkpoint").info["progress"]["epoch"] == 1

    _poison_students(monkeypatch, after=1)
    with pytest.raises(TrainingError, match="epoch 1 of 2, step 1 of 2.*no checkpoint has been "
                                            "saved yet"):
        fit(_students(root), teacher="random", out=tmp_path / "other.safetensors")


# --- teacher -----------------------------------------------------------------------------------


def test_teacher_resume_to_the_same_weights(tmp_path: Path) -> None:
    root = _data(tmp_path / "data")
    settings = _teacher(root, patch_sizes=[17, 33], image_size=36)
    reference, out = tmp_path / "reference.safetensors", tmp_path / "teacher.safetensors"
    with saves() as seen:
        pretrain_teacher(settings, out=reference)
    assert seen == ["p=17 after iteration 3 of 4", "the end of scale p=17",
                    "p=33 after iteration 3 of 4"]
    assert not checkpoint_path(reference).exists()

    # A real SIGINT, through the handler the workflow installs, at iteration 2 of p=17.
    handler = signal.getsignal(signal.SIGINT)
    with stop_at(2, real_signal=True), pytest.raises(Interrupted) as info:
        pretrain_teacher(settings, out=out)
    assert signal.getsignal(signal.SIGINT) is handler
    assert "stopped by SIGINT at p=17 after iteration 2 of 4" in str(info.value)
    saved = load_artifact(checkpoint_path(out), kind="checkpoint")
    assert saved.tensors["generator.p17"].dtype == torch.uint8
    assert saved.tensors["losses.p17"].shape == (2, 4)

    # Resumed: p=17 iterations 3 and 4 are polls 1 and 2; p=33 iteration 2 is poll 4.
    with stop_at(4), pytest.raises(Interrupted, match="p=33 after iteration 2 of 4"):
        pretrain_teacher(settings, out=out, resume=True)
    assert load_artifact(checkpoint_path(out)).info["finished"].keys() == {"p17"}
    result = pretrain_teacher(settings, out=out, resume=True)
    assert result["resumed"] is True and not checkpoint_path(out).exists()
    assert_same_artifact(reference, out, "losses")


def test_teacher_run_extended_on_resume_equals_the_longer_run(tmp_path: Path) -> None:
    # A long pretraining spans sessions: stopped at iteration 2 of 4, resumed with 6, it ends
    # where an uninterrupted 6-iteration run does; fewer than done, or a change after a scale
    # was finished, is refused.
    root = _data(tmp_path / "data")
    reference, out = tmp_path / "reference.safetensors", tmp_path / "teacher.safetensors"
    pretrain_teacher(_teacher(root, iterations=6, image_size=36), out=reference)
    with stop_at(2), pytest.raises(Interrupted, match="p=17 after iteration 2 of 4"):
        pretrain_teacher(_teacher(root, iterations=4, image_size=36), out=out)
    with pytest.raises(UsageError, match="trained p=17 for 2 iterations.*--iterations 2 or"):
        pretrain_teacher(_teacher(root, iterations=1, image_size=36), out=out, resume=True)
    result = pretrain_teacher(_teacher(root, iterations=6, image_size=36), out=out, resume=True)
    assert result["resumed"] and result["iterations"] == 6
    assert_same_artifact(reference, out, "losses")

    two = _teacher(root, patch_sizes=[17, 33], image_size=36)
    with stop_at(6), pytest.raises(Interrupted, match="p=33"):
        pretrain_teacher(two, out=out)
    longer = _teacher(root, patch_sizes=[17, 33], image_size=36, iterations=8)
    with pytest.raises(UsageError, match="finished p=17 at 4 iterations.*--iterations 4"):
        pretrain_teacher(longer, out=out, resume=True)


def test_teacher_resume_compares_the_init_teachers_bytes_not_its_path(tmp_path: Path) -> None:
    # --init: a moved copy of the same teacher resumes; a changed file is refused, since the
    # resumed run would start its scales from two different teachers.
    import shutil

    root = _data(tmp_path / "data")
    start = tmp_path / "start.safetensors"
    pretrain_teacher(_teacher(root, iterations=2), out=start)
    out = tmp_path / "teacher.safetensors"
    with stop_at(1), pytest.raises(Interrupted):
        pretrain_teacher(_teacher(root, init=str(start)), out=out)
    moved = Path(shutil.move(start, tmp_path / "moved.safetensors"))
    other = tmp_path / "other.safetensors"
    pretrain_teacher(_teacher(root, iterations=1), out=other)
    with pytest.raises(UsageError, match="the init weights differ"):
        pretrain_teacher(_teacher(root, init=str(other)), out=out, resume=True)
    result = pretrain_teacher(_teacher(root, init=str(moved)), out=out, resume=True)
    assert result["resumed"] and result["init"]["iterations"] == {"p17": 2}


@pytest.mark.parametrize("patch_sizes, stop, where", [
    ([17], 3, "p=17 after iteration 3 of 6"),
    ([17, 33], 9, "p=33 after iteration 3 of 6"),  # the 2nd scale, after p=17's diagnostics
])
def test_streamed_teacher_resumes_to_the_same_weights(tmp_path: Path, patch_sizes: list[int],
                                                      stop: int, where: str) -> None:
    # 4 training images through a buffer of 2: every iteration replaces one
    # (stad.training.imagebuffer), and the checkpoint must bring back the buffer's images and
    # its place in the stream.
    root = _data(tmp_path / "data")
    settings = _teacher(root, iterations=6, checkpoint_every=10, buffer_images=2,
                        patch_sizes=patch_sizes, image_size=36, diagnostic_patches=16)
    reference, out = tmp_path / "reference.safetensors", tmp_path / "teacher.safetensors"
    pretrain_teacher(settings, out=reference)
    with stop_at(stop), pytest.raises(Interrupted, match=where):
        pretrain_teacher(settings, out=out)
    saved = load_artifact(checkpoint_path(out), kind="checkpoint")
    # Two slots, the next position, the number of processes.
    state = saved.tensors[f"buffer.p{patch_sizes[-1]}"]
    assert state.shape == (4,) and state[-1] == 1
    pretrain_teacher(settings, out=out, resume=True)
    assert_same_artifact(reference, out, "losses")


def test_nan_teacher_loss_names_the_last_good_checkpoint(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    root = _data(tmp_path / "data")
    calls = itertools.count(1)
    compactness = teacher_mod.compactness_loss

    def poisoned(descriptors: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        value = compactness(descriptors, **kwargs)
        return value * float("nan") if next(calls) == 3 else value

    monkeypatch.setattr(teacher_mod, "compactness_loss", poisoned)
    out = tmp_path / "teacher.safetensors"
    with pytest.raises(TrainingError) as info:
        pretrain_teacher(_teacher(root, checkpoint_every=2), out=out)
    message = str(info.value)
    assert "non-finite teacher loss at p=17, iteration 3 of 4" in message
    assert (f"the last good checkpoint is {checkpoint_path(out)} (p=17 after iteration 2 of 4)"
            in message)


def test_pretrain_teacher_command_exits_130_and_resumes(tmp_path: Path) -> None:
    root = _data(tmp_path / "data")
    out = tmp_path / "teacher.safetensors"
    args = ["pretrain-teacher", "--dataset", "synthetic", "--root", str(root), "--category",
            "grain", "--patch-sizes", "17", "--iterations", "3", "--device", "cpu", "--out",
            str(out)]
    env = {"STAD_TEACHER__IMAGE_SIZE": "32", "STAD_TEACHER__BATCH_SIZE": "8"}
    runner = CliRunner()
    with stop_at(1):
        result = runner.invoke(app, args, env=env)
    assert result.exit_code == 130, result.output
    assert "checkpoint saved to" in result.stderr and "--resume" in result.stderr
    result = runner.invoke(app, [*args, "--resume", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert '"resumed": true' in result.stdout
    assert out.is_file() and not checkpoint_path(out).exists()


# --- the real command, interrupted by a real SIGINT --------------------------------------------


@pytest.mark.slow
def test_fit_students_process_interrupted_by_sigint_then_resumed(tmp_path: Path) -> None:
    # About 15 s: two processes that import torch, and three trainings in all.
    root = _data(tmp_path / "data")
    out = tmp_path / "model.safetensors"
    ckpt = checkpoint_path(out)
    # Batch 1: 4 steps per epoch. The first checkpoint comes after one epoch and the signal a
    # few milliseconds later, three epochs (seconds) before the end.
    students = {"epochs": 4, "batch_size": 1, "crop_size": 12, "lr": 1e-3,
                "lr_schedule": "cosine", "checkpoint_every": 1}
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           **{f"STAD_STUDENTS__{k.upper()}": str(v) for k, v in students.items()}}
    args = [sys.executable, "-m", "stad", "fit-students", "--dataset", "synthetic", "--root",
            str(root), "--category", "grain", "--teacher", "random", "--patch-sizes", "17",
            "--image-size", "24", "--students", "2", "--device", "cpu", "--out", str(out)]
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ckpt.exists(), "no checkpoint appeared"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert f"checkpoint saved to {ckpt}" in stderr
    assert "stad fit-students" in stderr and "--resume" in stderr
    assert ckpt.is_file() and not out.exists()

    done = subprocess.run([*args, "--resume"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr and "model written to" in done.stdout
    assert not ckpt.exists()

    reference = tmp_path / "reference.safetensors"
    fit(_students(root, n_students=2, **students), teacher="random", out=reference)
    a, b = load_file(str(reference)), load_file(str(out))
    names = [k for k in a if k.startswith("student.")]
    assert names and sorted(names) == sorted(k for k in b if k.startswith("student."))
    assert all(torch.equal(a[k], b[k]) for k in names)


# --- the signal handling itself ----------------------------------------------------------------


def _deliver(sig: int, flag: StopFlag) -> None:
    os.kill(os.getpid(), sig)
    deadline = time.monotonic() + 10
    while not flag.requested and time.monotonic() < deadline:
        time.sleep(0.001)


def test_signals_set_the_flag_and_handlers_are_restored() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with stop_on_signals() as flag:
        assert signal.getsignal(signal.SIGTERM) == flag.handle
        _deliver(signal.SIGTERM, flag)
        assert flag.requested and flag.name == "SIGTERM"
        with flag.shielded():  # a second signal while saving waits for the save
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        assert flag.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second one otherwise stops at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert {s: signal.getsignal(s) for s in before} == before


def test_no_handlers_off_the_main_thread() -> None:
    before = signal.getsignal(signal.SIGINT)
    seen: list[Any] = []

    def run() -> None:
        with stop_on_signals() as flag:
            seen.append(signal.getsignal(signal.SIGINT))
            flag.request()
            seen.append(flag.poll())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [before, True]


def test_checkpoint_names_and_identity_messages() -> None:
    assert checkpoint_path(Path("out/model.safetensors")) == Path("out/model.ckpt.safetensors")
    assert checkpoint_path(Path("model.st")) == Path("model.st.ckpt.safetensors")
    a = {"images": {"names": ["a.png", "b.png"], "sha256": "1"}, "teacher": "x"}
    b = {"images": {"names": ["b.png", "c.png"], "sha256": "2"}, "teacher": "y"}
    assert identity_differences(a, b) == [
        "2 training images in the checkpoint, 2 now; missing now: a.png; new: c.png",
        "the teacher weights differ"]
    assert identity_differences(a, a) == []
