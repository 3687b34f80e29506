"""The cuda, rocm and xpu plugins as an engine sees them, without their hardware.

- A decode step of SmolLM2-135M's shape, a tiny Qwen2 and a tiny Phi-3 built from the cuda plugin's
  hooks on the `meta` device, sampling included, does no host sync: every Triton op has a fake.
- The engine on the cuda plugin with its kernels interpreted on the CPU writes transformers' greedy
  tokens, batched, in float32.
- Decode graphs: a step replayed through a bucket's static buffers (padded rows included) gives the
  eager step's hidden states and leaves the KV cache as the eager step does.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from tests.tiny_models import build_tiny
from tokenmill.backend import Backend
from tokenmill.engine import Engine, EngineConfig
from tokenmill.interfaces import DevicePlatform, LayerOps
from tokenmill.model_runner import ModelRunner, SequenceStep, build_step_inputs
from tokenmill.models import get_model_class, kv_cache_shape
from tokenmill.plugins.cuda import plugin as cuda
from tokenmill.registry import load_registry
from tokenmill.sampler import Sampler, SamplingMetadata
from tokenmill.sampling_params import SamplingParams
from tokenmill.sync_audit import SyncAudit

SMOLLM2_135M = transformers.LlamaConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True, architectures=["LlamaForCausalLM"])


def _build(config, device: torch.device, dtype: torch.dtype, num_blocks: int):
    """The model, its caches and a runner, each piece from the cuda plugin's hooks, as the engine builds them."""
    layout = cuda.tokenmill_kv_cache_layout(shape=kv_cache_shape(config, dtype), device=device)
    attention: dict = {}

    def make_attention(spec):
        return attention.setdefault(spec, cuda.tokenmill_attention_backend(spec=spec, layout=layout))

    with device:
        model = get_model_class(config)(config, make_attention, dtype).eval()
    ops = cuda.tokenmill_layer_ops(dtype=dtype)
    for module in model.modules():
        if isinstance(getattr(module, "ops", None), LayerOps):
            module.ops = ops
    caches = layout.allocate(num_blocks)
    return model, caches, ModelRunner(model, model, caches, list(attention.values()), layout.block_size, device)


def _decode_steps() -> list[SequenceStep]:
    # Contexts across block boundaries (block size 16): 18, 41 and 4 tokens.
    return [SequenceStep([5], 17, [3, 1], 1), SequenceStep([7], 40, [0, 2, 4], 1), SequenceStep([9], 3, [5], 1)]


@pytest.mark.parametrize("family", ["smollm2-135m", "qwen2", "phi3"])
def test_a_decode_step_on_the_cuda_plugin_does_no_host_sync(family) -> None:
    config = SMOLLM2_135M if family == "smollm2-135m" else build_tiny(family).config
    model, _, runner = _build(config, torch.device("meta"), torch.bfloat16, num_blocks=8)
    steps = _decode_steps()
    params = [SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=8, temperature=0.7, top_k=20, top_p=0.9,
                                                               seed=3, repetition_penalty=1.1),
              SamplingParams(max_new_tokens=8, temperature=1.0, frequency_penalty=0.5)]
    with SyncAudit() as audit:
        logits = runner.execute(steps)
        meta = SamplingMetadata.build(params, [[1, 2, 5], [4, 7], [9]], [2, 1, 1], logits.shape[-1], logits.device)
        sampled = Sampler(seed=0)(logits, meta)
    assert logits.shape == (3, config.vocab_size) and sampled.token_ids.shape == (3,)
    assert not audit.syncs, audit.report()


def test_a_model_whose_experts_sync_with_the_host_is_left_eager_not_captured() -> None:
    # The reference MoE method reads each expert's token count back to the host, which a graph cannot hold.
    from tokenmill.plugins.triton.graphs import DecodeGraphs

    dense, _, _ = _build(build_tiny("qwen3").config, torch.device("meta"), torch.bfloat16, num_blocks=8)
    assert isinstance(cuda.tokenmill_compile_model(model=dense, capture_sizes=None), DecodeGraphs)
    moe, _, _ = _build(build_tiny("qwen3_moe").config, torch.device("meta"), torch.bfloat16, num_blocks=8)
    assert cuda.tokenmill_compile_model(model=moe, capture_sizes=None) is moe


