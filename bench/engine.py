"""Engine throughput beside HuggingFace transformers: ``python -m bench.engine [--json PATH]``.

A SmolLM2-135M-shaped Llama (random weights, fp32, CPU) is built once in transformers and
its state dict loaded into kvrelay, so both run the same weights in the same process.
Prefill: one forward of an N-token prompt (transformers computes only the last logits).
Decode: B prompts of PROMPT_TOKENS tokens generating NEW_TOKENS greedy tokens each
(transformers: ``generate`` with its KV cache, default attention); tok/s counts generated
tokens and ms/step is a whole generation's time (its prefill included) over NEW_TOKENS.
Each case runs kvrelay and transformers alternately and keeps each one's best time, so
both see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers

from engine.config import ModelConfig
from engine.engine import LLMEngine
from engine.model import build_model
from engine.runner import ModelRunner
from engine.sampling import SamplingParams
from engine.sequence import Sequence

VOCAB = 49152
SMOLLM2_135M: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": None,
    "pad_token_id": None}
PREFILL_TOKENS = (128, 512, 2048)
DECODE_BATCHES = (1, 8, 16)
PROMPT_TOKENS = 32
NEW_TOKENS = 64
BLOCK_SIZE = 16
DECODE_REPEATS = 3
"""Timed generations per decode case and side, alternating, best kept: a batch-16 step of
either side varied by 30% or more between runs on a quiet 2-core machine, so each side
gets more chances to run through a quiet spell."""


def _best_seconds(ours: Callable[[], object], theirs: Callable[[], object],
                  repeats: int) -> tuple[float, float]:
    """Best wall time of each, the two alternating so both see the same machine load."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, sink in zip((ours, theirs), times):
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def _models() -> tuple[Any, ModelRunner]:
    config = transformers.LlamaConfig(**SMOLLM2_135M)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    model = build_model(ModelConfig.from_hf(config.to_dict()))
    model.load_state_dict(hf.state_dict())
    tokens = max(PREFILL_TOKENS[-1], max(DECODE_BATCHES) * (PROMPT_TOKENS + NEW_TOKENS))
    blocks = tokens // BLOCK_SIZE + max(DECODE_BATCHES)
    runner = ModelRunner((model.config, model), num_blocks=blocks, block_size=BLOCK_SIZE)
    return hf, runner


def _prompt(batch: int, tokens: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(tokens)
    return torch.randint(0, VOCAB, (batch, tokens), generator=g)


def bench_prefill(hf: Any, runner: ModelRunner, tokens: int) -> dict[str, float]:
    ids = _prompt(1, tokens)
    repeats = 3 if tokens <= 512 else 2

    def ours() -> None:
        seq = Sequence("bench", ids[0].tolist())
        runner.prefill([seq])
        runner.free(seq)

    def theirs() -> None:
        with torch.inference_mode():
            hf(ids, logits_to_keep=1)

    ours()  # warm-up
    theirs()
    t_ours, t_theirs = _best_seconds(ours, theirs, repeats)
    return {"tokens": tokens, "kvrelay_tok_s": tokens / t_ours, "hf_tok_s": tokens / t_theirs}


def bench_decode(hf: Any, runner: ModelRunner, batch: int) -> dict[str, float]:
    ids = _prompt(batch, PROMPT_TOKENS)
    engine = LLMEngine(runner)

    def ours(new_tokens: int = NEW_TOKENS) -> None:
        engine.generate(ids.tolist(), SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))

    def theirs(new_tokens: int = NEW_TOKENS) -> None:
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, use_cache=True)

    ours(2)  # warm-up
    theirs(2)
    t_ours, t_theirs = _best_seconds(ours, theirs, DECODE_REPEATS)
    generated = batch * NEW_TOKENS
    return {"batch": batch, "kvrelay_tok_s": generated / t_ours, "hf_tok_s": generated / t_theirs,
            "kvrelay_ms_per_step": 1e3 * t_ours / NEW_TOKENS,
            "hf_ms_per_step": 1e3 * t_theirs / NEW_TOKENS}


def _table(results: dict[str, list[dict[str, float]]]) -> str:
    lines = [(f"{'case':<22}{'kvrelay tok/s':>15}{'HF tok/s':>12}{'ratio':>8}"
              f"{'kvrelay ms/step':>17}{'HF ms/step':>12}")]
    for kind, key in (("prefill", "tokens"), ("decode", "batch")):
        for row in results[kind]:
            name = f"{kind} {key}={int(row[key])}"
            ratio = row["kvrelay_tok_s"] / row["hf_tok_s"]
            steps = (f"{row['kvrelay_ms_per_step']:>17.1f}{row['hf_ms_per_step']:>12.1f}"
                     if kind == "decode" else "")
            lines.append(f"{name:<22}{row['kvrelay_tok_s']:>15.1f}{row['hf_tok_s']:>12.1f}"
                         f"{ratio:>7.2f}x{steps}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads (default: the cores this process may use)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hf, runner = _models()
    results = {"prefill": [bench_prefill(hf, runner, n) for n in PREFILL_TOKENS],
               "decode": [bench_decode(hf, runner, b) for b in DECODE_BATCHES]}
    print(f"SmolLM2-135M shape, fp32, {args.threads} threads, torch {torch.__version__}")
    print(_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
