"""Two ranks of the backend under test, each in its own process: its communicator and a sharded tiny model.

`run_ranks` spawns the ranks once for every case of `test_parallel.py` (a spawn costs seconds a process).
Each rank builds its `ParallelContext` exactly as a served rank does (`tokenmill.shard.rendezvous` and
`parallel_context`), runs every collective case, then generates with every tiny model; rank for rank
the schedule is the same (SPMD), so their collectives line up. The ranks send back what they got; the
test process checks it against references computed on the host.

This module is what the spawned ranks import, by name (`tokenmill.conformance.parallel_harness`):
the test module itself is imported from its file path, which a fresh interpreter cannot repeat.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import queue as queue_module
import random
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from tokenmill.conformance.tiny import VOCAB, TinyModel, build_tiny
from tokenmill.engine import Engine, EngineConfig
from tokenmill.sampling_params import SamplingParams

WORLD_SIZE = 2
TIMEOUT_S = 120.0  # the whole spawn, every case included
GRACE_S = 3.0  # after the first rank fails, how long the others get to report their own error
COLLECTIVES = {"all_reduce": None, "all_gather_dim0": 0, "all_gather_dim-1": -1}  # name -> gather dim
FAMILIES = ("llama", "qwen2")
MAX_NEW_TOKENS = 8


@dataclass(frozen=True)
class Job:
    """What the test process asks of every rank."""

    backend: str
    port: int
    shared_device: bool  # both ranks on device 0 (the backend's discovery found fewer devices than ranks)
    dtypes: tuple[torch.dtype, ...]  # the collectives' dtypes
    families: tuple[str, ...]  # the tiny models to generate with (float32 only)


class RanksFailed(Exception):
    """A rank raised, died or hung: `stage` is the earliest any rank failed in ("rendezvous", "setup" or
    "cases"), `reason` the first failure's last line, the message every failing rank's traceback."""

    def __init__(self, stage: str, reason: str, message: str):
        super().__init__(message)
        self.stage = stage
        self.reason = reason


# ---- what every rank computes, and what the host expects ---------------------------------------------


def collective_input(rank: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank `rank`'s operand, on the host: 3-D so that a gather along dim 1 cannot pass for dim -1."""
    generator = torch.Generator().manual_seed(1000 * rank + 7)
    if dtype.is_floating_point:
        # Scales over the dtype's normal range, up to 2^-24...2^24: a reduction through a narrower type
        # (bf16 summed as fp16) shows; no sum overflows and no operand is subnormal (which a device may flush).
        info = torch.finfo(dtype)
        low, high = max(-24, int(math.log2(info.tiny)) + 8), min(24, int(math.log2(info.max)) - 4)
        scale = torch.pow(2.0, torch.randint(low, high + 1, (2, 3, 5), generator=generator).float())
        return (torch.randn(2, 3, 5, generator=generator) * scale).to(dtype)
    # Beyond 32 bits: a communicator that narrows int64 on the way loses the high bits.
    return torch.randint(-(1 << 40), 1 << 40, (2, 3, 5), generator=generator, dtype=dtype)


def expected_collective(name: str, dtype: torch.dtype) -> torch.Tensor:
    """The host's answer: the ranks' operands summed (one rounding in `dtype`) or concatenated in rank order."""
    inputs = [collective_input(rank, dtype) for rank in range(WORLD_SIZE)]
    if name == "all_reduce":
        return inputs[0] + inputs[1]
    return torch.cat(inputs, dim=COLLECTIVES[name])


def prompts() -> list[list[int]]:
    # Mixed lengths; over the 64-token step budget below, the longest is prefilled in chunks beside decodes.
    rng = random.Random(14)
    return [[rng.randrange(4, VOCAB) for _ in range(n)] for n in (3, 17, 70, 9, 33)]


def tiny_model(family: str) -> TinyModel:
    """The family's tiny model with non-zero biases: transformers starts them at zero, which would hide a
    bias sharded wrongly or added on every rank (Qwen2 has q, k and v biases)."""
    tiny = build_tiny(family)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in tiny.reference.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return tiny


def engine_config(backend: str, world_size: int = 1) -> EngineConfig:
    return EngineConfig(backend=backend, dtype="float32", kv_cache_bytes=4 << 20, progress=False,
                        max_num_batched_tokens=64, num_shard=world_size, rendezvous_timeout_s=TIMEOUT_S)


def greedy_tokens(engine: Engine) -> list[list[int]]:
    outputs = engine.generate(prompts(), SamplingParams(max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True))
    return [[t.id for o in per_prompt for t in o.new_tokens] for per_prompt in outputs]


def weight_count(engine: Engine) -> int:
    """The model's weights on this rank (a rank of a sharded model holds less than a whole one)."""
    return sum(p.numel() for p in engine.model.parameters())


# ---- one rank -------------------------------------------------------------------------------------


