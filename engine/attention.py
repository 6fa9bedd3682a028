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

from engine import cpu_attention


@dataclass(frozen=True)
class AttentionMetadata:
    """Where the new tokens' K/V go and what each query may attend to.

    ``slot_blocks``/``slot_offsets`` (N,): pool block and in-block offset of every real new
    token (None: write nothing, e.g. with the KV cache off). ``token_index`` (N,): those
    tokens' flat indices in the padded (B*T) batch (None: no padding). ``context_blocks``
    (B*nb,): every row's block table padded to ``nb`` blocks (None: attend to the fresh K/V
    only). ``mask`` (B, 1, T, Tk) additive, 0 where a query may attend and -inf elsewhere
    (None: plain causal). ``shared``: in a decode step (T = 1), groups of rows whose
    tables start with the same blocks (a shared prompt prefix, held once), as (row indices
    (n,), those blocks (S,)); then each row's ``context_blocks`` and ``mask`` cover only
    what follows its group's blocks (``shared_attention``). ``prefix``: one row (B = 1)
    whose new tokens follow a held prefix, as (the blocks holding it (nb,), its tokens);
    then there is no ``context_blocks`` or ``mask`` (``prefix_split_attention``).
    ``rows``: where kvrelay's CPU attention kernel runs here (``cpu_attention.usable``), a
    pass over held context: each row's block table through its new tokens (int64), the
    position of its first new token and how many it has; the kernel reads each row's
    context and new tokens in place (``cpu_attention.attend``), and there is no
    ``context_blocks`` or ``mask``. ``steps``: a pass of one new token per row (a decode
    step) where that kernel runs: every row's block table and the groups of rows sharing
    leading blocks; the kernel reads each row's keys in place, a group's shared keys once
    for all its rows (``cpu_attention.attend_steps``), and there is no ``context_blocks``
    or ``mask``.
    """

    slot_blocks: torch.Tensor | None
    slot_offsets: torch.Tensor | None
    token_index: torch.Tensor | None
    context_blocks: torch.Tensor | None
    mask: torch.Tensor | None
    scale: float
    shared: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()
    prefix: tuple[torch.Tensor, int] | None = None
    rows: tuple[tuple[torch.Tensor, int, int], ...] = ()
    steps: cpu_attention.StepLayout | None = None


@dataclass(frozen=True)
class MixedMetadata:
    """Groups of rows run in one pass (``ModelRunner.prefill_and_decode``): each group as
    (its metadata, rows, tokens per row), their tokens packed one group after the other
    along the token axis of a (1, N) batch. Projections see one batch of N tokens; each
    group attends on its own, as it would in a pass of its own."""

    parts: tuple[tuple[AttentionMetadata, int, int], ...]


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
                    meta: AttentionMetadata | MixedMetadata) -> torch.Tensor:
    """q (B, T, H, hd), new k/v (B, T, 2, kvh, hd) -> attention output (B, T, H*hd)."""
    if isinstance(meta, MixedMetadata):
        return _mixed_attention(q, kv, kv_layer, meta)
    batch, t, heads, hd = q.shape
    if kv_layer is not None:
        write_kv(kv_layer, kv, meta)
    if meta.steps is not None and kv_layer is not None:
        return cpu_attention.attend_steps(q, kv_layer, meta.steps, meta.scale)
    if meta.shared and kv_layer is not None:
        return shared_attention(q, kv_layer, meta).reshape(batch, t, heads * hd)
    if meta.rows and kv_layer is not None:
        if batch == 1:
            return cpu_attention.attend(q, kv_layer, meta.rows[0][0], meta.rows[0][1], meta.scale)
        out = q.new_zeros(batch, t, heads * hd)  # padding past a row's tokens stays zero
        for b, (table, start, n) in enumerate(meta.rows):
            out[b, :n] = cpu_attention.attend(q[b:b + 1, :n], kv_layer, table, start, meta.scale)[0]
        return out
    if meta.prefix is not None and kv_layer is not None:
        return prefix_split_attention(q, kv, kv_layer, meta.prefix, meta.scale)
    if meta.context_blocks is None or kv_layer is None:
        keys, values = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, kvh, T, hd) each
    else:
        keys, values = gather_kv(kv_layer, meta, batch)  # (B, kvh, Tk, hd)
    kvh = keys.shape[1]
    if meta.mask is not None and kvh != heads:
        out = _grouped_attention(q, keys, values, meta.mask, meta.scale)
    else:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=meta.mask, is_causal=meta.mask is None,
            scale=meta.scale, enable_gqa=kvh != heads)  # (B, H, T, hd)
    return out.transpose(1, 2).reshape(batch, t, heads * hd)


