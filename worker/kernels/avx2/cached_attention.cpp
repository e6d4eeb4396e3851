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

#include "../prefetch.h"
#include "simd.h"

namespace {

// One sequence's GROUP query heads that share one KV head; HD the head size.
template <int GROUP, int HD>
void attend(const at::BFloat16* q, const at::BFloat16* k, const at::BFloat16* v, at::BFloat16* out, int64_t len,
            float scale, float* scores, bool /* keys_cached: one way here */) {
    constexpr int CHUNKS = HD / 8;  // 8 floats a register
    alignas(32) float qf[GROUP][HD];
    for (int g = 0; g < GROUP; ++g)
        for (int c = 0; c < CHUNKS; ++c) _mm256_store_ps(qf[g] + c * 8, bf16_to_float(q + g * HD + c * 8));

    // Scores 4 keys at a time, the last four padded with the last key: every key's dot product is computed alike.
    float top[GROUP];
    std::fill_n(top, GROUP, -INFINITY);
    for (int64_t j0 = 0; j0 < len; j0 += 4) {
        __m256 dot[GROUP * 4];
        Unroll<GROUP * 4>{}([&](auto i) { dot[i] = _mm256_setzero_ps(); });
        const at::BFloat16* key[4];
        for (int jj = 0; jj < 4; ++jj) key[jj] = k + std::min(j0 + jj, len - 1) * HD;
        prefetch<4 * HD>(k + (j0 + KEYS_AHEAD) * HD);
        for (int c = 0; c < CHUNKS; ++c) {
            Unroll<4>{}([&](auto jj) {
                const __m256 kc = bf16_to_float(key[jj] + c * 8);
                Unroll<GROUP>{}([&](auto g) { dot[g * 4 + jj] = _mm256_fmadd_ps(kc, _mm256_load_ps(qf[g] + c * 8), dot[g * 4 + jj]); });
            });
        }
        const int valid = static_cast<int>(std::min<int64_t>(4, len - j0));
        for (int g = 0; g < GROUP; ++g) {
            alignas(16) float s[4];
            _mm_store_ps(s, _mm_mul_ps(sum8x4(dot[g * 4], dot[g * 4 + 1], dot[g * 4 + 2], dot[g * 4 + 3]), _mm_set1_ps(scale)));
            for (int jj = 0; jj < valid; ++jj) {
                scores[g * len + j0 + jj] = s[jj];
                top[g] = std::max(top[g], s[jj]);
            }
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

    // The weighted sum, SPAN registers of columns at a time for all GROUP heads: each value converted once.
    constexpr int SPAN = std::min(CHUNKS, GROUP <= 2 ? 4 : GROUP <= 5 ? 2 : 1);
    for (int c0 = 0; c0 < CHUNKS; c0 += SPAN) {
        __m256 acc[GROUP * SPAN];
        Unroll<GROUP * SPAN>{}([&](auto i) { acc[i] = _mm256_setzero_ps(); });
        for (int64_t j = 0; j < len; ++j) {
            __m256 vv[SPAN];
            Unroll<SPAN>{}([&](auto s) { vv[s] = bf16_to_float(v + j * HD + (c0 + s) * 8); });
            if (c0 == 0) prefetch<HD>(v + (j + KEYS_AHEAD) * HD);  // the later spans find the values in the cache
            Unroll<GROUP>{}([&](auto g) {
                const __m256 p = _mm256_broadcast_ss(scores + g * len + j);
                Unroll<SPAN>{}([&](auto s) { acc[g * SPAN + s] = _mm256_fmadd_ps(p, vv[s], acc[g * SPAN + s]); });
            });
        }
        Unroll<GROUP * SPAN>{}([&](auto i) {
            constexpr int g = i / SPAN, s = i % SPAN;
            _mm_storeu_si128(reinterpret_cast<__m128i*>(out + g * HD + (c0 + s) * 8),
                             float_to_bf16(_mm256_mul_ps(acc[i], _mm256_set1_ps(1.0f / total[g]))));
        });
    }
}

}  // namespace

#include "../cached_attention_op.h"
