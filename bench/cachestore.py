"""Put/get throughput of the prefix cache store against raw clients, on one local server.

    python -m bench.cachestore [--json PATH] [--block-sizes 16,32,64,128] [--repeat 5]

The workload is the KV of a 2048-token prompt shaped like SmolLM2-135M (30 layers,
3 KV heads, head dim 64): 90 MiB in fp32, 45 MiB in bf16, cut into blocks. Three clients
move the same bytes through the same redis-server (started here on a free port, nothing
persisted) in the same run:

* ``kvrelay``: ``PrefixCache.publish`` (encode + pipelined SET NX) and
  ``PrefixCache.fetch_prefix`` (pipelined GET in batches + full verification; the sink
  does nothing, since importing into the KV pool is the engine's copy).
* ``redis_py``: a redis-py pipeline of plain SET / GET of the encoded values, with hiredis
  (``pip install redis[hiredis]``, the usual production install): hiredis parses replies
  in C, and its command packer copies every value it sends into one new bytes object.
* ``redis_py_pure``: the same pipeline with redis-py's pure-Python packer and parser (what
  redis-py does without hiredis): its packer sends values over 6000 bytes as separate
  buffers without copying them, its parser is slow on large replies.
* ``socket``: a minimal plain-socket RESP client (sendall per buffer, recv_into one
  preallocated buffer): roughly what the wire and the server allow.

Throughput is payload bytes / wall seconds, MB = 10**6 bytes; each figure is the median
of ``--repeat`` interleaved runs, and the client's and the server's CPU time per
operation are shown beside it (they show where the time goes when the machine is busy).
A last line gives the fixed cost of one block (1000 tiny blocks), which is what the
block size trades against. The server runs from the test helpers in ``tests/``, so run
this from the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import redis
from redis._parsers import _HiredisParser, _RESP2Parser
from redis._parsers.encoders import Encoder
from redis.connection import HiredisRespSerializer, PythonRespSerializer
from redis.utils import HIREDIS_AVAILABLE

from cachestore.codec import BlockSpec, encode_block
from cachestore.kvstore import DEFAULT_BLOCK_SIZE, PrefixCache
from cachestore.redis_store import RedisBlockStore
from cachestore.resp import pack_command
from tests.support.redis_server import RedisServer, start_redis

SMOLLM2_135M = {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64}
TOKENS = 2048
DTYPES = ("float32", "bfloat16")
CLIENTS = ("kvrelay", "redis_py", "redis_py_pure", "socket")
FINGERPRINT = "00112233445566778899aabbccddeeff"


@dataclass
class Workload:
    """One dtype and block size: the payloads, their keys and their encoded values."""

    cache: PrefixCache
    hashes: list
    keys: list[str]
    payloads: list[np.ndarray]
    values: list[bytes]

    @property
    def payload_bytes(self) -> int:
        return sum(p.nbytes for p in self.payloads)


def make_workload(url: str, kv_dtype: str, block_size: int) -> Workload:
    spec = BlockSpec(FINGERPRINT, kv_dtype, block_size=block_size, **SMOLLM2_135M)
    store = RedisBlockStore.from_url(url, timeout_s=10.0)
    cache = PrefixCache(store, spec)
    hashes = cache.block_hashes(list(range(TOKENS)))
    rng = np.random.default_rng(0)
    payloads = [rng.integers(0, 256, spec.payload_nbytes, dtype=np.uint8) for _ in hashes]
    values = [b"".join(bytes(p) for p in encode_block(spec, h, payload))
              for h, payload in zip(hashes, payloads)]
    return Workload(cache, hashes, cache.keys(hashes), payloads, values)


class SocketClient:
    """A plain-socket RESP client: the floor for what a Python client can do here."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.buffer = bytearray(1 << 20)

    def put(self, keys: list[str], values: list[bytes]) -> None:
        for key, value in zip(keys, values):
            k = key.encode()
            self.sock.sendall(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(k), k, len(value)))
            self.sock.sendall(value)
            self.sock.sendall(b"\r\n")
        self._read_exactly(5 * len(keys))  # "+OK\r\n" each

    def get(self, keys: list[str], total: int) -> memoryview:
        self.sock.sendall(b"".join(pack_command(b"GET", k.encode()) for k in keys))
        if len(self.buffer) < total:
            self.buffer = bytearray(total)
        view = memoryview(self.buffer)
        got = 0
        while got < total:
            got += self.sock.recv_into(view[got:total])
        return view[:total]

    def _read_exactly(self, n: int) -> None:
        view = memoryview(self.buffer)
        got = 0
        while got < n:
            got += self.sock.recv_into(view[got:n])

    def close(self) -> None:
        self.sock.close()


