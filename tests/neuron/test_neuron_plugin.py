"""The neuron plugin's adapter (`NeuronSlotModel`) driven by the engine, over a CPU stand-in of the compiled model.

No Neuron device and no optimum-neuron here: the compiled model is `compiled_standin` (see its module),
which refuses any input but the compiled shapes in int32. What is checked is the adapter's own work:
slots as seq_ids, padding to the compiled shapes, the padding rows' positions, logits rows, and the
greedy tokens that come out, which must be the CPU backend's.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.neuron.compiled_standin import StandInNeuronConfig, compiled_standin
from tests.tiny_models import VOCAB, build_tiny
from tokenmill import hookimpl
from tokenmill.backend import Backend
from tokenmill.engine import Engine, EngineConfig
from tokenmill.errors import BackendUnavailableError, ValidationError
from tokenmill.interfaces import BackendStatus, SlotBatch
from tokenmill.plugins import neuron
from tokenmill.plugins.neuron.executor import NeuronSlotModel
from tokenmill.probe import module_available
from tokenmill.registry import load_registry
from tokenmill.sampling_params import SamplingParams

NUM_SLOTS = 3  # the compiled batch size
SEQUENCE_LENGTH = 128
CONTEXT_LENGTH = 48  # the context-encoding program's width, below the sequence length
BUDGET = 40  # tokens per step: every prompt the engine admits fits the context-encoding program


class NeuronOverStandIn:
    """The neuron plugin's own hooks, except that the compiled model is the CPU stand-in."""

    def __init__(self, neuron_config=None):
        self.neuron_config = neuron_config or StandInNeuronConfig(NUM_SLOTS, SEQUENCE_LENGTH, CONTEXT_LENGTH)

    @hookimpl
    def tokenmill_discover(self):
        return neuron.discover.Discovery(BackendStatus.USABLE, "the neuron adapter over a CPU stand-in", -1)

    @hookimpl
    def tokenmill_init_device(self, device_index):
        return neuron.tokenmill_init_device(device_index)

    @hookimpl
    def tokenmill_model_executor(self, checkpoint):
        return NeuronSlotModel(compiled_standin(checkpoint, self.neuron_config))


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llama")


def _neuron_engine(tiny, plugin=None) -> Engine:
    backend = Backend(load_registry([("neuron-standin", plugin or NeuronOverStandIn())]), "neuron-standin")
    config = EngineConfig(backend="neuron-standin", dtype="float32", progress=False, max_num_batched_tokens=BUDGET,
                          enable_prefix_caching=False)
    return Engine(config, backend=backend, checkpoint=tiny.checkpoint())


def _cpu_engine(tiny) -> Engine:
    config = EngineConfig(backend="cpu", dtype="float32", progress=False, max_num_batched_tokens=BUDGET)
    return Engine(config, checkpoint=tiny.checkpoint())


def _run(engine: Engine, arrivals: dict[int, list]) -> tuple[dict[str, list], dict[str, int]]:
    """Feed the requests at their steps; each request's (token, logprob) pairs, and the step it finished at."""
    tokens, finished_at = {}, {}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for request_id, prompt, max_new in arrivals.get(step, []):
            tokens[request_id] = []
            engine.add_request(request_id, prompt,
                               SamplingParams(max_new_tokens=max_new, ignore_eos=True, logprobs=True))
        for out in engine.step():
            tokens[out.request_id] += [(t.id, t.logprob) for t in out.new_tokens]
            if out.finished:
                finished_at[out.request_id] = step
        step += 1
    return tokens, finished_at


