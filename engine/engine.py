"""LLMEngine: the continuous-batching core, with no I/O.

Every ``step()`` admits waiting sequences into one batched prefill, runs one batched
decode step for every running sequence, samples, checks stop conditions and returns one
``StepOutput`` per sequence that produced a token. Sequences join and leave between steps;
a finished or aborted sequence frees its KV blocks at once. When the pool runs dry in
the middle of decoding, the youngest running sequence is preempted (its blocks freed,
recomputed when it is admitted again).

While sequences are running, a step computes at most ``prefill_chunk_tokens`` prompt
tokens besides their next tokens (chunked prefill): a prompt with more left than the step
has room for computes its next whole blocks that fit and waits, first in line, for the
rest in the next step, and only its last chunk samples a token. A step that admits new
prompts is then never much longer than one of that many tokens, so running streams do
not stall for a long prompt; with nothing running, prompts go in whole, as fast as
possible.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.kv import OutOfBlocks
from engine.runner import ModelRunner, leading
from engine.sampling import InvalidRequest, InvalidSamplingParams, SamplingParams, sample
from engine.sequence import Sequence, SequenceStatus, StopChecker
from engine.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(frozen=True)
class StepOutput:
    """One new token of one sequence (``text``: the text it releases, possibly empty)."""

    seq_id: str
    token_id: int
    logprob: float | None
    text: str
    finished: bool
    finish_reason: str | None


@dataclass(frozen=True)
class Completion:
    """A finished sequence's generated ids, text and finish reason ("stop" or "length")."""

    token_ids: list[int]
    text: str
    finish_reason: str | None


