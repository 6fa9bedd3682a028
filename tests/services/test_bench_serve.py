"""``bench.serve`` end to end with the tiny model and a tiny workload: its JSON holds every
figure, sane (no timing targets here: the benchmark prints those)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FIGURES = ("ttft_long_cold_s", "ttft_long_warm_s", "ttft_long_monolithic_s", "output_tok_s",
           "output_tok_s_no_store", "output_tok_s_hf", "ttft_p50_s", "ttft_p99_s",
           "itl_p50_s", "itl_p99_s", "requests_s", "kv_bytes_fetched", "kv_fetch_bytes_s")
WORKLOAD = ["--groups", "2", "--per-group", "3", "--system-tokens", "48", "--question-tokens",
            "8", "--output-tokens", "4", "--concurrency", "4", "--long-tokens", "128",
            "--long-cached-tokens", "96"]


def test_the_serving_benchmark_reports_every_figure_and_matches_its_peers(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    subprocess.run([sys.executable, "-m", "bench.serve", "--model", str(tiny_model_dir),
                    *WORKLOAD, "--log-dir", str(tmp_path), "--json", str(out), "--plot", str(png)],
                   check=True, timeout=240)
    report = json.loads(out.read_text())
    fig = report["figures"]
    assert all(fig[key] > 0 for key in FIGURES)
    assert fig["ttft_p50_s"] <= fig["ttft_p99_s"] and fig["itl_p50_s"] <= fig["itl_p99_s"]
    # 6 prompts of 56 tokens: the 2 cold ones find nothing; the 4 warm ones their 48 shared
    assert fig["hit_rate"] == 4 * 48 / (6 * 56)
    assert fig["long_warm_cached_tokens"] == 96
    assert fig["outputs_equal_no_store"] == 1.0 and fig["outputs_equal_hf"] == 1.0
    assert set(fig["peak_rss_bytes"]) == {"prefill", "decode", "decode_no_store"}
    assert all(rss > 0 for rss in fig["peak_rss_bytes"].values())
    assert report["model"] and report["dtype"] == "float32" and report["device"] == "cpu"
    assert report["workload"]["concurrency"] == 4 and len(report["requests"]) == 6
    assert png.stat().st_size > 0