def test_more_requests_than_slots_give_the_cpu_backends_greedy_tokens(tiny) -> None:
    rng = random.Random(7)

    def request(i: int, prompt_len: int) -> tuple[str, list[int], int]:
        return f"r{i}", [rng.randrange(4, VOCAB) for _ in range(prompt_len)], rng.randrange(2, 16)

    # One-token prompts go through token generation beside live slots: their padding rows must not
    # reach those slots' cached tokens. Late arrivals come while the first requests are decoding.
    arrivals = {0: [request(0, 30), request(1, 1), request(2, 12), request(3, 2), request(4, BUDGET)],
                5: [request(5, 1), request(6, 17)], 11: [request(7, 1), request(8, 25)]}
    engine = _neuron_engine(tiny)
    results, finished_at = _run(engine, arrivals)
    reference, _ = _run(_cpu_engine(tiny), arrivals)

    for request_id, prompt, max_new in (r for batch in arrivals.values() for r in batch):
        tokens = [token for token, _ in results[request_id]]
        assert tokens == [token for token, _ in reference[request_id]] == tiny.greedy(prompt, max_new), request_id
        # The logprobs too: a cached key or value overwritten by a padding row shifts them before any argmax.
        logprobs = [logprob for _, logprob in results[request_id]]
        assert logprobs == pytest.approx([logprob for _, logprob in reference[request_id]], abs=1e-4), request_id
    assert len(set(finished_at.values())) > 3  # requests ended at different steps, freeing slots mid-run
    records = list(engine.scheduler.step_records)
    assert not [r for r in records if r.num_prefill_tokens and r.num_decode_tokens]  # programs never mixed
    assert max(len(r.request_ids) for r in records) == NUM_SLOTS  # the slots bounded the batch
    calls = engine.model.model.programs.calls
    assert {c.program for c in calls} == {"context_encoding", "token_generation"}
    assert engine.block_manager.num_free_blocks == NUM_SLOTS
    assert engine.model.lengths.tolist() == [0] * NUM_SLOTS  # every slot freed back to the adapter


def test_the_engine_waits_for_a_free_slot_and_warms_up_on_the_compiled_shapes(tiny) -> None:
    engine = _neuron_engine(tiny)
    engine.warmup()  # a long prompt (context encoding) and a one-token one (token generation)
    assert engine.model.lengths.tolist() == [0] * NUM_SLOTS
    prompts = [[5 + i] * (3 + i) for i in range(NUM_SLOTS + 2)]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_new_tokens=20, ignore_eos=True))
    engine.step()
    assert engine.scheduler.num_running == NUM_SLOTS and engine.scheduler.num_waiting == 2
    outputs = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id] += [t.id for t in out.new_tokens]
    for i, prompt in enumerate(prompts):
        assert outputs[f"r{i}"][-19:] == tiny.greedy(prompt, 20)[-19:]


def _batch(slots, tokens_per_seq, starts, num_logits) -> SlotBatch:
    ids = [t for tokens in tokens_per_seq for t in tokens]
    positions = [start + j for tokens, start in zip(tokens_per_seq, starts) for j in range(len(tokens))]
    bounds = [0]
    for tokens in tokens_per_seq:
        bounds.append(bounds[-1] + len(tokens))
    lens = [len(t) for t in tokens_per_seq]
    return SlotBatch(torch.tensor(ids), torch.tensor(positions), torch.tensor(slots), torch.tensor(bounds),
                     torch.tensor(num_logits), is_decode=all(n == 1 for n in lens) and min(starts) > 0)


def test_the_adapter_feeds_the_compiled_shapes_sorted_by_seq_id_and_returns_rows_in_batch_order(tiny) -> None:
    checkpoint = tiny.checkpoint()
    model = NeuronSlotModel(compiled_standin(checkpoint, StandInNeuronConfig(NUM_SLOTS, SEQUENCE_LENGTH,
                                                                             CONTEXT_LENGTH), padded_vocab=64))
    prompts = {2: [9, 8, 7, 6], 0: [4, 5, 6]}
    logits = model.forward(_batch([2, 0], list(prompts.values()), [0, 0], [1, 1]))
    assert logits.shape == (2, VOCAB) and logits.dtype == torch.float32  # the head's padding trimmed
    firsts = {slot: int(row.argmax()) for slot, row in zip([2, 0], logits)}
    assert firsts == {slot: tiny.greedy(p, 1)[0] for slot, p in prompts.items()}
    calls = model.model.programs.calls
    assert [(c.program, c.seq_ids) for c in calls] == [("context_encoding", [2]), ("context_encoding", [0])]
    assert calls[0].positions[0] == [0, 1, 2, 3] + [0] * (CONTEXT_LENGTH - 4)

    # A decode of slots 2 and 0, in that order: one token-generation run over every seq_id in
    # order, slot 1 (free) padded at position 0, and the logits back in the batch's order.
    logits = model.forward(_batch([2, 0], [[firsts[2]], [firsts[0]]], [4, 3], [1, 1]))
    assert (calls[-1].program, calls[-1].seq_ids, calls[-1].positions) == ("token_generation", [0, 1, 2],
                                                                           [[3], [0], [4]])
    assert [int(row.argmax()) for row in logits] == [tiny.greedy(prompts[2], 2)[1], tiny.greedy(prompts[0], 2)[1]]
    assert model.lengths.tolist() == [4, 0, 5]

    # A one-token prompt into slot 1 while 0 and 2 are live: their padding rows sit at their next positions.
    model.forward(_batch([1], [[11]], [0], [1]))
    assert calls[-1].positions == [[4], [0], [5]]