class LLMEngine:
    """Continuous batching over a ``ModelRunner``; ``tokenizer`` enables text and stop strings."""

    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer | None = None, *,
                 max_batch_size: int = 64, max_prefill_tokens: int = 4096,
                 prefill_chunk_tokens: int = 0) -> None:
        if prefill_chunk_tokens < 0:
            raise ValueError("prefill_chunk_tokens must be >= 0 (0: prompts go in whole)")
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        """Most prompt tokens a step computes while sequences are running (module
        docstring); 0: no such limit, prompts always go in whole."""
        self.eos_token_ids = frozenset(runner.config.eos_token_ids) | (
            tokenizer.eos_token_ids if tokenizer is not None else frozenset())
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._stops: dict[str, StopChecker] = {}
        self._ids = itertools.count()
        self.on_prefill: Callable[[list[Sequence]], None] | None = None
        """Called with the sequences of every prefill pass once their prompt K/V is in the
        pool, before sampling (a sequence that finishes on its first token frees it); a
        prompt computed in chunks comes once per chunk, ``num_computed`` short of its end
        until the last."""

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue ``seq`` (it may already hold imported KV); raises InvalidRequest."""
        self._validate(seq)
        detok = None if self.tokenizer is None else IncrementalDetokenizer(self.tokenizer)
        self._stops[seq.seq_id] = StopChecker(seq.params, self.eos_token_ids, detok)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, seq_id: str) -> bool:
        """Drop a sequence and free its KV now; False if it is not here."""
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.seq_id == seq_id:
                    queue.remove(seq)
                    self._release(seq, "abort")
                    return True
        return False

    def step(self) -> list[StepOutput]:
        """One scheduler iteration: batched prefill of admitted sequences and one decode step
        of the running ones, in one forward pass when there are both."""
        decode = self._reserve_decode()
        prefill, chunked = self._admit()
        chunk = [leading(seq, end) for seq, end in chunked]
        prefill_logits, decode_logits = self.runner.prefill_and_decode([*prefill, *chunk], decode)
        outputs: list[StepOutput] = []
        for (seq, _), view in zip(chunked, chunk):
            seq.num_computed = view.num_computed  # its next blocks; no token yet
        if prefill or chunk:
            if self.on_prefill is not None:
                self.on_prefill([*prefill, *(seq for seq, _ in chunked)])
            outputs += self._emit(prefill, prefill_logits[:len(prefill)])
        if decode:
            outputs += self._emit(decode, decode_logits)
        return outputs

    def generate(self, prompts: list[str] | list[list[int]],
                 params: SamplingParams | None = None) -> list[Completion]:
        """Run ``prompts`` (texts, or token id lists) to completion; results in prompt order."""
        params = params or SamplingParams()
        seqs = [Sequence(f"gen-{next(self._ids)}", self._encode(p), params) for p in prompts]
        texts = {s.seq_id: "" for s in seqs}
        for seq in seqs:
            self._validate(seq)  # all or none: a bad prompt leaves nothing queued
        for seq in seqs:
            self.add(seq)
        while any(s.status is not SequenceStatus.FINISHED for s in seqs):
            for out in self.step():
                texts[out.seq_id] = texts.get(out.seq_id, "") + out.text
        return [Completion(s.output_ids, texts[s.seq_id], s.finish_reason) for s in seqs]

    # -- scheduling --------------------------------------------------------------------

    def _reserve_decode(self) -> list[Sequence]:
        """Running sequences with a block for their next token, oldest first (may preempt)."""
        batch: list[Sequence] = []
        for seq in list(self.running):
            while seq.status is SequenceStatus.RUNNING:
                try:
                    self.runner.reserve(seq, len(seq.token_ids))
                    batch.append(seq)
                    break
                except OutOfBlocks:
                    self._preempt(self.running[-1])
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.runner.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _admit(self) -> tuple[list[Sequence], list[tuple[Sequence, int]]]:
        """Waiting sequences, first come first served, that fit the batch, token and block
        budgets; and, while sequences run, the first one that does not fit the step's room
        whole with the end of its next chunk (it stays first in line; at most one)."""
        batch: list[Sequence] = []
        tokens = 0
        chunked = bool(self.running and self.prefill_chunk_tokens and self.runner.use_cache)
        budget = min(self.max_prefill_tokens, self.prefill_chunk_tokens) if chunked \
            else self.max_prefill_tokens
        while self.waiting and len(self.running) + len(batch) < self.max_batch_size:
            seq = self.waiting[0]
            new_tokens = len(seq.token_ids) - seq.num_computed
            if tokens + new_tokens > budget and (batch or chunked):
                return batch, self._chunk(seq, budget - tokens) if chunked else []
            if self.runner.blocks_needed(seq, len(seq.token_ids)) > self.runner.allocator.num_free:
                break
            self.runner.reserve(seq, len(seq.token_ids))
            batch.append(self.waiting.popleft())
            tokens += new_tokens
        if not batch and not self.running and self.waiting and self._reclaim():
            return self._admit()  # the pool's room was held by sequences further back
        return batch, []

    def _reclaim(self) -> bool:
        """Free the blocks of the youngest waiting sequence behind the first that holds any
        (a chunk computed so far, or imported K/V): with nothing running, they are all that
        can make room for the first. It is computed again when its turn comes."""
        for seq in reversed(list(self.waiting)[1:]):
            if seq.block_table:
                self.runner.free(seq)
                return True
        return False

    def _chunk(self, seq: Sequence, room: int) -> list[tuple[Sequence, int]]:
        """``[(seq, end)]``: the next whole blocks of ``seq``'s prompt that fit ``room``
        tokens, reserved (none when not one block does, or the pool lacks them)."""
        bs = self.runner.block_size
        end = (seq.num_computed + room) // bs * bs
        if end <= seq.num_computed or self.runner.blocks_needed(seq, end) > self.runner.allocator.num_free:
            return []
        self.runner.reserve(seq, end)
        return [(seq, end)]

    def _emit(self, seqs: list[Sequence], logits: torch.Tensor) -> list[StepOutput]:
        result = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        outputs = []
        for i, seq in enumerate(seqs):
            token = result.token_ids[i]
            seq.token_ids.append(token)
            at_end = len(seq.token_ids) >= self.runner.config.max_position_embeddings
            text, reason = self._stops[seq.seq_id].push(token, seq.num_generated, at_end)
            if reason is not None:
                if seq in self.running:
                    self.running.remove(seq)
                self._release(seq, reason)
            elif seq.status is not SequenceStatus.RUNNING:
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
            logprob = result.logprobs[i] if result.logprobs and seq.params.logprobs else None
            outputs.append(StepOutput(seq.seq_id, token, logprob, text, reason is not None, reason))
        return outputs

    def _release(self, seq: Sequence, reason: str) -> None:
        self.runner.free(seq)
        self._stops.pop(seq.seq_id, None)
        seq.finish(reason)

    # -- input checks ------------------------------------------------------------------

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest("prompt", "text prompts need a tokenizer")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def _validate(self, seq: Sequence) -> None:
        config = self.runner.config
        seq.params.validate(config.vocab_size)
        if seq.params.stop and self.tokenizer is None:
            raise InvalidSamplingParams("stop", "stop strings need a tokenizer")
        prompt = seq.token_ids
        if not prompt:
            raise InvalidRequest("prompt", "is empty")
        if min(prompt) < 0 or max(prompt) >= config.vocab_size:
            raise InvalidRequest("prompt", f"token ids must be in [0, {config.vocab_size})")
        if len(prompt) >= config.max_position_embeddings:
            raise InvalidRequest("prompt", f"{len(prompt)} tokens do not fit the context window "
                                 f"of {config.max_position_embeddings}")
        total = min(len(prompt) + seq.params.max_new_tokens, config.max_position_embeddings)
        runner = self.runner
        if runner.use_cache and -(-total // runner.block_size) > runner.allocator.num_blocks:
            raise InvalidRequest("max_new_tokens", "prompt plus max_new_tokens exceeds the KV pool")
        if any(s.seq_id == seq.seq_id for s in (*self.waiting, *self.running)):
            raise ValueError(f"sequence id {seq.seq_id!r} is already in the engine")
