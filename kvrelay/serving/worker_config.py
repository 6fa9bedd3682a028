"""Settings every worker shares; ``PrefillConfig`` and ``DecodeConfig`` extend them."""

from __future__ import annotations

from dataclasses import dataclass

from cachestore.kvstore import DEFAULT_BLOCK_SIZE
from kvrelay.serving.settings import setting
from kvrelay.serving.tls import is_loopback

KV_WIRE_DTYPES = ("native", "bfloat16", "int8")


@dataclass(frozen=True)
class WorkerConfig:
    """Where a worker listens, what it serves and how it reaches the store."""

    host: str = setting("127.0.0.1", "address to bind (plaintext gRPC: keep it on loopback "
                                     "unless a trusted network is in front)")
    port: int = setting(50051, "gRPC port")
    metrics_port: int = setting(9400, "Prometheus /metrics HTTP port (0: no metrics server)")
    model: str | None = setting(None, "model directory or GGUF file (default: the demo model "
                                      "when installed, else the built-in tiny model)")
    dtype: str = setting("float32", "weights and KV dtype: float32, bfloat16 or float16")
    device: str = setting("cpu", "torch device, e.g. cpu or cuda")
    redis_url: str = setting("", "prefix store URL (redis:// or rediss://); empty: no store, "
                                 "every lookup is a miss")
    redis_cluster: bool = setting(False, "the URL names a node of a Redis Cluster")
    redis_tls_ca_file: str = setting("", "PEM CA bundle that verifies a rediss:// server "
                                         "(empty: the system's CAs)")
    redis_tls_cert_file: str = setting("", "client certificate for a Redis that requires one")
    redis_tls_key_file: str = setting("", "private key of redis_tls_cert_file")
    store_timeout_s: float = setting(0.5, "upper bound on one store call")
    block_ttl_s: int = setting(86400, "expiry of published blocks, seconds (0: none)")
    store_threads: int = setting(4, "threads doing store I/O")
    switch_interval_s: float = setting(
        0.0005, "Python's thread switch interval (sys.setswitchinterval): the longest a thread "
                "waits for the GIL before its holder is asked to drop it. The compute thread "
                "takes the GIL back after every torch op; this bounds how long a busy gRPC "
                "loop or store thread can hold it up (Python's default: 0.005)")
    torch_threads: int = setting(0, "torch intra-op threads (0: torch's default, one per core)")
    block_size: int = setting(DEFAULT_BLOCK_SIZE, "tokens per KV block (part of the model "
                                  "fingerprint; every worker sharing a store must agree)")
    kv_wire_dtype: str = setting("native", "dtype of KV blocks in the store: native (the pool's "
                                           "dtype), bfloat16 (half the bytes of float32) or "
                                           "int8 (a quarter, with a scale per layer and K/V); "
                                           "part of the model fingerprint")
    num_blocks: int = setting(1024, "KV blocks in this worker's pool (x block_size tokens; "
                                    "SmolLM2-135M in float32 keeps 46 KB of K/V per token)")
    max_batch_size: int = setting(16, "most sequences in one forward pass")
    max_requests: int = setting(64, "most requests running plus waiting (RESOURCE_EXHAUSTED beyond)")
    max_message_bytes: int = setting(4 * 1024 * 1024, "gRPC message-size limit, both directions")
    drain_grace_s: float = setting(30.0, "on SIGTERM, how long in-flight requests may finish")
    log_level: str = setting("info", "log level")
    tls_cert_file: str = setting("", "PEM certificate chain: serve gRPC over TLS (with tls_key_file)")
    tls_key_file: str = setting("", "PEM private key of tls_cert_file")
    tls_client_ca_file: str = setting("", "PEM CA bundle: require client certificates (mTLS)")
    api_keys_file: str = setting("", "file of '<tenant> <key>' lines: callers must send "
                                     "'authorization: Bearer <key>' (empty: no API keys)")
    compute_gate: str = setting("", "a file every worker on these cores names: their forward "
                                    "passes take turns instead of running at once "
                                    "(kvrelay.serving.gate; empty: off, for workers with cores "
                                    "of their own)")
    compute_gate_wait_s: float = setting(5.0, "longest wait for the compute gate before a pass "
                                              "runs without it (a stopped or hung worker "
                                              "holding it)")
    compute_gate_slice_s: float = setting(0.5, "a forward pass that has held the compute "
                                               "gate this long lets a waiting worker compute "
                                               "between two of its layers (0: passes are "
                                               "never cut)")
    allow_plaintext: bool = setting(False, "serve plaintext gRPC on a non-loopback host (only "
                                           "behind a trusted network, e.g. inside a cluster)")

    def __post_init__(self) -> None:
        for name in ("block_size", "num_blocks", "max_batch_size", "max_requests",
                     "max_message_bytes", "store_threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

        if self.compute_gate_wait_s <= 0:
            raise ValueError("compute_gate_wait_s must be positive")
        if self.compute_gate_slice_s < 0:
            raise ValueError("compute_gate_slice_s must be >= 0")
        if self.switch_interval_s <= 0 or self.torch_threads < 0:
            raise ValueError("switch_interval_s must be positive and torch_threads >= 0")
        if self.kv_wire_dtype not in KV_WIRE_DTYPES:
            raise ValueError(f"kv_wire_dtype must be one of {', '.join(KV_WIRE_DTYPES)}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if not (self.tls or is_loopback(self.host) or self.allow_plaintext):
            raise ValueError(f"refusing plaintext gRPC on {self.host}: set tls_cert_file and "
                             "tls_key_file, or allow_plaintext on a trusted network")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
