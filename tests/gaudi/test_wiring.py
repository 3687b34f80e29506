"""How the gaudi backend drives Habana's runtime: lazy mode, HPU graphs per shape, mark_step, memory, HCCL.

FAKE RUNTIME. habana_frameworks is not installed here (it is not on PyPI), so these wiring tests put a
stand-in for it in ``sys.modules``: `FakeHabana` records what the plugin calls and runs the model on
the CPU. Passing them shows which runtime calls the plugin makes and when, never that anything ran on
a Gaudi. Every other gaudi test runs without it.
"""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from tests.gaudi.test_attention import GaudiOnCPU, _config, _traffic
from tests.tiny_models import build_tiny
from tokenmill import hookimpl
from tokenmill.backend import Backend
from tokenmill.engine import Engine
from tokenmill.interfaces import MemoryRequest
from tokenmill.plugins import gaudi
from tokenmill.registry import load_registry

GIB = 1 << 30


class FakeHabana:
    """A stand-in for habana_frameworks that records calls; HPU graphs are emulated by keying each call
    as the real ``wrap_in_hpu_graph`` does (tensors by shape, anything else by value) and counting
    captures, then running the module's forward on the CPU."""

    def __init__(self, cards: int = 1, limit: int = 100 * GIB, max_in_use: int = 30 * GIB):
        self.events: list[str] = []
        self.wrap_kwargs: list[dict] = []
        self.graph_keys: set = set()
        self.graph_calls = 0
        self.stats = {"Limit": limit, "MaxInUse": max_in_use, "InUse": max_in_use}
        self.cards = cards

    def install(self, monkeypatch) -> None:
        def module(name: str, **attributes) -> None:
            monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(__name__=name, **attributes))

        module("habana_frameworks")
        module("habana_frameworks.torch")
        module("habana_frameworks.torch.core", mark_step=lambda: self.events.append("mark_step"))
        module("habana_frameworks.torch.hpu", is_available=lambda: self.cards > 0, device_count=lambda: self.cards,
               get_device_name=lambda: "GAUDI2 (fake)", wrap_in_hpu_graph=self.wrap_in_hpu_graph,
               reset_peak_memory_stats=lambda: self.events.append("reset_peak"),
               synchronize=lambda: self.events.append("synchronize"), memory_stats=lambda: dict(self.stats))
        module("habana_frameworks.torch.distributed")
        module("habana_frameworks.torch.distributed.hccl")

    def wrap_in_hpu_graph(self, module: torch.nn.Module, **kwargs) -> torch.nn.Module:
        self.wrap_kwargs.append(kwargs)
        forward = module.forward

        def key(value):
            if torch.is_tensor(value):
                return tuple(value.shape)
            if isinstance(value, (list, tuple)):
                return tuple(key(v) for v in value)
            return value

        def graphed(*args):
            self.graph_keys.add(key(args))
            self.graph_calls += 1
            return forward(*args)

        module.forward = graphed
        return module


@pytest.fixture()
def fake(monkeypatch) -> FakeHabana:
    runtime = FakeHabana()
    runtime.install(monkeypatch)
    return runtime


def test_init_device_turns_lazy_mode_on_and_describes_an_hpu(fake, monkeypatch) -> None:
    for variable in ("PT_HPU_LAZY_MODE", "PT_HPU_ENABLE_LAZY_COLLECTIVES"):
        monkeypatch.setenv(variable, "unset by the test")
        monkeypatch.delenv(variable)
    platform = gaudi.tokenmill_init_device(0)
    assert platform.device.type == "hpu" and platform.preferred_dtype == torch.bfloat16
    assert platform.sampling_device == torch.device("cpu")
    assert os.environ["PT_HPU_LAZY_MODE"] == "1" and os.environ["PT_HPU_ENABLE_LAZY_COLLECTIVES"] == "true"


def test_init_device_without_a_card_says_so(fake) -> None:
    fake.cards = 0
    with pytest.raises(RuntimeError, match="no Gaudi device is available"):
        gaudi.tokenmill_init_device(0)


class GaudiWiring(GaudiOnCPU):
    """`GaudiOnCPU` with the gaudi plugin's own compile hook, over the fake runtime."""

    capture_sizes = None

    @hookimpl
    def tokenmill_compile_model(self, model):
        return gaudi.tokenmill_compile_model(model, self.capture_sizes)


