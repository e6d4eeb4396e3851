"""Runs the whole service on one machine without containers: Redis (own port, own data dir, AOF on), the
gateway, N workers and the arq job layer (python -m jobs) as child processes. Children that die are restarted;
Ctrl-C stops everything cleanly."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from shared.settings import Settings

RESTART_BACKOFF_S = 2.0


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    """Added to the supervisor's environment for this child only."""
    process: subprocess.Popen | None = None
    restarts: int = 0
    started: float = field(default=0.0)

    def start(self, env: dict[str, str]) -> None:
        # Own session: a terminal's Ctrl-C reaches only the supervisor, which stops children in order.
        self.process = subprocess.Popen(self.argv, env={**env, **self.env}, start_new_session=True)
        self.started = time.time()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def redis_command(url: str, data_dir: Path, appendfsync: str = "everysec") -> list[str] | None:
    """The redis-server command line for a local Redis we own, or None if the URL points at one already up."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    if port_open(host, port):
        return None
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"Redis at {url} is not reachable, and it is not local: start it first.")
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH (Debian: apt-get install redis-server).")
    data_dir.mkdir(parents=True, exist_ok=True)
    return [
        binary, "--port", str(port), "--bind", host, "--dir", str(data_dir),
        "--appendonly", "yes", "--appendfsync", appendfsync, "--save", "", "--daemonize", "no",
        "--logfile", str(data_dir / "redis.log"),
    ]  # fmt: skip


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            return reply.status == 200
    except OSError:
        return False


class Supervisor:
    def __init__(self, settings: Settings, workers: int, state_dir: Path, auth: str = "open"):
        self.settings = settings
        self.auth = auth
        self.workers = workers
        self.state_dir = state_dir.resolve()
        self.children: list[Child] = []
        self._stopping = False

    def _thread_share(self, local_workers: int) -> dict[str, str]:
        """Workers on one machine share its cores: each computing on all of them would oversubscribe the CPU
        (two workers on 2 cores, 2 threads each, served 12 tok/s where one worker served 130)."""
        if self.settings.torch_threads or local_workers < 2:
            return {}
        return {"LLMFLEET_TORCH_THREADS": str(max(1, (os.cpu_count() or 1) // local_workers))}

    def run(self) -> int:
        env = {**os.environ, "LLMFLEET_PROTECTION__AUTH": self.auth}
        python = sys.executable
        redis_argv = redis_command(self.settings.redis_url, self.state_dir / "redis", self.settings.redis_appendfsync)
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        try:
            if redis_argv:
                redis = Child("redis", redis_argv)
                redis.start(env)
                self.children.append(redis)
                parsed = urlparse(self.settings.redis_url)
                wait_until(lambda: port_open(parsed.hostname, parsed.port), 10, "redis-server")
            for model in self.settings.models:
                print(f"preparing model {model} (first run only: convert + quantize, a few minutes)…", flush=True)
                subprocess.run([python, "-m", "worker", "--model", model, "--prepare-only"], env=env, check=True)
            services = [Child("gateway", [python, "-m", "gateway"]), Child("jobs", [python, "-m", "jobs"])]
            port = self.settings.worker_http_port - 1
            local_workers = len(self.settings.models) * self.workers
            for i, model in enumerate(m for m in self.settings.models for _ in range(self.workers)):
                # Each worker's own /metrics, /health and /ready port: the next free one from worker_http_port.
                port = next(p for p in range(port + 1, 65536) if not port_open(self.settings.worker_http_host, p))
                extra = {"LLMFLEET_WORKER_HTTP_PORT": str(port), **self._thread_share(local_workers)}
                services.append(Child(f"worker-{i}", [python, "-m", "worker", "--model", model], extra))
            for child in services:
                self.children.append(child)
                child.start(env)
            base = f"http://{self.settings.gateway_host}:{self.settings.gateway_port}"
            wait_until(lambda: http_ok(f"{base}/health"), 60, "the gateway")
            print(f"llmfleet is up: {base}/v1  (models: {', '.join(self.settings.models)}; Ctrl-C stops)", flush=True)
            for child in self.children:
                if "LLMFLEET_WORKER_HTTP_PORT" in child.env:
                    port = child.env["LLMFLEET_WORKER_HTTP_PORT"]
                    print(f"  {child.name}: http://127.0.0.1:{port}/metrics", flush=True)
            if self.auth == "open":
                print("auth: OPEN, no API key needed (local development only; `--auth keys` requires keys)", flush=True)
            else:
                print("auth: API keys required (create one with `llmfleet keys create --name NAME`)", flush=True)
            self._watch(env)
        finally:
            self._stop_all()
        return 0

    def _request_stop(self, *_) -> None:
        self._stopping = True

    def _watch(self, env: dict[str, str]) -> None:
        while not self._stopping:
            for child in self.children:
                if child.alive() or self._stopping:
                    continue
                if child.name == "redis":
                    raise SystemExit("redis-server exited")
                if child.process.returncode == os.EX_CONFIG:
                    raise SystemExit(f"{child.name} cannot serve its model: its log above says why")
                if time.time() - child.started < RESTART_BACKOFF_S:
                    continue
                child.restarts += 1
                print(f"{child.name} exited ({child.process.returncode}); restarting", flush=True)
                child.start(env)
            time.sleep(0.5)

    def _stop_all(self) -> None:
        # Workers and gateway first (they drain), Redis last so their final writes land.
        for group in ([c for c in self.children if c.name != "redis"], [c for c in self.children if c.name == "redis"]):
            for child in group:
                if child.alive():
                    child.process.send_signal(signal.SIGTERM)
            for child in group:
                if child.process is not None:
                    try:
                        child.process.wait(timeout=self.settings.delivery.drain_grace_s + 10)
                    except subprocess.TimeoutExpired:
                        child.process.kill()
