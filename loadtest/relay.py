"""Relay capacity of one gateway process: Redis + one gateway + the synthetic worker (no model) on free loopback
ports; streaming clients at each concurrency count the tokens that come through, and the gateway's and the
client's CPU use says which side was the bottleneck (a process near 100% of a core is saturated). The clients read
the SSE by hand (loadtest.workload.stream_one_raw): through the openai client, the client took 0.9 of a core and
capped the figure at 4,800-6,600 tok/s with the gateway at 0.25-0.33 (Zen 4, loadtest/RESULTS-HISTORY.md)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from llmfleet.supervisor import http_ok, port_open, redis_command, wait_until
from loadtest.local_fleet import free_port
from loadtest.servers import Server
from loadtest.stats import Summary
from loadtest.workload import run_chat


@contextmanager
def relay_fleet(model: str, step_ms: float) -> Iterator[tuple[Server, psutil.Process]]:
    """Yields (the gateway as a Server, the gateway process)."""
    port, redis_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    state = Path(tempfile.mkdtemp(prefix="llmfleet-relay-"))
    # Loopback only and no API keys, as `llmfleet up` runs it.
    env = {**os.environ, "LLMFLEET_REDIS_URL": redis_url, "LLMFLEET_GATEWAY_PORT": str(port),
           "LLMFLEET_LOG_LEVEL": "WARNING", "LLMFLEET_PROTECTION__AUTH": "open"}  # fmt: skip
    children: list[subprocess.Popen] = []
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    try:
        children.append(subprocess.Popen(redis_command(redis_url, state), env=env, **quiet))
        wait_until(lambda: port_open("127.0.0.1", redis_port), 10, "redis-server")
        gateway = subprocess.Popen([sys.executable, "-m", "gateway"], env=env, **quiet)
        children.append(gateway)
        argv = [sys.executable, "-m", "loadtest.synthetic_worker", "--model", model, "--step-ms", str(step_ms)]
        children.append(subprocess.Popen(argv, env=env, **quiet))
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 60, "the gateway")
        yield Server("gateway + synthetic worker", f"http://127.0.0.1:{port}/v1", model), psutil.Process(gateway.pid)
    finally:
        for child in reversed(children):  # Redis last
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def run_relay(model: str, concurrency: list[int], requests_per_user: int, max_tokens: int, step_ms: float):
    summaries: list[Summary] = []
    with relay_fleet(model, step_ms) as (server, gateway):
        # The gateway answers /health before the synthetic worker's first heartbeat: wait for a live worker.
        wait_until(lambda: _probe(server), 60, "the synthetic worker")
        client = psutil.Process()
        for c in concurrency:
            gateway_cpu, client_cpu, started = _cpu_s(gateway), _cpu_s(client), time.perf_counter()
            summary = asyncio.run(run_chat(server, c, c * requests_per_user, max_tokens, True, 0, raw=True))
            wall = time.perf_counter() - started
            summary.workload = "relay"
            summary.extra["gateway_cpu_share"] = round((_cpu_s(gateway) - gateway_cpu) / wall, 2)
            summary.extra["client_cpu_share"] = round((_cpu_s(client) - client_cpu) / wall, 2)
            summary.extra["gateway_rss_mib"] = round(gateway.memory_info().rss / 2**20)
            summary.extra["step_ms"] = step_ms
            summaries.append(summary)
    return summaries


def _probe(server: Server) -> bool:
    summary = asyncio.run(run_chat(server, 1, 1, 2, True, 0))
    return summary.errors == 0
