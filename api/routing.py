"""How the router picks a replica: the routing policy, and its memory of which replica last served each
prompt prefix.

A prefix is named by the hash of a full KV block chained to its predecessors', as the engine's prefix
cache names it (`tokenmill.block_manager.prompt_block_hashes`), so the replica a prefix was sent to is the
one whose cache may still hold its blocks. The map is a bounded LRU: an old entry names a prefix the
replica has most likely evicted since, and forgetting it costs a cache miss, never a wrong answer.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

ROUTING_MODES = ("prefix", "least-loaded")


@dataclass(frozen=True)
class RoutingPolicy:
    """How the router picks a replica (`--routing`, `--routing-max-imbalance`)."""

    mode: str = "prefix"  # "prefix": prefix-aware, falling back to least-loaded; "least-loaded": load alone
    max_imbalance: int = 4  # in-flight requests a prefix's replica may have beyond the least-loaded one

    def __post_init__(self) -> None:
        if self.mode not in ROUTING_MODES:
            raise ValueError(f"unknown routing {self.mode!r}; choose one of {', '.join(ROUTING_MODES)}")
        if self.max_imbalance < 0:
            raise ValueError(f"--routing-max-imbalance must be 0 or more, not {self.max_imbalance}")


# About a million tokens of prefixes at 16 tokens a block, ~10 MB of router memory: more than the KV
# caches of a few replicas hold, so the bound drops only prefixes their caches have dropped too.
DEFAULT_CAPACITY = 1 << 16


class PrefixAffinity:
    """A bounded LRU map from prefix hash to the address of the replica that served the prefix."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        if capacity < 1:
            raise ValueError("the prefix map needs room for at least one prefix")
        self.capacity = capacity
        self._owners: OrderedDict[bytes, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owners)

    def owner(self, hashes: Sequence[bytes]) -> str | None:
        """The replica that served the longest of these prefixes (hashes first block first); None if none."""
        for prefix_hash in reversed(hashes):
            address = self._owners.get(prefix_hash)
            if address is not None:
                return address
        return None

    def remember(self, hashes: Sequence[bytes], address: str) -> None:
        """These prefixes are now on `address`'s replica; the least recently routed go beyond capacity."""
        owners = self._owners
        for prefix_hash in hashes:
            owners[prefix_hash] = address
            owners.move_to_end(prefix_hash)
        while len(owners) > self.capacity:
            owners.popitem(last=False)

    def forget(self, address: str) -> None:
        """Drop every prefix of `address`'s replica (it turned unhealthy: a restart starts with an empty cache)."""
        for prefix_hash in [h for h, a in self._owners.items() if a == address]:
            del self._owners[prefix_hash]