def _rank_config(job: Job, rank: int) -> EngineConfig:
    config = replace(engine_config(job.backend, WORLD_SIZE), rank=rank, master_port=job.port)
    if job.shared_device:
        # Each rank as if alone on its machine: its local rank, the device it binds, is 0.
        config = replace(config, local_shards=1, node_rank=rank)
    return config


def _share_the_host() -> None:
    # The backend sized its host threads for one process a machine; here the ranks share one.
    torch.set_num_threads(max(1, torch.get_num_threads() // WORLD_SIZE))


def _to_bytes(value: Any) -> bytes:
    # Tensors travel as bytes: a tensor put on a queue is shared through this process, which exits next.
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _rank_main(rank: int, job: Job, queue: Any) -> None:
    from tokenmill.backend import resolve_backend
    from tokenmill.shard import parallel_context, rendezvous

    stage, doing = "rendezvous", "meeting the other rank"
    try:
        backend = resolve_backend(forced=job.backend)[0]  # as the suite's `backend` fixture resolves it
        config = _rank_config(job, rank)
        store = rendezvous(config)
        stage, doing = "setup", "building the ParallelContext and a first all_reduce"
        parallel = parallel_context(config, backend, store)
        device = backend.init_device(config.local_rank).device
        # Whether two ranks can meet here at all: a library that refuses two ranks on one device
        # (NCCL's duplicate GPU) says so on its first collective.
        parallel.communicator.all_reduce(torch.ones(1, device=device))
        _share_the_host()
        stage, doing = "cases", "the collective cases"
        collectives = {}
        for dtype in job.dtypes:
            for name, dim in COLLECTIVES.items():
                doing = f"{name} of {dtype}"
                operand = collective_input(rank, dtype).to(device)
                if dim is None:
                    out = parallel.communicator.all_reduce(operand)
                else:
                    out = parallel.communicator.all_gather(operand, dim=dim)
                collectives[name, dtype] = (out.cpu(), out.device == operand.device)
        tokens, weights = {}, {}
        for family in job.families:
            doing = f"generating with tiny {family}"
            engine = Engine(config, backend=backend, checkpoint=tiny_model(family).checkpoint(), parallel=parallel)
            _share_the_host()
            tokens[family] = greedy_tokens(engine)
            weights[family] = weight_count(engine)
        if dist.is_initialized():
            dist.destroy_process_group()
        queue.put((rank, "results", _to_bytes({"collectives": collectives, "tokens": tokens, "weights": weights})))
    except BaseException:  # noqa: BLE001 - reported to the test, which would otherwise wait for a hung rank
        queue.put((rank, "error", (stage, f"while {doing}:\n{traceback.format_exc()}")))


# ---- the test process's side ------------------------------------------------------------------------


def _failure(errors: dict[int, tuple[str, str]]) -> RanksFailed:
    stages = ("rendezvous", "setup", "cases")  # the earliest stage any rank failed in stands for the run
    first_stage = min((stage for stage, _ in errors.values()), key=stages.index)
    # In the order they came: the first is the cause, the others mostly its echo in their collectives.
    text = "\n".join(f"rank {rank} failed in {stage} {trace}" for rank, (stage, trace) in errors.items())
    reason = next(iter(errors.values()))[1].strip().splitlines()[-1]
    return RanksFailed(first_stage, reason, text)


def run_ranks(job: Job) -> dict[int, dict[str, Any]]:
    """Every rank's results, or `RanksFailed` with each failing rank's traceback; no rank outlives the call."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no device state inherited
    queue = context.Queue()
    procs = [context.Process(target=_rank_main, args=(rank, job, queue), daemon=True, name=f"tokenmill-rank{rank}")
             for rank in range(WORLD_SIZE)]
    for proc in procs:
        proc.start()
    results: dict[int, dict[str, Any]] = {}
    errors: dict[int, tuple[str, str]] = {}
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while len(results) + len(errors) < WORLD_SIZE:
            if errors:  # a failed rank leaves the others waiting in a collective: give them a moment, no more
                deadline = min(deadline, time.monotonic() + GRACE_S)
            try:
                rank, kind, payload = queue.get(timeout=1.0)
            except queue_module.Empty:
                silent = [rank for rank, proc in enumerate(procs)
                          if rank not in results and rank not in errors and proc.exitcode is not None]
                for rank in silent:
                    errors[rank] = ("cases", f"(exited with code {procs[rank].exitcode} without a report)")
                if time.monotonic() > deadline:
                    waited = f"{GRACE_S:g} s after another rank failed" if errors else f"within {TIMEOUT_S:g} s"
                    for rank in sorted(set(range(WORLD_SIZE)) - set(results) - set(errors)):
                        errors[rank] = ("cases", f"(no report {waited}: hung, or waiting in a collective; killed)")
                continue
            if kind == "results":
                results[rank] = torch.load(io.BytesIO(payload))
            else:
                errors[rank] = payload
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if errors:
        raise _failure(errors)
    return results
