"""Continuous batching: requests join the running batch at the next step and leave the step they finish.

Each step decodes one token for every running sequence and, within a token budget, prefills prompt chunks of
new ones in the same forward pass, so a long prompt never freezes the streams that are already running."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import structlog
import torch
from llguidance import LLMatcher

from shared.metrics import WorkerMetrics
from shared.protocol import FinalResult, FinishReason, InferenceRequest, Timings, TokenLogprob
from shared.settings import Speculation
from worker import ngram_drafts
from worker.grammar import OutputGrammars
from worker.kv_slots import KVSlots
from worker.llama_runner import LlamaRunner, PrefillChunk
from worker.lora import Adapter, AdapterNotServable, Adapters
from worker.sampling import ChosenLogprob, choose_tokens, new_generator, token_logprobs
from worker.step_cost import PrefillBudget
from worker.text_output import TextOutput

log = structlog.get_logger(__name__)


def kv_computed_with(adapter: Adapter | None, request: InferenceRequest) -> tuple[str | None, str | None] | None:
    if adapter is None and request.cache_salt is None:
        return None
    return adapter.key if adapter else None, request.cache_salt


@dataclass
class Sequence:
    request: InferenceRequest
    slot: int
    output: TextOutput
    generator: torch.Generator | None
    started: float
    admitted_step: int = 0
    """The scheduler's step count when the sequence got its slot (Scheduler._plan_prefills ages prompts by it)."""
    prefilled: int = 0
    reused: int = 0
    """Prompt tokens whose KV was copied from the prefix cache instead of computed."""
    kv_len: int = 0
    """Positions of prompt + generated whose KV is in the slot."""
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """The generated tokens' log probabilities, for the final record, when the request asked for them."""
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    """The prompt tokens' so far, likewise."""
    first_token_at: float | None = None
    last_token_at: float = 0.0
    matcher: LLMatcher | None = None
    """Where the output stands in its request's grammar (structured output), if it has one."""
    pace: ngram_drafts.Pace = field(default_factory=ngram_drafts.Pace)
    """How many tokens it guesses ahead (speculative decoding)."""
    adapter: Adapter | None = None
    """The LoRA adapter its request names."""

    @property
    def computed_with(self) -> tuple[str | None, str | None] | None:
        """How its KV is computed, for the prefix cache (KVSlots): its adapter, and its request's cache salt."""
        return kv_computed_with(self.adapter, self.request)

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def prefill_ids(self) -> list[int]:
        """What goes into the cache before the next token is sampled: the prompt and, for a resumed request,
        the tokens an earlier run already produced."""
        return self.prompt + self.request.resume_token_ids

    @property
    def prefill_length(self) -> int:
        """len(prefill_ids), without building the list: asked of every running sequence at every step."""
        return len(self.prompt) + len(self.request.resume_token_ids)

    @property
    def decoding(self) -> bool:
        return self.prefilled == self.prefill_length

    def kv_tokens(self) -> list[int]:
        return (self.prompt + self.generated)[: self.kv_len]


def _preemptible(request: InferenceRequest) -> bool:
    """Whether a running request may give its slot up: not one that scores its prompt (embeddings, prompt_logprobs),
    whose scores a resumed run would not compute again."""
    return not request.embed and request.sampling.prompt_logprobs is None


@dataclass
class Preempted:
    """What a preempted sequence's next run takes over, so that its output and final record go on as if it had
    never stopped (its tokens are replayed as a reclaimed request's are)."""

    started: float
    first_token_at: float | None
    reused: int
    generator: torch.Generator | None
    logprobs: list[TokenLogprob]


@dataclass
class Computed:
    """What a step's forward pass gave one sequence, before the sequence takes it."""

    token: int | None = None
    """None for a prompt chunk that does not end its prompt."""
    guesses: list[int] = field(default_factory=list)
    """The tokens guessed after it (speculative decoding), and its row's and theirs' choices and log probabilities."""
    chosen: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    logprob: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    embedding: list[float] | None = None
    """An embed request's, when its prompt ends in this step."""


