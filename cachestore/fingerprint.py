"""Model fingerprint: one short string naming everything that changes a block's bytes.

Two workers share a block only when their fingerprints are equal, so the fingerprint
covers the model's architecture and config, a digest of its weights, the KV dtype (and
the stored payload's wire dtype when it differs), the block size, the KV layout and the
codec version. It is the first 128 bits of a SHA-256 over a canonical JSON document of
those fields, written as 32 lowercase hex digits (it goes into every store key and, as
raw bytes, into every block header).
"""

from __future__ import annotations

import hashlib
import json

FINGERPRINT_HEX_LEN = 32


def model_fingerprint(config_json: str, weights_digest: str, kv_dtype: str, block_size: int,
                      layout: str, codec_version: int, wire_dtype: str | None = None) -> str:
    """Fingerprint of a model + KV format; see the module docstring for what it covers.

    ``wire_dtype`` is the stored payload's dtype when it differs from ``kv_dtype`` (None:
    the same, and the fingerprint is what it was before wire formats existed)."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    document: dict[str, object] = {
        "config": json.loads(config_json),  # re-serialized below: key order is irrelevant
        "weights_digest": weights_digest,
        "kv_dtype": kv_dtype,
        "block_size": block_size,
        "layout": layout,
        "codec_version": codec_version,
    }
    if wire_dtype is not None and wire_dtype != kv_dtype:
        document["wire_dtype"] = wire_dtype
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:FINGERPRINT_HEX_LEN]
