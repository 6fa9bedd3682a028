from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from cachestore.hashing import block_key, canonical_tokens, chain_root, hash_block_chain
from tests.cachestore.conftest import FINGERPRINT

REPO_ROOT = Path(__file__).resolve().parents[2]

GOLDEN_ROOT = "4b755536c2b5c4a7a2b19a29b0e76d6d6c99884c39840951e5c0d7a214f7cfa9"
GOLDEN_ROOT_SALTED = "4fd02625f61094bbeb4cdd7026e1c10e8b0af7383357067bfe948728b0ba1df1"
GOLDEN_CHAIN = [
    "c3e11708b87852f2fda3c86c2ec934ca8c7907a45197c4d1532f87d61cfbd3bd",
    "634fa048e5cf4a123beef89f6eda8b52a4f2c4af4b9f7fb25d19b66bb2bf1ca2",
]


def test_golden_digests_pin_the_format() -> None:
    assert chain_root(FINGERPRINT).hex() == GOLDEN_ROOT
    assert chain_root(FINGERPRINT, "tenant-a").hex() == GOLDEN_ROOT_SALTED
    assert [h.hex() for h in hash_block_chain(range(10), 4, FINGERPRINT)] == GOLDEN_CHAIN


def test_chain_follows_the_documented_formula() -> None:
    def lp(data: bytes) -> bytes:
        return struct.pack("<I", len(data)) + data

    root = hashlib.sha256(b"kvrelay-chain-root-v1" + lp(FINGERPRINT.encode()) + lp(b"s")).digest()
    h0 = hashlib.sha256(root + struct.pack("<4I", 7, 8, 9, 70000)).digest()
    h1 = hashlib.sha256(h0 + struct.pack("<4I", 1, 2, 3, 4)).digest()
    assert hash_block_chain([7, 8, 9, 70000, 1, 2, 3, 4], 4, FINGERPRINT, "s") == [h0, h1]


def test_only_full_blocks_are_hashed() -> None:
    assert len(hash_block_chain(range(11), 4, FINGERPRINT)) == 2
    assert hash_block_chain(range(3), 4, FINGERPRINT) == []


def test_each_hash_covers_every_earlier_token() -> None:
    base = hash_block_chain([1, 2, 3, 4, 5, 6, 7, 8], 4, FINGERPRINT)
    changed = hash_block_chain([1, 2, 3, 99, 5, 6, 7, 8], 4, FINGERPRINT)
    assert base[0] != changed[0] and base[1] != changed[1]


def test_salt_and_fingerprint_separate_chains() -> None:
    tokens = list(range(8))
    plain = hash_block_chain(tokens, 4, FINGERPRINT)
    assert hash_block_chain(tokens, 4, FINGERPRINT, "tenant-a") != plain
    assert hash_block_chain(tokens, 4, "0" * 32) != plain
    assert hash_block_chain(tokens, 4, FINGERPRINT, "tenant-a") == hash_block_chain(
        tokens, 4, FINGERPRINT, "tenant-a")


def test_key_format() -> None:
    h = hash_block_chain(range(4), 4, FINGERPRINT)[0]
    assert block_key(FINGERPRINT, h) == f"kvrelay:v1:{FINGERPRINT}:{h.hex()}"


@pytest.mark.parametrize("bad", [[-1], [2**32]])
def test_out_of_range_token_ids_are_refused(bad: list[int]) -> None:
    with pytest.raises(ValueError):
        canonical_tokens(bad)


def test_keys_are_identical_across_hash_seeds() -> None:
    script = ("from cachestore.hashing import hash_block_chain, block_key\n"
              f"print(block_key({FINGERPRINT!r}, "
              f"hash_block_chain(list(range(64)), 16, {FINGERPRINT!r}, 'salt')[-1]))")
    outputs = set()
    for seed in ("1", "2", "random"):
        env = os.environ | {"PYTHONHASHSEED": seed}
        outputs.add(subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env,
                                   capture_output=True, text=True, check=True,
                                   timeout=60).stdout.strip())
    assert len(outputs) == 1
    expected = block_key(FINGERPRINT, hash_block_chain(list(range(64)), 16, FINGERPRINT,
                                                        "salt")[-1])
    assert outputs == {expected}
