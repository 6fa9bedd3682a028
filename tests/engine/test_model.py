"""engine.model's building blocks: the row-count dependent matmul and in-place rotary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model import TRANSPOSED_ROWS, _column_major, linear
from engine.rope import apply_rope_

TOL: dict[str, float] = {"atol": 1e-5, "rtol": 1e-5}


@pytest.mark.parametrize("rows", [1, 2, TRANSPOSED_ROWS.start, TRANSPOSED_ROWS.stop - 1,
                                  TRANSPOSED_ROWS.stop])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_f_linear_for_every_row_count(rows: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(48, 32, generator=g)
    bias = torch.randn(48, generator=g) if with_bias else None
    x = torch.randn(rows, 1, 32, generator=g)  # (B, T, in) as in decode
    expected = F.linear(x, weight, bias)
    got = linear(x, _column_major(weight), bias)
    assert got.shape == (rows, 1, 48)
    assert got.is_contiguous()  # a strided last dim sends SDPA to its slow math path
    torch.testing.assert_close(got, expected, **TOL)


def test_linear_result_can_be_split_into_heads() -> None:
    weight = _column_major(torch.randn(4 * 8, 16))
    x = torch.randn(2, TRANSPOSED_ROWS.start, 16)  # (B, T, in): 2*16 rows, transposed form
    out = linear(x, weight).view(2, TRANSPOSED_ROWS.start, 4, 8)  # (B, T, heads, hd)
    torch.testing.assert_close(out, F.linear(x, weight).view(2, -1, 4, 8), **TOL)


def test_rope_in_place_on_a_strided_view_matches_rotate_half() -> None:
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 3, 5, 8, generator=g)  # (B, T, heads, hd); the first 3 heads rotate
    cos, sin = torch.randn(2, 3, 1, 8, generator=g), torch.randn(2, 3, 1, 8, generator=g)
    x = qkv[:, :, :3].clone()
    expected = x * cos + torch.cat((-x[..., 4:], x[..., :4]), dim=-1) * sin  # HF's rotate_half
    untouched = qkv[:, :, 3:].clone()
    apply_rope_(qkv[:, :, :3], cos, torch.cat((-sin[..., :4], sin[..., 4:]), dim=-1))
    torch.testing.assert_close(qkv[:, :, :3], expected, **TOL)
    assert torch.equal(qkv[:, :, 3:], untouched)


def test_batched_decode_attention_uses_the_fused_sdpa_kernel(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """16 decoding rows over a held context must not fall back to SDPA's math path."""
    from engine.config import ModelConfig
    from engine.model import build_model
    from engine.runner import ModelRunner
    from engine.sequence import Sequence

    config = ModelConfig.from_hf({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5})
    model = build_model(config)
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    runner = ModelRunner((config, model), num_blocks=128, block_size=4)
    seqs = [Sequence(f"s{i}", list(range(1, 10 + i))) for i in range(TRANSPOSED_ROWS.start)]
    runner.prefill(seqs)
    for s in seqs:
        s.token_ids.append(3)
    with torch.profiler.profile() as prof:
        runner.decode(seqs)
    kernels = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}
    assert "aten::_scaled_dot_product_attention_math" not in kernels, kernels
