"""Attention of one step's query rows over the slot KV cache: each row, a decoding token or a token of a prompt chunk,
sees its own sequence's keys up to its own position. Rows are [tokens, heads, head_dim]: decodes first, then the
chunks in order (worker.llama_runner). Both ways below compute each row independently of the other rows in the
step, so a token's result does not depend on the batch (tested bit for bit).
"""

from __future__ import annotations

import torch

from worker import cpu_kernels

ATTENTION_BLOCK = 64
KEY_BLOCK = 16
"""Keys the AVX512 attention kernels store as one block (worker/kernels/common/rotary_to_cache.cpp)."""


def padded(n: int) -> int:
    return -(-n // ATTENTION_BLOCK) * ATTENTION_BLOCK


class KernelAttention:
    """worker/kernels/<isa>/cached_attention.cpp: one call a layer for all rows, each reading only its own sequence's
    keys and values, straight from the cache. In-process against MatmulAttention (AMD EPYC with AVX512-BF16), runner
    steps at ~450 cached tokens: decode 1 sequence 16.5 -> 10.2 ms, 32 sequences 84.8 -> 58.6 ms; attention of a
    128-token chunk after 900 cached tokens 4.8 -> 1.8 ms a layer. On an AVX2-only CPU, against the matmul path in
    float32 there (bf16 matmuls are emulated): decode 1 sequence 23.8 -> 18.5 ms, 32 sequences 260 -> 128 ms."""

    def __init__(
        self, slots: torch.Tensor, positions: torch.Tensor, n_kv: int, scale: float, prompt_chunks: list | None
    ):
        """`prompt_chunks`: the step's PrefillChunks, their rows after the decoding ones, to attend on AMX tiles
        (prompt_attention_amx: a 256-row chunk after 1,536 cached keys 6.6 -> 1.5 ms a layer); None: every row with
        cached_attention."""
        self.n_kv, self.scale, self.prompt_chunks = n_kv, scale, prompt_chunks
        rows = len(slots) - sum(len(chunk.tokens) for chunk in prompt_chunks) if prompt_chunks else len(slots)
        self.vector_rows, self.slots, self.lengths = rows, slots[:rows], positions[:rows] + 1

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor) -> None:
        rows, heads, head_dim = q.shape
        q, out = (t.view(rows, self.n_kv, heads // self.n_kv, head_dim) for t in (q, out))
        n = self.vector_rows
        if n:
            cpu_kernels.op("cached_attention")(q[:n], k_cache, v_cache, self.slots, self.lengths, self.scale, out[:n])
        first = n
        for chunk in self.prompt_chunks or ():
            end = first + len(chunk.tokens)
            cpu_kernels.op("prompt_attention_amx")(
                q[first:end], k_cache, v_cache, chunk.slot, chunk.start, self.scale, out[first:end]
            )
            first = end


class MatmulAttention:
    """The same with torch's batched matmuls, where the kernel does not run: every query row is one small matmul over
    head_dim, a float32 softmax, and one matmul over keys padded to a multiple of ATTENTION_BLOCK, so reductions group
    the same way whatever the batch."""

    def __init__(
        self,
        decode_slots: list[int],
        decode_positions: list[int],
        prefills: list,
        slots: torch.Tensor,
        positions: torch.Tensor,
        n_kv: int,
        group: int,
        key_positions: torch.Tensor,
        scale: float,
    ):
        """`key_positions`: arange(capacity), kept by the caller so that no step builds it again."""
        self.n_decode = n_decode = len(decode_slots)
        self.prefills, self.n_kv, self.group, self.scale = prefills, n_kv, group, scale
        self.decode_rows = slots[:n_decode]
        capacity = key_positions.shape[0]
        if n_decode:
            # Decode attention reads the decoding slots' cache rows. Slots 0..n-1 (the usual case) are a plain
            # view; a few scattered slots are gathered (a copy of only their rows); many slots with holes are read
            # as the range [0, width), where rows not decoding see only position 0, a harmless dummy.
            self.kv_len = min(padded(max(decode_positions) + 1), capacity)
            if decode_slots == list(range(n_decode)):
                self.layout, width = "view", n_decode
            elif max(decode_slots) + 1 > 2 * n_decode:
                self.layout, width = "gather", n_decode
            else:
                self.layout, width = "holes", max(decode_slots) + 1
            self.width = width
            limit = torch.zeros(width, dtype=torch.long, device=slots.device)
            holes = self.layout == "holes"
            limit[self.decode_rows if holes else torch.arange(n_decode, device=slots.device)] = positions[:n_decode]
            self.decode_hidden = (key_positions[: self.kv_len].unsqueeze(0) > limit.unsqueeze(1)).view(
                width, 1, 1, self.kv_len
            )
        self.prefill_hidden = []
        for chunk in prefills:
            # [n * group, kv_len] mask of the keys each query row of the chunk must not see.
            end = chunk.start + len(chunk.tokens)
            query_pos = key_positions[chunk.start : end].repeat_interleave(group)
            kv_len = min(padded(end), capacity)
            self.prefill_hidden.append(key_positions[:kv_len].unsqueeze(0) > query_pos.unsqueeze(1))

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor) -> None:
        n_decode, n_kv, group, head_dim = self.n_decode, self.n_kv, self.group, q.shape[-1]
        if n_decode:
            q_dec = q[:n_decode].view(n_decode, n_kv, group, head_dim)
            rows = self.decode_rows if self.layout == "gather" else slice(0, self.width)
            keys, values = k_cache[rows, :, : self.kv_len], v_cache[rows, :, : self.kv_len]
            if self.layout == "holes":
                q_dec = q.new_zeros(self.width, n_kv, group, head_dim).index_copy_(0, self.decode_rows, q_dec)
            o = _attention(q_dec, keys, values, self.decode_hidden, self.scale, decode=True)
            if self.layout == "holes":
                o = o[self.decode_rows]
            out[:n_decode] = o.view(n_decode, -1, head_dim)
        offset = n_decode
        for chunk, hidden_keys in zip(self.prefills, self.prefill_hidden):
            n = len(chunk.tokens)
            keys_len = hidden_keys.shape[-1]
            # [n, heads] -> [kv_heads, n * group]: each kv head's query rows, as in the decode layout.
            q_pre = q[offset : offset + n].view(n, n_kv, group, head_dim).transpose(0, 1)
            q_pre = q_pre.reshape(n_kv, n * group, head_dim)
            keys, values = k_cache[chunk.slot, :, :keys_len], v_cache[chunk.slot, :, :keys_len]
            o = _attention(q_pre, keys, values, hidden_keys, self.scale)
            out[offset : offset + n] = o.view(n_kv, n, group, head_dim).transpose(0, 1).reshape(n, -1, head_dim)
            offset += n


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
