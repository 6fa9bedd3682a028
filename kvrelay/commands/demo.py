"""``kvrelay demo``: start a local cluster, send requests sharing a long system prompt, and
print how much of each prompt came from the shared cache and its time to first token.
"""

from __future__ import annotations

import argparse

from kvrelay.client import Prompt, build_request, generate, open_channel
from kvrelay.cluster import ClusterSpec, LocalCluster
from kvrelay.commands.up import resolve_model

SYSTEM_PROMPT = (
    "You are the support assistant of a small bicycle repair shop. The shop opens at nine "
    "in the morning and closes at six in the evening, Monday to Saturday. A basic tune-up "
    "costs forty dollars and takes one day; a full overhaul costs one hundred and twenty "
    "dollars and takes three days. Flat tyres are fixed while the customer waits. The shop "
    "sells city bikes, road bikes and children's bikes, and rents city bikes by the day. "
    "Answer briefly and politely, and never promise a repair time shorter than the ones above."
)
QUESTIONS = [
    "When do you open on Saturday?",
    "How much is a tune-up?",
    "Can I rent a bike for the weekend?",
    "My tyre is flat, how long will it take?",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model (default: as for kvrelay up)")
    parser.add_argument("--port", type=int, default=0, help="decode port (0: a free port)")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per answer")


def _row(i: int, question: str, reply: object) -> str:
    usage, timings = reply.usage, reply.timings  # type: ignore[attr-defined]
    answer = reply.text.replace("\n", " ")[:40]  # type: ignore[attr-defined]
    return (f"{i:>3}  {usage.prompt_tokens:>7}  {usage.cached_prompt_tokens:>7}  "
            f"{timings.time_to_first_token_ms:>9.1f}  {question[:34]:<34}  {answer}")


def main(args: argparse.Namespace) -> int:
    spec = ClusterSpec(model=resolve_model(args.model), decode_port=args.port)
    with LocalCluster(spec, progress=lambda line: print(line, flush=True)) as cluster:
        assert cluster.endpoints is not None
        print(f"cluster up: decode {cluster.endpoints.decode}, prefill {cluster.endpoints.prefill}")
        print(f"\n{'#':>3}  {'prompt':>7}  {'cached':>7}  {'ttft ms':>9}  {'question':<34}  answer")
        with open_channel(cluster.endpoints.decode) as channel:
            for i, question in enumerate(QUESTIONS, 1):
                request = build_request(Prompt(text=question, chat=True, system=SYSTEM_PROMPT,
                                               max_new_tokens=args.max_tokens))
                print(_row(i, question, generate(channel, request, timeout_s=300.0)), flush=True)
        print("\nrequests 2.. reuse the system prompt's blocks from the store "
              "(cached > 0, lower time to first token)")
    return 0