@dataclass
class StepEvent:
    request_id: str
    delta: str = ""
    completion_tokens: int = 0
    final: FinalResult | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)


def _joined(first: StepEvent, then: StepEvent) -> StepEvent:
    """A sequence's two events of one step (its tokens one after the other) as one."""
    return StepEvent(
        first.request_id, delta=first.delta + then.delta, completion_tokens=then.completion_tokens, final=then.final,
        token_ids=first.token_ids + then.token_ids, logprobs=first.logprobs + then.logprobs,
        prompt_logprobs=first.prompt_logprobs,
    )  # fmt: skip


def _chunk_ends(n_decode: int, prefilling: list[tuple[Sequence, PrefillChunk]], every_row: bool) -> list[int]:
    """The row of each prompt chunk's last token in a step's logits and final hidden states: after the decoding
    rows, one row a chunk, or with `every_row` one a token."""
    ends, end = [], n_decode - 1
    for _, chunk in prefilling:
        end += len(chunk.tokens) if every_row else 1
        ends.append(end)
    return ends


PASSED_OVER_MAX = 16
"""Later prompts may go first for at most this many times the steps a prompt's own prefill takes."""

BATCH_DEFERRED_STEPS = 16 * PASSED_OVER_MAX
"""A batch line's prompt is ordered as if it got its slot this many steps later: interactive prompts go first
unless they are many budgets longer, and a stream of them still holds the line back for a bounded time."""


