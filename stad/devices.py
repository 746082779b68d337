"""Which device a command runs on, and in which precision."""

from __future__ import annotations

import os

import torch

from stad.errors import UsageError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for, but torch sees no CUDA device")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {name!r}") from None


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
    tells neither)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
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
