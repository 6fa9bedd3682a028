"""The decode worker's settings (``kvrelay decode --help`` lists them)."""

from __future__ import annotations

from dataclasses import dataclass

from kvrelay.serving.settings import setting
from kvrelay.serving.worker_config import WorkerConfig


@dataclass(frozen=True)
class DecodeConfig(WorkerConfig):
    """A decode worker: the Generate front door and the continuous batch."""

    port: int = setting(50051, "gRPC port")
    metrics_port: int = setting(9401, "Prometheus /metrics HTTP port (0: no metrics server)")
    prefill_addr: str = setting("", "prefill worker HOST:PORT (empty: always prefill locally)")
    prefill_threshold_tokens: int = setting(
        32, "ship the prompt to the prefill worker when at least this many tokens are uncached")
    prefill_timeout_s: float = setting(30.0, "deadline of one Prefill call")
    max_new_tokens_limit: int = setting(4096, "largest max_new_tokens a request may ask for")
    max_prompt_chars: int = setting(1_000_000, "largest prompt text, in characters")
    max_prompt_tokens: int = setting(0, "most prompt tokens a request may send, after "
                                        "tokenization (0: the model's context window)")
    prefill_chunk_tokens: int = setting(
        256, "most prompt tokens one batch step computes while requests are streaming: a "
             "longer prompt is computed a chunk per step, so running streams never wait for "
             "a whole long prompt (0: prompts go in whole)")
    publish_local_blocks: bool = setting(
        True, "publish the blocks this worker computed itself (false: read-only store access "
              "is enough; only prefill workers write)")
    local_prefix_cache: bool = setting(
        True, "keep the prompt blocks of finished requests in free pool memory, named by their "
              "hashes, so that later prompts with that prefix share them instead of fetching "
              "them (the least recently used go first when blocks are needed)")
    prefill_tls_ca_file: str = setting("", "PEM CA bundle: call the prefill worker over TLS")
    prefill_tls_cert_file: str = setting("", "client certificate for the prefill worker (mTLS)")
    prefill_tls_key_file: str = setting("", "private key of prefill_tls_cert_file")
    prefill_api_key_file: str = setting("", "file holding the key this worker presents to the "
                                            "prefill worker (its api_keys_file lists it)")
    max_streams_per_tenant: int = setting(0, "with API keys: most requests of one tenant in "
                                             "flight (RESOURCE_EXHAUSTED beyond; 0: no limit)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_prompt_tokens < 0 or self.prefill_chunk_tokens < 0:
            raise ValueError("max_prompt_tokens and prefill_chunk_tokens must be >= 0")
        if self.prefill_threshold_tokens < 1 or self.max_new_tokens_limit < 1:
            raise ValueError("prefill_threshold_tokens and max_new_tokens_limit must be positive")
