from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest

from shared.settings import DEFAULT_MODEL, Settings
from tests.fleet import Fleet, RedisServer, create_api_key

MODEL = DEFAULT_MODEL
FRANCE_QUESTION = "What is the capital of France? Answer in one sentence."
"""Asked bare, the question is a near tie for this model between "The capital …" and "L'Étoile …" (first-token logits
one bf16 step apart), which rounding decides differently from CPU to CPU; with this wording the margin is 13 steps."""


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings()


@pytest.fixture(scope="session")
def model_dir(settings: Settings):
    """The default model, built once into the shared cache (minutes the first time, then instant)."""
    subprocess.run([sys.executable, "-m", "worker", "--prepare-only", "--model", MODEL], check=True)
    return settings.model_dir(MODEL)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fleet(redis_server, model_dir, tmp_path_factory):
    """One worker and two gateway replicas on one Redis, shared by the tests that only send requests. API keys
    are required (the default), as in production."""
    fleet = Fleet(redis_server, tmp_path_factory.mktemp("logs"), LLMFLEET_PROTECTION__AUTH="keys")
    fleet.worker(MODEL)
    fleet.gateway()
    fleet.gateway()
    yield fleet
    fleet.close()


@pytest.fixture(scope="session")
def gateway_url(fleet) -> str:
    return fleet.procs[1].url


@pytest.fixture(scope="session")
def second_gateway_url(fleet) -> str:
    return fleet.procs[2].url


PARKED = "parked"
"""A second model name in `strict_gateway` (same files as MODEL) that no worker serves unless a test fakes one."""
ALIAS = "gpt-4o-mini"
"""Another name of MODEL in `strict_gateway` (vLLM's --served-model-name)."""
DENIED = r"open\s+sesame"
ALLOWED_ORIGIN = "https://chat.example.com"
STRICT_MAX_BODY_BYTES = 65536
STRICT_MAX_FILE_BYTES = 4 * STRICT_MAX_BODY_BYTES


@pytest.fixture(scope="session")
def strict_gateway(fleet, model_dir) -> str:
    """A third gateway on the shared Redis with tight bounds: a deny-list, small body and file limits, one CORS origin,
    at most 8 output tokens (so fuzzed requests are quick for the worker), and the model PARKED whose queue bound is
    2, and MODEL also named ALIAS."""
    models = {MODEL: {"aliases": [ALIAS]}, PARKED: {"path": str(model_dir), "max_queue_depth": 2}}
    proc = fleet.gateway(
        LLMFLEET_MODELS=json.dumps(models),
        LLMFLEET_PROTECTION__DENY_PATTERNS=json.dumps([DENIED]),
        LLMFLEET_PROTECTION__MAX_BODY_BYTES=str(STRICT_MAX_BODY_BYTES),
        LLMFLEET_JOBS__MAX_FILE_BYTES=str(STRICT_MAX_FILE_BYTES),
        LLMFLEET_PROTECTION__CORS_ORIGINS=json.dumps([ALLOWED_ORIGIN]),
        LLMFLEET_MAX_OUTPUT_TOKENS="8",
        LLMFLEET_DEFAULT_MAX_TOKENS="4",
    )
    return proc.url


@pytest.fixture(scope="session")
def api_key(fleet) -> str:
    """A key with limits no test reaches, created through `llmfleet keys create`."""
    return create_api_key(fleet.redis_server)


@pytest.fixture(scope="session")
def auth_headers(api_key) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


@pytest.fixture(scope="session")
def client(gateway_url, api_key) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(gateway_url, auth_headers):
    """Raw HTTP to the first gateway, authenticated."""
    with httpx.Client(base_url=gateway_url, headers=auth_headers, timeout=60) as session:
        yield session


@pytest.fixture(scope="session")
def loaded_model(settings, model_dir):
    """The default model loaded in this process, for tests of the worker's parts."""
    import torch

    from worker import model_loader

    model_loader.configure_torch(settings)
    return model_loader.load(model_dir, settings.models[MODEL], torch.device("cpu"))
