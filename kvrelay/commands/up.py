"""``kvrelay up``: run a local cluster (redis-server, prefill, decode) until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import time

from kvrelay.cluster import ClusterSpec, Endpoints, LocalCluster


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="model directory or GGUF file (default: SmolLM2-135M-Instruct "
                             "when installed, else the built-in tiny model)")
    parser.add_argument("--port", type=int, default=50051, help="decode worker (Generate) port")
    parser.add_argument("--prefill-port", type=int, default=0, help="prefill worker port (0: free)")
    parser.add_argument("--redis-url", default=None,
                        help="use this Redis instead of starting a redis-server")
    parser.add_argument("--redis-maxmemory", default="512mb", help="maxmemory of the started redis")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait per worker")
    parser.add_argument("--no-compute-gate", action="store_true",
                        help="let the two workers compute at once instead of taking turns at "
                             "forward passes (they share this machine's cores; the gate is "
                             "faster there: docs/performance.md)")


def resolve_model(model: str | None) -> str:
    """The model to serve; with none given, ``engine.loader.default_model_path()``."""
    if model:
        return model
    print("resolving the default model (converted once, then cached) ...", flush=True)
    from engine.loader import default_model_path  # heavy (torch); only when needed

    return default_model_path()


def cluster_spec(args: argparse.Namespace, model: str) -> ClusterSpec:
    """What ``kvrelay up`` starts, from its flags."""
    return ClusterSpec(model=model, decode_port=args.port, prefill_port=args.prefill_port,
                       redis_url=args.redis_url, redis_maxmemory=args.redis_maxmemory,
                       ready_timeout_s=args.ready_timeout, compute_gate=not args.no_compute_gate)


def print_endpoints(ep: Endpoints) -> None:
    print(f"redis    {ep.redis_url}")
    print(f"prefill  {ep.prefill}   metrics {ep.prefill_metrics}")
    print(f"decode   {ep.decode}   metrics {ep.decode_metrics}")
    print(f"try:     kvrelay generate --addr {ep.decode} \"Hello\"", flush=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _wait(cluster: LocalCluster) -> None:
    while cluster.running():
        time.sleep(1.0)
    print("a cluster process exited; stopping", flush=True)


def main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops the cluster like Ctrl-C
    spec = cluster_spec(args, resolve_model(args.model))
    cluster = LocalCluster(spec, progress=lambda line: print(line, flush=True))
    try:
        with cluster:
            assert cluster.endpoints is not None
            print_endpoints(cluster.endpoints)
            print("cluster is up; Ctrl-C stops it", flush=True)
            _wait(cluster)
    except KeyboardInterrupt:
        print("stopped", flush=True)
        return 0
    return 1
