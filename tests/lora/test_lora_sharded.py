"""LoRA over tensor-parallel ranks: each rank keeps its part of every A and B, cut as the layer's weight is,
and the ranks together give the one-process tokens; rank 0 tells the others each sequence's adapter."""

from __future__ import annotations

import random
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.lora_adapters import ATTENTION, MLP, write_adapter
from tests.tiny_models import build_tiny
from tokenmill.defaults import EvenSplitPlan
from tokenmill.engine import Engine, EngineConfig
from tokenmill.model_runner import SequenceStep
from tokenmill.parallel import ParallelContext, TorchDistributedCommunicator
from tokenmill.sampling_params import SamplingParams
from tokenmill.step_broadcast import decode_steps, encode_steps
from tokenmill.conformance.ports import free_port

RANK_TIMEOUT_S = 240
WORLD_SIZE = 2
CHOSEN = ["a", None, "b", "a"]


def _prompts() -> list[list[int]]:
    rng = random.Random(4)
    return [[rng.randrange(4, 256) for _ in range(n)] for n in (5, 30, 12, 21)]


def _generate(folder: Path, parallel: ParallelContext | None = None) -> list[list[int]]:
    tiny = build_tiny("llama", attention_bias=True)  # a row-parallel bias, added once after the adapters' sum
    specs = (("a", str(folder / "a")), ("b", str(folder / "b")))
    config = EngineConfig(backend="cpu", dtype="float32", kv_cache_bytes=4 << 20, progress=False, lora_adapters=specs)
    engine = Engine(config, checkpoint=tiny.checkpoint(), parallel=parallel)
    if parallel is not None:
        torch.set_num_threads(1)
    outputs = engine.generate(_prompts(), SamplingParams(max_new_tokens=12, ignore_eos=True), CHOSEN)
    return [[t.id for o in per_prompt for t in o.new_tokens] for per_prompt in outputs]


def _rank_main(rank: int, port: int, folder: str, queue: Any) -> None:
    try:
        torch.set_num_threads(1)
        comm = TorchDistributedCommunicator("gloo", WORLD_SIZE, rank, init_method=f"tcp://127.0.0.1:{port}")
        tokens = _generate(Path(folder), ParallelContext(rank, WORLD_SIZE, comm, EvenSplitPlan()))
        dist.destroy_process_group()
        queue.put((rank, tokens, None))
    except BaseException:  # noqa: BLE001 - reported to the test, which would otherwise wait for a hung rank
        queue.put((rank, None, traceback.format_exc()))


def test_sharded_adapters_give_the_one_process_tokens(tmp_path) -> None:
    reference = build_tiny("llama", attention_bias=True).reference
    write_adapter(tmp_path / "a", reference, ATTENTION + MLP, rank=8, seed=1)
    write_adapter(tmp_path / "b", reference, ("k_proj", "o_proj", "up_proj"), rank=4, alpha=4, seed=2)
    alone = _generate(tmp_path)

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    procs = [context.Process(target=_rank_main, args=(rank, port, str(tmp_path), queue), daemon=True)
             for rank in range(WORLD_SIZE)]
    for proc in procs:
        proc.start()
    reports: dict[int, tuple[Any, str | None]] = {}
    deadline = time.monotonic() + RANK_TIMEOUT_S
    try:
        while len(reports) < WORLD_SIZE and time.monotonic() < deadline:
            if queue.empty():
                assert all(proc.exitcode is None or rank in reports for rank, proc in enumerate(procs)), \
                    "a rank died without reporting"
                time.sleep(0.2)
                continue
            rank, tokens, error = queue.get()
            reports[rank] = (tokens, error)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    errors = [f"rank {rank}:\n{error}" for rank, (_, error) in sorted(reports.items()) if error]
    assert not errors, "\n".join(errors)
    assert len(reports) == WORLD_SIZE, "ranks never reported"
    assert reports[0][0] == reports[1][0] == alone


def test_the_step_message_carries_each_sequence_s_adapter() -> None:
    steps = [SequenceStep([5, 6, 7], 0, [3], 1, 2), SequenceStep([9], 40, [1, 4, 8], 1, 0),
             SequenceStep([11, 12], 3, [2], 0, 1)]
    assert decode_steps(encode_steps(steps)) == steps
