"""One forward step of a Llama-family model over many sequences at once, on our own slot KV cache.

Why not transformers' `generate` or its continuous-batching manager: a step here mixes single-token decodes of
every running sequence with prompt chunks of new ones in one flat [tokens, hidden] batch, so the (GPTQ) linear
layers run once per step for everybody, and each sequence keeps its own position, sampling and lifetime.
The weights and layer modules are the transformers model's own; the attention over the slot cache is ours
(worker.slot_attention), and so is calling the 4-bit layers' kernels directly (worker.int4_calls).

KV cache: per layer one [slots, kv_heads, capacity, head_dim] tensor (where our kernels run, each block
of KEY_BLOCK keys is stored with the dimension pairs outermost: worker/kernels/common/rotary_to_cache.cpp). A
sequence owns a slot from its first prompt chunk to its end. On the CPU the tensors live in anonymous memory maps:
zeros that become resident only where positions are written, so a large capacity costs nothing until used, and no
position ever holds garbage (a NaN there would poison the masked-out keys' zero weights).

Attention: on CPUs where worker.cpu_kernels builds (AVX512, AVX2), the kernel reads a bf16 cache and computes
in float32. Without it, with torch's matmuls, attention (and so the KV cache) computes in float32 on a CPU without
native bfloat16 arithmetic: on AVX2 a bf16 batched matmul runs at ~3 GFLOP/s, and a 400-token prefill spent 4.1 of
its 6.8 s in attention.

Batch invariance: a token's logits do not depend on what else is in the step, nor on how its prompt was chunked
or whether its prefix came from the cache. The linear layers already compute each row independently of the
others; attention does too (worker.slot_attention). That is what makes greedy output repeatable under load and the
prefix cache exact. Where the CPU has a tile op (worker.block_quant.TileRows), rows go to it unless
`batch_invariant`: on AMX, prompt rows always, and decoding rows when a step has many or has prompt rows too; on
AVX512-BF16 without AMX, a step's rows when it has many. A row's bits then depend on what shared its step (and
without AMX, a prompt row's on how the prompt was chunked). Either way, on AMX, a previous turn's answer taken from
the cache carries its decoding bits, where recomputing it as a prompt gives other last bits.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker import cpu_kernels
from worker.block_quant import DECODE_TILE_ROWS, BlockQuantLinear, TileRows
from worker.int4_calls import layer_calls
from worker.lora import Adapter, AdapterRows
from worker.slot_attention import KEY_BLOCK, KernelAttention, MatmulAttention, padded


def zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    size = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
    # The tensor keeps the map alive: torch.frombuffer holds a reference to the buffer it wraps.
    return torch.frombuffer(mmap.mmap(-1, size), dtype=dtype).view(shape)


def check_kv_fits(slot_bytes: int, slots: int, device: torch.device) -> None:
    """On a GPU the KV cache is allocated whole at start-up (on a CPU it is mapped on demand): refuse to start, saying
    which settings to lower, where it would not fit the memory free, instead of failing inside an allocation."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if slot_bytes * slots > free:
        raise MemoryError(
            f"the KV cache of {slots} slots x {slot_bytes / 2**20:.0f} MiB needs {slot_bytes * slots / 2**30:.1f} GiB"
            f" and {device} has {free / 2**30:.1f} GiB free: lower the model's max_context or batch.max_running, or set"
            " batch.prefix_cache_tokens to 0 (the prefix cache doubles the slots)"
        )


def native_bf16(device: torch.device) -> bool:
    # oneDNN also runs bf16 on AVX512 CPUs without AVX512-BF16 (Ice Lake), by emulation: slower than float32 there
    # (decode of 32 sequences 346 vs 230 ms), and a row's result depends on how many rows share the call.
    return device.type != "cpu" or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    return torch.float32 if dtype == torch.bfloat16 and not native_bf16(device) else dtype


MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "smollm3", "granite", "phi3")
"""The model types whose layers the runner computes as transformers' forward does (tests/test_architectures.py): a
norm before attention and before the MLP, a gated MLP, q/k/v projections (with biases: Qwen2; fused: Phi-3), per-head
norms of the queries and keys (Qwen3), layers without rotary embedding (SmolLM3's every fourth), the embeddings,
residual updates and logits scaled (Granite's multipliers). Others differ in ways it would not notice (OLMo 2's norms
after each block, Gemma 2's soft-capped scores): worker.transformers_runner steps those."""


