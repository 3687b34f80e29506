"""Tensor parallelism's processes: one a rank, rank 0 driving, the others following its steps.

Every rank builds the same `Engine` over its shard of the model (`Engine(..., parallel=...)`); the
model's forward holds every collective. Only rank 0 schedules, samples and detokenizes: its runner is
wrapped in `LeadingRunner`, which sends each step's `SequenceStep`s to the other ranks before running
the forward itself, and the other ranks run `follow`, the same forward in a loop. A one-rank engine
is never wrapped, so it pays nothing per step.

Start-up: every rank joins a `TCPStore` at master_addr:master_port by setting its key, rank 0 waits
until all keys are there (or names the missing ranks once `rendezvous_timeout_s` has passed), then
the backend's communicator creates its process group over that store with `COLLECTIVE_TIMEOUT`, so a
collective with a dead rank raises instead of hanging.

Failure: rank 0 watches the ranks it started (`RankProcesses`) and reports the first to die, or the
first failed step, to its `on_failure` callbacks (the model server fails what is in flight, reports
unhealthy and exits non-zero). The ranks it started die with it (PR_SET_PDEATHSIG, and a poll).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from tokenmill.backend import Backend, resolve_backend
from tokenmill.engine import Engine, EngineConfig
from tokenmill.errors import TokenmillError
from tokenmill.model_runner import ModelRunner, SequenceStep
from tokenmill.parallel import ParallelContext, Rendezvous, joining
from tokenmill.step_broadcast import (
    COLUMNS,
    HEADER,
    STEP,
    GlooChannel,
    ShmRing,
    StepChannel,
    decode_steps,
    encode_steps,
    stop_message,
)

logger = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = timedelta(seconds=30)
POLL_S = 0.2


class ShardFailure(TokenmillError):
    """A tensor-parallel rank died or a step across ranks failed; the group cannot go on."""


# ---- one rank's set-up ---------------------------------------------------------------------------


def bind_cpus(cores: Sequence[int]) -> None:
    """Pin this process's calling thread (and the threads it starts later) to `cores`, one torch thread each."""
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))


def rendezvous(config: EngineConfig) -> dist.TCPStore:
    """Meet every rank at master_addr:master_port; rank 0 names the ranks missing after the timeout."""
    timeout = timedelta(seconds=config.rendezvous_timeout_s)
    where = f"{config.master_addr}:{config.master_port}"
    is_master = config.rank == 0
    try:
        store = dist.TCPStore(config.master_addr, config.master_port, config.num_shard, is_master, timeout=timeout,
                              wait_for_workers=False)
    except (RuntimeError, dist.DistStoreError) as exc:
        raise ShardFailure(f"tensor-parallel rank {config.rank} could not {'listen on' if is_master else 'reach'} "
                           f"rank 0 at {where} within {config.rendezvous_timeout_s:g} s: {exc}") from exc
    store.set(f"joined/{config.rank}", "1")
    deadline = time.monotonic() + config.rendezvous_timeout_s
    if is_master:
        keys = [f"joined/{r}" for r in range(config.num_shard)]
        while not store.check(keys):
            if time.monotonic() > deadline:
                missing = [r for r in range(config.num_shard) if not store.check([f"joined/{r}"])]
                store.set("failed", ",".join(map(str, missing)))
                raise ShardFailure(f"tensor-parallel ranks {missing} did not join rank 0 at {where} within "
                                   f"{config.rendezvous_timeout_s:g} s (--rendezvous-timeout); check that every "
                                   f"machine runs its ranks with the same --num-shard and --master-addr/--master-port")
            time.sleep(0.05)
        store.set("all-joined", "1")
        return store
    while not store.check(["all-joined"]):
        if store.check(["failed"]) or time.monotonic() > deadline:
            raise ShardFailure(f"tensor-parallel rank {config.rank} joined {where}, but not every rank did within "
                               f"{config.rendezvous_timeout_s:g} s")
        time.sleep(0.05)
    return store


def parallel_context(config: EngineConfig, backend: Backend, store: dist.Store) -> ParallelContext:
    """This rank's `ParallelContext`, from the backend's device, communicator and sharding plan."""
    device = backend.init_device(config.local_rank).device
    with joining(Rendezvous(dist.PrefixStore("pg", store), COLLECTIVE_TIMEOUT)):
        communicator = backend.communicator(config.num_shard, config.rank, device)
    return ParallelContext(config.rank, config.num_shard, communicator, backend.tensor_parallel_plan(config.num_shard))


