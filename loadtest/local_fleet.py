"""Starts a throw-away local fleet (`llmfleet up` on free ports, its own Redis and state dir) for one benchmark
variant, so a single loadtest invocation can compare settings side by side."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def local_fleet(workers: int = 1, env: dict[str, str] | None = None, log: Path | None = None):
    """Yields (the gateway's /v1 base URL, the `llmfleet up` process) of a fresh fleet; stops it (Ctrl-C
    semantics) on exit."""
    port, redis_port = free_port(), free_port()
    state = tempfile.mkdtemp(prefix="llmfleet-bench-")
    child_env = {
        **os.environ,
        "LLMFLEET_GATEWAY_PORT": str(port),
        "LLMFLEET_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        **(env or {}),
    }
    out = open(log or os.devnull, "w")
    argv = [sys.executable, "-m", "llmfleet.cli", "up", "--workers", str(workers), "--state-dir", state]
    process = subprocess.Popen(argv, env=child_env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, process, workers)
        yield f"{base}/v1", process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        out.close()


def _wait_ready(base: str, process: subprocess.Popen, workers: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llmfleet up exited with {process.returncode}")
        try:
            httpx.get(f"{base}/health", timeout=1).raise_for_status()
            models = httpx.get(f"{base}/v1/models", timeout=5).json()["data"]
            probe = {"model": models[0]["id"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
            if httpx.post(f"{base}/v1/chat/completions", json=probe, timeout=60).status_code == 200:
                time.sleep(2 * workers)  # let every worker heartbeat and warm up, not only the first
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError("local fleet did not become ready")
