"""Static shapes in the core: a backend that declares `ShapeBuckets` sees only padded, bucketed steps.

The backend under test is the CPU plugin with buckets declared and its compiled forward wrapped to
record every step's shape: serving through it must give the plain CPU backend's tokens, warm-up must
run every shape serving needs, and padding must never write the KV cache.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from tests.cpu_delegate import CPUDelegate
from tests.tiny_models import VOCAB, build_tiny
from tokenmill import hookimpl
from tokenmill.api.metrics import Metrics
from tokenmill.backend import Backend
from tokenmill.engine import Engine, EngineConfig
from tokenmill.interfaces import ShapeBuckets
from tokenmill.model_runner import SequenceStep, StepPadding, build_step_inputs
from tokenmill.plugins import cpu
from tokenmill.registry import load_registry
from tokenmill.sampling_params import SamplingParams

TOKEN_BUCKETS = (16, 32, 64, 128)
SEQ_BUCKETS = (1, 2, 4, 8)
MAX_MODEL_LEN = 512
BLOCK_SIZE = 16


class BucketedCPU(CPUDelegate):
    """The CPU plugin's hooks, plus shape buckets; its forward records each step's shape."""

    reason = "the CPU, with shape buckets"

    def __init__(self) -> None:
        self.shapes: list[tuple[int, int, int, int, int]] = []  # tokens, seqs, table width, max_q, max_seq_len
        self.real_blocks: set[int] = set()  # blocks that a real (seq_len > 0) sequence attended over

    @hookimpl
    def tokenmill_dense_linear_method(self, dtype):
        return cpu.tokenmill_dense_linear_method(dtype)

    @hookimpl
    def tokenmill_layer_ops(self, dtype):
        return cpu.tokenmill_layer_ops(dtype)

    @hookimpl
    def tokenmill_shape_buckets(self, max_num_tokens, max_num_seqs):
        return ShapeBuckets(TOKEN_BUCKETS, SEQ_BUCKETS)

    @hookimpl
    def tokenmill_compile_model(self, model, buckets):
        forward = cpu.tokenmill_compile_model(model, buckets)

        def recording_forward(input_ids, positions, kv_caches, metadata):
            self.shapes.append((input_ids.shape[0], metadata.num_seqs, metadata.block_tables.shape[1],
                                metadata.max_query_len, metadata.max_seq_len))
            for row, seq_len in enumerate(metadata.seq_lens.tolist()):
                self.real_blocks.update(metadata.block_tables[row, : math.ceil(seq_len / BLOCK_SIZE)].tolist())
            return forward(input_ids, positions, kv_caches, metadata)

        return recording_forward


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llama", max_position_embeddings=MAX_MODEL_LEN)


def _config(backend: str) -> EngineConfig:
    # 128 tokens and 8 sequences a step: the buckets' largest, so both engines schedule alike.
    return EngineConfig(backend=backend, dtype="float32", kv_cache_bytes=8 << 20, progress=False,
                        max_num_batched_tokens=128, max_num_seqs=8)


def _bucketed(tiny) -> tuple[Engine, BucketedCPU]:
    plugin = BucketedCPU()
    backend = Backend(load_registry(extra_plugins=[("bucketed", plugin)]), "bucketed")
    return Engine(_config("bucketed"), backend=backend, checkpoint=tiny.checkpoint()), plugin


def _traffic(seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Twelve requests (more than the largest sequence bucket): short and long prompts, one chunked
    over several steps, greedy and seeded sampling, one with prompt logprobs."""
    rng = random.Random(seed)
    lengths = [5, 17, 40, 300, 3, 70, 33, 9, 100, 12, 25, 60]
    prompts = [[rng.randrange(4, VOCAB) for _ in range(n)] for n in lengths]
    params = [SamplingParams(max_new_tokens=rng.randrange(3, 14), ignore_eos=True,
                             temperature=0.8 if i % 2 else None, top_k=20 if i % 2 else 0,
                             seed=1000 + i if i % 2 else None, prompt_logprobs=i == 2)
              for i in range(len(prompts))]
    return prompts, params


def _tokens(outputs) -> list[list[int]]:
    return [[t.id for o in request for t in o.new_tokens] for request in outputs]


