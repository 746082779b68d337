"""Reading and writing stad artifacts: the one module that touches files of weights.

An artifact is a safetensors file (never a pickle) whose string metadata carries:

==========================  ==============================================================
``stad.kind``               ``teacher`` (from ``pretrain-teacher``), ``model`` (teacher,
                            students and normalization, from ``fit-students``) or
                            ``checkpoint`` (the state of an unfinished run of either,
                            :mod:`stad.training.checkpoint`)
``stad.format_version``     integer; this stad reads versions up to :data:`FORMAT_VERSION`
``stad.version``            the stad version that wrote it
``stad.config``             the full resolved settings as JSON
``stad.preprocessing``      JSON: ``image_size``, channel ``mean`` and ``std``
``stad.seed``               the seed
``stad.info``               JSON: provenance and results (losses, data, calibration, ...)
``stad.digest``             SHA-256 over every tensor and every other metadata entry
==========================  ==============================================================

Writes are atomic (:mod:`stad.fsutil`). Reads check the digest, so a truncated or bit-flipped
file is refused with :class:`~stad.errors.ArtifactError` instead of producing wrong maps.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from stad._version import __version__
from stad.errors import ArtifactError, UsageError
from stad.fsutil import atomic_write_bytes, check_output_file, read_regular_file

FORMAT_VERSION = 1
KINDS = ("teacher", "model", "checkpoint")
_PRODUCER = {"teacher": "stad pretrain-teacher", "model": "stad fit-students",
             "checkpoint": "an interrupted stad pretrain-teacher or fit-students"}
# stad's own headers are a few hundred kilobytes at most (the shipped teacher's, with its
# provenance: 100 KB); Python's JSON parser takes some 30 bytes of memory for each byte of a
# hostile one, so a larger header is refused before it is parsed.
MAX_HEADER_BYTES = 16 * 1024 * 1024


@dataclass
class Artifact:
    """The contents of one artifact file.

    Attributes:
        kind: ``"teacher"``, ``"model"`` or ``"checkpoint"``.
        tensors: named tensors (contiguous, any dtype safetensors supports).
        config: the resolved settings that produced it (``Settings.model_dump(mode="json")``).
        preprocessing: ``{"image_size": int, "mean": [r, g, b], "std": [r, g, b]}``.
        seed: the seed of the run.
        info: provenance and results, JSON-serializable.
        stad_version, format_version: filled in on writing; as read on loading.
    """

    kind: str
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    preprocessing: dict[str, Any]
    seed: int
    info: dict[str, Any] = field(default_factory=dict)
    stad_version: str = __version__
    format_version: int = FORMAT_VERSION


def _digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for key in sorted(metadata):
        if key != "stad.digest":
            h.update(f"meta:{key}={metadata[key]}\0".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"tensor:{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        # Reinterpret as bytes; works for every dtype including bfloat16.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def to_bytes(artifact: Artifact) -> bytes:
    """Serialize an artifact to safetensors bytes (with metadata and digest)."""
    if artifact.kind not in KINDS:
        raise ValueError(f"artifact kind must be one of {KINDS}, got {artifact.kind!r}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in artifact.tensors.items()}
    metadata = {
        "stad.kind": artifact.kind,
        "stad.format_version": str(FORMAT_VERSION),
        "stad.version": __version__,
        "stad.config": json.dumps(artifact.config, sort_keys=True, default=str),
        "stad.preprocessing": json.dumps(artifact.preprocessing, sort_keys=True),
        "stad.seed": str(int(artifact.seed)),
        "stad.info": json.dumps(artifact.info, sort_keys=True, default=str),
    }
    metadata["stad.digest"] = _digest(tensors, metadata)
    records = {"stad.config": artifact.config, "stad.preprocessing": artifact.preprocessing,
               "stad.info": artifact.info}  # what load_artifact checks, before they were dumped
    for key, value in records.items():
        if _nested_deeper(value, MAX_METADATA_DEPTH):
            raise ValueError(f"{key} nests more than {MAX_METADATA_DEPTH} levels: an artifact "
                             "stad could not read back")
    data = st_save(tensors, metadata=metadata)
    if struct.unpack("<Q", data[:8])[0] > MAX_HEADER_BYTES:
        raise ValueError(f"the metadata of this {artifact.kind} exceed the "
                         f"{MAX_HEADER_BYTES // 2**20} MB stad reads back")
    return data


def check_artifact_name(path: str | os.PathLike[str]) -> None:
    """Refuse to write an artifact under a ``.onnx`` name: stad reads such a file as an
    exported ONNX model (:func:`stad.load_model` goes by the suffix), so it could never be
    read back."""
    if Path(path).suffix.lower() == ".onnx":
        raise UsageError(f"output {path} ends in .onnx, the suffix of models that `stad export` "
                         "writes, so stad would read it as one: give it a .safetensors name")


def check_artifact_output(path: str | os.PathLike[str]) -> None:
    """Before any work: an artifact can be written at ``path`` (:func:`check_output_file`)
    under a name stad will read back as one (:func:`check_artifact_name`)."""
    check_output_file(path)
    check_artifact_name(path)


def save_artifact(path: str | Path, artifact: Artifact) -> None:
    """Write ``artifact`` to ``path`` atomically (the old file survives any interruption)."""
    check_artifact_name(path)
    atomic_write_bytes(path, to_bytes(artifact))


def _looks_like_pickle(data: bytes) -> bool:
    # torch.save files are zip archives ("PK\x03\x04"); raw pickles start with PROTO (0x80).
    # A safetensors file starts with its u64 header length, whose low byte can also be 0x80,
    # followed by the JSON header: "{" at byte 8 tells the two apart.
    return data.startswith(b"PK\x03\x04") or (data[:1] == b"\x80" and data[8:9] != b"{")


def read_header(data: bytes, path: Path) -> dict[str, Any]:
    """Parse and sanity-check a safetensors header without touching tensor data."""
    if _looks_like_pickle(data):
        raise ArtifactError(
            f"{path} looks like a PyTorch pickle (.pt/.pth); stad never unpickles files. "
            "Pass a .safetensors artifact written by stad"
        )
    if len(data) < 8:
        raise ArtifactError(f"{path} is not a safetensors artifact (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES and 8 + n <= len(data):
        raise ArtifactError(f"{path} has a safetensors header of {n / 2**20:.0f} MB, more than "
                            f"the {MAX_HEADER_BYTES // 2**20} MB stad reads")
    if 8 + n > len(data):
        raise ArtifactError(f"{path} is truncated or not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ArtifactError(f"{path} is corrupt: its safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path} is corrupt: its safetensors header is not an object")
    return header


def load_artifact(path: str | Path, *, kind: str | tuple[str, ...] | None = None) -> Artifact:
    """Read, verify and return an artifact.

    Args:
        path: the ``.safetensors`` file.
        kind: the kind(s) the caller accepts; ``None`` accepts any.

    Raises:
        ArtifactError: missing, unreadable, not safetensors (pickles are refused without being
            opened), corrupt (digest mismatch), of another kind, or of a newer format.
    """
    path = Path(path)
    try:
        data = read_regular_file(path)
    except FileNotFoundError:
        raise ArtifactError(f"artifact {path} does not exist") from None
    except IsADirectoryError:
        raise ArtifactError(f"artifact {path} is a folder, not a .safetensors file") from None
    except OSError as exc:
        raise ArtifactError(f"artifact {path} cannot be read: {exc.strerror}") from None
    header = read_header(data, path)
    raw_meta = header.get("__metadata__")
    if not isinstance(raw_meta, dict) or "stad.kind" not in raw_meta:
        raise ArtifactError(f"{path} is a safetensors file but not a stad artifact (no metadata)")
    meta = {str(k): str(v) for k, v in raw_meta.items()}
    found = meta["stad.kind"]
    try:
        version = int(meta.get("stad.format_version", ""))
    except ValueError:
        raise ArtifactError(f"{path} has an unreadable stad.format_version") from None
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has artifact format {version}, written by stad {meta.get('stad.version')}; "
            f"this stad {__version__} reads up to format {FORMAT_VERSION}: upgrade stad"
        )
    wanted = (kind,) if isinstance(kind, str) else kind
    if wanted is not None and found not in wanted:
        need = " or ".join(f"a {k} artifact (from `{_PRODUCER.get(k, k)}`)" for k in wanted)
        raise ArtifactError(f"{path} is a {found} artifact, but this needs {need}")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path} is corrupt: {exc}") from None
    if meta.get("stad.digest") != _digest(tensors, meta):
        raise ArtifactError(
            f"{path} is corrupt (its digest does not match its contents): "
            "it was damaged after writing; restore it or produce it again"
        )
    try:
        records = {key: json.loads(meta[key] if key != "stad.info" else meta.get(key, "{}"))
                   for key in ("stad.config", "stad.preprocessing", "stad.info")}
        seed = int(meta["stad.seed"])
    except (KeyError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"{path} has incomplete stad metadata ({exc})") from None
    for key, record in records.items():
        if _nested_deeper(record, MAX_METADATA_DEPTH):
            raise ArtifactError(f"{path} has malformed stad metadata: {key} nests more than "
                                f"{MAX_METADATA_DEPTH} levels deep; produce it again")
        if not isinstance(record, dict):
            raise ArtifactError(f"{path} has malformed stad metadata: {key} is a JSON "
                                f"{type(record).__name__}, not an object; produce it again")
    return Artifact(kind=found, tensors=tensors, config=records["stad.config"],
                    preprocessing=records["stad.preprocessing"], seed=seed,
                    info=records["stad.info"], stad_version=meta.get("stad.version", "unknown"),
                    format_version=version)


def record(info: Mapping[str, Any], key: str, what: object) -> dict[str, Any]:
    """``info[key]``, a JSON object read from an artifact's metadata (``{}`` where absent);
    anything else is an :class:`ArtifactError` naming ``what`` (the file), as a malformed
    top-level record is."""
    value = info.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ArtifactError(f"{what} has malformed stad metadata: {key} is a JSON "
                            f"{type(value).__name__}, not an object; produce it again")
    return value


MAX_METADATA_DEPTH = 64
"""How deep stad's JSON metadata may nest (its own nest under ten levels): code that
walks a record recursively then never exhausts Python's stack."""


