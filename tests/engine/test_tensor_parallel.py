"""Tensor parallelism in the core: every family, sharded over 2 and 4 gloo ranks on this machine, gives the
single-process greedy tokens; models that do not split are refused with the counts that work.

One spawn of N ranks runs every case (spawning costs seconds a process). Every rank runs the same
deterministic schedule (SPMD), so their collectives line up; rank 0 reports the tokens.
"""

from __future__ import annotations

import queue as queue_module
import random
import time
import traceback
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from tests.tiny_models import build_tiny
from tokenmill.defaults import EvenSplitPlan
from tokenmill.engine import Engine, EngineConfig
from tokenmill.errors import ValidationError
from tokenmill.interfaces import Communicator, GGMLWeight, ShardStyle
from tokenmill.layers.linear import Linear
from tokenmill.layers.vocab_parallel import ParallelLMHead
from tokenmill.models import get_model_class, kv_cache_shape
from tokenmill.parallel import ParallelContext, TorchDistributedCommunicator
from tokenmill.sampling_params import SamplingParams
from tokenmill.conformance.ports import free_port

RANK_TIMEOUT_S = 240

# name -> (family, config overrides, --quantize). The tiny models have 4 heads and 2 kv heads: 2 ranks
# split the kv heads, 4 ranks replicate each on two ranks. A vocabulary of 251 pads over 2 and 4 ranks.
CASES: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "llama": ("llama", {}, None),
    "llama_o_proj_bias": ("llama", {"attention_bias": True}, None),
    "llama_tied_padded_vocab": ("llama_tied", {"vocab_size": 251}, None),
    "mistral": ("mistral", {}, None),
    "qwen2": ("qwen2", {}, None),
    "qwen3": ("qwen3", {}, None),
    "phi3": ("phi3", {}, None),
    "qwen2_moe": ("qwen2_moe", {}, None),  # experts, a shared expert and a dense layer, each split over the ranks
    "gemma2": ("gemma2", {}, None),
    "phi_padded_vocab": ("phi", {"vocab_size": 251}, None),  # the head's bias is padded and sliced too
    "llama_int8": ("llama", {}, "int8"),
    "phi3_int8": ("phi3", {}, "int8"),
}


def _prompts() -> list[list[int]]:
    # Mixed lengths in one batch, one past Mistral's 24-token window.
    rng = random.Random(14)
    return [[rng.randrange(4, 251) for _ in range(n)] for n in (3, 17, 40, 9)]


def _tiny(case: str):
    """The case's tiny model, its biases made non-zero (transformers starts them at zero, which would
    hide a bias sliced wrongly or added on every rank)."""
    family, overrides, _ = CASES[case]
    tiny = build_tiny(family, **overrides)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in tiny.reference.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return tiny


def _generate(case: str, parallel: ParallelContext | None = None) -> dict[str, Any]:
    """Greedy tokens of every prompt, the logprobs of the prompts' own tokens, and how o_proj is held."""
    _, _, quantize_method = CASES[case]
    config = EngineConfig(backend="cpu", dtype="float32", kv_cache_bytes=4 << 20, progress=False,
                          quantize=quantize_method)
    engine = Engine(config, checkpoint=_tiny(case).checkpoint(), parallel=parallel)
    if parallel is not None:
        torch.set_num_threads(1)  # the engine asked for every core; the ranks share them
    outputs = engine.generate(_prompts(), SamplingParams(max_new_tokens=8, ignore_eos=True, prompt_logprobs=True))
    o_proj = engine.model.layers[0].self_attn.o_proj
    return {
        "tokens": [[t.id for o in per_prompt for t in o.new_tokens] for per_prompt in outputs],
        "prompt_logprobs": [t.logprob for per_prompt in outputs for t in per_prompt[0].prompt_logprobs[1:]],
        "methods": {type(m.quant_method).__name__ for m in engine.model.modules() if isinstance(m, Linear)},
        "o_proj": tuple((o_proj.weight if o_proj.quant_method is None else o_proj.quantized.weight).shape),
    }


