"""``kvrelay run``: generate in-process with no services, the monolithic reference."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

BLOCK_SIZE = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt text (a user turn with --chat)")
    parser.add_argument("--model", default=None,
                        help="model directory or .gguf file (default: the demo model)")
    parser.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--chat", action="store_true", help="render with the chat template")
    parser.add_argument("--no-cache", action="store_true",
                        help="keep no KV cache: recompute the whole sequence every step")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object with text, token ids and timings")


def main(args: argparse.Namespace) -> int:
    import torch

    from engine.engine import LLMEngine
    from engine.loader import ModelLoadError, load_model
    from engine.runner import ModelRunner
    from engine.sampling import InvalidRequest, SamplingParams
    from engine.sequence import Sequence

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    started = time.perf_counter()
    try:
        loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    except (ModelLoadError, ValueError) as e:
        print(f"kvrelay run: {e}", file=sys.stderr)
        return 2
    tokenizer = loaded.tokenizer
    text = args.prompt
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    # A rendered chat template already holds its special tokens.
    prompt_ids = tokenizer.encode(text, add_special_tokens=not args.chat)
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature,
                            seed=args.seed)
    blocks = -(-(len(prompt_ids) + max(args.max_tokens, 0)) // BLOCK_SIZE) + 1
    runner = ModelRunner(loaded, num_blocks=blocks, block_size=BLOCK_SIZE,
                         use_cache=not args.no_cache)
    engine = LLMEngine(runner, tokenizer)
    seq = Sequence("run", prompt_ids, params)
    try:
        engine.add(seq)
    except InvalidRequest as e:
        print(f"kvrelay run: invalid {e.field}: {e.message}", file=sys.stderr)
        return 2
    loaded_at = time.perf_counter()
    pieces: list[str] = []
    first_at: float | None = None
    while engine.has_unfinished:
        for out in engine.step():
            first_at = first_at or time.perf_counter()
            pieces.append(out.text)
            if not args.json:
                sys.stdout.write(out.text)
                sys.stdout.flush()
    done = time.perf_counter()
    first_at = first_at or done
    decode_s = done - first_at
    timings = {"load_s": loaded_at - started, "time_to_first_token_s": first_at - loaded_at,
               "decode_s": decode_s,
               "decode_tok_s": max(seq.num_generated - 1, 0) / decode_s if decode_s > 0 else 0.0}
    if args.json:
        print(json.dumps({"model": loaded.name, "text": "".join(pieces),
                          "token_ids": seq.output_ids, "finish_reason": seq.finish_reason,
                          "prompt_tokens": len(prompt_ids), "timings": timings}))
    else:
        print(f"\n[{seq.finish_reason}: {seq.num_generated} tokens, prompt {len(prompt_ids)}, "
              f"ttft {timings['time_to_first_token_s'] * 1000:.0f} ms]", file=sys.stderr)
    return 0
