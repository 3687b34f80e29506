"""The bench's pre-quantized checkpoint writers make checkpoints tokenmill loads in their own format."""

import pytest
import torch

from benchmarks.quantized_safetensors import FORMATS
from tests.tiny_models import build_tiny, tiny_tokenizer
from tokenmill.loader import load_checkpoint


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llama_tied")  # tied embeddings, as SmolLM2's


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_bench_format_loads_as_quantized_weights_near_the_dense_ones(tiny, tmp_path, name) -> None:
    if "compressed-tensors" in name:
        pytest.importorskip("compressed_tensors")
    FORMATS[name](tiny.reference, tiny_tokenizer(), tmp_path)
    checkpoint = load_checkpoint(str(tmp_path), "float32", progress=False)
    dense = {key: value for key, value in tiny.reference.state_dict().items() if key.endswith("proj.weight")}
    assert sorted(checkpoint.quantized_weights) == sorted(dense)
    expected_format = name.split()[0].lower()
    for key, weight in checkpoint.quantized_weights.items():
        assert weight.format == expected_format
        error = (weight.dequantize() - dense[key]).abs().amax() / dense[key].abs().amax()
        assert error < (0.1 if "4-bit" in name or "W4" in name else 0.05), key  # a few rounding steps at most
    torch.testing.assert_close(checkpoint.tensors["model.embed_tokens.weight"],
                               tiny.reference.state_dict()["model.embed_tokens.weight"])  # the dense rest, as it was
