"""Chaos run: ``python -m bench.chaos --seconds N [--model PATH] [--json PATH]``.

Starts redis-server, one prefill and one decode worker on 127.0.0.1, drives a shared-prefix
workload (groups of prompts sharing a long system prompt) from client threads, and in turn
kills and restarts Redis, the prefill worker and the decode worker, then pauses Redis
(SIGSTOP/SIGCONT). Every request is accounted for: correct (greedy output equal to the
monolithic engine's, computed once in-process), wrong, or failed with a status code. Prints
the table, writes it as JSON when asked; exits 1 when any output was wrong or any request
unaccounted. Default model: the built-in tiny model (what CI runs).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from engine.engine import LLMEngine
from engine.loader import load_model
from engine.runner import ModelRunner
from engine.sampling import SamplingParams
from engine.tiny import write_tiny_model
from kvrelay.client import open_channel
from kvrelay.cluster import (
    die_with_parent,
    free_port,
    redis_command,
    stop_process,
    wait_for_redis,
    wait_until_serving,
    worker_command,
)
from protos.kvrelay.v1 import generation_pb2 as pb
from protos.kvrelay.v1 import generation_pb2_grpc as pb_grpc

BLOCK_SIZE = 16
MAX_NEW_TOKENS = 8
REQUEST_TIMEOUT_S = 15.0
SYSTEMS = [f"You are assistant number {g} of a travel agency. You answer in one short sentence, "
           f"you never invent prices, and you always mention the office in city {g}. "
           for g in range(4)]
QUESTIONS = ["When do you open?", "How do I book a train?", "Can I change my ticket?",
             "Is breakfast included?", "Where is the office?", "Do you sell maps?"]


@dataclass(frozen=True)
class ChaosConfig:
    """What to run: load duration, client threads, the model (None: the tiny model)."""

    seconds: float = 60.0
    concurrency: int = 4
    model: str | None = None
    hold_s: float = 2.0  # how long each fault lasts before recovery


@dataclass
class Proc:
    """A child process that can be killed, stopped and started again identically."""

    name: str
    cmd: list[str]
    log: Path
    addr: str = ""  # gRPC address of a worker ("" for redis-server)
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(die_with_parent(self.cmd), stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if self.addr:
            wait_until_serving(self.name, self.popen, self.addr, 120.0, lambda _: None, self.log)
        else:
            wait_for_redis(int(self.cmd[self.cmd.index("--port") + 1]), 10.0)

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)
        if sig == signal.SIGKILL:
            self.popen.wait(10)

    def usage(self) -> dict[str, int]:
        """Open file descriptors and resident memory (KiB) of the running process."""
        assert self.popen is not None
        return process_usage(self.popen.pid)


def process_usage(pid: int, samples: int = 1, interval_s: float = 0.2) -> dict[str, int]:
    """Open file descriptors and resident memory (KiB) of process ``pid``. With several
    samples, the fewest fds seen: sockets a client library is still tearing down or
    setting up come and go within a second (a run of this bench saw the count move by 4
    either way), a leak stays."""
    fds = []
    for i in range(samples):
        if i:
            time.sleep(interval_s)
        fds.append(len(os.listdir(f"/proc/{pid}/fd")))
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return {"fds": min(fds), "rss_kib": rss}


@dataclass
class Tally:
    """Every request's outcome; ``sent`` counts before the call, the rest after it."""

    sent: int = 0
    correct: int = 0
    wrong: int = 0
    cached_tokens: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    ok_times: list[tuple[float, float]] = field(default_factory=list)  # (started, ended)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def unaccounted(self) -> int:
        return self.sent - self.correct - self.wrong - sum(self.failed.values())

    def first_ok_after(self, moment: float) -> float | None:
        with self.lock:
            ends = [end for start, end in self.ok_times if start >= moment]
        return min(ends) - moment if ends else None


