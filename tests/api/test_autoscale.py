"""The replica set's autoscaling policy, tick by tick (tests/ray runs it on a Ray cluster)."""

from __future__ import annotations

import pytest

from tokenmill.api.autoscale import Autoscaler, ScalingPolicy, SetState


def test_a_queue_adds_one_replica_at_a_time_up_to_the_maximum() -> None:
    scaler = Autoscaler(ScalingPolicy(min_replicas=1, max_replicas=3, scale_up_queue=2))
    assert scaler.decide(0, SetState(serving=1, starting=0, queued=1)) == 0  # below 2 per replica
    assert scaler.decide(1, SetState(serving=1, starting=0, queued=2)) == 1
    assert scaler.decide(2, SetState(serving=1, starting=1, queued=9)) == 0  # one start at a time
    assert scaler.decide(3, SetState(serving=2, starting=0, queued=3)) == 0  # 2 per serving replica now
    assert scaler.decide(4, SetState(serving=2, starting=0, queued=4)) == 1
    assert scaler.decide(5, SetState(serving=3, starting=0, queued=50)) == 0  # at the maximum


def test_empty_queues_remove_one_replica_per_delay_down_to_the_minimum() -> None:
    scaler = Autoscaler(ScalingPolicy(min_replicas=1, max_replicas=3, scale_down_delay_s=10))
    assert scaler.decide(0, SetState(serving=3, starting=0, queued=0)) == 0  # quiet from now
    assert scaler.decide(9, SetState(serving=3, starting=0, queued=0)) == 0
    assert scaler.decide(10, SetState(serving=3, starting=0, queued=0)) == -1
    assert scaler.decide(15, SetState(serving=2, starting=0, queued=0)) == 0  # the next one waits a full delay
    assert scaler.decide(19, SetState(serving=2, starting=0, queued=1)) == 0  # a queue restarts the wait
    assert scaler.decide(25, SetState(serving=2, starting=0, queued=0)) == 0
    assert scaler.decide(35, SetState(serving=2, starting=0, queued=0)) == -1
    assert scaler.decide(100, SetState(serving=1, starting=0, queued=0)) == 0  # at the minimum


def test_a_set_below_its_minimum_refills_whatever_the_queue() -> None:
    scaler = Autoscaler(ScalingPolicy(min_replicas=2, max_replicas=2))
    assert scaler.decide(0, SetState(serving=0, starting=0, queued=0)) == 1
    assert scaler.decide(0, SetState(serving=0, starting=1, queued=0)) == 1
    assert scaler.decide(1, SetState(serving=0, starting=2, queued=0)) == 0
    assert scaler.decide(9, SetState(serving=1, starting=0, queued=0)) == 1  # one was lost


@pytest.mark.parametrize("fields, message", [
    (dict(min_replicas=0), "--min-replicas must be 1 or more"),
    (dict(min_replicas=3, max_replicas=2), "--max-replicas (2) must be at least --min-replicas (3)"),
    (dict(scale_up_queue=0), "--scale-up-queue must be 1 or more"),
])
def test_a_bad_policy_is_refused_naming_the_flag(fields, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ScalingPolicy(**fields)
