"""Steps of a causal LM that worker.llama_runner does not compute (its own layers refuse the model: another model
type, sliding windows shorter than the context, soft-capped scores, partial rotary, norms elsewhere), through the
model's own transformers forward, as vLLM's Transformers backend serves the models it has no implementation of.

The step's rows (decoding tokens, then prompt chunks) go through one forward as one flat sequence, each row at its
own position, so the linear layers, norms and rotary embeddings are the model's and run once a step for every
sequence. Attention is ours: registered as a transformers attention implementation, it receives each layer's keys
and values after their rotation, writes them into the slot KV cache (one [slots, kv_heads, capacity, head_dim]
tensor a layer, as the own runner's) and lets each row see only its own sequence's keys up to its position, within
the layer's window, with the scores soft-capped where the layer says so. A model whose layers keep another state
(recurrent or linear-attention layers) or pass attention something it does not compute is refused when it loads:
its step must give the logits of its own forward (`check_matches_forward`).

Slower than the own runner (torch's ops instead of the worker's kernels, one attention call per prompt chunk); it
serves what the own runner cannot. LoRA adapters are the own runner's only.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import DummyLayer, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from worker.llama_runner import ModelNotServable, PrefillChunk, check_kv_fits, flat_rows, zeros_on_demand

ATTENTION = "llmfleet_slots"
_ATTENTION_CACHES = (DynamicLayer, DynamicSlidingWindowLayer, DummyLayer)
"""The cache layers of models whose layers keep keys and values only (DummyLayer: a layer without attention)."""
_STEP: contextvars.ContextVar[_Step] = contextvars.ContextVar("llmfleet_step")


class _Rows:
    """Rows of the step that attend alike: one sequence's consecutive rows (a prompt chunk, a decoding token and its
    guesses), or sequences' single decoding rows together."""

    def __init__(self, rows: list[int], slots: list[int], positions: list[int], device: torch.device):
        self.run = len(set(slots)) == 1
        self.rows = slice(rows[0], rows[-1] + 1) if self.run else torch.tensor(rows, device=device)
        # Single rows' keys: a view of the span of slots they lie in where it is at most twice as many (a query a
        # slot, those without a row masked but for the first key, their outputs unread), else gathered (copied:
        # decode of 32 at 300 cached tokens 96 -> 63 ms a step in the span; 2 rows in slots 0 and 63 19 -> 60 ms).
        first, last = min(slots), max(slots)
        spanned = last - first < 2 * len(slots)
        self.entries = last - first + 1 if spanned else len(slots)
        if self.run:
            self.slots, self.places = first, None
        elif spanned:
            self.slots, self.places = slice(first, last + 1), torch.tensor([s - first for s in slots], device=device)
        else:
            self.slots, self.places = torch.tensor(slots, device=device), torch.arange(len(slots), device=device)
        self.length = max(positions) + 1
        self._positions = torch.tensor(positions, device=device)
        self._keys = torch.arange(self.length, device=device)
        self._allowed: dict[int | None, torch.Tensor] = {}

    def allowed(self, window: int | None) -> torch.Tensor:
        """[1, 1, rows, keys] for a run, [entries, 1, 1, keys] for single rows (an entry a slot of their span, or a
        row): which keys each row sees (its own and earlier positions, the last `window` of them), made once a step
        for each window."""
        if window not in self._allowed:
            keys, rows = self._keys[None, :], self._positions[:, None]
            allowed = keys <= rows
            if window:
                allowed &= keys > rows - window
            if not self.run:
                spanned = torch.zeros(self.entries, self.length, dtype=torch.bool, device=keys.device)
                spanned[:, 0] = True
                spanned[self.places] = allowed
                allowed = spanned
            self._allowed[window] = allowed[None, None] if self.run else allowed[:, None, None]
        return self._allowed[window]


