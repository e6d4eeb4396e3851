"""OpenAI's embeddings through the gateway, Redis and the worker: each input's last-token hidden state after the
final norm, L2-normalised, as transformers' forward gives it; float or base64, through the openai client."""

from __future__ import annotations

import asyncio
import base64
import struct

import pytest
import torch

from loadtest import embeddings as embeddings_benchmark
from tests.conftest import MODEL
from tests.test_validation import assert_openai_error, post

TEXTS = ["The cat sat on the mat.", "Stock markets fell sharply on Monday."]


def forward_embedding(loaded_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        hidden = loaded_model.model.model(torch.tensor([ids])).last_hidden_state[0, -1].float()
    return torch.nn.functional.normalize(hidden, dim=0)


def test_an_embedding_is_the_models_last_hidden_state_normalised(http, loaded_model):
    response = http.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS})
    assert response.headers["x-request-id"]  # accepted, queued and logged as chat and completions are
    reply = response.json()
    assert reply["object"] == "list" and [d["index"] for d in reply["data"]] == [0, 1]
    ids = [http.post("/tokenize", json={"model": MODEL, "prompt": text}).json()["tokens"] for text in TEXTS]
    assert reply["usage"] == {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}
    for data, prompt in zip(reply["data"], ids):
        vector = torch.tensor(data["embedding"])
        assert vector.shape == (loaded_model.model.config.hidden_size,)
        assert abs(vector.norm().item() - 1) < 1e-4
        # The worker's kernels against transformers' forward over the same 4-bit weights, both in bf16.
        assert torch.dot(vector, forward_embedding(loaded_model, prompt)) > 0.99
    by_ids = http.post("/v1/embeddings", json={"model": MODEL, "input": ids}).json()
    assert torch.allclose(torch.tensor(by_ids["data"][1]["embedding"]), torch.tensor(reply["data"][1]["embedding"]))


def test_the_openai_client_gets_them_as_base64_floats(client, http):
    # The client asks for base64 and decodes it; the float form is the same numbers.
    vectors = [d.embedding for d in client.embeddings.create(model=MODEL, input=TEXTS).data]
    floats = http.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS}).json()["data"]
    for vector, data in zip(vectors, floats, strict=True):
        assert torch.allclose(torch.tensor(vector), torch.tensor(data["embedding"]))
    raw = http.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS[0], "encoding_format": "base64"}).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(packed) // 4}f", packed)) == pytest.approx(floats[0]["embedding"], abs=1e-6)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": "hi", "dimensions": 64}, 400, "dimensions"),
        ({"input": ""}, 400, "input"),
        ({"input": []}, 400, "input"),
        ({"input": [10**9]}, 400, "input"),
        ({"input": "hi " * 9000}, 400, "input"),
        ({"input": "hi", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": "hi", "model": "nope"}, 404, "model"),
    ],
)
def test_embedding_requests_that_cannot_be_served_get_openai_errors(http, body, status, param):
    assert_openai_error(post(http, {"model": MODEL, **body}, "/v1/embeddings"), status, param)


def test_the_benchmark_times_the_gateway_and_its_baseline_on_the_same_texts(gateway_url, api_key):
    inputs = embeddings_benchmark.texts(6, seed=0)
    ours = asyncio.run(embeddings_benchmark.through_gateway(f"{gateway_url}/v1", MODEL, inputs, 3, 2, api_key=api_key))
    theirs = embeddings_benchmark.InProcess(MODEL).run(inputs, 3)
    assert ours[0] > 0 and theirs[0] > 0 and len(ours[2]) == len(theirs[2]) == 6
    assert embeddings_benchmark.agreement(ours[2], theirs[2]) > 0.99  # padding on the left changes nothing much
