"""The served fixed load's work on the engine alone: what the HTTP and gRPC layers cost.

`make bench`'s closed loop (benchmarks/load.py: the same prompts in turn, chat-templated, 128 tokens
each, ignore_eos, twice as many requests as streams) run straight on an `Engine` in this process, with no router, model server or load
client beside it. Its tok/s against the served figure at the same concurrency is the serving overhead,
contention for the two cores included; its step time, prompt rows mixed in, is the served step's
comparator (`benchmarks.micro.engine_step` times pure decode steps of another context mix).

    python -m benchmarks.micro.engine_closed_loop 16 64
"""

from __future__ import annotations

import argparse
import time

from benchmarks.load import OUTPUT_TOKENS
from benchmarks.prompts import PROMPTS
from benchmarks.run import requests_for
from tokenmill.engine import Engine, EngineConfig
from tokenmill.loader import default_model_path, load_tokenizer
from tokenmill.sampling_params import SamplingParams


def chat_prompts() -> list[list[int]]:
    """The bench's prompts as the chat route feeds them to the engine."""
    tokenizer = load_tokenizer(str(default_model_path()))
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=False) for prompt in PROMPTS]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def closed_loop(engine: Engine, prompts: list[list[int]], concurrency: int, requests: int) -> str:
    """`concurrency` streams, each replaced by the next prompt as it finishes, until `requests` are done."""
    started = finished = steps = 0

    def start_next() -> None:
        nonlocal started
        engine.add_request(f"c{concurrency}-{started}", list(prompts[started % len(prompts)]),
                           SamplingParams(max_new_tokens=OUTPUT_TOKENS, ignore_eos=True))
        started += 1

    for _ in range(min(concurrency, requests)):
        start_next()
    start = time.perf_counter()
    while finished < requests:
        steps += 1
        for out in engine.step():
            if out.finished:
                finished += 1
                if started < requests:
                    start_next()
    elapsed = time.perf_counter() - start
    return (f"c={concurrency}: {requests * OUTPUT_TOKENS / elapsed:.1f} tok/s, {1000 * elapsed / steps:.1f} ms a step "
            f"over {steps} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("concurrency", nargs="*", type=int, default=[16, 64])
    args = parser.parse_args()
    engine = Engine(EngineConfig(progress=False))
    engine.warmup(progress=False)
    prompts = chat_prompts()
    for concurrency in args.concurrency:
        print(closed_loop(engine, prompts, concurrency, requests_for(concurrency)), flush=True)


if __name__ == "__main__":
    main()
