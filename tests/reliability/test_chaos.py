"""RELIABILITY.md section G, chaos: ``bench.chaos`` for 20 s with the tiny model. Redis, the
prefill worker and the decode worker are killed and restarted in turn, and Redis is paused;
every request must end correct or with a status, never wrong."""

from __future__ import annotations

from pathlib import Path

from bench.chaos import ChaosConfig, render, run


def test_a_bounded_chaos_run_accounts_for_every_request_and_returns_no_wrong_output(
        tiny_model_dir: Path) -> None:
    report = run(ChaosConfig(seconds=20, concurrency=3, model=str(tiny_model_dir)))
    print("\n" + render(report))
    assert report["wrong"] == 0
    assert report["unaccounted"] == 0
    assert report["correct"] > 0 and report["cached_prompt_tokens"] > 0
    assert set(report["failed"]) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    assert all(r["first_ok_s"] is not None for r in report["recovery"])
    assert report["usage_end"]["bench"]["fds"] <= report["usage_start"]["bench"]["fds"] + 4
