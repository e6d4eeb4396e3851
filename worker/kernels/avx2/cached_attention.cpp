// Attention of query rows over the slot KV cache with AVX2 and FMA, for CPUs without AVX512-BF16: the same op and
// the same way as ../avx512/cached_attention.cpp (each task reads its sequence's first `length` keys and values
// straight from the bf16 cache; scores, softmax and the weighted sum in float32), so a token's output is the same in
// any batch, and the same whether it was decoded or prefilled.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <vector>

#include "../attention_args.h"
#include "../prefetch.h"
#include "simd.h"

namespace {

// Rows of a prompt chunk attended together: each key and value converted once for all their query heads.
template <int GROUP, int HD>
constexpr int TILE_ROWS = GROUP <= 3 ? 2 : 1;

// ROWS rows' GROUP query heads that share one KV head (QUERIES in all); HD the head size. Every score is the same
// chain of FMAs and the same sum across lanes, and every output the same sum over its keys in order, whatever ROWS:
// a row's bits do not depend on the rows it shares a task with.
template <int GROUP, int HD, int ROWS>
void attend(const QueryRows& rows, const at::BFloat16* k, const at::BFloat16* v, float scale, float* scores) {
    constexpr int CHUNKS = HD / 8;  // 8 floats a register
    constexpr int QUERIES = ROWS * GROUP;
    constexpr int KEYS = QUERIES == 4 || QUERIES == 6 ? 2 : 4;  // keys a pass: QUERIES * KEYS accumulators
    static_assert(QUERIES * KEYS % 4 == 0, "the scores' sums go 4 at a time");
    const int64_t len = rows.len + ROWS - 1;  // the last row's keys
    alignas(32) float qf[QUERIES][HD];
    for (int r = 0; r < ROWS; ++r)
        for (int i = 0; i < GROUP * CHUNKS; ++i)
            _mm256_store_ps(qf[r * GROUP] + i * 8, bf16_to_float(rows.q + r * rows.q_row + i * 8));

    // Scores KEYS keys at a time, the last ones padded with the last key: every key's dot product is computed alike.
    for (int64_t j0 = 0; j0 < len; j0 += KEYS) {
        __m256 dot[QUERIES * KEYS];
        Unroll<QUERIES * KEYS>{}([&](auto i) { dot[i] = _mm256_setzero_ps(); });
        const at::BFloat16* key[KEYS];
        for (int jj = 0; jj < KEYS; ++jj) key[jj] = k + std::min(j0 + jj, len - 1) * HD;
        prefetch<KEYS * HD>(k + (j0 + KEYS_AHEAD) * HD);
        for (int c = 0; c < CHUNKS; ++c) {
            Unroll<KEYS>{}([&](auto jj) {
                const __m256 kc = bf16_to_float(key[jj] + c * 8);
                Unroll<QUERIES>{}([&](auto g) { dot[g * KEYS + jj] = _mm256_fmadd_ps(kc, _mm256_load_ps(qf[g] + c * 8), dot[g * KEYS + jj]); });
            });
        }
        const int valid = static_cast<int>(std::min<int64_t>(KEYS, len - j0));
        for (int i = 0; i < QUERIES * KEYS; i += 4) {
            alignas(16) float s[4];
            _mm_store_ps(s, _mm_mul_ps(sum8x4(dot[i], dot[i + 1], dot[i + 2], dot[i + 3]), _mm_set1_ps(scale)));
            for (int l = 0; l < 4; ++l) {
                const int g = (i + l) / KEYS, jj = (i + l) % KEYS;
                if (jj < valid) scores[g * len + j0 + jj] = s[l];
            }
        }
    }

    // Softmax over each row's own keys; the last rows' later keys get probability 0 (adds +0 below: same bits).
    float total[QUERIES];
    for (int g = 0; g < QUERIES; ++g) {
        float* row = scores + g * len;
        const int64_t own = rows.len + g / GROUP;
        __m256 top = _mm256_set1_ps(-INFINITY);
        int64_t j = 0;
        for (; j + 8 <= own; j += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(row + j));
        float top1 = max8(top);
        for (; j < own; ++j) top1 = std::max(top1, row[j]);
        const __m256 top_log2e = _mm256_set1_ps(top1 * LOG2_E);
        __m256 sum = _mm256_setzero_ps();
        j = 0;
        for (; j + 8 <= own; j += 8) {
            const __m256 e = exp_below(_mm256_loadu_ps(row + j), top_log2e);
            _mm256_storeu_ps(row + j, e);
            sum = _mm256_add_ps(sum, e);
        }
        if (j < own) {
            const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(own - j)),
                                                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            const __m256 e = exp_below(_mm256_maskload_ps(row + j, tail), top_log2e);
            _mm256_maskstore_ps(row + j, tail, e);
            sum = _mm256_add_ps(sum, _mm256_and_ps(e, _mm256_castsi256_ps(tail)));
        }
        std::fill(row + own, row + len, 0.0f);
        total[g] = sum8(sum);
    }

    // The weighted sum, SPAN registers of columns at a time for all queries: each value converted once.
    constexpr int SPAN = std::min(CHUNKS, QUERIES <= 2 ? 4 : QUERIES <= 6 ? 2 : 1);
    for (int c0 = 0; c0 < CHUNKS; c0 += SPAN) {
        __m256 acc[QUERIES * SPAN];
        Unroll<QUERIES * SPAN>{}([&](auto i) { acc[i] = _mm256_setzero_ps(); });
        for (int64_t j = 0; j < len; ++j) {
            __m256 vv[SPAN];
            Unroll<SPAN>{}([&](auto s) { vv[s] = bf16_to_float(v + j * HD + (c0 + s) * 8); });
            if (c0 == 0) prefetch<HD>(v + (j + KEYS_AHEAD) * HD);  // the later spans find the values in the cache
            Unroll<QUERIES>{}([&](auto g) {
                const __m256 p = _mm256_broadcast_ss(scores + g * len + j);
                Unroll<SPAN>{}([&](auto s) { acc[g * SPAN + s] = _mm256_fmadd_ps(p, vv[s], acc[g * SPAN + s]); });
            });
        }
        Unroll<QUERIES * SPAN>{}([&](auto i) {
            constexpr int g = i / SPAN, s = i % SPAN;
            at::BFloat16* out = rows.out + (g / GROUP) * rows.out_row + (g % GROUP) * HD + (c0 + s) * 8;
            _mm_storeu_si128(reinterpret_cast<__m128i*>(out), float_to_bf16(_mm256_mul_ps(acc[i], _mm256_set1_ps(1.0f / total[g]))));
        });
    }
}

}  // namespace

#include "../cached_attention_op.h"
