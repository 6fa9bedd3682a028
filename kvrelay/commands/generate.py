"""``kvrelay generate``: send one request to a decode worker and stream the answer."""

from __future__ import annotations

import argparse
import json
import sys

import grpc
from google.protobuf import json_format

from kvrelay.client import Prompt, build_request, generate, generate_stream, open_channel
from kvrelay.serving.auth import read_token, with_api_key
from protos.kvrelay.v1 import generation_pb2 as pb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt text (a user turn with --chat)")
    parser.add_argument("--addr", default="127.0.0.1:50051", help="decode worker HOST:PORT")
    parser.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--salt", default="", help="cache salt (tenant isolation)")
    parser.add_argument("--chat", action="store_true", help="render with the chat template")
    parser.add_argument("--json", action="store_true", help="print the final response as JSON")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    parser.add_argument("--tls-ca", default="", help="PEM CA bundle: connect over TLS")
    parser.add_argument("--api-key-file", default="", help="file holding this caller's API key")


def _summary(usage: pb.Usage, timings: pb.Timings, reason: int) -> str:
    return (f"[{pb.FinishReason.Name(reason)}: {usage.completion_tokens} tokens, "
            f"prompt {usage.prompt_tokens} ({usage.cached_prompt_tokens} cached), "
            f"ttft {timings.time_to_first_token_ms:.1f} ms]")


def _as_json(reply: pb.GenerateResponse) -> dict[str, object]:
    """The proto3 JSON form, with token ids as numbers (proto3 JSON writes int64 as strings)."""
    data = json_format.MessageToDict(reply, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
    data["token_ids"] = list(reply.token_ids)
    return data


def _stream(channel: grpc.Channel, request: pb.GenerateRequest, timeout: float) -> None:
    last = pb.GenerateStreamResponse()
    for last in generate_stream(channel, request, timeout):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(_summary(last.usage, last.timings, last.finish_reason), file=sys.stderr)


def main(args: argparse.Namespace) -> int:
    request = build_request(Prompt(text=args.prompt, chat=args.chat, max_new_tokens=args.max_tokens,
                                   temperature=args.temperature, seed=args.seed,
                                   cache_salt=args.salt))
    with open_channel(args.addr, args.tls_ca) as plain:
        channel = with_api_key(plain, read_token(args.api_key_file)) if args.api_key_file else plain
        try:
            if args.json:
                reply = generate(channel, request, args.timeout)
                print(json.dumps(_as_json(reply)))
            else:
                _stream(channel, request, args.timeout)
        except grpc.RpcError as err:
            print(f"kvrelay generate: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    return 0
