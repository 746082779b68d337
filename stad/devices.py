"""Which device a command runs on, and in which precision."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from stad.errors import UsageError


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a usage error. A
    :class:`torch.device` is taken as its name."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {name} was asked for (--device, device=, a config file or "
                         "STAD_DEVICE), but torch sees no CUDA device")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"the device (--device, device=) must be auto, cpu, cuda or cuda:N, "
                         f"not {name!r}") from None
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {name} (--device, device=): torch sees "
                         f"{torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware: a CUDA GPU that supports it, or a CPU for
    which oneDNN has a bf16 path (AVX-512 CPUs). Elsewhere bf16 autocast is emulated, and was
    measured 20× slower than fp32 (docs/benchmarks.md, "bf16 without hardware support")."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        try:  # not counting emulation (pre-Ampere GPUs emulate it)
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no such argument
            return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → ``bf16`` where the device computes it natively (:func:`native_bf16`), else
    ``fp32``; ``fp32`` and ``bf16`` as given."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast for the networks (callers keep their losses in fp32), or a disabled
    context; ``auto`` is bf16 only where the device computes it natively
    (:func:`resolve_precision`)."""
    bf16 = resolve_precision(precision, device) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def available_memory(device: torch.device) -> int:
    """Bytes that can be allocated on ``device`` now without swapping: a GPU's free memory, or
    the CPU's ``MemAvailable`` (Linux; elsewhere the free physical pages, or 0 when the system
    tells neither), no more than the process's control group still allows (a container's
    memory limit, :func:`cgroup_headroom`)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = _meminfo_available()
    headroom = cgroup_headroom()
    return free if headroom is None else min(free, headroom)


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0


# cgroup v2 (the unified hierarchy) and v1's memory controller: where, and the limit and usage
_CGROUP_FILES = {2: ("", "memory.max", "memory.current"),
                 1: ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes")}


def cgroup_headroom(proc: Path = Path("/proc/self/cgroup"),
                    root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process's control group may still take, limit minus usage, the least over
    its cgroup and the cgroups above it (v2, or v1's memory controller); None where no limit
    is set or none can be read. Usage counts the page cache, which could be reclaimed, so
    this errs low."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    least = None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        version = 2 if controllers == "" else 1 if "memory" in controllers.split(",") else None
        if version is None:
            continue
        sub, limit_file, usage_file = _CGROUP_FILES[version]
        top = root / sub
        folder = top / path.strip("/")
        # Inside a container the hierarchy is often mounted at the container's own cgroup,
        # so the path /proc names may not exist: its parents up to the mount are tried too.
        for d in [folder, *folder.parents]:
            if d != top and top not in d.parents:
                break
            try:
                limit = (d / limit_file).read_text().strip()
                usage = int((d / usage_file).read_text())
            except (OSError, ValueError):
                continue
            if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
                continue  # no limit (v1 writes a number near 2**63)
            headroom = max(0, int(limit) - usage)
            least = headroom if least is None else min(least, headroom)
    return least
