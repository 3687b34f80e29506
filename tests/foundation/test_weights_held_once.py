"""The CPU's packed bf16 linears hold each weight once: the dense weight a layer packed is freed, and an
embedding tied to the output head gives its own copy up and reads its rows from the packed head, exactly."""

import gc
import weakref

import pytest
import torch

from tokenmill.layers.linear import Linear
from tokenmill.layers.vocab_parallel import embedding, lm_head
from tokenmill.plugins.cpu.quant import PackedBF16Linear, bf16_gemm_available

pytestmark = pytest.mark.skipif(not bf16_gemm_available(), reason="needs the AVX512-BF16 build")

VOCAB = 50  # a partial panel of 16 rows: the packed head has zero rows past it


def test_a_prepared_linear_keeps_no_dense_weight() -> None:
    layer = Linear(64, [48], False, torch.bfloat16)
    layer.weight.data.normal_()
    dense = weakref.ref(layer.weight.untyped_storage())  # no tensor anywhere still on its memory
    layer.quantize(PackedBF16Linear())
    gc.collect()
    assert layer.weight is None and dense() is None


@pytest.mark.parametrize("hidden", [64, 63])  # 63: an odd input count, padded to pairs in the packed head
def test_a_tied_embedding_reads_its_rows_from_the_packed_head(hidden: int) -> None:
    embed, head = embedding(VOCAB, hidden, torch.bfloat16), lm_head(hidden, VOCAB, torch.bfloat16)
    embed.tie_to(head)
    embed.weight.data.normal_(generator=torch.Generator().manual_seed(0))
    expected_rows = embed.weight.detach().clone()
    x = torch.randn(3, hidden, dtype=torch.bfloat16)
    method = PackedBF16Linear()
    expected_logits = method.matmul(x, method.prepare(expected_rows))
    dense = weakref.ref(embed.weight.untyped_storage())

    head.quantize(method)
    gc.collect()
    assert embed.weight is None and head.weight is None and dense() is None  # the packed head is the one copy
    assert dict(embed.named_parameters()) == {}
    ids = torch.tensor([[0, 15, 16, VOCAB - 1], [7, 7, 31, 32]])
    rows = embed(ids)
    assert rows.shape == (2, 4, hidden) and rows.dtype == torch.bfloat16
    assert torch.equal(rows, expected_rows[ids])
    assert torch.equal(head(x), expected_logits)
