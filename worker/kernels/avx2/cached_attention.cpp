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

// The scores of 8 keys (HALVES 1) or 16 (HALVES 2) of the block at `block` from its key j (the block's first or
// ninth: `half` 0 or 1) for the QUERIES = ROWS * GROUP queries (row r's head g is query r * GROUP + g, its scores at
// scores + query * stride), and each query's highest so far. A query's even and odd dimensions are two chains of FMAs,
// summed at the end, where the accumulators fit the registers (GROUP <= 6), else one chain.
template <int GROUP, int HD, int ROWS, int HALVES>
__attribute__((always_inline)) inline void score_keys(const QueryRows& rows, const float (&qf)[ROWS * GROUP][HD],
                                                      const at::BFloat16* block, int half, int64_t j, int64_t stride,
                                                      float scale, float* scores, __m256 (&tops)[ROWS * GROUP]) {
    constexpr int QUERIES = ROWS * GROUP;
    constexpr bool SPLIT = GROUP <= 6;
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    __m256 even[HALVES][QUERIES], odd[HALVES][QUERIES];
    for (int h = 0; h < HALVES; ++h)
        for (int i = 0; i < QUERIES; ++i) even[h][i] = odd[h][i] = _mm256_setzero_ps();
    // The queries read from memory here, each broadcast a load: GCC otherwise kept them in registers or on the stack.
    asm volatile("" ::: "memory");
#pragma GCC unroll 2
    for (int p = 0; p < HD / 2; ++p) {
        if (half == 0) prefetch<32>(block + KEYS_AHEAD * HD + p * 32);  // a line a pair of 16 keys
        for (int h = 0; h < HALVES; ++h) {
            const auto* pair = reinterpret_cast<const __m256i*>(block + p * 32 + (half + h) * 16);
            const __m256 k_even = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(pair), 16));
            for (int i = 0; i < QUERIES; ++i) even[h][i] = _mm256_fmadd_ps(_mm256_set1_ps(qf[i][2 * p]), k_even, even[h][i]);
            // Read again rather than kept: the accumulators take the registers.
            asm volatile("" ::: "memory");
            const __m256 k_odd = _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256(pair), high));
            for (int i = 0; i < QUERIES; ++i) {
                __m256& acc = SPLIT ? odd[h][i] : even[h][i];
                acc = _mm256_fmadd_ps(_mm256_set1_ps(qf[i][2 * p + 1]), k_odd, acc);
            }
        }
    }
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int h = 0; h < HALVES; ++h)
        for (int i = 0; i < QUERIES; ++i) {
            const int64_t first = j + 8 * h, own = rows.len + i / GROUP;
            const int valid = static_cast<int>(std::clamp<int64_t>(own - first, 0, 8));
            const __m256 mask = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(valid), lane));
            const __m256 sum = SPLIT ? _mm256_add_ps(even[h][i], odd[h][i]) : even[h][i];
            const __m256 s = _mm256_mul_ps(sum, _mm256_set1_ps(scale));
            _mm256_storeu_ps(scores + i * stride + first, s);
            tops[i] = _mm256_blendv_ps(tops[i], _mm256_max_ps(tops[i], s), mask);
        }
}

// Scores (scaled dot products) of the ROWS rows' queries with the keys of each row, and each query's highest. The
// cache holds each block of 16 keys with the dimension pairs outermost (rotary_to_cache), as for the AVX512 kernels: a
// 32-byte load is one pair of dimensions of 8 keys, a shift and a mask make the two dimensions floats, and a query's 8
// scores are FMAs with no sums across lanes. A block's lanes past a row's length hold whatever the cache holds there:
// masked out of the highest, and their scores, stored with the rest, are overwritten. Both halves of a block at once
// where the accumulators fit the registers (3 queries), else one half after the other: each score is computed the same
// way either way. Against the keys stored row by row (four keys at a time, a sum across lanes for each), one layer on a
// Zen 3 (scratch, both kernels in one process, calls alternated, min / median of 100): a 300-row chunk after 900 keys
// 12.1 / 12.6 -> 11.0 / 11.4 ms on one thread, 7.3 / 8.9 -> 6.7 / 8.2 on two; decode of 32 rows at 300 0.52 / 0.58 ->
// 0.44 / 0.53 ms on one thread. Unrolled further, the loop over the pairs ran slower (out of the CPU's op cache).
template <int GROUP, int HD, int ROWS>
void scores_by_block(const QueryRows& rows, const at::BFloat16* k, int64_t stride, float scale, float* scores,
                     float (&top)[ROWS * GROUP]) {
    constexpr int QUERIES = ROWS * GROUP;
    const int64_t longest = rows.len + ROWS - 1;
    __m256 tops[QUERIES];
    std::fill_n(tops, QUERIES, _mm256_set1_ps(-INFINITY));
    alignas(32) float qf[QUERIES][HD];
    for (int i = 0; i < QUERIES; ++i) {
        const at::BFloat16* query = rows.q + (i / GROUP) * rows.q_row + (i % GROUP) * HD;
        for (int c = 0; c < HD; c += 8) _mm256_store_ps(qf[i] + c, bf16_to_float(query + c));
    }
    // The last block read holds a key below `longest`, so it lies within the cache (its capacity a multiple of 16).
    for (int64_t j0 = 0; j0 < longest; j0 += 16) {
        const at::BFloat16* block = k + j0 * HD;
        if constexpr (QUERIES <= 3) {
            score_keys<GROUP, HD, ROWS, 2>(rows, qf, block, 0, j0, stride, scale, scores, tops);
        } else {
            score_keys<GROUP, HD, ROWS, 1>(rows, qf, block, 0, j0, stride, scale, scores, tops);
            if (j0 + 8 < longest) score_keys<GROUP, HD, ROWS, 1>(rows, qf, block, 1, j0 + 8, stride, scale, scores, tops);
        }
    }
    for (int i = 0; i < QUERIES; ++i) top[i] = max8(tops[i]);
}

// Rows of a prompt chunk attended together: each key and value converted once for all their query heads.
template <int GROUP, int HD>
constexpr int TILE_ROWS = GROUP <= 3 ? 2 : 1;

// ROWS rows' GROUP query heads that share one KV head (QUERIES in all); HD the head size. Every score is the same
// chains of FMAs, and every output the same sum over its keys in order, whatever ROWS: a row's bits do not depend on
// the rows it shares a task with.
template <int GROUP, int HD, int ROWS>
void attend(const QueryRows& rows, const at::BFloat16* k, const at::BFloat16* v, float scale, float* scores) {
    constexpr int CHUNKS = HD / 8;  // 8 floats a register
    constexpr int QUERIES = ROWS * GROUP;
    const int64_t len = rows.len + ROWS - 1;  // the last row's keys
    const int64_t stride = (len + 15) / 16 * 16;  // room for a block's scores past len
    float top[QUERIES];
    scores_by_block<GROUP, HD, ROWS>(rows, k, stride, scale, scores, top);

    // Softmax over each row's own keys; the last rows' later keys get probability 0 (adds +0 below: same bits).
    float total[QUERIES];
    for (int g = 0; g < QUERIES; ++g) {
        float* row = scores + g * stride;
        const int64_t own = rows.len + g / GROUP;
        const __m256 top_log2e = _mm256_set1_ps(top[g] * LOG2_E);
        __m256 sum = _mm256_setzero_ps();
        int64_t j = 0;
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
                const __m256 p = _mm256_broadcast_ss(scores + g * stride + j);
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
