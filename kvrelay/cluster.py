"""A local kvrelay cluster as child processes: redis-server, one prefill and one decode worker.

Everything listens on 127.0.0.1. ``LocalCluster`` starts redis-server (unless a URL is
given; with ``maxmemory`` and ``allkeys-lru``), then both workers, waits until each one's
health service reports SERVING, and stops them all (SIGTERM, then SIGKILL after a grace
period) in reverse order. Worker logs go to files in ``log_dir``.

Both workers share this machine's cores, so they take turns at forward passes through a
compute gate (``ClusterSpec.compute_gate``, ``kvrelay.serving.gate``); with the gate off
they start with a short OpenMP spin instead (``GOMP_SPINCOUNT``, see
``ClusterSpec.omp_spin_count``) unless the environment sets one.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from kvrelay.healthcheck import is_serving

Progress = Callable[[str], None]


def die_with_parent(cmd: list[str]) -> list[str]:
    """``cmd`` run so that it gets SIGTERM when this process dies (util-linux ``setpriv``,
    where installed): a killed ``kvrelay up`` leaves no workers behind."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", *cmd] if setpriv else cmd


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class ClusterSpec:
    """What to start. Ports of 0 are picked free at start. ``block_size`` is smaller than
    the workers' default (64) so that the short prompts of a local try-out show reuse."""

    model: str
    decode_port: int = 50051
    prefill_port: int = 0
    redis_url: str | None = None
    redis_maxmemory: str = "512mb"
    block_size: int = 16
    ready_timeout_s: float = 300.0
    omp_spin_count: int | None = 3000
    """``GOMP_SPINCOUNT`` of both workers when they do not take turns through the compute
    gate (None: torch's OpenMP default, 300000 spins). With the gate they never compute at
    once, so they keep the default spin.

    An idle OpenMP thread spins this many times before it sleeps. Alone on its cores a
    worker wants the long default spin (one decode step is ~600 parallel regions); two
    busy workers on the same cores then spin against each other. 2-core Xeon, SmolLM2-135M,
    decode steps in one process and 512-token prefills in the other: default 143 ms/step
    and 224 tok/s together (32.5 ms/step alone); 3000 spins 83 ms/step and 382 tok/s
    (42.6 ms/step alone); 100 spins or ``OMP_WAIT_POLICY=PASSIVE`` ~65 ms/step, ~400 tok/s
    (~70 ms/step alone). Workers on cores of their own need none of this."""
    compute_gate: bool = True
    """Both workers take turns at forward passes through a gate file in the log folder
    (``kvrelay.serving.gate``) unless the environment names one (``KVRELAY_COMPUTE_GATE``;
    empty: off). 2-core Xeon, ``bench.serve`` defaults, the same code: without the gate
    (3000 spins) 66.8 output tok/s, 0.109 s median inter-token latency; with it and the
    default spin 87.6-94.3 tok/s, 0.078-0.084 s (three runs)."""


@dataclass(frozen=True)
class Endpoints:
    """Where each part of a running cluster listens."""

    redis_url: str
    prefill: str
    prefill_metrics: str
    decode: str
    decode_metrics: str


def redis_command(port: int, maxmemory: str) -> list[str]:
    """A throwaway cache redis-server: loopback only, no persistence, LRU eviction."""
    return ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru"]


def worker_command(role: str, *, model: str, port: int, metrics_port: int, redis_url: str,
                   block_size: int, prefill_addr: str | None = None) -> list[str]:
    """The ``kvrelay prefill|decode`` command line of one worker."""
    cmd = [sys.executable, "-m", "kvrelay", role, "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", str(metrics_port), "--redis-url", redis_url,
           "--block-size", str(block_size)]
    return cmd + (["--prefill-addr", prefill_addr] if prefill_addr else [])


def worker_env(omp_spin_count: int | None, compute_gate: str = "") -> dict[str, str]:
    """This process's environment for a co-located worker: with ``GOMP_SPINCOUNT`` set to
    ``omp_spin_count`` unless the environment already chooses a spin or wait policy, and
    ``KVRELAY_COMPUTE_GATE`` set to ``compute_gate`` when that is not empty."""
    env = dict(os.environ)
    if omp_spin_count is not None and not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & env.keys():
        env["GOMP_SPINCOUNT"] = str(omp_spin_count)
    if compute_gate:
        env["KVRELAY_COMPUTE_GATE"] = compute_gate
    return env


