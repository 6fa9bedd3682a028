"""Chunked prefill in the decode worker: a long prompt computed locally while another
request streams goes in a chunk per step (``--prefill-chunk-tokens``), gives the reference
tokens, leaves the stream's tokens exact, and publishes every full block it computed, chunk
by chunk, so that the next request with that prompt fetches all of them from the store."""

from __future__ import annotations

import threading
from pathlib import Path

from protos.kvrelay.v1 import generation_pb2 as pb
from protos.kvrelay.v1 import generation_pb2_grpc as pb_grpc
from tests.services.conftest import BLOCK_SIZE, Reference, start_worker
from tests.support.redis_server import RedisServer

STREAM = "A long answer streams while other prompts arrive. "
LONG = ("The depot logs every parcel: its weight, its sender, the van it leaves in and the "
        "hour it is handed over. ") * 4


def _request(prompt: str, salt: str, tokens: int, ignore_eos: bool = False) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, cache_salt=salt, sampling=pb.SamplingParams(
        max_new_tokens=tokens, ignore_eos=ignore_eos))


def test_a_long_prompt_beside_a_stream_is_chunked_exact_and_published_whole(
        store: RedisServer, tiny_model_dir: Path, tmp_path: Path, reference: Reference) -> None:
    decode = start_worker("decode", tiny_model_dir, store.url(), tmp_path,
                          extra=("--prefill-chunk-tokens", str(2 * BLOCK_SIZE),
                                 "--local-prefix-cache", "false"))
    try:
        streamed: list[int] = []
        started = threading.Event()
        done = threading.Event()

        def stream() -> None:
            with decode.channel() as channel:
                for msg in pb_grpc.GenerationStub(channel).GenerateStream(
                        _request(STREAM, "stream", 400, ignore_eos=True), timeout=120):
                    streamed.extend(msg.token_ids)
                    started.set()
            done.set()

        streamer = threading.Thread(target=stream)
        streamer.start()
        assert started.wait(60)
        with decode.channel() as channel:
            stub = pb_grpc.GenerationStub(channel)
            first = stub.Generate(_request(LONG, "depot", 8), timeout=60)
            assert not done.is_set()  # it was computed while the stream ran: in chunks
            again = stub.Generate(_request(LONG, "depot", 8), timeout=60)
        streamer.join(120)
        ids = reference.tokenizer.encode(LONG)
        assert len(ids) > 4 * BLOCK_SIZE  # more than two chunks
        assert list(first.token_ids) == list(again.token_ids) == reference.greedy(ids, 8)
        assert first.usage.cached_prompt_tokens == 0
        # every full block computed chunk by chunk reached the store (the pool keeps none)
        assert again.usage.cached_prompt_tokens == len(ids) // BLOCK_SIZE * BLOCK_SIZE
        stream_ids = reference.tokenizer.encode(STREAM)
        assert streamed == reference.greedy(stream_ids, 400, ignore_eos=True)
    finally:
        decode.stop()
