"""Model fingerprint: one short string naming everything that changes a block's bytes.

Two workers share a block only when their fingerprints are equal, so the fingerprint
covers the model's architecture and config, a digest of its weights, the KV dtype, the
block size, the KV layout and the codec version. It is the first 128 bits of a SHA-256
over a canonical JSON document of those fields, written as 32 lowercase hex digits (it
goes into every store key and, as raw bytes, into every block header).
"""

from __future__ import annotations

import hashlib
import json

FINGERPRINT_HEX_LEN = 32


def model_fingerprint(config_json: str, weights_digest: str, kv_dtype: str, block_size: int,
                      layout: str, codec_version: int) -> str:
    """Fingerprint of a model + KV format; see the module docstring for what it covers."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    document = {
        "config": json.loads(config_json),  # re-serialized below: key order is irrelevant
        "weights_digest": weights_digest,
        "kv_dtype": kv_dtype,
        "block_size": block_size,
        "layout": layout,
        "codec_version": codec_version,
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:FINGERPRINT_HEX_LEN]
