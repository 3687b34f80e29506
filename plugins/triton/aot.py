"""Ahead-of-time compilation of the kernels for real GPU targets, on a machine without a GPU.

The interpreter runs kernels whatever their shapes; the compiler does not (`tl.dot` operands >= 16 on
every side, power-of-two extents, register and shared-memory limits, types in compiled mode). Compiling
every configuration the launchers use, for each target, catches those failures without hardware.
`LAUNCH_CONFIGS` is built from the launchers' own constexpr functions (`ops.py`), so it cannot drift
from what they run.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from tokenmill.plugins.triton import ops
from tokenmill.plugins.triton.interpret import interpreting
from tokenmill.plugins.triton.attention_kernels import (
    paged_decode_kernel,
    ragged_paged_attention_kernel,
    write_kv_cache_kernel,
)
from tokenmill.plugins.triton.layer_ops_kernels import rms_norm_kernel, rotary_kernel, silu_and_mul_kernel

TARGETS = {
    "sm_90a": GPUTarget("cuda", 90, 32),  # H100 / H200
    "sm_80": GPUTarget("cuda", 80, 32),  # A100
    "gfx942": GPUTarget("hip", "gfx942", 64),  # MI300
}

_TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_INDEX_POINTERS = {  # the metadata's dtypes (AttentionMetadata); positions come from the runner as int64
    "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32",
    "slot_mapping_ptr": "*i64", "positions_ptr": "*i64",
}
_FLOAT_SCALARS = {"scale", "softcap", "eps", "offset"}
# A large cache puts these past 2**31 elements; Triton then passes them as i64, so that is the variant built.
_WIDE_SCALARS = {"stride_c_kv", "stride_c_blk"}


class LaunchConfig(NamedTuple):
    kernel: Any  # a @triton.jit function
    signature: dict[str, str]  # Triton type per runtime argument
    constexprs: dict[str, Any]

    @property
    def name(self) -> str:
        pointers = ",".join(sorted({t for t in self.signature.values() if t.startswith("*")}))
        values = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{self.kernel.__name__}[{pointers}; {values}]"


def compile_kernel(fn, signature: dict[str, str], constexprs: dict[str, Any], target: GPUTarget):
    """`fn` compiled for `target`; its ``.asm`` holds the binary (``"cubin"`` or ``"hsaco"``).

    `signature` maps each runtime argument to a Triton type (``"*bf16"``, ``"i32"``, ``"fp32"``...),
    `constexprs` each compile-time argument to its value. `fn` is a module-level `@triton.jit` kernel.
    """
    return compile_kernels([(fn, signature, constexprs, target)])[0]


def compile_kernels(jobs: list[tuple[Any, dict[str, str], dict[str, Any], GPUTarget]]) -> list:
    """`compile_kernel` over many (fn, signature, constexprs, target), in one go.

    Under ``TRITON_INTERPRET=1`` Triton's own library (`tl.sum`, `tl.sigmoid`...) is made of interpreted
    functions the compiler cannot read, so the jobs are compiled by one child process without the
    interpreter; its results land in Triton's on-disk cache, where this process then finds them.
    """
    if interpreting():
        _compile_in_child(jobs)
    return [_compile(*job) for job in jobs]


def _compile(fn, signature, constexprs, target):
    if not isinstance(fn, JITFunction):
        fn = JITFunction(fn.fn)
    full_signature = {**signature, **{name: "constexpr" for name in constexprs}}
    with knobs.runtime.scope():
        # The code generator reads this knob too; in this process it only loads what the child built.
        knobs.runtime.interpret = False
        return triton.compile(ASTSource(fn=fn, signature=full_signature, constexprs=constexprs), target=target)


def _compile_in_child(jobs) -> None:
    """The jobs shared round-robin among one child per CPU core: LLVM compiles one kernel on one core."""
    request = [dict(module=fn.fn.__module__, name=fn.fn.__name__, signature=signature, constexprs=constexprs,
                    target=[target.backend, target.arch, target.warp_size])
               for fn, signature, constexprs, target in jobs]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    children = max(1, min(len(request), len(os.sched_getaffinity(0))))

    def run(share: list[dict]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", __name__], input=json.dumps(share), capture_output=True,
                              text=True, env=env)

    with ThreadPoolExecutor(children) as pool:
        results = list(pool.map(run, [request[i::children] for i in range(children)]))
    failed = [child.stderr[-6000:] for child in results if child.returncode != 0]
    if failed:
        raise RuntimeError("ahead-of-time compilation failed:\n" + "\n".join(failed))


def _serve_child() -> None:
    for job in json.load(sys.stdin):
        fn = getattr(importlib.import_module(job["module"]), job["name"])
        try:
            _compile(fn, job["signature"], job["constexprs"], GPUTarget(*job["target"]))
        except Exception:
            print(f"while compiling {job['name']} for {job['target']} with {job['constexprs']}:", file=sys.stderr)
            raise


def signature_for(fn, constexprs: dict[str, Any], dtype: torch.dtype) -> dict[str, str]:
    """The signature the launchers produce for `fn` on `dtype` tensors (activations, caches, tables)."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            continue
        if name.endswith("_ptr"):
            signature[name] = _INDEX_POINTERS.get(name, "*" + _TRITON_DTYPES[dtype])
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if name in _WIDE_SCALARS else "i32"
    return signature


