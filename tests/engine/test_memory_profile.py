"""`MemoryRequest.profile`: the step a GPU backend measures before it sizes the KV cache, run on the CPU."""

from __future__ import annotations

import gc
import weakref

import pytest

from tests.tiny_models import build_tiny
from tokenmill.backend import Backend
from tokenmill.engine import Engine, EngineConfig
from tokenmill.registry import load_registry
from tokenmill.sampling_params import SamplingParams


class ProfilingBackend(Backend):
    """The CPU backend, with a memory budget that profiles first, as a GPU backend's does."""

    def __init__(self) -> None:
        super().__init__(load_registry(), "cpu")
        self.allocations: list[tuple[int, list[weakref.ref]]] = []
        self.prepared: list[tuple[int, int, int]] = []  # (sequences, max query length, logits) per step
        self.alive_after_profile: int | None = None
        self.request = None

    def kv_cache_layout(self, shape, device):
        layout = super().kv_cache_layout(shape, device)
        allocate = layout.allocate

        def recording_allocate(num_blocks):
            caches = allocate(num_blocks)
            self.allocations.append((num_blocks, [weakref.ref(c) for c in caches]))
            return caches

        layout.allocate = recording_allocate
        return layout

    def attention(self, spec, layout):
        backend = super().attention(spec, layout)
        if not hasattr(backend, "_recorded"):
            prepare = backend.prepare

            def recording_prepare(metadata):
                self.prepared.append((metadata.num_seqs, metadata.max_query_len, metadata.max_seq_len))
                return prepare(metadata)

            backend.prepare, backend._recorded = recording_prepare, True
        return backend

    def memory_budget(self, device, request):
        self.request = request
        request.profile()
        gc.collect()
        self.alive_after_profile = sum(ref() is not None for _, refs in self.allocations for ref in refs)
        return super().memory_budget(device, request)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llama", max_position_embeddings=512)


def _config(**overrides) -> EngineConfig:
    return EngineConfig(backend="cpu", dtype="float32", kv_cache_bytes=8 << 20, progress=False, **overrides)


def test_profile_runs_the_largest_step_on_a_scratch_cache_it_frees(tiny) -> None:
    backend = ProfilingBackend()
    engine = Engine(_config(max_num_batched_tokens=200, max_num_seqs=8, memory_fraction=0.7), backend,
                    tiny.checkpoint())
    assert backend.request.memory_fraction == 0.7
    block_size = engine.layout.block_size
    scratch_blocks, _ = backend.allocations[0]
    assert scratch_blocks == -(-200 // block_size)  # just enough blocks for one 200-token prefill chunk
    assert backend.prepared == [(1, 200, 200)]  # one sequence, the whole step budget as one chunk
    assert backend.alive_after_profile == 0  # nothing of the scratch cache outlives the call
    assert backend.allocations[1][0] == engine.num_blocks  # then the real cache, sized after the profile

    prompt = list(range(4, 40))
    outputs = engine.generate([prompt], SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert [t.id for o in outputs[0] for t in o.new_tokens] == tiny.greedy(prompt, 8)


def test_profile_step_is_capped_at_the_model_context(tiny) -> None:
    backend = ProfilingBackend()
    Engine(_config(max_num_batched_tokens=4096, max_model_len=300), backend, tiny.checkpoint())
    assert backend.prepared == [(1, 300, 300)]
