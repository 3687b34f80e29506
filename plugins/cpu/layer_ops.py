"""Fused bf16 layer ops (plugins/cpu/csrc/layer_ops.c) behind the `LayerOps` interface.

Each method takes the kernel for bf16 tensors laid out as the kernel reads them and defers to the
PyTorch reference otherwise (float32 above all: the fp32 parity tests compare the reference ops).
"""

from __future__ import annotations

import torch

from tokenmill.interfaces import LayerOps

try:
    from tokenmill.plugins.cpu import _layer_ops
except ImportError:  # pragma: no cover - depends on the build
    _layer_ops = None


def fused_layer_ops_available() -> bool:
    return _layer_ops is not None


def _bf16(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.bfloat16 for t in tensors)


def _heads_contiguous(x: torch.Tensor) -> bool:
    """(tokens, heads, head_dim) with each token's heads side by side; tokens may be strided."""
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]


class CPUFusedLayerOps(LayerOps):
    def rms_norm(self, x, residual, weight, eps, offset=0.0):
        if residual is None and _bf16(x, weight) and _heads_contiguous(x) and not x.is_contiguous() \
                and weight.is_contiguous():
            return self._rms_norm_heads(x, weight, eps, offset)
        if not (_bf16(x, weight) and x.is_contiguous() and weight.is_contiguous()
                and (residual is None or (_bf16(residual) and residual.is_contiguous() and residual.shape == x.shape))):
            return super().rms_norm(x, residual, weight, eps, offset)
        size = x.shape[-1]
        out = torch.empty_like(x)
        summed = torch.empty_like(x) if residual is not None else None
        _layer_ops.add_rms_norm(x.data_ptr(), 0 if residual is None else residual.data_ptr(), weight.data_ptr(),
                                out.data_ptr(), 0 if summed is None else summed.data_ptr(), x.numel() // size, size,
                                eps, offset, torch.get_num_threads())
        return out if residual is None else (out, summed)

    def _rms_norm_heads(self, x, weight, eps, offset):
        """Qwen3's q/k norm: each head of a (tokens, heads, head_dim) slice of the fused projection's output, by
        the kernel the C decode step runs on it in place (decode_stack.c), so both give the same numbers."""
        tokens, heads, head_dim = x.shape
        out = torch.empty(x.shape, dtype=x.dtype)
        _layer_ops.rms_norm_heads(x.data_ptr(), tokens, x.stride(0), heads, head_dim, weight.data_ptr(), out.data_ptr(),
                                  heads * head_dim, eps, offset, torch.get_num_threads())
        return out

    def rotary(self, positions, query, key, cos, sin):
        if not (_bf16(query, key, cos, sin) and _heads_contiguous(query) and _heads_contiguous(key)
                and cos.is_contiguous() and sin.is_contiguous() and query.shape[2] % 2 == 0):
            return super().rotary(positions, query, key, cos, sin)
        positions = positions.contiguous()
        head_dim, threads = query.shape[2], torch.get_num_threads()
        adjacent = (key.data_ptr() == query.data_ptr() + query.shape[1] * head_dim * query.element_size()
                    and key.stride(0) == query.stride(0))
        # Queries and keys side by side in the fused projection's output: one pass over both.
        parts = [(query, query.shape[1] + key.shape[1])] if adjacent else [(query, query.shape[1]), (key, key.shape[1])]
        for tensor, heads in parts:
            _layer_ops.rotary(tensor.data_ptr(), tensor.shape[0], tensor.stride(0), heads, head_dim,
                              positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), threads)
        return query, key

    def silu_and_mul(self, gate_up):
        if not (_bf16(gate_up) and gate_up.is_contiguous()):
            return super().silu_and_mul(gate_up)
        size = gate_up.shape[-1] // 2
        out = gate_up.new_empty(*gate_up.shape[:-1], size)
        _layer_ops.silu_and_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * size), size,
                                torch.get_num_threads())
        return out
