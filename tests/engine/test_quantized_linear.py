"""A pre-quantized checkpoint's weights in a `Linear`: fused shards stacked, tensor-parallel cuts made on the
codes as on the dense weight (rows anywhere, inputs at group boundaries), the dense weight never kept."""

from __future__ import annotations

import pytest
import torch

from tests.engine.test_tensor_parallel import _context
from tokenmill.interfaces import QuantizedWeight, ShardStyle
from tokenmill.layers.linear import Linear
from tokenmill.plugins.cpu.quant import DequantizedFloatLinear


def _weight(rows: int, in_features: int, group_size: int, seed: int, act_order: bool = False) -> QuantizedWeight:
    generator = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    codes = torch.randint(0, 16, (rows, in_features), generator=generator, dtype=torch.uint8)
    scales = torch.rand(rows, groups, generator=generator) + 0.5
    offsets = -8 * scales
    order = torch.randperm(in_features, generator=generator) if act_order else None
    return QuantizedWeight("gptq", "uint4", codes, scales, offsets, group_size, order)


@pytest.mark.parametrize("fused", [False, True])
def test_column_parallel_quantized_shards_split_with_each_shard(fused) -> None:
    # q of 8 rows, k and v of 4 (replicated: 2 parts over 4 ranks), as Llama's loader or Phi-3's fused tensor.
    sizes = [8, 4, 4]
    shards = [_weight(size, 64, 32, seed) for seed, size in enumerate(sizes)]
    dense = [shard.dequantize() for shard in shards]
    for rank in range(4):
        parts = [(rank, 4), (rank // 2, 2), (rank // 2, 2)]
        linear = Linear(64, sizes, False, torch.float32, ShardStyle.COLUMN, _context(rank, 4), parts)
        if fused:
            whole = QuantizedWeight("gptq", "uint4", torch.cat([s.codes for s in shards]),
                                    torch.cat([s.scales for s in shards]), torch.cat([s.offsets for s in shards]), 32)
            linear.load_quantized_shard(whole)
        else:
            for index, shard in enumerate(shards):
                linear.load_quantized_shard(shard, index)
        assert linear.weight is None  # no dense copy is kept
        expected = torch.cat([dense[0][2 * rank:2 * rank + 2], dense[1][2 * (rank // 2):2 * (rank // 2) + 2],
                              dense[2][2 * (rank // 2):2 * (rank // 2) + 2]])
        assert torch.equal(linear.quantized_weight().dequantize(), expected)


@pytest.mark.parametrize("group_size", [32, 128])  # per group; one group per row (per-channel)
def test_row_parallel_quantized_weights_split_at_group_boundaries(group_size) -> None:
    weight = _weight(6, 128, group_size, seed=3)
    for rank in range(2):
        linear = Linear(128, [6], False, torch.float32, ShardStyle.ROW, _context(rank, 2))
        linear.load_quantized_shard(weight)
        local = linear.quantized_weight()
        assert local.in_features == 64
        assert torch.equal(local.dequantize(), weight.dequantize()[:, 64 * rank:64 * (rank + 1)])


@pytest.mark.parametrize("world_size,act_order", [(8, False), (2, True)])
def test_row_parallel_cuts_inside_a_group_or_in_act_order_are_refused(world_size, act_order) -> None:
    linear = Linear(128, [6], False, torch.float32, ShardStyle.ROW, _context(1, world_size))
    with pytest.raises(ValueError, match="row-parallel split of 128 inputs .* run this checkpoint with fewer shards"):
        linear.load_quantized_shard(_weight(6, 128, 32, seed=4, act_order=act_order))


def test_a_quantized_linear_runs_its_method_on_the_checkpoint_weight() -> None:
    weight = _weight(12, 64, 32, seed=5, act_order=True)
    linear = Linear(64, [12], True, torch.float32)
    linear.load_quantized_shard(weight)
    linear.load_shard("bias", torch.arange(12.0))
    linear.quantize(DequantizedFloatLinear())
    x = torch.randn(3, 64)
    torch.testing.assert_close(linear(x), x @ weight.dequantize().T + torch.arange(12.0))
    with pytest.raises(ValueError, match="dense tensor for a layer whose other shards are pre-quantized"):
        linear.load_shard("weight", torch.zeros(12, 64))