def _config(fn, constexprs: dict[str, Any], dtype: torch.dtype) -> LaunchConfig:
    return LaunchConfig(fn, signature_for(fn, constexprs, dtype), constexprs)


# (num_heads, num_kv_heads, head_dim): GQA 1 and 4, a padded head dim (Phi-3's 96), Llama-sized heads.
ATTENTION_GEOMETRIES = [(8, 8, 64), (32, 8, 128), (32, 32, 96), (32, 8, 96)]
# (sliding_window, logit_softcap): plain, Mistral's window, Gemma 2's global and its sliding layers.
ATTENTION_FEATURES = [(None, None), (4096, None), (None, 50.0), (4096, 50.0)]
# (hidden or head size for RMSNorm, intermediate size): Llama-8B-like and Phi-3-like sizes.
LAYER_SIZES = [(4096, 14336), (3072, 8192), (96, 80)]


def launch_configs(block_size: int = 16) -> list[LaunchConfig]:
    """Every (kernel, signature, constexprs) the plugins launch for the shapes above, bf16 and fp16."""
    configs = []
    for dtype in (torch.bfloat16, torch.float16):
        for num_heads, num_kv_heads, head_dim in ATTENTION_GEOMETRIES:
            configs.append(_config(write_kv_cache_kernel, ops.write_kv_cache_constexprs(num_kv_heads, head_dim,
                                                                                       block_size), dtype))
            configs.append(_config(rotary_kernel, ops.rotary_constexprs(num_heads, num_kv_heads, head_dim), dtype))
            for window, softcap in ATTENTION_FEATURES:
                for fn, decode in ((ragged_paged_attention_kernel, False), (paged_decode_kernel, True)):
                    constexprs = ops.attention_constexprs(num_heads // num_kv_heads, head_dim, block_size, window,
                                                          softcap, dot_f32=False, decode=decode)
                    configs.append(_config(fn, constexprs, dtype))
        for norm_size, intermediate in LAYER_SIZES:
            for has_residual in (False, True):
                configs.append(_config(rms_norm_kernel, ops.rms_norm_constexprs(norm_size, has_residual), dtype))
            configs.append(_config(silu_and_mul_kernel, ops.silu_and_mul_constexprs(intermediate), dtype))
    return configs


LAUNCH_CONFIGS = launch_configs()


def binary_of(compiled) -> bytes:
    """The device binary of a compiled kernel, whichever vendor's."""
    asm = compiled.asm
    return asm.get("cubin") or asm.get("hsaco") or b""


if __name__ == "__main__":
    _serve_child()
