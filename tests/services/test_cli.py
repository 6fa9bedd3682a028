"""``kvrelay up`` starts a local cluster that ``kvrelay generate`` talks to; SIGTERM stops it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from kvrelay.cluster import free_port
from kvrelay.healthcheck import is_serving


def _read_until(proc: subprocess.Popen[str], marker: str, timeout_s: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if marker in line:
            return lines
    raise AssertionError(f"no {marker!r} from kvrelay up:\n" + "\n".join(lines))


def _kvrelay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvrelay", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_up_then_generate(tiny_model_dir: Path) -> None:
    port = free_port()
    addr = f"127.0.0.1:{port}"
    up = subprocess.Popen([sys.executable, "-m", "kvrelay", "up", "--model", str(tiny_model_dir),
                           "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    try:
        lines = _read_until(up, "cluster is up", timeout_s=120)
        assert any(line.startswith("decode") and addr in line for line in lines)
        assert any(line.startswith("redis") and "redis://127.0.0.1:" in line for line in lines)

        as_json = _kvrelay("generate", "--addr", addr, "--json", "--max-tokens", "5", "Hello there")
        assert as_json.returncode == 0, as_json.stderr
        reply = json.loads(as_json.stdout)
        assert len(reply["token_ids"]) == reply["usage"]["completion_tokens"] <= 5
        assert all(isinstance(t, int) for t in reply["token_ids"])
        assert set(reply["timings"]) == {"queue_ms", "prefill_ms", "kv_fetch_ms",
                                         "time_to_first_token_ms", "decode_ms"}
        assert reply["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")

        streamed = _kvrelay("generate", "--addr", addr, "--max-tokens", "5", "--chat", "Hello")
        assert streamed.returncode == 0, streamed.stderr
        assert "tokens, prompt" in streamed.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
    assert not is_serving(addr, timeout_s=1.0)


def test_generate_reports_an_unreachable_worker() -> None:
    result = _kvrelay("generate", "--addr", f"127.0.0.1:{free_port()}", "--timeout", "2", "Hi")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr or "DEADLINE_EXCEEDED" in result.stderr


def test_a_killed_up_leaves_no_workers_behind(tiny_model_dir: Path) -> None:
    port = free_port()
    up = subprocess.Popen([sys.executable, "-m", "kvrelay", "up", "--model", str(tiny_model_dir),
                           "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    try:
        _read_until(up, "cluster is up", timeout_s=120)
        assert is_serving(f"127.0.0.1:{port}")
    finally:
        up.kill()
        up.wait(timeout=10)
    deadline = time.monotonic() + 20
    while is_serving(f"127.0.0.1:{port}", timeout_s=1.0):
        assert time.monotonic() < deadline, "the decode worker outlived kvrelay up"
        time.sleep(0.2)


def test_demo_shows_the_shared_system_prompt_coming_from_the_store(tiny_model_dir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "kvrelay", "demo", "--model", str(tiny_model_dir),
                             "--max-tokens", "4"], capture_output=True, text=True, timeout=180,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines()
            if line.strip()[:1].isdigit() and len(line.split()) >= 4]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    cached = [int(r[2]) for r in rows]
    assert cached[0] == 0 and all(c > 0 for c in cached[1:])


def test_healthcheck_fails_when_nothing_serves() -> None:
    result = subprocess.run([sys.executable, "-m", "kvrelay.healthcheck", "--addr",
                             f"127.0.0.1:{free_port()}", "--timeout", "1"],
                            capture_output=True, timeout=60, check=False)
    assert result.returncode == 1


def test_co_located_workers_get_a_short_openmp_spin_unless_the_environment_chooses(
        monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from kvrelay.cluster import ClusterSpec, worker_env

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    default = ClusterSpec(model="m").omp_spin_count
    assert default is not None and worker_env(default)["GOMP_SPINCOUNT"] == str(default)
    assert "GOMP_SPINCOUNT" not in worker_env(None)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert "GOMP_SPINCOUNT" not in worker_env(default)
    monkeypatch.setenv("GOMP_SPINCOUNT", "77")
    assert worker_env(default)["GOMP_SPINCOUNT"] == "77"
