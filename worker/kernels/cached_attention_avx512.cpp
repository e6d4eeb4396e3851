// Attention of query rows over the slot KV cache with AVX512-BF16: a row (one token: a decoding one, or one of a
// prompt chunk) attends to its sequence's first `length` cached keys. Each (row, KV head) task reads those keys and
// values straight from the cache (no gather, no padding to the longest sequence, no mask), with scores, softmax and
// the weighted sum in float32. A task's result depends on its own row only, so a token's output is the same in any
// batch, and the same whether it was decoded or prefilled.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace {

inline __m512 bf16_to_float(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }

// e^x for x <= 0: 2^n * 2^f, f in [-0.5, 0.5], Taylor to degree 6 (relative error ~1e-7).
inline __m512 exp_nonpositive(__m512 x) {
    const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.44269504f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718f));
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// One sequence's GROUP query heads that share one KV head; HD the head size.
template <int GROUP, int HD>
void attend(const at::BFloat16* q, const at::BFloat16* k, const at::BFloat16* v, at::BFloat16* out, int64_t len,
            float scale, float* scores) {
    constexpr int PAIRS = HD / 32;  // 32 bf16 a register for the dot products
    constexpr int CHUNKS = HD / 16; // 16 floats a register for the weighted sum
    __m512bh qv[GROUP][PAIRS];
    for (int g = 0; g < GROUP; ++g)
        for (int c = 0; c < PAIRS; ++c) qv[g][c] = (__m512bh)_mm512_loadu_si512(q + g * HD + c * 32);

    float top[GROUP];
    std::fill_n(top, GROUP, -INFINITY);
    for (int64_t j = 0; j < len; ++j) {
        __m512bh kv[PAIRS];
        for (int c = 0; c < PAIRS; ++c) kv[c] = (__m512bh)_mm512_loadu_si512(k + j * HD + c * 32);
        for (int g = 0; g < GROUP; ++g) {
            __m512 dot = _mm512_setzero_ps();
            for (int c = 0; c < PAIRS; ++c) dot = _mm512_dpbf16_ps(dot, qv[g][c], kv[c]);
            const float s = _mm512_reduce_add_ps(dot) * scale;
            scores[g * len + j] = s;
            top[g] = std::max(top[g], s);
        }
    }

    float total[GROUP];
    for (int g = 0; g < GROUP; ++g) {
        float* row = scores + g * len;
        const __m512 max = _mm512_set1_ps(top[g]);
        __m512 sum = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 16 <= len; j += 16) {
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + j), max));
            _mm512_storeu_ps(row + j, e);
            sum = _mm512_add_ps(sum, e);
        }
        if (j < len) {
            const __mmask16 tail = (__mmask16)((1u << (len - j)) - 1);
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, row + j), max));
            _mm512_mask_storeu_ps(row + j, tail, e);
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
        }
        total[g] = _mm512_reduce_add_ps(sum);
    }

    __m512 acc[GROUP][CHUNKS];
    for (int g = 0; g < GROUP; ++g)
        for (int c = 0; c < CHUNKS; ++c) acc[g][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; ++j) {
        __m512 vv[CHUNKS];
        for (int c = 0; c < CHUNKS; ++c)
            vv[c] = bf16_to_float(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + j * HD + c * 16)));
        for (int g = 0; g < GROUP; ++g) {
            const __m512 p = _mm512_set1_ps(scores[g * len + j]);
            for (int c = 0; c < CHUNKS; ++c) acc[g][c] = _mm512_fmadd_ps(p, vv[c], acc[g][c]);
        }
    }
    for (int g = 0; g < GROUP; ++g) {
        const __m512 inv = _mm512_set1_ps(1.0f / total[g]);
        for (int c = 0; c < CHUNKS; c += 2) {
            const __m512 lo = _mm512_mul_ps(acc[g][c], inv), hi = _mm512_mul_ps(acc[g][c + 1], inv);
            _mm512_storeu_si512(out + g * HD + c * 16, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    }
}

template <int GROUP, int HD>
void run(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
         const torch::Tensor& slots, const torch::Tensor& lengths, double scale, torch::Tensor& out) {
    const int64_t B = q.size(0), n_kv = q.size(1), capacity = k_cache.size(2);
    const int64_t* slot = slots.data_ptr<int64_t>();
    const int64_t* length = lengths.data_ptr<int64_t>();
    const int64_t longest = B ? *std::max_element(length, length + B) : 0;
    const auto* Q = q.data_ptr<at::BFloat16>();
    const auto* K = k_cache.data_ptr<at::BFloat16>();
    const auto* V = v_cache.data_ptr<at::BFloat16>();
    auto* O = out.data_ptr<at::BFloat16>();
    const int64_t q_row = q.stride(0), out_row = out.stride(0);
    at::parallel_for(0, B * n_kv, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scores(GROUP * longest);
        for (int64_t task = begin; task < end; ++task) {
            const int64_t b = task / n_kv, h = task % n_kv;
            const int64_t cache_row = (slot[b] * n_kv + h) * capacity * HD;
            const int64_t head = h * GROUP * HD;
            attend<GROUP, HD>(Q + b * q_row + head, K + cache_row, V + cache_row, O + b * out_row + head, length[b],
                              static_cast<float>(scale), scores.data());
        }
    });
}

}  // namespace

