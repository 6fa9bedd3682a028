"""How the prefill worker splits the blocks it computes into publish chunks: as few passes
as the size cap allows, then a last chunk of ``PUBLISH_CHUNK_BLOCKS``; a range shorter than
two such chunks in one pass."""

from __future__ import annotations

import itertools

import pytest

from prefill_service.worker import MAX_CHUNK_BLOCKS, PUBLISH_CHUNK_BLOCKS, chunks


@pytest.mark.parametrize(("first", "last", "expected"), [
    (0, 128, [(0, 96), (96, 128)]),
    (0, 100, [(0, 68), (68, 100)]),
    (0, 20, [(0, 20)]),
    (0, 34, [(0, 34)]),  # 2 blocks ahead of the last 32 are not worth a pass of their own
    (0, 63, [(0, 63)]),
    (0, 64, [(0, 32), (32, 64)]),
    (124, 128, [(124, 128)]),
    (0, 160, [(0, 128), (128, 160)]),
    (0, 161, [(0, 64), (64, 129), (129, 161)]),
    (10, 300, [(10, 96), (96, 182), (182, 268), (268, 300)]),
    (7, 7, []),
])
def test_the_last_chunk_is_short_and_the_rest_take_as_few_passes_as_allowed(
        first: int, last: int, expected: list[tuple[int, int]]) -> None:
    assert (PUBLISH_CHUNK_BLOCKS, MAX_CHUNK_BLOCKS) == (32, 128)
    assert chunks(first, last) == expected


def test_chunks_cover_the_range_in_order_within_the_cap() -> None:
    for first in range(0, 40, 7):
        for last in range(first + 1, first + 700, 13):
            ranges = chunks(first, last, tail=8, size=50)
            edges = [first] + [b for _, b in ranges]
            assert ranges == list(itertools.pairwise(edges)) and edges[-1] == last
            assert all(0 < b - a <= 50 for a, b in ranges)
            if last - first < 16:
                assert ranges == [(first, last)]
            else:
                assert ranges[-1][1] - ranges[-1][0] == 8
                assert len(ranges) == 1 + -(-(last - first - 8) // 50)
