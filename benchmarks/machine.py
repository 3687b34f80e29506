"""The machine the run happened on, and its two bounds measured in the same run: read bandwidth and bf16 matmul."""

import os
import platform
import time

import torch

INTERESTING_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


def _cpu_info() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    flags = [flag for flag in INTERESTING_FLAGS if flag in present]
                    break
    except OSError:
        pass
    return model, flags


def _best_of(runs: int, fn) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth_gbs(threads: int) -> float:
    """Streaming read of 1 GiB (a sum), best of five: the bound on reading weights during decode."""
    torch.set_num_threads(threads)
    data = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    data.sum()
    seconds = _best_of(5, data.sum)
    return data.numel() * 4 / seconds / 1e9


def bf16_matmul_gflops(threads: int, size: int = 2048) -> float:
    """PyTorch's bf16 matmul rate at `size`, or at 256 where a 256 one shows it emulated (AVX2 without native
    bf16 runs it at ~0.2 GFLOP/s: six 2048 ones would take nine minutes)."""
    torch.set_num_threads(threads)
    small = torch.randn(256, 256, dtype=torch.bfloat16)
    small @ small
    if 2 * 256**3 / _best_of(2, lambda: small @ small) / 1e9 < 20:
        size = 256
    a = torch.randn(size, size, dtype=torch.bfloat16)
    b = torch.randn(size, size, dtype=torch.bfloat16)
    a @ b
    seconds = _best_of(5, lambda: a @ b)
    return 2 * size**3 / seconds / 1e9


def describe_machine(threads: int) -> dict:
    model, flags = _cpu_info()
    return {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "flags": flags,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "threads": threads,
        "read_bandwidth_gbs": round(read_bandwidth_gbs(threads), 1),
        "bf16_matmul_gflops": round(bf16_matmul_gflops(threads), 1),
        "torch": torch.__version__,
    }
