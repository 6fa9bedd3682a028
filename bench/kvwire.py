"""What the KV wire format does to the output: ``python -m bench.kvwire [--model PATH]``.

For each prompt, the K/V of its full blocks is computed once on a float32 pool, then, per
wire format, exported as the workers publish it, encoded and decoded by the block codec,
and imported into a fresh sequence as decode would; the last prompt token and NEW_TOKENS
greedy tokens are then computed on top of it. Reported per format: bytes per stored
block, the largest |logit difference| over the next-token logits and how many greedy
continuations are identical, both against the whole prompt prefilled with no store. Default model: SmolLM2-135M when
installed, else the built-in tiny model.
"""

from __future__ import annotations

import argparse

import torch

from cachestore.codec import HEADER_SIZE, decode_block, encode_block
from cachestore.hashing import hash_block_chain
from engine.loader import LoadedModel, load_model
from engine.runner import ModelRunner
from engine.sequence import Sequence
from kvrelay.serving.kvblocks import export_blocks
from kvrelay.serving.runtime import block_spec, set_wire_dtype
from kvrelay.serving.worker_config import KV_WIRE_DTYPES

BLOCK_SIZE = 16
NEW_TOKENS = 32
PROMPTS = (
    ("The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a wooden press adapted from "
    "those used for wine. Within fifty years presses were running in more than two hundred "
    "European cities, and the price of books fell sharply. Explain why this mattered:"),
    ("def merge_sorted(a, b):\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n"
    "    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n"
    "            out.append(a[i])\n            i += 1\n        else:\n"),
    ("A recipe for a simple tomato soup: soften one chopped onion and two cloves of garlic in "
    "olive oil, add a kilogram of ripe tomatoes, a pinch of salt and a little sugar, simmer "
    "for twenty minutes, then blend until smooth. To serve it, you should"),
    ("Photosynthesis converts light energy into chemical energy. In the light-dependent "
    "reactions, water is split and oxygen is released; the energy captured is stored in ATP "
    "and NADPH. The Calvin cycle then uses these to fix carbon dioxide into sugars. In short,"),
)


def _imported(runner: ModelRunner, loaded: LoadedModel, wire_dtype: str, src: Sequence,
              ids: list[int]) -> tuple[Sequence, int]:
    """A new sequence over ``ids`` holding ``src``'s blocks after a trip through the wire
    format and the codec; returns it and the stored value's bytes per block."""
    spec = block_spec(loaded, runner, wire_dtype)
    set_wire_dtype(runner, spec)
    n = len(src.block_table)
    hashes = hash_block_chain(src.token_ids, BLOCK_SIZE, spec.fingerprint, "")
    payloads = []
    for h, block in zip(hashes, export_blocks(runner, src, 0, n)):
        header, data = encode_block(spec, h, block)
        payloads.append(bytes(decode_block(header + bytes(data), spec, h)))
    seq = Sequence(f"wire-{wire_dtype}", list(ids))
    runner.import_blocks(seq, payloads)
    return seq, HEADER_SIZE + spec.payload_nbytes


def _continue(runner: ModelRunner, seq: Sequence) -> tuple[torch.Tensor, list[int]]:
    """Prefill what ``seq`` lacks: next-token logits (V,) and NEW_TOKENS greedy tokens."""
    first = logits = runner.prefill([seq])[0]
    tokens = []
    for _ in range(NEW_TOKENS):
        tokens.append(int(logits.argmax()))
        seq.token_ids.append(tokens[-1])
        logits = runner.decode([seq])[0]
    runner.free(seq)
    return first, tokens


def measure(loaded: LoadedModel) -> dict[str, dict[str, float]]:
    """Per wire format: bytes per block, and against a prefill of the whole prompt with no
    store: max |next-token logit diff| and prompts whose greedy tokens are identical."""
    runner = ModelRunner(loaded, num_blocks=64, block_size=BLOCK_SIZE)
    rows = {w: {"bytes": 0.0, "max_diff": 0.0, "same": 0.0} for w in KV_WIRE_DTYPES}
    for text in PROMPTS:
        ids = loaded.tokenizer.encode(text)
        full = (len(ids) - 1) // BLOCK_SIZE * BLOCK_SIZE
        src = Sequence("src", ids[:full])
        runner.prefill([src])
        base_logits, base_tokens = _continue(runner, Sequence("whole", list(ids)))
        for wire in KV_WIRE_DTYPES:
            seq, rows[wire]["bytes"] = _imported(runner, loaded, wire, src, ids)
            logits, tokens = _continue(runner, seq)
            diff = float((logits - base_logits).abs().max())
            rows[wire]["max_diff"] = max(rows[wire]["max_diff"], diff)
            rows[wire]["same"] += tokens == base_tokens
        runner.free(src)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory or GGUF file")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model)
    rows = measure(loaded)
    print(f"model {loaded.name}, float32 pool, {BLOCK_SIZE}-token blocks, {len(PROMPTS)} "
          f"prompts, {NEW_TOKENS} greedy tokens")
    print(f"{'wire':<10} {'bytes/block':>12} {'max |dlogit|':>13} {'same greedy':>12}")
    for wire, row in rows.items():
        print(f"{wire:<10} {int(row['bytes']):>12} {row['max_diff']:>13.4g} "
              f"{int(row['same']):>7}/{len(PROMPTS)}")


if __name__ == "__main__":
    main()
