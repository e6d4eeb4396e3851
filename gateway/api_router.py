"""Routes only; the logic is in gateway.serving."""

from __future__ import annotations

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse

from gateway.errors import APIError
from gateway.protocol import ChatCompletionRequest, CompletionRequest

router = APIRouter()


def _completions(request: Request):
    return request.app.state.completions


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    try:
        await request.app.state.redis.ping()
    except Exception as error:  # any failure to reach Redis means we cannot serve
        raise APIError(503, f"Redis is not reachable: {type(error).__name__}.", code="not_ready") from None
    return {"status": "ready"}


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    settings = request.app.state.settings
    created = int(request.app.state.started)
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "llmfleet"} for name in settings.models
        ],
    }


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return await _completions(request).create("chat", body, request)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    return await _completions(request).create("text", body, request)


@router.post("/v1/jobs", status_code=202)
async def submit_job(request: Request, body: dict = Body(...)):
    job = await request.app.state.jobs.submit(body, request.state.api_key)
    return JSONResponse(job, status_code=202, headers={"Location": f"/v1/jobs/{job['id']}"})


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> dict:
    return await request.app.state.jobs.get(job_id, request.state.key_id)


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request) -> dict:
    return await request.app.state.jobs.cancel(job_id, request.state.key_id)
