"""Routes only; the logic is in gateway.serving."""

from __future__ import annotations

import importlib.metadata
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Header, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from gateway import metrics, tgi
from gateway.batches import UPLOAD_PATH
from gateway.embeddings import EmbeddingRequest
from gateway.errors import APIError
from gateway.lora_adapters import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from gateway.protocol import (
    BatchCreateRequest,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from gateway.responses import ResponsesRequest
from gateway.serving import Served

router = APIRouter()
VERSION = importlib.metadata.version("llmfleet")


def _completions(request: Request):
    return request.app.state.completions


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ping")
async def sagemaker_ping() -> dict:
    """SageMaker's health check (as vLLM and TGI answer it)."""
    return {}


@router.get("/version")
async def version() -> dict:
    """vLLM's."""
    return {"version": VERSION}


@router.get("/info")
async def tgi_info(request: Request) -> dict:
    return tgi.info(request.app.state.settings, VERSION)


@router.get("/ready")
async def ready(request: Request):
    try:
        await request.app.state.redis.ping()
    except Exception as error:  # any failure to reach Redis means we cannot serve
        raise APIError(503, f"Redis is not reachable: {type(error).__name__}.", code="not_ready") from None
    return {"status": "ready"}


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
    body = await metrics.render(request.app.state.settings, _completions(request).queue)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _model_card(request: Request, model: str, served: Served) -> dict:
    """OpenAI's model object for a name a request may give (an alias's `root` the configured name), with vLLM's
    `max_model_len` (clients size their prompts by it)."""
    started = int(request.app.state.started)
    card = {"id": model, "object": "model", "created": started, "owned_by": "llmfleet", "root": served.name}
    if served.adapter is not None:  # as vLLM lists an adapter: its directory, and the model it adapts
        root = served.source.path if served.source else str(served.spec.lora_modules[served.adapter])
        card = {**card, "root": root, "parent": served.name}
    return {**card, "max_model_len": served.spec.max_context}


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    completions, settings = _completions(request), request.app.state.settings
    cards = [_model_card(request, name, await completions.served(name)) for name in settings.served_names()]
    loaded = await completions.runtime_adapters.listed()
    cards += [_model_card(request, name, Served.runtime(settings, name, source)) for name, source in loaded.items()]
    return {"object": "list", "data": cards}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict:
    return _model_card(request, model, await _completions(request).served(model))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return await _completions(request).create("chat", body, request)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    return await _completions(request).create("text", body, request)


@router.post("/v1/embeddings")
async def create_embeddings(body: EmbeddingRequest, request: Request):
    return await _completions(request).embed(body, request)


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request):
    return await _completions(request).respond(body, request)


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request) -> dict:
    return await _completions(request).stored.response(response_id, _owner(request))


@router.get("/v1/responses/{response_id}/input_items")
async def list_response_input_items(
    response_id: str,
    request: Request,
    after: Annotated[str | None, Query(max_length=256)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
) -> dict:
    return await _completions(request).stored.input_items(response_id, _owner(request), after, limit, order)


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> dict:
    return await _completions(request).stored.delete(response_id, _owner(request))


@router.post("/generate")
async def tgi_generate(request: Request, body: Any = Body(...)):
    return await _completions(request).generate(body, request, stream=False)


@router.post("/generate_stream")
async def tgi_generate_stream(request: Request, body: Any = Body(...)):
    return await _completions(request).generate(body, request, stream=True)


@router.post("/")
async def tgi_compat(request: Request, body: Any = Body(...)):
    return await _completions(request).generate(body, request, stream=None)


@router.post("/invocations")
async def sagemaker_invocations(request: Request, body: Any = Body(...)):
    return await _completions(request).invoke(body, request)


@router.post("/tokenize")
@router.post("/v1/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    return await _completions(request).tokenize(body)


@router.post("/detokenize")
@router.post("/v1/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    return await _completions(request).detokenize(body)


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> str:
    """vLLM's, as it serves it with VLLM_ALLOW_RUNTIME_LORA_UPDATING (gateway.lora_adapters)."""
    _admin_only(request)
    return await _completions(request).runtime_adapters.load(body)


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> str:
    _admin_only(request)
    return await _completions(request).runtime_adapters.unload(body)


def _admin_only(request: Request) -> None:
    """Only an admin key changes what the fleet serves (anyone, in open mode)."""
    key = getattr(request.state, "api_key", None)
    if key is not None and not key.admin:
        message = "Only an admin API key (`llmfleet keys create --admin`) may load or unload LoRA adapters."
        raise APIError(403, message, code="permission_denied")


def _owner(request: Request) -> str | None:
    """The API key id that authentication set (None in open mode): jobs, files and batches belong to it."""
    return getattr(request.state, "key_id", None)


@router.post("/v1/jobs", status_code=202)
async def submit_job(
    request: Request,
    body: dict = Body(...),
    idempotency_key: str | None = Header(default=None, max_length=255),
):
    job = await request.app.state.jobs.submit(
        body, getattr(request.state, "api_key", None), idempotency_key, request.headers
    )
    return JSONResponse(job, status_code=202, headers={"Location": f"/v1/jobs/{job['id']}"})


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> dict:
    return await request.app.state.jobs.get(job_id, _owner(request))


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request) -> dict:
    return await request.app.state.jobs.cancel(job_id, _owner(request))


@router.post(UPLOAD_PATH)
async def upload_file(request: Request) -> dict:
    try:
        form = await request.form()
    except Exception:  # malformed multipart body: the client's fault
        raise APIError(400, "The body must be multipart/form-data.", code="invalid_value") from None
    return await request.app.state.batches.upload(form.get("file"), form.get("purpose"), _owner(request))


@router.get("/v1/files")
async def list_files(
    request: Request,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
) -> dict:
    """The caller's files, newest first (OpenAI's cursor: `after` a file id)."""
    return await request.app.state.batches.list_files(_owner(request), purpose, after, limit)


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request) -> dict:
    return await request.app.state.batches.delete_file(file_id, _owner(request))


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, request: Request) -> dict:
    return await request.app.state.batches.file(file_id, _owner(request))


@router.get("/v1/files/{file_id}/content")
async def get_file_content(file_id: str, request: Request) -> Response:
    content = await request.app.state.batches.file_content(file_id, _owner(request))
    return Response(content, media_type="application/jsonl")


@router.post("/v1/batches")
async def create_batch(body: BatchCreateRequest, request: Request) -> dict:
    return await request.app.state.batches.create(body, _owner(request))


@router.get("/v1/batches")
async def list_batches(
    request: Request, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> dict:
    """The caller's batches, newest first (OpenAI's cursor: `after` a batch id)."""
    return await request.app.state.batches.list_batches(_owner(request), after, limit)


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, request: Request) -> dict:
    return await request.app.state.batches.get(batch_id, _owner(request))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request) -> dict:
    return await request.app.state.batches.cancel(batch_id, _owner(request))