def _nested_deeper(value: Any, limit: int) -> bool:
    """Whether ``value`` (parsed JSON) nests lists and objects more than ``limit`` deep (a
    container holding no other is one level)."""
    level = [value] if isinstance(value, (dict, list)) else []
    for _ in range(limit):
        level = [v for x in level for v in (x.values() if isinstance(x, dict) else x)
                 if isinstance(v, (dict, list))]
        if not level:
            return False
    return True


def finite_number(value: Any) -> bool:
    """Whether a value read from an artifact's JSON metadata is a finite number (not a bool,
    a string, null, NaN or an infinity): the check of every stored number used in scoring."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # a JSON integer beyond any float (10**400)
        return False


def prefixed(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix.`` with the prefix removed (a state dict of a sub-module)."""
    start = prefix + "."
    return {k[len(start) :]: v for k, v in tensors.items() if k.startswith(start)}


def with_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``state`` with every key put under ``prefix.``."""
    return {f"{prefix}.{k}": v for k, v in state.items()}


# ---- foreign weights (the torchvision ResNet-18 of teacher distillation) ----------------------

_TORCH_SUFFIXES = (".pth", ".pt")


def file_sha256(path: Path) -> str:
    """The SHA-256 of a weights file's bytes (the provenance :func:`read_state_dict` returns),
    without parsing it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: Path, *, what: str) -> tuple[dict[str, torch.Tensor], str]:
    """A state dict of tensors from a ``.safetensors`` or torchvision ``.pth``/``.pt`` file.

    ``.pth`` files are read with ``torch.load(weights_only=True)``, which refuses anything but
    tensors and plain containers: the only ``torch.load`` in stad. The file is read once; the
    SHA-256 of those bytes is returned with the tensors, for provenance.

    Raises:
        UsageError: the file does not exist, is a folder or has another suffix.
        ArtifactError: it cannot be read or parsed, or does not hold a dict of tensors.
    """
    if path.suffix.lower() not in (".safetensors", *_TORCH_SUFFIXES):
        raise UsageError(f"{what} {path} must be a .safetensors or .pth/.pt file holding a "
                         "state dict")
    try:
        data = read_regular_file(path)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} do not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a folder, not a weights file") from None
    except OSError as exc:
        raise ArtifactError(f"{what} {path} cannot be read: {exc.strerror}") from None
    return _parse_state_dict(path, data, what), hashlib.sha256(data).hexdigest()


