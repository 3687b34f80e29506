"""What this CPU offers: cores we may use, memory, and the instruction sets that pick the dtype."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch

from tokenmill.interfaces import BackendStatus, DeviceInfo, Discovery

PRIORITY = 10  # the fallback: any accelerator that is usable outranks it

# cpuinfo flags that give the CPU native bf16 dot products (AVX512-BF16, AMX).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags line of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (affinity and cgroup-pinned sets, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def has_native_bf16() -> bool:
    return any(flag in cpu_flags() for flag in BF16_FLAGS)


def bf16_is_faster() -> bool:
    """Whether bf16 beats float32 here: the CPU multiplies bf16 itself, or the backend's kernels run bf16
    weights in float32 arithmetic at half the bytes (AVX2 alone: csrc/avx2_gemm.h; SmolLM2's decode step on
    a Zen 1 EPYC, float32 against bfloat16: one row 64.4 against 13.2 ms, 64 rows 469 against 391 ms)."""
    from tokenmill.plugins.cpu.quant import bf16_gemm_available  # the C extension, only when asked

    return has_native_bf16() or bf16_gemm_available()


def bf16_description() -> str:
    if has_native_bf16():
        return "native bf16 (bfloat16 by default)"
    if bf16_is_faster():
        return "bf16 weights on AVX2 kernels (bfloat16 by default)"
    return "no native bf16 (float32 by default)"


def _meminfo() -> dict[str, int]:
    values = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, rest = line.split(":", 1)
            values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return values


def memory_bytes() -> tuple[int, int | None]:
    """(total, available) system memory in bytes."""
    info = _meminfo()
    total = info.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total, info.get("MemAvailable")


def discover() -> Discovery:
    total, available = memory_bytes()
    flags = cpu_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    properties = {
        "cores": str(usable_cores()),
        "torch_capability": capability,
        "flags": " ".join(f for f in REPORTED_FLAGS if f in flags) or "none reported",
        "dtype": "bfloat16" if bf16_is_faster() else "float32",
    }
    device = DeviceInfo(0, cpu_model_name(), total, available, properties)
    reason = f"{usable_cores()} cores, {capability}, {bf16_description()}"
    return Discovery(
        status=BackendStatus.USABLE,
        reason=reason,
        priority=PRIORITY,
        devices=(device,),
        versions={"torch": torch.__version__, "python": platform.python_version()},
    )
