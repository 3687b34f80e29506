"""A decode step over 2 tensor-parallel gloo ranks (one core each) against the same step on 1 rank, and the
time the ranks spend in collectives.

The model is SmolLM2's shape regrouped to split over 2 ranks (see `benchmarks/tensor_parallel.py`). Each
configuration runs in its own spawned process(es), pinned to its cores: 1 rank on core 0, 1 rank on
both cores, and 2 ranks on cores 0 and 1, which run the same deterministic schedule (SPMD, as
`tests/engine/test_tensor_parallel.py` does), so their collectives line up. Batches mix contexts as
`engine_step.py` does (three sequences in four 60 tokens, one 700); after prefill, `--steps` decode
steps are timed one by one.

A sharded model runs module by module (the one-call decode stack takes single-rank models only), so
1 rank is timed both ways: "one call" is what it serves with, "modules" isolates the sync cost.

Collectives are timed by a proxy wrapped around the communicator here only. A rank's time inside one
includes waiting for the other rank to arrive; the shorter of the two ranks' times for the same call is
the exchange itself (the rank that arrived last did not wait), so both are reported.

    python -m benchmarks.micro.tensor_parallel [--batches 1 16] [--steps 30] [--passes 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from tokenmill.interfaces import Communicator
from tokenmill.conformance.ports import free_port

RANK_TIMEOUT_S = 600
# name -> (cores of each rank, forward variants timed)
CONFIGS = {
    "1 rank, 1 core": (((0,),), ("one call", "modules")),
    "1 rank, 2 cores": (((0, 1),), ("one call", "modules")),
    "2 ranks, 1 core each": (((0,), (1,)), ("modules",)),
}


class TimedCommunicator(Communicator):
    """Delegates every collective and keeps each call's duration (this benchmark's instrument only)."""

    def __init__(self, inner: Communicator):
        self.inner = inner
        self.dist_backend, self.world_size, self.rank = inner.dist_backend, inner.world_size, inner.rank
        self.calls: list[float] = []

    def _timed(self, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.calls.append(time.perf_counter() - start)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._timed(self.inner.all_reduce, tensor)

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return self._timed(self.inner.all_gather, tensor, dim)


def _decode_steps(engine, batch: int, steps: int, tag: str, comm: TimedCommunicator | None
                  ) -> tuple[list[float], list[list[float]]]:
    """Seconds of each of `steps` decode steps of `batch` sequences after their prefill, and the seconds
    of each collective each step made."""
    from tokenmill.sampling_params import SamplingParams

    rng = random.Random(batch)
    for index in range(batch):
        prompt = [rng.randrange(100, 40_000) for _ in range(700 if index % 4 == 3 else 60)]
        engine.add_request(f"{tag}-{index}", prompt, SamplingParams(max_new_tokens=steps + 10, ignore_eos=True))
    while any(not state.first_output_sent for state in engine._states.values()):
        engine.step()
    for _ in range(3):
        engine.step()
    durations, calls = [], []
    for _ in range(steps):
        first = len(comm.calls) if comm else 0
        start = time.perf_counter()
        engine.step()
        durations.append(time.perf_counter() - start)
        calls.append(comm.calls[first:] if comm else [])
    while engine.has_unfinished():
        engine.step()
    return durations, calls


def _rank_main(rank: int, config: str, port: int, folder: str, batches: list[int], steps: int, queue: Any) -> None:
    try:
        from tokenmill.defaults import EvenSplitPlan
        from tokenmill.engine import Engine, EngineConfig
        from tokenmill.parallel import ParallelContext, TorchDistributedCommunicator

        rank_cores, variants = CONFIGS[config]
        world_size = len(rank_cores)
        os.sched_setaffinity(0, rank_cores[rank])  # before the engine: the CPU backend sizes its threads by it
        comm, parallel = None, None
        if world_size > 1:
            comm = TimedCommunicator(TorchDistributedCommunicator("gloo", world_size, rank,
                                                                  init_method=f"tcp://127.0.0.1:{port}"))
            parallel = ParallelContext(rank, world_size, comm, EvenSplitPlan())
        engine = Engine(EngineConfig(model_id=folder, load_format="dummy", dtype="bfloat16", progress=False),
                        parallel=parallel)
        torch.set_num_threads(len(rank_cores[rank]))
        engine.warmup(progress=False)
        one_call = engine.runner.forward
        results: dict = {"forward": type(one_call).__name__}
        for batch in batches:
            for variant in variants:
                engine.runner.forward = one_call if variant == "one call" else engine.model
                durations, calls = _decode_steps(engine, batch, steps, f"{variant}-{batch}", comm)
                results[f"{batch}/{variant}"] = {"steps": durations, "calls": calls}
        if comm is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
        queue.put((rank, results, None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which would otherwise wait for a hung rank
        queue.put((rank, None, traceback.format_exc()))


def run_config(config: str, folder: Path, batches: list[int], steps: int) -> list[dict]:
    """Every rank's results for one configuration, each rank in its own spawned process."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    world_size = len(CONFIGS[config][0])
    procs = [context.Process(target=_rank_main, args=(rank, config, port, str(folder), batches, steps, queue),
                             daemon=True) for rank in range(world_size)]
    for proc in procs:
        proc.start()
    reports: dict[int, dict] = {}
    deadline = time.monotonic() + RANK_TIMEOUT_S
    try:
        while len(reports) < world_size:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{config}: ranks {sorted(set(range(world_size)) - set(reports))} never reported")
            try:
                rank, results, error = queue.get(timeout=5)
            except Exception:  # queue.Empty: check that no rank died silently
                dead = [r for r, p in enumerate(procs) if r not in reports and p.exitcode is not None]
                if dead:
                    raise RuntimeError(f"{config}: ranks {dead} exited without a report") from None
                continue
            if error:
                raise RuntimeError(f"{config}, rank {rank}:\n{error}")
            reports[rank] = results
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return [reports[rank] for rank in range(world_size)]


