"""Mixture-of-experts families beyond test_models' cases: checkpoints that name each expert's weights (as the
hub's Mixtral and Qwen-MoE files do) served in a staggered continuous batch, the CPU backend's bf16 path,
and checkpoints that lack an expert."""

from __future__ import annotations

import random
import re

import pytest
import torch

from tests.tiny_models import VOCAB, build_tiny
from tokenmill.engine import Engine, EngineConfig
from tokenmill.interfaces import MoEMethod, StaticShapeMoEMethod
from tokenmill.layers.moe import experts_of
from tokenmill.sampling_params import SamplingParams

MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]
STACKED = re.compile(r"(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")


def _per_expert_layout(tensors: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """transformers 5's stacked expert weights split per expert, under the hub checkpoints' names."""
    mixtral = family == "mixtral"
    block, (gate, up, down) = (("block_sparse_moe", ("w1", "w3", "w2")) if mixtral
                               else ("mlp", ("gate_proj", "up_proj", "down_proj")))
    out = {}
    for name, tensor in tensors.items():
        match = STACKED.fullmatch(name)
        if match is None:
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.") if mixtral else name] = tensor
            continue
        prefix = f"{match[1]}.{block}.experts"
        for expert in range(tensor.shape[0]):
            if match[2] == "down_proj":
                out[f"{prefix}.{expert}.{down}.weight"] = tensor[expert]
            else:
                gate_rows, up_rows = tensor[expert].chunk(2)
                out[f"{prefix}.{expert}.{gate}.weight"] = gate_rows
                out[f"{prefix}.{expert}.{up}.weight"] = up_rows
    return out


def _checkpoint(tiny):
    checkpoint = tiny.checkpoint()
    checkpoint.tensors = _per_expert_layout(checkpoint.tensors, tiny.name)
    return checkpoint


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_per_expert_checkpoint_in_a_staggered_batch_matches_transformers(family: str) -> None:
    tiny = build_tiny(family)
    engine = Engine(EngineConfig(backend="cpu", dtype="float32", kv_cache_bytes=8 << 20, progress=False,
                                 max_num_batched_tokens=32), checkpoint=_checkpoint(tiny))
    rng = random.Random(len(family))
    prompts = [[rng.randrange(4, VOCAB) for _ in range(rng.randrange(3, 50))] for _ in range(4)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    tokens: dict[str, list[int]] = {f"p{i}": [] for i in range(len(prompts))}
    step = 0
    while step < 2 * len(prompts) or engine.has_unfinished():  # a new request every other step
        if step % 2 == 0 and step // 2 < len(prompts):
            engine.add_request(f"p{step // 2}", prompts[step // 2], params)
        for out in engine.step():
            tokens[out.request_id] += [t.id for t in out.new_tokens]
        step += 1
    assert [tokens[f"p{i}"] for i in range(len(prompts))] == [tiny.greedy(p, 12) for p in prompts]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_bf16_moe_runs_module_by_module_with_the_cpu_experts() -> None:
    # The CPU decode stack chains plain Llama layers only: a model with experts must not be captured by it.
    from tokenmill.plugins.cpu.moe import PackedBF16Experts
    from tokenmill.plugins.cpu.quant import bf16_gemm_available

    if not bf16_gemm_available():
        pytest.skip("the packed bf16 experts need AVX512-BF16 kernels")
    tiny = build_tiny("qwen2_moe")
    engine = Engine(EngineConfig(backend="cpu", dtype="bfloat16", kv_cache_bytes=1 << 20, progress=False),
                    checkpoint=tiny.checkpoint())
    assert engine.runner.forward is engine.model
    assert {type(e.method) for e in experts_of(engine.model).values()} == {PackedBF16Experts}
    prompt = [5, 17, 99, 4, 200]
    outputs = engine.generate([prompt], SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=True))[0]
    first = outputs[0].new_tokens[0]
    with torch.no_grad():
        reference = torch.log_softmax(tiny.reference(torch.tensor([prompt])).logits[0, -1].float(), dim=-1)
    assert abs(first.logprob - reference[first.id].item()) < 0.05  # bf16 against the float32 reference
    assert reference[first.id] >= reference.max() - 0.05


def test_a_checkpoint_lacking_an_expert_is_refused_naming_it() -> None:
    tiny = build_tiny("mixtral")
    checkpoint = _checkpoint(tiny)
    del checkpoint.tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    config = EngineConfig(backend="cpu", dtype="float32", kv_cache_bytes=1 << 20, progress=False)
    with pytest.raises(ValueError, match=r"lacks 1 expert weights of layers\.1\.mlp\.experts, e\.g\. 2\.up"):
        Engine(config, checkpoint=checkpoint)


@pytest.mark.parametrize("top_k, renormalize", [(1, False), (2, True)])
def test_the_static_shape_method_gives_the_reference_s_output(top_k, renormalize) -> None:
    generator = torch.Generator().manual_seed(top_k)
    gate_up, down = torch.randn(8, 64, 32, generator=generator), torch.randn(8, 32, 32, generator=generator)
    x, logits = torch.randn(37, 32, generator=generator), torch.randn(37, 8, generator=generator)
    reference = MoEMethod().apply(x, logits, (gate_up, down), top_k, renormalize)
    static = StaticShapeMoEMethod().apply(x, logits, (gate_up, down), top_k, renormalize)
    torch.testing.assert_close(static, reference, rtol=1e-5, atol=1e-4)
