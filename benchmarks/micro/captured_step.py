"""The CPU backend's one-call decode step against the module-by-module forward, per model family's shape.

Each shape is served with random weights (`--load-format dummy`, bf16, nothing downloaded); one engine times
decode steps with its captured forward (plugins/cpu/decode_stack.py) and with the plain model, alternating.

    python -m benchmarks.micro.captured_step --shapes qwen2.5-0.5b,qwen3-0.6b --batches 1,16
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from tokenmill.engine import Engine, EngineConfig
from tokenmill.plugins.cpu.decode_stack import CapturedForward
from tokenmill.sampling_params import SamplingParams

# The published configs' shapes (their config.json fields that decide the compute).
SHAPES = {
    "qwen2.5-0.5b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
                         max_position_embeddings=32768, use_sliding_window=False),
    "qwen3-0.6b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
                       max_position_embeddings=40960, attention_bias=False),
    "smollm2-135m": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, rms_norm_eps=1e-5, rope_theta=1e5, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    # No small published model slides one window over every layer (Mistral-7B-v0.1 does, over 4,096
    # positions): SmolLM2's shape as a Mistral with a 64-position window, crossed by the 100-token prompts.
    "smollm2-135m-mistral-window64": dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=576,
                                          intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                          num_key_value_heads=3, head_dim=64, vocab_size=49152, rms_norm_eps=1e-5,
                                          rope_theta=1e5, tie_word_embeddings=True, max_position_embeddings=8192,
                                          sliding_window=64),
}


def step_ms(engine: Engine, batch: int, steps: int = 16, prompt_len: int = 100) -> float:
    rng = random.Random(0)
    for index in range(batch):
        engine.add_request(f"{time.monotonic_ns()}-{index}", [rng.randrange(100, 40_000) for _ in range(prompt_len)],
                           SamplingParams(max_new_tokens=steps + 8, ignore_eos=True))
    while any(not state.first_output_sent for state in engine._states.values()):
        engine.step()
    for _ in range(3):
        engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = (time.perf_counter() - start) / steps
    while engine.has_unfinished():
        engine.step()
    return 1000 * elapsed


def measure(shape: str, batches: list[int], rounds: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps({**SHAPES[shape], "torch_dtype": "bfloat16"}))
        engine = Engine(EngineConfig(model_id=folder, load_format="dummy", dtype="bfloat16", progress=False,
                                     enable_prefix_caching=False))
    captured = engine.runner.forward
    if not isinstance(captured, CapturedForward):
        print(f"{shape}: the decode stack does not take this model")
        return
    for batch in batches:
        times: dict[str, list[float]] = {"C step": [], "modules": []}
        for index in range(rounds):  # alternating, so a slower stretch of the machine hits both
            for name in ("C step", "modules") if index % 2 == 0 else ("modules", "C step"):
                engine.runner.forward = captured if name == "C step" else engine.model
                times[name].append(step_ms(engine, batch))
        c_step, modules = statistics.median(times["C step"]), statistics.median(times["modules"])
        print(f"{shape} batch {batch}: C step {c_step:.1f} ms, modules {modules:.1f} ms ({modules / c_step:.2f}x)",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="qwen2.5-0.5b,qwen3-0.6b")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    for shape in args.shapes.split(","):
        measure(shape, [int(batch) for batch in args.batches.split(",")], args.rounds)


if __name__ == "__main__":
    main()
