from __future__ import annotations

from typing import Any

import pytest

from cachestore.codec import CODEC_VERSION, LAYOUT
from cachestore.fingerprint import model_fingerprint

CONFIG = '{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2}'
BASE: dict[str, Any] = {"config_json": CONFIG, "weights_digest": "w0", "kv_dtype": "float32",
        "block_size": 64, "layout": LAYOUT, "codec_version": CODEC_VERSION}


def test_fingerprint_is_32_hex_digits() -> None:
    fp = model_fingerprint(**BASE)
    assert len(fp) == 32 and int(fp, 16) >= 0


def test_config_key_order_and_whitespace_do_not_matter() -> None:
    reordered = '{"num_hidden_layers":2,"hidden_size":64,"architectures":["LlamaForCausalLM"]}'
    assert model_fingerprint(**BASE | {"config_json": reordered}) == model_fingerprint(**BASE)


@pytest.mark.parametrize("field,value", [
    ("config_json", CONFIG.replace("64", "128")),
    ("weights_digest", "w1"),
    ("kv_dtype", "bfloat16"),
    ("block_size", 32),
    ("layout", "other"),
    ("codec_version", CODEC_VERSION + 1),
    ("wire_dtype", "bfloat16"),
])
def test_every_field_changes_the_fingerprint(field: str, value: object) -> None:
    assert model_fingerprint(**BASE | {field: value}) != model_fingerprint(**BASE)


def test_a_wire_dtype_equal_to_the_kv_dtype_keeps_the_native_fingerprint() -> None:
    assert model_fingerprint(**BASE | {"wire_dtype": "float32"}) == model_fingerprint(**BASE)
