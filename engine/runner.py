"""ModelRunner: owns the KV pool and runs batched prefill and decode forward passes.

Sequences bring their token ids and block tables (``engine.sequence.Sequence``); the
runner allocates blocks as they grow, builds one ``AttentionMetadata`` per pass and
returns the last position's logits of every sequence. With ``use_cache=False`` no KV is
kept: every pass recomputes each sequence from its first token (the fidelity reference).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from engine import cpu_attention, matmul
from engine.attention import AttentionMetadata, MixedMetadata
from engine.config import ModelConfig
from engine.kv import BlockAllocator, KVPool
from engine.model import LlamaForCausalLM
from engine.rope import RotaryTable

MIN_SHARED_BLOCKS = 4
"""A decode batch attends to a common prefix once for all rows from this many blocks on
(64 tokens at 16 per block); below it the split and merge cost more than they save."""


SPLIT_PREFIX_TOKENS = 32
"""A CPU pass of one sequence's new tokens on top of a held prefix attends to the two
apart from this many new tokens on (``attention.prefix_split_attention``); below it the
masked product over the whole context is as fast."""


class RunnerSequence(Protocol):
    """What the runner reads and advances on a sequence (``engine.sequence.Sequence``)."""

    token_ids: list[int]
    num_computed: int
    block_table: list[int]


@dataclass
class LeadingTokens:
    """A sequence's first tokens as a sequence of their own (``leading``): it shares the
    sequence's block table, so a pass over it computes the sequence's blocks up to that
    point; the caller copies ``num_computed`` back afterwards."""

    token_ids: list[int]
    num_computed: int
    block_table: list[int]


def leading(seq: RunnerSequence, end: int) -> LeadingTokens:
    """``seq`` cut after its first ``end`` tokens, for a pass that computes only those."""
    return LeadingTokens(seq.token_ids[:end], seq.num_computed, seq.block_table)


@dataclass(frozen=True)
class _Pass:
    """One group of rows ready to run: ids and positions (B, T), real lengths, metadata."""

    ids: torch.Tensor
    positions: torch.Tensor
    lens: list[int]
    meta: AttentionMetadata


class ModelRunner:
    """Batched forward passes over paged KV memory of ``num_blocks`` x ``block_size`` tokens.

    ``loaded`` is anything with ``config`` and ``model`` attributes (``engine.loader.LoadedModel``)
    or a ``(config, model)`` pair. The model is fused in place and run under inference mode.
    On a CPU, ``tune_matmuls`` measures once per process and weight shape which matmul form
    is fastest for each row count (``engine.matmul``; a few seconds for SmolLM2-135M), and
    with ``keep_matmul_plan`` keeps the plan on disk for the next start to read
    (``matmul.tune_cached``); then ``matmul.prepare`` packs the weights the plan multiplies
    through oneDNN (a second copy of each: for SmolLM2-135M up to ~0.5 GB).
    """

    def __init__(self, loaded: Any, *, num_blocks: int, block_size: int,
                 use_cache: bool = True, tune_matmuls: bool = True,
                 keep_matmul_plan: bool = True) -> None:
        config, model = loaded if isinstance(loaded, tuple) else (loaded.config, loaded.model)
        self.config: ModelConfig = config
        self.model: LlamaForCausalLM = model.eval()
        self.model.fuse_()
        if tune_matmuls:
            groups = self.model.projection_groups() + [[self.model.head_weight]]
            matmul.tune_cached([(groups[:-1], matmul.TUNED_ROWS), (groups[-1:], matmul.DECODE_ROWS)],
                               matmul.default_plan_dir() if keep_matmul_plan else None)
            matmul.prepare(w for group in groups for w in group)
        weight = model.model.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.block_size = block_size
        self.use_cache = use_cache
        self.allocator = BlockAllocator(num_blocks)
        self.kv = KVPool(num_blocks, config.num_layers, block_size, config.num_kv_heads,
                         config.head_dim, dtype=self.dtype, device=self.device) if use_cache else None
        if self.use_cache:  # build the attention kernel now, not in the first request
            cpu_attention.usable(self.dtype, config.head_dim, self.device)
        self.rope = RotaryTable(config, self.device)
        self.scale = config.head_dim ** -0.5
        self.between_layers: Callable[[], None] | None = None
        """Called between the decoder layers of every forward pass (None: nothing). A worker
        that shares its cores with another hands them over there in the middle of a long
        pass (``kvrelay.serving.gate.ComputeGate.pause_point``)."""

    # -- block bookkeeping -------------------------------------------------------------

    def blocks_needed(self, seq: RunnerSequence, num_tokens: int) -> int:
        """Blocks ``seq`` still lacks to hold ``num_tokens`` tokens (0 with the cache off)."""
        if not self.use_cache:
            return 0
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def reserve(self, seq: RunnerSequence, num_tokens: int) -> None:
        """Grow ``seq``'s block table to hold ``num_tokens`` tokens; raises OutOfBlocks."""
        seq.block_table.extend(self.allocator.allocate(self.blocks_needed(seq, num_tokens)))

    def free(self, seq: RunnerSequence) -> None:
        """Release ``seq``'s blocks at once; it keeps its tokens and may be prefilled again."""
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0

    def import_blocks(self, seq: RunnerSequence, payloads: Seq[object]) -> None:
        """Append full blocks of K/V (bytes-like or tensors) after ``seq``'s computed prefix."""
        pool = self._pool()
        bs = self.block_size
        if seq.num_computed % bs or len(seq.block_table) != seq.num_computed // bs:
            raise ValueError("blocks can only be imported at a block boundary of the computed prefix")
        if seq.num_computed + len(payloads) * bs > len(seq.token_ids):
            raise ValueError("imported blocks would cover more tokens than the sequence has")
        blocks = self.allocator.allocate(len(payloads))
        try:
            for block, payload in zip(blocks, payloads):
                pool.import_block(block, payload)
        except Exception:
            self.allocator.free(blocks)
            raise
        seq.block_table.extend(blocks)
        seq.num_computed += len(blocks) * bs

    def adopt_blocks(self, seq: RunnerSequence, blocks: Seq[int]) -> None:
        """Append pool blocks already holding this prompt's next full blocks of K/V (written
        there by a fetch, ``KVPool.landing_bytes``); ``seq`` takes its own reference to
        each, so the caller still frees its own."""
        bs = self.block_size
        if seq.num_computed % bs or len(seq.block_table) != seq.num_computed // bs:
            raise ValueError("blocks can only be adopted at a block boundary of the computed prefix")
        if seq.num_computed + len(blocks) * bs > len(seq.token_ids):
            raise ValueError("adopted blocks would cover more tokens than the sequence has")
        self.allocator.incref(blocks)
        seq.block_table.extend(blocks)
        seq.num_computed += len(blocks) * bs

    def export_block(self, seq: RunnerSequence, i: int) -> torch.Tensor:
        """Block ``i`` of ``seq`` as a view (L, 2, bs, kvh, hd); it must be full and computed."""
        pool = self._pool()
        if not 0 <= i < seq.num_computed // self.block_size:
            raise IndexError(f"block {i} of this sequence is not full and computed")
        return pool.export_block(seq.block_table[i])

    def _pool(self) -> KVPool:
        if self.kv is None:
            raise RuntimeError("this runner keeps no KV cache (use_cache=False)")
        return self.kv

    # -- forward passes ----------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, seqs: Seq[RunnerSequence]) -> torch.Tensor:
        """Compute ``token_ids[num_computed:]`` of each sequence on top of its held prefix.

        At least the last token is always computed. Returns last-token logits (B, V) float32.
        """
        starts = [min(s.num_computed, len(s.token_ids) - 1) if self.use_cache else 0
                  for s in seqs]
        return self._run(seqs, starts)

    @torch.inference_mode()
    def decode(self, seqs: Seq[RunnerSequence]) -> torch.Tensor:
        """One step for sequences whose only uncomputed token is the last: logits (B, V)."""
        if self.use_cache and any(s.num_computed != len(s.token_ids) - 1 for s in seqs):
            raise ValueError("decode needs exactly one uncomputed token per sequence")
        starts = [len(s.token_ids) - 1 if self.use_cache else 0 for s in seqs]
        return self._run(seqs, starts)

    @torch.inference_mode()
    def prefill_and_decode(self, prefill: Seq[RunnerSequence], decode: Seq[RunnerSequence]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """``prefill(prefill)`` and ``decode(decode)`` in one forward pass: (logits, logits).

        The two groups' tokens are packed one after the other (no padding of the decode rows
        to the prompts' width), so every projection reads the weights once for both, and
        each group attends as it would alone (``attention.MixedMetadata``). A decode step
        that waits for a separate prefill pass of new requests pays a second pass over the
        weights; here the new requests' tokens ride along with it. With the cache off, or
        either group empty, the two run as separate passes.
        """
        if not (prefill and decode and self.use_cache):
            return self.prefill(prefill) if prefill else self._no_logits(), \
                self.decode(decode) if decode else self._no_logits()
        if any(s.num_computed != len(s.token_ids) - 1 for s in decode):
            raise ValueError("decode needs exactly one uncomputed token per sequence")
        groups = [self._prepare(prefill, [min(s.num_computed, len(s.token_ids) - 1)
                                          for s in prefill]),
                  self._prepare(decode, [len(s.token_ids) - 1 for s in decode])]
        ids = torch.cat([g.ids.flatten() for g in groups])[None]  # (1, N)
        cos, sin = zip(*(self.rope.lookup(g.positions, self.dtype) for g in groups))
        rope = (torch.cat([c.flatten(0, 1) for c in cos])[None],
                torch.cat([s.flatten(0, 1) for s in sin])[None])  # (1, N, 1, hd) each
        meta = MixedMetadata(tuple((g.meta, g.ids.shape[0], g.ids.shape[1]) for g in groups))
        hidden = self.model(ids, rope, self._pool().tensor, meta, self.between_layers)[0]  # (N, D)
        last, offset = [], 0
        for g in groups:
            last += [offset + row * g.ids.shape[1] + n - 1 for row, n in enumerate(g.lens)]
            offset += g.ids.numel()
        logits = self.model.logits(hidden[torch.tensor(last, device=self.device)])
        for seq in (*prefill, *decode):
            seq.num_computed = len(seq.token_ids)
        return logits[:len(prefill)], logits[len(prefill):]

    def _no_logits(self) -> torch.Tensor:
        return torch.empty(0, self.config.vocab_size, device=self.device)

    def _prepare(self, seqs: Seq[RunnerSequence], starts: list[int]) -> _Pass:
        """Blocks reserved, then the padded ids, positions and metadata of one group of rows."""
        for seq in seqs:
            self.reserve(seq, len(seq.token_ids))
        lens = [len(s.token_ids) - st for s, st in zip(seqs, starts)]
        width = max(lens)
        ids = torch.tensor([s.token_ids[st:] + [0] * (width - n)
                            for s, st, n in zip(seqs, starts, lens)], device=self.device)  # (B, T)
        starts_t = torch.tensor(starts, device=self.device)
        positions = starts_t[:, None] + torch.arange(width, device=self.device)  # (B, T)
        self.rope.ensure(max(starts) + width)
        return _Pass(ids, positions, lens, self._metadata(seqs, starts, lens, positions))

    def _run(self, seqs: Seq[RunnerSequence], starts: list[int]) -> torch.Tensor:
        p = self._prepare(seqs, starts)
        hidden = self.model(p.ids, self.rope.lookup(p.positions, self.dtype),
                            None if self.kv is None else self.kv.tensor, p.meta,
                            self.between_layers)  # (B, T, D)
        last = torch.tensor(p.lens, device=self.device) - 1
        logits = self.model.logits(hidden[torch.arange(len(seqs), device=self.device), last])
        for seq in seqs:
            seq.num_computed = len(seq.token_ids) if self.use_cache else 0
        return logits  # (B, V)

    def _metadata(self, seqs: Seq[RunnerSequence], starts: list[int], lens: list[int],
                  positions: torch.Tensor) -> AttentionMetadata:
        width = positions.shape[1]
        slot_blocks = slot_offsets = token_index = context = mask = None
        if self.use_cache:
            slot_blocks, slot_offsets = self._slots(seqs, starts, lens)
            if any(n != width for n in lens):
                token_index = torch.tensor([b * width + i for b, n in enumerate(lens)
                                            for i in range(n)], device=self.device)
            kernel = cpu_attention.usable(self.dtype, self.config.head_dim, self.device)
            if kernel and all(n == 1 for n in lens):  # a step: one new token per row
                groups = self._shared_groups(seqs, starts, lens)
                steps = cpu_attention.StepLayout.build(
                    [s.block_table for s in seqs], [st + 1 for st in starts], self.block_size,
                    groups)
                return AttentionMetadata(slot_blocks, slot_offsets, token_index, None, None,
                                         self.scale, steps=steps)
            if kernel and any(starts):  # new tokens over held context, read in place
                bs = self.block_size
                rows = tuple((torch.tensor(s.block_table[:-(-(st + n) // bs)]), st, n)
                             for s, st, n in zip(seqs, starts, lens))
                return AttentionMetadata(slot_blocks, slot_offsets, token_index, None, None,
                                         self.scale, rows=rows)
            shared, skips = self._shared_prefixes(seqs, starts, lens)
            if shared:
                context, mask = self._context(seqs, starts, lens, positions, skips)
                return AttentionMetadata(slot_blocks, slot_offsets, token_index, context, mask,
                                         self.scale, shared)
            if (len(seqs) == 1 and lens[0] >= SPLIT_PREFIX_TOKENS and starts[0] > 0
                    and self.device.type == "cpu"):
                held = seqs[0].block_table[:-(-starts[0] // self.block_size)]
                prefix = (torch.tensor(held, device=self.device), starts[0])
                return AttentionMetadata(slot_blocks, slot_offsets, token_index, None, None,
                                         self.scale, prefix=prefix)
            if any(starts):
                context, mask = self._context(seqs, starts, lens, positions)
        return AttentionMetadata(slot_blocks, slot_offsets, token_index, context, mask, self.scale)

    def _shared_prefixes(self, seqs: Seq[RunnerSequence], starts: list[int], lens: list[int]
                         ) -> tuple[tuple[tuple[torch.Tensor, torch.Tensor], ...], list[int]]:
        """``_shared_groups`` as (rows, blocks) tensors for ``attention.shared_attention``,
        and how many blocks of each row that covers."""
        skips = [0] * len(seqs)
        groups = []
        for members, common in self._shared_groups(seqs, starts, lens):
            for i in members:
                skips[i] = common
            groups.append((torch.tensor(members, device=self.device),
                           torch.tensor(seqs[members[0]].block_table[:common], device=self.device)))
        return tuple(groups), skips

    def _shared_groups(self, seqs: Seq[RunnerSequence], starts: list[int], lens: list[int]
                       ) -> list[tuple[list[int], int]]:
        """Groups of rows of a CPU decode step whose tables start with the same (at least
        ``MIN_SHARED_BLOCKS``) blocks, wholly before their new tokens: (rows, how many
        blocks they share)."""
        if len(seqs) < 2 or any(n != 1 for n in lens) or self.device.type != "cpu":
            return []
        by_first: dict[int, list[int]] = {}
        for i, seq in enumerate(seqs):
            if seq.block_table:
                by_first.setdefault(seq.block_table[0], []).append(i)
        groups = []
        for members in by_first.values():
            if len(members) < 2:
                continue
            limit = min(starts[i] for i in members) // self.block_size
            first = seqs[members[0]].block_table
            common = 0
            while common < limit and all(seqs[i].block_table[common] == first[common]
                                         for i in members[1:]):
                common += 1
            if common >= MIN_SHARED_BLOCKS:
                groups.append((members, common))
        return groups

    def _slots(self, seqs: Seq[RunnerSequence], starts: list[int],
               lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Block and offset of every new token, (N,) each."""
        bs = self.block_size
        blocks, offsets = [], []
        for seq, start, n in zip(seqs, starts, lens):
            table = seq.block_table
            blocks += [table[p // bs] for p in range(start, start + n)]
            offsets += [p % bs for p in range(start, start + n)]
        return (torch.tensor(blocks, device=self.device),
                torch.tensor(offsets, device=self.device))

    def _context(self, seqs: Seq[RunnerSequence], starts: list[int], lens: list[int],
                 positions: torch.Tensor, skips: list[int] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded block tables (B*nb,) and the causal mask over them (B, 1, T, nb*bs), each
        row's from its block ``skips[i]`` on (default 0)."""
        bs = self.block_size
        skips = skips or [0] * len(seqs)
        nb = max(-(-(st + n) // bs) - k for st, n, k in zip(starts, lens, skips))
        tables = [s.block_table[k:k + nb] + [0] * (nb - min(nb, len(s.block_table) - k))
                  for s, k in zip(seqs, skips)]
        context = torch.tensor(tables, device=self.device).flatten()  # (B*nb,)
        first_key = torch.tensor(skips, device=self.device)[:, None] * bs  # (B, 1)
        key_pos = first_key + torch.arange(nb * bs, device=self.device)  # (B, Tk)
        allowed = key_pos[:, None, :] <= positions[:, :, None]  # (B, T, Tk)
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        return context, mask.masked_fill_(~allowed, float("-inf")).unsqueeze(1)
