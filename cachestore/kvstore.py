"""``PrefixCache``: hashing, the codec and a block store put together.

The decode worker asks how long a prompt's cached prefix is (``lookup``) and pulls it
(``fetch_prefix``); the prefill worker pushes the blocks it computed (``publish``).
Values are requested in pipelined batches of about ``batch_bytes`` and streamed: each
one is received into a reusable per-thread buffer, verified and handed to the caller's
sink as soon as it has arrived, while the next ones are still on the wire. The first
missing or invalid block ends the prefix.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from cachestore.arena import Arena, Landed, LandingArena
from cachestore.codec import (
    HEADER_SIZE,
    BlockRejected,
    BlockSpec,
    decode_block,
    decode_block_parts,
    encode_block,
    payload_view,
)
from cachestore.hashing import BlockHash, block_key, hash_block_chain
from cachestore.stats import CacheStats
from cachestore.store import BlockStore, PutItem

if TYPE_CHECKING:
    from cachestore.codec import Payload

DEFAULT_BLOCK_SIZE = 16
"""Tokens per block, chosen from ``python -m bench.cachestore --block-sizes 16,32,64,128``
(SmolLM2-135M-shaped KV, 2048 tokens, fp32 90 MiB and bf16 45 MiB, loopback Redis on a
2-core machine). Put and get throughput did not depend on the block size beyond the
run-to-run noise (about +-30% on that shared machine): moving the bytes costs about
1 ms per MB of client plus server CPU, while the fixed cost of one block (framing, one
Redis command, header check, one sink call; the bench's last line) measured 10-35 us,
i.e. 2-6% of the transfer time of a whole prompt at 16 tokens per block. With that, the
smallest block wins on everything else: a shared prefix is reused to within 16 tokens
instead of 64, decode recomputes a tail of at most 15 tokens, values stay small enough
that one GET does not hold the single-threaded Redis for long (a 64-token block of a
70B model would be 20 MB), and keys spread more evenly over a cluster's slots. 16 also
keeps a 1984-token cached prefix on whole blocks (124 x 16); 128 would not."""

DEFAULT_BATCH_BYTES = 32 * 1024 * 1024

Sink = Callable[[int, memoryview], None]
"""Receives ``(block index, verified payload)``; the view is valid only during the call.
An exception from the sink ends the fetch and propagates to ``fetch_prefix``'s caller."""

Land = Callable[[int], "memoryview | None"]
"""Where block ``i``'s payload may be received (``fetch_prefix``), or None: the arena."""


class PrefixCache:
    """Verified prefix reads and idempotent writes of one model's KV blocks."""

    def __init__(self, store: BlockStore, spec: BlockSpec, *, ttl_s: int | None = None,
                 batch_bytes: int = DEFAULT_BATCH_BYTES) -> None:
        self.store = store
        self.spec = spec
        self.ttl_s = ttl_s
        self._batch_blocks = max(1, batch_bytes // spec.value_nbytes)
        self._local = threading.local()

    @property
    def stats(self) -> CacheStats:
        return self.store.stats

    def block_hashes(self, token_ids: Sequence[int], cache_salt: str = "") -> list[BlockHash]:
        """Chained hashes of every full block of ``token_ids`` under this model and salt."""
        return hash_block_chain(token_ids, self.spec.block_size, self.spec.fingerprint,
                                cache_salt)

    def keys(self, hashes: Sequence[BlockHash]) -> list[str]:
        return [block_key(self.spec.fingerprint, h) for h in hashes]

    def lookup(self, hashes: Sequence[BlockHash]) -> int:
        """Number of leading blocks present in the store (not yet verified)."""
        return self.store.lookup_prefix(self.keys(hashes))

    def fetch_prefix(self, hashes: Sequence[BlockHash], sink: Sink,
                     land: Land | None = None) -> int:
        """Hand every block of the longest verified prefix to ``sink``; returns its length.

        With ``land``, block ``i``'s payload is received straight into ``land(i)`` (its
        KV pool block, say) when that gives memory of the payload's size, verified there,
        and handed to ``sink`` as that very memory: no copy between the socket and the
        pool. A block that does not verify leaves ``land(i)``'s memory written but is never
        handed to ``sink``, and the fetch stops there as always."""
        started = time.monotonic()
        fetched = 0
        for start in range(0, len(hashes), self._batch_blocks):
            batch = hashes[start:start + self._batch_blocks]
            accepted = self._fetch_batch(start, batch, sink, land)
            fetched += accepted
            if accepted < len(batch):
                break
        self._count_fetch(fetched, len(hashes), time.monotonic() - started)
        return fetched

    def publish(self, hashes: Sequence[BlockHash], payloads: Sequence[Payload]) -> int:
        """Store ``payloads[i]`` as block ``hashes[i]`` (SET NX); returns how many were new.

        Every payload is checked (ValueError) before anything is sent; each is encoded
        (its checksum computed) only as it is about to be sent, while the server is still
        reading the values before it."""
        if len(hashes) != len(payloads):
            raise ValueError(f"{len(hashes)} hashes but {len(payloads)} payloads")
        views = [payload_view(self.spec, p) for p in payloads]
        started = time.monotonic()
        written = 0
        for start in range(0, len(hashes), self._batch_blocks):
            items: list[PutItem] = [
                (block_key(self.spec.fingerprint, h), functools.partial(encode_block, self.spec, h, v))
                for h, v in zip(hashes[start:start + self._batch_blocks],
                                views[start:start + self._batch_blocks])]
            written += self.store.put_many(items, self.ttl_s)
        self.stats.add_seconds("publish", time.monotonic() - started)
        return written

    def _fetch_batch(self, start: int, batch: Sequence[BlockHash], sink: Sink,
                     land: Land | None = None) -> int:
        accepted = 0
        sink_error: Exception | None = None

        def visit(offset: int, value: memoryview | Landed | None) -> bool:
            nonlocal accepted, sink_error
            payload = None if value is None else self._verified(batch[offset], value)
            if payload is None:
                return False
            try:
                sink(start + offset, payload)
            except Exception as exc:  # noqa: BLE001 (re-raised once the store call is over)
                sink_error = exc
                return False
            accepted += 1
            return True

        arena: Arena | LandingArena = self._arena() if land is None else LandingArena(
            self._arena(), HEADER_SIZE, self.spec.payload_nbytes, land, start)
        self.store.get_each(self.keys(batch), visit, arena=arena,
                            max_value_bytes=self.spec.value_nbytes)
        if sink_error is not None:
            raise sink_error  # the caller's own failure, not a store error
        return accepted

    def _verified(self, block_hash: BlockHash, value: memoryview | Landed) -> memoryview | None:
        try:
            if isinstance(value, Landed):
                return decode_block_parts(value.header, value.payload, self.spec, block_hash)
            return decode_block(value, self.spec, block_hash)
        except BlockRejected as rejected:
            self.stats.integrity(rejected.reason.value,
                                 block_key(self.spec.fingerprint, block_hash))
            return None

    def _count_fetch(self, fetched: int, wanted: int, seconds: float) -> None:
        self.stats.add("hits", fetched)
        self.stats.add("misses", wanted - fetched)
        self.stats.add("hit_bytes", fetched * self.spec.payload_nbytes)
        self.stats.add_seconds("fetch", seconds)

    def _arena(self) -> Arena:
        arena: Arena | None = getattr(self._local, "arena", None)
        if arena is None:
            arena = self._local.arena = Arena()
        return arena
