"""When the replica set grows or shrinks: a policy on the replicas' queue depth, with no Ray and no clock of
its own, so it is tested step by step.

The signal is the requests waiting in the model servers' own queues (each replica's `num_waiting`, read by
the router's health probes every second): a request waits there only when its replica's batch or KV cache
is full, so a queue means the set is saturated. A replica is added as soon as the queues hold
`scale_up_queue` requests per serving replica, one start at a time (a replica that is still loading would
take none of the queue); one is removed once the queues have stayed empty for `scale_down_delay_s`, then
another only after a further full delay. The set never leaves [min_replicas, max_replicas], and refills
to `min_replicas` at once when a replica dies.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScalingPolicy:
    """`--min-replicas`, `--max-replicas`, `--scale-up-queue`, `--scale-down-delay`."""

    min_replicas: int = 1
    max_replicas: int = 1
    scale_up_queue: int = 1  # queued requests per serving replica that call for one more replica
    scale_down_delay_s: float = 60.0  # empty queues for this long: one replica fewer

    def __post_init__(self) -> None:
        if self.min_replicas < 1:
            raise ValueError(f"--min-replicas must be 1 or more, not {self.min_replicas}")
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"--max-replicas ({self.max_replicas}) must be at least --min-replicas "
                             f"({self.min_replicas})")
        if self.scale_up_queue < 1:
            raise ValueError(f"--scale-up-queue must be 1 or more, not {self.scale_up_queue}")
        if self.scale_down_delay_s < 0:
            raise ValueError(f"--scale-down-delay must be 0 or more, not {self.scale_down_delay_s}")


@dataclass(frozen=True)
class SetState:
    """The replica set as the router sees it at one tick."""

    serving: int  # replicas in the set and not draining (healthy or not yet)
    starting: int  # replicas asked for that have not joined the set yet
    queued: int  # requests waiting in the serving replicas' queues


class Autoscaler:
    """Decides, tick by tick, whether to add a replica (+1), remove one (-1) or hold (0)."""

    def __init__(self, policy: ScalingPolicy):
        self.policy = policy
        self._quiet_since: float | None = None  # since when the queues have been empty

    def decide(self, now: float, state: SetState) -> int:
        policy = self.policy
        total = state.serving + state.starting
        if state.queued:
            self._quiet_since = None
        elif self._quiet_since is None:
            self._quiet_since = now
        if total < policy.min_replicas:
            return 1
        if state.starting:
            return 0
        if state.queued >= policy.scale_up_queue * max(1, state.serving) and total < policy.max_replicas:
            return 1
        quiet = self._quiet_since is not None and now - self._quiet_since >= policy.scale_down_delay_s
        if quiet and state.serving > policy.min_replicas:
            self._quiet_since = now  # the next removal waits a full delay of its own
            return -1
        return 0
