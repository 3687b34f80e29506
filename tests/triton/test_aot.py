"""Ahead-of-time compilation of the kernels for the GPU targets, with no GPU here.

The compiler rejects what the interpreter lets through (non-power-of-two extents, `tl.dot` operands
under 16, compiled-mode type errors), so this is where a kernel that passes its numerics here but would
not build for an H100 or an MI300 fails. All of `LAUNCH_CONFIGS` on every target takes ~4 minutes on
two cores; each target compiles a third of them instead, every kernel at least twice per target, so
every configuration is compiled somewhere and every kernel everywhere.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tokenmill.plugins.triton import aot
from tokenmill.plugins.triton.attention_kernels import (
    paged_decode_kernel,
    ragged_paged_attention_kernel,
    write_kv_cache_kernel,
)
from tokenmill.plugins.triton.layer_ops_kernels import rms_norm_kernel, rotary_kernel, silu_and_mul_kernel

ATTENTION = (ragged_paged_attention_kernel, paged_decode_kernel)
KERNELS = {write_kv_cache_kernel, *ATTENTION, rms_norm_kernel, rotary_kernel, silu_and_mul_kernel}


def test_launch_configs_cover_every_kernel_and_the_promised_variants() -> None:
    configs = aot.LAUNCH_CONFIGS
    assert {c.kernel for c in configs} == KERNELS
    for c in configs:  # every argument typed or fixed, none twice
        assert sorted([*c.signature, *c.constexprs]) == sorted(c.kernel.arg_names)
    pointer_types = {c.signature.get("out_ptr", c.signature.get("key_ptr")) for c in configs}
    assert {"*bf16", "*fp16"} <= pointer_types
    for kernel in ATTENTION:
        variants = {(c.constexprs["HEAD_DIM"], c.constexprs["HEAD_DIM_PADDED"], c.constexprs["QUERIES_PER_KV"],
                     c.constexprs["USE_WINDOW"], c.constexprs["USE_SOFTCAP"], c.constexprs["DOT_F32"])
                    for c in configs if c.kernel is kernel}
        assert {(d, p) for d, p, *_ in variants} == {(64, 64), (128, 128), (96, 128)}
        assert {v[2] for v in variants} == {1, 4}
        assert {(v[3], v[4]) for v in variants} == {(False, False), (True, False), (False, True), (True, True)}
        assert {v[5] for v in variants} == {False}  # the interpreter's work-around never reaches hardware


def _share(target_index: int) -> list[aot.LaunchConfig]:
    """Every len(TARGETS)-th configuration of each kernel, starting at `target_index`."""
    seen: Counter = Counter()
    picked = []
    for config in aot.LAUNCH_CONFIGS:
        if seen[config.kernel] % len(aot.TARGETS) == target_index:
            picked.append(config)
        seen[config.kernel] += 1
    return picked


@pytest.mark.aot
@pytest.mark.parametrize("target_name", list(aot.TARGETS))
def test_launch_configs_compile_for_target(target_name) -> None:
    target = aot.TARGETS[target_name]
    configs = _share(list(aot.TARGETS).index(target_name))
    assert {c.kernel for c in configs} == KERNELS
    compiled = aot.compile_kernels([(c.kernel, c.signature, c.constexprs, target) for c in configs])
    for config, kernel in zip(configs, compiled):
        assert len(aot.binary_of(kernel)) > 1000, config.name
        if target.backend == "cuda":
            assert f".target {target_name}" in kernel.asm["ptx"], config.name
        else:
            assert f"gfx942" in kernel.asm["amdgcn"], config.name


@pytest.mark.aot
def test_compile_rejects_what_only_the_interpreter_runs() -> None:
    """A head dim of 96 used as a `tl.arange` extent runs in the interpreter; the compiler refuses it."""
    constexprs = aot.ops.attention_constexprs(1, 96, 16, None, None, dot_f32=False, decode=True)
    constexprs["HEAD_DIM_PADDED"] = 96
    signature = aot.signature_for(paged_decode_kernel, constexprs, torch.bfloat16)
    with pytest.raises(RuntimeError, match="power of 2"):
        aot.compile_kernel(paged_decode_kernel, signature, constexprs, aot.TARGETS["sm_80"])
