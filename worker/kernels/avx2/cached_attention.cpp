// Attention of query rows over the slot KV cache with AVX2 and FMA, for CPUs without AVX512-BF16: the same op and
// the same way as ../avx512/cached_attention.cpp (each (row, KV head) task reads its sequence's first `length`
// keys and values straight from the bf16 cache; scores, softmax and the weighted sum in float32), so a token's
// output is the same in any batch, and the same whether it was decoded or prefilled.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <vector>

#include "simd.h"

namespace {

// e^x for x <= 0: 2^n * 2^f, f in [-0.5, 0.5], Taylor to degree 6 (relative error ~1e-7).
inline __m256 exp_nonpositive(__m256 x) {
    const __m256 t = _mm256_mul_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(1.44269504f));
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.69314718f));
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

// One sequence's GROUP query heads that share one KV head; HD the head size.
template <int GROUP, int HD>
void attend(const at::BFloat16* q, const at::BFloat16* k, const at::BFloat16* v, at::BFloat16* out, int64_t len,
            float scale, float* scores) {
    constexpr int CHUNKS = HD / 8;  // 8 floats a register
    alignas(32) float qf[GROUP][HD];
    for (int g = 0; g < GROUP; ++g)
        for (int c = 0; c < CHUNKS; ++c) _mm256_store_ps(qf[g] + c * 8, bf16_to_float(q + g * HD + c * 8));

    float top[GROUP];
    std::fill_n(top, GROUP, -INFINITY);
    for (int64_t j = 0; j < len; ++j) {
        __m256 kv[CHUNKS];
        for (int c = 0; c < CHUNKS; ++c) kv[c] = bf16_to_float(k + j * HD + c * 8);
        for (int g = 0; g < GROUP; ++g) {
            __m256 dot[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int c = 0; c < CHUNKS; ++c) dot[c % 2] = _mm256_fmadd_ps(kv[c], _mm256_load_ps(qf[g] + c * 8), dot[c % 2]);
            const float s = sum8(_mm256_add_ps(dot[0], dot[1])) * scale;
            scores[g * len + j] = s;
            top[g] = std::max(top[g], s);
        }
    }

    float total[GROUP];
    for (int g = 0; g < GROUP; ++g) {
        float* row = scores + g * len;
        const __m256 max = _mm256_set1_ps(top[g]);
        __m256 sum = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= len; j += 8) {
            const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + j), max));
            _mm256_storeu_ps(row + j, e);
            sum = _mm256_add_ps(sum, e);
        }
        if (j < len) {
            const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(len - j)),
                                                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_maskload_ps(row + j, tail), max));
            _mm256_maskstore_ps(row + j, tail, e);
            sum = _mm256_add_ps(sum, _mm256_and_ps(e, _mm256_castsi256_ps(tail)));
        }
        total[g] = sum8(sum);
    }

    // The weighted sum, 64 columns at a time (8 accumulators).
    constexpr int SPAN = std::min(CHUNKS, 8);
    for (int g = 0; g < GROUP; ++g) {
        const __m256 inv = _mm256_set1_ps(1.0f / total[g]);
        for (int c0 = 0; c0 < CHUNKS; c0 += SPAN) {
            __m256 acc[SPAN];
            for (int c = 0; c < SPAN; ++c) acc[c] = _mm256_setzero_ps();
            for (int64_t j = 0; j < len; ++j) {
                const __m256 p = _mm256_broadcast_ss(scores + g * len + j);
                for (int c = 0; c < SPAN; ++c)
                    acc[c] = _mm256_fmadd_ps(p, bf16_to_float(v + j * HD + (c0 + c) * 8), acc[c]);
            }
            for (int c = 0; c < SPAN; ++c)
                _mm_storeu_si128(reinterpret_cast<__m128i*>(out + g * HD + (c0 + c) * 8),
                                 float_to_bf16(_mm256_mul_ps(acc[c], inv)));
        }
    }
}

}  // namespace

#include "../cached_attention_op.h"
