"""Every Prometheus metric llmfleet exports, in one place. Names follow vLLM's under our own prefix
(`vllm:time_to_first_token_seconds` -> `llmfleet:time_to_first_token_seconds`), so dashboards translate.

Two registries: GATEWAY is served at a gateway's /metrics, WORKER at a worker's /metrics (worker.http_server).
Each process only exports what it measures; Prometheus adds the `instance` label that tells processes apart.
The Grafana dashboard in deploy/grafana/ queries these names, and a test checks it queries nothing else."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.protocol import FinalResult

GATEWAY = CollectorRegistry(auto_describe=True)
WORKER = CollectorRegistry(auto_describe=True)

# vLLM's buckets, where the meaning is the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

# -- gateway ---------------------------------------------------------------------------------------------------
REQUESTS = Counter(
    "llmfleet:requests",
    "API requests answered, by model, HTTP status and API key name ('' in open mode).",
    ["model_name", "status", "key_name"],
    registry=GATEWAY,
)
RATE_LIMIT_REJECTIONS = Counter(
    "llmfleet:rate_limit_rejections",
    "Requests refused with 429, by API key name.",
    ["key_name"],
    registry=GATEWAY,
)
# Read from Redis at scrape time: every gateway replica reports the same value (use max() across them).
QUEUE_DEPTH = Gauge(
    "llmfleet:queue_depth", "Entries in the model's request streams, every priority lane (waiting + running).",
    ["model_name"], registry=GATEWAY,
)  # fmt: skip
QUEUE_PENDING = Gauge(
    "llmfleet:queue_pending",
    "Entries delivered to a worker of consumer group 'workers' and not yet acknowledged (running).",
    ["model_name"],
    registry=GATEWAY,
)
QUEUE_LAG = Gauge(
    "llmfleet:queue_lag",
    "Entries no worker has read yet (waiting): the scaling signal.",
    ["model_name"],
    registry=GATEWAY,
)
LIVE_WORKERS = Gauge(
    "llmfleet:live_workers", "Workers whose heartbeat is recent.", ["model_name"], registry=GATEWAY
)  # fmt: skip
AFFINITY_ROUTES = Counter(
    "llmfleet:affinity_routes",
    "Requests of a known conversation: outcome 'hit' went to the worker holding its prefix; 'unknown' (no worker on "
    "record, or its record expired) and 'unavailable' (that worker dead, draining or full) went to the shared stream.",
    ["model_name", "outcome"],
    registry=GATEWAY,
)

# -- worker ----------------------------------------------------------------------------------------------------
TIME_TO_FIRST_TOKEN = Histogram(
    "llmfleet:time_to_first_token_seconds",
    "From acceptance by the gateway until the first token.",
    ["model_name"],
    buckets=TTFT_BUCKETS,
    registry=WORKER,
)
INTER_TOKEN_LATENCY = Histogram(
    "llmfleet:inter_token_latency_seconds",
    "Between two consecutive tokens of one request.",
    ["model_name"],
    buckets=ITL_BUCKETS,
    registry=WORKER,
)
E2E_REQUEST_LATENCY = Histogram(
    "llmfleet:e2e_request_latency_seconds",
    "From acceptance by the gateway until the request ended.",
    ["model_name"],
    buckets=REQUEST_LATENCY_BUCKETS,
    registry=WORKER,
)
REQUEST_QUEUE_TIME = Histogram(
    "llmfleet:request_queue_time_seconds",
    "From acceptance by the gateway until a worker started it.",
    ["model_name"],
    buckets=REQUEST_LATENCY_BUCKETS,
    registry=WORKER,
)
REQUEST_SUCCESS = Counter(
    "llmfleet:request_success",
    "Requests this worker ended, by finish reason (stop, length, cancelled, expired, error).",
    ["model_name", "finished_reason"],
    registry=WORKER,
)
NUM_REQUESTS_RUNNING = Gauge(
    "llmfleet:num_requests_running", "Requests in the running batch.", ["model_name"], registry=WORKER
)
NUM_REQUESTS_WAITING = Gauge(
    "llmfleet:num_requests_waiting", "Requests taken by this worker, waiting for a slot.", ["model_name"],
    registry=WORKER,
)  # fmt: skip
PREFILL_BUDGET = Gauge(
    "llmfleet:prefill_budget_tokens", "Prompt tokens a step may prefill now.", ["model_name"], registry=WORKER
)
KV_CACHE_USAGE = Gauge(
    "llmfleet:kv_cache_usage_perc", "Fraction of KV cache positions in use (0-1).", ["model_name"], registry=WORKER
)
BATCH_SIZE = Histogram(
    "llmfleet:batch_size", "Sequences in one forward step.", ["model_name"], buckets=BATCH_BUCKETS, registry=WORKER
)
PROMPT_TOKENS = Counter(
    "llmfleet:prompt_tokens",
    "Prompt tokens prefilled (computed, not reused from the prefix cache).",
    ["model_name"],
    registry=WORKER,
)
GENERATION_TOKENS = Counter("llmfleet:generation_tokens", "Tokens generated.", ["model_name"], registry=WORKER)
PREFIX_CACHE_QUERIES = Counter(
    "llmfleet:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", ["model_name"], registry=WORKER
)
PREFIX_CACHE_HITS = Counter(
    "llmfleet:prefix_cache_hits",
    "Prompt tokens whose KV was reused from the prefix cache.",
    ["model_name"],
    registry=WORKER,
)
PREFIX_CACHE_TOKENS = Gauge(
    "llmfleet:prefix_cache_tokens",
    "Tokens of finished sequences' KV kept for prefix reuse (parked), within batch.prefix_cache_tokens.",
    ["model_name"],
    registry=WORKER,
)
PREFIX_CACHE_BYTES = Gauge(
    "llmfleet:prefix_cache_bytes", "KV memory those parked tokens hold.", ["model_name"], registry=WORKER
)
PREFIX_CACHE_EVICTIONS = Counter(
    "llmfleet:prefix_cache_evictions", "Parked sequences evicted (LRU) to make room.", ["model_name"], registry=WORKER
)

PREEMPTIONS = Counter(
    "llmfleet:preemptions",
    "Running sequences sent back to waiting to give their slot to a more urgent request (scheduling_policy priority).",
    ["model_name"],
    registry=WORKER,
)
STEP_FAILURES = Counter(
    "llmfleet:step_failures",
    "Steps that raised and were run again one sequence at a time (the sequences that failed alone end failed).",
    ["model_name"],
    registry=WORKER,
)
SPEC_DRAFT_TOKENS = Counter(
    "llmfleet:spec_decode_num_draft_tokens",
    "Tokens guessed by prompt lookup (speculative decoding) and checked in a step (vLLM's name).",
    ["model_name"],
    registry=WORKER,
)
SPEC_ACCEPTED_TOKENS = Counter(
    "llmfleet:spec_decode_num_accepted_tokens",
    "Guessed tokens the model's own choices confirmed: each one a token without a step of its own.",
    ["model_name"],
    registry=WORKER,
)

LORA_REQUESTS_INFO = Gauge(
    "llmfleet:lora_requests_info",
    "vLLM's vllm:lora_requests_info: the LoRA adapters of the running and the waiting requests (comma-separated "
    "labels) and how many adapters the worker holds at most; the value is when they were last seen so.",
    ["model_name", "max_lora", "waiting_lora_adapters", "running_lora_adapters"],
    registry=WORKER,
)

FINISH_REASONS = ("stop", "length", "cancelled", "expired", "error")


class WorkerMetrics:
    """The worker's series for one model, created at start so every series is exported before traffic."""

    def __init__(self, model_name: str):
        self.ttft = TIME_TO_FIRST_TOKEN.labels(model_name)
        self.itl = INTER_TOKEN_LATENCY.labels(model_name)
        self.e2e = E2E_REQUEST_LATENCY.labels(model_name)
        self.queue_time = REQUEST_QUEUE_TIME.labels(model_name)
        self.finished = {reason: REQUEST_SUCCESS.labels(model_name, reason) for reason in FINISH_REASONS}
        self.running = NUM_REQUESTS_RUNNING.labels(model_name)
        self.waiting = NUM_REQUESTS_WAITING.labels(model_name)
        self.kv_usage = KV_CACHE_USAGE.labels(model_name)
        self.prefill_budget = PREFILL_BUDGET.labels(model_name)
        self.batch_size = BATCH_SIZE.labels(model_name)
        self.prompt_tokens = PROMPT_TOKENS.labels(model_name)
        self.generation_tokens = GENERATION_TOKENS.labels(model_name)
        self.prefix_queries = PREFIX_CACHE_QUERIES.labels(model_name)
        self.prefix_hits = PREFIX_CACHE_HITS.labels(model_name)
        self.prefix_tokens = PREFIX_CACHE_TOKENS.labels(model_name)
        self.prefix_bytes = PREFIX_CACHE_BYTES.labels(model_name)
        self.prefix_evictions = PREFIX_CACHE_EVICTIONS.labels(model_name)
        self.step_failures = STEP_FAILURES.labels(model_name)
        self.preemptions = PREEMPTIONS.labels(model_name)
        self.draft_tokens = SPEC_DRAFT_TOKENS.labels(model_name)
        self.accepted_tokens = SPEC_ACCEPTED_TOKENS.labels(model_name)
        self.model_name = model_name
        self._evictions_seen = 0
        self._adapter_labels: tuple[str, ...] | None = None

    def step(self, sequences: int, prompt_tokens: int, generated: int) -> None:
        self.batch_size.observe(sequences)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated)

    def speculated(self, guessed: int, accepted: int) -> None:
        self.draft_tokens.inc(guessed)
        self.accepted_tokens.inc(accepted)
        self.generation_tokens.inc(accepted)

    def prefix_lookup(self, prompt_tokens: int, reused: int) -> None:
        self.prefix_queries.inc(prompt_tokens)
        self.prefix_hits.inc(reused)

    def occupancy(self, running: int, waiting: int, kv_used: int, kv_total: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_used / kv_total if kv_total else 0.0)

    def prefix_cache(self, parked_tokens: int, bytes_per_token: int, evictions: int) -> None:
        self.prefix_tokens.set(parked_tokens)
        self.prefix_bytes.set(parked_tokens * bytes_per_token)
        if evictions > self._evictions_seen:
            self.prefix_evictions.inc(evictions - self._evictions_seen)
            self._evictions_seen = evictions

    def adapters(self, running: set[str], waiting: set[str], max_lora: int) -> None:
        """One series at a time (vLLM's adds one for every change and keeps them all)."""
        labels = (self.model_name, str(max_lora), ",".join(sorted(waiting)), ",".join(sorted(running)))
        if labels != self._adapter_labels:
            if self._adapter_labels is not None:
                LORA_REQUESTS_INFO.remove(*self._adapter_labels)
            self._adapter_labels = labels
        LORA_REQUESTS_INFO.labels(*labels).set_to_current_time()

    def final(self, final: FinalResult) -> None:
        self.finished[final.finish_reason].inc()
        timings = final.timings
        self.e2e.observe(timings.total_s)
        self.queue_time.observe(timings.queued_s)
        if timings.ttft_s is not None:
            self.ttft.observe(timings.ttft_s)
