"""The block codec: the bytes of one cached KV block, defined once.

A stored value is a 96-byte header followed by the block's raw K/V payload::

    offset size field
         0    4 magic           b"KVRB"
         4    2 version         CODEC_VERSION (uint16)
         6    1 dtype code      see DTYPES
         7    1 (zero pad)
         8   20 shape           5 x uint32: (num_layers, 2, block_size, num_kv_heads, head_dim)
        28    4 (zero pad)
        32   16 fingerprint     the model fingerprint as raw bytes
        48   32 token digest    the block's chained hash (covers this block's token ids,
                                every token before it, the salt and the fingerprint)
        80    8 payload length  bytes (uint64)
        88    8 checksum        xxh3-64 over header bytes [0, 88) and the payload
        96    - payload         the K/V of every layer, C order, little-endian, in the
                                dtype of the dtype code; an int8 payload starts with a
                                float32 scale per (layer, K/V), (num_layers, 2), then the
                                int8 values (K/V = value x its scale)

All integers are little-endian. Decoding uses ``struct`` and ``memoryview`` slicing only;
anything that does not verify raises ``BlockRejected`` with a reason and is never used.
The checksum covers the header too, so a change to any byte of a value is caught.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, cast

import xxhash

if TYPE_CHECKING:
    from typing import TypeAlias

    import numpy as np
    from typing_extensions import Buffer

    Payload: TypeAlias = Buffer | np.ndarray

MAGIC = b"KVRB"
CODEC_VERSION = 1
LAYOUT = "num_layers,2,block_size,num_kv_heads,head_dim"
"""The payload's axis order (K then V on axis 1); part of the model fingerprint."""

DTYPES: dict[str, tuple[int, int]] = {
    "float32": (1, 4),
    "float16": (2, 2),
    "bfloat16": (3, 2),
    "int8": (4, 1),
}
"""KV dtype name -> (code in the header, bytes per element)."""

_HEADER = struct.Struct("<4sHBx5I4x16s32sQQ")
HEADER_SIZE = _HEADER.size
_CHECKED_HEADER = HEADER_SIZE - 8
assert HEADER_SIZE == 96


class RejectReason(StrEnum):
    """Why a stored value was not accepted as the expected block."""

    TRUNCATED = "truncated"
    WRONG_LENGTH = "wrong_length"
    BAD_MAGIC = "bad_magic"
    UNKNOWN_VERSION = "unknown_version"
    WRONG_FINGERPRINT = "wrong_fingerprint"
    WRONG_FORMAT = "wrong_format"
    WRONG_TOKENS = "wrong_tokens"
    WRONG_CHECKSUM = "wrong_checksum"


