"""LoRA adapters loaded while the fleet runs: vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter (which it
serves with VLLM_ALLOW_RUNTIME_LORA_UPDATING), for the models that set `runtime_lora_dir`.

The registry is one Redis hash (keys.lora_adapters): adapter name -> its AdapterSource. A request that names an
adapter carries its source, and each worker loads it on the first request that needs it (worker.lora.Adapters), so
no worker is told anything and a worker started later serves it as well. A load is answered once a worker has served
a one-token request through the adapter: one that does not load is refused with that worker's reason, and never
listed."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Annotated

from pydantic import Field

from gateway.errors import APIError, failure
from gateway.protocol import _Strict
from gateway.queue_client import QueueClient
from shared import keys
from shared.protocol import AdapterSource, FinalResult, InferenceRequest, SamplingParams, new_request_id
from shared.settings import Settings

AdapterName = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^\S+$")]


class LoadLoRAAdapterRequest(_Strict):
    lora_name: AdapterName
    lora_path: Annotated[str, Field(min_length=1, max_length=4096)]
    """The adapter's directory as the workers see it: under the model's runtime_lora_dir, or relative to it."""
    load_inplace: bool = False
    """vLLM's: replace an adapter already loaded under this name (requests that follow get the new one)."""
    model: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    """The model it adapts (its name or an alias); needed only where several models take adapters at runtime."""


class UnloadLoRAAdapterRequest(_Strict):
    lora_name: AdapterName
    lora_int_id: int | None = None
    """vLLM's; adapters are known by name here."""


def _invalid(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


class RuntimeAdapters:
    def __init__(self, settings: Settings, queue: QueueClient):
        self.settings, self.queue = settings, queue
        self.taking = [name for name, spec in settings.models.items() if spec.runtime_lora_dir is not None]
        """The models that take adapters at runtime."""
        self.enabled = bool(self.taking)

    async def source(self, name: str) -> AdapterSource | None:
        """The runtime adapter of that name, if one is loaded."""
        entry = await self.queue.redis.hget(keys.lora_adapters(), name) if self.enabled else None
        return self._taken(entry) if entry is not None else None

    async def listed(self) -> dict[str, AdapterSource]:
        entries = await self.queue.redis.hgetall(keys.lora_adapters()) if self.enabled else {}
        taken = {name: self._taken(entry) for name, entry in sorted(entries.items())}
        return {name: source for name, source in taken.items() if source is not None}

    def _taken(self, entry: str) -> AdapterSource | None:
        """A registry entry, unless its model no longer takes runtime adapters (the settings changed since)."""
        source = AdapterSource.model_validate_json(entry)
        return source if source.model in self.taking else None

    async def load(self, body: LoadLoRAAdapterRequest) -> str:
        model = self._model(body.model)
        if body.lora_name in self.settings.served_names():
            raise _invalid(f"'{body.lora_name}' already names a model, an alias or a configured adapter.", "lora_name")
        root = self.settings.models[model].runtime_lora_dir
        path = os.path.normpath(root / body.lora_path)  # an absolute lora_path stands for itself
        if not Path(path).is_relative_to(os.path.normpath(root)):
            raise _invalid(f"'lora_path' must lie under the model's runtime_lora_dir ({root}).", "lora_path")
        source = AdapterSource(model=model, path=path, revision=uuid.uuid4().hex)
        registry, entry = self.queue.redis, source.model_dump_json()
        if body.load_inplace:
            replaced = await registry.hget(keys.lora_adapters(), body.lora_name)
            await registry.hset(keys.lora_adapters(), body.lora_name, entry)
        elif await registry.hsetnx(keys.lora_adapters(), body.lora_name, entry):
            replaced = None
        else:
            raise _invalid(f"The lora adapter '{body.lora_name}' has already been loaded.", "lora_name")
        try:
            final = await self._served_through(body.lora_name, source)
        except BaseException:
            await self._restore(body.lora_name, replaced)
            raise
        if not final.completed:
            await self._restore(body.lora_name, replaced)
            if final.finish_reason != "error":  # expired, say: no word on the adapter itself
                raise failure(final)
            raise _invalid(f"The lora adapter '{body.lora_name}' did not load: {final.error}", "lora_path")
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    async def unload(self, body: UnloadLoRAAdapterRequest) -> str:
        if not self.enabled:
            raise _off()
        if not await self.queue.redis.hdel(keys.lora_adapters(), body.lora_name):
            raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.", param="lora_name")
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    def _model(self, named: str | None) -> str:
        """The configured model a load names, or the only one that takes adapters at runtime."""
        if not self.enabled:
            raise _off()
        if named is None:
            if len(self.taking) > 1:
                raise _invalid(f"Name the model the adapter adapts: {', '.join(self.taking)} take adapters.", "model")
            return self.taking[0]
        model = self.settings.served_names().get(named)
        if model is None or named in self.settings.models[model].lora_modules:
            raise APIError(404, f"The model '{named}' does not exist.", param="model", code="model_not_found")
        if model not in self.taking:
            raise _invalid(f"The model '{named}' takes no adapters at runtime: it sets no runtime_lora_dir.", "model")
        return model

    async def _served_through(self, name: str, source: AdapterSource) -> FinalResult:
        """The end of a one-token request through the adapter (a worker loads it for that)."""
        now = time.time()
        probe = InferenceRequest(
            id=new_request_id(), model=source.model, prompt_token_ids=[0], sampling=SamplingParams(max_tokens=0),
            stream=False, created=now, deadline=now + self.settings.request_timeout_s, embed=True, adapter=name,
            adapter_source=source,
        )  # fmt: skip
        await self.queue.submit(probe)
        async for event in self.queue.follow(probe):
            if isinstance(event, FinalResult):
                return event
        raise AssertionError("follow() always ends with the final record")

    async def _restore(self, name: str, replaced: str | None) -> None:
        if replaced is None:
            await self.queue.redis.hdel(keys.lora_adapters(), name)
        else:
            await self.queue.redis.hset(keys.lora_adapters(), name, replaced)


def _off() -> APIError:
    return APIError(404, "No model takes LoRA adapters at runtime: none sets runtime_lora_dir.", code="not_found")
