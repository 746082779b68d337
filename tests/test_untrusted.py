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


# ---- tensors that describe networks: checked by shape before any network is built ------------


def test_a_tensor_of_no_elements_cannot_ask_for_a_huge_network() -> None:
    import resource

    from stad.artifacts import load_artifact
    from stad.errors import ArtifactError
    from stad.model import builtin_teacher_path, load_teachers

    tensors = dict(load_artifact(builtin_teacher_path()).tensors)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tensors["teacher.p17.convs.3.weight"] = torch.empty((10**7, 0, 4, 4))  # 0 bytes in a file
    with pytest.raises(ArtifactError, match="weights do not fit the architecture: convs"):
        load_teachers(tensors, patch_sizes=[17])
    # the network it claims would hold 10⁷ × 128 × 16 floats (82 GB): none of it was allocated
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 512 * 1024


@pytest.mark.parametrize("name", ["teacher.pX.convs.0.weight", "teacher.p18000.convs.0.weight",
                                  "teacher..weight"])
def test_teacher_tensors_of_a_malformed_scale_name(name: str) -> None:
    from stad.artifacts import load_artifact
    from stad.errors import ArtifactError
    from stad.model import builtin_teacher_path, load_teachers

    tensors = dict(load_artifact(builtin_teacher_path()).tensors)
    tensors[name] = torch.zeros(1)
    with pytest.raises(ArtifactError, match="teacher tensors of a scale named"):
        load_teachers(tensors)


def test_teacher_tensors_of_a_patch_size_without_a_network() -> None:
    from stad.artifacts import load_artifact
    from stad.errors import ArtifactError
    from stad.model import builtin_teacher_path, load_teachers

    tensors = {k.replace("teacher.p17.", "teacher.p18."): v
               for k, v in load_artifact(builtin_teacher_path()).tensors.items()}
    with pytest.raises(ArtifactError, match="teacher p=18"):
        load_teachers(tensors)


def test_a_header_larger_than_stad_writes_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    import json
    import struct

    from stad.artifacts import MAX_HEADER_BYTES, load_artifact
    from stad.errors import ArtifactError

    header = json.dumps({"__metadata__": {"stad.kind": "model", "pad": " " * MAX_HEADER_BYTES}})
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode())
    with pytest.raises(ArtifactError, match="bad header length"):
        load_artifact(path)


# ---- metadata and records that parse, but not as stad writes them -----------------------------


def test_a_number_beyond_any_float_is_not_a_finite_number() -> None:
    from stad.artifacts import finite_number

    assert finite_number(10**300) and not finite_number(10**400)
    assert not finite_number(-(10**400)) and not finite_number(True)


def _crafted_model(tmp_path: Path, **info) -> Path:
    from stad.artifacts import Artifact, save_artifact
    from stad.images import preprocessing
    from stad.model import teacher_tensors
    from stad.networks import build_network

    path = tmp_path / "crafted.safetensors"
    save_artifact(path, Artifact(kind="model", tensors=teacher_tensors({17: build_network(17)}),
                                 config={}, preprocessing=preprocessing(32), seed=0, info=info))
    return path


def test_metadata_nested_beyond_reason_is_refused_on_load(tmp_path: Path) -> None:
    from stad.artifacts import MAX_METADATA_DEPTH, load_artifact
    from stad.errors import ArtifactError

    nested: dict = {}
    for _ in range(MAX_METADATA_DEPTH + 5):
        nested = {"teacher": nested, "x": [1]}
    with pytest.raises(ArtifactError, match=f"stad.info nests more than {MAX_METADATA_DEPTH}"):
        load_artifact(_crafted_model(tmp_path, deep=nested))
    shallow: dict = {"x": 1}
    for _ in range(MAX_METADATA_DEPTH - 2):
        shallow = {"teacher": shallow}
    assert load_artifact(_crafted_model(tmp_path, deep=shallow)).info["deep"]


def test_a_recorded_dataset_that_is_not_a_string_is_a_malformed_artifact() -> None:
    from stad.commands.common import with_model_data
    from stad.config import Settings
    from stad.errors import ArtifactError

    with pytest.raises(ArtifactError,
                       match="malformed stad metadata: data.dataset is a JSON dict, not a string"):
        with_model_data(Settings(), {"data": {"dataset": {}, "category": "c"}}, "m.safetensors")


def test_a_records_line_nested_beyond_reason_is_skipped(tmp_path: Path) -> None:
    from stad.scorefiles import recorded

    records = tmp_path / "scores.jsonl"
    records.write_text("[" * 100_000 + "\n" + '{"path": "a.png", "anomalous": true}\n')
    assert recorded(records) == {"a.png": True}
