"""Decode fetches the blocks a prefill worker has published while its Prefill call still
runs: with a scripted prefill worker that publishes the prompt's real K/V step by step and
then replies, fails, or is cancelled, the request's tokens equal the monolithic engine's."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from cachestore.kvstore import PrefixCache
from cachestore.redis_store import RedisBlockStore
from engine.runner import ModelRunner
from engine.sequence import Sequence
from kvrelay.serving.kvblocks import export_blocks, prefill_full_blocks
from kvrelay.serving.runtime import block_spec
from protos.kvrelay.v1 import generation_pb2 as pb
from protos.kvrelay.v1 import generation_pb2_grpc as pb_grpc
from protos.kvrelay.v1 import prefill_pb2, prefill_pb2_grpc
from tests.services.conftest import BLOCK_SIZE, Reference, Worker, start_worker
from tests.support.redis_server import RedisServer

FULL_BLOCKS = 6
EARLY_BLOCKS = 4
GET_BYTES = 'kvrelay_store_bytes_total{op="get"}'
POLLS = 'kvrelay_store_call_seconds_count{op="poll"}'
PUBLISHED = "kvrelay_published_blocks_total"


@dataclass
class _Call:
    """One Prefill call as the script sees it."""

    hashes: list[bytes]
    payloads: list[np.ndarray]
    context: grpc.ServicerContext


Script = Callable[[_Call], prefill_pb2.PrefillResponse]


class _ScriptedPrefill(prefill_pb2_grpc.PrefillServicer):
    """A prefill worker whose every call runs ``script``: publish the prompt's real K/V
    (computed here in one pass) when and as far as the test says, then answer."""

    def __init__(self, reference: Reference, redis_url: str) -> None:
        self.runner = ModelRunner(reference.loaded, num_blocks=64, block_size=BLOCK_SIZE)
        self.cache = PrefixCache(RedisBlockStore.from_url(redis_url),
                                 block_spec(reference.loaded, self.runner))
        self.script: Script = self.publish_all
        self.lock = threading.Lock()

    def Prefill(self, request: prefill_pb2.PrefillRequest,
                context: grpc.ServicerContext) -> prefill_pb2.PrefillResponse:
        hashes = list(request.block_hashes)
        with self.lock:
            seq = Sequence("scripted", list(request.token_ids))
            prefill_full_blocks(self.runner, seq, len(hashes))
            payloads = export_blocks(self.runner, seq, 0, len(hashes))
            self.runner.free(seq)
        return self.script(_Call(hashes, payloads, context))

    def publish(self, call: _Call, first: int, last: int) -> None:
        self.cache.publish(call.hashes[first:last], call.payloads[first:last])

    def publish_all(self, call: _Call) -> prefill_pb2.PrefillResponse:
        self.publish(call, 0, len(call.hashes))
        return stored(len(call.hashes))


def stored(blocks: int) -> prefill_pb2.PrefillResponse:
    return prefill_pb2.PrefillResponse(stored_prompt_tokens=blocks * BLOCK_SIZE)


def _until(condition: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@dataclass
class _Setup:
    prefill: _ScriptedPrefill
    decode: Worker
    store: RedisServer
    value_nbytes: int

    def fetched_since(self, before: float) -> int:
        """Blocks decode has fetched since its GET byte counter read ``before``."""
        return int(self.decode.metric(GET_BYTES) - before) // self.value_nbytes


@pytest.fixture(scope="module")
def setup(store: RedisServer, tiny_model_dir: Path, reference: Reference,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Setup]:
    prefill = _ScriptedPrefill(reference, store.url())
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    prefill_pb2_grpc.add_PrefillServicer_to_server(prefill, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        decode = start_worker("decode", tiny_model_dir, store.url(),
                              tmp_path_factory.mktemp("overlap-logs"),
                              prefill_addr=f"127.0.0.1:{port}")
        try:
            yield _Setup(prefill, decode, store, prefill.cache.spec.value_nbytes)
        finally:
            decode.stop()
    finally:
        server.stop(grace=None)
        prefill.cache.store.close()


def _prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 700) for _ in range(FULL_BLOCKS * BLOCK_SIZE + 5)]


def _request(ids: list[int], salt: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), cache_salt=salt,
                              sampling=pb.SamplingParams(max_new_tokens=6))


def _generate(worker: Worker, ids: list[int], salt: str) -> pb.GenerateResponse:
    with worker.channel() as channel:
        return pb_grpc.GenerationStub(channel).Generate(_request(ids, salt), timeout=60.0)


def test_blocks_published_during_the_prefill_call_are_fetched_before_it_returns(
        setup: _Setup, reference: Reference) -> None:
    seen: dict[str, int] = {}

    def slow(call: _Call) -> prefill_pb2.PrefillResponse:
        before = setup.decode.metric(GET_BYTES)
        setup.prefill.publish(call, 0, EARLY_BLOCKS)
        _until(lambda: setup.fetched_since(before) >= EARLY_BLOCKS)
        seen["before_reply"] = setup.fetched_since(before)
        setup.prefill.publish(call, EARLY_BLOCKS, len(call.hashes))
        seen["start"] = int(before)
        return stored(len(call.hashes))

    setup.prefill.script = slow
    ids = _prompt(1)
    reply = _generate(setup.decode, ids, "overlap")
    assert seen["before_reply"] == EARLY_BLOCKS
    assert setup.fetched_since(seen["start"]) == FULL_BLOCKS  # each block fetched once
    assert reply.usage.cached_prompt_tokens == 0
    assert list(reply.token_ids) == reference.greedy(ids, 6)


def test_blocks_fetched_before_the_prefill_call_failed_are_used(
        setup: _Setup, reference: Reference) -> None:
    ids = _prompt(2)
    keys = reference.block_keys(ids, BLOCK_SIZE, "failed-call")
    fallbacks = 'kvrelay_local_prefill_fallbacks_total{reason="unavailable"}'

    def dies_midway(call: _Call) -> prefill_pb2.PrefillResponse:
        before = setup.decode.metric(GET_BYTES)
        setup.prefill.publish(call, 0, EARLY_BLOCKS)
        assert _until(lambda: setup.fetched_since(before) >= EARLY_BLOCKS)
        setup.store.client().delete(*keys)  # decode holds them now, or nowhere
        call.context.abort(grpc.StatusCode.UNAVAILABLE, "the prefill worker died")
        raise AssertionError("abort returns only by raising")

    setup.prefill.script = dies_midway
    failed_before = setup.decode.metric(fallbacks)
    published_before = setup.decode.metric(PUBLISHED)
    reply = _generate(setup.decode, ids, "failed-call")
    assert list(reply.token_ids) == reference.greedy(ids, 6)
    assert setup.decode.metric(fallbacks) == failed_before + 1
    # decode imported the 4 fetched blocks and computed (and published) only the other 2
    assert _until(lambda: setup.decode.metric(PUBLISHED) > published_before)
    time.sleep(0.3)
    assert setup.decode.metric(PUBLISHED) == published_before + FULL_BLOCKS - EARLY_BLOCKS


def test_a_request_cancelled_during_the_prefill_call_cancels_it_and_stops_polling(
        setup: _Setup, reference: Reference) -> None:
    fetched, cancelled = threading.Event(), threading.Event()

    def hangs(call: _Call) -> prefill_pb2.PrefillResponse:
        before = setup.decode.metric(GET_BYTES)
        setup.prefill.publish(call, 0, 2)
        if _until(lambda: setup.fetched_since(before) >= 2):
            fetched.set()
        if _until(lambda: not call.context.is_active()):
            cancelled.set()
        return stored(2)

    setup.prefill.script = hangs
    ids = _prompt(3)
    with setup.decode.channel() as channel:
        future = pb_grpc.GenerationStub(channel).Generate.future(_request(ids, "cancel"),
                                                                  timeout=60.0)
        assert fetched.wait(20)
        future.cancel()
    assert cancelled.wait(20)
    polls = setup.decode.metric(POLLS)
    time.sleep(1.0)
    assert setup.decode.metric(POLLS) == polls
    assert setup.decode.metric("kvrelay_kv_pool_used_blocks") == 0

    setup.prefill.script = setup.prefill.publish_all
    reply = _generate(setup.decode, ids, "cancel")
    assert reply.usage.cached_prompt_tokens == 2 * BLOCK_SIZE
    assert list(reply.token_ids) == reference.greedy(ids, 6)
