"""Paged KV memory: block bookkeeping (plain Python) and the tensor pool that holds K/V.

A *block* holds the K and V of ``block_size`` consecutive tokens for every layer. The pool
tensor is laid out ``(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)`` so
that one block is one contiguous slice: exporting it is a view (on CPU ``.numpy()`` exposes
the bytes without a copy) and importing it is a single copy from a bytes-like object.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
import torch


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than a request needs."""


class BlockAllocator:
    """Reference-counted block ids; a block shared by several sequences is held once.

    ``allocate(n)`` hands out ``n`` free ids with a count of one, ``incref`` adds a holder,
    ``free`` drops one holder per id and returns an id to the free list when none remain.
    Thread-safe: the compute thread grows sequences while a store thread may reserve
    blocks for K/V it is about to fetch (``allocate_up_to``). Full blocks can be named by
    the hash of their tokens (``name``) and shared by name (``share_named``): a prompt
    prefix some running sequence holds is then held once, not fetched again.

    With ``retain_named``, a named block that loses its last holder keeps its K/V and its
    name instead of going back to the free list: a later prompt with that prefix shares it
    as if it were held (a local prefix cache, like vLLM's automatic prefix caching in front
    of the store). Such blocks count as free: when the free list runs out, ``allocate``
    takes the one unused longest (least recently released first), dropping its name.
    """

    def __init__(self, num_blocks: int, *, retain_named: bool = False) -> None:
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self.retain_named = retain_named
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs: list[int] = [0] * num_blocks
        self._lock = threading.Lock()
        self._named: dict[bytes, int] = {}  # content hash -> live or retained block
        self._name_of: dict[int, bytes] = {}
        self._retained: OrderedDict[int, None] = OrderedDict()  # unheld named blocks, LRU first

    @property
    def num_free(self) -> int:
        """Blocks ``allocate`` can hand out: free ones and retained ones."""
        return len(self._free) + len(self._retained)

    @property
    def num_retained(self) -> int:
        """Named blocks no sequence holds, kept for a later prompt with their prefix."""
        return len(self._retained)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        with self._lock:
            if n > self.num_free:
                raise OutOfBlocks(f"need {n} blocks, {self.num_free} free")
            return self._take(n)

    def allocate_up_to(self, n: int, keep_free: int = 0) -> list[int]:
        """As many blocks as possible up to ``n`` while ``keep_free`` stay free (maybe none)."""
        with self._lock:
            return self._take(max(0, min(n, self.num_free - keep_free)))

    def _take(self, n: int) -> list[int]:
        """``n`` blocks: free ones first, then retained ones, least recently released first."""
        blocks = [self._free.pop() for _ in range(min(n, len(self._free)))]
        while len(blocks) < n:
            block, _ = self._retained.popitem(last=False)
            del self._named[self._name_of.pop(block)]
            blocks.append(block)
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def incref(self, blocks: Iterable[int]) -> None:
        with self._lock:
            blocks = list(blocks)
            if any(self._refs[b] <= 0 for b in blocks):
                raise ValueError(f"blocks {[b for b in blocks if self._refs[b] <= 0]} "
                                 "are not allocated")
            for b in blocks:
                self._refs[b] += 1

    def free(self, blocks: Iterable[int]) -> None:
        with self._lock:
            for b in blocks:
                if self._refs[b] <= 0:
                    raise ValueError(f"block {b} is already free")
                self._refs[b] -= 1
                if self._refs[b] > 0:
                    continue
                if self.retain_named and b in self._name_of:
                    self._retained[b] = None  # newest last
                    continue
                self._free.append(b)
                name = self._name_of.pop(b, None)
                if name is not None:
                    del self._named[name]

    def name(self, pairs: Iterable[tuple[int, bytes]]) -> None:
        """Name full blocks by the chained hash of their tokens, so that later sequences
        with the same prefix share them (``share_named``). The caller promises the block
        holds exactly that K/V and is never written again. A block or a name already in
        use is left as it is; a name lasts while its block is held or retained."""
        with self._lock:
            for block, name in pairs:
                if (self._refs[block] > 0 and name not in self._named
                        and block not in self._name_of):
                    self._named[name] = block
                    self._name_of[block] = name

    def share_named(self, names: Iterable[bytes]) -> list[int]:
        """A new reference to the held or retained block of each of ``names`` in order, up
        to the first name that no such block has."""
        shared: list[int] = []
        with self._lock:
            for name in names:
                block = self._named.get(name)
                if block is None:
                    break
                if self._refs[block] == 0:
                    del self._retained[block]
                self._refs[block] += 1
                shared.append(block)
        return shared


