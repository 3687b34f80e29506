"""The host-sync audit, and the sync-free step it proves: sampler, batch building and forward on `meta`.

Meta tensors have no data, so any read of a value shows up as a counted sync instead of a number; a
trace with none is a step an accelerator can queue without waiting. The attention backend below is
device-generic (torch ops only), checked against transformers on the CPU before it is trusted on meta.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.interfaces import AttentionBackend, AttentionMetadata, AttentionSpec
from tokenmill.model_runner import ModelRunner, SequenceStep
from tokenmill.models import get_model_class
from tokenmill.sampler import Sampler, SamplingMetadata
from tokenmill.sampling_params import SamplingParams
from tokenmill.sync_audit import SyncAudit

from tests.tiny_models import VOCAB, build_tiny

META = torch.device("meta")
BLOCK_SIZE = 4


def _meta_tensor() -> torch.Tensor:
    return torch.zeros(3, 5, device=META)


SYNCING = {
    ".item()": (lambda t: t[0, 0].item(), "aten._local_scalar_dense.default"),
    "bool()": (lambda t: bool(t[0, 0] > 0), "aten._local_scalar_dense.default"),
    "int()": (lambda t: int(t.argmax()), "aten._local_scalar_dense.default"),
    ".tolist()": (lambda t: t.argmax(-1).tolist(), "aten._to_copy.default"),
    ".nonzero()": (lambda t: t.nonzero(), "aten.nonzero.default"),
    ".cpu()": (lambda t: t.cpu(), "aten._to_copy.default"),
    "copy_ to host": (lambda t: torch.empty(3, 5).copy_(t), "aten.copy_.default"),
    "mask index": (lambda t: t[t > 0], "aten.index.Tensor"),
    "masked_select": (lambda t: t.masked_select(t > 0), "aten.masked_select.default"),
    "torch.equal": (lambda t: torch.equal(t, t), "aten.equal.default"),
    "torch.allclose": (lambda t: torch.allclose(t, t), "aten.allclose.default"),
    "torch.is_nonzero": (lambda t: torch.is_nonzero(t[0, :1]), "aten._local_scalar_dense.default"),
    "mask assignment": (lambda t: t.__setitem__(t > 0, 1.0), "aten.index_put_.default"),
    "repeat_interleave": (lambda t: t.long()[0].repeat_interleave(t.long()[1]), "aten.repeat_interleave.Tensor"),
}


@pytest.mark.parametrize("name", SYNCING)
def test_each_host_read_of_a_meta_tensor_is_counted_where_it_happens(name) -> None:
    read, op = SYNCING[name]
    with SyncAudit() as audit:
        read(_meta_tensor())
    assert [sync.op for sync in audit.syncs] == [op]
    assert "test_sync_audit.py" in audit.syncs[0].where


def test_meta_reads_return_dummies_so_a_trace_runs_on() -> None:
    with SyncAudit() as audit:
        t = _meta_tensor()
        values = (t[0, 0].item(), bool(t[0, 0]), t.argmax(-1).tolist(), t.nonzero().shape, t.cpu().device)
    assert values == (0.0, False, [0, 0, 0], (0, 2), torch.device("cpu"))
    assert len(audit.syncs) == 5


def test_device_only_work_and_host_tensors_count_nothing() -> None:
    with SyncAudit() as audit:
        t = torch.randn(4, 8).to(META)
        probs = (t @ t.T).softmax(-1)
        picked = probs.sort(-1, descending=True).values.cumsum(-1).gather(1, probs.argmax(-1, keepdim=True))
        torch.where(picked > 0.5, picked, 0.0).scatter(0, torch.zeros(4, 1, dtype=torch.int64, device=META), 1.0)
        t[torch.tensor([0, 2])].topk(2)
        host = torch.ones(3)
        host.tolist(), host[0].item(), bool(host.any()), host.nonzero()
    assert not audit.syncs, audit.report()


# ---- the sampler ---------------------------------------------------------------------------------

SAMPLED_BATCH = [
    SamplingParams(temperature=0.7, top_k=20, seed=3),
    SamplingParams(temperature=1.0, top_p=0.8, repetition_penalty=1.2, logprobs=True, top_n_tokens=2),
    SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.3),
    SamplingParams(temperature=1.3, typical_p=0.6, min_p=0.05),
]


@pytest.mark.parametrize("params", [[SamplingParams(temperature=0.0)] * 4, SAMPLED_BATCH], ids=["greedy", "sampled"])
def test_the_sampler_never_syncs(params) -> None:
    history = [[5, 9, 9, 40, 7], [0, 1], [3, 3, 3], [8]]
    with SyncAudit() as audit:
        meta = SamplingMetadata.build(params, history, [2, 1, 1, 1], VOCAB, META)
        out = Sampler(seed=0)(torch.randn(4, VOCAB, device=META), meta)
    assert not audit.syncs, audit.report()
    assert out.token_ids.shape == (4,) and out.token_ids.device == META


def test_a_step_reads_ids_and_logprobs_in_one_transfer() -> None:
    with SyncAudit() as audit:
        meta = SamplingMetadata.build(SAMPLED_BATCH, [[1, 2]] * 4, [1] * 4, VOCAB, META)
        Sampler()(torch.randn(4, VOCAB, device=META), meta).tolist()
    assert len(audit.syncs) == 1, audit.report()


def test_the_one_transfer_carries_ids_and_logprobs_exactly() -> None:
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(2)) * 5
    meta = SamplingMetadata.build(SAMPLED_BATCH, [[1, 2]] * 4, [1] * 4, VOCAB, torch.device("cpu"))
    out = Sampler(seed=5)(logits, meta)
    assert out.tolist() == (out.token_ids.tolist(), out.logprobs.tolist(), out.top_token_ids.tolist(),
                            out.top_logprobs.tolist())


# ---- batch building and forward --------------------------------------------------------------------


class GatherAttention(AttentionBackend):
    """Paged attention in torch ops only: each token's context gathered from the cache, then one SDPA.

    The cache is ``(2, num_blocks * block_size, num_kv_heads, head_dim)`` per layer. Shapes come from the
    host-side `max_seq_len`; everything else stays on the device, so the backend runs anywhere.
    """

    def __init__(self, spec: AttentionSpec, block_size: int):
        self.spec = spec
        self.block_size = block_size

    def prepare(self, metadata: AttentionMetadata) -> None:
        device = metadata.seq_lens.device
        ends = metadata.query_start_loc[1:].long()
        token = torch.arange(metadata.slot_mapping.shape[0], device=device)
        seq = torch.searchsorted(ends, token, right=True)
        query_pos = metadata.seq_lens.long()[seq] - (ends[seq] - token)
        key_pos = torch.arange(metadata.max_seq_len, device=device)
        blocks = metadata.block_tables.long()[:, key_pos // self.block_size]
        slots = blocks * self.block_size + key_pos % self.block_size
        visible = key_pos[None, :] <= query_pos[:, None]
        if self.spec.sliding_window is not None:
            visible &= key_pos[None, :] > query_pos[:, None] - self.spec.sliding_window
        metadata.backend_data[self] = (slots[seq], visible)

    def forward(self, query, key, value, kv_cache, metadata):
        kv_cache[0].index_copy_(0, metadata.slot_mapping, key)
        kv_cache[1].index_copy_(0, metadata.slot_mapping, value)
        slots, visible = metadata.backend_data[self]
        tokens, length = slots.shape
        group = self.spec.num_heads // self.spec.num_kv_heads

        def context(cache: torch.Tensor) -> torch.Tensor:  # (tokens, heads, length, head_dim)
            rows = cache[slots][:, :, :, None].expand(tokens, length, self.spec.num_kv_heads, group, -1)
            return rows.reshape(tokens, length, self.spec.num_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(query[:, :, None], context(kv_cache[0]), context(kv_cache[1]),
                                             attn_mask=visible[:, None, None, :], scale=self.spec.scale)
        return out[:, :, 0]


def _runner(tiny, device: torch.device, num_blocks: int) -> ModelRunner:
    backends = []

    def make_attention(spec):
        backends.append(GatherAttention(spec, BLOCK_SIZE))
        return backends[-1]

    config = tiny.config
    model = get_model_class(config)(config, make_attention, torch.float32)
    model.load_weights(tiny.checkpoint().tensors)
    model.to(device).eval()
    head_dim = config.hidden_size // config.num_attention_heads
    caches = [torch.zeros(2, num_blocks * BLOCK_SIZE, config.num_key_value_heads, head_dim, device=device)
              for _ in range(config.num_hidden_layers)]
    return ModelRunner(model, model, caches, backends, BLOCK_SIZE, device)


PROMPTS = [[5, 17, 99, 3, 250], list(range(30, 39)), [7] * 3 + list(range(100, 118))]
TABLES = [[9, 2], [0, 13, 6], [11, 1, 4, 12, 8, 3]]  # shuffled blocks; each covers its prompt and one more token


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llama")


def test_the_gather_backend_matches_transformers_on_the_cpu(tiny) -> None:
    runner = _runner(tiny, torch.device("cpu"), num_blocks=14)
    prefill = [SequenceStep(p, 0, t, 1) for p, t in zip(PROMPTS, TABLES)]
    first = runner.execute(prefill).argmax(-1).tolist()
    decode = [SequenceStep([token], len(p), t, 1) for p, t, token in zip(PROMPTS, TABLES, first)]
    logits = runner.execute(decode)
    for row, (prompt, token) in enumerate(zip(PROMPTS, first)):
        with torch.no_grad():
            expected = tiny.reference(torch.tensor([prompt + [token]])).logits[0]
        assert token == expected[-2].argmax().item()
        torch.testing.assert_close(logits[row], expected[-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("steps", [
    [SequenceStep([42], len(p), t, 1) for p, t in zip(PROMPTS, TABLES)],
    [SequenceStep([42], 5, TABLES[0], 1), SequenceStep(PROMPTS[1], 0, TABLES[1], 1),
     SequenceStep(PROMPTS[2][8:], 8, TABLES[2], 0)],
], ids=["decode", "decode+prefill"])
def test_building_a_step_and_running_the_model_never_syncs(tiny, steps) -> None:
    runner = _runner(tiny, META, num_blocks=14)
    with SyncAudit() as audit:
        logits = runner.execute(steps)
    assert not audit.syncs, audit.report()
    assert logits.shape == (sum(s.num_logits for s in steps), VOCAB)
