"""--log-dir: the training losses as TensorBoard scalars (stad.tracking)."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stad.cli import app
from stad.datasets.synthetic import generate
from stad.errors import EXIT_USAGE

pytest.importorskip("tensorboard", reason="tensorboard is part of the test extra")

DATA = ["--dataset", "synthetic", "--category", "grain"]


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_fit_students_writes_its_losses(tmp_path: Path) -> None:
    root = tmp_path / "data"
    generate(root, categories=["grain"], image_size=32, n_train=6, n_val=2, n_test_good=1,
             n_test_per_defect=1, seed=1)
    out = CliRunner().invoke(app, [
        "fit-students", *DATA, "--root", str(root), "--teacher", "random", "--patch-sizes",
        "17", "--epochs", "2", "--image-size", "32", "--students", "2", "--out",
        str(tmp_path / "m.safetensors"), "--log-dir", str(tmp_path / "logs"), "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout.splitlines()[0])
    scalars = _scalars(tmp_path / "logs")
    losses = scalars["students_p17/loss"]
    # 6 training images (the val split is the held-back one), batches of 1, 2 epochs: one
    # scalar per step, counted from 1.
    assert [step for step, _ in losses] == list(range(1, len(losses) + 1))
    assert len(losses) == 2 * 6 and all(v > 0 for _, v in losses)
    assert [step for step, _ in scalars["students_p17/epoch"]][-1] == len(losses)
    assert result["final_loss"]["p17"] > 0


def test_a_missing_tensorboard_is_a_usage_error(tmp_path: Path, monkeypatch) -> None:
    real = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    out = CliRunner().invoke(app, ["pretrain-teacher", *DATA, "--root", str(tmp_path / "d"),
                                   "--log-dir", str(tmp_path / "logs")])
    assert out.exit_code == EXIT_USAGE
    assert "stad[tensorboard]" in out.output and len(out.output.strip().splitlines()) == 1
