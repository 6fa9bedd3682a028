"""The compute gate: co-located workers take turns at forward passes, fairly, and a worker
that holds the gate for too long (stopped, hung or dead) never blocks the other."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvrelay.serving.gate import ComputeGate, NoGate, open_gate

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(600)
"""


def hold_in_child(path: Path) -> subprocess.Popen[str]:
    """Another process that takes the gate and keeps it."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


def test_turns_exclude_each_other(tmp_path: Path) -> None:
    path = str(tmp_path / "gate")
    a, b = ComputeGate(path), ComputeGate(path)  # separate open files: as two processes
    inside = 0
    most = 0
    lock = threading.Lock()

    def work(gate: ComputeGate) -> None:
        nonlocal inside, most
        for _ in range(30):
            with gate.turn() as held:
                assert held
                with lock:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0.001)
                with lock:
                    inside -= 1

    threads = [threading.Thread(target=work, args=(g,)) for g in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert most == 1
    assert a.turns == b.turns == 30 and a.bypasses == b.bypasses == 0
    a.close()
    b.close()


BUSY_LOOP = """
import os, sys, time
from kvrelay.serving.gate import ComputeGate
gate = ComputeGate(sys.argv[1])
while True:
    with gate.turn():
        time.sleep(0.02)
        os.write(1, b"t")  # one byte per turn, written while it still holds the gate
