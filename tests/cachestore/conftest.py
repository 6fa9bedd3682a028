"""Fixtures for cachestore tests: real redis-servers (from tests.support) and toy blocks."""

from __future__ import annotations

import numpy as np
import pytest

from cachestore.codec import BlockSpec
from tests.support.redis_server import redis_cluster, redis_server, redis_tls  # noqa: F401

FINGERPRINT = "5b9e2b65c8c1d26d18c7200eca407dd2"


@pytest.fixture
def spec() -> BlockSpec:
    """A toy block format: 2 layers, 4-token blocks, 2 KV heads of dim 8 (fp32, 512 B)."""
    return BlockSpec(FINGERPRINT, "float32", num_layers=2, block_size=4, num_kv_heads=2,
                     head_dim=8)


def make_payloads(spec: BlockSpec, count: int, seed: int = 0) -> np.ndarray:
    """``count`` random blocks, shape ``(count, *spec.shape)``, in the spec's dtype width."""
    rng = np.random.default_rng(seed)
    width = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[spec.kv_dtype]
    return rng.standard_normal((count, *spec.shape)).astype(np.float32).astype(width)


class Collect:
    """A fetch sink that copies each payload out (as the engine would) in order."""

    def __init__(self) -> None:
        self.blocks: list[tuple[int, bytes]] = []

    def __call__(self, index: int, payload: memoryview) -> None:
        self.blocks.append((index, bytes(payload)))