class KVPool:
    """The K/V tensor of every block: ``(num_blocks, num_layers, 2, block_size, kv_heads, head_dim)``."""

    def __init__(self, num_blocks: int, num_layers: int, block_size: int, num_kv_heads: int,
                 head_dim: int, *, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.block_size = block_size
        self.wire_dtype = dtype
        """The dtype of blocks going to and from the store (``import_block`` converts)."""
        self.tensor = torch.zeros(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim,
                                  dtype=dtype, device=device)

    @property
    def block_shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape[1:])

    @property
    def block_nbytes(self) -> int:
        return self.tensor[0].numel() * self.tensor.element_size()

    def layer(self, i: int) -> torch.Tensor:
        """Layer ``i`` of every block: ``(num_blocks, 2, block_size, kv_heads, head_dim)`` (a view)."""
        return self.tensor[:, i]

    @property
    def lands_in_place(self) -> bool:
        """Whether wire payloads can be copied straight into block memory
        (``landing_bytes``): a CPU pool in the wire dtype. Otherwise they go through
        ``import_block``, which moves or converts them."""
        return self.tensor.is_cpu and self.wire_dtype == self.tensor.dtype

    def landing_bytes(self, block: int) -> np.ndarray:
        """One block's memory as a writable flat byte array (``lands_in_place`` pools)."""
        if not self.lands_in_place:
            raise ValueError("this pool converts or lives off the CPU: use import_block")
        return _byte_array(self.tensor[block])

    def export_block(self, block: int) -> torch.Tensor:
        """One block's K/V for all layers, ``(L, 2, bs, kvh, hd)``: a contiguous view, no copy."""
        return self.tensor[block]

    def import_block(self, block: int, payload: object) -> None:
        """Copy one block's K/V in from a tensor or any bytes-like object (one copy); bytes
        are read as ``wire_dtype`` and converted to the pool's dtype by that copy."""
        if self.wire_dtype == torch.int8 and not isinstance(payload, torch.Tensor):
            self._import_int8(block, payload)
            return
        src = payload if isinstance(payload, torch.Tensor) else _tensor_from_buffer(
            payload, self.wire_dtype)
        if src.dtype != self.tensor.dtype and src.dtype == self.wire_dtype:
            self._import_converted(block, src)
            return
        if src.numel() * src.element_size() != self.block_nbytes or src.dtype != self.tensor.dtype:
            raise ValueError(
                f"block payload is {src.numel() * src.element_size()} bytes of {src.dtype}, "
                f"expected {self.block_nbytes} bytes of {self.tensor.dtype}")
        dst = self.tensor[block]
        if dst.is_cpu and src.is_cpu:  # one memcpy; torch's threaded copy_ is slow on busy cores
            np.copyto(_byte_array(dst), _byte_array(src))
        else:
            dst.copy_(src.reshape(self.block_shape))

    def _import_converted(self, block: int, src: torch.Tensor) -> None:
        """One conversion-copy of a ``wire_dtype`` block into the pool's dtype."""
        if src.numel() != self.tensor[block].numel():
            raise ValueError(f"block payload has {src.numel()} {src.dtype} elements, "
                             f"expected {self.tensor[block].numel()}")
        self.tensor[block].copy_(src.reshape(self.block_shape))

    def _import_int8(self, block: int, payload: object) -> None:
        """An int8 block: float32 scales ``(L, 2)`` then int8 K/V; K/V = int8 x scale."""
        num_scales = self.block_shape[0] * 2
        raw = _tensor_from_buffer(payload, torch.uint8)
        if raw.numel() != num_scales * 4 + self.tensor[block].numel():
            raise ValueError(f"int8 block payload is {raw.numel()} bytes, expected "
                             f"{num_scales * 4 + self.tensor[block].numel()}")
        scales = raw[:num_scales * 4].view(torch.float32).view(-1, 2, 1, 1, 1)  # (L, 2, 1, 1, 1)
        dst = self.tensor[block]
        dst.copy_(raw[num_scales * 4:].view(torch.int8).view(self.block_shape))
        dst.mul_(scales.to(dst.device, dst.dtype))


def _byte_array(t: torch.Tensor) -> np.ndarray:
    """The bytes of a CPU tensor as a flat numpy array (a view when ``t`` is contiguous)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _tensor_from_buffer(payload: object, dtype: torch.dtype) -> torch.Tensor:
    """A read-only view of ``payload`` as a flat tensor; the caller only reads from it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(payload, dtype=dtype)  # type: ignore[arg-type]
