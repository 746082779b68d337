"""Training under torchrun (stad.distributed): shards, one writer, identical weights on all ranks.

The end-to-end tests start real ``torchrun --standalone --nproc-per-node 2`` jobs (gloo on CPU)
and take some seconds each; they are marked slow.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from stad.artifacts import load_artifact
from stad.commands.train import fit_students as fit
from stad.commands.train import pretrain_teacher
from stad.config import resolve_settings
from stad.datasets.synthetic import generate
from stad.distributed import World, init_world
from stad.errors import Interrupted, UsageError
from stad.training.checkpoint import StopFlag, checkpoint_path, tensors_sha256


@pytest.mark.parametrize("size", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [0, 1, 4, 7])
def test_shards_cover_every_item_exactly_once(size: int, n: int) -> None:
    items = list(range(n))
    shards = [World(rank, size).shard(items) for rank in range(size)]
    assert sorted(x for s in shards for x in s) == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_world_size_without_torchrun_variables_is_a_usage_error(monkeypatch) -> None:
    import torch

    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="torchrun"):
        init_world(torch.device("cpu"))


def test_a_plain_run_is_a_world_of_one(monkeypatch) -> None:
    import torch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world, device = init_world(torch.device("cpu"))
    assert (world.rank, world.size, world.main, device.type) == (0, 1, True, "cpu")
    assert world.any(True) and not world.any(False)


# --- real torchrun jobs ------------------------------------------------------------------------

STUDENTS = ["--patch-sizes", "17", "--image-size", "24", "--students", "2", "--epochs", "2"]


def _data(root: Path) -> Path:
    # 7 training images: 4 on rank 0 and 3 on rank 1 (the short shard repeats one per epoch).
    generate(root, categories=["grain"], image_size=32, n_train=7, n_val=1, n_test_good=1,
             n_test_per_defect=1, seed=3)
    return root


def _torchrun(tmp: Path, *args: str, nproc: int = 2, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STAD_STUDENTS__BATCH_SIZE": "2",
           "STAD_STUDENTS__CROP_SIZE": "12", "STAD_STUDENTS__CHECKPOINT_EVERY": "1",
           **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "stad", *args]
    return subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_fit_students_on_two_processes_writes_one_artifact_with_agreed_weights(
        tmp_path: Path) -> None:
    root = _data(tmp_path / "data")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model.safetensors"
    done = _torchrun(tmp_path, "fit-students", "--dataset", "synthetic", "--root", str(root),
                     "--category", "grain", "--teacher", "random", "--device", "cpu",
                     "--out", str(out), "--json", *STUDENTS)
    assert done.returncode == 0, done.stderr[-3000:]
    # One artifact, no checkpoint and no lock file left behind, one result line.
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.safetensors"]
    assert done.stdout.count('"artifact"') == 1 and '"processes": 2' in done.stdout
    artifact = load_artifact(out, kind="model")
    dist = artifact.info["students"]["distributed"]
    assert dist["ranks"] == 2 and dist["backend"] == "gloo"
    # Both ranks computed this digest of their final weights and found them equal (else the
    # run fails); the weights rank 0 wrote are those weights.
    tensors = load_file(str(out))
    saved = {k: v for k, v in tensors.items() if k.startswith(("student.", "norm."))}
    assert tensors_sha256(saved) == dist["weights_sha256"]
    # The normalization is over all 7 images, not one rank's shard: the same as one process's.
    single = tmp_path / "single.safetensors"
    settings = resolve_settings({"dataset": "synthetic", "root": root, "category": "grain",
                                 "device": "cpu", "students": {
                                     "patch_sizes": [17], "image_size": 24, "n_students": 2,
                                     "epochs": 1, "batch_size": 2, "crop_size": 12}},
                                environ={})
    fit(settings, teacher="random", out=single)
    one = load_file(str(single))
    for key in ("norm.p17.mean", "norm.p17.std"):
        assert (one[key] - tensors[key]).abs().max() < 1e-4


@pytest.mark.slow
def test_a_checkpoint_from_one_process_resumes_on_two(tmp_path: Path, monkeypatch) -> None:
    root = _data(tmp_path / "data")
    out = tmp_path / "model.safetensors"
    settings = resolve_settings({"dataset": "synthetic", "root": root, "category": "grain",
                                 "device": "cpu", "students": {
                                     "patch_sizes": [17], "image_size": 24, "n_students": 2,
                                     "epochs": 2, "batch_size": 2, "crop_size": 12,
                                     "checkpoint_every": 1}}, environ={})
    calls = iter(range(100))
    # Stop after the 2nd of 4 steps of the first epoch: a mid-epoch checkpoint of one process.
    monkeypatch.setattr(StopFlag, "poll", lambda self: next(calls) == 1)
    with pytest.raises(Interrupted):
        fit(settings, teacher="random", out=out)
    assert checkpoint_path(out).is_file() and not out.exists()
    monkeypatch.undo()
    done = _torchrun(tmp_path, "fit-students", "--dataset", "synthetic", "--root", str(root),
                     "--category", "grain", "--teacher", "random", "--device", "cpu",
                     "--out", str(out), "--resume", *STUDENTS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "made on 1 process(es), this run has 2" in done.stderr
    assert out.is_file() and not checkpoint_path(out).exists()
    assert load_artifact(out, kind="model").info["students"]["distributed"]["ranks"] == 2


@pytest.mark.slow
def test_a_streamed_teacher_checkpoint_from_one_process_resumes_on_two(
        tmp_path: Path, monkeypatch) -> None:
    # 7 images, 3 in memory per process: one process streams; on two, rank 0 (4 images)
    # streams from the start of its share again and rank 1 (3 images) holds all of its own.
    root = _data(tmp_path / "data")
    out = tmp_path / "teacher.safetensors"
    teacher = {"patch_sizes": [17], "iterations": 4, "batch_size": 4, "image_size": 32,
               "diagnostic_patches": 0, "buffer_images": 3, "checkpoint_every": 10}
    settings = resolve_settings({"dataset": "synthetic", "root": root, "category": "grain",
                                 "device": "cpu", "teacher": teacher}, environ={})
    calls = iter(range(100))
    monkeypatch.setattr(StopFlag, "poll", lambda self: next(calls) == 1)
    with pytest.raises(Interrupted):
        pretrain_teacher(settings, out=out)
    assert "buffer.p17" in load_artifact(checkpoint_path(out), kind="checkpoint").tensors
    monkeypatch.undo()
    env = {f"STAD_TEACHER__{k.upper()}": str(v) for k, v in teacher.items()
           if k != "patch_sizes"}
    done = _torchrun(tmp_path, "pretrain-teacher", "--dataset", "synthetic", "--root",
                     str(root), "--category", "grain", "--device", "cpu", "--patch-sizes", "17",
                     "--out", str(out), "--resume", "--json", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"resumed": true' in done.stdout
    info = load_artifact(out, kind="teacher").info
    assert info["distributed"]["ranks"] == 2 and info["data"]["streamed"] is True


@pytest.mark.slow
def test_a_signal_stops_every_rank_and_rank_0_saves(tmp_path: Path) -> None:
    root = _data(tmp_path / "data")
    out = tmp_path / "model.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STAD_STUDENTS__BATCH_SIZE": "1",
           "STAD_STUDENTS__CHECKPOINT_EVERY": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "stad", "fit-students", "--dataset", "synthetic", "--root", str(root),
           "--category", "grain", "--teacher", "random", "--device", "cpu", "--out", str(out),
           "--patch-sizes", "17", "--image-size", "24", "--students", "2", "--epochs", "40"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        import time

        deadline = time.monotonic() + 120
        while not checkpoint_path(out).exists() and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert checkpoint_path(out).exists(), "no checkpoint appeared"
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert checkpoint_path(out).is_file() and not out.exists()
    saved = load_artifact(checkpoint_path(out), kind="checkpoint")
    assert saved.info["progress"] is None or saved.info["progress"]["ranks"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_pretrain_teacher_on_two_processes_writes_one_agreed_teacher(tmp_path: Path,
                                                                     streamed: bool) -> None:
    root = _data(tmp_path / "data")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "teacher.safetensors"
    env = {"STAD_TEACHER__IMAGE_SIZE": "32", "STAD_TEACHER__BATCH_SIZE": "4",
           "STAD_TEACHER__DIAGNOSTIC_PATCHES": "0", "STAD_TEACHER__CHECKPOINT_EVERY": "2"}
    data = ["--dataset", "synthetic", "--root", str(root), "--category", "grain"]
    if streamed:  # the collection adapter over the training folder, 2 images in memory each
        env["STAD_TEACHER__BUFFER_IMAGES"] = "2"
        data = ["--dataset", "collection", "--root", str(root / "grain" / "train")]
    done = _torchrun(tmp_path, "pretrain-teacher", *data, "--device", "cpu", "--patch-sizes",
                     "17", "--iterations", "5", "--out", str(out), "--json", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out_dir.iterdir()) == ["teacher.safetensors"]
    assert done.stdout.count('"artifact"') == 1
    artifact = load_artifact(out, kind="teacher")
    dist = artifact.info["distributed"]
    assert dist["ranks"] == 2
    # Only a streamed run reports skipped images (none here).
    assert ("skipped" in artifact.info["losses"]["p17"]) is streamed
    weights = {k.removeprefix("teacher."): v for k, v in load_file(str(out)).items()}
    assert tensors_sha256(weights) == dist["weights_sha256"]


def test_more_processes_than_training_images_is_a_data_error(tmp_path: Path) -> None:
    from stad.datasets.base import Sample
    from stad.errors import DataError
    from stad.training.students import fit_students

    settings = resolve_settings({"students": {"patch_sizes": [17], "image_size": 24}},
                                environ={})
    samples = [Sample(image=tmp_path / f"{i}.png", mask=None, label="normal", split="train")
               for i in range(2)]
    with pytest.raises(DataError, match="2 training images cannot be shared by 3 processes"):
        fit_students(settings, samples, {}, world=World(0, 3))
