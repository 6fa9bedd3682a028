"""Block hashing: the one place where kvrelay turns token ids into cache keys.

A prompt is cut into full blocks of ``block_size`` tokens and hashed as a chain::

    h_-1 = SHA-256(b"kvrelay-chain-root-v1" || len-prefixed fingerprint || len-prefixed salt)
    h_i  = SHA-256(h_{i-1} || canonical bytes of block i's token ids)

The canonical bytes of a block are its token ids as unsigned 32-bit little-endian
integers. Every hash therefore covers the model fingerprint, the cache salt and every
token before and in its block, and is the same in every process, machine and restart
(Python's ``hash()`` is never used). The last partial block is never hashed.

``cache_salt`` isolates tenants: blocks are shared only between requests with the same
salt, which closes the prefix-cache timing side channel between them. The gateway in
front of kvrelay must set it from the caller's identity; clients must not choose it.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import NewType

import numpy as np

BlockHash = NewType("BlockHash", bytes)
"""A 32-byte chained SHA-256 digest naming one block of one prompt prefix."""

KEY_PREFIX = "kvrelay:v1"
_ROOT_TAG = b"kvrelay-chain-root-v1"
_MAX_TOKEN_ID = 2**32 - 1


def _length_prefixed(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def chain_root(fingerprint: str, cache_salt: str = "") -> BlockHash:
    """The chain's seed ``h_-1``: binds every block hash to one model and one salt."""
    material = _ROOT_TAG + _length_prefixed(fingerprint.encode()) + _length_prefixed(
        cache_salt.encode())
    return BlockHash(hashlib.sha256(material).digest())


def canonical_tokens(token_ids: Sequence[int]) -> bytes:
    """Token ids as uint32 little-endian bytes; raises ValueError outside [0, 2**32)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > _MAX_TOKEN_ID):
        raise ValueError("token ids must be in [0, 2**32)")
    return ids.astype("<u4").tobytes()


def hash_block_chain(token_ids: Sequence[int], block_size: int, fingerprint: str,
                     cache_salt: str = "") -> list[BlockHash]:
    """Hashes of every full block of ``token_ids`` (a trailing partial block is skipped)."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    raw = canonical_tokens(token_ids)
    stride = 4 * block_size
    hashes: list[BlockHash] = []
    parent = chain_root(fingerprint, cache_salt)
    for start in range(0, len(raw) - stride + 1, stride):
        parent = BlockHash(hashlib.sha256(parent + raw[start:start + stride]).digest())
        hashes.append(parent)
    return hashes


def block_key(fingerprint: str, block_hash: BlockHash) -> str:
    """The store key of a block: ``kvrelay:v1:<fingerprint>:<block hash hex>``."""
    return f"{KEY_PREFIX}:{fingerprint}:{block_hash.hex()}"
