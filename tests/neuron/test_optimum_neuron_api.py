"""The neuron plugin against the installed optimum-neuron (0.4.5), in its own venv: `make neuron-check`.

optimum-neuron pins transformers 4.57, so it lives in `.venv-neuron`, not in the main venv, and this module
skips elsewhere. Its model classes import neuronx_distributed, which only AWS's package index has, so
nothing here compiles or runs a model; what is checked against the real package:

* each call the plugin makes binds to the real method's signature;
* the dispatch rule and forward arguments the adapter relies on are the installed source's;
* the adapter works through optimum-neuron's own runtime wrapper (`NxDDecoderWrapperForCausalLM`:
  int32 casting, padding, reordering) over the CPU stand-in of the compiled programs;
* discovery and the model executor explain the missing SDK on a machine with no Neuron device.
"""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.util
import inspect
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("optimum.neuron", reason="optimum-neuron lives in .venv-neuron: run `make neuron-check`")

from optimum.neuron import NeuronModelForCausalLM  # noqa: E402
from optimum.neuron.configuration_utils import NeuronConfig  # noqa: E402
from optimum.neuron.models.inference.backend.config import NxDNeuronConfig  # noqa: E402
from optimum.neuron.utils.system import get_neuron_major  # noqa: E402

from tests.neuron.compiled_standin import CompiledCausalLMStandIn, CompiledPrograms  # noqa: E402
from tests.neuron.test_neuron_plugin import _cpu_engine, _run  # noqa: E402
from tests.tiny_models import build_tiny  # noqa: E402
from tokenmill import hookimpl  # noqa: E402
from tokenmill.backend import Backend  # noqa: E402
from tokenmill.engine import Engine, EngineConfig  # noqa: E402
from tokenmill.errors import BackendUnavailableError  # noqa: E402
from tokenmill.interfaces import BackendStatus, Discovery  # noqa: E402
from tokenmill.plugins import neuron  # noqa: E402
from tokenmill.plugins.neuron import executor  # noqa: E402
from tokenmill.registry import load_registry  # noqa: E402

DECODER_PACKAGE = "optimum.neuron.models.inference.backend.modules.decoder"
NEEDS_SDK = pytest.mark.skipif(importlib.util.find_spec("neuronx_distributed") is not None,
                               reason="the Neuron SDK is installed: these check its absence")


def _decoder_source(name: str) -> Path:
    """A module of the decoder package, located without importing the package (its __init__ needs the SDK)."""
    return Path(next(iter(importlib.util.find_spec(DECODER_PACKAGE).submodule_search_locations))) / f"{name}.py"


def _method(path: Path, class_name: str, method: str) -> ast.FunctionDef:
    tree = ast.parse(path.read_text())
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name)
    return next(node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == method)


def _program_choice(forward: ast.FunctionDef) -> ast.If:
    """The `if` in a forward that sends a step to the context-encoding program."""
    return next(node for node in ast.walk(forward) if isinstance(node, ast.If)
                and "self.context_encoding_model(" in ast.unparse(node.body))


@pytest.fixture(scope="module")
def decoder_wrappers():
    """optimum-neuron's runtime wrappers (`decoder_wrappers.py`), the real module: it needs only torch and
    transformers, but its package's __init__ imports the compiled-model classes and neuronx_distributed, so
    the package is entered as a bare module object whose path is the installed folder."""
    spec = importlib.util.find_spec(DECODER_PACKAGE)
    package = types.ModuleType(DECODER_PACKAGE)
    package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
    name = f"{DECODER_PACKAGE}.decoder_wrappers"
    assert DECODER_PACKAGE not in sys.modules and name not in sys.modules
    sys.modules[DECODER_PACKAGE] = package
    try:
        yield importlib.import_module(name)
    finally:
        sys.modules.pop(name, None)
        sys.modules.pop(DECODER_PACKAGE, None)


# ---- the calls the plugin makes ------------------------------------------------------------------------