def _all_local(config: EngineConfig) -> bool:
    return config.ranks_per_node == config.num_shard


def _ring_capacity(engine: Engine) -> int:
    """Ints in the largest step message the scheduler can build (every table as long as a sequence gets)."""
    config = engine.config
    blocks_per_seq = min(-(-engine.max_model_len // engine.layout.block_size) + 1, engine.num_blocks)
    return HEADER + COLUMNS * config.max_num_seqs + config.max_num_batched_tokens + config.max_num_seqs * blocks_per_seq


class Shard:
    """One rank: its engine over its shard, and the channel that carries rank 0's steps."""

    def __init__(self, config: EngineConfig, alive: Callable[[], bool] | None = None):
        if config.cpu_bind:
            bind_cpus(config.cpu_bind[config.local_rank])
        self.config = config
        backend = resolve_backend(config.backend)[0]
        self.store = rendezvous(config)
        self.parallel = parallel_context(config, backend, self.store)
        # Every rank creates the broadcast group at the same point, as torch.distributed requires.
        gloo = None if _all_local(config) else GlooChannel(config.rank)
        self.engine = Engine(config, backend=backend, parallel=self.parallel)
        if gloo is not None:
            self.channel: StepChannel = gloo
        elif config.rank == 0:
            self.channel = ShmRing(config.num_shard - 1, _ring_capacity(self.engine))
            self.store.set("ring", self.channel.name)
        else:
            self.store.wait(["ring"], timedelta(hours=1))  # rank 0 may still be loading its shard
            self.channel = ShmRing(config.num_shard - 1, 0, name=self.store.get("ring").decode(),
                                   reader=config.rank - 1, alive=alive)

    def close(self) -> None:
        self.channel.close()
        self.parallel.communicator.close()


# ---- rank 0 and the others -----------------------------------------------------------------------


class LeadingRunner:
    """Rank 0's `ModelRunner`: every step goes to the other ranks first, then through the model here.

    A step that fails on a parallel engine leaves the ranks out of step, so it is reported to
    `on_failure` (the process must go) before it is raised to the engine.
    """

    def __init__(self, runner: ModelRunner, channel: StepChannel, on_failure: Callable[[Exception], str]):
        self.runner = runner
        self.channel = channel
        self.on_failure = on_failure

    def __getattr__(self, name: str):
        # Whatever reads the engine's runner (its forward, its caches) reads rank 0's own.
        return getattr(self.runner, name)

    def execute(self, steps: Sequence[SequenceStep]) -> torch.Tensor:
        try:
            self.channel.send(encode_steps(steps))
            return self.runner.execute(steps)
        except Exception as exc:
            raise ShardFailure(self.on_failure(exc)) from exc


def follow(shard: Shard) -> None:
    """A worker rank's life after start-up: run each step rank 0 sends, until it sends STOP."""
    runner = shard.engine.runner
    while True:
        message = shard.channel.recv()
        if message[0] != STEP:
            return
        runner.execute(decode_steps(message))


# ---- the processes of the ranks on this machine ---------------------------------------------------


def config_to_json(config: EngineConfig) -> str:
    values = dataclasses.asdict(config)
    values["cache_dir"] = str(config.cache_dir) if config.cache_dir is not None else None
    return json.dumps(values)


def config_from_json(text: str) -> EngineConfig:
    def tuples(value):
        return tuple(tuples(v) for v in value) if isinstance(value, list) else value

    values = {name: tuples(value) for name, value in json.loads(text).items()}
    if values.get("cache_dir") is not None:
        values["cache_dir"] = Path(values["cache_dir"])
    return EngineConfig(**values)


class RankProcesses:
    """The other ranks of this machine as child processes (`tokenmill shard-worker`), watched.

    The first child to exit unasked, or the first failed step, is reported once, as a message naming
    the rank, to every `on_failure` callback (from the watcher's thread or the engine's).
    """

    def __init__(self, config: EngineConfig):
        first = config.node_rank * config.ranks_per_node
        self.config = config
        self.on_failure: list[Callable[[str], None]] = []
        self.failure: str | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self.children: dict[int, subprocess.Popen] = {}
        for rank in range(first + 1, first + config.ranks_per_node):
            command = [sys.executable, "-m", "tokenmill.cli", "shard-worker", "--rank", str(rank),
                       "--parent-pid", str(os.getpid()), "--engine-config", config_to_json(config)]
            self.children[rank] = subprocess.Popen(command)
        logger.info("started tensor-parallel ranks %s (pids %s)", list(self.children),
                    [p.pid for p in self.children.values()])
        self._watch = threading.Thread(target=self._watch_children, name="tokenmill-ranks", daemon=True)
        self._watch.start()

    def _watch_children(self) -> None:
        while not self._stopping and self.failure is None:
            for rank, process in self.children.items():
                if process.poll() is not None and not self._stopping:
                    self.fail(f"tensor-parallel rank {rank} died (exit code {process.returncode})")
                    return
            time.sleep(POLL_S)

    def fail(self, message: str) -> str:
        """Record the group's first failure and tell the callbacks; returns the message that stands."""
        with self._lock:
            if self.failure is not None:
                return self.failure
            self.failure = message
        logger.error("%s; stopping every rank", message)
        for callback in self.on_failure:
            callback(message)
        return message

    def explain(self, exc: Exception) -> str:
        """The failure a failed step stands for: a child that died (given a moment to be reaped), or `exc`."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and self.failure is None:
            for rank, process in self.children.items():
                if process.poll() is not None:
                    return self.fail(f"tensor-parallel rank {rank} died (exit code {process.returncode})")
            time.sleep(0.05)
        return self.fail(self.failure or f"tensor-parallel step failed: {exc}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Wait for the children to leave (after STOP), then kill whichever has not."""
        self._stopping = True
        deadline = time.monotonic() + timeout_s
        for process in self.children.values():
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        self._stopping = True
        for process in self.children.values():
            if process.poll() is None:
                process.kill()
        for process in self.children.values():
            process.wait()


def lead(config: EngineConfig, processes: RankProcesses) -> tuple[Engine, Shard]:
    """Rank 0's engine, its steps sent to every other rank (build it on the engine thread)."""
    shard = Shard(config)
    engine = shard.engine
    engine.runner = LeadingRunner(engine.runner, shard.channel, processes.explain)
    return engine, shard


def stop_followers(shard: Shard, processes: RankProcesses) -> None:
    """Rank 0's orderly end: STOP to every rank, then wait for (or kill) the ones it started."""
    try:
        shard.channel.send(stop_message())
    except Exception:  # noqa: BLE001 - a rank already gone: the children are killed below all the same
        logger.warning("could not send STOP to the other ranks", exc_info=True)
    processes.stop()
    shard.close()


def _die_with_parent(parent_pid: int) -> None:
    """Linux kills this process when its parent ends, however it ends; elsewhere `follow` polls."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(1)  # the parent died before the line above took effect


def run_rank(config: EngineConfig, parent_pid: int | None) -> int:
    """`tokenmill shard-worker`: one follower rank, until rank 0 sends STOP."""
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    shard = Shard(config, alive=(lambda: os.getppid() == parent_pid) if parent_pid is not None else None)
    logger.info("tensor-parallel rank %d of %d ready", config.rank, config.num_shard)
    follow(shard)
    shard.close()
    return 0


def run_node(config: EngineConfig) -> int:
    """A machine without rank 0: its first rank here, the others as children, until rank 0 stops them.

    A child that dies takes this whole machine down at once (exit code 3), which closes its sockets,
    so rank 0's next step fails too; the machine's launcher or orchestrator restarts it.
    """
    processes = RankProcesses(config)

    def die(message: str) -> None:
        processes.kill()
        print(f"tokenmill: {message}", file=sys.stderr, flush=True)
        os._exit(3)  # the main thread may be blocked in a broadcast from a rank that is gone

    processes.on_failure.append(die)
    try:
        shard = Shard(config)
        follow(shard)
    except Exception as exc:  # noqa: BLE001 - reported as the machine's failure, with its children killed
        logger.exception("tensor-parallel rank %d failed", config.rank)
        die(f"tensor-parallel rank {config.rank} failed: {exc}")
    processes.stop()
    shard.close()
    return 0