@dataclass
class _Step:
    runner: TransformersRunner
    slots: torch.Tensor
    """Each row's slot and position."""
    positions: torch.Tensor
    groups: list[_Rows]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float, softcap: float | None
) -> torch.Tensor:
    """q [b, heads, rows, d], k/v [b, kv_heads, keys, d], allowed [b, 1, rows, keys] -> [b, heads, rows, d]."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.tanh(torch.matmul(q, k.transpose(-1, -2)).float() * (scale / softcap)) * softcap
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1).to(v.dtype)
    return torch.matmul(weights, v)


def slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function (AttentionInterface): query [1, heads, rows, d], key/value [1, kv_heads, rows,
    d] -> [1, rows, heads, d]."""
    if kwargs.get("s_aux") is not None:
        raise ModelNotServable("its attention adds sink logits (s_aux)")
    step = _STEP.get()
    k_cache, v_cache = step.runner.caches(module.layer_idx, key, value)
    k_cache[step.slots, :, step.positions] = key[0].transpose(0, 1)
    v_cache[step.slots, :, step.positions] = value[0].transpose(0, 1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    rows, heads = query.shape[2], query.shape[1]
    out = query.new_empty(rows, heads, value.shape[-1])  # values' dims: DeepSeek's latent attention has its own
    for group in step.groups:
        k, v = k_cache[group.slots, :, : group.length], v_cache[group.slots, :, : group.length]
        allowed = group.allowed(sliding_window)
        if group.run:
            q = query[:, :, group.rows]
            out[group.rows] = _attend(q, k[None], v[None], allowed, scale, softcap)[0].transpose(0, 1)
        else:  # each slot its own batch entry: [slots, heads, 1, d]
            q = query.new_zeros(k.shape[0], heads, 1, query.shape[-1])
            q[group.places] = query[0, :, group.rows].transpose(0, 1)[:, :, None]
            out[group.rows] = _attend(q, k, v, allowed, scale, softcap)[group.places, :, 0]
    return out[None], None


def structure_refusal(config) -> str | None:
    """Why the model's layers are not ones this runner steps, as far as its config tells, or None."""
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        return f"its model type {config.model_type!r} is not a causal LM transformers knows"
    if not model_class._can_set_attn_implementation():
        return f"{model_class.__name__}'s attention is not one transformers lets a server replace"
    if any(type(layer) not in _ATTENTION_CACHES for layer in DynamicCache(config=config).layers):
        return "its layers keep a state besides keys and values (recurrent or linear attention)"
    return None


class TransformersRunner:
    """worker.llama_runner.LlamaRunner's step, copy_prefix and prefault, for any causal LM transformers computes
    with AttentionInterface."""

    def __init__(self, model: torch.nn.Module, slots: int, capacity: int):
        if refusal := structure_refusal(model.config):
            raise ModelNotServable(f"the worker cannot serve this model: {refusal}")
        # Imported here: transformers' modeling code prints torch's notes at import, before the worker's logs are JSON.
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION, slot_attention)
        self.model = model
        self.slots = slots
        self.capacity = capacity
        self.dtype = self.compute_dtype = model.dtype
        self.device = model.device
        # Each layer's cache is made on its first step, in the shape of its keys (some models' heads are not their
        # config's head_dim): check_matches_forward's steps make them all.
        self.k_cache: dict[int, torch.Tensor] = {}
        self.v_cache: dict[int, torch.Tensor] = {}
        self.last_hidden: torch.Tensor | None = None
        """The step's rows with logits as the output projection took them (the final norm's output)."""
        model.get_output_embeddings().register_forward_pre_hook(self._keep_hidden)
        check_matches_forward(self)

    def caches(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.k_cache:
            _, heads, _, dims = key.shape
            if not self.k_cache:  # as if every layer's were the first's, before any is made
                layers = self.model.config.get_text_config().num_hidden_layers
                per_token = heads * (dims + value.shape[-1]) * key.element_size()
                check_kv_fits(layers * per_token * self.capacity, self.slots, self.device)
            self.k_cache[layer] = zeros_on_demand((self.slots, heads, self.capacity, dims), key.dtype, self.device)
            self.v_cache[layer] = zeros_on_demand((self.slots, *value.shape[1:2], self.capacity, value.shape[-1]),
                                                  value.dtype, self.device)  # fmt: skip
        return self.k_cache[layer], self.v_cache[layer]

    @property
    def kv_bytes_per_token(self) -> int:
        caches = (*self.k_cache.values(), *self.v_cache.values())
        return sum(c.shape[1] * c.shape[3] * c.element_size() for c in caches)

    def _keep_hidden(self, module: torch.nn.Module, args: tuple) -> None:
        self.last_hidden = args[0][0]

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def prefault(self, positions: int) -> None:
        for cache in (*self.k_cache.values(), *self.v_cache.values()):
            cache[:, :, :positions].zero_()

    @torch.inference_mode()
    def copy_prefix(self, source: int, target: int, length: int) -> None:
        for cache in (*self.k_cache.values(), *self.v_cache.values()):
            cache[target, :, :length].copy_(cache[source, :, :length])

    @torch.inference_mode()
    def step(
        self,
        decode_slots: list[int],
        decode_tokens: list[int],
        decode_positions: list[int],
        prefills: list[PrefillChunk],
        every_row: bool = False,
        adapters: list | None = None,
    ) -> torch.Tensor:
        """As LlamaRunner.step, without adapters."""
        if adapters and any(adapters):
            raise ValueError("LoRA adapters are served by the worker's own runner only")
        tokens, slots, positions, rows = flat_rows(decode_slots, decode_tokens, decode_positions, prefills)
        if every_row:
            rows = list(range(len(tokens)))
        step = _Step(self, torch.tensor(slots, device=self.device), torch.tensor(positions, device=self.device),
                     _groups(slots, positions, self.device))  # fmt: skip
        token = _STEP.set(step)
        try:
            keep = torch.tensor(rows, device=self.device)
            ids = torch.tensor([tokens], device=self.device)
            output = self.model(input_ids=ids, position_ids=step.positions[None], use_cache=False, logits_to_keep=keep)
        finally:
            _STEP.reset(token)
        return output.logits[0]


def _groups(slots: list[int], positions: list[int], device: torch.device) -> list[_Rows]:
    """The step's rows as runs of one sequence's consecutive rows, and the sequences' single rows together."""
    singles, groups = [], []
    first = 0
    for row in range(1, len(slots) + 1):
        if row < len(slots) and slots[row] == slots[row - 1] and positions[row] == positions[row - 1] + 1:
            continue
        if row - first == 1:
            singles.append(first)
        else:
            groups.append(_Rows(list(range(first, row)), slots[first:row], positions[first:row], device))
        first = row
    if singles:
        groups.append(_Rows(singles, [slots[r] for r in singles], [positions[r] for r in singles], device))
    return groups


def check_matches_forward(runner: TransformersRunner, length: int = 12) -> None:
    """Refuse a model whose step does not give the logits of its own forward (with its own attention): a prompt in
    two chunks, then a decoded token, against the whole sequence at once."""
    model = runner.model
    vocab = model.config.get_text_config().vocab_size
    tokens = [(7 * i + 3) % vocab for i in range(length)]
    own = model.config._attn_implementation
    with torch.inference_mode():
        expected = model(torch.tensor([tokens], device=runner.device), use_cache=False).logits[0].float()
    model.set_attn_implementation(ATTENTION)
    half = length // 2
    try:
        runner.step([], [], [], [PrefillChunk(0, tokens[:half], 0)])
        prompt = runner.step([], [], [], [PrefillChunk(0, tokens[half:-1], half)], every_row=True)
        decoded = runner.step([0], tokens[-1:], [length - 1], [])
        error = (torch.cat([prompt, decoded]).float() - expected[half:]).abs().max().item()
        if not error <= 0.05 * expected.abs().max().item():
            raise ModelNotServable(
                f"its step through the worker's slot attention differs from its own forward (logits {error:.3g}"
                " apart): its layers keep a state or compute attention in a way the worker does not"
            )
    except Exception as error:  # what its modules do with the flat rows and the slot attention, or the refusal
        model.set_attn_implementation(own)
        failed = f"its forward fails through the slot attention: {error!r}"
        why = error if isinstance(error, ModelNotServable) else failed
        raise ModelNotServable(f"the worker cannot serve this model: {why}") from error
