"""Co-located workers behind one compute gate (``kvrelay.serving.gate``): requests through
both give the monolithic engine's tokens while the workers take turns, and a process that
holds the gate and stops (SIGSTOP) delays a request once, by the bounded wait, never fails
it or hangs it."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kvrelay.cluster import ClusterSpec, LocalCluster
from kvrelay.commands import up
from tests.reliability.conftest import Reference, Spawned, generate, request, spawn
from tests.services.test_compute_gate import hold_in_child
from tests.support.redis_server import RedisServer

PROMPT = "The gate lets one worker at a time use the cores, and the other one waits. " * 3


@pytest.fixture(scope="module")
def gated(redis: RedisServer, tiny_model_dir: Path, log_dir: Path
          ) -> Iterator[tuple[Spawned, Spawned, Path]]:
    gate = log_dir / "compute.gate"
    flags = ("--compute-gate", str(gate), "--compute-gate-wait-s", "1.0")
    prefill = spawn("prefill", tiny_model_dir, redis.url(), log_dir, extra=flags)
    try:
        decode = spawn("decode", tiny_model_dir, redis.url(), log_dir,
                       prefill_addr=prefill.addr, extra=(*flags, "--prefill-threshold-tokens", "16"))
    except BaseException:
        prefill.stop()
        raise
    yield prefill, decode, gate
    decode.stop()
    prefill.stop()


def test_gated_workers_give_the_monolithic_tokens(gated: tuple[Spawned, Spawned, Path],
                                                  reference: Reference) -> None:
    prefill, decode, gate = gated
    ids = reference.tokenizer.encode(PROMPT)
    for salt in ("gate-a", "gate-b"):
        reply = generate(decode, request(PROMPT, salt, max_new_tokens=12))
        assert list(reply.token_ids) == reference.greedy(ids, 12)
    # the prefill worker computed the prompts, decode sampled: both took turns (they opened
    # the gate and its turnstile), none bypassed
    assert prefill.metric("kvrelay_prefill_computed_tokens_total") > 0
    assert gate.exists() and gate.with_name(gate.name + ".turnstile").exists()
    for worker in (prefill, decode):
        assert worker.metric("kvrelay_compute_gate_bypasses_total") == 0


def test_a_stopped_gate_holder_delays_once_and_fails_nothing(
        gated: tuple[Spawned, Spawned, Path], reference: Reference) -> None:
    prefill, decode, gate = gated
    holder = hold_in_child(gate)
    holder.send_signal(signal.SIGSTOP)
    try:
        ids = reference.tokenizer.encode(PROMPT + " stopped")
        started = time.monotonic()
        reply = generate(decode, request(PROMPT + " stopped", "gate-c", max_new_tokens=8),
                         timeout_s=60)
        assert list(reply.token_ids) == reference.greedy(ids, 8)
        # both workers gate their passes: each waited once, then went on without the gate
        assert decode.metric("kvrelay_compute_gate_bypasses_total") >= 1
        assert prefill.metric("kvrelay_compute_gate_bypasses_total") >= 1
        # one bounded wait per worker, not one per step or per pass
        assert time.monotonic() - started < 30
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    # the holder is gone: the workers take turns again
    reply = generate(decode, request(PROMPT + " again", "gate-d", max_new_tokens=4))
    assert len(reply.token_ids) == 4
    assert "compute gate free again" in decode.log()


ALWAYS_WAITING = """
import sys
from kvrelay.serving.gate import ComputeGate
gate = ComputeGate(sys.argv[1])
while True:
    with gate.turn():
        pass
"""


def test_passes_cut_between_layers_give_the_monolithic_tokens(
        redis: RedisServer, tiny_model_dir: Path, log_dir: Path, reference: Reference) -> None:
    """With a slice so short that a pass is cut whenever another process waits, and a
    third process that always waits for the gate (so that every pass of both workers is cut
    between its layers), new prompts computed by prefill while decode steps running requests
    still give the monolithic tokens."""
    gate = log_dir / "sliced.gate"
    flags = ("--compute-gate", str(gate), "--compute-gate-slice-s", "0.000001")
    prefill = spawn("prefill", tiny_model_dir, redis.url(), log_dir, extra=flags)
    try:
        decode = spawn("decode", tiny_model_dir, redis.url(), log_dir, prefill_addr=prefill.addr,
                       extra=(*flags, "--prefill-threshold-tokens", "16"))
    except BaseException:
        prefill.stop()
        raise
    waiter = subprocess.Popen([sys.executable, "-c", ALWAYS_WAITING, str(gate)],
                              cwd=Path(__file__).parents[2])
    try:
        prompts = [f"{PROMPT} Request {i} asks about layer {i * 7}." for i in range(8)]
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = []
            for i, prompt in enumerate(prompts):
                futures.append(pool.submit(generate, decode,
                                           request(prompt, f"sliced-{i}", max_new_tokens=24),
                                           timeout_s=60))
                time.sleep(0.05)  # new prompts arrive while earlier ones decode
            replies = [f.result() for f in futures]
        for prompt, reply in zip(prompts, replies):
            assert list(reply.token_ids) == reference.greedy(reference.tokenizer.encode(prompt), 24)
        for worker in (prefill, decode):
            assert worker.metric("kvrelay_compute_gate_pauses_total") > 0
            assert worker.metric("kvrelay_compute_gate_bypasses_total") == 0
    finally:
        waiter.kill()
        waiter.wait(10)
        decode.stop()
        prefill.stop()


def test_the_local_cluster_gives_its_workers_one_gate(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KVRELAY_COMPUTE_GATE", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    env = LocalCluster(ClusterSpec(model="m"), tmp_path).child_env()
    assert env["KVRELAY_COMPUTE_GATE"] == str(tmp_path / "compute.gate")
    assert "GOMP_SPINCOUNT" not in env  # taking turns, the workers keep OpenMP's long spin
    monkeypatch.setenv("KVRELAY_COMPUTE_GATE", "")  # switched off: the short spin instead
    env = LocalCluster(ClusterSpec(model="m"), tmp_path).child_env()
    assert env["KVRELAY_COMPUTE_GATE"] == ""
    assert env["GOMP_SPINCOUNT"] == str(ClusterSpec(model="m").omp_spin_count)
    monkeypatch.delenv("KVRELAY_COMPUTE_GATE")
    env = LocalCluster(ClusterSpec(model="m", compute_gate=False), tmp_path).child_env()
    assert "KVRELAY_COMPUTE_GATE" not in env


def test_kvrelay_up_takes_turns_unless_told_not_to() -> None:
    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    assert up.cluster_spec(parser.parse_args([]), "m").compute_gate
    assert not up.cluster_spec(parser.parse_args(["--no-compute-gate"]), "m").compute_gate
