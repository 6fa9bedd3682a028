"""The in-process commands: ``kvrelay run`` (the monolithic reference) and ``kvrelay kv-size``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROMPT = "The quick brown fox jumps over the lazy dog and"


def _kvrelay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvrelay", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_run_json_matches_transformers_greedy(tiny_model_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    import torch

    out = _kvrelay("run", "--model", str(tiny_model_dir), "--max-tokens", "12", "--json", PROMPT)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) >= {"text", "token_ids", "timings"}

    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir,
                                                              dtype=torch.float32)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    ref = model.generate(ids, max_new_tokens=12, do_sample=False,
                         pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    # kvrelay may stop early on an eos id; what it produced must be transformers' prefix.
    assert result["token_ids"] and result["token_ids"] == ref[:len(result["token_ids"])]
    assert result["text"] == tok.decode(result["token_ids"], skip_special_tokens=True)


def test_run_rejects_a_missing_model_with_a_clear_error(tmp_path: Path) -> None:
    out = _kvrelay("run", "--model", str(tmp_path / "nowhere"), PROMPT)
    assert out.returncode == 2
    assert "nowhere" in out.stderr and "Traceback" not in out.stderr


def test_kv_size_is_two_x_layers_x_kv_heads_x_head_dim_x_bytes(tiny_model_dir: Path) -> None:
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    for dtype, elem in (("float32", 4), ("bf16", 2)):
        out = _kvrelay("kv-size", "--model", str(tiny_model_dir), "--dtype", dtype,
                       "--tokens", "1000")
        assert out.returncode == 0, out.stderr
        per_token = 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * elem
        assert f"= {per_token:,} B" in out.stdout
        assert f"1,000 tokens: {per_token * 1000:,} B" in out.stdout