def test_the_adapter_refuses_what_a_compiled_model_cannot_run(tiny) -> None:
    checkpoint = tiny.checkpoint()
    config = StandInNeuronConfig(NUM_SLOTS, SEQUENCE_LENGTH, CONTEXT_LENGTH)
    model = NeuronSlotModel(compiled_standin(checkpoint, config))
    with pytest.raises(ValidationError, match="prompt logprobs"):
        model.forward(_batch([0], [[4, 5, 6]], [0], [2]))
    with pytest.raises(ValidationError, match=f"longer than the {CONTEXT_LENGTH}"):
        model.forward(_batch([0], [list(range(4, 4 + CONTEXT_LENGTH + 1))], [0], [1]))
    assert model.lengths.tolist() == [0] * NUM_SLOTS and not model.model.programs.calls  # refused before running
    model.forward(_batch([0], [[4, 5, 6]], [0], [1]))
    with pytest.raises(ValidationError, match="encodes a prompt whole"):
        model.forward(_batch([0], [[7, 8]], [3], [1]))  # a continuation of several tokens: chunked prefill
    with pytest.raises(RuntimeError, match="slot 0 holds 3 tokens"):
        model.forward(_batch([0], [[7]], [5], [1]))  # a gap: the request was not fed in order
    with pytest.raises(ValidationError, match="on-device sampling"):
        NeuronSlotModel(compiled_standin(checkpoint, StandInNeuronConfig(2, 64, on_device_sampling=True)))
    with pytest.raises(ValidationError, match="continuous batching"):
        NeuronSlotModel(compiled_standin(checkpoint, StandInNeuronConfig(2, 64, continuous_batching=False)))
    single = NeuronSlotModel(compiled_standin(checkpoint, StandInNeuronConfig(1, 64, continuous_batching=False)))
    assert single.num_slots == 1 and single.max_seq_len == single.max_prompt_len == 64


def test_a_request_may_fill_the_compiled_sequence_length_and_no_more(tiny) -> None:
    engine = _neuron_engine(tiny, NeuronOverStandIn(StandInNeuronConfig(2, 64, 48)))
    assert engine.max_model_len == 64 and engine.scheduler.config.max_num_seqs == 2
    prompt = list(range(4, 34))
    with pytest.raises(ValidationError, match="must be <= 64"):
        engine.add_request("too-long", prompt, SamplingParams(max_new_tokens=35))
    out = engine.generate([prompt], SamplingParams(max_new_tokens=34, ignore_eos=True))[0]
    assert [t.id for o in out for t in o.new_tokens] == tiny.greedy(prompt, 34)  # the last decode at position 62


def test_plugin_hooks_without_the_neuron_sdk() -> None:
    platform = neuron.tokenmill_init_device(0)
    assert platform.device == torch.device("cpu") and platform.preferred_dtype == torch.bfloat16
    assert "sampled on the host" in platform.description
    report = load_registry().reports()["neuron"]
    assert report.missing_hooks == ()  # init_device and model_executor: complete, chosen where the SDK and device are
    if module_available("neuronx_distributed"):
        pytest.skip("the Neuron SDK is installed here")
    assert report.discovery.status is BackendStatus.LIBRARY_MISSING
    assert "neuronx-distributed" in report.discovery.reason and report.discovery.install_extra == "neuron"
    checkpoint = build_tiny("llama").checkpoint()
    with pytest.raises(BackendUnavailableError, match="neuronx-distributed.*not installed"):
        neuron.tokenmill_model_executor(model_id="some/model", checkpoint=checkpoint, dtype=torch.bfloat16,
                                        max_num_seqs=4, max_model_len=128)
    checkpoint.format = "gguf"
    with pytest.raises(ValidationError, match="not GGUF"):
        neuron.tokenmill_model_executor(model_id="model.gguf", checkpoint=checkpoint, dtype=torch.bfloat16,
                                        max_num_seqs=4, max_model_len=128)