def _rank_main(rank: int, world_size: int, port: int, cases: list[str], queue: Any) -> None:
    try:
        torch.set_num_threads(1)
        comm = TorchDistributedCommunicator("gloo", world_size, rank, init_method=f"tcp://127.0.0.1:{port}")
        parallel = ParallelContext(rank, world_size, comm, EvenSplitPlan())
        results = {case: _generate(case, parallel) for case in cases}
        dist.destroy_process_group()
        queue.put((rank, results if rank == 0 else None, None))
    except BaseException:  # noqa: BLE001 - reported to the test, which would otherwise wait for a hung rank
        queue.put((rank, None, traceback.format_exc()))


def _run_ranks(world_size: int, cases: list[str]) -> dict[str, dict[str, Any]]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    procs = [context.Process(target=_rank_main, args=(rank, world_size, port, cases, queue), daemon=True)
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    reports: dict[int, tuple[Any, str | None]] = {}
    deadline = time.monotonic() + RANK_TIMEOUT_S
    try:
        while len(reports) < world_size:
            # A rank that died without a word (or hangs) fails the test now rather than at the deadline.
            silent = [rank for rank, proc in enumerate(procs) if rank not in reports and proc.exitcode is not None]
            try:
                rank, results, error = queue.get(timeout=5 if silent else 1)
            except queue_module.Empty:
                if silent or time.monotonic() > deadline:
                    raise AssertionError(f"ranks {silent or sorted(set(range(world_size)) - set(reports))} of "
                                         f"{world_size} never reported") from None
                continue
            reports[rank] = (results, error)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    errors = [f"rank {rank}:\n{error}" for rank, (_, error) in sorted(reports.items()) if error]
    assert not errors, "\n".join(errors)
    return reports[0][0]


@pytest.fixture(scope="module")
def single_rank() -> dict[str, dict[str, Any]]:
    return {case: _generate(case) for case in CASES}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}-ranks")
def sharded(request) -> tuple[int, dict[str, dict[str, Any]]]:
    return request.param, _run_ranks(request.param, list(CASES))


def test_single_rank_matches_transformers(single_rank) -> None:
    for case, result in single_rank.items():
        if CASES[case][2] is None:
            tiny = _tiny(case)
            assert result["tokens"] == [tiny.greedy(prompt, 8) for prompt in _prompts()], case


def test_sharded_ranks_give_the_single_rank_tokens(single_rank, sharded) -> None:
    world_size, results = sharded
    for case in CASES:
        if CASES[case][2] is None:
            assert results[case]["tokens"] == single_rank[case]["tokens"], f"{case} over {world_size} ranks"
            assert results[case]["methods"] == {"NoneType"}
        rows, inputs = single_rank[case]["o_proj"]
        assert results[case]["o_proj"] == (rows, inputs // world_size)  # this rank's heads' inputs only
        expected = torch.tensor(single_rank[case]["prompt_logprobs"])
        tolerance = 1e-4 if CASES[case][2] is None else 1e-2
        torch.testing.assert_close(torch.tensor(results[case]["prompt_logprobs"]), expected, rtol=0, atol=tolerance)


def test_int8_runs_on_each_rank_s_shard(single_rank, sharded) -> None:
    # Int8WeightOnly scales each output row by its largest weight. A row-parallel layer's rank holds part of
    # each row, so its scales come from that part: a slightly different (finer) quantization than one
    # process's, hence logprobs within int8's error (checked above) rather than identical tokens.
    _, results = sharded
    for case in ("llama_int8", "phi3_int8"):
        assert results[case]["methods"] == single_rank[case]["methods"] == {"Int8WeightOnly"}


# ---- refusals, shapes and the decode stack, built in this process ------------------------------------


class _MirrorCommunicator(Communicator):
    """One rank of a group built alone in this process: the other ranks are taken to hold what this one
    holds, enough for the engine's set-up to agree with itself; no model step is run through it."""

    dist_backend = "none"

    def __init__(self, world_size: int, rank: int):
        self.world_size, self.rank = world_size, rank

    def all_reduce(self, tensor):
        raise AssertionError("a rank built alone runs no model step")

    def all_gather(self, tensor, dim=-1):
        return torch.cat([tensor] * self.world_size, dim=dim)


def _context(rank: int, world_size: int) -> ParallelContext:
    return ParallelContext(rank, world_size, _MirrorCommunicator(world_size, rank), EvenSplitPlan())


def _smollm2_shape(**overrides):
    config = transformers.LlamaConfig(**{**dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                                                intermediate_size=1536, vocab_size=49152, num_hidden_layers=1,
                                                max_position_embeddings=64), **overrides})
    config.architectures = ["LlamaForCausalLM"]
    return config