def _median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def figures(config: str, ranks: list[dict], batch: int, variant: str) -> dict:
    """ms per step (rank 0's wall time), and for several ranks the collectives per step: calls, the time
    rank 0 spent in them, and the exchange itself (per call, the shorter of the ranks' times)."""
    case = f"{batch}/{variant}"
    out = {"step_ms": _median_ms(ranks[0][case]["steps"])}
    if len(ranks) > 1:
        per_rank = [r[case]["calls"] for r in ranks]
        out["collectives_per_step"] = statistics.median(len(c) for c in per_rank[0])
        out["collective_ms"] = _median_ms([sum(c) for c in per_rank[0]])
        out["collective_ms_rank1"] = _median_ms([sum(c) for c in per_rank[1]])
        out["exchange_ms"] = _median_ms([sum(min(pair) for pair in zip(*calls))
                                         for calls in zip(*per_rank)])
    return out


def run(batches: list[int], steps: int, passes: int) -> dict:
    """Configurations alternate within each pass; figures are medians across passes."""
    from benchmarks.tensor_parallel import model_folder

    folder = model_folder()
    collected: dict[str, list[dict]] = {}
    for index in range(passes):
        for config, (_, variants) in CONFIGS.items():
            print(f"pass {index + 1}/{passes}: {config}", flush=True)
            ranks = run_config(config, folder, batches, steps)
            for batch in batches:
                for variant in variants:
                    entry = figures(config, ranks, batch, variant)
                    collected.setdefault(f"{config} | {variant} | {batch}", []).append(entry)
                    print(f"    batch {batch:>3} {variant:>8}: " + ", ".join(f"{k} {v:.2f}" for k, v in entry.items()),
                          flush=True)
    rows = []
    for key, entries in collected.items():
        config, variant, batch = key.split(" | ")
        medians = {k: statistics.median(e[k] for e in entries) for k in entries[0]}
        rows.append({"config": config, "forward": variant, "batch": int(batch), **medians})
    return {"model": str(folder), "steps": steps, "passes": passes, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 16])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here (the bench report reads them)")
    args = parser.parse_args()
    result = run(args.batches, args.steps, args.passes)
    print(f"{'configuration':<22}{'forward':>10}{'batch':>6}{'ms/step':>9}{'in collectives':>16}{'exchange':>10}")
    for row in result["rows"]:
        extra = (f"{row['collective_ms']:>13.2f} ms{row['exchange_ms']:>7.2f} ms"
                 if "collective_ms" in row else "")
        print(f"{row['config']:<22}{row['forward']:>10}{row['batch']:>6}{row['step_ms']:>9.2f}{extra}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
