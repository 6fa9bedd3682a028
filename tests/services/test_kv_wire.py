"""Reduced KV wire formats on a float32 pool: bfloat16 blocks are stored at half the
bytes and come back as float32 -> bfloat16 -> float32; int8 blocks at a quarter (plus
their scales) and come back within half a quantization step; each under its own
fingerprint, and workers using them serve a prompt from the store."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from bench.kvwire import PROMPTS, measure
from cachestore.codec import HEADER_SIZE, decode_block
from cachestore.hashing import block_key, hash_block_chain
from cachestore.kvstore import PrefixCache
from cachestore.store import MemoryBlockStore
from engine.loader import LoadedModel, load_model
from engine.runner import ModelRunner
from engine.sequence import Sequence
from kvrelay.serving.kvblocks import block_views, collect_payloads, export_blocks
from kvrelay.serving.runtime import block_spec, set_wire_dtype
from protos.kvrelay.v1 import generation_pb2 as pb
from protos.kvrelay.v1 import generation_pb2_grpc as pb_grpc
from tests.services.conftest import BLOCK_SIZE, Reference, start_worker
from tests.support.redis_server import RedisServer


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir))


def _runner(loaded: LoadedModel, wire_dtype: str) -> tuple[ModelRunner, PrefixCache]:
    runner = ModelRunner(loaded, num_blocks=16, block_size=BLOCK_SIZE)
    spec = block_spec(loaded, runner, wire_dtype)
    set_wire_dtype(runner, spec)
    return runner, PrefixCache(MemoryBlockStore(), spec)


def _prefilled(runner: ModelRunner, n_blocks: int) -> Sequence:
    rng = random.Random(3)
    seq = Sequence("wire", [rng.randrange(3, 700) for _ in range(n_blocks * BLOCK_SIZE)])
    runner.reserve(seq, len(seq.token_ids))
    runner.prefill([seq])
    return seq


def _round_trip(loaded: LoadedModel, wire_dtype: str, n_blocks: int
                ) -> tuple[ModelRunner, Sequence, ModelRunner, Sequence]:
    """Publish ``n_blocks`` prefilled blocks in ``wire_dtype``, fetch them and import them
    into a fresh runner: (sender, its sequence, receiver, its sequence)."""
    runner, cache = _runner(loaded, wire_dtype)
    seq = _prefilled(runner, n_blocks)
    hashes = cache.block_hashes(seq.token_ids)
    assert cache.publish(hashes, block_views(runner, seq, 0, n_blocks)) == n_blocks

    payloads: list[bytes] = []
    assert cache.fetch_prefix(hashes, collect_payloads(payloads)) == n_blocks
    other, _ = _runner(loaded, wire_dtype)
    into = Sequence("into", list(seq.token_ids))
    other.import_blocks(into, payloads)
    return runner, seq, other, into


def test_a_bf16_wire_round_trip_equals_fp32_to_bf16_to_fp32(loaded: LoadedModel) -> None:
    runner, seq, other, into = _round_trip(loaded, "bfloat16", 3)
    for i in range(3):
        sent = runner.export_block(seq, i)  # (L, 2, bs, kvh, hd) float32
        got = other.export_block(into, i)
        assert got.dtype == torch.float32
        assert torch.equal(got, sent.to(torch.bfloat16).to(torch.float32))
        assert not torch.equal(got, sent)  # the wire did round


def test_bf16_blocks_are_half_the_bytes_under_their_own_fingerprint(loaded: LoadedModel) -> None:
    native_runner, native = _runner(loaded, "native")
    runner, wire = _runner(loaded, "bfloat16")
    assert wire.spec.kv_dtype == "bfloat16" and native.spec.kv_dtype == "float32"
    assert wire.spec.fingerprint != native.spec.fingerprint
    assert wire.spec.payload_nbytes * 2 == native.spec.payload_nbytes
    seq = _prefilled(runner, 2)
    exported = export_blocks(runner, seq, 0, 2)
    assert [a.nbytes for a in exported] == [wire.spec.payload_nbytes] * 2
    hashes = wire.block_hashes(seq.token_ids)
    wire.publish(hashes, exported)
    value = wire.store.get_many(wire.keys(hashes[:1]))[0]
    assert value is not None and len(value) == HEADER_SIZE + native.spec.payload_nbytes // 2
    assert bytes(decode_block(value, wire.spec, hashes[0])) == exported[0].tobytes()
    assert native_runner.kv is not None and native_runner.kv.wire_dtype == torch.float32


@pytest.mark.parametrize("wire_dtype,shrink", [("bfloat16", 2), ("int8", 4)])
def test_workers_with_a_reduced_wire_serve_a_prompt_from_smaller_blocks(
        store: RedisServer, tiny_model_dir: Path, reference: Reference, tmp_path: Path,
        wire_dtype: str, shrink: int) -> None:
    flags = ("--kv-wire-dtype", wire_dtype)
    prefill = start_worker("prefill", tiny_model_dir, store.url(), tmp_path, extra=flags)
    try:
        decode = start_worker("decode", tiny_model_dir, store.url(), tmp_path,
                              prefill_addr=prefill.addr, extra=flags)
        try:
            rng = random.Random(11)
            ids = [rng.randrange(3, 700) for _ in range(8 * BLOCK_SIZE + 8)]
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), cache_salt=wire_dtype,
                                         sampling=pb.SamplingParams(max_new_tokens=6))
            with decode.channel() as channel:
                reply = pb_grpc.GenerationStub(channel).Generate(request, timeout=60.0)
        finally:
            decode.stop()
    finally:
        prefill.stop()
    runner = ModelRunner(reference.loaded, num_blocks=1, block_size=BLOCK_SIZE)
    native = block_spec(reference.loaded, runner)
    wire = block_spec(reference.loaded, runner, wire_dtype)
    keys = [block_key(wire.fingerprint, h)
            for h in hash_block_chain(ids, BLOCK_SIZE, wire.fingerprint, wire_dtype)]
    stored = HEADER_SIZE + native.payload_nbytes // shrink + wire.scales_nbytes
    assert [store.client().strlen(k) for k in keys] == [stored] * 8
    assert list(reply.token_ids) == reference.greedy(ids, 6)


def test_the_wire_bench_reports_half_sized_bf16_blocks(loaded: LoadedModel) -> None:
    rows = measure(loaded)
    assert rows["bfloat16"]["bytes"] - HEADER_SIZE == (rows["native"]["bytes"] - HEADER_SIZE) / 2
    assert rows["native"]["max_diff"] < 1e-4 < rows["bfloat16"]["max_diff"]
    assert rows["native"]["same"] == len(PROMPTS)
    assert rows["int8"]["bytes"] < rows["native"]["bytes"] / 4 + HEADER_SIZE + 1024


def test_an_int8_wire_round_trip_is_within_half_a_step_of_its_scale(loaded: LoadedModel) -> None:
    probe, cache = _runner(loaded, "int8")
    native = block_spec(loaded, probe)
    assert cache.spec.fingerprint not in (native.fingerprint,
                                          block_spec(loaded, probe, "bfloat16").fingerprint)
    assert cache.spec.payload_nbytes == native.payload_nbytes // 4 + cache.spec.scales_nbytes
    runner, seq, other, into = _round_trip(loaded, "int8", 2)
    for i in range(2):
        sent = runner.export_block(seq, i)  # (L, 2, bs, kvh, hd) float32
        step = sent.abs().amax(dim=(2, 3, 4), keepdim=True) / 127  # (L, 2, 1, 1, 1)
        error = (other.export_block(into, i) - sent).abs()
        assert bool((error <= step * 0.5001).all()) and float(error.max()) > 0