def references(model_dir: str, prompts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids and the monolithic engine's greedy tokens for each prompt."""
    loaded = load_model(model_dir)
    ids = [loaded.tokenizer.encode(p) for p in prompts]
    engine = LLMEngine(ModelRunner(loaded, num_blocks=512, block_size=BLOCK_SIZE), loaded.tokenizer)
    done = engine.generate(ids, SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
    return ids, [c.token_ids for c in done]


def client(addr: str, prompts: list[str], expected: list[list[int]], tally: Tally,
           stop: threading.Event, offset: int) -> None:
    i = offset
    while not stop.is_set():
        n = i % len(prompts)
        i += 1
        req = pb.GenerateRequest(prompt=prompts[n], sampling=pb.SamplingParams(
            max_new_tokens=MAX_NEW_TOKENS))
        with tally.lock:
            tally.sent += 1
        started = time.monotonic()
        try:
            with open_channel(addr) as channel:
                reply = pb_grpc.GenerationStub(channel).Generate(req, timeout=REQUEST_TIMEOUT_S)
        except grpc.RpcError as err:
            with tally.lock:
                tally.failed[err.code().name] += 1
            time.sleep(0.05)
            continue
        with tally.lock:
            if list(reply.token_ids) == expected[n]:
                tally.correct += 1
                tally.cached_tokens += reply.usage.cached_prompt_tokens
                tally.ok_times.append((started, time.monotonic()))
            else:
                tally.wrong += 1


def faults(redis: Proc, prefill: Proc, decode: Proc) -> list[tuple[str, Callable[[], None],
                                                                   Callable[[], None]]]:
    """(name, inject, recover) for each fault, in order."""
    def kill(proc: Proc) -> Callable[[], None]:
        return lambda: proc.signal(signal.SIGKILL)
    return [("kill+restart redis", kill(redis), redis.start),
            ("kill+restart prefill", kill(prefill), prefill.start),
            ("kill+restart decode", kill(decode), decode.start),
            ("pause redis (SIGSTOP)", lambda: redis.signal(signal.SIGSTOP),
             lambda: redis.signal(signal.SIGCONT))]


def start_cluster(model: str, workdir: Path) -> tuple[Proc, Proc, Proc]:
    redis_port, prefill_port, decode_port = free_port(), free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"

    def worker(role: str, port: int, extra: list[str]) -> Proc:
        cmd = worker_command(role, model=model, port=port, metrics_port=0, redis_url=redis_url,
                             block_size=BLOCK_SIZE)
        cmd += ["--store-timeout-s", "0.3", "--num-blocks", "256", *extra]
        return Proc(role, cmd, workdir / f"{role}.log", f"127.0.0.1:{port}")

    procs = (Proc("redis", redis_command(redis_port, "256mb"), workdir / "redis.log"),
             worker("prefill", prefill_port, []),
             worker("decode", decode_port, ["--prefill-addr", f"127.0.0.1:{prefill_port}",
                                            "--prefill-timeout-s", "3"]))
    try:
        for proc in procs:
            proc.start()
    except BaseException:
        stop_all(procs)
        raise
    return procs


def stop_all(procs: tuple[Proc, ...]) -> None:
    """Stop every started process, last first (a stopped one is woken to die)."""
    for proc in reversed(procs):
        if proc.popen is not None:
            proc.popen.send_signal(signal.SIGCONT)
            stop_process(proc.popen)


def run(config: ChaosConfig) -> dict:
    """Run the chaos schedule; the report as a dict."""
    workdir = Path(tempfile.mkdtemp(prefix="kvrelay-chaos-"))
    model = config.model or str(write_tiny_model(workdir / "tiny-model"))
    prompts = [s + q for s in SYSTEMS for q in QUESTIONS]
    _, expected = references(model, prompts)
    procs = start_cluster(model, workdir)
    redis, prefill, decode = procs
    try:
        start_usage = ({p.name: p.usage() for p in procs}
                       | {"bench": process_usage(os.getpid(), samples=5)})
        tally, stop = Tally(), threading.Event()
        threads = [threading.Thread(target=client, args=(decode.addr, prompts, expected, tally,
                                                         stop, k * 5), daemon=True)
                   for k in range(config.concurrency)]
        for t in threads:
            t.start()
        schedule = faults(redis, prefill, decode)
        phase_s = config.seconds / (len(schedule) + 1)
        recoveries: list[tuple[str, float, float]] = []
        for name, inject, recover in schedule:
            time.sleep(max(0.0, phase_s - config.hold_s))
            inject()
            time.sleep(config.hold_s)
            lifted = time.monotonic()
            recover()
            recoveries.append((name, lifted, time.monotonic() - lifted))
        time.sleep(phase_s)
        stop.set()
        for t in threads:
            t.join(REQUEST_TIMEOUT_S + 5)
        end_usage = ({p.name: p.usage() for p in procs}
                     | {"bench": process_usage(os.getpid(), samples=5)})
    finally:
        stop_all(procs)
    return {
        "seconds": config.seconds, "concurrency": config.concurrency, "sent": tally.sent,
        "correct": tally.correct, "wrong": tally.wrong, "failed": dict(tally.failed),
        "unaccounted": tally.unaccounted, "cached_prompt_tokens": tally.cached_tokens,
        "recovery": [{"fault": name, "restart_s": round(took, 2),
                      "first_ok_s": _rounded(tally.first_ok_after(lifted))}
                     for name, lifted, took in recoveries],
        "usage_start": start_usage, "usage_end": end_usage}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def render(report: dict) -> str:
    lines = [f"requests sent        {report['sent']}",
             f"correct              {report['correct']}",
             f"wrong outputs        {report['wrong']}",
             f"unaccounted          {report['unaccounted']}",
             f"cached prompt tokens {report['cached_prompt_tokens']}"]
    lines += [f"failed {code:<13} {n}" for code, n in sorted(report["failed"].items())]
    lines += ["", f"{'fault':<24}{'restart s':>10}{'first ok s':>12}"]
    lines += [f"{r['fault']:<24}{r['restart_s']:>10}{r['first_ok_s']!s:>12}"
              for r in report["recovery"]]
    lines += ["", f"{'process':<10}{'fds start':>10}{'fds end':>9}{'RSS MiB start':>15}{'RSS MiB end':>13}"]
    for name, start in report["usage_start"].items():
        end = report["usage_end"][name]
        lines.append(f"{name:<10}{start['fds']:>10}{end['fds']:>9}"
                     f"{start['rss_kib'] / 1024:>15.1f}{end['rss_kib'] / 1024:>13.1f}")
    lines.append("(workers that were killed and restarted are new processes at the end)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads")
    parser.add_argument("--model", default=None, help="model directory (default: tiny model)")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    report = run(ChaosConfig(args.seconds, args.concurrency, args.model))
    print(render(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if report["wrong"] or report["unaccounted"] else 0


if __name__ == "__main__":
    sys.exit(main())