def _parse_state_dict(path: Path, data: bytes, what: str) -> dict[str, torch.Tensor]:
    if path.suffix.lower() in _TORCH_SUFFIXES:
        try:
            # The one torch.load of stad: weights_only refuses anything but tensors and plain
            # containers. It reads the bytes that were hashed, not the file a second time.
            # (Its warning about the pickle protocol is noise before the one-line error.)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # any failure here means an unusable file
            raise ArtifactError(f"{what} {path} cannot be loaded as a PyTorch state dict "
                                "(read weights only: stad never runs code from a file): "
                                f"{_torch_load_reason(exc)}") from None
    else:
        try:
            state = st_load(data)
        except Exception as exc:  # SafetensorError, ValueError, ...
            raise ArtifactError(f"{what} {path} are not a readable safetensors file: "
                                f"{str(exc)[:200]}") from None
    if not isinstance(state, dict):
        raise ArtifactError(f"{what} {path} hold a {type(state).__name__}, "
                            "not a state dict")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ArtifactError(f"{what} {path} are not a state dict of tensors (entry "
                            f"{bad[0]!r} is a {type(state[bad[0]]).__name__}); if this is a "
                            "training checkpoint, save its model's state_dict() alone")
    for name, tensor in state.items():  # a flaw that would show only as a diverged training
        if name.endswith("num_batches_tracked"):
            continue  # batch-norm's step counter: an integer
        if not tensor.is_floating_point():
            raise ArtifactError(f"{what} {path} hold {name} as {tensor.dtype}, not floating "
                                "point (quantized or converted weights): give the original "
                                "float weights")
        if not bool(torch.isfinite(tensor).all()):
            raise ArtifactError(f"{what} {path} hold NaN or infinite values in {name}: the "
                                "file is damaged; give the original weights")
    return state


def _torch_load_reason(exc: Exception) -> str:
    """What ``torch.load(weights_only=True)`` found wrong, without its advice to load with
    ``weights_only=False`` (which would run the file's code)."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", text,
                      flags=re.S)
    reason = found.group(1) if found and found.group(1).strip() else \
        next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
    return " ".join(reason.split())[:200]


