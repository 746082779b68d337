"""Untrusted files are data, not code: a malicious pickle given to every command that takes a
file executes nothing (issue: reliability and security)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from stad.cli import app


class _Payload:
    """Unpickling this creates a folder: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture(params=["pickle", "torch-zip"])
def evil(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if request.param == "pickle":
        path.write_bytes(pickle.dumps(_Payload(marker), protocol=4))
    else:
        torch.save({"weight": _Payload(marker)}, path)  # the format of a .pth file
    assert not marker.exists()
    return path, marker


def test_the_payload_really_fires_when_unpickled(evil: tuple[Path, Path]):
    # Control: shows the files are truly malicious, so the tests below prove something.
    path, marker = evil
    if path.read_bytes()[:2] == b"PK":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("args,code", [
    (["fit-students", "--dataset", "synthetic", "--category", "grain", "--teacher", "{evil}",
      "--out", "{tmp}/m.safetensors"], 4),
    (["calibrate", "--model", "{evil}"], 4),
    (["score", "--model", "{evil}", "{evil}"], 4),
    (["evaluate", "--model", "{evil}"], 4),
    (["datasets", "show", "--config", "{evil}"], 2),
    (["pretrain-teacher", "--dataset", "synthetic", "--category", "grain", "--iterations", "1",
      "--patch-sizes", "17", "--backbone-weights", "{evil}", "--out", "{tmp}/t.safetensors"],
     None),
])
def test_no_command_executes_a_pickle(evil: tuple[Path, Path], tmp_path: Path, args, code):
    path, marker = evil
    args = [a.format(evil=path, tmp=tmp_path) for a in args]
    result = CliRunner().invoke(app, args, env={"STAD_TEACHER__IMAGE_SIZE": "32"})
    assert not marker.exists(), f"{args[0]} executed the pickle"
    assert result.exit_code != 0 and result.exit_code != 1, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert "Traceback" not in result.output


def test_images_and_masks_are_never_unpickled(evil: tuple[Path, Path]):
    from stad.errors import DataError
    from stad.images import load_image, load_mask

    path, marker = evil
    for load in (load_image, load_mask):
        with pytest.raises(DataError, match="evil.pth"):
            load(path)
    assert not marker.exists()


# ---- special files where a file is read: a FIFO would block for ever, /dev/zero fill memory ----


def _fifo(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    os.mkfifo(path)
    return path


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are a POSIX feature")
def test_special_files_are_refused_without_being_read(tmp_path: Path) -> None:
    from stad.artifacts import load_artifact, read_state_dict
    from stad.config import read_config_file
    from stad.errors import ArtifactError, DataError, UsageError
    from stad.images import load_image, load_mask

    zero = tmp_path / "zero.safetensors"
    zero.symlink_to("/dev/zero")
    cases = [
        (lambda: load_artifact(_fifo(tmp_path, "m.safetensors")), ArtifactError),
        (lambda: load_artifact(zero), ArtifactError),
        (lambda: read_state_dict(_fifo(tmp_path, "w.pth"), what="backbone weights"),
         ArtifactError),
        (lambda: read_config_file(_fifo(tmp_path, "stad.toml")), UsageError),
        (lambda: load_image(_fifo(tmp_path, "a.png")), DataError),
        (lambda: load_mask(_fifo(tmp_path, "a_mask.png")), DataError),
    ]
    for call, error in cases:
        with pytest.raises(error, match="not a regular file"):
            call()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are a POSIX feature")
def test_a_fifo_given_to_score_is_an_unreadable_input(tmp_path: Path) -> None:
    fifo = _fifo(tmp_path, "part.png")
    result = CliRunner().invoke(app, ["score", "--model", str(_fifo(tmp_path, "m.safetensors")),
                                      str(fifo)])
    assert result.exit_code == 4 and "not a regular file" in result.stderr
    result = CliRunner().invoke(app, ["score", "--config", str(_fifo(tmp_path, "c.toml")),
                                      str(fifo)])
    assert result.exit_code == 2 and "not a regular file" in result.stderr