def _mixed_attention(q: torch.Tensor, kv: torch.Tensor, kv_layer: torch.Tensor | None,
                     meta: MixedMetadata) -> torch.Tensor:
    """Each group of a packed (1, N) batch attends on its own: q (1, N, H, hd), kv
    (1, N, 2, kvh, hd) -> (1, N, H*hd)."""
    outs, start = [], 0
    for part, rows, t in meta.parts:
        end = start + rows * t
        out = paged_attention(q[0, start:end].unflatten(0, (rows, t)),
                              kv[0, start:end].unflatten(0, (rows, t)), kv_layer, part)
        outs.append(out.flatten(0, 1))  # (rows*t, H*hd)
        start = end
    return torch.cat(outs)[None]


def _grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Grouped-query attention as plain attention with one head per KV head: the ``g``
    query heads that share a KV head (heads ``j*g .. j*g+g-1`` use KV head ``j``) are
    stacked along the query axis, so each product runs over ``g*T`` query rows instead of
    ``T`` (CPU SDPA: 1.3x faster for a 64-token tail over 2048 tokens, 1.5x for batch-16
    decode over 560). The mask is the same for the ``g`` heads. q (B, T, H, hd), keys and
    values (B, kvh, Tk, hd), mask (B, 1, T, Tk) -> (B, H, T, hd)."""
    batch, t, heads, hd = q.shape
    kvh, tk = keys.shape[1], keys.shape[2]
    g = heads // kvh
    stacked = q.transpose(1, 2).reshape(batch, kvh, g * t, hd)  # (B, kvh, g*T, hd)
    mask = mask.expand(batch, 1, t, tk).unsqueeze(2).expand(batch, 1, g, t, tk)
    out = F.scaled_dot_product_attention(stacked, keys, values,
                                         attn_mask=mask.reshape(batch, 1, g * t, tk), scale=scale)
    return out.view(batch, heads, t, hd)


_flash_with_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def shared_attention(q: torch.Tensor, kv_layer: torch.Tensor,
                     meta: AttentionMetadata) -> torch.Tensor:
    """One decode step in which groups of rows share the first blocks of their context.

    Attention splits over the keys: the queries of a group against its shared blocks in
    one product (their K/V gathered once, not once per row: 16 rows over a 512-token
    system prompt gathered 30 x 14 MB per step), then every row against its own remaining
    blocks, and the two partial results are merged with their log-sum-exps (exactly
    softmax over all keys, to float rounding). Rows in no group have only their own part.
    CPU only (the flash kernel that also returns log-sum-exps). q (B, 1, H, hd) -> (B, H, hd).
    """
    assert meta.context_blocks is not None and meta.mask is not None
    batch, _, heads, hd = q.shape
    kvh = kv_layer.shape[-2]
    g = heads // kvh
    rows = q.reshape(batch, kvh, g, hd)  # (B, kvh, g, hd): query heads grouped by KV head
    keys, values = gather_kv(kv_layer, meta, batch)  # (B, kvh, Tk, hd): each row's own part
    mask = meta.mask.expand(batch, 1, g, keys.shape[2])
    out_own, lse_own = _flash_with_lse(rows, keys, values, 0.0, False, attn_mask=mask,
                                       scale=meta.scale)  # (B, kvh, g, hd), (B, kvh, g)
    out_shared = torch.zeros_like(out_own)
    lse_shared = torch.full_like(lse_own, float("-inf"))
    for members, blocks in meta.shared:
        n = members.shape[0]
        k, v = _blocks_kv(kv_layer, blocks)
        stacked = rows.index_select(0, members).permute(1, 2, 0, 3).reshape(1, kvh, g * n, hd)
        out, lse = _flash_with_lse(stacked, k, v, 0.0, False, scale=meta.scale)
        out_shared.index_copy_(0, members, out.view(kvh, g, n, hd).permute(2, 0, 1, 3))
        lse_shared.index_copy_(0, members, lse.view(kvh, g, n).permute(2, 0, 1))
    return _merge(out_shared, lse_shared, out_own, lse_own).view(batch, heads, hd)


def prefix_split_attention(q: torch.Tensor, kv: torch.Tensor, kv_layer: torch.Tensor,
                           prefix: tuple[torch.Tensor, int], scale: float) -> torch.Tensor:
    """One sequence's new tokens over the prefix it holds, without a mask.

    Every new token sees the whole held prefix, so that part is plain attention; among
    themselves the new tokens are causal, which the fused kernel does without a mask too.
    The two partial results are merged with their log-sum-exps (exactly softmax over all
    keys, to float rounding), as in ``shared_attention``. Against one masked product over
    prefix and new tokens together, on a 2-core CPU per layer: 64 new tokens over 1984
    held ones 2.7 ms instead of 3.1 ms, 512 over 1536 18 ms instead of 21 ms (the prefill
    worker's last chunk of a 2048-token prompt); and no (T, Tk) mask is built or read.
    CPU only (the flash kernel that also returns log-sum-exps). q (1, T, H, hd), the new
    k/v (1, T, 2, kvh, hd) -> (1, T, H*hd).
    """
    blocks, held = prefix
    _, t, heads, hd = q.shape
    kvh = kv.shape[3]
    g = heads // kvh
    k_old, v_old = _blocks_kv(kv_layer, blocks, held)
    # the query heads that share a KV head stacked along the query axis: (1, kvh, g*T, hd)
    stacked = q.transpose(1, 2).reshape(1, kvh, g * t, hd)
    out_old, lse_old = _flash_with_lse(stacked, k_old, v_old, 0.0, False, scale=scale)
    k_new, v_new = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (1, kvh, T, hd) each
    out_new, lse_new = _flash_with_lse(q.transpose(1, 2), k_new, v_new, 0.0, True,
                                       scale=scale)  # (1, H, T, hd), (1, H, T)
    out_new, lse_new = out_new.reshape(1, kvh, g * t, hd), lse_new.reshape(1, kvh, g * t)
    merged = _merge(out_old, lse_old, out_new, lse_new)  # (1, kvh, g*T, hd): heads in order
    return merged.view(1, heads, t, hd).transpose(1, 2).reshape(1, t, heads * hd)


def _blocks_kv(kv_layer: torch.Tensor, blocks: torch.Tensor, tokens: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V of ``blocks`` in order (the first ``tokens`` of them), each
    (1, kvh, tokens, hd)."""
    kvh, hd = kv_layer.shape[-2:]
    k = kv_layer[:, 0].index_select(0, blocks).view(1, -1, kvh, hd)[:, :tokens]
    v = kv_layer[:, 1].index_select(0, blocks).view(1, -1, kvh, hd)[:, :tokens]
    return k.transpose(1, 2), v.transpose(1, 2)


def _merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
           lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over two disjoint sets of keys, merged by their log-sum-exps: exactly
    softmax over all of them, to float rounding. out (..., hd), lse (...)."""
    top = torch.maximum(lse_a, lse_b)
    w_a, w_b = (lse_a - top).exp_(), (lse_b - top).exp_()
    return (out_a * w_a[..., None] + out_b * w_b[..., None]) / (w_a + w_b)[..., None]