def test_bucketed_serving_gives_the_cpu_tokens_in_bucketed_shapes(tiny) -> None:
    prompts, params = _traffic(0)
    reference = Engine(_config("cpu"), checkpoint=tiny.checkpoint())
    expected = reference.generate(prompts, params)
    assert reference.runner.padding is None and reference.num_step_shapes == 0

    engine, plugin = _bucketed(tiny)
    got = engine.generate(prompts, params)

    assert _tokens(got) == _tokens(expected)
    prompt_lps = [(i.id, i.logprob) for i in got[2][0].prompt_logprobs]
    expected_lps = [(i.id, i.logprob) for i in expected[2][0].prompt_logprobs]
    assert [t for t, _ in prompt_lps] == [t for t, _ in expected_lps]
    assert [lp for _, lp in prompt_lps[1:]] == pytest.approx([lp for _, lp in expected_lps[1:]], abs=1e-4)

    width = math.ceil(MAX_MODEL_LEN / BLOCK_SIZE)
    assert plugin.shapes
    for tokens, seqs, table_width, max_query_len, max_seq_len in plugin.shapes:
        assert tokens in TOKEN_BUCKETS and seqs in SEQ_BUCKETS
        assert table_width == width and max_seq_len == MAX_MODEL_LEN
        assert max_query_len in (1, tokens)
    assert any(max_q == 1 for *_, max_q, _ in plugin.shapes) and any(max_q > 1 for *_, max_q, _ in plugin.shapes)
    assert any(seqs == 8 for _, seqs, *_ in plugin.shapes)  # the batch was full: the rest waited
    # Logit rows are padded too: to the sequence bucket, or the token bucket for prompt logprobs.
    assert {s.num_logits for s in engine.runner.step_shapes} <= set(SEQ_BUCKETS) | set(TOKEN_BUCKETS)
    assert any(s.num_logits in set(TOKEN_BUCKETS) - set(SEQ_BUCKETS) for s in engine.runner.step_shapes)


def test_warmup_runs_every_shape_serving_needs_and_padding_writes_no_cache(tiny) -> None:
    engine, plugin = _bucketed(tiny)
    engine.warmup(progress=False)
    warmed = engine.num_step_shapes
    warmed_shapes = set(plugin.shapes)
    assert warmed == len(engine.runner.step_shapes) > len(SEQ_BUCKETS)
    assert engine.block_manager.usage == 0  # warm-up handed out no block

    # Every block holds a sentinel; after serving, the blocks no real sequence used must still hold it.
    for cache in engine.kv_caches:
        cache.fill_(7.0)
    plugin.real_blocks.clear()
    for seed in (1, 2):
        prompts, params = _traffic(seed)
        engine.generate(prompts, params)
        engine.generate([[5] * n for n in (1, 2, 127, 129, 64)], SamplingParams(max_new_tokens=2, ignore_eos=True))

    assert engine.num_step_shapes == warmed  # serving compiled nothing
    assert set(plugin.shapes) == warmed_shapes
    untouched = [b for b in range(engine.num_blocks) if b not in plugin.real_blocks]
    assert untouched and plugin.real_blocks
    for cache in engine.kv_caches:
        assert bool((cache[:, untouched] == 7.0).all())

    metrics = Metrics()
    metrics.observe_engine(engine)
    assert f"tokenmill_compiles_total {float(warmed)}" in metrics.render().decode()


