"""LoRA adapters in the engine: two adapters and the base model share every step, and each request's
greedy tokens are those of the model its adapter stands for, the base weights merged with it in float32."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tests.lora_adapters import ATTENTION, MLP, merged_checkpoint, write_adapter
from tests.tiny_models import VOCAB, build_tiny
from tokenmill.engine import Engine, EngineConfig
from tokenmill.errors import ValidationError
from tokenmill.loader import Checkpoint
from tokenmill.plugins.cpu import lora as cpu_lora
from tokenmill.plugins.cpu.quant import bf16_gemm_available
from tokenmill.sampling_params import SamplingParams

GREEDY = SamplingParams(max_new_tokens=16, ignore_eos=True)
# Phi-3's checkpoint fuses q/k/v and gate/up: its adapters target the fused modules.
FUSED = {"phi3": ("qkv_proj", "gate_up_proj", "o_proj", "down_proj")}


def _engine(checkpoint: Checkpoint, dtype: str = "float32", **overrides) -> Engine:
    config = EngineConfig(backend="cpu", dtype=dtype, kv_cache_bytes=8 << 20, progress=False, **overrides)
    return Engine(config, checkpoint=checkpoint)


def _prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, VOCAB) for _ in range(rng.randrange(3, 50))] for _ in range(count)]


def _tokens(outputs) -> list[list[int]]:
    return [[t.id for o in per_prompt for t in o.new_tokens] for per_prompt in outputs]


def _adapters(family: str, tiny, folder: Path) -> dict[str, Path]:
    """Two adapters unlike each other: every projection at rank 8, and a few at rank 4 with rsLoRA."""
    everything = FUSED.get(family, ATTENTION + MLP)
    return {"every": write_adapter(folder / "every", tiny.reference, everything, rank=8, alpha=16, seed=1),
            "some": write_adapter(folder / "some", tiny.reference, everything[::2] + ("v_proj",), rank=4, alpha=8,
                                  seed=2, use_rslora=True)}


def _record_slots(engine: Engine) -> list[tuple[int, ...]]:
    """The slots of every token of every step the engine runs from now on."""
    seen: list[tuple[int, ...]] = []
    begin = engine.lora.begin_step

    def recording(batch):
        seen.append(tuple(batch.token_slots.tolist()) if batch is not None else ())
        begin(batch)

    engine.lora.begin_step = recording
    return seen


@pytest.mark.parametrize("method", ["kernel", "masked", "reference"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi3"])
def test_two_adapters_and_the_base_model_in_one_batch_match_merged_weights(family, method, tmp_path,
                                                                          monkeypatch) -> None:
    # The CPU method's three ways: its C kernel (every step here is small enough), its masked GEMMs, and
    # the reference segmented matmul it hands larger steps to.
    if method != "kernel":
        monkeypatch.setattr(cpu_lora, "MAX_KERNEL_TOKENS", 0)
    if method == "reference":
        monkeypatch.setattr(cpu_lora, "MAX_MASKED_COLUMNS", 0)
    tiny = build_tiny(family)
    if family == "qwen2":  # non-zero q/k/v biases: the adapter's sum must land on top of them
        with torch.no_grad():
            for name, param in tiny.reference.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    adapters = _adapters(family, tiny, tmp_path)
    # A small step budget: long prompts are chunked, so prefill chunks and decodes of every adapter mix.
    engine = _engine(tiny.checkpoint(), lora_adapters=tuple((n, str(p)) for n, p in adapters.items()),
                     max_num_batched_tokens=48)
    seen = _record_slots(engine)
    prompts = _prompts(6, seed=len(family))
    chosen = ["every", None, "some", "some", "every", None]
    got = _tokens(engine.generate(prompts, GREEDY, chosen))

    references = {None: _engine(tiny.checkpoint())}
    references.update({name: _engine(merged_checkpoint(tiny.checkpoint(), path)) for name, path in adapters.items()})
    for prompt, adapter, tokens in zip(prompts, chosen, got):
        assert tokens == _tokens(references[adapter].generate([prompt], GREEDY))[0], (family, adapter)
        if adapter is not None:  # the adapter changes the answer: a run that dropped it could not pass
            assert tokens != _tokens(references[None].generate([prompt], GREEDY))[0]
    assert any({0, 1, 2} <= set(slots) for slots in seen), "no step held both adapters and the base model"


def test_prefix_cache_never_shares_blocks_across_adapters(tmp_path) -> None:
    tiny = build_tiny("llama")
    adapters = _adapters("llama", tiny, tmp_path)
    engine = _engine(tiny.checkpoint(), lora_adapters=tuple((n, str(p)) for n, p in adapters.items()))
    prompt = _prompts(1, seed=5)[0] * 3  # several full 16-token blocks
    expected = {None: _engine(tiny.checkpoint())}
    expected.update({name: _engine(merged_checkpoint(tiny.checkpoint(), path)) for name, path in adapters.items()})
    cached = []
    for adapter in ("every", None, "some", "every"):
        outputs = engine.generate([prompt], GREEDY, [adapter])[0]
        assert _tokens([outputs])[0] == _tokens(expected[adapter].generate([prompt], GREEDY))[0], adapter
        cached.append(outputs[-1].num_cached_tokens)
    # Only the second "every" reuses blocks: the same tokens under another adapter are other keys and values.
    assert cached[:3] == [0, 0, 0] and cached[3] >= 32


def test_an_adapter_that_is_not_loaded_is_refused(tmp_path) -> None:
    tiny = build_tiny("llama")
    adapters = _adapters("llama", tiny, tmp_path)
    engine = _engine(tiny.checkpoint(), lora_adapters=(("every", str(adapters["every"])),))
    with pytest.raises(ValidationError, match="'nope' is not loaded; loaded adapters: every"):
        engine.add_request("r", [5, 6, 7], GREEDY, adapter="nope")
    with pytest.raises(ValidationError, match="has no adapters"):
        _engine(tiny.checkpoint()).add_request("r", [5, 6, 7], GREEDY, adapter="every")


def test_an_adapter_written_by_peft_matches_peft_s_merged_model(tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    tiny = build_tiny("llama")
    reference = build_tiny("llama").reference  # peft wraps and changes its model: a copy of the same weights
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(reference, config)
    with torch.no_grad():  # peft's random init leaves the adapter small; make it matter
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(8)
    peft_model.save_pretrained(tmp_path / "peft")
    merged = peft_model.merge_and_unload().eval()
    engine = _engine(tiny.checkpoint(), lora_adapters=(("peft", str(tmp_path / "peft")),))
    prompts = _prompts(3, seed=11)
    got = _tokens(engine.generate(prompts, GREEDY, ["peft", None, "peft"]))
    for prompt, adapter, tokens in zip(prompts, ["peft", None, "peft"], got):
        model = merged if adapter else tiny.reference
        out = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                             pad_token_id=0, min_new_tokens=16)
        assert tokens == out[0, len(prompt):].tolist(), adapter
    assert got[0] != tiny.greedy(prompts[0], 16)


@pytest.mark.skipif(not bf16_gemm_available(), reason="the decode stack needs AVX512-BF16 kernels")
def test_bf16_decode_steps_with_adapters_leave_the_captured_decode_stack(tmp_path) -> None:
    tiny = build_tiny("llama")
    adapters = _adapters("llama", tiny, tmp_path)
    specs = tuple((n, str(p)) for n, p in adapters.items())
    captured = _engine(tiny.checkpoint(), "bfloat16", lora_adapters=specs)
    eager = _engine(tiny.checkpoint(), "bfloat16", lora_adapters=specs)
    assert type(captured.runner.forward).__name__ == "CapturedForward"
    eager.runner.forward = eager.model  # module by module: the adapted layers add their adapters
    stack_steps = []
    stack = captured.runner.forward.stack
    original = stack.__call__

    class Counting(type(stack)):
        def __call__(self, *args):
            stack_steps.append(1)
            return original(*args)

    stack.__class__ = Counting
    prompts, chosen = _prompts(4, seed=2), ["every", None, "some", None]
    assert _tokens(captured.generate(prompts, GREEDY, chosen)) == _tokens(eager.generate(prompts, GREEDY, chosen))
    assert not stack_steps  # every decode step had adapter tokens
    captured.generate(prompts[1:2], GREEDY)
    assert stack_steps  # base-model decode steps still take the C path
