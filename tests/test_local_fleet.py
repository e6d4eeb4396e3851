"""`llmfleet up --workers 3`: the supervisor's workers share the queue, each reports its own counters on its
own port, and when one stops the others go on serving."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest

from llmfleet.supervisor import Child, Supervisor
from shared.settings import Settings
from tests.conftest import MODEL
from tests.fleet import free_port, wait_until
from tests.test_metrics import samples, value

WORKERS = 3


def free_port_run(n: int) -> int:
    """A port p with p .. p+n-1 all free (llmfleet up gives worker i the port worker_http_port + i)."""
    for _ in range(50):
        base = free_port()
        if all(_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no run of free ports")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def served(url: str) -> float:
    return value(samples(url), "llmfleet:request_success_total", model_name=MODEL)


@pytest.fixture
def local_fleet(model_dir, tmp_path):
    base = free_port_run(WORKERS)
    gateway_port = free_port()
    env = {
        **os.environ,
        "LLMFLEET_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "LLMFLEET_GATEWAY_PORT": str(gateway_port),
        "LLMFLEET_WORKER_HTTP_PORT": str(base),
        "LLMFLEET_BATCH__MAX_RUNNING": "8",  # 60 requests cannot all fit one worker
    }
    log = open(tmp_path / "llmfleet-up.log", "w")
    cmd = [sys.executable, "-m", "llmfleet.cli", "up", "--workers", str(WORKERS), "--state-dir", str(tmp_path)]
    supervisor = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    workers = [f"http://127.0.0.1:{base + i}" for i in range(WORKERS)]
    try:
        wait_until(lambda: all(_ready(w) for w in workers) or supervisor.poll() is not None, 300, "3 ready workers")
        assert supervisor.poll() is None, (tmp_path / "llmfleet-up.log").read_text()[-3000:]
        yield supervisor, f"http://127.0.0.1:{gateway_port}", workers
    finally:
        supervisor.send_signal(signal.SIGTERM)
        try:
            supervisor.wait(timeout=60)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(supervisor.pid).children(recursive=True):
                child.kill()
            supervisor.kill()
        log.close()


def send(gateway: str, n: int) -> list[str]:
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=120)

    def one(i: int) -> str:
        reply = client.completions.create(model=MODEL, prompt=f"Count to {i}:", max_tokens=3, temperature=0)
        return reply.choices[0].finish_reason

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_three_workers_share_60_concurrent_requests_and_two_serve_on_when_one_stops(local_fleet):
    supervisor, gateway, workers = local_fleet
    # Local workers share the cores instead of each computing on all of them.
    worker_processes = [p for p in psutil.Process(supervisor.pid).children() if "worker" in p.cmdline()]
    share = str(max(1, (os.cpu_count() or 1) // WORKERS))
    assert [p.environ().get("LLMFLEET_TORCH_THREADS") for p in worker_processes] == [share] * WORKERS
    assert set(send(gateway, 60)) <= {"length", "stop"}
    per_worker = [served(w) for w in workers]
    assert sum(per_worker) == 60 and all(n > 0 for n in per_worker), per_worker

    stopped = workers[0]
    port = stopped.rsplit(":", 1)[1]
    process = next(
        p
        for p in psutil.Process(supervisor.pid).children()
        if "worker" in p.cmdline() and p.environ().get("LLMFLEET_WORKER_HTTP_PORT") == port
    )
    process.send_signal(signal.SIGTERM)  # a graceful stop: the supervisor will restart it, which takes a while
    process.wait(timeout=60)
    before = [served(w) for w in workers[1:]]
    assert set(send(gateway, 12)) <= {"length", "stop"}
    assert sum(served(w) for w in workers[1:]) - sum(before) >= 1


def test_the_supervisor_stops_rather_than_restart_a_worker_that_cannot_serve_its_model(tmp_path):
    supervisor = Supervisor(Settings(), workers=1, state_dir=tmp_path)
    worker = Child("worker-0", [sys.executable, "-c", f"raise SystemExit({os.EX_CONFIG})"])
    worker.start(dict(os.environ))
    worker.process.wait()
    supervisor.children.append(worker)
    with pytest.raises(SystemExit, match="worker-0 cannot serve its model"):
        supervisor._watch(dict(os.environ))