def test_padded_step_inputs_follow_the_padding_contract() -> None:
    padding = StepPadding(ShapeBuckets(TOKEN_BUCKETS, SEQ_BUCKETS), 4, 64)
    steps = [SequenceStep([7, 8, 9], 0, [3], 1), SequenceStep([5], 20, [1, 2], 1), SequenceStep([6], 4, [0], 0)]
    inputs = build_step_inputs(steps, BLOCK_SIZE, torch.device("cpu"), padding)
    meta = inputs.metadata
    assert inputs.input_ids.tolist() == [7, 8, 9, 5, 6] + [0] * 11
    assert meta.slot_mapping.tolist()[:5] == [48, 49, 50, 36, 4] and meta.slot_mapping.tolist()[5:] == [-1] * 11
    assert meta.query_start_loc.tolist() == [0, 3, 4, 5, 5]
    assert meta.seq_lens.tolist() == [3, 21, 5, 0]
    assert meta.block_tables.tolist() == [[3, 0, 0, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert (meta.max_query_len, meta.max_seq_len) == (16, 64)
    assert inputs.logits_indices.tolist() == [2, 3, 0, 0] and inputs.num_logits == 2

    decode = build_step_inputs(steps[1:], BLOCK_SIZE, torch.device("cpu"), padding)
    assert (decode.input_ids.shape[0], decode.metadata.num_seqs, decode.metadata.max_query_len) == (16, 2, 1)
    with pytest.raises(ValueError, match="largest shape"):
        build_step_inputs([SequenceStep([1], 0, [0], 1)] * 9, BLOCK_SIZE, torch.device("cpu"), padding)
    with pytest.raises(ValueError, match="blocks per sequence"):
        build_step_inputs([SequenceStep([1], 70, [0] * 5, 1)], BLOCK_SIZE, torch.device("cpu"), padding)


# ---- the third dimension: block-table widths -------------------------------------------------------

WIDTH_BUCKETS = (1, 2, 4, 8, 64)  # 64 is past the model's 32 blocks: clamped to 32


class WidthBucketedCPU(BucketedCPU):
    """`BucketedCPU` with block-table width buckets too."""

    reason = "the CPU, with 3-D shape buckets"

    @hookimpl
    def tokenmill_shape_buckets(self, max_num_tokens, max_num_seqs):
        return ShapeBuckets(TOKEN_BUCKETS, SEQ_BUCKETS, WIDTH_BUCKETS)


def _width_bucketed(tiny) -> tuple[Engine, WidthBucketedCPU]:
    plugin = WidthBucketedCPU()
    backend = Backend(load_registry(extra_plugins=[("widths", plugin)]), "widths")
    return Engine(_config("widths"), backend=backend, checkpoint=tiny.checkpoint()), plugin


def test_width_buckets_serve_the_cpu_tokens_and_warmup_covers_every_width(tiny) -> None:
    prompts, params = _traffic(3)
    prompts.append([7] * 420)  # a context of 27-31 blocks: the widest bucket
    params.append(SamplingParams(max_new_tokens=60, ignore_eos=True))
    expected = Engine(_config("cpu"), checkpoint=tiny.checkpoint()).generate(prompts, params)

    engine, plugin = _width_bucketed(tiny)
    assert engine.runner.padding.widths == (1, 2, 4, 8, 32)
    engine.warmup(progress=False)
    warmed, warmed_shapes = engine.num_step_shapes, set(plugin.shapes)
    assert {width for _, _, width, _, _ in warmed_shapes} == {1, 2, 4, 8, 32}
    got = engine.generate(prompts, params)

    assert _tokens(got) == _tokens(expected)
    assert engine.num_step_shapes == warmed  # serving compiled nothing
    assert set(plugin.shapes) == warmed_shapes
    served = plugin.shapes[len(warmed_shapes):]
    widths = {width for _, _, width, _, _ in served}
    assert {1, 32} <= widths and len(widths) >= 3  # short steps ran narrow tables, the long one the full width
    for tokens, seqs, width, max_query_len, max_seq_len in served:
        assert width in (1, 2, 4, 8, 32) and max_seq_len == min(width * BLOCK_SIZE, MAX_MODEL_LEN)
    assert engine.block_manager.usage == 0


def test_width_buckets_pad_each_table_to_the_smallest_width_that_holds_the_widest() -> None:
    padding = StepPadding(ShapeBuckets(TOKEN_BUCKETS, SEQ_BUCKETS, (1, 2, 4, 8)), 6, 90, BLOCK_SIZE)
    assert padding.widths == (1, 2, 4, 6)
    steps = [SequenceStep([7, 8], 30, [3, 5, 9], 1), SequenceStep([5], 3, [1], 1)]
    meta = build_step_inputs(steps, BLOCK_SIZE, torch.device("cpu"), padding).metadata
    assert meta.block_tables.tolist() == [[3, 5, 9, 0], [1, 0, 0, 0]]
    assert meta.max_seq_len == 4 * BLOCK_SIZE
    decode = build_step_inputs([SequenceStep([5], 3, [1], 1)], BLOCK_SIZE, torch.device("cpu"), padding)
    assert decode.metadata.block_tables.tolist() == [[1]] and decode.metadata.max_seq_len == BLOCK_SIZE
    widest = build_step_inputs([SequenceStep([5], 85, [0, 1, 2, 3, 4, 5], 1)], BLOCK_SIZE, torch.device("cpu"),
                               padding)
    assert widest.metadata.block_tables.shape[1] == 6 and widest.metadata.max_seq_len == 90
    with pytest.raises(ValueError, match="blocks per sequence"):
        build_step_inputs([SequenceStep([1], 100, [0] * 7, 1)], BLOCK_SIZE, torch.device("cpu"), padding)


def test_width_buckets_that_cannot_hold_the_context_are_refused() -> None:
    with pytest.raises(ValueError, match=r"blocks_per_seq bucket \(4 blocks\) must hold the model's context"):
        StepPadding(ShapeBuckets(TOKEN_BUCKETS, SEQ_BUCKETS, (1, 2, 4)), 6, 90, BLOCK_SIZE)
    with pytest.raises(ValueError, match="needs the block size"):
        StepPadding(ShapeBuckets(TOKEN_BUCKETS, SEQ_BUCKETS, (1, 8)), 6, 90)
    for widths in ((), (4, 2), (0, 4)):
        with pytest.raises(ValueError, match="blocks_per_seq must be a non-empty increasing tuple"):
            ShapeBuckets(TOKEN_BUCKETS, SEQ_BUCKETS, widths)