"""


def test_a_waiting_worker_gets_the_next_turn(tmp_path: Path) -> None:
    """A worker that re-takes the gate at once queues behind one already waiting (the
    turnstile), so two busy workers alternate."""
    path = tmp_path / "gate"
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(path)], stdout=subprocess.PIPE,
                            cwd=Path(__file__).parents[2])
    assert busy.stdout is not None
    out = busy.stdout.fileno()
    other = ComputeGate(str(path), max_wait_s=5.0)
    try:
        assert os.read(out, 1) == b"t"  # the loop is running
        os.set_blocking(out, False)
        between = []
        for _ in range(10):
            with other.turn() as held:
                assert held
                try:
                    between.append(len(os.read(out, 1000)))
                except BlockingIOError:
                    between.append(0)
                time.sleep(0.02)  # a pass of its own
        assert other.bypasses == 0
        # Strict alternation: one turn of the loop before each of ours. With a single
        # lock the loop kept the gate for 19-39 turns before the first of ours, then ours
        # re-took it at once and the loop got none between them.
        assert between[0] <= 2 and all(n == 1 for n in between[1:]), between
    finally:
        busy.kill()
        busy.wait(10)
        other.close()


def test_a_gate_held_too_long_is_bypassed_until_free(tmp_path: Path) -> None:
    path = tmp_path / "gate"
    bypassed: list[int] = []
    waits: list[float] = []
    gate = ComputeGate(str(path), max_wait_s=0.3, on_wait=waits.append,
                       on_bypass=lambda: bypassed.append(1))
    holder = hold_in_child(path)
    try:
        started = time.monotonic()
        with gate.turn() as held:
            assert not held
        assert 0.25 <= time.monotonic() - started < 5
        # bypassing: no wait at all while the holder keeps it
        started = time.monotonic()
        for _ in range(3):
            with gate.turn() as held:
                assert not held
        assert time.monotonic() - started < 0.1
        assert gate.bypasses == 1 and bypassed == [1]
    finally:
        holder.kill()
        holder.wait(10)
    with gate.turn() as held:  # free again: turns as before
        assert held
    assert gate.turns == 1 and len(waits) == 0  # the retaken turn did not wait
    gate.close()


def test_a_stopped_holder_costs_one_bounded_wait_and_a_dead_one_nothing(tmp_path: Path) -> None:
    path = tmp_path / "gate"
    holder = hold_in_child(path)
    os.kill(holder.pid, signal.SIGSTOP)
    gate = ComputeGate(str(path), max_wait_s=0.2)
    try:
        with gate.turn() as held:
            assert not held
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    started = time.monotonic()
    with gate.turn() as held:  # the kernel dropped the dead holder's lock
        assert held
    assert time.monotonic() - started < 0.1
    gate.close()


def test_no_path_is_no_gate(tmp_path: Path) -> None:
    gate = open_gate("")
    assert isinstance(gate, NoGate)
    with gate.turn() as held:
        assert held
    assert isinstance(open_gate(str(tmp_path / "g")), ComputeGate)
    with pytest.raises(ValueError):
        ComputeGate(str(tmp_path / "g"), max_wait_s=0)


def _long_pass(gate: ComputeGate, layers: int, log: list[str], inside: list[int],
               started: threading.Event) -> None:
    """A pass of ``layers`` 10 ms layers in one turn, with a pause point between them."""
    with gate.turn() as held:
        assert held
        started.set()
        for i in range(layers):
            inside.append(1)
            assert len(inside) == 1  # nobody else inside while this layer runs
            time.sleep(0.01)
            log.append(f"layer {i}")
            inside.pop()
            if i < layers - 1:
                gate.pause_point()


def _short_turn(gate: ComputeGate, log: list[str], inside: list[int]) -> None:
    with gate.turn() as held:
        assert held
        inside.append(1)
        assert len(inside) == 1
        log.append("step")
        inside.pop()


@pytest.mark.parametrize("slice_s", [0.03, 0.0])
def test_a_long_pass_lets_a_waiting_worker_in_between_its_layers(tmp_path: Path,
                                                                 slice_s: float) -> None:
    path = str(tmp_path / "gate")
    pauses: list[int] = []
    long = ComputeGate(path, slice_s=slice_s, on_pause=lambda: pauses.append(1))
    short = ComputeGate(path)  # its own open file: as another process
    log: list[str] = []
    inside: list[int] = []
    started = threading.Event()
    a = threading.Thread(target=_long_pass, args=(long, 20, log, inside, started))
    a.start()
    assert started.wait(10)
    time.sleep(0.005)  # the step asks for a turn during the pass's first layer
    _short_turn(short, log, inside)
    a.join(10)
    assert len(log) == 21 and not inside
    if slice_s:
        # cut once the pass had held the gate for a slice (3 layers of 10 ms), not at once
        # and not at the end
        assert 3 <= log.index("step") <= 6, log
        assert long.pauses == len(pauses) == 1
    else:
        assert log[-1] == "step" and long.pauses == 0  # 0: a pass is never cut
    assert long.turns == 2 if slice_s else long.turns == 1
    long.close()
    short.close()


def test_a_pass_with_nobody_waiting_keeps_the_gate(tmp_path: Path) -> None:
    path = str(tmp_path / "gate")
    gate = ComputeGate(path, slice_s=0.001)
    with gate.turn():
        time.sleep(0.005)
        gate.pause_point()
        gate.pause_point()
        # still held: another process cannot take it
        other = ComputeGate(path, max_wait_s=0.05)
        with other.turn() as held:
            assert not held
        other.close()
    assert gate.pauses == 0
    gate.pause_point()  # outside a turn: nothing to hand over
    assert gate.pauses == 0
    gate.close()


def test_only_the_thread_in_the_turn_can_pause_it(tmp_path: Path) -> None:
    path = str(tmp_path / "gate")
    gate = ComputeGate(path, slice_s=0.001)
    waiter = ComputeGate(path, max_wait_s=2.0)
    got: list[bool] = []

    def wait_for_a_turn() -> None:
        with waiter.turn() as held:
            got.append(held)

    with gate.turn():
        t = threading.Thread(target=wait_for_a_turn)
        t.start()
        time.sleep(0.05)  # the waiter now holds the turnstile
        other = threading.Thread(target=gate.pause_point)  # another thread of this process
        other.start()
        other.join(5)
        assert gate.pauses == 0 and not got  # not handed over from outside the turn
    t.join(5)
    assert got == [True]
    waiter.close()
    gate.close()