def redis_py_client(port: int, *, hiredis: bool) -> redis.Redis:
    """A redis-py client with hiredis's packer and parser, or with the pure-Python ones."""
    if hiredis and not HIREDIS_AVAILABLE:
        raise SystemExit("bench.cachestore compares with redis-py + hiredis: pip install hiredis "
                         "(or pip install -e '.[test]')")
    packer = HiredisRespSerializer() if hiredis else PythonRespSerializer(
        6000, Encoder("utf-8", "strict", False).encode)  # redis-py's own buffer cutoff
    pool = redis.ConnectionPool(port=port, socket_timeout=30, command_packer=packer,
                                parser_class=_HiredisParser if hiredis else _RESP2Parser)
    return redis.Redis(connection_pool=pool)


def _reply_bytes(values: list[bytes]) -> int:
    return sum(len(b"$%d\r\n" % len(v)) + len(v) + 2 for v in values)


def _operations(work: Workload, admin: redis.Redis, pure: redis.Redis, sock: SocketClient
                ) -> dict[tuple[str, str], tuple[Callable[[], None], Callable[[], object]]]:
    """(op, client) -> (setup, timed call)."""
    def flush() -> None:
        # DEL keeps the freed pages in the server's allocator, as in a warm server;
        # FLUSHALL SYNC would hand them back to the OS and time page faults instead
        admin.delete(*work.keys)

    def nothing() -> None:
        return None

    def redis_py_put(client: redis.Redis) -> None:
        pipe = client.pipeline(transaction=False)
        for key, value in zip(work.keys, work.values):
            pipe.set(key, value)
        pipe.execute()

    def redis_py_get(client: redis.Redis) -> object:
        pipe = client.pipeline(transaction=False)
        for key in work.keys:
            pipe.get(key)
        return pipe.execute()

    total = _reply_bytes(work.values)
    return {
        ("put", "kvrelay"): (flush, lambda: work.cache.publish(work.hashes, work.payloads)),
        ("put", "redis_py"): (flush, lambda: redis_py_put(admin)),
        ("put", "redis_py_pure"): (flush, lambda: redis_py_put(pure)),
        ("put", "socket"): (flush, lambda: sock.put(work.keys, work.values)),
        ("get", "kvrelay"): (nothing, lambda: work.cache.fetch_prefix(work.hashes,
                                                                     lambda i, p: None)),
        ("get", "redis_py"): (nothing, lambda: redis_py_get(admin)),
        ("get", "redis_py_pure"): (nothing, lambda: redis_py_get(pure)),
        ("get", "socket"): (nothing, lambda: sock.get(work.keys, total)),
    }


@dataclass
class Run:
    """One timed call: wall seconds, this process's CPU seconds, the server's CPU seconds."""

    wall: float
    client_cpu: float
    server_cpu: float


def _server_cpu(admin: redis.Redis) -> float:
    info = admin.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _timed(admin: redis.Redis, call: Callable[[], object]) -> Run:
    server, cpu, wall = _server_cpu(admin), time.process_time(), time.perf_counter()
    call()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return Run(wall, cpu, _server_cpu(admin) - server)


def measure(work: Workload, server: RedisServer, repeat: int) -> list[dict[str, object]]:
    admin = redis_py_client(server.port, hiredis=True)
    pure = redis_py_client(server.port, hiredis=False)
    sock = SocketClient(server.port)
    ops = _operations(work, admin, pure, sock)
    runs: dict[tuple[str, str], list[Run]] = {key: [] for key in ops}
    try:
        for op in ("put", "get"):
            for _ in range(repeat + 1):  # the first round warms buffers and is dropped
                for client in CLIENTS:
                    setup, call = ops[(op, client)]
                    setup()
                    runs[(op, client)].append(_timed(admin, call))
            _check_stored(work)
    finally:
        sock.close()
        pure.close()
        admin.close()
    return [_row(work, op, {c: runs[(op, c)][1:] for c in CLIENTS}) for op in ("put", "get")]


def _check_stored(work: Workload) -> None:
    fetched = work.cache.fetch_prefix(work.hashes, lambda i, p: None)
    if fetched != len(work.hashes):
        raise RuntimeError(f"only {fetched}/{len(work.hashes)} blocks verified after the run")


def _sig(value: float, digits: int = 3) -> float:
    """``value`` to ``digits`` significant figures: a small workload on a slow machine
    still reports a non-zero rate (``round(x, 1)`` turned 0.04 MB/s into 0.0)."""
    return float(f"{value:.{digits}g}")


