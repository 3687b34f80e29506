"""The transformers fallback: architectures without a tokenmill file run on transformers' modeling code over
the paged KV cache, token for token as transformers runs them, alone and in a continuous batch."""

from __future__ import annotations

import random

import pytest
import transformers

from tests.fallback_models import build_fallback_tiny
from tests.tiny_models import VOCAB, build_tiny
from tokenmill.engine import Engine, EngineConfig
from tokenmill.env_report import model_report
from tokenmill.errors import ValidationError
from tokenmill.models import UnsupportedArchitectureError, get_model_class, model_implementation
from tokenmill.models.transformers_fallback import TransformersCausalLM
from tokenmill.parallel import ParallelContext
from tokenmill.plugins.cpu.decode_stack import compile_model
from tokenmill.sampling_params import SamplingParams

NEW_TOKENS = 12


def _engine(tiny, **overrides) -> Engine:
    config = EngineConfig(backend="cpu", dtype="float32", kv_cache_bytes=4 << 20, progress=False, **overrides)
    return Engine(config, checkpoint=tiny.checkpoint())


def _tokens(outputs) -> list[int]:
    return [t.id for o in outputs for t in o.new_tokens]


@pytest.mark.parametrize("family", ["gpt_neox", "opt"])
def test_greedy_matches_transformers_alone_and_in_a_staggered_batch(family: str) -> None:
    tiny = build_fallback_tiny(family)
    engine = _engine(tiny)
    assert engine.model_implementation == "transformers"
    rng = random.Random(len(family))
    prompts = [[rng.randrange(4, VOCAB) for _ in range(rng.randrange(3, 50))] for _ in range(3)]
    expected = [tiny.greedy(p, NEW_TOKENS) for p in prompts]
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert [_tokens(engine.generate([p], params)[0]) for p in prompts] == expected

    # Arrivals every other step: prefills join running decodes, so steps mix sequences at different positions.
    results = {f"p{i}": [] for i in range(len(prompts))}
    step = 0
    while step < 2 * len(prompts) or engine.has_unfinished():
        if step % 2 == 0 and step // 2 < len(prompts):
            engine.add_request(f"p{step // 2}", prompts[step // 2], params)
        for out in engine.step():
            results[out.request_id].append(out)
        step += 1
    assert [_tokens(results[f"p{i}"]) for i in range(len(prompts))] == expected
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_the_fallback_runs_module_by_module_and_our_families_stay_ours() -> None:
    tiny = build_fallback_tiny("gpt_neox")
    engine = _engine(tiny)
    assert isinstance(engine.model, TransformersCausalLM)
    assert compile_model(engine.model) is engine.model  # the CPU decode stack covers our Llama blocks only
    assert engine.runner.forward is engine.model
    assert model_implementation(get_model_class(build_tiny("llama").config)) == "tokenmill"


@pytest.mark.parametrize("config_class, options, reason", [
    ("MambaConfig", {}, "recurrent or state-space state"),
    ("Lfm2Config", {"layer_types": ["conv", "full_attention"]}, "conv layers"),
    ("T5Config", {}, "encoder-decoder"),
    ("BloomConfig", {}, "does not route attention through the attention interface"),
    ("GptOssConfig", {}, "attention sinks"),
    ("GPTNeoXConfig", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "depends on the sequence's length"),
])
def test_architectures_the_fallback_cannot_run_are_refused_saying_why(config_class: str, options: dict,
                                                                      reason: str) -> None:
    config = getattr(transformers, config_class)(num_hidden_layers=2, **options)
    config.architectures = [config_class.replace("Config", "ForCausalLM")]
    with pytest.raises(UnsupportedArchitectureError, match=reason):
        get_model_class(config)


def test_logits_post_processed_after_the_head_are_refused_at_load() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="post-processes its logits"):
        _engine(build_fallback_tiny("cohere"))


def test_what_the_fallback_cannot_do_is_refused() -> None:
    tiny = build_fallback_tiny("gpt_neox")
    with pytest.raises(ValidationError, match="transformers fallback, which does not take --quantize"):
        _engine(tiny, quantize="int8")
    with pytest.raises(UnsupportedArchitectureError, match="one rank"):
        TransformersCausalLM(tiny.config, lambda spec: spec, tiny.reference.dtype, ParallelContext(0, 2))


def test_env_report_says_whose_code_runs_a_model_folder(tmp_path) -> None:
    tiny = build_fallback_tiny("opt")
    tiny.reference.save_pretrained(tmp_path)
    report = model_report(str(tmp_path))
    assert report["architectures"] == ["OPTForCausalLM"]
    assert report["model_implementation"] == "transformers"
