"""``stad demo`` (what ``make demo`` runs): its settings as documented, and the command end to end
on shrunk settings."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stad.artifacts import load_artifact
from stad.cli import app
from stad.commands import demo as demo_module
from stad.config import resolve_settings


def test_demo_settings_are_the_documented_ones() -> None:
    # docs/usage.md, "stad demo": p = 17 and 33, 50 teacher iterations, 3 students a scale, 64²,
    # 8 epochs at lr 1e-3, unsmoothed; a change of the fast preset must not change the demo.
    settings = resolve_settings({**demo_module.DEMO_SETTINGS, "root": "data"}, environ={})
    students, teacher = settings.students, settings.teacher
    assert teacher.patch_sizes == [17, 33] and teacher.iterations == 50
    assert (students.n_students, students.image_size, students.epochs, students.min_steps) == (
        3, 64, 8, 0)
    assert (students.lr, students.lr_schedule) == (1e-3, "constant")
    assert students.crop_size in (None, students.image_size)  # whole images
    assert settings.calibrate.smooth_sigma == 0


@pytest.mark.slow
def test_demo_command_runs_the_whole_pipeline(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    shrunk = copy.deepcopy(demo_module.DEMO_SETTINGS)
    shrunk["teacher"].update(iterations=2, image_size=32, batch_size=4, patch_sizes=[17])
    shrunk["students"].update(image_size=32, epochs=1, patch_sizes=[17])
    monkeypatch.setattr(demo_module, "DEMO_SETTINGS", shrunk)
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["category"] == demo_module.DEMO_CATEGORY
    assert 0 <= summary["au_pro"] <= 1 and 0 <= summary["image_auroc"] <= 1
    assert set(summary["per_scale"]) == {"p17"}
    assert set(summary["seconds"]) == {"generate", "pretrain-teacher", "fit-students",
                                       "calibrate", "evaluate"}
    assert Path(summary["report"]).is_file() and Path(summary["report"]).parent.parent == out
    model = load_artifact(out / "model.safetensors", kind="model")
    assert model.info["students"]["scales"]["p17"]["epochs"] == 1
    assert model.config["students"]["n_students"] == 3
    assert any(k.startswith("student.p17.2.") for k in model.tensors)  # the third student
    assert not any(k.startswith("student.p17.3.") for k in model.tensors)
