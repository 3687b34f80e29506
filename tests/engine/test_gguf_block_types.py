"""A GGUF whose linear layers are stored in every block type tokenmill runs from its blocks: it loads, the
backend's linear method prepares each layer from its blocks (no dense fallback), and float32 greedy output
equals transformers' on the same file (transformers dequantizes GGUF weights with gguf-py)."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from tests.loader.test_gguf_families import OVERRIDES, write_gguf
from tests.loader.test_ggml_blocks import random_blocks
from tests.tiny_models import VOCAB, build_tiny
from tokenmill.engine import Engine, EngineConfig
from tokenmill.layers.linear import Linear
from tokenmill.loader.ggml_blocks import GGML_BLOCK_TYPES
from tokenmill.plugins.cpu.quant import block_kernels_available
from tokenmill.sampling_params import SamplingParams

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "output")
# Hidden and MLP sizes of 256: the K-quants' super-blocks are 256 inputs.
SIZES = dict(hidden_size=256, intermediate_size=256, initializer_range=0.2)


def _blocks_like(array: np.ndarray, ggml_type: str, seed: int) -> np.ndarray:
    """Random `ggml_type` blocks for a (out, in) weight, with values of the weight's spread: each type's
    values are linear in its fp16 scales together, so scaling those scales the weight."""
    rows, cols = array.shape
    blocks_per_row = cols // GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]][0]
    raw = random_blocks(ggml_type, rows, blocks_per_row, seed, exponents=(-0.5, 0))
    spread = dequantize(raw, GGMLQuantizationType[ggml_type]).std()
    return random_blocks(ggml_type, rows, blocks_per_row, seed, exponents=(-0.5, 0), scale=array.std() / spread)


@pytest.fixture(scope="module")
def every_type_gguf(tmp_path_factory):
    """A tiny Llama GGUF whose 15 linear weights cycle through the block types, and the types by tensor."""
    tiny = build_tiny("mistral", **OVERRIDES["mistral"], **SIZES)
    types = sorted(GGML_BLOCK_TYPES)
    chosen: dict[str, str] = {}

    def blocks(name: str, array: np.ndarray):
        if not name.endswith(tuple(f"{linear}.weight" for linear in LINEARS)):
            return None
        chosen[name] = types[len(chosen) % len(types)]
        return _blocks_like(array, chosen[name], seed=len(chosen)), chosen[name]

    path = tmp_path_factory.mktemp("gguf-types") / "tiny-every-type.gguf"
    write_gguf(tiny, "mistral", path, blocks=blocks)
    assert set(chosen.values()) == GGML_BLOCK_TYPES
    return path, chosen


def _engine(path, dtype: str) -> Engine:
    return Engine(EngineConfig(model_id=str(path), backend="cpu", dtype=dtype, kv_cache_bytes=8 << 20, progress=False))


def test_every_block_type_generates_what_transformers_does_in_float32(every_type_gguf) -> None:
    from transformers import AutoModelForCausalLM

    path, _ = every_type_gguf
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    rng = random.Random(3)
    prompts = [[rng.randrange(4, VOCAB) for _ in range(n)] for n in (9, 30)]
    outputs = _engine(path, "float32").generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    for prompt, output in zip(prompts, outputs):
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert [t.id for o in output for t in o.new_tokens] == expected


def test_every_block_type_is_prepared_from_its_blocks(every_type_gguf) -> None:
    path, chosen = every_type_gguf
    engine = _engine(path, "bfloat16")
    linears = [module for module in engine.model.modules() if isinstance(module, Linear)]
    if not any(module.quant_method for module in linears):
        pytest.skip("the backend keeps bfloat16 linears on F.linear: no method to prepare blocks")
    if "gguf" not in linears[0].quant_method.checkpoint_formats:
        pytest.skip(f"{type(linears[0].quant_method).__name__} runs no GGUF blocks beyond its own prepare_ggml")
    prepared = Counter(module.prepared_from for module in linears if module.prepared_from[1] is not None)
    # Every layer from its blocks, fused q/k/v and gate/up of mixed types too, and every type among them.
    assert {kind for kind, _ in prepared} <= {"prepare_ggml", "prepare_quantized"}, prepared
    assert sum(prepared.values()) == len(linears) == 2 * 4 + 1
    assert {t for _, types in prepared for t in types.split("+")} == GGML_BLOCK_TYPES
    output = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    assert len([t for o in output for t in o.new_tokens]) == 6


def test_every_block_types_packed_form_survives_the_weight_cache(every_type_gguf, tmp_path) -> None:
    """A second start restores each layer's packed form from the prepared-weights cache and generates the same."""
    path, _ = every_type_gguf

    def start() -> Engine:
        return Engine(EngineConfig(model_id=str(path), backend="cpu", dtype="bfloat16", kv_cache_bytes=8 << 20,
                                   progress=False, cache_dir=tmp_path))

    def greedy(engine: Engine) -> list[int]:
        output = engine.generate([[5, 6, 7, 8]], SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
        return [t.id for o in output for t in o.new_tokens]

    first = start()
    if first.prepared_weights is None:
        pytest.skip("the backend's linear method does not serialize its prepared weights")
    expected = greedy(first)
    second = start()
    assert second._restoring
    kinds = {type(module.quantized).__name__ for module in second.model.modules() if isinstance(module, Linear)}
    # The grouped codes' own packed form where the block kernels are built (AVX512-BF16), else dense panels.
    packed = "PackedGroupedWeight" if block_kernels_available() else "PackedBF16Weight"
    assert greedy(second) == expected and packed in kinds, kinds
