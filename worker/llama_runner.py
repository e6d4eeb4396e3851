"""One forward step of a Llama-family model over many sequences at once, on our own slot KV cache.

Why not transformers' `generate` or its continuous-batching manager: a step here mixes single-token decodes of
every running sequence with prompt chunks of new ones in one flat [tokens, hidden] batch, so the (GPTQ) linear
layers run once per step for everybody, and each sequence keeps its own position, sampling and lifetime.
The weights and layer modules are the transformers model's own; only the attention bookkeeping is ours (and, for
gptqmodel's ATen int4 layers, calling them: worker.int4_calls).

KV cache: per layer one [slots, kv_heads, capacity, head_dim] tensor. A sequence owns a slot from its first
prompt chunk to its end. On the CPU the tensors live in anonymous memory maps: zeros that become resident only
where positions are written, so a large capacity costs nothing until used, and no position ever holds garbage
(a NaN there would poison the masked-out keys' zero weights).

Attention (and so the KV cache) computes in float32 on a CPU without native bfloat16 arithmetic (AVX2, or AVX512
without its BF16 extension): on AVX2 a bf16 batched matmul runs at ~3 GFLOP/s, and a 400-token prefill spent 4.1 of
its 6.8 s in attention. (The output projection would gain too, but a float32 matmul there rounds differently with
the number of rows: not batch-invariant.)

Batch invariance: a token's logits do not depend on what else is in the step, nor on how its prompt was chunked
or whether its prefix came from the cache. The linear layers already compute each row independently of the
others; attention is written so it does too: every query row (decode or prefill) is one small matmul over
head_dim, a float32 softmax, and one matmul over keys padded to a multiple of ATTENTION_BLOCK, so reductions
group the same way whatever the batch. That is what makes greedy output repeatable under load and the prefix
cache exact.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch

from worker.int4_calls import layer_calls

ATTENTION_BLOCK = 64


def _zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    size = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
    # The tensor keeps the map alive: torch.frombuffer holds a reference to the buffer it wraps.
    return torch.frombuffer(mmap.mmap(-1, size), dtype=dtype).view(shape)


def native_bf16(device: torch.device) -> bool:
    # oneDNN also runs bf16 on AVX512 CPUs without AVX512-BF16 (Ice Lake), by emulation: slower than float32 there
    # (decode of 32 sequences 346 vs 230 ms), and a row's result depends on how many rows share the call.
    return device.type != "cpu" or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    return torch.float32 if dtype == torch.bfloat16 and not native_bf16(device) else dtype


def _padded(n: int) -> int:
    return -(-n // ATTENTION_BLOCK) * ATTENTION_BLOCK


@dataclass(frozen=True)
class PrefillChunk:
    slot: int
    tokens: list[int]
    start: int
    """Position of tokens[0] in the sequence (tokens before it are already in the cache)."""


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaRunner:
    def __init__(self, model: torch.nn.Module, slots: int, capacity: int):
        config = model.config
        self.model = model
        self.layers = model.model.layers
        self.embed = model.model.embed_tokens
        self.norm = model.model.norm
        self.lm_head = model.lm_head
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.slots = slots
        self.capacity = capacity = _padded(capacity)
        self.dtype = model.dtype
        self.device = model.device
        self.compute_dtype = compute_dtype(self.dtype, self.device)
        # Emulated bf16 gives the output projection's rows other bits in calls of 1-3 rows or an odd number of rows;
        # padding the call to an even count of at least 4 keeps a token's logits independent of the batch.
        self.pad_logit_rows = self.dtype == torch.bfloat16 and not native_bf16(self.device)
        self.calls = [layer_calls(layer, self.dtype) for layer in self.layers]

        shape = (slots, self.n_kv, capacity, self.head_dim)
        self.k_cache = [_zeros_on_demand(shape, self.compute_dtype, self.device) for _ in self.layers]
        self.v_cache = [_zeros_on_demand(shape, self.compute_dtype, self.device) for _ in self.layers]
        self.kv_bytes_per_token = 2 * len(self.layers) * self.n_kv * self.head_dim * self.k_cache[0].element_size()

        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            raise NotImplementedError(f"rope_type {rope.get('rope_type')!r}")
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        freqs = torch.outer(torch.arange(capacity, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(self.compute_dtype).to(self.device)
        self.sin = emb.sin().to(self.compute_dtype).to(self.device)
        self._positions = torch.arange(capacity, device=self.device)

    def _causal_hidden(self, chunk: PrefillChunk, group: int) -> torch.Tensor:
        """[n * group, kv_len] mask of the keys each query row of a prompt chunk must not see."""
        end = chunk.start + len(chunk.tokens)
        kv_len = min(_padded(end), self.capacity)
        query_pos = self._positions[chunk.start : end].repeat_interleave(group)
        return self._positions[:kv_len].unsqueeze(0) > query_pos.unsqueeze(1)

    @torch.inference_mode()
    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Give slot `target` the KV of the first `length` positions of slot `source` (prefix reuse)."""
        for cache in (*self.k_cache, *self.v_cache):
            cache[target, :, :length].copy_(cache[source, :, :length])

    @torch.inference_mode()
    def step(
        self,
        decode_slots: list[int],
        decode_tokens: list[int],
        decode_positions: list[int],
        prefills: list[PrefillChunk],
    ) -> torch.Tensor:
        """Run one step. Returns float32 logits: one row per decode sequence, then one row per prefill chunk (the
        logits after its last token; callers ignore the row of a chunk that does not finish its prompt)."""
        n_decode = len(decode_tokens)
        tokens = list(decode_tokens)
        slots = list(decode_slots)
        positions = list(decode_positions)
        for chunk in prefills:
            tokens.extend(chunk.tokens)
            slots.extend([chunk.slot] * len(chunk.tokens))
            positions.extend(range(chunk.start, chunk.start + len(chunk.tokens)))
        device = self.device
        ids = torch.tensor(tokens, device=device)
        pos = torch.tensor(positions, device=device)
        slot_idx = torch.tensor(slots, device=device)
        n_tokens = ids.shape[0]
        cos = self.cos[pos].unsqueeze(1)
        sin = self.sin[pos].unsqueeze(1)

        # Row of each new token's K/V, per kv head, in the cache viewed as [slots * n_kv * capacity, head_dim]:
        # computed once per step, then every layer writes with one index_copy_.
        heads = torch.arange(self.n_kv, device=device)
        kv_rows = ((slot_idx.unsqueeze(1) * self.n_kv + heads) * self.capacity + pos.unsqueeze(1)).reshape(-1)

        group = self.n_heads // self.n_kv
        scale = self.head_dim**-0.5
        if n_decode:
            # Decode attention reads the decoding slots' cache rows. Slots 0..n-1 (the usual case) are a plain
            # view; a few scattered slots are gathered (a copy of only their rows); many slots with holes are read
            # as the range [0, width), where rows not decoding see only position 0, a harmless dummy.
            kv_len = min(_padded(max(decode_positions) + 1), self.capacity)
            decode_rows = slot_idx[:n_decode]
            if decode_slots == list(range(n_decode)):
                layout, width = "view", n_decode
            elif max(decode_slots) + 1 > 2 * n_decode:
                layout, width = "gather", n_decode
            else:
                layout, width = "holes", max(decode_slots) + 1
            limit = torch.zeros(width, dtype=torch.long, device=device)
            limit[decode_rows if layout == "holes" else torch.arange(n_decode, device=device)] = pos[:n_decode]
            decode_hidden = (self._positions[:kv_len].unsqueeze(0) > limit.unsqueeze(1)).view(width, 1, 1, kv_len)
        prefill_hidden = [self._causal_hidden(chunk, group) for chunk in prefills]

        hidden = self.embed(ids)
        for layer_no, layer in enumerate(self.layers):
            calls = self.calls[layer_no]
            qkv = calls.qkv(layer.input_layernorm(hidden)).view(n_tokens, -1, self.head_dim).to(self.compute_dtype)
            # Queries and keys side by side get their rotation in one pass: fewer small ops per layer.
            qk = qkv[:, : self.n_heads + self.n_kv]
            qk = qk * cos + _rotate_half(qk) * sin
            q, k, v = qk[:, : self.n_heads], qk[:, self.n_heads :], qkv[:, self.n_heads + self.n_kv :]
            k_cache, v_cache = self.k_cache[layer_no], self.v_cache[layer_no]
            k_cache.view(-1, self.head_dim).index_copy_(0, kv_rows, k.reshape(-1, self.head_dim))
            v_cache.view(-1, self.head_dim).index_copy_(0, kv_rows, v.reshape(-1, self.head_dim))

            out = torch.empty(n_tokens, self.n_heads, self.head_dim, dtype=self.compute_dtype, device=device)
            if n_decode:
                q_dec = q[:n_decode].view(n_decode, self.n_kv, group, self.head_dim)
                if layout == "gather":
                    keys, values = k_cache[decode_rows, :, :kv_len], v_cache[decode_rows, :, :kv_len]
                else:
                    keys, values = k_cache[:width, :, :kv_len], v_cache[:width, :, :kv_len]
                if layout == "holes":
                    q_dec = q.new_zeros(width, self.n_kv, group, self.head_dim).index_copy_(0, decode_rows, q_dec)
                o = _attention(q_dec, keys, values, decode_hidden, scale, decode=True)
                if layout == "holes":
                    o = o[decode_rows]
                out[:n_decode] = o.view(n_decode, self.n_heads, self.head_dim)
            offset = n_decode
            for chunk, hidden_keys in zip(prefills, prefill_hidden):
                n = len(chunk.tokens)
                keys_len = hidden_keys.shape[-1]
                # [n, heads] -> [kv_heads, n * group]: each kv head's query rows, as in the decode layout.
                q_pre = q[offset : offset + n].view(n, self.n_kv, group, self.head_dim).transpose(0, 1)
                q_pre = q_pre.reshape(self.n_kv, n * group, self.head_dim)
                o = _attention(
                    q_pre, k_cache[chunk.slot, :, :keys_len], v_cache[chunk.slot, :, :keys_len], hidden_keys, scale
                )
                out[offset : offset + n] = (
                    o.view(self.n_kv, n, group, self.head_dim).transpose(0, 1).reshape(n, self.n_heads, self.head_dim)
                )
                offset += n

            out = out.view(n_tokens, self.n_heads * self.head_dim).to(self.dtype)
            hidden = hidden + calls.o(out)
            hidden = hidden + calls.mlp(layer.post_attention_layernorm(hidden))

        rows = list(range(n_decode))
        offset = n_decode
        for chunk in prefills:
            offset += len(chunk.tokens)
            rows.append(offset - 1)
        n_rows = len(rows)
        if self.pad_logit_rows:
            rows += [rows[-1]] * (max(4, n_rows + n_rows % 2) - n_rows)
        last = hidden[torch.tensor(rows, device=device)]
        return self.lm_head(self.norm(last))[:n_rows].float()


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor, scale: float, decode: bool = False
) -> torch.Tensor:
    """softmax(q kᵀ) v per row, with `hidden` keys excluded. q [..., rows, d], k/v [..., keys, d].

    For decode rows the scores are computed as (k qᵀ)ᵀ, which reads the cache's keys as they lie, where q kᵀ had the
    matmul copy a transposed view of them first (decode steps at 600 tokens, 4 sequences 21.5 -> 17.9 ms, 32
    sequences 105 -> 72 ms). For prompt chunks, many query rows, q kᵀ stays faster."""
    if decode:
        scores = torch.matmul(k, q.transpose(-1, -2)).transpose(-1, -2).float().contiguous() * scale
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    probs = torch.softmax(scores.masked_fill_(hidden, float("-inf")), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)
