"""Real processes for the service tests: a redis-server, prefill and decode workers.

Workers are ``kvrelay prefill|decode`` child processes on free 127.0.0.1 ports serving the
tiny model with 16-token blocks; each is stopped by its pid. ``cluster``
is redis + one prefill + two decode workers sharing the store, started once per session
(tests keep apart by using their own cache salts).
"""

from __future__ import annotations

import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from cachestore.hashing import block_key, hash_block_chain
from engine.engine import LLMEngine
from engine.loader import load_model
from engine.runner import ModelRunner
from engine.sampling import SamplingParams
from kvrelay.client import open_channel
from kvrelay.cluster import (
    die_with_parent,
    free_port,
    stop_process,
    wait_until_serving,
    worker_command,
)
from kvrelay.serving.runtime import block_spec
from tests.support.redis_server import RedisServer, start_redis

BLOCK_SIZE = 16
# A worker is up in seconds on a quiet machine; on an oversubscribed one, importing
# torch and grpc alone has taken over a minute. Same limit as LocalCluster.
READY_TIMEOUT_S = 300.0


@dataclass
class Worker:
    """A worker child process and where it listens."""

    role: str
    process: subprocess.Popen[bytes]
    addr: str
    metrics_url: str
    log_path: Path

    def channel(self) -> grpc.Channel:
        return open_channel(self.addr)

    def metric(self, name: str) -> float:
        """Sum of the samples of ``name`` on the metrics endpoint (all label values, unless
        ``name`` ends with a label set such as ``{reason="unavailable"}``)."""
        text = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and line[len(name)] in " {")

    def stop(self) -> None:
        stop_process(self.process, grace_s=10.0)


def start_worker(role: str, model: Path, redis_url: str, log_dir: Path, *,
                 prefill_addr: str | None = None, extra: tuple[str, ...] = (),
                 tls_ca_file: str = "") -> Worker:
    """Start ``kvrelay <role>`` and wait until its health service reports SERVING."""
    port, metrics_port = free_port(), free_port()
    cmd = worker_command(role, model=str(model), port=port, metrics_port=metrics_port,
                         redis_url=redis_url, block_size=BLOCK_SIZE, prefill_addr=prefill_addr)
    # A generous store timeout: a test counting cache hits must not lose them to a stalled
    # machine. A test of a hung store passes a short one in ``extra`` (the last one wins).
    # Decode keeps no finished prompts' blocks: these tests count what comes from the store.
    local = ["--local-prefix-cache", "false"] if role == "decode" else []
    cmd += ["--num-blocks", "512", "--store-timeout-s", "2", *local, *extra]
    log_path = log_dir / f"{role}-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(die_with_parent(cmd), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    worker = Worker(role, proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics",
                    log_path)
    try:
        wait_until_serving(role, proc, worker.addr, READY_TIMEOUT_S, lambda _: None, log_path,
                           tls_ca_file)
    except BaseException:
        worker.stop()
        raise
    return worker


@dataclass
class Cluster:
    """One store, one prefill worker, two decode workers."""

    redis: RedisServer
    prefill: Worker
    decodes: list[Worker]


@pytest.fixture(scope="session")
def store() -> Iterator[RedisServer]:
    server = start_redis(["--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru"])
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def cluster(store: RedisServer, tiny_model_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    log_dir = tmp_path_factory.mktemp("worker-logs")
    workers: list[Worker] = []
    try:
        prefill = start_worker("prefill", tiny_model_dir, store.url(), log_dir)
        workers.append(prefill)
        for _ in range(2):
            workers.append(start_worker("decode", tiny_model_dir, store.url(), log_dir,
                                        prefill_addr=prefill.addr))
        yield Cluster(store, prefill, workers[1:])
    finally:
        for worker in reversed(workers):
            worker.stop()


class Reference:
    """The monolithic engine (no services, no store) on the same model: greedy outputs."""

    def __init__(self, model_dir: Path) -> None:
        self.loaded = load_model(str(model_dir))
        self.tokenizer = self.loaded.tokenizer

    def block_keys(self, prompt_ids: list[int], block_size: int, cache_salt: str) -> list[str]:
        """Store keys of the prompt's full blocks, as the workers name them."""
        runner = ModelRunner(self.loaded, num_blocks=1, block_size=block_size)
        fingerprint = block_spec(self.loaded, runner).fingerprint
        return [block_key(fingerprint, h)
                for h in hash_block_chain(prompt_ids, block_size, fingerprint, cache_salt)]

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, *,
               ignore_eos: bool = False) -> list[int]:
        engine = LLMEngine(ModelRunner(self.loaded, num_blocks=256, block_size=BLOCK_SIZE),
                           self.tokenizer)
        params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)
        return engine.generate([prompt_ids], params)[0].token_ids


@pytest.fixture(scope="session")
def reference(tiny_model_dir: Path) -> Reference:
    return Reference(tiny_model_dir)