// A sequence's rows of [B, kv_heads, group, head_dim] lie anywhere, but each one contiguous.
bool rows_contiguous(const torch::Tensor& t) {
    return t.dim() == 4 && t.stride(3) == 1 && t.stride(2) == t.size(3) && t.stride(1) == t.size(2) * t.size(3);
}

// q, out [rows, kv_heads, group, head_dim] bf16; k_cache, v_cache [slots, kv_heads, capacity, head_dim] bf16; slots
// and lengths (keys to attend, the row's own included) int64 [rows].
void cached_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                      const torch::Tensor& slots, const torch::Tensor& lengths, double scale, torch::Tensor& out) {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16 && rows_contiguous(q), "q: bf16 [B, kv_heads, group, head_dim]");
    TORCH_CHECK(out.scalar_type() == at::kBFloat16 && rows_contiguous(out) && out.sizes() == q.sizes(), "out: like q");
    TORCH_CHECK(k_cache.scalar_type() == at::kBFloat16 && k_cache.is_contiguous() && k_cache.dim() == 4, "k_cache");
    TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == at::kBFloat16 &&
                    v_cache.is_contiguous(), "v_cache: like k_cache");
    TORCH_CHECK(k_cache.size(1) == q.size(1) && k_cache.size(3) == q.size(3), "q and the caches' heads");
    TORCH_CHECK(slots.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong && slots.size(0) == q.size(0) &&
                    lengths.size(0) == q.size(0), "slots, lengths: int64 [B]");
    const int64_t* length = lengths.data_ptr<int64_t>();
    const int64_t* slot = slots.data_ptr<int64_t>();
    for (int64_t b = 0; b < q.size(0); ++b) {
        TORCH_CHECK(length[b] >= 1 && length[b] <= k_cache.size(2), "lengths: 1..capacity");
        TORCH_CHECK(slot[b] >= 0 && slot[b] < k_cache.size(0), "slots: 0..slots-1");
    }
    const int64_t group = q.size(2), hd = q.size(3);
#define CASE(G, H) \
    if (group == G && hd == H) { run<G, H>(q, k_cache, v_cache, slots, lengths, scale, out); return; }
    CASE(1, 64) CASE(2, 64) CASE(3, 64) CASE(4, 64) CASE(5, 64) CASE(6, 64) CASE(7, 64) CASE(8, 64)
    CASE(1, 128) CASE(2, 128) CASE(3, 128) CASE(4, 128) CASE(5, 128) CASE(6, 128) CASE(7, 128) CASE(8, 128)
#undef CASE
    TORCH_CHECK(false, "cached_attention: query heads per KV head 1-8 and head size 64 or 128 only");
}

TORCH_LIBRARY_FRAGMENT(llmfleet, ops) {
    ops.def("cached_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor lengths, float scale, "
            "Tensor(a!) out) -> ()");
    ops.impl("cached_attention", torch::kCPU, &cached_attention);
}
