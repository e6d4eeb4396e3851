"""Real processes for the tests: a redis-server of our own on a free port, workers and gateways as
subprocesses, exactly as `llmfleet up` runs them. Never touches the machine's own Redis on 6379."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from shared import keys


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout: float, what: str, interval: float = 0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class RedisServer:
    data_dir: Path
    port: int = field(default_factory=free_port)
    appendfsync: str = "everysec"
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", self.appendfsync,
                "--save", "", "--logfile", str(self.data_dir / "redis.log")]  # fmt: skip
        self.process = subprocess.Popen(argv)
        client = self.client()
        wait_until(lambda: _pings(client), 10, "redis-server")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL: what was written within the fsync window may be lost."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@dataclass
class Proc:
    process: subprocess.Popen
    log: Path
    url: str | None = None
    worker_id: str | None = None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class Fleet:
    """Starts and tracks the processes of one test fleet; everything is stopped by close()."""

    def __init__(self, redis_server: RedisServer, log_dir: Path, **env: str):
        self.redis_server = redis_server
        self.log_dir = log_dir
        # Gateways run open (no API keys) unless a fleet asks for keys: tests of other parts need no credentials.
        self.env = {
            **os.environ,
            "LLMFLEET_REDIS_URL": redis_server.url,
            "PYTHONUNBUFFERED": "1",
            "LLMFLEET_PROTECTION__AUTH": "open",
            **env,
        }
        self.procs: list[Proc] = []

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        log = self.log_dir / f"{name}-{len(self.procs)}.log"
        handle = open(log, "w")
        process = subprocess.Popen(argv, env=env, stdout=handle, stderr=subprocess.STDOUT)
        proc = Proc(process, log)
        self.procs.append(proc)
        return proc

    def worker(self, model: str, wait: bool = True, http: bool = False, **env: str) -> Proc:
        worker_id = f"test-worker-{len(self.procs)}-{os.getpid()}"
        port = free_port()
        env = {"LLMFLEET_WORKER_HTTP_PORT": str(port), **env}
        proc = self._spawn(
            "worker", [sys.executable, "-m", "worker", "--model", model, "--id", worker_id], {**self.env, **env}
        )
        proc.worker_id = worker_id
        proc.url = f"http://127.0.0.1:{port}"  # /metrics, /health, /ready
        if wait:
            client = self.redis_server.client()
            wait_until(
                lambda: client.zscore(keys.live_workers(model), worker_id) or _died(proc), 180, f"worker {worker_id}"
            )
            _raise_if_died(proc)
        return proc

    def gateway(self, **env: str) -> Proc:
        port = free_port()
        proc = self._spawn("gateway", [sys.executable, "-m", "gateway", "--port", str(port)], {**self.env, **env})
        proc.url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _healthy(proc.url) or _died(proc), 120, "gateway")
        _raise_if_died(proc)
        return proc

    def jobs_worker(self, wait: bool = True, **env: str) -> Proc:
        """An arq process of the job layer (python -m jobs)."""
        proc = self._spawn("jobs", [sys.executable, "-m", "jobs"], {**self.env, **env})
        if wait:
            client = self.redis_server.client()
            wait_until(lambda: client.exists(f"{keys.ARQ_QUEUE}:health-check") or _died(proc), 60, "the arq worker")
            _raise_if_died(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(signal.SIGKILL if proc.process.poll() is None else signal.SIGTERM, timeout=10)


def create_api_key(redis_server: RedisServer, name: str = "tests", rpm: int = 1_000_000, tpm: int = 1_000_000_000,
                   max_concurrency: int = 1000, admin: bool = False) -> str:  # fmt: skip
    """A new API key, made the way an operator makes one: `llmfleet keys create`."""
    argv = [sys.executable, "-m", "llmfleet.cli", "keys", "create", "--name", name, "--rpm", str(rpm),
            "--tpm", str(tpm), "--max-concurrency", str(max_concurrency), "--json"]  # fmt: skip
    argv += ["--admin"] if admin else []
    env = {**os.environ, "LLMFLEET_REDIS_URL": redis_server.url}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, timeout=60)
    return json.loads(done.stdout)["key"]


def _died(proc: Proc) -> bool:
    return proc.process.poll() is not None


def _raise_if_died(proc: Proc) -> None:
    if _died(proc):
        raise RuntimeError(f"process exited early ({proc.process.returncode}); log:\n{proc.log.read_text()[-4000:]}")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