class Scheduler:
    def __init__(
        self,
        runner: LlamaRunner,
        tokenizer,
        eos_token_ids: frozenset[int],
        prefill_budget: PrefillBudget | int,
        model_name: str,
        worker_id: str,
        max_running: int | None = None,
        prefix_cache_tokens: int = 0,
        adapters: Adapters | None = None,
        speculation: Speculation | None = None,
    ):
        """max_running defaults to every runner slot; with a prefix cache, give the runner more slots than
        max_running so finished sequences can stay parked for reuse. `adapters`: the model's LoRA adapters."""
        self.runner = runner
        self.adapters = adapters or Adapters(model_name)
        self.speculation = speculation or Speculation()
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        if not isinstance(prefill_budget, PrefillBudget):
            prefill_budget = PrefillBudget(prefill_budget)
        self.prefill_budget = prefill_budget
        self.model_name = model_name
        self.worker_id = worker_id
        self.waiting: deque[InferenceRequest] = deque()
        self.running: dict[str, Sequence] = {}
        self.max_running = max_running or runner.slots
        self.slots = KVSlots(runner.slots, prefix_cache_tokens)
        self.grammars = OutputGrammars(tokenizer, eos_token_ids)
        self._cancelled: set[str] = set()
        self._preempted: dict[str, Preempted] = {}
        self.prompt_tokens_total = 0
        self.reused_tokens_total = 0
        self.metrics = WorkerMetrics(model_name)
        self.steps = 0
        self._last_step_failed = False

    # -- intake ------------------------------------------------------------------------------------------------
    def add(self, request: InferenceRequest) -> None:
        """Queue `request` behind every waiting request of its priority or a more urgent one."""
        at = len(self.waiting)
        while at and self.waiting[at - 1].priority > request.priority:
            at -= 1
        self.waiting.insert(at, request)

    def cancel(self, request_id: str) -> None:
        self._cancelled.add(request_id)

    def release(self, request_id: str) -> None:
        """Forget a request without an end of our own (another worker now owns it) and free its slot."""
        self.waiting = deque(r for r in self.waiting if r.id != request_id)
        self._preempted.pop(request_id, None)
        seq = self.running.pop(request_id, None)
        if seq is not None:
            self.slots.release(seq.slot)

    @property
    def free_capacity(self) -> int:
        return self.max_running - len(self.running) - len(self.waiting)

    def preemptible_priority(self) -> int | None:
        """The priority a request must be more urgent than to take a running sequence's slot (Scheduler._preempt_for):
        the least urgent preemptible one's. None where none is, or one waiting here is that urgent already."""
        priorities = [seq.request.priority for seq in self.running.values() if _preemptible(seq.request)]
        if not priorities:
            return None
        least = max(priorities)
        return None if self.waiting and self.waiting[0].priority < least else least

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def request_ids(self) -> list[str]:
        return [r.id for r in self.waiting] + list(self.running)

    # -- one step ----------------------------------------------------------------------------------------------
    def step(self) -> list[StepEvent]:
        events = self._step()
        held = sum(s.kv_len for s in self.running.values())
        self.metrics.occupancy(len(self.running), len(self.waiting), held, self.runner.slots * self.runner.capacity)
        self.metrics.prefix_cache(self.slots.parked_tokens, self.runner.kv_bytes_per_token, self.slots.evictions)
        self.metrics.prefill_budget.set(self.prefill_budget.tokens)
        if self.adapters.served:
            running = {s.request.adapter for s in self.running.values() if s.request.adapter}
            waiting = {r.adapter for r in self.waiting if r.adapter}
            self.metrics.adapters(running, waiting, self.adapters.most)
        return events

    def _step(self) -> list[StepEvent]:
        self.steps += 1
        now = time.time()
        events = self._drop_cancelled_and_expired(now)
        events += self._admit(now)
        decoding = [s for s in self.running.values() if s.decoding]
        prefilling = self._plan_prefills(len(decoding))
        if not decoding and not prefilling:
            return events
        started = time.perf_counter()
        failed: dict[str, str] = {}
        try:
            computed = self._compute(decoding, prefilling)
        except Exception as error:  # attributed to a sequence below, or raised again
            computed, failed = self._compute_each(decoding, prefilling, error)
        self._last_step_failed = not computed
        prompt_tokens = sum(len(chunk.tokens) for _, chunk in prefilling)
        every_row = any(s.request.sampling.prompt_logprobs is not None for s, _ in prefilling)
        if not failed and not every_row:  # logits for every prompt row: not what the budget's steps cost
            self.prefill_budget.observe(prompt_tokens, time.perf_counter() - started)
        now = time.time()
        sampled = sum(result.token is not None for result in computed.values())
        self.metrics.step(len(decoding) + len(prefilling), prompt_tokens, sampled)
        for seq, decoded in [(s, True) for s in decoding] + [(s, False) for s, _ in prefilling]:
            if seq.request.id in failed:
                events.append(self._finish(seq, "error", now, error=failed[seq.request.id]))
                continue
            result = computed[seq.request.id]
            # The guesses accepted (their KV is in the slot), then the token after them.
            tokens = ngram_drafts.accepted(result.guesses, result.chosen) if result.guesses else [result.token]
            seq.kv_len = seq.kv_len + len(tokens) if decoded else seq.prefilled
            if result.guesses:
                self.metrics.speculated(len(result.guesses), len(tokens) - 1)
                seq.pace.took(len(result.guesses), len(tokens) - 1, self.steps)
            seq.prompt_logprobs += result.prompt_logprobs
            if result.embedding is not None:
                events.append(self._finish(seq, "stop", now, embedding=result.embedding))
                continue
            if result.token is None:
                continue
            try:
                event = self._advance(seq, result.token, now, result.logprob)
                if event.completion_tokens == 1 and seq.request.sampling.prompt_logprobs is not None:
                    event.prompt_logprobs = seq.prompt_logprobs  # a streamed echo shows them before the output
                for token, logprob in zip(tokens[1:], result.logprobs[1:]):
                    if event.final is not None:
                        break
                    event = _joined(event, self._advance(seq, token, now, logprob))
                events.append(event)
            except Exception as error:
                events.append(self._finish(seq, "error", now, error=self._failure(seq.request, error)))
        return events

    def _compute(
        self, decoding: list[Sequence], prefilling: list[tuple[Sequence, PrefillChunk]]
    ) -> dict[str, Computed]:
        """The step's forward pass and token choices, by request id; changes no sequence (so it can be run again)."""
        every_row = any(s.request.sampling.prompt_logprobs is not None for s, _ in prefilling)
        guesses = self._guesses(decoding)
        # A sequence's guessed tokens are more decoding rows of its slot, at the positions after its last token; each
        # row chooses as if the guesses before it were the sequence's (its penalties and minimum length).
        decode_rows, tokens_in, positions, generated = [], [], [], []
        for seq, guessed in zip(decoding, guesses):
            last = len(seq.prompt) + len(seq.generated) - 1
            for i, token in enumerate([seq.generated[-1], *guessed]):
                decode_rows.append(seq)
                tokens_in.append(token)
                positions.append(last + i)
                generated.append(seq.generated + guessed[:i] if i else seq.generated)
        n_decode = len(decode_rows)
        logits = self.runner.step(
            decode_slots=[s.slot for s in decode_rows],
            decode_tokens=tokens_in,
            decode_positions=positions,
            prefills=[chunk for _, chunk in prefilling],
            every_row=every_row,
            adapters=[s.adapter for s in decode_rows + [s for s, _ in prefilling]],
        )  # fmt: skip
        computed = {s.request.id: Computed(guesses=guessed) for s, guessed in zip(decoding, guesses)}
        computed.update((s.request.id, Computed()) for s, _ in prefilling)
        self._take_embeddings(n_decode, prefilling, every_row, computed)
        if every_row:
            logits = self._take_prompt_logprobs(logits, n_decode, prefilling, computed)
        # Rows of chunks that do not finish their prompt carry no next token.
        rows = list(range(n_decode)) + [n_decode + i for i, (s, _) in enumerate(prefilling) if s.decoding]
        sampled = decode_rows + [s for s, _ in prefilling if s.decoding]
        if rows != list(range(logits.shape[0])):
            logits = logits[torch.tensor(rows, dtype=torch.long)]
        constrained, seen = [], set()  # each sequence's first row, with its guesses (whose rows follow it)
        for i, s in enumerate(sampled):
            if s.matcher is not None and s.request.id not in seen:
                seen.add(s.request.id)
                constrained.append((i, s.matcher, computed[s.request.id].guesses))
        if constrained:
            logits = self.grammars.masked(logits, constrained)
        tokens = choose_tokens(
            logits,
            [s.request.sampling for s in sampled],
            [s.generator for s in sampled],
            [s.prompt for s in sampled],
            generated + [s.generated for s, _ in prefilling if s.decoding],
            self.eos_token_ids,
        )
        logprobs = self._logprobs(logits, sampled, tokens)
        for i, (seq, token) in enumerate(zip(sampled, tokens)):
            result = computed[seq.request.id]
            if result.token is None:
                result.token, result.logprob = token, logprobs.get(i)
            result.chosen.append(token)
            result.logprobs.append(logprobs.get(i))
        return computed

    def _guesses(self, decoding: list[Sequence]) -> list[list[int]]:
        """Each decoding sequence's guessed next tokens (worker.ngram_drafts), within its max_tokens and the slot."""
        speculation = self.speculation
        if not speculation.num_speculative_tokens or len(decoding) > speculation.max_batch:
            return [[] for _ in decoding]
        guesses = []
        for seq in decoding:
            sampling, made = seq.request.sampling, len(seq.generated)
            room = min(sampling.max_tokens - made, self.runner.capacity - len(seq.prompt) - made) - 1
            most = min(room, seq.pace.guesses(self.steps))
            can = most > 0 and ngram_drafts.speculates(sampling)
            guessed = ngram_drafts.draft(seq.prompt + seq.generated, speculation, most) if can else []
            if guessed and seq.matcher is not None:  # only what its grammar allows
                guessed = guessed[: seq.matcher.validate_tokens(guessed)]
            guesses.append(guessed)
        return guesses

    def _take_embeddings(
        self, n_decode: int, prefilling: list[tuple[Sequence, PrefillChunk]], every_row: bool, computed: dict
    ) -> None:
        """The embeddings of the embed requests whose prompts end in this step: their last rows' final norm."""
        for (seq, _), row in zip(prefilling, _chunk_ends(n_decode, prefilling, every_row)):
            if seq.request.embed and seq.decoding:
                hidden = self.runner.last_hidden[row].float()
                computed[seq.request.id].embedding = torch.nn.functional.normalize(hidden, dim=0).tolist()

    def _compute_each(
        self, decoding: list[Sequence], prefilling: list[tuple[Sequence, PrefillChunk]], error: Exception
    ) -> tuple[dict[str, Computed], dict[str, str]]:
        """A step failed: run each of its sequences alone (a step only writes the KV positions it computes, so
        running them again is exact). Those that fail alone end with an error; the others go on. When none
        succeeds alone (or one, right after another such step), the fault is the worker's: raised again."""
        log.error("step.failed", sequences=len(decoding) + len(prefilling), exc_info=error)
        self.metrics.step_failures.inc()
        computed: dict[str, Computed] = {}
        failed: dict[str, str] = {}
        alone = [([seq], []) for seq in decoding] + [([], [(seq, chunk)]) for seq, chunk in prefilling]
        for one_decoding, one_prefilling in alone:
            seq = (one_decoding or [s for s, _ in one_prefilling])[0]
            try:
                computed.update(self._compute(one_decoding, one_prefilling))
            except Exception as own:
                failed[seq.request.id] = self._failure(seq.request, own)
        if not computed and (len(alone) > 1 or self._last_step_failed):
            raise error
        return computed, failed

    def _failure(self, request: InferenceRequest, error: Exception) -> str:
        """Log a request's own failure in the worker; the reason its final record gives."""
        log.error("request.step_failed", request_id=request.id, exc_info=error)
        return f"internal error in the worker ({type(error).__name__}), logged as request.step_failed"

    def _logprobs(self, logits: torch.Tensor, sampled: list[Sequence], tokens: list[int]) -> dict[int, TokenLogprob]:
        """The log probabilities of the rows whose requests asked for them, by row."""
        rows = [i for i, s in enumerate(sampled) if s.request.sampling.logprobs is not None]
        if not rows:
            return {}
        found = token_logprobs(
            logits[torch.tensor(rows, dtype=torch.long)],
            [tokens[i] for i in rows],
            [sampled[i].request.sampling.logprobs for i in rows],
        )
        return {i: self._token_logprob(sampled[i].request, tokens[i], chosen) for i, chosen in zip(rows, found)}

    def _take_prompt_logprobs(
        self,
        logits: torch.Tensor,
        n_decode: int,
        prefilling: list[tuple[Sequence, PrefillChunk]],
        computed: dict[str, Computed],
    ) -> torch.Tensor:
        """From a step's logits of every row: the log probabilities of the prompt tokens its chunks' rows predict,
        for the sequences that asked for them; returns the logits as a step without them gives (one row a chunk)."""
        ends = _chunk_ends(n_decode, prefilling, every_row=True)
        for (seq, chunk), end in zip(prefilling, ends):
            k = seq.request.sampling.prompt_logprobs
            if k is not None:
                scored = computed[seq.request.id].prompt_logprobs
                if chunk.start == 0:
                    scored.append(self._token_logprob(seq.request, chunk.tokens[0], None))
                # Row j predicts the token after it, while that is still the prompt's.
                following = seq.prompt[chunk.start + 1 : chunk.start + len(chunk.tokens) + 1]
                first = end + 1 - len(chunk.tokens)
                rows = logits[first : first + len(following)]
                scored_rows = token_logprobs(rows, following, [k] * len(following), ranked=True)
                for token, chosen in zip(following, scored_rows):
                    scored.append(self._token_logprob(seq.request, token, chosen))
        return logits[torch.tensor([*range(n_decode), *ends], dtype=torch.long)]

    def _token_logprob(self, request: InferenceRequest, token: int, chosen: ChosenLogprob | None) -> TokenLogprob:
        """Ids as text too, each token decoded alone; `chosen` None for a prompt's first token."""

        def text(t: int) -> str:
            return f"token_id:{t}" if request.sampling.return_tokens_as_token_ids else self.tokenizer.decode([t])

        top = chosen.top if chosen else []
        return TokenLogprob(
            token=text(token), logprob=chosen.logprob if chosen else None, top=[(text(t), lp) for t, lp in top],
            token_id=token, top_ids=[t for t, _ in top], rank=chosen.rank if chosen else None,
        )  # fmt: skip

    def _drop_cancelled_and_expired(self, now: float) -> list[StepEvent]:
        events = []
        for request in list(self.waiting):
            reason = self._end_reason(request, now)
            if reason:
                self.waiting.remove(request)
                self._cancelled.discard(request.id)
                self._preempted.pop(request.id, None)
                events.append(StepEvent(request.id, final=self._final(request, reason, now)))
        for seq in list(self.running.values()):
            reason = self._end_reason(seq.request, now)
            if reason:
                events.append(self._finish(seq, reason, now))
        self._cancelled.clear()
        return events

    def _end_reason(self, request: InferenceRequest, now: float) -> FinishReason | None:
        if request.id in self._cancelled:
            return "cancelled"
        if now > request.deadline:
            return "expired"
        return None

    def _admit(self, now: float) -> list[StepEvent]:
        events = []
        deferred = []
        while self.waiting and (len(self.running) < self.max_running or self._preempt_for(self.waiting[0])):
            request = self.waiting.popleft()
            if self._first_choice_prefilling(request):
                deferred.append(request)
                continue
            try:
                ended = self._start(request, now)
            except Exception as error:
                seq = self.running.pop(request.id, None)
                if seq is not None:
                    self.slots.release(seq.slot)
                ended = StepEvent(
                    request.id, final=self._final(request, "error", now, error=self._failure(request, error))
                )
            if ended is not None:
                events.append(ended)
        self.waiting.extendleft(reversed(deferred))
        return events

    def _preempt_for(self, request: InferenceRequest) -> bool:
        """vLLM's preemption under priority scheduling: no slot is free for `request`, so the least urgent running
        sequence less urgent than it (the last admitted of those) goes back to waiting, its KV parked in the prefix
        cache for its next run to resume from. False where none is less urgent (always, under fcfs: every priority
        is 0); see _preemptible."""
        less_urgent = [
            seq
            for seq in self.running.values()
            if seq.request.priority > request.priority and _preemptible(seq.request)
        ]
        if not less_urgent:
            return False
        seq = max(reversed(less_urgent), key=lambda s: s.request.priority)  # of equals, the last admitted
        del self.running[seq.request.id]
        self.slots.park(seq.slot, seq.kv_tokens(), seq.computed_with)
        self._preempted[seq.request.id] = Preempted(
            seq.started, seq.first_token_at, seq.reused, seq.generator, seq.logprobs
        )
        self.add(seq.request.model_copy(update={"resume_token_ids": list(seq.generated)}))
        self.metrics.preemptions.inc()
        return True

    def _start(self, request: InferenceRequest, now: float) -> StepEvent | None:
        """Give a request its slot (with what the prefix cache holds of its prompt); an event if it ends at once."""
        prompt, sampling = request.prompt_token_ids + request.resume_token_ids, request.sampling
        output = TextOutput(
            self.tokenizer, sampling.stop, sampling.min_tokens, sampling.skip_special_tokens,
            sampling.include_stop_str_in_output,
        )  # fmt: skip
        carried = self._preempted.pop(request.id, None)
        generator = carried.generator if carried else new_generator(sampling, self.runner.device)
        try:
            adapter = self.adapters.get(request.adapter, request.adapter_source) if request.adapter else None
        except AdapterNotServable as error:
            return StepEvent(request.id, final=self._final(request, "error", now, error=str(error)))
        matcher = self.grammars.matcher(sampling.grammar) if sampling.grammar is not None else None
        source, reused = (None, 0)
        if self.slots.cache_tokens and sampling.prompt_logprobs is None:
            running = ((s.slot, s.kv_tokens(), s.computed_with) for s in self.running.values())
            source, reused = self.slots.longest_prefix(prompt, running, kv_computed_with(adapter, request))
        seq = self.running[request.id] = Sequence(
            request=request,
            slot=self.slots.acquire(source),
            output=output,
            generator=generator,
            started=now,
            admitted_step=self.steps,
            prefilled=reused,
            reused=reused,
            kv_len=reused,
            matcher=matcher,
            adapter=adapter,
        )
        if reused and seq.slot != source:
            self.runner.copy_prefix(source, seq.slot, reused)
        if carried:
            seq.started, seq.first_token_at, seq.reused, seq.logprobs = (
                carried.started, carried.first_token_at, carried.reused, carried.logprobs
            )  # fmt: skip
        self.prompt_tokens_total += len(prompt)
        self.reused_tokens_total += reused
        self.metrics.prefix_lookup(len(prompt), reused)
        if matcher is not None and matcher.is_error():
            return self._finish(seq, "error", now, error=f"Grammar: {matcher.get_error()}")
        return self._resume(seq, now) if request.resume_token_ids else None

    def _first_choice_prefilling(self, request: InferenceRequest) -> bool:
        """A later choice of a request for several waits while the first one prefills their prompt, then copies
        that KV from it (the prefix cache), instead of computing the same positions beside it."""
        first = self.running.get(request.choice_of) if request.choice_of and self.slots.cache_tokens else None
        return first is not None and first.kv_len < len(request.prompt_token_ids) - 1

    def _resume(self, seq: Sequence, now: float) -> StepEvent | None:
        """Replay the tokens an earlier run streamed, so text and stop-string state continue exactly where the
        reader is (their text was relayed already: it is not released again). Ends the request if they did."""
        for token in seq.request.resume_token_ids:
            seq.generated.append(token)
            seq.output.add(token)
            if seq.matcher is not None:
                seq.matcher.consume_token(token)
        seq.first_token_at = seq.first_token_at or now
        if seq.output.stopped:
            return self._finish(seq, "stop", now, stop_reason=seq.output.stop_string)
        if len(seq.generated) >= seq.request.sampling.max_tokens:
            return self._finish(seq, "length", now)
        return None

    def _plan_prefills(self, decoding: int) -> list[tuple[Sequence, PrefillChunk]]:
        """Prompt chunks for this step within the prefill token budget, of at most PrefillBudget.prompts_per_step
        prompts: the most urgent priority's first (settings.scheduling_policy), then those with the fewest tokens left
        (a conversation's next turn, its history cached, does not wait behind another request's long prompt), ties
        oldest first, batch lines after interactive prompts (BATCH_DEFERRED_STEPS). Aged within a priority, so that a
        stream of short prompts never starves a long one: each step since a prompt got its slot counts as
        1 / PASSED_OVER_MAX of a step's budget of tokens fewer."""
        budget = self.prefill_budget.tokens
        planned = []
        prompts = [seq for seq in self.running.values() if not seq.decoding]
        age_tokens = budget / PASSED_OVER_MAX
        left = {seq.request.id: seq.prefill_length - seq.prefilled for seq in prompts}
        take = self.prefill_budget.prompts_per_step(list(left.values()), decoding)

        def key(seq: Sequence) -> tuple[int, float]:
            deferred = BATCH_DEFERRED_STEPS if seq.request.batch else 0
            return seq.request.priority, left[seq.request.id] + age_tokens * (seq.admitted_step + deferred)

        for seq in sorted(prompts, key=key)[:take]:
            if budget <= 0:
                break
            ids = seq.prefill_ids
            n = min(budget, left[seq.request.id])
            planned.append((seq, PrefillChunk(seq.slot, ids[seq.prefilled : seq.prefilled + n], seq.prefilled)))
            seq.prefilled += n
            budget -= n
        return planned

    def _advance(self, seq: Sequence, token: int, now: float, logprob: TokenLogprob | None = None) -> StepEvent:
        sampling = seq.request.sampling
        if sampling.max_tokens == 0:  # an echo that only scores its prompt
            return self._finish(seq, "length", now)
        if seq.first_token_at is None:
            seq.first_token_at = now
        else:
            self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        if token in self.eos_token_ids and not sampling.ignore_eos:
            return self._finish(seq, "stop", now)
        if token in sampling.stop_token_ids:
            return self._finish(seq, "stop", now, stop_reason=token)
        seq.generated.append(token)
        logprobs = [logprob] if logprob is not None else []
        seq.logprobs += logprobs
        delta = seq.output.add(token)
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            error = f"Grammar: {seq.matcher.get_error()}"
            return self._finish(seq, "error", now, delta, [token], logprobs, error=error)
        if seq.output.stopped or (seq.matcher is not None and seq.matcher.is_stopped()):
            return self._finish(seq, "stop", now, delta, [token], logprobs, stop_reason=seq.output.stop_string)
        at_capacity = len(seq.prompt) + len(seq.generated) >= self.runner.capacity
        if len(seq.generated) >= sampling.max_tokens or at_capacity:
            return self._finish(seq, "length", now, delta, [token], logprobs)
        return StepEvent(
            seq.request.id, delta=delta, completion_tokens=len(seq.generated), token_ids=[token], logprobs=logprobs
        )

    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        now: float,
        delta: str = "",
        token_ids: list[int] | None = None,
        logprobs: list[TokenLogprob] | None = None,
        error: str | None = None,
        stop_reason: str | int | None = None,
        embedding: list[float] | None = None,
    ) -> StepEvent:
        del self.running[seq.request.id]
        self.slots.park(seq.slot, seq.kv_tokens(), seq.computed_with)
        delta += seq.output.finish()
        final = self._final(
            seq.request,
            reason,
            now,
            text=seq.output.text,
            cached_tokens=min(seq.reused, len(seq.prompt)),
            completion_tokens=len(seq.generated),
            started=seq.started,
            first_token_at=seq.first_token_at,
            error=error,
        )
        final.stop_reason = stop_reason
        final.embedding = embedding
        if seq.request.sampling.logprobs is not None:
            final.logprobs = seq.logprobs
        if seq.request.sampling.prompt_logprobs is not None:
            final.prompt_logprobs = seq.prompt_logprobs
        if seq.request.return_token_ids:
            final.token_ids = list(seq.generated)
        return StepEvent(
            seq.request.id,
            delta=delta,
            completion_tokens=len(seq.generated),
            final=final,
            token_ids=token_ids or [],
            logprobs=logprobs or [],
        )

    def _final(
        self,
        request: InferenceRequest,
        reason: FinishReason,
        now: float,
        text: str = "",
        cached_tokens: int = 0,
        completion_tokens: int = 0,
        started: float | None = None,
        first_token_at: float | None = None,
        error: str | None = None,
    ) -> FinalResult:
        return FinalResult(
            id=request.id,
            model=self.model_name,
            text=text,
            finish_reason=reason,
            error=error or {"expired": "request deadline passed", "cancelled": "cancelled by the client"}.get(reason),
            prompt_tokens=len(request.prompt_token_ids),
            cached_tokens=cached_tokens,
            completion_tokens=completion_tokens,
            timings=Timings(
                queued_s=(started or now) - request.created,
                ttft_s=None if first_token_at is None else first_token_at - request.created,
                total_s=now - request.created,
            ),
            worker=self.worker_id,
            conversation=request.conversation,
            finished=now,
        )
