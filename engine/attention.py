"""Attention over paged KV memory, with the per-step metadata every layer shares.

The runner builds one ``AttentionMetadata`` per forward pass (index tensors computed once
and reused by all layers). Each layer then writes its new K/V into the pool and attends
either to the fresh K/V alone (no held prefix: plain causal attention) or to each
sequence's blocks gathered from the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionMetadata:
    """Where the new tokens' K/V go and what each query may attend to.

    ``slot_blocks``/``slot_offsets`` (N,): pool block and in-block offset of every real new
    token (None: write nothing, e.g. with the KV cache off). ``token_index`` (N,): those
    tokens' flat indices in the padded (B*T) batch (None: no padding). ``context_blocks``
    (B*nb,): every row's block table padded to ``nb`` blocks (None: attend to the fresh K/V
    only). ``mask`` (B, 1, T, Tk) additive, 0 where a query may attend and -inf elsewhere
    (None: plain causal).
    """

    slot_blocks: torch.Tensor | None
    slot_offsets: torch.Tensor | None
    token_index: torch.Tensor | None
    context_blocks: torch.Tensor | None
    mask: torch.Tensor | None
    scale: float


def write_kv(kv_layer: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata) -> None:
    """Store the new tokens' k/v (B, T, 2, kvh, hd) into ``kv_layer`` (NB, 2, bs, kvh, hd)."""
    if meta.slot_blocks is None:
        return
    kv = kv.flatten(0, 1)  # (B*T, 2, kvh, hd)
    if meta.token_index is not None:
        kv = kv[meta.token_index]  # (N, 2, kvh, hd)
    kv_layer[meta.slot_blocks, :, meta.slot_offsets] = kv  # one scatter for K and V


def gather_kv(kv_layer: torch.Tensor, meta: AttentionMetadata,
              batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's context K and V from the pool, each (B, kvh, nb*bs, hd)."""
    assert meta.context_blocks is not None
    kvh, hd = kv_layer.shape[-2:]
    k = kv_layer[:, 0].index_select(0, meta.context_blocks)  # (B*nb, bs, kvh, hd)
    v = kv_layer[:, 1].index_select(0, meta.context_blocks)
    return (k.view(batch, -1, kvh, hd).transpose(1, 2),
            v.view(batch, -1, kvh, hd).transpose(1, 2))


def paged_attention(q: torch.Tensor, kv: torch.Tensor, kv_layer: torch.Tensor | None,
                    meta: AttentionMetadata) -> torch.Tensor:
    """q (B, T, H, hd), new k/v (B, T, 2, kvh, hd) -> attention output (B, T, H*hd)."""
    batch, t, heads, hd = q.shape
    if kv_layer is not None:
        write_kv(kv_layer, kv, meta)
    if meta.context_blocks is None or kv_layer is None:
        keys, values = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, kvh, T, hd) each
    else:
        keys, values = gather_kv(kv_layer, meta, batch)  # (B, kvh, Tk, hd)
    kvh = keys.shape[1]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys, values, attn_mask=meta.mask, is_causal=meta.mask is None,
        scale=meta.scale, enable_gqa=kvh != heads)  # (B, H, T, hd)
    return out.transpose(1, 2).reshape(batch, t, heads * hd)
