"""How much memory stad may use: a container's limit (control groups) below the machine's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import stad.devices
from stad.devices import available_memory, cgroup_headroom


def _write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text)


def test_v2_the_least_headroom_of_the_cgroup_and_its_parents(tmp_path: Path) -> None:
    proc, root = tmp_path / "cgroup", tmp_path / "fs"
    proc.write_text("0::/ci/job\n")
    _write(root / "ci" / "job", memory_max="1000\n", memory_current="400\n")
    assert cgroup_headroom(proc, root) == 600
    _write(root / "ci", memory_max="500\n", memory_current="450\n")  # a tighter parent
    assert cgroup_headroom(proc, root) == 50
    _write(root / "ci", memory_max="max\n", memory_current="450\n")  # none above
    assert cgroup_headroom(proc, root) == 600
    _write(root / "ci" / "job", memory_max="300\n", memory_current="400\n")  # over its limit
    assert cgroup_headroom(proc, root) == 0


def test_v1_and_a_container_mounted_at_its_own_cgroup(tmp_path: Path) -> None:
    proc, root = tmp_path / "cgroup", tmp_path / "fs"
    # /proc names the host's path; the container sees its own cgroup at the mount point.
    proc.write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    _write(root / "memory", memory_limit_in_bytes="2048\n", memory_usage_in_bytes="48\n")
    assert cgroup_headroom(proc, root) == 2000
    _write(root / "memory", memory_limit_in_bytes="9223372036854771712\n",
           memory_usage_in_bytes="48\n")  # v1's "no limit"
    assert cgroup_headroom(proc, root) is None


def test_no_limit_or_nothing_to_read(tmp_path: Path) -> None:
    assert cgroup_headroom(tmp_path / "missing", tmp_path) is None
    proc = tmp_path / "cgroup"
    proc.write_text("0::/\n")
    assert cgroup_headroom(proc, tmp_path / "empty") is None


def test_available_memory_is_capped_by_the_cgroup(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert available_memory(cpu) > 0  # this machine's MemAvailable (Linux)
    monkeypatch.setattr(stad.devices, "cgroup_headroom", lambda: 12345)
    assert available_memory(cpu) == 12345


def test_a_gpu_number_beyond_the_gpus_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from stad.devices import resolve_device
    from stad.errors import UsageError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UsageError, match="2 CUDA device"):
        resolve_device("cuda:2")