class ModelNotServable(ValueError):
    pass


def positions_refusal(config, capacity: int) -> str | None:
    """Why neither runner gives a sequence's positions the angles and reach its own forward gives them, or None."""
    config = config.get_text_config()
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    # Linear and YaRN scaling stretch the positions it was trained on; a llama3 rope's config names the stretched ones.
    positions = config.max_position_embeddings * (rope.get("factor", 1) if rope_type in ("linear", "yarn") else 1)
    # Llama 4's chunked attention: its layers' masks are the model's own, which the slot attention does not make.
    chunk = getattr(config, "attention_chunk_size", None)
    # LongRoPE turns every position by other angles once a forward's sequence passes its original positions (Phi-3-mini-
    # 128k's 4,096), whatever shares the step; dynamic NTK once past max_position_embeddings (`positions`).
    original = rope.get("original_max_position_embeddings", positions)
    if rope_type == "longrope" and capacity > original:
        return f"its longrope angles change past {original:g} positions: set its max_context to {original:g} at most"
    if capacity > positions:
        return f"its positions go to {positions:g}: set its max_context to {positions:g} at most"
    if chunk and chunk < capacity:
        return f"its layers attend within chunks of {chunk} positions: set its max_context to {chunk} at most"
    return None


def own_refusal(config, capacity: int) -> str | None:
    """Why LlamaRunner would compute the model otherwise than transformers, or None."""
    window = getattr(config, "sliding_window", None)
    sliding = "sliding_attention" in layer_types if (layer_types := getattr(config, "layer_types", None)) else window
    rope = getattr(config, "rope_parameters", None) or {}
    if config.model_type not in MODEL_TYPES:
        return f"its model type {config.model_type!r} is not one the own runner computes ({', '.join(MODEL_TYPES)})"
    if rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) != 1.0:
        return "its rotary embedding turns only part of each head"
    if sliding and window < capacity:
        return f"its layers attend to the last {window} positions only"
    return positions_refusal(config, capacity)


# The RMSNorm modules the rms_norm kernel computes as they do (float32 inside, the weight applied in the model's dtype).
_PLAIN_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "GraniteRMSNorm", "Phi3RMSNorm"}


