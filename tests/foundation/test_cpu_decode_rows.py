"""A decode's numbers on the CPU backend do not depend on the prompts sharing its step.

The linears run a GGUF's blocks below GGML_MAX_ROWS rows and their dense copy (or, on AMX, the blocks
dequantized to the dense copy's values) from there (different arithmetic), so
the model runner marks which leading rows are decodes (`tokenmill.batch_rows`) and the linears choose by
that count for them, the prompt rows running apart: through the modules and in the C step alike.
"""

from __future__ import annotations

import random

import pytest

from tests.foundation.test_cpu_int8_activations import q4_1_gguf  # noqa: F401 - a fixture
from tests.tiny_models import VOCAB
from tokenmill.engine import Engine, EngineConfig
from tokenmill.layers.linear import Linear
from tokenmill.plugins.cpu.decode_stack import CapturedForward
from tokenmill.plugins.cpu.quant import GGML_MAX_ROWS, PackedGGMLWeight, ggml_kernels_available
from tokenmill.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not ggml_kernels_available(), reason="the GGUF block kernels need AVX512-BF16 or AVX2")

# Fewer decodes than GGML_MAX_ROWS (the blocks' kernel: 20 at most of 32, 5 of AMX's 8), and 40-token
# prompts beside them (the dense copy's). AVX2's blocks take one row only: there the late requests end at
# their prompt (one token), so the early one decodes alone beside them.
EARLY, LATE, LATE_PROMPT = max(1, GGML_MAX_ROWS * 3 // 8), max(1, GGML_MAX_ROWS // 4), 40
LATE_TOKENS = 10 if EARLY + LATE < GGML_MAX_ROWS else 1


def _engine(path) -> Engine:
    engine = Engine(EngineConfig(model_id=str(path), backend="cpu", dtype="bfloat16", kv_cache_bytes=32 << 20,
                                 progress=False, enable_prefix_caching=False))
    ggml = [m.quantized for m in engine.model.modules() if isinstance(m, Linear)]
    # Kernels of other arithmetic below and from GGML_MAX_ROWS: the blocks', then the dense copy's or AMX tiles'.
    assert any(isinstance(w, PackedGGMLWeight) and w.kernel_code(1) != w.kernel_code(GGML_MAX_ROWS) for w in ggml)
    return engine


def _run(engine: Engine, prompts: dict[str, list[int]], joining: dict[str, list[int]]) -> dict:
    """Each request's greedy (token, logprob) pairs: `prompts` from the start, `joining` added once the
    first have decoded a few steps, so their prompts share steps with those decodes."""
    params = SamplingParams(max_new_tokens=10, ignore_eos=True, logprobs=True)
    late_params = SamplingParams(max_new_tokens=LATE_TOKENS, ignore_eos=True, logprobs=True)
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, params if request_id.startswith("early") else late_params)
    results: dict[str, list] = {request_id: [] for request_id in [*prompts, *joining]}
    steps = 0
    while engine.has_unfinished() or steps < 3:
        steps += 1
        if steps == 4:
            for request_id, prompt in joining.items():
                engine.add_request(request_id, prompt, late_params)
        for out in engine.step():
            results[out.request_id] += [(t.id, t.logprob) for t in out.new_tokens]
    return results


@pytest.mark.parametrize("path", ["c-step", "modules"])
def test_decodes_and_prompts_get_the_same_numbers_alone_and_side_by_side(q4_1_gguf, path) -> None:  # noqa: F811
    rng = random.Random(7)
    early = {f"early-{i}": [rng.randrange(4, VOCAB) for _ in range(6)] for i in range(EARLY)}
    late = {f"late-{i}": [rng.randrange(4, VOCAB) for _ in range(LATE_PROMPT)] for i in range(LATE)}
    assert EARLY + (LATE if LATE_TOKENS > 1 else 0) < GGML_MAX_ROWS < LATE * LATE_PROMPT
    engine = _engine(q4_1_gguf)
    assert isinstance(engine.runner.forward, CapturedForward)
    if path == "modules":
        engine.runner.forward = engine.model
    alone = _run(engine, early, {}) | _run(engine, late, {})
    side_by_side = _run(engine, early, late)
    assert side_by_side == alone  # bit for bit: the logprobs too
