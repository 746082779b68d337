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
    zero.with_name("zero.toml").symlink_to("/dev/zero")
    cases = [
        (lambda: load_artifact(_fifo(tmp_path, "m.safetensors")), ArtifactError),
        (lambda: load_artifact(zero), ArtifactError),
        (lambda: read_state_dict(_fifo(tmp_path, "w.pth"), what="backbone weights"),
         ArtifactError),
        (lambda: read_config_file(zero.with_name("zero.toml")), UsageError),
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
    (tmp_path / "c.toml").symlink_to("/dev/zero")
    result = CliRunner().invoke(app, ["score", "--config", str(tmp_path / "c.toml"), str(fifo)])
    assert result.exit_code == 2 and "not a regular file" in result.stderr


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are a POSIX feature")
def test_a_config_may_come_through_a_pipe(tmp_path: Path) -> None:
    """`--config <(...)` and a config piped to /dev/stdin: the user's own input, read."""
    import threading

    from stad.config import read_config_file

    fifo = _fifo(tmp_path, "c.toml")
    writer = threading.Thread(target=lambda: fifo.write_text('[score]\nbatch_size = 3\n'))
    writer.start()
    assert read_config_file(fifo) == {"score": {"batch_size": 3}}
    writer.join()


# ---- tensors that describe networks: checked by shape before any network is built ------------


def test_a_tensor_of_no_elements_cannot_ask_for_a_huge_network() -> None:
    """A tensor of no elements is free in a file and can claim any size of layer: the claim is
    refused before any layer is allocated (the first: 10⁷ × 256 × 16 floats, 164 GB)."""
    from stad.artifacts import load_artifact
    from stad.errors import ArtifactError
    from stad.model import builtin_teacher_path, load_teachers

    shipped = load_artifact(builtin_teacher_path()).tensors
    for name, claim, words in [
        ("teacher.p17.convs.3.weight", (10**7, 0, 4, 4),
         r"teacher p=17 has 10000000-d descriptors \(convs\.3\.weight\), more than the 4096"),
        ("teacher.p17.convs.1.weight", (256, 0, 5, 5),
         r"convs\.1\.weight is \[256, 0, 5, 5\], not \[256, 128, 5, 5\]"),
    ]:
        tensors = {**shipped, name: torch.empty(claim)}
        with pytest.raises(ArtifactError, match=words):
            load_teachers(tensors, patch_sizes=[17])


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
    with pytest.raises(ArtifactError, match="has a safetensors header of 16 MB, more than the "
                                            "16 MB stad reads"):
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


def test_metadata_nested_beyond_reason_is_refused_on_load(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import stad.artifacts
    from stad.artifacts import MAX_METADATA_DEPTH, load_artifact
    from stad.errors import ArtifactError

    nested: dict = {}
    for _ in range(MAX_METADATA_DEPTH + 5):
        nested = {"teacher": nested, "x": [1]}
    with pytest.raises(ValueError, match="could not read back"):  # stad never writes one
        _crafted_model(tmp_path, deep=nested)
    with monkeypatch.context() as patched:  # as another program could
        patched.setattr(stad.artifacts, "_nested_deeper", lambda value, limit: False)
        crafted = _crafted_model(tmp_path, deep=nested)
    with pytest.raises(ArtifactError, match=f"stad.info nests more than {MAX_METADATA_DEPTH}"):
        load_artifact(crafted)
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
    assert recorded(records) == ({"a.png": (True, (None, None))}, None)


def test_records_are_read_line_by_line_and_a_cut_last_line_removed(tmp_path: Path) -> None:
    from stad.errors import UsageError
    from stad.scorefiles import kept_records, recorded

    records = tmp_path / "scores.jsonl"
    kept = (b'{"path": "a.png", "anomalous": true}\n' + b"not json\n" + b"\xff\xfe\n"
            + b'{"path": "b.png", "error": "unreadable"}\n' + b"[1, 2]\n" + b"1\n" * 1000
            + b'{"path": "c.png", "anomalous": false, "threshold": 0.5, '
            + b'"pixel_threshold": 0.25}\n'
            # thresholds beyond floats, NaN, a string, true: as if there were none
            + b'{"path": "e.png", "anomalous": false, "threshold": 1' + b"0" * 400 + b"}\n"
            + b'{"path": "f.png", "anomalous": false, "threshold": NaN, '
            + b'"pixel_threshold": "0.1"}\n'
            + b'{"path": "g.png", "anomalous": false, "threshold": true}\n')
    records.write_bytes(kept + b'{"path": "d.png", "anom')
    every = {"a.png": (True, (None, None)), "c.png": (False, (0.5, 0.25)),
             **{f"{x}.png": (False, (None, None)) for x in "efg"}}
    assert recorded(records) == (every, len(kept))
    assert records.read_bytes().startswith(kept)  # reading cuts nothing ...
    # ... a resume refused for another threshold neither ...
    for judged in ((0.5, 0.3), (0.6, 0.25)):
        with pytest.raises(UsageError, match="c.png judged at (pixel )?threshold"):
            kept_records([Path("a.png"), Path("c.png")], records, judged)
        assert records.read_bytes().startswith(kept) and len(records.read_bytes()) > len(kept)
    # ... and one that goes on removes the cut line, once
    inputs = [Path(f"{x}.png") for x in "abcdefgh"]
    for _ in range(2):
        todo, resumed, n = kept_records(inputs, records, (0.5, 0.25))
        assert todo == [Path("b.png"), Path("d.png"), Path("h.png")] and n == 5
        assert resumed == {"a.png": True, "c.png": False, "e.png": False, "f.png": False,
                           "g.png": False}
        assert records.read_bytes() == kept