def _engine(plugin) -> Engine:
    tiny = build_tiny("llama", max_position_embeddings=256)
    backend = Backend(load_registry(extra_plugins=[("gaudi-wiring", plugin)]), "gaudi-wiring")
    return Engine(_config("gaudi-wiring"), backend=backend, checkpoint=tiny.checkpoint())


def _graph_keys(engine: Engine) -> set:
    return {(s.num_tokens, s.num_seqs, s.blocks_per_seq, s.is_decode) for s in engine.runner.step_shapes}


def test_one_hpu_graph_per_padded_shape_and_a_mark_step_per_step(fake) -> None:
    engine = _engine(GaudiWiring())
    assert fake.wrap_kwargs == [{"disable_tensor_cache": True}]  # replays bind the step's own tensors
    engine.warmup(progress=False)
    captured, steps = len(fake.graph_keys), fake.events.count("mark_step")
    # Logit rows are computed after the forward, so shapes differing only there share a graph.
    assert captured == len(_graph_keys(engine)) and steps == engine.num_step_shapes == fake.graph_calls

    prompts, params = _traffic()
    engine.generate(prompts, params)
    assert len(fake.graph_keys) == captured  # serving replayed, captured nothing
    assert fake.events.count("mark_step") == fake.graph_calls > steps  # every step marked, every step a replay


def test_capture_sizes_limit_graphs_to_those_decode_batches(fake) -> None:
    plugin = GaudiWiring()
    plugin.capture_sizes = (1, 2)
    engine = _engine(plugin)
    engine.warmup(progress=False)
    graphs = {(tokens, seqs, width, decode) for tokens, seqs, width, decode in _graph_keys(engine)
              if decode and seqs in (1, 2)}
    assert len(fake.graph_keys) == len(graphs) > 0
    assert fake.events.count("mark_step") == engine.num_step_shapes  # eager steps are marked too


def test_no_capture_sizes_means_no_graphs(fake) -> None:
    plugin = GaudiWiring()
    plugin.capture_sizes = ()
    _engine(plugin).warmup(progress=False)
    assert fake.wrap_kwargs == [] and fake.graph_calls == 0 and fake.events.count("mark_step") > 0


def test_memory_budget_reads_the_peak_after_the_profiled_step(fake) -> None:
    request = MemoryRequest(weights_bytes=10 * GIB, memory_fraction=0.9,
                            profile=lambda: fake.events.append("profile"))
    budget = gaudi.tokenmill_memory_budget(request)
    assert fake.events == ["reset_peak", "profile", "mark_step", "synchronize"]
    assert budget == int((int(100 * GIB * 0.9) - 30 * GIB) * 0.9)  # less the 10% kept for HPU graphs
    fake.stats["MaxInUse"] = 95 * GIB
    with pytest.raises(RuntimeError, match="no HPU memory is left"):
        gaudi.tokenmill_memory_budget(request)


def test_hccl_is_loaded_and_asked_for_when_there_are_ranks(fake, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: calls.append(backend))
    communicator = gaudi.tokenmill_communicator(2, 1)
    assert communicator.dist_backend == "hccl" and calls == ["hccl"]


# ---- without the runtime (no fake) ---------------------------------------------------------------------

def test_without_the_runtime_every_device_hook_says_what_is_missing() -> None:
    for call in (lambda: gaudi.tokenmill_init_device(0),
                 lambda: gaudi.tokenmill_compile_model(torch.nn.Linear(1, 1), None),
                 lambda: gaudi.tokenmill_memory_budget(MemoryRequest(weights_bytes=0)),
                 lambda: gaudi.tokenmill_communicator(2, 0)):
        with pytest.raises(RuntimeError, match="habana_frameworks.* not on PyPI"):
            call()


def test_without_the_runtime_what_needs_no_device_still_works() -> None:
    assert gaudi.tokenmill_memory_budget(MemoryRequest(weights_bytes=0, kv_cache_bytes=1 << 20)) == 1 << 20
    assert gaudi.tokenmill_communicator(1, 0).dist_backend == "hccl"  # one rank: no process group, no HCCL
