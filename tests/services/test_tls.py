"""gRPC over TLS: a client with the CA gets answers, a plaintext one does not, and decode
reaches a TLS prefill worker."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from kvrelay.client import open_channel
from protos.kvrelay.v1 import generation_pb2 as pb
from protos.kvrelay.v1 import generation_pb2_grpc as pb_grpc
from tests.services.conftest import Worker, start_worker
from tests.support.redis_server import RedisServer, make_tls_files


def test_workers_serve_and_call_each_other_over_tls(store: RedisServer, tiny_model_dir: Path,
                                                    tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    serve_tls = ("--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key))
    workers: list[Worker] = []
    try:
        prefill = start_worker("prefill", tiny_model_dir, store.url(), tmp_path, extra=serve_tls,
                               tls_ca_file=str(tls.ca_cert))
        workers.append(prefill)
        decode = start_worker("decode", tiny_model_dir, store.url(), tmp_path,
                              prefill_addr=prefill.addr, tls_ca_file=str(tls.ca_cert),
                              extra=(*serve_tls, "--prefill-tls-ca-file", str(tls.ca_cert)))
        workers.append(decode)
        request = pb.GenerateRequest(prompt="Over an encrypted channel, please. " * 6,
                                     cache_salt="tls", sampling=pb.SamplingParams(max_new_tokens=4))
        with open_channel(decode.addr, str(tls.ca_cert)) as channel:
            reply = pb_grpc.GenerationStub(channel).Generate(request, timeout=30)
        assert reply.usage.completion_tokens == len(reply.token_ids) > 0
        assert prefill.metric("kvrelay_prefill_computed_tokens_total") > 0
        assert decode.metric("kvrelay_local_prefill_fallbacks_total") == 0
        with open_channel(decode.addr) as plaintext, pytest.raises(grpc.RpcError) as err:
            pb_grpc.GenerationStub(plaintext).Generate(request, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        for worker in reversed(workers):
            worker.stop()
