"""Block bookkeeping and the KV pool's zero-copy export / one-copy import."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.kv import BlockAllocator, KVPool, OutOfBlocks


def test_allocate_hands_out_distinct_blocks_until_none_are_left() -> None:
    alloc = BlockAllocator(4)
    first = alloc.allocate(3)
    assert len(set(first)) == 3 and alloc.num_free == 1
    with pytest.raises(OutOfBlocks):
        alloc.allocate(2)
    assert alloc.num_free == 1  # a failed allocation takes nothing


def test_shared_block_is_returned_only_when_its_last_holder_frees_it() -> None:
    alloc = BlockAllocator(2)
    [block] = alloc.allocate(1)
    alloc.incref([block])
    assert alloc.ref_count(block) == 2
    alloc.free([block])
    assert alloc.num_free == 1 and alloc.ref_count(block) == 1
    alloc.free([block])
    assert alloc.num_free == 2
    assert block in alloc.allocate(2)


def test_double_free_and_incref_of_free_block_are_refused() -> None:
    alloc = BlockAllocator(2)
    [block] = alloc.allocate(1)
    alloc.free([block])
    with pytest.raises(ValueError):
        alloc.free([block])
    with pytest.raises(ValueError):
        alloc.incref([block])


def test_without_retention_a_name_goes_with_its_last_holder() -> None:
    alloc = BlockAllocator(3)
    blocks = alloc.allocate(2)
    alloc.name(zip(blocks, [b"h0", b"h1"]))
    alloc.free(blocks)
    assert alloc.num_free == 3 and alloc.num_retained == 0
    assert alloc.share_named([b"h0"]) == []


def test_retained_blocks_are_shared_again_by_name_and_count_as_free() -> None:
    alloc = BlockAllocator(4, retain_named=True)
    blocks = alloc.allocate(3)
    alloc.name(zip(blocks[:2], [b"h0", b"h1"]))  # the third block is not full: no name
    alloc.free(blocks)
    assert alloc.num_free == 4 and alloc.num_retained == 2
    assert alloc.share_named([b"h0", b"h1", b"h2"]) == blocks[:2]
    assert alloc.num_retained == 0 and alloc.num_free == 2
    assert [alloc.ref_count(b) for b in blocks[:2]] == [1, 1]
    assert alloc.share_named([b"h0"]) == blocks[:1]  # held again: shared as before
    alloc.free([blocks[0], blocks[0], blocks[1]])
    assert alloc.num_retained == 2


def test_allocation_takes_free_blocks_first_then_the_least_recently_released() -> None:
    alloc = BlockAllocator(4, retain_named=True)
    a, b, c = alloc.allocate(3)
    alloc.name([(a, b"a"), (b, b"b"), (c, b"c")])
    alloc.free([b])
    alloc.free([a])
    alloc.free([c])  # released in the order b, a, c
    [d] = alloc.allocate(1)
    assert d not in (a, b, c) and alloc.num_retained == 3  # the free block goes first
    assert alloc.allocate(1) == [b]  # then the one released longest ago, name dropped
    assert alloc.share_named([b"b"]) == [] and alloc.share_named([b"a"]) == [a]
    assert alloc.allocate_up_to(5) == [c]
    assert alloc.share_named([b"c"]) == [] and alloc.num_free == 0
    with pytest.raises(OutOfBlocks):
        alloc.allocate(1)


def test_a_reused_block_can_take_a_new_name() -> None:
    alloc = BlockAllocator(1, retain_named=True)
    [a] = alloc.allocate(1)
    alloc.name([(a, b"old")])
    alloc.free([a])
    [again] = alloc.allocate(1)
    alloc.name([(again, b"new")])
    alloc.free([again])
    assert alloc.share_named([b"old"]) == [] and alloc.num_retained == 1
    assert alloc.share_named([b"new"]) == [again] and alloc.num_free == 0


def _pool(dtype: torch.dtype = torch.float32) -> KVPool:
    return KVPool(5, 3, 4, 2, 8, dtype=dtype)


def test_export_is_a_contiguous_view_whose_numpy_shares_memory() -> None:
    pool = _pool()
    view = pool.export_block(2)
    assert view.shape == (3, 2, 4, 2, 8) and view.is_contiguous()
    assert view.data_ptr() == pool.tensor[2].data_ptr()
    arr = view.numpy()
    pool.tensor[2, 1, 0, 3, 1, 7] = 5.0
    assert arr[1, 0, 3, 1, 7] == 5.0
    assert len(memoryview(arr).cast("B")) == pool.block_nbytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["bytes", "memoryview", "bytearray", "tensor"])
def test_import_round_trips_the_exported_bytes(dtype: torch.dtype, kind: str) -> None:
    src, dst = _pool(dtype), _pool(dtype)
    src.tensor.copy_(torch.randn(src.tensor.shape).to(dtype))
    raw = src.export_block(1).view(torch.uint8).numpy().tobytes()
    payload = {"bytes": raw, "memoryview": memoryview(raw), "bytearray": bytearray(raw),
               "tensor": src.export_block(1)}[kind]
    dst.import_block(3, payload)
    assert torch.equal(dst.tensor[3], src.tensor[1])
    assert not dst.tensor[[0, 1, 2, 4]].any()


@pytest.mark.parametrize("payload", [b"", b"\x00" * 7, b"\x00" * (3 * 2 * 4 * 2 * 8 * 4 - 4),
                                     b"\x00" * (3 * 2 * 4 * 2 * 8 * 4 + 4)])
def test_import_of_a_payload_of_the_wrong_length_is_refused(payload: bytes) -> None:
    pool = _pool()
    with pytest.raises(ValueError):
        pool.import_block(0, payload)


def test_import_of_a_tensor_of_the_wrong_dtype_is_refused() -> None:
    pool = _pool()
    with pytest.raises(ValueError):
        pool.import_block(0, torch.zeros(pool.block_shape, dtype=torch.float64).view(-1)[::2])


def test_import_from_numpy_buffer_copies_once_and_keeps_the_source() -> None:
    pool = _pool()
    arr = np.arange(pool.block_nbytes // 4, dtype=np.float32)
    pool.import_block(4, memoryview(arr))
    arr[:] = 0
    assert pool.tensor[4].flatten()[5].item() == 5.0
