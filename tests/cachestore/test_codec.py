from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachestore.codec import (
    CODEC_VERSION,
    HEADER_SIZE,
    MAGIC,
    BlockRejected,
    BlockSpec,
    RejectReason,
    decode_block,
    encode_block,
)
from cachestore.hashing import hash_block_chain
from tests.cachestore.conftest import FINGERPRINT, make_payloads

HASH = hash_block_chain(range(4), 4, FINGERPRINT)[0]
OTHER_HASH = hash_block_chain(range(1, 5), 4, FINGERPRINT)[0]


def _value(spec: BlockSpec, payload: np.ndarray, block_hash: bytes = HASH) -> bytes:
    return b"".join(bytes(part) for part in encode_block(spec, block_hash, payload))


def _reason(value: bytes, spec: BlockSpec, block_hash: bytes = HASH) -> RejectReason:
    with pytest.raises(BlockRejected) as rejected:
        decode_block(value, spec, block_hash)
    return rejected.value.reason


specs = st.builds(
    BlockSpec, st.just(FINGERPRINT), st.sampled_from(["float32", "float16", "bfloat16"]),
    st.integers(1, 3), st.integers(1, 4), st.integers(1, 2), st.integers(1, 4))


@settings(max_examples=60, deadline=None)
@given(spec=specs, seed=st.integers(0, 2**32 - 1))
def test_round_trip_is_exact(spec: BlockSpec, seed: int) -> None:
    payload = make_payloads(spec, 1, seed)[0]
    value = _value(spec, payload)
    assert len(value) == spec.value_nbytes
    decoded = decode_block(value, spec, HASH)
    assert bytes(decoded) == payload.tobytes()
    assert np.array_equal(np.frombuffer(decoded, payload.dtype).reshape(spec.shape), payload)


def test_payload_is_not_copied_on_encode(spec: BlockSpec) -> None:
    payload = make_payloads(spec, 1)[0]
    header, body = encode_block(spec, HASH, payload)
    assert len(header) == HEADER_SIZE
    assert np.shares_memory(np.frombuffer(body, np.uint8), payload)


@settings(max_examples=200, deadline=None)
@given(spec=specs, data=st.data())
def test_any_single_byte_change_is_rejected(spec: BlockSpec, data: st.DataObject) -> None:
    value = bytearray(_value(spec, make_payloads(spec, 1)[0]))
    position = data.draw(st.integers(0, len(value) - 1))
    value[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises(BlockRejected):
        decode_block(bytes(value), spec, HASH)


def test_every_position_flip_and_truncation_is_rejected(spec: BlockSpec) -> None:
    value = _value(spec, make_payloads(spec, 1)[0])
    for position in range(len(value)):
        for mask in (0x01, 0x80, 0xFF):
            changed = bytearray(value)
            changed[position] ^= mask
            with pytest.raises(BlockRejected):
                decode_block(bytes(changed), spec, HASH)
    for length in range(len(value)):
        with pytest.raises(BlockRejected):
            decode_block(value[:length], spec, HASH)


@settings(max_examples=100, deadline=None)
@given(spec=specs, cut=st.integers(1, 10_000))
def test_any_truncation_is_rejected(spec: BlockSpec, cut: int) -> None:
    value = _value(spec, make_payloads(spec, 1)[0])
    assert _reason(value[:max(0, len(value) - cut)], spec) in (
        RejectReason.TRUNCATED, RejectReason.WRONG_LENGTH)


def test_each_check_names_its_reason(spec: BlockSpec) -> None:
    payload = make_payloads(spec, 1)[0]
    value = _value(spec, payload)
    assert _reason(value[:HEADER_SIZE - 1], spec) is RejectReason.TRUNCATED
    assert _reason(value[:-1], spec) is RejectReason.TRUNCATED
    assert _reason(value + b"\0", spec) is RejectReason.WRONG_LENGTH
    assert _reason(b"XXXX" + value[4:], spec) is RejectReason.BAD_MAGIC
    assert _reason(value[:4] + struct.pack("<H", CODEC_VERSION + 1) + value[6:],
                   spec) is RejectReason.UNKNOWN_VERSION
    assert _reason(value, spec, OTHER_HASH) is RejectReason.WRONG_TOKENS
    tampered = bytearray(value)
    tampered[-1] ^= 1
    assert _reason(bytes(tampered), spec) is RejectReason.WRONG_CHECKSUM


def test_other_model_or_format_is_rejected(spec: BlockSpec) -> None:
    value = _value(spec, make_payloads(spec, 1)[0])
    other_model = BlockSpec("0" * 32, spec.kv_dtype, 2, 4, 2, 8)
    other_dtype = BlockSpec(spec.fingerprint, "float16", 2, 4, 2, 16)
    assert _reason(value, other_model) is RejectReason.WRONG_FINGERPRINT
    assert _reason(value, other_dtype) is RejectReason.WRONG_FORMAT


def test_a_pickle_is_rejected_without_being_loaded(spec: BlockSpec) -> None:
    hostile = pickle.dumps({"payload": b"\0" * spec.payload_nbytes})
    assert _reason(hostile, spec) in (RejectReason.BAD_MAGIC, RejectReason.TRUNCATED)
    assert _reason(MAGIC + hostile, spec) is RejectReason.UNKNOWN_VERSION


def test_wrong_payload_size_is_refused_on_encode(spec: BlockSpec) -> None:
    with pytest.raises(ValueError):
        encode_block(spec, HASH, np.zeros(3, np.float32))


@settings(max_examples=300, deadline=None)
@given(spec=specs, junk=st.binary(max_size=1200), with_magic=st.booleans())
def test_arbitrary_bytes_are_rejected_with_a_reason(spec: BlockSpec, junk: bytes,
                                                    with_magic: bool) -> None:
    value = MAGIC + struct.pack("<H", CODEC_VERSION) + junk if with_magic else junk
    assert isinstance(_reason(value, spec), RejectReason)
