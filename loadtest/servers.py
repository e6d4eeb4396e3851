"""The servers a benchmark runs against, one at a time: an llmfleet (already running, or a throw-away local fleet
per variant) and the peer `transformers serve`. Each says how to force the output length, since the peer answers
422 to `ignore_eos` and takes a `generation_config` JSON string instead (eos_token_id -1 = no EOS)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from loadtest.local_fleet import free_port, local_fleet
from shared.settings import Settings

PEERS = {"transformers-serve": "bf16", "transformers-serve-gptq": "gptq"}


def llmfleet_forced(max_tokens: int) -> dict:
    return {"ignore_eos": True}


def transformers_forced(max_tokens: int) -> dict:
    config = {"max_new_tokens": max_tokens, "eos_token_id": -1, "do_sample": False}
    return {"generation_config": json.dumps(config)}


@dataclass
class Server:
    label: str
    base_url: str
    model: str
    """The model name requests must carry."""
    forced: Callable[[int], dict] = llmfleet_forced
    """Extra request body that forces exactly max_tokens output tokens."""
    peer: bool = False
    batches_api: bool = True
    """Whether it has llmfleet's /v1/batches (the peer has not: batch load goes as plain non-streaming requests)."""
    serving_processes: Callable[[], list[psutil.Process]] = field(default=lambda: [])
    """The processes holding the model, whose RSS is recorded (none for a server we did not start)."""
    priorities: bool = False
    """Whether requests may carry `priority` (llmfleet with scheduling_policy "priority")."""


@contextmanager
def running(url: str, model: str) -> Iterator[Server]:
    yield Server("llmfleet (running service)", url, model)


@contextmanager
def llmfleet(variant: str, workers: int, env: dict[str, str], model: str, log: Path | None = None) -> Iterator[Server]:
    with local_fleet(workers, env, log) as (url, process):
        label = f"llmfleet {variant}" + (f" x{workers}" if workers > 1 else "")
        priorities = env.get("LLMFLEET_SCHEDULING_POLICY") == "priority"
        yield Server(label, url, model, serving_processes=lambda: _workers_of(process.pid), priorities=priorities)


def _workers_of(pid: int) -> list[psutil.Process]:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            argv = child.cmdline()
        except psutil.Error:
            continue
        if "worker" in argv and "-m" in argv and "--prepare-only" not in argv:
            found.append(child)
    return found


@contextmanager
def transformers_serve(peer: str, model: str, extra_args: str = "", log: Path | None = None) -> Iterator[Server]:
    """`transformers serve DIR --continuous-batching --dtype bfloat16 --device cpu` (cuda where there is one) on a free
    loopback port, ready once /health answers (its /v1/models scans the hub cache and may answer 500). DIR: the model's
    configured path, else its bf16 or 4-bit directory as the peer says."""
    import torch

    settings = Settings()
    weights = PEERS[peer]
    spec = settings.models[model]
    model_dir = str(spec.path or (settings.dense_model_dir(model) if weights == "bf16" else settings.model_dir(model)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    port = free_port()
    argv = [sys.executable, "-m", "transformers.cli.transformers", "serve", model_dir, "--continuous-batching",
            "--dtype", "bfloat16", "--device", device, "--host", "127.0.0.1", "--port", str(port),
            *shlex.split(extra_args)]  # fmt: skip
    # gptqmodel refuses to import on a 2-core machine without this (STACK-NOTES); loading a GPTQ directory
    # imports torch's cpp_extension, whose setuptools otherwise asserts over the stdlib distutils already loaded.
    env = {"GPTQMODEL_CPU_WORKERS": str(max(2, os.cpu_count() or 2)), "SETUPTOOLS_USE_DISTUTILS": "stdlib"}
    env.update(os.environ)
    out = open(log or os.devnull, "w")
    process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, process)
        label = f"transformers serve {weights}"
        alive = lambda: [psutil.Process(process.pid)] if process.poll() is None else []  # noqa: E731
        yield Server(label, f"{base}/v1", model_dir, transformers_forced, peer=True, batches_api=False,
                     serving_processes=alive)  # fmt: skip
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        out.close()


def _wait_healthy(base: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"transformers serve exited with {process.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError("transformers serve did not become healthy")
