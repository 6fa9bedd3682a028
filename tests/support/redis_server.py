"""Start and stop real ``redis-server`` processes for tests (and benchmarks).

Every server binds 127.0.0.1 on a free port, keeps nothing on disk (``--save ""
--appendonly no``), runs in its own temporary directory and is stopped by its pid; where
util-linux ``setpriv`` exists it also gets SIGTERM if the process that started it dies
first (start servers from the main thread: the kernel ties this to the starting thread).
``redis_server``, ``redis_cluster`` and ``redis_tls`` are pytest fixtures that always
stop what they started; import them into a ``conftest.py`` to use them.

    from tests.support.redis_server import redis_server  # noqa: F401  (a fixture)
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

_START_TIMEOUT_S = 10.0


def free_port(*, with_bus: bool = False) -> int:
    """A port free on 127.0.0.1 now (and ``port + 10000`` too when ``with_bus``)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if not with_bus:
            return port
        if port + 10000 < 65536 and _is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair found")


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""

    ca_cert: Path
    cert: Path
    key: Path


@dataclass
class RedisServer:
    """A redis-server child process; ``stop()`` ends it by pid and removes its files."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    command: tuple[str, ...]
    password: str | None = None
    tls: TlsFiles | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def url(self, username: str | None = None, password: str | None = None) -> str:
        """``redis://`` (or ``rediss://`` for a TLS server) URL, optionally with a user."""
        scheme = "rediss" if self.tls else "redis"
        password = password if password is not None else self.password
        auth = f"{username or ''}:{password}@" if password is not None else ""
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        """An admin redis-py client (default user) with bounded timeouts, long enough to
        ride out a busy machine's multi-second stalls (tests/support/timing.py)."""
        options: dict[str, object] = {"socket_timeout": 15, "socket_connect_timeout": 10}
        if self.tls:
            options["ssl_ca_certs"] = str(self.tls.ca_cert)
        return redis.Redis.from_url(self.url(), **(options | kwargs))

    def log(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; always removes the working directory."""
        try:
            self.terminate()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self) -> None:
        """Stop, then start again on the same port and directory (cluster identity kept,
        data lost: nothing is persisted)."""
        self.terminate()
        self.process = _spawn(self.command)
        _wait_until_ready(self)

    def terminate(self) -> None:
        """End the process (SIGTERM, SIGKILL after 5 s) but keep its directory."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _base_args(port: int, workdir: Path, tls: TlsFiles | None) -> list[str]:
    args = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir),
            "--logfile", str(workdir / "redis.log"), "--protected-mode", "no"]
    if tls is None:
        return args + ["--port", str(port)]
    return args + ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls.cert),
                   "--tls-key-file", str(tls.key), "--tls-ca-cert-file", str(tls.ca_cert),
                   "--tls-auth-clients", "no"]


class ServerExitedEarly(RuntimeError):
    """redis-server stopped before answering (bad arguments, or its port was taken)."""


def start_redis(extra_args: Sequence[str] = (), *, password: str | None = None,
                tls: TlsFiles | None = None, port: int | None = None,
                with_bus: bool = False) -> RedisServer:
    """Start redis-server on a free 127.0.0.1 port (or ``port``) and wait until it answers
    PING; a free port taken by someone else in the meantime is retried with another."""
    for attempt in range(3):
        try:
            return _start_once(extra_args, password, tls, port or free_port(with_bus=with_bus))
        except ServerExitedEarly:
            if port is not None or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _start_once(extra_args: Sequence[str], password: str | None, tls: TlsFiles | None,
                port: int) -> RedisServer:
    workdir = Path(tempfile.mkdtemp(prefix=f"kvrelay-redis-{port}-"))
    args = _base_args(port, workdir, tls) + list(extra_args)
    if password is not None:
        args += ["--requirepass", password]
    command = ("redis-server", *args)
    server = RedisServer(_spawn(command), port, workdir, command, password, tls)
    try:
        _wait_until_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def _spawn(command: Sequence[str]) -> subprocess.Popen[bytes]:
    setpriv = shutil.which("setpriv")  # util-linux: exec with a parent-death signal
    prefix = [setpriv, "--pdeathsig", "TERM"] if setpriv else []
    return subprocess.Popen(prefix + list(command), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _wait_until_ready(server: RedisServer) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        if server.process.poll() is not None:
            raise ServerExitedEarly(f"redis-server exited early:\n{server.log()[-2000:]}")
        try:
            with contextlib.closing(server.client(socket_timeout=1)) as client:
                if client.info("server")["process_id"] == server.pid:  # not another server
                    return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"redis-server on port {server.port} did not answer in time")
        time.sleep(0.05)


def make_tls_files(directory: Path) -> TlsFiles:
    """A CA and a server certificate for 127.0.0.1/localhost, made with the openssl CLI."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", ca_key, "-out", ca_cert, "-days", "1",
             "-subj", "/CN=kvrelay test CA")
    _openssl("req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    _openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
             "-out", cert, "-days", "1", "-extfile", ext)
    return TlsFiles(ca_cert, cert, key)


def _openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


@dataclass
class RedisClusterServers:
    """Three masters of one Redis Cluster, all slots assigned."""

    nodes: list[RedisServer]

    def url(self) -> str:
        return self.nodes[0].url()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def wait_until_ok(self, timeout_s: float = 30.0) -> None:
        """Wait until every node reports ``cluster_state:ok``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = []
            for node in self.nodes:
                with contextlib.closing(node.client()) as client:
                    states.append(client.execute_command("CLUSTER", "INFO").decode())
            if all("cluster_state:ok" in s for s in states):
                return
            time.sleep(0.1)
        raise RuntimeError("cluster did not reach cluster_state:ok")


def start_cluster(masters: int = 3) -> RedisClusterServers:
    """Start ``masters`` cluster-enabled servers and join them with ``redis-cli --cluster``."""
    cluster = RedisClusterServers([])
    try:
        for _ in range(masters):
            cluster.nodes.append(start_redis(
                ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", "2000"], with_bus=True))
        addresses = [f"127.0.0.1:{node.port}" for node in cluster.nodes]
        subprocess.run(["redis-cli", "--cluster", "create", *addresses, "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        cluster.wait_until_ok()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh standalone redis-server for one test."""
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A three-master Redis Cluster shared by the tests of one module."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def redis_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A TLS-only redis-server with a CA and certificate made for this module."""
    server = start_redis(tls=make_tls_files(tmp_path_factory.mktemp("tls")))
    try:
        yield server
    finally:
        server.stop()
