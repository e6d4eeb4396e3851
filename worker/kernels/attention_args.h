// The argument checks both attention ops share (cached_attention_op.h, avx512/prompt_attention_amx.cpp).
#pragma once
#include <torch/extension.h>

// A sequence's rows of [B, kv_heads, group, head_dim] lie anywhere, but each one contiguous.
inline bool rows_contiguous(const torch::Tensor& t) {
    return t.dim() == 4 && t.stride(3) == 1 && t.stride(2) == t.size(3) && t.stride(1) == t.size(2) * t.size(3);
}

// q, out [rows, kv_heads, group, head_dim] bf16; k_cache, v_cache [slots, kv_heads, capacity, head_dim] bf16.
inline void check_attention_args(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                 const torch::Tensor& out) {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16 && rows_contiguous(q), "q: bf16 [B, kv_heads, group, head_dim]");
    TORCH_CHECK(out.scalar_type() == at::kBFloat16 && rows_contiguous(out) && out.sizes() == q.sizes(), "out: like q");
    TORCH_CHECK(k_cache.scalar_type() == at::kBFloat16 && k_cache.is_contiguous() && k_cache.dim() == 4, "k_cache");
    TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == at::kBFloat16 &&
                    v_cache.is_contiguous(), "v_cache: like k_cache");
    TORCH_CHECK(k_cache.size(1) == q.size(1) && k_cache.size(3) == q.size(3), "q and the caches' heads");
}

// A tile of query rows of one sequence: row i at q + i * q_row (its output at out + i * out_row) attends to its
// first len + i keys.
struct QueryRows {
    const at::BFloat16* q;
    at::BFloat16* out;
    int64_t q_row, out_row, len;
    QueryRows at(int64_t i) const { return {q + i * q_row, out + i * out_row, q_row, out_row, len + i}; }
};
