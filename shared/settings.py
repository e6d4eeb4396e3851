"""The one typed settings object. Read once at start-up (env vars prefixed LLMFLEET_, or a YAML file named by
LLMFLEET_CONFIG), then passed down; nothing else reads os.environ for configuration."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, PositiveInt, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


class ModelSpec(BaseModel):
    """One served model. Without `path`, the model is built from the embedded GGUF into models_dir."""

    path: Path | None = None
    aliases: list[str] = Field(default_factory=list)
    """Other names requests may give it (vLLM's --served-model-name), e.g. the name an application was written
    against; responses name the model as configured."""
    lora_modules: dict[str, Path] = Field(default_factory=dict)
    """LoRA adapters served beside the model (vLLM's --lora-modules): name -> a PEFT adapter directory
    (adapter_config.json, adapter_model.safetensors). A request that gives an adapter's name as its `model` gets the
    model with that adapter (worker.lora); its workers load them all when they start."""
    runtime_lora_dir: Path | None = None
    """Where LoRA adapters loaded while the fleet runs lie (POST /v1/load_lora_adapter and /v1/unload_lora_adapter,
    which vLLM serves with VLLM_ALLOW_RUNTIME_LORA_UPDATING): a lora_path must lie under it (a relative one is taken
    under it), as the workers see it. None: the model takes no adapter at runtime."""
    max_loaded_loras: PositiveInt = 8
    """Runtime adapters one worker keeps loaded (vLLM's --max-cpu-loras): beyond it, the least recently used is
    dropped, and loaded again when a request names it."""
    chat_template: str | None = None
    """A chat template that replaces the model's own (vLLM's --chat-template): a Jinja file's path, or the template
    itself. The gateway renders chat prompts (and /tokenize's messages) with it."""
    reasoning_parser: Literal["deepseek_r1", "qwen3"] | None = None
    """vLLM's --reasoning-parser: chat responses give the output's <think>...</think> as `reasoning` (both names
    split it so; gateway.reasoning)."""
    structured_outputs_in_reasoning: bool = False
    """With a reasoning parser, False: the model thinks freely first, and a grammar (structured output, a named or
    required tool call) shapes the answer after its </think>, as vLLM does; True: the grammar shapes the output from
    its first token (vLLM's structured outputs `enable_in_reasoning`), an output it shapes all answer unless it opens
    with <think>."""
    generation_config: Literal["auto", "none"] = "auto"
    """auto: the sampling settings of the model's generation_config.json (temperature, top_p, top_k, min_p,
    repetition_penalty) apply to requests that do not give them, as vLLM's --generation-config auto; none: the APIs'
    own defaults."""
    tool_call_parser: Literal["hermes", "llama3_json", "pythonic", "mistral"] | None = None
    """vLLM's --tool-call-parser (with --enable-auto-tool-choice): tool_choice 'auto' is served, the calls the model
    announces in that format handed back as tool_calls (gateway.tool_calls). None: 'auto' is a 400."""
    implementation: Literal["auto", "llmfleet", "transformers"] = "auto"
    """What steps the model (vLLM's --model-impl). llmfleet: the worker's own layers and kernels (worker.llama_runner:
    Llama, Mistral, Qwen 2 and 3, Gemma, SmolLM3, Granite, Phi-3); transformers: the model's own transformers forward
    with the worker's slot attention (worker.transformers_runner: Gemma 2 and 3, OLMo 2, Mixtral, DeepSeek V3, GPT-2,
    ..., slower); auto: llmfleet where it computes the model, else transformers."""
    quantization: Literal["gptq", "none"] = "gptq"
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    grid: Literal["gguf", "gptq"] = "gguf"
    """Where the 4-bit weights come from. gguf: the embedded GGUF's own Q4_1 blocks, carried over exactly into a
    GPTQ checkpoint (worker.gguf_grid; the fields below do not apply). gptq: GPTQ re-quantizes the dequantized
    weights as the fields below say (perplexity x1.47 at best for the default model, loadtest/RESULTS.md)."""
    cpu_kernel: Literal["auto", "aten"] = "auto"
    """What computes the 4-bit layers on a CPU. auto: the worker's own kernel (worker.block_quant) where it builds
    (AVX512, AVX2, worker.cpu_kernels) for the gguf grid and a GPTQ checkpoint's layers (4 bits, no act-order),
    gptqmodel's kernels and a bf16 embedding elsewhere; aten: gptqmodel's everywhere."""
    gpu_kernel: str = "auto"
    """gptqmodel's kernel for a GPTQ model on a GPU, a `gptqmodel.BACKEND` value: gptq_marlin, gptq_exllama_v2,
    gptq_triton, gptq_torch, ...; auto lets gptqmodel choose. Its CUDA kernels are compiled on first use."""
    bits: int = 4
    group_size: int = 32
    desc_act: bool = False
    sym: bool = False
    """False: a zero point per group, the layout of the source GGUF's Q4_1 blocks."""
    mse: float = Field(default=0.0, ge=0)
    """GPTQ's search for each group's scale by least squared error (0: plain min/max). The defaults are the best
    4-bit setting `python -m loadtest.quant_sweep` found for the default model (loadtest/RESULTS.md)."""
    quantize_dtype: Literal["float32", "bfloat16"] = "float32"
    """What GPTQ computes in while quantizing. In bfloat16 the result depends on the CPU (native bf16 with
    AVX512-BF16, emulated without): on an AVX2-only CPU the default model came out answering "L'Albanie" where
    the float32 run answers "Paris"."""
    max_context: PositiveInt = 8192
    max_queue_depth: PositiveInt = 512
    """Requests queued or running for this model (XLEN of its stream) above which the gateway refuses new ones
    with 503 + Retry-After instead of queueing them."""


class Speculation(BaseModel):
    """Speculative decoding by prompt lookup (vLLM's speculative_config method `ngram`; worker.ngram_drafts)."""

    num_speculative_tokens: int = Field(default=0, ge=0, le=16)
    """Tokens guessed ahead of each sequence a step; 0 turns speculation off."""
    prompt_lookup_max: PositiveInt = 4
    prompt_lookup_min: PositiveInt = 2
    """The longest and shortest n-gram the sequence's text ends with that is looked up in it."""
    max_batch: PositiveInt = 4
    """Steps that decode more sequences than this guess nothing (vLLM's disable_by_batch_size): the rows of a full
    batch already keep the cores busy."""


class BatchLimits(BaseModel):
    max_running: PositiveInt = 32
    """Requests decoded together in one step."""
    max_prefill_tokens: PositiveInt = 512
    """At most this many prompt tokens are prefilled in one step; longer prompts are prefilled in chunks between
    decode steps."""
    prefill_step_ms: PositiveInt = 150
    """Below max_prefill_tokens, a step prefills only the prompt tokens that fit in this time, as measured at
    warm-up and then by the steps served (worker.step_cost), so running streams stall at most about this long."""
    batch_invariant: bool = False
    """True: a sequence's logits never depend on what else the step computes (vLLM's VLLM_BATCH_INVARIANT), so greedy
    output is the same under any load. On CPUs with AVX512-BF16 that keeps every decoding row (and without AMX every
    row) on the exact vector kernels; by default a step that decodes 16 or more sequences (without AMX: has 16 or
    more rows) computes their linear layers over the weights rounded to bf16, on AMX tiles or with AVX512-BF16's dot
    product (worker.block_quant.TileRows), faster, and a sequence's logits then differ in the last bits between steps
    with fewer and more than 16. Elsewhere (AVX2, AVX512 without BF16) every step is batch invariant either way."""
    prefix_cache_tokens: int = Field(default=32768, ge=0)
    """Tokens of finished sequences' KV kept for prefix reuse (LRU); 0 turns the prefix cache off."""
    speculation: Speculation = Field(default_factory=Speculation)
    kv_prefault_tokens: int = Field(default=256, ge=0)
    """The KV cache is mapped on demand (resident memory grows with the tokens held); the first this many
    positions of every slot are written at start-up instead, before the worker reports ready, so that a fresh
    worker's first requests do not pay for faulting them in (worker.llama_runner.LlamaRunner.prefault). Costs
    slots x this x the model's KV bytes per token of resident memory (64 x 256 x 22.5 KiB = 360 MiB for the
    default model)."""


class JobLimits(BaseModel):
    """Async jobs and batches (gateway.jobs, gateway.batches, the arq process `python -m jobs`)."""

    expired_visible_s: PositiveInt = 86400
    """How long a job whose result is gone still reads `expired` (instead of 404)."""
    batch_in_flight: PositiveInt = 16
    """Lines of one batch on the streams at once, so one huge batch cannot flood the queue."""
    batch_window_s: PositiveInt = 86400
    """OpenAI's completion_window ("24h"): lines not done by then end with a `batch_expired` error."""
    max_file_bytes: PositiveInt = 100 * 1024 * 1024
    max_batch_lines: PositiveInt = 50000
    interactive_reserve: int = Field(default=4, ge=0)
    """Batch slots a worker keeps free for interactive requests."""


class Tracing(BaseModel):
    otlp_traces_endpoint: str | None = None
    """vLLM's --otlp-traces-endpoint: where the gateway and the workers send their OpenTelemetry spans, over OTLP/HTTP
    (e.g. http://collector:4318/v1/traces). None: no tracing (shared.tracing)."""


class DeliverySettings(BaseModel):
    """What keeps an accepted request alive through worker crashes, restarts and deploys (README: Delivery
    guarantees)."""

    reclaim_idle_s: float = Field(10.0, gt=0)
    """A request whose worker has not touched it this long (its worker died) is reclaimed by a live worker."""
    max_deliveries: PositiveInt = 3
    """A request delivered more times than this goes to the dead-letter stream and ends failed."""
    drain_grace_s: float = Field(30.0, ge=0)
    """On SIGTERM a worker finishes what it holds for this long, then hands the rest back; a gateway waits this
    long for its open streams."""


class Protection(BaseModel):
    """What the gateway refuses before anything is queued."""

    auth: Literal["keys", "open"] = "keys"
    """keys: every /v1 request needs `Authorization: Bearer <key>` (see `llmfleet keys`). open: no
    authentication and no per-key limits, for local development only (`llmfleet up` runs it by default)."""
    max_body_bytes: PositiveInt = 1_048_576
    deny_patterns: list[str] = Field(default_factory=list)
    """Regular expressions (Python syntax, case-insensitive); a prompt matching any is refused with a 400."""
    cors_origins: list[str] = Field(default_factory=list)
    """Web origins whose pages may call the API from a browser (CORS), e.g. ["https://chat.example.com"], or ["*"].
    Empty: no CORS headers, so browsers refuse cross-origin calls (servers and the SDKs are not affected)."""


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("LLMFLEET_CONFIG")
        if not path:
            return {}
        return yaml.safe_load(Path(path).read_text()) or {}


def _names(name: str, spec: ModelSpec) -> list[str]:
    return [name, *spec.aliases, *spec.lora_modules]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLMFLEET_", env_nested_delimiter="__", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6380/0"
    models_dir: Path = Path.home() / ".cache" / "llmfleet" / "models"
    models: dict[str, ModelSpec] = Field(default_factory=lambda: {DEFAULT_MODEL: ModelSpec()})
    device: Literal["auto", "cpu", "cuda"] = "auto"

    # Request bounds.
    max_output_tokens: PositiveInt = 2048
    default_max_tokens: PositiveInt = 256
    request_timeout_s: float = 600.0
    """A request not finished this long after it was accepted ends expired."""
    require_live_worker: bool = True
    """Refuse (503) a request for a model no worker serves. False where workers scale from zero on the queue."""

    # Retention of what the worker writes back.
    result_ttl_s: PositiveInt = 3600
    token_stream_ttl_s: PositiveInt = 600
    stored_response_ttl_s: PositiveInt = 86_400
    """How long /v1/responses keeps a response (`store`, its default) for `previous_response_id` and GET."""

    batch: BatchLimits = Field(default_factory=BatchLimits)
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    """vLLM's --scheduling-policy. "priority": a request's `priority` (any integer, lower first; 0 by default) picks
    its lane in the queue; workers take the lanes in that order, start their waiting requests and prompt chunks by it,
    and preempt a running request for a more urgent one. "fcfs": `priority` is refused unless 0."""
    affinity: bool = True
    """Route a conversation's next turn to the worker that holds its prefix (when live and not full)."""
    affinity_ttl_s: PositiveInt = 600
    jobs: JobLimits = Field(default_factory=JobLimits)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    redis_appendfsync: Literal["always", "everysec", "no"] = "everysec"
    """AOF fsync policy of the Redis that `llmfleet up` starts (README: Delivery guarantees)."""
    protection: Protection = Field(default_factory=Protection)
    tracing: Tracing = Field(default_factory=Tracing)
    torch_threads: int = 0
    """0: one per core."""

    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8000
    gateway_keep_alive_s: PositiveInt = 75
    """How long the gateway keeps an idle HTTP connection open: longer than clients keep theirs (httpx, and so the
    openai client, 5 s; load balancers ~60 s), so that the client closes it first. Where the gateway closed first
    (uvicorn's default, 5 s), a request the client sent as it closed met a reset: `loadtest relay` at c=128, 8 of 31
    runs of 512 requests lost one, none of 16 at 75 s."""
    worker_http_host: str = "127.0.0.1"
    worker_http_port: int = 8001
    """A worker's /metrics, /health and /ready. `llmfleet up` gives each worker the next free port from here."""
    worker_stall_s: float = 120.0
    """A serving worker whose loop has not come round for this long answers /health with 503."""
    log_level: str = "INFO"

    def served_names(self) -> dict[str, str]:
        """Every name a request may give a model (its own, its aliases and its adapters') -> its configured name."""
        return {given: name for name, spec in self.models.items() for given in _names(name, spec)}

    @model_validator(mode="after")
    def _names_name_one_model(self):
        given = [n for name, spec in self.models.items() for n in _names(name, spec)]
        twice = sorted({n for n in given if given.count(n) > 1})
        if twice:
            raise ValueError(f"these names are given twice among the models, aliases and lora_modules: {twice}")
        return self

    def model_dir(self, name: str) -> Path:
        """Where the served form of model `name` lives, prepared or not (worker.model_store builds it)."""
        spec = self.models[name]
        if spec.path is not None:
            return spec.path
        if spec.quantization == "gptq" and spec.grid == "gguf":
            return self.models_dir / f"{name}-gguf-q4_1-q8_0"
        if spec.quantization == "gptq":
            act = "-act" if spec.desc_act else ""
            asym = "" if spec.sym else "-asym"
            mse = f"-mse{spec.mse:g}" if spec.mse else ""
            computed = "-fp32" if spec.quantize_dtype == "float32" else ""
            return self.models_dir / f"{name}-gptq-{spec.bits}b-g{spec.group_size}{act}{asym}{mse}{computed}"
        return self.dense_model_dir(name)

    def dense_model_dir(self, name: str) -> Path:
        """The plain HF checkpoint converted from the embedded GGUF (the input of quantization)."""
        return self.models_dir / f"{name}-bf16"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _YamlSource(settings_cls)