def _row(work: Workload, op: str, runs: dict[str, list[Run]]) -> dict[str, object]:
    row: dict[str, object] = {
        "dtype": work.cache.spec.kv_dtype, "op": op, "block_size": work.cache.spec.block_size,
        "blocks": len(work.hashes), "payload_bytes": work.payload_bytes,
    }
    walls = {client: statistics.median(r.wall for r in client_runs)
             for client, client_runs in runs.items()}
    for client, client_runs in runs.items():
        row[f"{client}_mb_s"] = _sig(work.payload_bytes / walls[client] / 1e6)
        row[f"{client}_best_mb_s"] = _sig(
            work.payload_bytes / min(r.wall for r in client_runs) / 1e6)
        row[f"{client}_client_cpu_ms"] = _sig(
            1e3 * statistics.median(r.client_cpu for r in client_runs))
        row[f"{client}_server_cpu_ms"] = _sig(
            1e3 * statistics.median(r.server_cpu for r in client_runs))
    for peer in ("redis_py", "redis_py_pure"):
        row[f"kvrelay_vs_{peer}"] = round(walls[peer] / walls["kvrelay"], 2)
    return row


def _cpu(row: dict[str, object], client: str) -> str:
    return f"{row[client + '_client_cpu_ms']}/{row[client + '_server_cpu_ms']}"


def _table(rows: list[dict[str, object]]) -> str:
    """MB/s of each client, kvrelay's ratio to each redis-py, then CPU ms per operation."""
    names = {"kvrelay": "kvrelay", "redis_py": "r-py+hir", "redis_py_pure": "r-py pure",
             "socket": "socket"}
    head = (f"{'dtype':<9}{'block':>6} {'op':<4}{'MiB':>4}"
            + "".join(f"{names[c]:>10}" for c in CLIENTS)
            + f"{'x r-py+hir':>11}{'x pure':>7}" + "".join(f"{names[c]:>13}" for c in CLIENTS))
    width = 23 + 10 * len(CLIENTS) + 18
    lines = ["MB/s: median of the runs; CPU: client ms / server ms per operation",
             f"{'':<{width}}{' CPU ms, client/server ':-^{13 * len(CLIENTS)}}",
             head, "-" * len(head)]
    for r in rows:
        speeds = "".join(f"{r[c + '_mb_s']:>10}" for c in CLIENTS)
        cpu = "".join(f"{_cpu(r, c):>13}" for c in CLIENTS)
        lines.append(
            f"{r['dtype']:<9}{r['block_size']:>6} {r['op']:<4}"
            f"{int(r['payload_bytes']) / 2**20:>4.0f}{speeds}"  # type: ignore[call-overload]
            f"{r['kvrelay_vs_redis_py']:>11}{r['kvrelay_vs_redis_py_pure']:>7}{cpu}")
    return "\n".join(lines)


def per_block_cost_us(server: RedisServer, repeat: int, blocks: int = 1000
                      ) -> dict[str, float]:
    """Fixed cost of one block (put and get), measured with 1000 blocks of 512 bytes."""
    spec = BlockSpec(FINGERPRINT, "float32", num_layers=1, block_size=16, num_kv_heads=1,
                     head_dim=4)
    cache = PrefixCache(RedisBlockStore.from_url(server.url(), timeout_s=10.0), spec)
    hashes = cache.block_hashes(list(range(16 * blocks)))
    payloads = [np.zeros(spec.shape, np.float32)] * blocks
    best = {"put": float("inf"), "get": float("inf")}
    with contextlib.closing(server.client()) as admin:
        for _ in range(repeat):
            admin.flushall()
            best["put"] = min(best["put"], _seconds(lambda: cache.publish(hashes, payloads)))
            best["get"] = min(best["get"], _seconds(
                lambda: cache.fetch_prefix(hashes, lambda i, p: None)))
    cache.store.close()
    return {op: round(seconds / blocks * 1e6, 1) for op, seconds in best.items()}


def _seconds(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _hiredis_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("hiredis")
    except Exception:  # noqa: BLE001 (not installed)
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--block-sizes", default=str(DEFAULT_BLOCK_SIZE),
                        help="comma-separated tokens per block (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per figure")
    args = parser.parse_args(argv)
    rows: list[dict[str, object]] = []
    server = start_redis()
    try:
        for block_size in (int(b) for b in args.block_sizes.split(",")):
            for kv_dtype in DTYPES:
                work = make_workload(server.url(), kv_dtype, block_size)
                rows += measure(work, server, args.repeat)
                work.cache.store.close()
                with contextlib.closing(server.client()) as admin:
                    admin.flushall()
        per_block = per_block_cost_us(server, args.repeat)
    finally:
        server.stop()
    print(_table(rows))
    print(f"fixed cost per block (best of {args.repeat}, 1000 blocks of 512 B): "
          f"put {per_block['put']} us, get {per_block['get']} us")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"results": rows, "per_block_us": per_block, "tokens": TOKENS,
                       "model_shape": SMOLLM2_135M,
                       "repeat": args.repeat, "cpus": os.cpu_count(),
                       "python": platform.python_version(), "redis_py": redis.__version__,
                       "hiredis": _hiredis_version()},
                      out, indent=2)


if __name__ == "__main__":
    main()
