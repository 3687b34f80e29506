"""The resolved backend bundle: hooks answered by the chosen plugin, defaults for the rest."""

from __future__ import annotations

import pytest
import torch

from tokenmill.backend import resolve_backend
from tokenmill.errors import ValidationError
from tokenmill.interfaces import AttentionSpec, KVCacheShape, ShardStyle


@pytest.fixture(scope="module")
def cpu():
    backend, _ = resolve_backend("cpu")
    return backend


def test_cpu_prefers_bf16_when_the_cpu_has_it(cpu) -> None:
    from tokenmill.plugins.cpu.discover import bf16_is_faster

    platform = cpu.init_device()
    assert platform.preferred_dtype == (torch.bfloat16 if bf16_is_faster() else torch.float32)
    assert torch.get_num_threads() >= 1


def test_attention_objects_are_shared_per_spec(cpu) -> None:
    layout = cpu.kv_cache_layout(KVCacheShape(2, 2, 16, torch.float32), torch.device("cpu"))
    spec = AttentionSpec(4, 2, 16, 0.25, torch.float32)
    assert cpu.attention(spec, layout) is cpu.attention(spec, layout)
    other = AttentionSpec(4, 2, 16, 0.25, torch.float32, sliding_window=4)
    assert cpu.attention(other, layout) is not cpu.attention(spec, layout)


def test_quantization_is_validated_against_the_backend(cpu) -> None:
    assert cpu.quantization_method("int8").name == "int8"
    with pytest.raises(ValidationError, match="offers: float, int8"):
        cpu.quantization_method("awq")


def test_optional_hooks_fall_back_to_the_defaults(cpu) -> None:
    assert cpu.shape_buckets(512, 8) is None
    model = torch.nn.Linear(2, 2)
    assert cpu.compile_model(model, None) is model
    plan = cpu.tensor_parallel_plan(2)
    weight = torch.arange(12.0).view(4, 3)
    assert torch.equal(plan.shard(weight, ShardStyle.COLUMN, 1, 2), weight[2:])
    with pytest.raises(ValueError, match="evenly"):
        plan.shard(weight, ShardStyle.ROW, 0, 2)
    assert cpu.communicator(1, 0, torch.device("cpu")).dist_backend == "gloo"


def test_the_token_mask_is_the_cpu_kernel_and_the_default_is_the_reference(cpu) -> None:
    from tokenmill import defaults
    from tokenmill.interfaces import TokenMask
    from tokenmill.plugins.cpu.token_mask import CTokenMask

    assert type(cpu.token_mask()) is CTokenMask
    assert type(defaults.tokenmill_token_mask()) is TokenMask


def test_the_greedy_pick_is_the_cpu_kernel_and_the_default_is_the_reference(cpu) -> None:
    from tokenmill import defaults
    from tokenmill.interfaces import GreedyPick
    from tokenmill.plugins.cpu.greedy_pick import CGreedyPick

    assert type(cpu.greedy_pick()) is CGreedyPick
    assert type(defaults.tokenmill_greedy_pick()) is GreedyPick
