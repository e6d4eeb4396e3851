"""One forward step of a Llama-family model over many sequences at once, on our own slot KV cache.

Why not transformers' `generate` or its continuous-batching manager: a step here mixes single-token decodes of
every running sequence with prompt chunks of new ones in one flat [tokens, hidden] batch, so the (GPTQ) linear
layers run once per step for everybody, and each sequence keeps its own position, sampling and lifetime.
The weights and layer modules are the transformers model's own; only the attention bookkeeping is ours.

KV cache: per layer one [slots, kv_heads, capacity, head_dim] tensor. A sequence owns a slot from its first
prompt chunk to its end. The tensors come from torch.empty, so memory is only touched (and resident) for the
positions actually written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
        self.capacity = capacity
        self.dtype = self.embed.weight.dtype
        self.device = self.embed.weight.device

        shape = (slots, self.n_kv, capacity, self.head_dim)
        self.k_cache = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]

        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            raise NotImplementedError(f"rope_type {rope.get('rope_type')!r}")
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        freqs = torch.outer(torch.arange(capacity, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(self.dtype).to(self.device)
        self.sin = emb.sin().to(self.dtype).to(self.device)
        self._positions = torch.arange(capacity, device=self.device)

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

        if n_decode:
            # Decode attention runs over slots [0, width). When the decoding slots are exactly 0..n-1 (the usual
            # case) queries map to cache rows directly; otherwise rows of slots not decoding see only position 0
            # (a harmless dummy), so slot holes cost a little compute but no copies.
            contiguous = decode_slots == list(range(n_decode))
            width = n_decode if contiguous else max(decode_slots) + 1
            kv_len = max(decode_positions) + 1
            limit = torch.zeros(width, dtype=torch.long, device=device)
            limit[slot_idx[:n_decode]] = pos[:n_decode]
            visible = self._positions[:kv_len].unsqueeze(0) <= limit.unsqueeze(1)
            decode_bias = torch.zeros(width, 1, 1, kv_len, device=device).masked_fill_(
                ~visible.view(width, 1, 1, kv_len), float("-inf")
            )
            decode_rows = slot_idx[:n_decode]
            group = self.n_heads // self.n_kv
            scale = self.head_dim**-0.5

        hidden = self.embed(ids)
        for layer_no, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(n_tokens, self.n_heads, self.head_dim)
            k = attn.k_proj(x).view(n_tokens, self.n_kv, self.head_dim)
            v = attn.v_proj(x).view(n_tokens, self.n_kv, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k_cache, v_cache = self.k_cache[layer_no], self.v_cache[layer_no]
            k_cache.view(-1, self.head_dim).index_copy_(0, kv_rows, k.reshape(-1, self.head_dim))
            v_cache.view(-1, self.head_dim).index_copy_(0, kv_rows, v.reshape(-1, self.head_dim))

            out = torch.empty_like(q)
            if n_decode:
                # Grouped-query attention for one query token per sequence, as two small batched matmuls: much
                # cheaper on CPU than the flash kernel, which is built for long query blocks.
                q_dec = q[:n_decode].view(n_decode, self.n_kv, group, self.head_dim)
                if not contiguous:
                    q_dec = q.new_zeros(width, self.n_kv, group, self.head_dim).index_copy_(0, decode_rows, q_dec)
                scores = torch.matmul(q_dec, k_cache[:width, :, :kv_len].transpose(2, 3)).float() * scale
                probs = torch.softmax(scores + decode_bias, dim=-1).to(q.dtype)
                o = torch.matmul(probs, v_cache[:width, :, :kv_len])
                if not contiguous:
                    o = o[decode_rows]
                out[:n_decode] = o.view(n_decode, self.n_heads, self.head_dim)
            offset = n_decode
            for chunk in prefills:
                n = len(chunk.tokens)
                end = chunk.start + n
                q_pre = q[offset : offset + n].transpose(0, 1).unsqueeze(0)
                k_pre = k_cache[chunk.slot : chunk.slot + 1, :, :end]
                v_pre = v_cache[chunk.slot : chunk.slot + 1, :, :end]
                if chunk.start == 0:
                    o = F.scaled_dot_product_attention(q_pre, k_pre, v_pre, is_causal=True, enable_gqa=True)
                else:
                    mask = self._positions[:end].unsqueeze(0) <= self._positions[chunk.start : end].unsqueeze(1)
                    o = F.scaled_dot_product_attention(q_pre, k_pre, v_pre, attn_mask=mask, enable_gqa=True)
                out[offset : offset + n] = o.squeeze(0).transpose(0, 1)
                offset += n

            hidden = hidden + attn.o_proj(out.view(n_tokens, self.n_heads * self.head_dim))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))

        rows = list(range(n_decode))
        offset = n_decode
        for chunk in prefills:
            offset += len(chunk.tokens)
            rows.append(offset - 1)
        last = hidden[torch.tensor(rows, device=device)]
        return self.lm_head(self.norm(last)).float()