def _build_on_meta(config, parallel: ParallelContext):
    with torch.device("meta"):
        return get_model_class(config)(config, lambda spec: spec, torch.float32, parallel)


def test_a_model_that_does_not_split_is_refused_with_the_counts_that_work() -> None:
    config = _smollm2_shape()
    message = "cannot shard 9 attention heads over 2 ranks; --num-shard values that work for this model: 1, 3$"
    with pytest.raises(ValidationError, match=message):
        _build_on_meta(config, _context(0, 2))
    with pytest.raises(ValidationError, match=message):
        kv_cache_shape(config, torch.float32, _context(0, 2))
    # 9 divides the heads and replicates the 3 kv heads, but 1536 intermediate features do not split in 9.
    with pytest.raises(ValidationError, match="cannot shard an intermediate size of 1536 over 9 ranks"):
        _build_on_meta(config, _context(0, 9))
    with pytest.raises(ValidationError, match="cannot shard 3 key-value heads over 2 ranks"):
        _build_on_meta(_smollm2_shape(num_attention_heads=12, num_key_value_heads=3), _context(0, 2))
    model = _build_on_meta(config, _context(2, 3))
    assert model.layers[0].self_attn.attn.backend.num_heads == 3  # the spec make_attention got
    assert model.layers[0].self_attn.attn.backend.num_kv_heads == 1
    assert tuple(model.embed_tokens.weight.shape) == (49152 // 3, 576)


def test_experts_that_do_not_split_are_refused() -> None:
    config = build_tiny("qwen2_moe", moe_intermediate_size=30).config
    with pytest.raises(ValidationError, match="cannot shard the experts' moe_intermediate_size of 30 over 4 ranks"):
        _build_on_meta(config, _context(0, 4))
    model = _build_on_meta(config, _context(1, 2))
    assert tuple(model.layers[1].mlp.experts.down_proj.shape) == (8, 64, 15)  # every expert, half its features


@pytest.mark.parametrize("world_size,heads,kv_heads", [(1, 4, 2), (2, 2, 1), (4, 1, 1)])
def test_a_rank_holds_and_caches_only_its_heads(world_size, heads, kv_heads) -> None:
    tiny = build_tiny("qwen3")  # head_dim 32 over a hidden size of 64: not hidden // heads
    parallel = _context(world_size - 1, world_size)
    config = EngineConfig(backend="cpu", dtype="float32", kv_cache_bytes=1 << 20, progress=False)
    engine = Engine(config, checkpoint=tiny.checkpoint(), parallel=parallel)
    spec = engine.model.layers[0].self_attn.attn.backend.spec
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (heads, kv_heads, 32)
    assert kv_cache_shape(tiny.config, torch.float32, parallel).num_kv_heads == kv_heads
    one_rank = Engine(config, checkpoint=tiny.checkpoint())
    assert engine.layout.bytes_per_block() * 2 == one_rank.layout.bytes_per_block() * kv_heads


def test_the_decode_stack_takes_single_rank_models_and_refuses_sharded_ones() -> None:
    from tokenmill.plugins.cpu.decode_stack import CapturedForward
    from tokenmill.plugins.cpu.quant import bf16_gemm_available

    if not bf16_gemm_available():
        pytest.skip("the decode stack needs AVX512-BF16 kernels")
    config = EngineConfig(backend="cpu", dtype="bfloat16", kv_cache_bytes=1 << 20, progress=False)
    tiny = build_tiny("llama")
    assert isinstance(Engine(config, checkpoint=tiny.checkpoint()).runner.forward, CapturedForward)
    sharded = Engine(config, checkpoint=tiny.checkpoint(), parallel=_context(0, 2))
    assert sharded.runner.forward is sharded.model


# ---- GGUF blocks of a sharded Linear -------------------------------------------------------------------


def _quantized(rows: int, in_features: int, ggml_type: GGMLQuantizationType, seed: int):
    """(dense weight, GGMLWeight) with the dense weight exactly the blocks' values."""
    values = np.random.default_rng(seed).standard_normal((rows, in_features)).astype(np.float32)
    blocks = quantize(values, ggml_type)
    return torch.from_numpy(dequantize(blocks, ggml_type)), GGMLWeight(ggml_type.name, torch.from_numpy(blocks),
                                                                       in_features)


def _blocks_value(weight: GGMLWeight) -> torch.Tensor:
    return torch.from_numpy(dequantize(weight.blocks.numpy(), GGMLQuantizationType[weight.ggml_type]))


@pytest.mark.parametrize("fused", [False, True])
def test_column_parallel_ggml_blocks_split_with_each_shard(fused) -> None:
    # q of 8 rows, k and v of 4 (replicated: 2 parts over 4 ranks), as Llama's loader or Phi-3's fused tensor.
    sizes, ggml_type = [8, 4, 4], GGMLQuantizationType.Q8_0
    shards = [_quantized(size, 64, ggml_type, seed) for seed, size in enumerate(sizes)]
    for rank in range(4):
        parts = [(rank, 4), (rank // 2, 2), (rank // 2, 2)]
        linear = Linear(64, sizes, False, torch.float32, ShardStyle.COLUMN, _context(rank, 4), parts)
        if fused:
            linear.load_fused("weight", torch.cat([dense for dense, _ in shards]))
            linear.load_ggml_shard(GGMLWeight(ggml_type.name, torch.cat([w.blocks for _, w in shards]), 64))
        else:
            for index, (dense, weight) in enumerate(shards):
                linear.load_shard("weight", dense, index)
                linear.load_ggml_shard(weight, index)
        expected = torch.cat([shards[0][0][2 * rank:2 * rank + 2], shards[1][0][2 * (rank // 2):2 * (rank // 2) + 2],
                              shards[2][0][2 * (rank // 2):2 * (rank // 2) + 2]])
        assert torch.equal(linear.weight, expected)
        assert torch.equal(_blocks_value(linear.ggml_weight()), expected)


def test_row_parallel_ggml_blocks_split_on_whole_blocks_else_are_dropped() -> None:
    dense, weight = _quantized(6, 128, GGMLQuantizationType.Q4_1, seed=3)  # 4 blocks of 32 inputs a row
    for rank in range(2):
        linear = Linear(128, [6], False, torch.float32, ShardStyle.ROW, _context(rank, 2))
        linear.load_shard("weight", dense)
        linear.load_ggml_shard(weight)
        local = linear.ggml_weight()
        assert local.in_features == 64
        assert torch.equal(_blocks_value(local), dense[:, 64 * rank:64 * (rank + 1)])
        assert torch.equal(linear.weight, dense[:, 64 * rank:64 * (rank + 1)])
    # 128 inputs over 8 ranks is 16 a rank, half a block: the layer keeps only its dense weight.
    linear = Linear(128, [6], False, torch.float32, ShardStyle.ROW, _context(5, 8))
    linear.load_shard("weight", dense)
    linear.load_ggml_shard(weight)
    assert linear.ggml_weight() is None
    assert torch.equal(linear.weight, dense[:, 80:96])


def test_a_padded_head_slice_has_zero_rows_in_dense_and_blocks() -> None:
    dense, weight = _quantized(5, 32, GGMLQuantizationType.Q8_0, seed=4)  # 5 tokens over 2 ranks: 3 + 2 and a pad
    head = ParallelLMHead(32, 5, torch.float32, _context(1, 2))
    head.load_shard("weight", dense)
    head.load_ggml_shard(weight)
    expected = torch.cat([dense[3:], torch.zeros(1, 32)])
    assert torch.equal(head.weight, expected)
    assert torch.equal(_blocks_value(head.ggml_weight()), expected)