class SignatureCheckedSpy:
    """Stands in for an optimum-neuron class whose methods cannot run here: each call is first bound to the
    real method's signature (a TypeError where the real one would refuse it), then recorded."""

    def __init__(self, real: type, results: dict):
        self.real, self.results, self.calls = real, results, []

    def __getattr__(self, name: str):
        signature = inspect.signature(getattr(self.real, name))

        def method(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            self.calls.append((name, bound.arguments))
            result = self.results[name]
            if isinstance(result, Exception):
                raise result
            return result

        return method


@pytest.fixture()
def sdk_present(monkeypatch):
    monkeypatch.setattr(executor, "module_available", lambda name: True)


@pytest.fixture()
def tiny():
    return build_tiny("llama")


@pytest.mark.usefixtures("sdk_present")
def test_an_uncompiled_model_is_exported_as_the_vllm_plugin_does_with_host_sampling(monkeypatch, tmp_path, tiny):
    tiny.config.save_pretrained(tmp_path)  # no neuron_config.json: the real NeuronConfig lookup says so
    with pytest.raises(EnvironmentError):
        NeuronConfig.from_pretrained(str(tmp_path), executor.NEURON_CONFIG_FILE)
    # What the llama class's _get_neuron_config builds for these sizes: on-device sampling on.
    sized = NxDNeuronConfig(batch_size=4, sequence_length=256, tp_degree=2, continuous_batching=True,
                            on_device_sampling=True, fused_qkv=True, target="trn1")
    compiled = object()
    spy = SignatureCheckedSpy(NeuronModelForCausalLM, {"get_neuron_config": sized, "export": compiled})
    monkeypatch.setattr(sys.modules["optimum.neuron"], "NeuronModelForCausalLM", spy)

    assert executor.load_compiled_model(str(tmp_path), torch.bfloat16, max_num_seqs=4, max_model_len=256) is compiled
    (name, sizing), (exported, export_args) = spy.calls
    assert name == "get_neuron_config" and exported == "export"
    assert sizing == {"model_name_or_path": str(tmp_path), "batch_size": 4, "sequence_length": 256,
                      "tensor_parallel_size": None}
    assert export_args["model_id"] == str(tmp_path) and export_args["load_weights"] is True
    assert export_args["neuron_config"] is sized
    assert sized.on_device_sampling is False and sized.torch_dtype == torch.bfloat16
    assert sized.ctx_batch_size == 1 and sized.max_context_length == 256  # what the adapter will be fed


@pytest.mark.usefixtures("sdk_present")
def test_a_compiled_model_folder_is_loaded_not_exported(monkeypatch, tmp_path) -> None:
    spy_config = SignatureCheckedSpy(NeuronConfig, {"from_pretrained": NxDNeuronConfig(batch_size=2)})
    loaded = object()
    spy_model = SignatureCheckedSpy(NeuronModelForCausalLM, {"from_pretrained": loaded})
    monkeypatch.setattr(sys.modules["optimum.neuron.configuration_utils"], "NeuronConfig", spy_config)
    monkeypatch.setattr(sys.modules["optimum.neuron"], "NeuronModelForCausalLM", spy_model)
    assert executor.load_compiled_model(str(tmp_path), torch.bfloat16, 8, 512) is loaded
    assert [name for name, _ in spy_model.calls] == ["from_pretrained"]
    assert spy_config.calls[0][1]["pretrained_model_name"] == str(tmp_path)


def test_the_forward_the_adapter_calls_and_its_choice_of_program_are_the_installed_ones(decoder_wrappers) -> None:
    forward = _method(_decoder_source("modeling_decoder"), "NxDModelForCausalLM", "forward")
    assert [a.arg for a in forward.args.args[:5]] == ["self", "input_ids", "position_ids", "seq_ids", "sampling_params"]
    choice = _program_choice(forward)
    assert "self.token_generation_model(" in ast.unparse(choice.orelse)
    standin_source = Path(inspect.getsourcefile(CompiledCausalLMStandIn))
    standin = _program_choice(_method(standin_source, "CompiledCausalLMStandIn", "forward"))
    assert ast.unparse(standin.test) == ast.unparse(choice.test)  # the stand-in chooses as the real model does
    wrapper = inspect.signature(decoder_wrappers.NxDDecoderWrapperForCausalLM.forward)
    assert list(wrapper.parameters) == ["self", "input_ids", "position_ids", "seq_ids", "sampling_params"]


# ---- the adapter through optimum-neuron's runtime wrappers --------------------------------------------

def _through_wrappers(decoder_wrappers, checkpoint, neuron_config) -> CompiledCausalLMStandIn:
    """The stand-in programs behind optimum-neuron's own wrappers, built as `NxDModelForCausalLM.__init__` does."""
    programs = CompiledPrograms(checkpoint, neuron_config)

    def wrapper(batch_size: int, tag: str):
        config = copy.deepcopy(neuron_config)
        config.batch_size = batch_size
        return decoder_wrappers.NxDDecoderWrapperForCausalLM(checkpoint.config, config, programs, tag)

    return CompiledCausalLMStandIn(
        checkpoint.config, neuron_config, programs,
        context_encoding_model=wrapper(neuron_config.ctx_batch_size, decoder_wrappers.CONTEXT_ENCODING_MODEL_TAG),
        token_generation_model=wrapper(neuron_config.tkg_batch_size, decoder_wrappers.TOKEN_GENERATION_MODEL_TAG))


class AdapterThroughWrappers:
    def __init__(self, decoder_wrappers, neuron_config):
        self.decoder_wrappers, self.neuron_config = decoder_wrappers, neuron_config

    @hookimpl
    def tokenmill_discover(self):
        return Discovery(BackendStatus.USABLE, "the neuron adapter over optimum-neuron's wrappers", -1)

    @hookimpl
    def tokenmill_init_device(self, device_index):
        return neuron.tokenmill_init_device(device_index)

    @hookimpl
    def tokenmill_model_executor(self, checkpoint):
        return executor.NeuronSlotModel(_through_wrappers(self.decoder_wrappers, checkpoint, self.neuron_config))


def test_the_adapter_through_optimum_neurons_wrappers_gives_the_greedy_tokens(decoder_wrappers, tiny) -> None:
    neuron_config = NxDNeuronConfig(batch_size=3, sequence_length=128, max_context_length=48, continuous_batching=True,
                                    on_device_sampling=False, torch_dtype=torch.float32)
    backend = Backend(load_registry([("neuron-wrappers", AdapterThroughWrappers(decoder_wrappers, neuron_config))]),
                      "neuron-wrappers")
    engine = Engine(EngineConfig(backend="neuron-wrappers", dtype="float32", progress=False,
                                 max_num_batched_tokens=40, enable_prefix_caching=False),
                    backend=backend, checkpoint=tiny.checkpoint())
    arrivals = {0: [("a", [7, 8, 9, 10, 11], 8), ("b", [12], 4), ("c", list(range(20, 60)), 6), ("d", [13, 14], 9)],
                3: [("e", [5] * 17, 9)], 6: [("f", [6], 5)]}  # "f": a one-token prompt beside live slots
    results, _ = _run(engine, arrivals)
    reference, _ = _run(_cpu_engine(tiny), arrivals)
    for request_id, prompt, max_new in (r for batch in arrivals.values() for r in batch):
        assert [token for token, _ in results[request_id]] == tiny.greedy(prompt, max_new), request_id
        assert [lp for _, lp in results[request_id]] == pytest.approx([lp for _, lp in reference[request_id]],
                                                                      abs=1e-4), request_id
    assert engine.model.lengths.tolist() == [0, 0, 0]


def test_optimum_neurons_own_padding_would_write_into_other_slots(decoder_wrappers, tiny) -> None:
    """Why the adapter pads token generation itself: fed fewer rows than the compiled batch, the wrapper pads
    with the remaining seq_ids at row 0's position, which may be below a live slot's length."""
    neuron_config = NxDNeuronConfig(batch_size=3, sequence_length=64, continuous_batching=True,
                                    on_device_sampling=False, torch_dtype=torch.float32)
    model = _through_wrappers(decoder_wrappers, tiny.checkpoint(), neuron_config)
    model(torch.tensor([[5], [6]]), position_ids=torch.tensor([[9], [4]]), seq_ids=torch.tensor([0, 2]),
          sampling_params=torch.ones(2, 3))
    call = model.programs.calls[-1]
    assert (call.seq_ids, call.positions) == ([0, 1, 2], [[9], [9], [4]])  # seq 1 written at position 9


# ---- discovery and errors without the SDK --------------------------------------------------------------

@NEEDS_SDK
def test_discovery_on_a_machine_without_a_neuron_device_names_the_missing_sdk() -> None:
    assert get_neuron_major() == -1  # optimum-neuron's own probe (/proc/devices) finds no Neuron driver
    found = neuron.tokenmill_discover()
    assert found.status is BackendStatus.LIBRARY_MISSING and found.install_extra == "neuron"
    assert "torch-neuronx" in found.reason and "neuronx-distributed" in found.reason
    assert "optimum-neuron," not in found.reason and found.versions["optimum-neuron"] == "0.4.5"
    assert "no Neuron device files" in found.reason


@NEEDS_SDK
def test_the_model_executor_names_the_missing_sdk_where_optimum_neuron_would_fail_deep_inside(tmp_path, tiny):
    tiny.config.save_pretrained(tmp_path)
    with pytest.raises(ModuleNotFoundError, match="neuronx_distributed"):  # optimum-neuron's own failure
        NeuronModelForCausalLM.get_neuron_config(str(tmp_path), batch_size=2, sequence_length=64,
                                                 tensor_parallel_size=1)
    with pytest.raises(BackendUnavailableError, match="torch-neuronx, neuronx-distributed \\(not installed\\)"):
        neuron.tokenmill_model_executor(model_id=str(tmp_path), checkpoint=tiny.checkpoint(), dtype=torch.bfloat16,
                                        max_num_seqs=2, max_model_len=64)
