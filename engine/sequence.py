"""One request's state in the engine, and the stop conditions checked on its output.

``Sequence`` carries what the runner and scheduler need (token ids, how many of them
have K/V in the pool, the block table). ``StopChecker`` carries what deciding to stop
needs (the incremental detokenizer and the text not yet released).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from engine.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Detokenizer(Protocol):
    """Turns ids, one at a time, into final text deltas (engine.tokenizer.IncrementalDetokenizer)."""

    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


@dataclass(eq=False)
class Sequence:
    """A prompt and its continuation.

    ``num_computed`` leading tokens have their K/V in the pool, in the blocks listed by
    ``block_table``; a sequence may arrive with some already imported. ``prompt_len`` is the
    prompt's length; every token after it was generated.
    """

    seq_id: str
    token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    prompt_len: int = field(init=False)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = field(init=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)
        self.prompt_len = len(self.token_ids)
        self.generator = self.params.make_generator()

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    def finish(self, reason: str) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason


class StopChecker:
    """Decides when a sequence stops and which text may be released.

    Text that could be the start of a stop string is held back until it is known not to be;
    when a stop string appears, the text is cut just before it.
    """

    def __init__(self, params: SamplingParams, eos_token_ids: Iterable[int],
                 detokenizer: Detokenizer | None) -> None:
        self._params = params
        self._stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self._stop_ids |= set(eos_token_ids)
        self._detok = detokenizer
        self._pending = ""

    def push(self, token_id: int, num_generated: int, at_context_end: bool) -> tuple[str, str | None]:
        """Account for one generated token: (text to release, finish reason or None)."""
        if token_id in self._stop_ids:
            return self._release_all(), "stop"
        if self._detok is not None:
            self._pending += self._detok.push(token_id)
            text, stopped = self._scan()
            if stopped:
                return text, "stop"
        else:
            text = ""
        if num_generated >= self._params.max_new_tokens or at_context_end:
            return text + self._release_all(), "length"
        return text, None

    def _scan(self) -> tuple[str, bool]:
        """Cut at the first complete stop string, else release all but a possible prefix of one."""
        cuts = [i for i in (self._pending.find(s) for s in self._params.stop) if i >= 0]
        if cuts:
            text, self._pending = self._pending[:min(cuts)], ""
            return text, True
        keep = _longest_stop_prefix_suffix(self._pending, self._params.stop)
        cut = len(self._pending) - keep
        text, self._pending = self._pending[:cut], self._pending[cut:]
        return text, False

    def _release_all(self) -> str:
        tail = self._pending + (self._detok.flush() if self._detok is not None else "")
        self._pending = ""
        return tail


def _longest_stop_prefix_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best

