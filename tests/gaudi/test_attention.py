"""The gaudi backend's KV layout and static-shape attention, run on host tensors (they are plain torch).

Numerics against the conformance suite's float64 reference, the padding contract (slot -1 writes
nothing, padding sequences and tokens attend to nothing and stay finite), and a tiny model served
through the gaudi layout, attention and buckets on the CPU, token for token as the cpu backend serves it.
Nothing here runs on a Gaudi: what it checks is the code, not its lowering to the HPU.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import run_cli
from tests.cpu_delegate import CPUDelegate
from tests.tiny_models import VOCAB, build_tiny
from tokenmill import hookimpl
from tokenmill.backend import Backend
from tokenmill.conformance.reference import build_paged_batch, reference_attention
from tokenmill.engine import Engine, EngineConfig
from tokenmill.interfaces import AttentionSpec, KVCacheShape, ShapeBuckets
from tokenmill.model_runner import SequenceStep, StepPadding, build_step_inputs
from tokenmill.plugins.gaudi.attention import GaudiKVCacheLayout, GaudiPagedAttention
from tokenmill.plugins.gaudi.buckets import SEQS_ENV, TOKENS_ENV, shape_buckets
from tokenmill.plugins.gaudi.graphs import HpuGraphRunner
from tokenmill.registry import load_registry
from tokenmill.sampling_params import SamplingParams

CPU = torch.device("cpu")
BLOCK = 16


def _layout(num_layers: int = 1, block_size: int = BLOCK, dtype=torch.float32) -> GaudiKVCacheLayout:
    return GaudiKVCacheLayout(KVCacheShape(num_layers, 2, 16, dtype), CPU, block_size)


def _spec(**kwargs) -> AttentionSpec:
    return AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, scale=0.25, dtype=torch.float32, **kwargs)


def test_the_conformance_kernel_cases_pass_on_the_cpu() -> None:
    result = run_cli("conformance", "--backend", "gaudi", "--interpret", "-q")
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, result.stdout[-3000:]


def test_layout_sizes_scratch_rows_and_block_copies() -> None:
    layout = _layout(num_layers=3)
    caches = layout.allocate(5)
    assert [tuple(c.shape) for c in caches] == [(2, 5, BLOCK + 1, 2, 16)] * 3
    assert sum(c.numel() * c.element_size() for c in caches) == 5 * layout.bytes_per_block()
    # Slot s is row s // 16 * 17 + s % 16; slot -1 is block 0's scratch row, which no slot maps to.
    assert layout.cache_rows(torch.tensor([0, 15, 16, 33, -1])).tolist() == [0, 15, 17, 35, 16]
    for cache in caches:
        cache.copy_(torch.randn(cache.shape))
    before = [c.clone() for c in caches]
    layout.copy_blocks(caches, torch.tensor([0, 3]), torch.tensor([4, 1]))
    for cache, old in zip(caches, before):
        assert torch.equal(cache[:, 4], old[:, 0]) and torch.equal(cache[:, 1], old[:, 3])
        assert torch.equal(cache[:, [0, 2, 3]], old[:, [0, 2, 3]])


@pytest.mark.parametrize("spec_kwargs", [{}, {"sliding_window": 7}, {"logit_softcap": 4.0}])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30], ids=["row-by-row", "one-chunk"])
def test_attention_matches_the_reference_in_any_chunking(spec_kwargs, chunk_bytes) -> None:
    spec, layout = _spec(**spec_kwargs), _layout()
    cache = layout.allocate(40)[0]
    attention = GaudiPagedAttention(spec, layout, chunk_bytes=chunk_bytes)
    seqs = [(2 * BLOCK + 1, 1), (0, BLOCK + 2), (BLOCK - 1, 1), (7, BLOCK + 9), (3 * BLOCK, 1)]
    batch = build_paged_batch(layout, 40, spec, seqs, torch.Generator().manual_seed(3), CPU)
    for step in (batch.fill, batch.step):
        attention.prepare(step.metadata)
        out = attention.forward(step.query, step.key, step.value, cache, step.metadata)
    expected = reference_attention(batch.step.query, batch.full_keys, batch.full_values, batch.query_lens, spec)
    assert (out.double() - expected).abs().max().item() < 1e-5


def _padded_and_plain(steps: list[SequenceStep]):
    padding = StepPadding(ShapeBuckets((16, 32), (4, 8), (1, 2, 4)), 4, 64, BLOCK)
    return build_step_inputs(steps, BLOCK, CPU, padding), build_step_inputs(steps, BLOCK, CPU)


@pytest.mark.parametrize("kind", ["mixed", "decode"])
def test_a_padded_step_writes_and_attends_only_its_real_rows(kind) -> None:
    if kind == "mixed":
        steps = [SequenceStep([0] * 3, 20, [5, 2], 1), SequenceStep([0], 40, [7, 1, 9], 1),
                 SequenceStep([0] * 5, 0, [3], 1)]
    else:
        steps = [SequenceStep([0], 40, [7, 1, 9], 1), SequenceStep([0], 4, [3], 1)]
    padded, plain = _padded_and_plain(steps)
    num_real, num_padded = plain.input_ids.shape[0], padded.input_ids.shape[0]
    assert padded.metadata.num_seqs > plain.metadata.num_seqs and num_padded > num_real
    spec, layout = _spec(), _layout()
    generator = torch.Generator().manual_seed(0)
    start = layout.allocate(10)[0].copy_(torch.randn(2, 10, BLOCK + 1, 2, 16, generator=generator))
    q, k, v = (torch.randn(num_real, heads, 16, generator=generator) for heads in (4, 2, 2))
    # Padding tokens carry NaN keys and values: if any of them reached a row that is read, it would show.
    pad = num_padded - num_real
    q_pad = torch.cat([q, torch.randn(pad, 4, 16, generator=generator)])
    k_pad, v_pad = (torch.cat([x, torch.full((pad, 2, 16), float("nan"))]) for x in (k, v))

    attention = GaudiPagedAttention(spec, layout)
    plain_cache, padded_cache = start.clone(), start.clone()
    expected = attention.forward(q, k, v, plain_cache, plain.metadata)
    got = attention.forward(q_pad, k_pad, v_pad, padded_cache, padded.metadata)

    assert torch.allclose(got[:num_real], expected, atol=1e-6)
    assert torch.isfinite(got).all()  # padding tokens and sequences attend to nothing, without NaN
    real_rows = [r for r in range(BLOCK + 1) if r != BLOCK]
    assert torch.equal(padded_cache[:, :, real_rows], plain_cache[:, :, real_rows])
    assert torch.equal(padded_cache[:, 1:, BLOCK], start[:, 1:, BLOCK])  # only block 0's scratch row written


class GaudiOnCPU(CPUDelegate):
    """The gaudi plugin's KV layout, attention and shape buckets on the CPU, its step run through
    `HpuGraphRunner` with capture off: the metadata round trip an HPU graph replays, minus the HPU."""

    reason = "the gaudi backend's torch-native parts, on the CPU"
    ramps = {TOKENS_ENV: "16:64:", SEQS_ENV: "1:4:"}

    def __init__(self) -> None:
        self.mark_steps = 0

    @hookimpl
    def tokenmill_kv_cache_layout(self, shape, device):
        return GaudiKVCacheLayout(shape, device, block_size=BLOCK)

    @hookimpl
    def tokenmill_attention_backend(self, spec, layout):
        return GaudiPagedAttention(spec, layout)

    @hookimpl
    def tokenmill_shape_buckets(self, max_num_tokens, max_num_seqs):
        return shape_buckets(max_num_tokens, max_num_seqs, self.ramps)

    @hookimpl
    def tokenmill_compile_model(self, model):
        def count() -> None:
            self.mark_steps += 1

        return HpuGraphRunner(model, wrap_in_hpu_graph=None, mark_step=count, capture_sizes=())


def _config(backend: str) -> EngineConfig:
    return EngineConfig(backend=backend, dtype="float32", kv_cache_bytes=8 << 20, progress=False,
                        max_num_batched_tokens=128, max_num_seqs=8)


def _traffic() -> tuple[list[list[int]], list[SamplingParams]]:
    """Eleven requests over eight sequence slots: short and long prompts (one chunked over two steps),
    greedy and seeded sampling, prompt logprobs."""
    rng = random.Random(7)
    lengths = [5, 17, 200, 3, 70, 33, 9, 100, 12, 25, 60]
    prompts = [[rng.randrange(4, VOCAB) for _ in range(n)] for n in lengths]
    seeded = [i % 3 == 1 for i in range(len(prompts))]
    params = [SamplingParams(max_new_tokens=rng.randrange(3, 30), ignore_eos=True, temperature=0.8 if s else None,
                             top_k=20 if s else 0, seed=100 + i if s else None, prompt_logprobs=i == 4)
              for i, s in enumerate(seeded)]
    return prompts, params


def test_a_tiny_model_served_through_the_gaudi_parts_gives_the_cpu_backend_tokens() -> None:
    tiny = build_tiny("llama", max_position_embeddings=256)
    prompts, params = _traffic()
    expected = Engine(_config("cpu"), checkpoint=tiny.checkpoint()).generate(prompts, params)

    plugin = GaudiOnCPU()
    engine = Engine(_config("gaudi-cpu"), backend=Backend(load_registry(extra_plugins=[("gaudi-cpu", plugin)]),
                                                          "gaudi-cpu"), checkpoint=tiny.checkpoint())
    assert engine.runner.padding.widths == (1, 2, 4, 8, 16)  # the default ramp, clamped to 256 tokens
    engine.warmup(progress=False)
    warmed = engine.num_step_shapes
    assert plugin.mark_steps == warmed  # one mark_step per step
    got = engine.generate(prompts, params)

    assert [[t.id for o in r for t in o.new_tokens] for r in got] == \
           [[t.id for o in r for t in o.new_tokens] for r in expected]
    got_lps = [i.logprob for i in got[4][0].prompt_logprobs[1:]]
    assert got_lps == pytest.approx([i.logprob for i in expected[4][0].prompt_logprobs[1:]], abs=1e-4)
    assert engine.num_step_shapes == warmed  # serving compiled nothing
    assert len({s.blocks_per_seq for s in engine.runner.step_shapes}) == 5
    assert engine.block_manager.usage == 0