def wait_for_redis(port: int, timeout_s: float) -> None:
    """Until redis-server on ``port`` answers PING."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"redis-server on port {port} did not answer within {timeout_s:.0f}s")


def wait_until_serving(name: str, proc: subprocess.Popen[bytes], addr: str, timeout_s: float,
                       progress: Progress, log_path: Path | None = None,
                       tls_ca_file: str = "") -> None:
    """Until the worker at ``addr`` reports SERVING; raise if it exits or times out."""
    start = time.monotonic()
    last_note = start
    while not is_serving(addr, timeout_s=1.0, tls_ca_file=tls_ca_file):
        if proc.poll() is not None:
            tail = log_path.read_text()[-2000:] if log_path and log_path.exists() else ""
            raise RuntimeError(f"{name} exited with status {proc.returncode}\n{tail}")
        now = time.monotonic()
        if now - start > timeout_s:
            raise TimeoutError(f"{name} not serving after {timeout_s:.0f}s")
        if now - last_note >= 5:
            progress(f"  {name}: loading the model ... {now - start:.0f}s")
            last_note = now
        time.sleep(0.2)


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it is still running after ``grace_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class LocalCluster:
    """redis-server + prefill + decode as child processes of this one."""

    def __init__(self, spec: ClusterSpec, log_dir: Path | None = None,
                 progress: Progress = print) -> None:
        self.spec = spec
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="kvrelay-cluster-"))
        self._progress = progress
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.endpoints: Endpoints | None = None
        default_gate = str(self.log_dir / "compute.gate") if spec.compute_gate else ""
        self.gate_path = os.environ.get("KVRELAY_COMPUTE_GATE", default_gate)

    def child_env(self) -> dict[str, str]:
        """The environment of every process this cluster starts."""
        return worker_env(None if self.gate_path else self.spec.omp_spin_count, self.gate_path)

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(die_with_parent(cmd), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env=self.child_env())
        log.close()
        self._procs.append((name, proc))
        return proc

    def _start_redis(self) -> str:
        if self.spec.redis_url:
            return self.spec.redis_url
        if not shutil.which("redis-server"):
            raise RuntimeError("redis-server is not installed (bash scripts/setup.sh installs it)")
        port = free_port()
        self._spawn("redis", redis_command(port, self.spec.redis_maxmemory))
        wait_for_redis(port, 10.0)
        return f"redis://127.0.0.1:{port}/0"

    def start(self) -> Endpoints:
        """Start everything; return where it listens once every worker is SERVING."""
        spec = self.spec
        redis_url = self._start_redis()
        prefill_port = spec.prefill_port or free_port()
        decode_port = spec.decode_port or free_port()
        metrics = (free_port(), free_port())
        prefill_addr = f"127.0.0.1:{prefill_port}"
        decode_addr = f"127.0.0.1:{decode_port}"
        prefill = self._spawn("prefill", worker_command(
            "prefill", model=spec.model, port=prefill_port, metrics_port=metrics[0],
            redis_url=redis_url, block_size=spec.block_size))
        decode = self._spawn("decode", worker_command(
            "decode", model=spec.model, port=decode_port, metrics_port=metrics[1],
            redis_url=redis_url, block_size=spec.block_size, prefill_addr=prefill_addr))
        self._progress(f"starting workers (model {spec.model}); logs in {self.log_dir}")
        for name, proc, addr in (("prefill", prefill, prefill_addr), ("decode", decode, decode_addr)):
            wait_until_serving(name, proc, addr, spec.ready_timeout_s, self._progress,
                               self.log_dir / f"{name}.log")
        self.endpoints = Endpoints(redis_url, prefill_addr, f"http://127.0.0.1:{metrics[0]}/metrics",
                                   decode_addr, f"http://127.0.0.1:{metrics[1]}/metrics")
        return self.endpoints

    def running(self) -> bool:
        """Whether every child is still alive."""
        return all(proc.poll() is None for _, proc in self._procs)

    def stop(self) -> None:
        """Stop the workers, then redis-server."""
        for _, proc in reversed(self._procs):
            stop_process(proc)
        self._procs.clear()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
