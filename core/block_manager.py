"""Paged KV-cache blocks: allocation, reference counts and automatic prefix caching (no torch).

Each *full* block of computed tokens is hashed together with its predecessor's hash, so a hash names
a whole prefix. A new request walks its prompt's full blocks through that chain and shares every block
already cached. Freed blocks keep their hash in an LRU free list and can be revived until reused. A
request run with a LoRA adapter starts its chain from the adapter's slot: the same tokens under another
adapter have other keys and values, so they never share blocks.

Untouched blocks (never written) are handed out first while fewer than `resident_limit` blocks have
been used, then only when no freed block is left. A backend whose cache memory is committed on first
write (the CPU's) thus holds the working set plus a bounded prefix cache in memory, not the whole pool;
with no limit, freed prefixes stay cached until every block is in use.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Iterator, Sequence

from tokenmill.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 resident_limit: int | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.resident_limit = num_blocks if resident_limit is None else resident_limit
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # prefix hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict()  # blocks used before, least recently freed first
        self.untouched = list(range(num_blocks - 1, -1, -1))  # never used; popped lowest id first
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free) + len(self.untouched)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_prefix(self, request: Request) -> int:
        """Share the cached blocks of the request's longest cached prefix; return its token count.

        The last token is never taken from the cache: the step that computes it produces the logits.
        """
        assert not request.block_ids, "prefix lookup is for requests without blocks"
        if not self.enable_prefix_caching:
            return 0
        self.prefix_queries += request.num_tokens
        for prefix_hash in prompt_block_hashes(request.token_ids, self.block_size, request.adapter,
                                               image_keys=request.image_keys):
            block = self.cached.get(prefix_hash)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
            request.block_ids.append(block)
        request.num_hashed_blocks = len(request.block_ids)
        num_cached = len(request.block_ids) * self.block_size
        self.prefix_hits += num_cached
        return num_cached

    def can_append(self, request: Request, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(request.num_computed_tokens + num_new_tokens) - len(request.block_ids)
        return needed <= self.num_free_blocks

    def append(self, request: Request, num_new_tokens: int) -> bool:
        """Give the request blocks for `num_new_tokens` more computed tokens; False if too few are free."""
        needed = self.blocks_needed(request.num_computed_tokens + num_new_tokens) - len(request.block_ids)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            block = self._take_free_block()
            old_hash = self.block_hashes[block]
            if old_hash is not None:  # evict: its content is about to be overwritten
                if self.cached.get(old_hash) == block:
                    del self.cached[old_hash]
                self.block_hashes[block] = None
            self.ref_counts[block] = 1
            request.block_ids.append(block)
        return True

    def _take_free_block(self) -> int:
        num_used = self.num_blocks - len(self.untouched)
        if self.untouched and (num_used < self.resident_limit or not self.free):
            return self.untouched.pop()
        return self.free.popitem(last=False)[0]  # least recently freed

    def commit_full_blocks(self, request: Request) -> None:
        """Register the blocks that became full of computed tokens, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        first = request.num_hashed_blocks
        if first >= num_full:
            return
        parent = self.block_hashes[request.block_ids[first - 1]] if first else chain_start(request.adapter)
        hashes = chained_hashes(request.token_ids, self.block_size, parent, first, num_full, request.image_keys)
        for block, prefix_hash in zip(request.block_ids[first:num_full], hashes):
            self.block_hashes[block] = prefix_hash
            self.cached.setdefault(prefix_hash, block)
        request.num_hashed_blocks = num_full

    def release_tail(self, request: Request, num_tokens: int) -> None:
        """Release the request's blocks past its first `num_tokens` tokens, tail first (with a draft, the
        blocks of rejected speculative tokens: the request's own, past its committed prefix)."""
        keep = self.blocks_needed(num_tokens)
        for block in reversed(request.block_ids[keep:]):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        del request.block_ids[keep:]

    def free_request(self, request: Request) -> None:
        """Release the request's blocks; tail blocks go to the free list first, so prefixes live longer."""
        self.release_tail(request, 0)
        request.num_hashed_blocks = 0


def block_hash(parent: bytes | None, tokens: Sequence[int], extra: bytes = b"") -> bytes:
    """The hash of a full block of `tokens` after the prefix hashed `parent`: it names the whole prefix.
    `extra`: what else decides the block's keys and values (the content of images starting in it)."""
    # A cryptographic digest: Python's hash() of int tuples is predictable, and a crafted collision
    # would hand one request another's KV cache.
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(array("q", tokens).tobytes())
    digest.update(extra)
    return digest.digest()


def chain_start(adapter_slot: int) -> bytes | None:
    """What the first block's hash is chained to: nothing for the base model, the adapter's slot for LoRA."""
    return b"lora-adapter-%d" % adapter_slot if adapter_slot else None


def chained_hashes(token_ids: Sequence[int], block_size: int, parent: bytes | None, start: int,
                   stop: int, image_keys: Sequence[tuple[int, bytes]] = ()) -> Iterator[bytes]:
    """The prefix hashes of blocks `start` to `stop - 1` of `token_ids`, chained from `parent` (block
    `start - 1`'s hash, or the chain's start); lazily, so a lookup that misses early hashes no further.

    `image_keys`: (position of its first token, content hash) of each image in the prompt
    (`tokenmill.multimodal.image_block_keys`); the block holding that position hashes the image too."""
    for index in range(start, stop):
        begin, end = index * block_size, (index + 1) * block_size
        extra = b"".join(content for position, content in image_keys if begin <= position < end)
        parent = block_hash(parent, token_ids[begin:end], extra)
        yield parent


def prompt_block_hashes(token_ids: Sequence[int], block_size: int, adapter_slot: int = 0,
                        max_blocks: int | None = None, image_keys: Sequence[tuple[int, bytes]] = ()) -> Iterator[bytes]:
    """The prefix hashes a prompt is looked up by in the prefix cache, first block first: those of its full
    blocks before the last token, which is never taken from the cache (its step produces the logits). The
    router keys replicas by the same hashes (`tokenmill.api.prefix_affinity`)."""
    num_full = (len(token_ids) - 1) // block_size
    stop = num_full if max_blocks is None else min(num_full, max_blocks)
    return chained_hashes(token_ids, block_size, chain_start(adapter_slot), 0, stop, image_keys)