class BlockRejected(Exception):
    """A value failed verification; ``reason`` says which check."""

    def __init__(self, reason: RejectReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


@dataclass(frozen=True)
class BlockSpec:
    """What every block of one model and KV format looks like."""

    fingerprint: str
    kv_dtype: str
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if self.kv_dtype not in DTYPES:
            raise ValueError(f"unsupported kv_dtype {self.kv_dtype!r}; known: {sorted(DTYPES)}")
        if min(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim) <= 0:
            raise ValueError("block dimensions must be positive")
        if len(bytes.fromhex(self.fingerprint)) != 16:
            raise ValueError("fingerprint must be 32 hex digits")

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """Payload shape ``(num_layers, 2, block_size, num_kv_heads, head_dim)``."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def scales_nbytes(self) -> int:
        """The float32 scales in front of an int8 payload, one per (layer, K/V); else 0."""
        return self.num_layers * 2 * 4 if self.kv_dtype == "int8" else 0

    @property
    def payload_nbytes(self) -> int:
        return self.scales_nbytes + math.prod(self.shape) * DTYPES[self.kv_dtype][1]

    @property
    def value_nbytes(self) -> int:
        return HEADER_SIZE + self.payload_nbytes


def _byte_view(payload: Payload) -> memoryview:
    view = memoryview(cast("Buffer", payload))  # numpy arrays export the buffer protocol
    if not view.c_contiguous:
        raise ValueError("payload must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _checksum(header_prefix: Buffer, payload: Buffer) -> int:
    digest = xxhash.xxh3_64(header_prefix)
    digest.update(payload)
    return digest.intdigest()


def payload_view(spec: BlockSpec, payload: Payload) -> memoryview:
    """``payload``'s bytes as a flat view; ValueError unless it is a contiguous block's worth."""
    data = _byte_view(payload)
    if data.nbytes != spec.payload_nbytes:
        raise ValueError(f"payload has {data.nbytes} bytes, the block needs {spec.payload_nbytes}")
    return data


def encode_block(spec: BlockSpec, block_hash: bytes, payload: Payload
                 ) -> tuple[bytes, memoryview]:
    """``(header, payload)`` of one stored value; the payload is a view, not a copy."""
    data = payload_view(spec, payload)
    header = bytearray(_HEADER.pack(MAGIC, CODEC_VERSION, DTYPES[spec.kv_dtype][0], *spec.shape,
                                    bytes.fromhex(spec.fingerprint), block_hash, data.nbytes, 0))
    checksum = _checksum(memoryview(header)[:_CHECKED_HEADER], data)
    struct.pack_into("<Q", header, _CHECKED_HEADER, checksum)
    return bytes(header), data


def decode_block(value: Buffer, spec: BlockSpec, block_hash: bytes) -> memoryview:
    """The payload of ``value`` (a view, no copy) if it is exactly the expected block."""
    view = _byte_view(value)
    if view.nbytes < HEADER_SIZE:
        raise BlockRejected(RejectReason.TRUNCATED)
    return decode_block_parts(view[:HEADER_SIZE], view[HEADER_SIZE:], spec, block_hash)


def decode_block_parts(header: Buffer, payload: Buffer, spec: BlockSpec, block_hash: bytes
                       ) -> memoryview:
    """``decode_block`` of a value received in two places: its first ``HEADER_SIZE``
    bytes and the rest (read straight into the memory it is meant for). Returns the
    payload view if the two make exactly the expected block."""
    head, body = _byte_view(header), _byte_view(payload)
    if head.nbytes != HEADER_SIZE:
        raise BlockRejected(RejectReason.TRUNCATED)
    (magic, version, dtype_code, *fields) = _HEADER.unpack_from(head)
    shape, (fingerprint, digest, length, checksum) = tuple(fields[:5]), fields[5:]
    _check_header(spec, block_hash, magic, version, dtype_code, shape, fingerprint, digest)
    _check_length(spec, length, body.nbytes)
    if _checksum(head[:_CHECKED_HEADER], body) != checksum:
        raise BlockRejected(RejectReason.WRONG_CHECKSUM)
    return body


def _check_header(spec: BlockSpec, block_hash: bytes, magic: bytes, version: int,
                  dtype_code: int, shape: tuple[int, ...], fingerprint: bytes,
                  digest: bytes) -> None:
    if magic != MAGIC:
        raise BlockRejected(RejectReason.BAD_MAGIC)
    if version != CODEC_VERSION:
        raise BlockRejected(RejectReason.UNKNOWN_VERSION)
    if fingerprint != bytes.fromhex(spec.fingerprint):
        raise BlockRejected(RejectReason.WRONG_FINGERPRINT)
    if dtype_code != DTYPES[spec.kv_dtype][0] or shape != spec.shape:
        raise BlockRejected(RejectReason.WRONG_FORMAT)
    if digest != block_hash:
        raise BlockRejected(RejectReason.WRONG_TOKENS)


def _check_length(spec: BlockSpec, declared: int, actual: int) -> None:
    if declared != spec.payload_nbytes:
        raise BlockRejected(RejectReason.WRONG_LENGTH)
    if actual < declared:
        raise BlockRejected(RejectReason.TRUNCATED)
    if actual > declared:
        raise BlockRejected(RejectReason.WRONG_LENGTH)