class InterpretedBackend(Backend):
    """The cuda backend with its device set-up replaced by its interpreter platform (this machine has no GPU)."""

    def init_device(self, device_index: int = 0) -> DevicePlatform:
        return self.interpreter_platform()


@pytest.fixture(scope="module")
def interpreted_cuda() -> Backend:
    return InterpretedBackend(load_registry(), "cuda")


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_the_engine_on_interpreted_cuda_kernels_writes_transformers_greedy_tokens(interpreted_cuda, family) -> None:
    tiny = build_tiny(family)
    config = EngineConfig(backend="cuda", dtype="float32", kv_cache_bytes=1 << 20, progress=False,
                          max_num_batched_tokens=64)
    engine = Engine(config, backend=interpreted_cuda, checkpoint=tiny.checkpoint())
    prompts = [[5, 9, 14, 3, 77, 20, 8, 31, 2, 60, 11, 19, 40, 7, 90, 4, 6, 100], [11, 12, 13]]
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=5, ignore_eos=True))
    for prompt, outs in zip(prompts, outputs):
        assert [t.id for out in outs for t in out.new_tokens] == tiny.greedy(prompt, 5)
    assert engine.block_manager.num_free_blocks == engine.num_blocks


class EagerCapture:
    """A `GraphCapture` whose replay re-runs the recorded step on the same static buffers, as a graph would."""

    def capture(self, fn):
        fn()
        return fn


def test_decode_graphs_pad_a_step_into_its_bucket_and_match_the_eager_step() -> None:
    from tokenmill.plugins.triton.graphs import DecodeGraphs

    tiny = build_tiny("llama")
    model, caches, runner = _build(tiny.config, torch.device("cpu"), torch.float32, num_blocks=8)
    model.load_weights(tiny.checkpoint().tensors)
    for cache in caches:
        cache.normal_(generator=torch.Generator().manual_seed(0))
    graphs = DecodeGraphs(model, EagerCapture(), capture_sizes=(1, 4), block_size=16, max_model_len=256,
                          progress=False)
    inputs = build_step_inputs(_decode_steps(), 16, torch.device("cpu"))  # 3 sequences: bucket 4, one padded row
    before = [c.clone() for c in caches]
    eager_caches = [c.clone() for c in caches]
    with torch.inference_mode():
        expected = model(inputs.input_ids, inputs.positions, eager_caches, inputs.metadata)
        graphed = graphs(inputs.input_ids, inputs.positions, caches, inputs.metadata)
    # A 4-row matmul may round differently from a 3-row one, hence closeness, not equality.
    torch.testing.assert_close(graphed, expected, rtol=1e-5, atol=1e-5)
    for cache, eager, old in zip(caches, eager_caches, before):
        torch.testing.assert_close(cache, eager, rtol=1e-5, atol=1e-5)
        assert torch.equal(cache != old, eager != old)  # the same slots written: the padded row wrote nothing
    assert set(graphs._buckets) == {1, 4}
    assert graphs._buckets[4].metadata.seq_lens[3].item() == 0  # the padded row attends to nothing


class HostTensorsSeen(TorchDispatchMode):
    """Records ops that take a host tensor while the step runs on a device: in a captured graph such an
    op is a host-to-device copy the graph would freeze (or fail to record)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in pytree.tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor)]
        if any(t.device.type == "cpu" and t.dim() > 0 for t in tensors):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["smollm2-135m", "phi3"])
def test_the_model_forward_of_a_decode_step_reads_no_host_tensor(family) -> None:
    # What a decode graph captures is the model's forward over device buffers: it must build nothing on the host.
    config = SMOLLM2_135M if family == "smollm2-135m" else build_tiny(family).config
    model, caches, _ = _build(config, torch.device("meta"), torch.bfloat16, num_blocks=8)
    inputs = build_step_inputs(_decode_steps(), 16, torch.device("meta"))
    with torch.inference_mode(), HostTensorsSeen() as seen:
        hidden = model(inputs.input_ids, inputs.positions, caches, inputs.metadata)
    assert hidden.shape == (3, config.hidden_size)
    assert not seen.ops, seen.ops