def rms_norm(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`module` as one kernel call where worker.cpu_kernels runs (its eight small ops took ~60 us a call on an AVX2
    CPU, 61 calls a decode step), else the module itself."""
    weight = module.weight
    if (
        type(module).__name__ not in _PLAIN_RMS_NORMS
        or weight.device.type != "cpu"
        or weight.dtype != torch.bfloat16
        or not cpu_kernels.available()
    ):
        return module
    eps = module.variance_epsilon
    kernel = cpu_kernels.op("rms_norm")
    return lambda x: kernel(x.contiguous(), weight, eps)


def add_rms_norm(module: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(x, delta) -> (x + delta, `module`(x + delta)): the residual update and the norm after it in one kernel call
    where rms_norm's kernel runs."""
    norm = rms_norm(module)
    if norm is module:

        def separate(x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = x + delta
            return x, norm(x)

        return separate
    weight, eps = module.weight, module.variance_epsilon
    kernel = cpu_kernels.op("add_rms_norm")
    return lambda x, delta: kernel(x, delta.contiguous(), weight, eps)


@dataclass(frozen=True)
class PrefillChunk:
    slot: int
    tokens: list[int]
    start: int
    """Position of tokens[0] in the sequence (tokens before it are already in the cache)."""


def flat_rows(
    decode_slots: list[int], decode_tokens: list[int], decode_positions: list[int], prefills: list[PrefillChunk]
) -> tuple[list[int], list[int], list[int], list[int]]:
    """A step's rows as one flat batch, the decoding ones first, then each chunk's: their tokens, slots and positions,
    and the rows with logits (the decoding ones, then each chunk's last)."""
    tokens, slots, positions = list(decode_tokens), list(decode_slots), list(decode_positions)
    rows = list(range(len(tokens)))
    for chunk in prefills:
        tokens.extend(chunk.tokens)
        slots.extend([chunk.slot] * len(chunk.tokens))
        positions.extend(range(chunk.start, chunk.start + len(chunk.tokens)))
        rows.append(len(tokens) - 1)
    return tokens, slots, positions, rows


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaRunner:
    def __init__(self, model: torch.nn.Module, slots: int, capacity: int, batch_invariant: bool = False):
        config = model.config
        if refusal := own_refusal(config, capacity):
            raise ModelNotServable(f"the worker's own runner cannot serve this model: {refusal}")
        self.model = model
        self.layers = model.model.layers
        self.embed = model.model.embed_tokens
        self.lm_head = model.lm_head
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.scale = self.layers[0].self_attn.scaling
        # Granite scales the embeddings, each layer's updates of the residual stream and the logits (1: as Llama).
        self.embedding_multiplier = getattr(config, "embedding_multiplier", 1.0)
        self.residual_multiplier = getattr(config, "residual_multiplier", 1.0)
        self.logits_scaling = getattr(config, "logits_scaling", 1.0)
        # Qwen3 normalises each head's query and key before the rotation.
        attentions = [layer.self_attn for layer in self.layers]
        self.qk_norms = [(a.q_norm, a.k_norm) if hasattr(a, "q_norm") else None for a in attentions]
        self.slots = slots
        served = capacity
        self.capacity = capacity = padded(capacity)
        self.dtype = model.dtype
        self.device = model.device
        self.attention_kernel = (
            self.device.type == "cpu"
            and self.dtype == torch.bfloat16
            and 1 <= self.n_heads // self.n_kv <= 8
            and self.head_dim in (64, 128)
            and cpu_kernels.available()
        )
        # The kernel reads a bf16 cache on any CPU it runs on (it computes in float32).
        self.compute_dtype = torch.bfloat16 if self.attention_kernel else compute_dtype(self.dtype, self.device)
        # Emulated bf16 gives the output projection's rows other bits in calls of 1-3 rows or an odd number of rows;
        # padding the call to an even count of at least 4 keeps a token's logits independent of the batch.
        self.pad_logit_rows = (
            self.dtype == torch.bfloat16
            and not native_bf16(self.device)
            and not isinstance(self.lm_head, BlockQuantLinear)
        )
        # Prompt rows' products and attention on AMX tiles. Asked only on a CPU: the question builds the CPU kernels.
        self.prompt_tiles = self.device.type == "cpu" and cpu_kernels.amx()
        self.batch_invariant = batch_invariant  # decoding rows never on tiles (TileRows)
        self.tile_rows = TileRows()
        self.calls = [layer_calls(layer, self.dtype, self.tile_rows) for layer in self.layers]
        # The output projection goes to tiles only with the decoding rows: a prompt chunk has one row of logits.
        self.logit_rows = TileRows()
        self.logits = self.lm_head.rows_call(self.logit_rows) if isinstance(self.lm_head, BlockQuantLinear) else None
        # Each residual update comes with the norm that reads it next: a layer's MLP norm after attention, the next
        # layer's attention norm (the model's final one after the last layer) after the MLP.
        self.first_norm = rms_norm(self.layers[0].input_layernorm)
        self.next_norms = [layer.input_layernorm for layer in self.layers[1:]] + [model.model.norm]
        self.residual_norms = [
            (add_rms_norm(layer.post_attention_layernorm), add_rms_norm(after))
            for layer, after in zip(self.layers, self.next_norms)
        ]

        shape = (slots, self.n_kv, capacity, self.head_dim)
        element = torch.tensor([], dtype=self.compute_dtype).element_size()
        self.kv_bytes_per_token = 2 * len(self.layers) * self.n_kv * self.head_dim * element
        check_kv_fits(self.kv_bytes_per_token * capacity, slots, self.device)
        self.k_cache = [zeros_on_demand(shape, self.compute_dtype, self.device) for _ in self.layers]
        self.v_cache = [zeros_on_demand(shape, self.compute_dtype, self.device) for _ in self.layers]

        # Every position's angles from the model's own kind of rotary embedding (scaled as its rope type scales
        # them), built anew: a model cast to bf16 carries its frequencies in bf16.
        positions = torch.arange(capacity, device=self.device)
        rotary = type(model.model.rotary_emb)(config).to(self.device)
        # Only the served positions: a longer forward of a dynamic or LongRoPE model would turn them all otherwise.
        cos, sin = rotary(torch.empty(0, device=self.device), positions[None, :served])
        self.cos = torch.nn.functional.pad(cos[0], (0, 0, 0, capacity - served)).to(self.compute_dtype)
        self.sin = torch.nn.functional.pad(sin[0], (0, 0, 0, capacity - served)).to(self.compute_dtype)
        # SmolLM3 leaves some layers' queries and keys unrotated (no_rope_layers 0): a rotation by no angle.
        self.rotated = [bool(r) for r in getattr(config, "no_rope_layers", None) or [1] * len(self.layers)]
        self.unrotated = (torch.ones_like(self.cos), torch.zeros_like(self.sin)) if not all(self.rotated) else None
        self._positions = positions  # the matmul attention's masks
        self.layer_chain = self._layer_chain()

    def _layer_chain(self) -> Callable | None:
        """All the layers of a step in one call where every layer is on the worker's own kernels and attention is
        the kernel's (cpu_kernels.layer_chain: _layers' ops in its order, the same bits, without the Python between
        them); else None. Zen 4, in-process, decode of 1 / 4 / 8 sequences at 400 tokens: 5.67 / 9.12 / 13.77 -> 4.88
        / 8.27 / 12.79 ms; served, c=1: 132, 133 -> 169, 169 tok/s. AMX, a 250-token prefill 51.5-54.5 -> 48.1-50.4
        ms."""
        products = [getattr(calls, "products", None) for calls in self.calls]
        attention_norms = [layer.post_attention_layernorm for layer in self.layers]
        norms = [self.layers[0].input_layernorm, *attention_norms, *self.next_norms]
        if (
            not self.attention_kernel
            or any(self.qk_norms)
            or self.unrotated
            or (self.embedding_multiplier, self.residual_multiplier, self.logits_scaling) != (1.0, 1.0, 1.0)
            or None in products
            or any(p.bias is not None for layer in products for p in layer)  # the chain adds no bias
            or any(rms_norm(norm) is norm for norm in norms)  # a norm the kernel does not compute
            or len({norm.variance_epsilon for norm in norms}) != 1
            or len({(p.bits, p.group_size) for layer in products for p in layer}) != 1
        ):
            return None
        first = products[0][0]
        by_kind = [[layer[kind] for layer in products] for kind in range(4)]  # q/k/v, o, gate/up, down
        return cpu_kernels.layer_chain(
            cpu_kernels.block_quant_op(),
            cpu_kernels.tile_op() or cpu_kernels.block_quant_op(),
            "prompt_attention_amx" if self.prompt_tiles else "",
            [[p.packed for p in kind] for kind in by_kind],
            [[p.scales for p in kind] for kind in by_kind],
            [[p.mins for p in kind] for kind in by_kind],
            [norm.weight for norm in attention_norms],
            [norm.weight for norm in self.next_norms],
            self.k_cache, self.v_cache, self.cos, self.sin,
            self.n_heads, self.n_kv, self.head_dim, first.group_size, first.bits,
            norms[0].variance_epsilon, self.scale,
        )  # fmt: skip

    def synchronize(self) -> None:
        """Wait for the steps queued on a GPU (a GPU step returns once queued), for timings."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def prefault(self, positions: int) -> None:
        """Write the first `positions` of every slot's KV once, so that requests do not pay for the first touch of
        those pages: the cache is mapped on demand, and a page first written inside a step costs its fault under
        every thread of the step (served worker, c=1: TTFT of a request in a fresh slot 13.5 -> 7.5 ms)."""
        for cache in (*self.k_cache, *self.v_cache):
            cache[:, :, :positions].zero_()

    @torch.inference_mode()
    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Give slot `target` the KV of the first `length` positions of slot `source` (prefix reuse). Whole blocks
        of KEY_BLOCK positions, as the attention kernels store keys block by block (rotary_to_cache): the
        positions past `length` that come along are written by the target's own tokens before it reads them."""
        end = -(-length // KEY_BLOCK) * KEY_BLOCK  # within the capacity, a multiple of KEY_BLOCK
        for cache in (*self.k_cache, *self.v_cache):
            cache[target, :, :end].copy_(cache[source, :, :end])

    def _attention(
        self,
        decode_slots: list[int],
        decode_positions: list[int],
        prefills: list[PrefillChunk],
        slots: torch.Tensor,
        positions: torch.Tensor,
    ) -> KernelAttention | MatmulAttention:
        scale = self.scale
        if self.attention_kernel:
            return KernelAttention(slots, positions, self.n_kv, scale, prefills if self.prompt_tiles else None)
        group = self.n_heads // self.n_kv
        return MatmulAttention(
            decode_slots, decode_positions, prefills, slots, positions, self.n_kv, group, self._positions, scale
        )

    def _kernel_rotary(self, slots: torch.Tensor, positions: torch.Tensor, tables: tuple | None = None) -> Callable:
        """qkv -> rotated queries, with rotated keys and values written to the cache: one kernel call a layer.
        `tables`: (cos, sin) other than the model's."""
        rotary = cpu_kernels.op("rotary_to_cache")
        cos, sin = tables or (self.cos, self.sin)
        return lambda qkv, k_cache, v_cache: rotary(qkv, self.n_heads, cos, sin, slots, positions, k_cache, v_cache)

    def _torch_rotary(self, slots: torch.Tensor, positions: torch.Tensor, tables: tuple | None = None) -> Callable:
        """The same with torch ops."""
        cos, sin = tables or (self.cos, self.sin)
        cos = cos[positions].unsqueeze(1)
        sin = sin[positions].unsqueeze(1)
        # Row of each new token's K/V, per kv head, in the cache viewed as [slots * n_kv * capacity, head_dim]:
        # computed once per step, then every layer writes with one index_copy_.
        heads = torch.arange(self.n_kv, device=self.device)
        kv_rows = ((slots.unsqueeze(1) * self.n_kv + heads) * self.capacity + positions.unsqueeze(1)).reshape(-1)

        def to_cache(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
            # Queries and keys side by side get their rotation in one pass: fewer small ops per layer.
            qk = qkv[:, : self.n_heads + self.n_kv]
            qk = qk * cos + _rotate_half(qk) * sin
            k, v = qk[:, self.n_heads :], qkv[:, self.n_heads + self.n_kv :]
            k_cache.view(-1, self.head_dim).index_copy_(0, kv_rows, k.reshape(-1, self.head_dim))
            v_cache.view(-1, self.head_dim).index_copy_(0, kv_rows, v.reshape(-1, self.head_dim))
            return qk[:, : self.n_heads]

        return to_cache

    def _many(self, rows: int) -> bool:
        """Enough rows for the tile op to pay for rounding the weights, and permitted (TileRows)."""
        return rows >= DECODE_TILE_ROWS and not self.batch_invariant

    def _tile_start(self, n_decode: int, n_rows: int) -> int:
        if self.prompt_tiles:
            # AMX: prompt rows always; decoding rows too when many, or when prompt rows pay for the rounding anyway.
            prompt_rows = n_rows > n_decode
            return 0 if self._many(n_decode) or (prompt_rows and not self.batch_invariant) else n_decode
        return 0 if self._many(n_rows) else n_rows

    def _layers(
        self,
        hidden: torch.Tensor,
        normed: torch.Tensor,
        decode_slots: list[int],
        decode_positions: list[int],
        prefills: list[PrefillChunk],
        slot_idx: torch.Tensor,
        pos: torch.Tensor,
        last_rows: torch.Tensor | None,
        adapters: AdapterRows | None,
    ) -> torch.Tensor:
        """The step's layers, op by op: the final norm's rows that have logits (`last_rows`, where not all do)."""
        n_tokens = hidden.shape[0]
        attend = self._attention(decode_slots, decode_positions, prefills, slot_idx, pos)
        rotary = self._kernel_rotary if self.attention_kernel else self._torch_rotary
        to_cache = rotary(slot_idx, pos)
        unrotated = rotary(slot_idx, pos, self.unrotated) if self.unrotated else None
        if last_rows is not None:
            last_chunks = [PrefillChunk(c.slot, c.tokens[-1:], c.start + len(c.tokens) - 1) for c in prefills]
            attend_last = self._attention(
                decode_slots, decode_positions, last_chunks, slot_idx[last_rows], pos[last_rows]
            )
        last_layer = len(self.calls) - 1
        for layer_no, (calls, (mlp_norm, next_norm)) in enumerate(zip(self.calls, self.residual_norms)):
            qkv = calls.qkv(normed)
            if adapters:
                qkv = adapters.add(qkv, normed, layer_no, 0)
            qkv = qkv.view(n_tokens, -1, self.head_dim)
            if self.qk_norms[layer_no]:
                q_norm, k_norm = self.qk_norms[layer_no]
                q, k, v = qkv.split([self.n_heads, self.n_kv, self.n_kv], dim=1)
                qkv = torch.cat([q_norm(q), k_norm(k), v], dim=1)
            qkv = qkv.to(self.compute_dtype)
            k_cache, v_cache = self.k_cache[layer_no], self.v_cache[layer_no]
            q = (to_cache if self.rotated[layer_no] else unrotated)(qkv, k_cache, v_cache)
            if layer_no == last_layer and last_rows is not None:
                q, hidden, attend = q[last_rows], hidden[last_rows], attend_last
                adapters = adapters and adapters.subset(last_rows)
            out = torch.empty(q.shape[0], self.n_heads, self.head_dim, dtype=self.compute_dtype, device=self.device)
            attend(q, k_cache, v_cache, out)
            out = out.view(q.shape[0], self.n_heads * self.head_dim).to(self.dtype)
            attended = calls.o(out)
            if adapters:
                attended = adapters.add(attended, out, layer_no, 1)
            hidden, normed = mlp_norm(hidden, self._update(attended))
            mlp = self._adapted_mlp(calls, normed, adapters, layer_no) if adapters else calls.mlp(normed)
            hidden, normed = next_norm(hidden, self._update(mlp))
        return normed

    @staticmethod
    def _adapted_mlp(calls, x: torch.Tensor, adapters: AdapterRows, layer_no: int) -> torch.Tensor:
        """The MLP with each row's adapter updates of gate/up and down."""
        gated = calls.gated(adapters.add(calls.gate_up(x), x, layer_no, 2))
        return adapters.add(calls.down(gated), gated, layer_no, 3)

    def _update(self, delta: torch.Tensor) -> torch.Tensor:
        """A layer's update of the residual stream, as the model scales it."""
        return delta * self.residual_multiplier if self.residual_multiplier != 1.0 else delta

    @torch.inference_mode()
    def step(
        self,
        decode_slots: list[int],
        decode_tokens: list[int],
        decode_positions: list[int],
        prefills: list[PrefillChunk],
        every_row: bool = False,
        adapters: list[Adapter | None] | None = None,
    ) -> torch.Tensor:
        """Run one step. Returns logits in the model's dtype: one row per decode sequence, then one row per prefill
        chunk (the logits after its last token; callers ignore the row of a chunk that does not finish its prompt);
        with `every_row`, one per token of each chunk instead (prompt log probabilities). `adapters`: the LoRA adapter
        of each decode sequence, then of each chunk (None: the base model's), where any has one.
        Not converted to float32 here: a greedy choice needs no copy (32 rows of a 49k vocabulary: ~0.8 ms)."""
        n_decode = len(decode_tokens)
        n_logits = n_decode + (sum(len(c.tokens) for c in prefills) if every_row else len(prefills))
        self.tile_rows.start = self._tile_start(n_decode, n_decode + sum(len(chunk.tokens) for chunk in prefills))
        self.logit_rows.start = 0 if self._many(n_logits) else n_logits
        # In the last layer only the rows with logits go on past the keys and values (a prompt's other rows there
        # would feed nothing: ~3% of a prefill's work).
        tokens, slots, positions, rows = flat_rows(decode_slots, decode_tokens, decode_positions, prefills)
        device = self.device
        ids = torch.tensor(tokens, device=device)
        pos = torch.tensor(positions, device=device)
        slot_idx = torch.tensor(slots, device=device)
        last_rows = torch.tensor(rows, device=device) if len(rows) < len(tokens) and not every_row else None

        hidden = self.embed(ids)
        if self.embedding_multiplier != 1.0:
            hidden = hidden * self.embedding_multiplier
        normed = self.first_norm(hidden)
        rows_adapters = None
        if adapters and any(adapters):
            counts = [1] * n_decode + [len(chunk.tokens) for chunk in prefills]
            rows_adapters = AdapterRows([a for a, n in zip(adapters, counts) for _ in range(n)], device)
        if self.layer_chain and rows_adapters is None:
            chunks = [(chunk.slot, chunk.start, len(chunk.tokens)) for chunk in prefills] if self.prompt_tiles else []
            tile_start = self.tile_rows.start
            _, normed = self.layer_chain(hidden, normed, slot_idx, pos, pos + 1, tile_start, last_rows, chunks)
        else:
            normed = self._layers(
                hidden, normed, decode_slots, decode_positions, prefills, slot_idx, pos, last_rows, rows_adapters
            )
        self.last_hidden = normed
        """The final norm's output of the step's rows with logits (the embeddings of the prompts that end here)."""
        if self.pad_logit_rows:
            normed = normed[[*range(n_logits)] + [n_logits - 1] * (max(4, n_logits + n_logits % 2) - n_logits)]
        logits = (self.logits or self.lm_head)(normed)[:n_logits]
        return logits / self.logits_scaling if self.logits_scaling != 1.0 else logits
