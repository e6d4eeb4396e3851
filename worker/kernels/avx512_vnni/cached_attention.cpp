// Attention of query rows over the slot KV cache with AVX512 float32 FMAs, for CPUs without AVX512-BF16 (Ice Lake):
// the same op and the same way as ../avx512/cached_attention.cpp (each (row, KV head) task reads its sequence's first
// `length` keys and values straight from the bf16 cache, the keys stored transposed block by block; scores, softmax
// and the weighted sum in float32), the keys and values converted from bf16 as they are read. A task's result depends
// on its own row only, so a token's output is the same in any batch, and the same whether it was decoded or prefilled.
// On an Ice Lake VM, 30 layers of a 300-row chunk after 900 cached keys (21.8 GFLOP) took 116-127 ms before the
// scores took two blocks of keys at a time: ~180 GFLOP/s, half of what a loop of independent FMAs reaches on its two
// cores (184 GFLOP/s each).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <vector>

#include "../avx512/simd.h"
#include "../attention_args.h"
#include "../prefetch.h"

namespace {

// 32 bf16 -> 32 floats in two vectors, in the unpack instructions' order: per 128-bit lane i, values 8i..8i+3 in the
// first and 8i+4..8i+7 in the second (one instruction each; widening and shifting took two). The weighted sum takes
// the values in this order, and to_bf16_pair puts its results back in theirs.
__attribute__((always_inline)) inline void bf16_pair_to_float(const at::BFloat16* p, __m512& first, __m512& second) {
    const __m512i v = _mm512_loadu_si512(p);
    first = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), v));
    second = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), v));
}

// Two vectors of floats in that order -> 32 bf16 in the natural one (the pack undoes the unpacks), rounded to nearest
// even.
__attribute__((always_inline)) inline __m512i to_bf16_pair(__m512 first, __m512 second) {
    return _mm512_packus_epi32(bf16_lanes(first), bf16_lanes(second));
}

// The scores of BLOCKS blocks of 16 keys from key j0 (see scores_by_block).
template <int BLOCKS, int GROUP, int HD, int ROWS>
__attribute__((always_inline)) inline void score_blocks(const QueryRows& rows, const float (&qf)[ROWS * GROUP][HD],
                                                        const at::BFloat16* k, int64_t j0, int64_t stride, float scale,
                                                        float* scores, __m512 (&tops)[ROWS * GROUP]) {
    constexpr int QUERIES = ROWS * GROUP;
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    const at::BFloat16* block = k + j0 * HD;
    // Reads the queries from memory here, each broadcast a load: GCC otherwise kept them in registers and broadcast
    // each dimension by shuffles (valignd, vshufps), beside the FMAs on their ports, or kept every broadcast on the
    // stack (2 x QUERIES x HD / 2 vectors).
    asm volatile("" ::: "memory");
    __m512 even[BLOCKS][QUERIES], odd[BLOCKS][QUERIES];
    for (int b = 0; b < BLOCKS; ++b)
        for (int i = 0; i < QUERIES; ++i) even[b][i] = odd[b][i] = _mm512_setzero_ps();
    Unroll<HD / 2>{}([&](auto p) __attribute__((always_inline)) {
        __m512 k_even[BLOCKS], k_odd[BLOCKS];
        for (int b = 0; b < BLOCKS; ++b) {
            const __m512i pair = _mm512_loadu_si512(block + b * 16 * HD + p * 32);
            prefetch<32>(block + (KEYS_AHEAD + b * 16) * HD + p * 32);  // a line a load
            k_even[b] = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
            k_odd[b] = _mm512_castsi512_ps(_mm512_and_si512(pair, high));
        }
        for (int i = 0; i < QUERIES; ++i) {
            const __m512 q_even = _mm512_set1_ps(qf[i][2 * p]), q_odd = _mm512_set1_ps(qf[i][2 * p + 1]);
            for (int b = 0; b < BLOCKS; ++b) {
                even[b][i] = _mm512_fmadd_ps(q_even, k_even[b], even[b][i]);
                odd[b][i] = _mm512_fmadd_ps(q_odd, k_odd[b], odd[b][i]);
            }
        }
    });
    for (int b = 0; b < BLOCKS; ++b) {
        const int64_t j = j0 + 16 * b;
        for (int i = 0; i < QUERIES; ++i) {
            const __mmask16 valid = first_lanes(rows.len + i / GROUP - j);
            const __m512 s = _mm512_mul_ps(_mm512_add_ps(even[b][i], odd[b][i]), _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(scores + i * stride + j, valid, s);
            tops[i] = _mm512_mask_max_ps(tops[i], valid, tops[i], s);
        }
    }
}

// Scores (scaled dot products) of the QUERIES = ROWS * GROUP queries (row r's head g is query r * GROUP + g, its
// scores at scores + query * stride) with the keys of each row, and each query's highest. The cache holds each block
// of 16 keys with the dimension pairs outermost (rotary_to_cache), as for the AVX512-BF16
// kernel: one load is one pair of dimensions of 16 keys, a shift and a mask make the two dimensions floats, and a
// query's 16 scores are two chains of FMAs (even and odd dimensions) with no sums across lanes, whether the row
// decodes or is one of a prompt chunk's. A block's lanes past a row's length hold whatever the cache holds there:
// masked out. Against the keys stored row by row (a horizontal sum per key for decoding rows, lane_sums' shuffles per
// 16 keys for a chunk's), 30 layers' attention (scratch benchmark, Ice Lake, in one process, ten alternated rounds):
// decode of 32 rows at 450 cached keys 10.0-16.6 -> 8.6-12.9 ms (lower in every round); a 300-row chunk after 900
// unchanged (116-195 against 117-164 ms).
// Two blocks of keys at a time where the accumulators fit the registers, each broadcast of a query's dimension
// serving both: 30 layers' attention (scratch, both kernels built side by side, two threads, twelve alternated
// rounds) of a 300-row chunk after 900 cached keys 148-166 -> 128-160 ms (lower in every round), of a 128-row chunk
// from 0 6.0-15.9 -> 4.7-5.4 ms; decoding rows unchanged. Each score is computed the same way either way.
template <int GROUP, int HD, int ROWS>
void scores_by_block(const QueryRows& rows, const at::BFloat16* k, int64_t stride, float scale, float* scores,
                     float (&top)[ROWS * GROUP]) {
    constexpr int QUERIES = ROWS * GROUP;
    constexpr int BLOCKS = QUERIES <= 6 ? 2 : 1;
    const int64_t longest = rows.len + ROWS - 1;
    __m512 tops[QUERIES];
    std::fill_n(tops, QUERIES, _mm512_set1_ps(-INFINITY));
    alignas(64) float qf[QUERIES][HD];
    for (int i = 0; i < QUERIES; ++i) {
        const at::BFloat16* query = rows.q + (i / GROUP) * rows.q_row + (i % GROUP) * HD;
        for (int c = 0; c < HD; c += 16) _mm512_store_ps(qf[i] + c, bf16_to_float(query + c));
    }
    // The last block read holds a key below `longest`, so it lies within the cache (its capacity a multiple of 16).
    int64_t j0 = 0;
    for (; j0 + 16 * (BLOCKS - 1) < longest; j0 += 16 * BLOCKS)
        score_blocks<BLOCKS, GROUP, HD, ROWS>(rows, qf, k, j0, stride, scale, scores, tops);
    for (; j0 < longest; j0 += 16) score_blocks<1, GROUP, HD, ROWS>(rows, qf, k, j0, stride, scale, scores, tops);
    for (int i = 0; i < QUERIES; ++i) top[i] = _mm512_reduce_max_ps(tops[i]);
}

// Rows of a prompt chunk attended together: each block of keys, and each value, converted once for both rows' query
// heads. 30 layers' attention of a 300-row chunk after 900 cached keys, this kernel timed on a Zen 5 (scratch
// benchmark, outputs bitwise as before): 85-88 -> 75-76 ms. With the keys transposed, 4 rows (Ice Lake): 117-127 ->
// 151-161 ms.
template <int GROUP, int HD>
constexpr int TILE_ROWS = GROUP <= 3 ? 2 : 1;

// ROWS rows' GROUP query heads that share one KV head; HD the head size. Every score is the same two chains of FMAs,
// and every output the same sum over its keys in order, whatever ROWS: a row's keys past its own length (the later
// rows') get probability 0 and add +-0, which leaves a sum's bits as they are (never -0: it starts at +0).
template <int GROUP, int HD, int ROWS>
void attend(const QueryRows& rows, const at::BFloat16* k, const at::BFloat16* v, float scale, float* scores) {
    constexpr int QUERIES = ROWS * GROUP;
    constexpr int CHUNKS = HD / 16;  // 16 floats a register
    const int64_t longest = rows.len + ROWS - 1;
    float top[QUERIES];
    scores_by_block<GROUP, HD, ROWS>(rows, k, longest, scale, scores, top);

    float total[QUERIES];
    for (int q = 0; q < QUERIES; ++q) {
        const int64_t len = rows.len + q / GROUP;
        float* row = scores + q * longest;
        const __m512 top_log2e = _mm512_set1_ps(top[q] * LOG2_E);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < len; j += 16) {
            const __mmask16 part = first_lanes(len - j);
            const __m512 e = _mm512_maskz_mov_ps(part, exp_below(_mm512_maskz_loadu_ps(part, row + j), top_log2e));
            _mm512_mask_storeu_ps(row + j, part, e);
            sum = _mm512_add_ps(sum, e);
        }
        std::fill(row + len, row + longest, 0.0f);
        total[q] = _mm512_reduce_add_ps(sum);
    }

    // The weighted sum, SPAN registers of columns at a time for all queries: each value converted once a span.
    constexpr int SPAN = std::min(CHUNKS, QUERIES <= 6 ? 4 : 2);
    for (int c0 = 0; c0 < CHUNKS; c0 += SPAN) {
        __m512 acc[QUERIES * SPAN];
        Unroll<QUERIES * SPAN>{}([&](auto i) { acc[i] = _mm512_setzero_ps(); });
        for (int64_t j = 0; j < longest; ++j) {
            __m512 vv[SPAN];
            Unroll<SPAN / 2>{}([&](auto s) { bf16_pair_to_float(v + j * HD + (c0 + 2 * s) * 16, vv[2 * s], vv[2 * s + 1]); });
            if (c0 == 0) prefetch<HD>(v + (j + KEYS_AHEAD) * HD);  // the later spans find the values in the cache
            Unroll<QUERIES>{}([&](auto q) {
                const __m512 p = _mm512_set1_ps(scores[q * longest + j]);
                Unroll<SPAN>{}([&](auto s) { acc[q * SPAN + s] = _mm512_fmadd_ps(p, vv[s], acc[q * SPAN + s]); });
            });
        }
        Unroll<QUERIES * SPAN / 2>{}([&](auto i) {
            constexpr int q = i / (SPAN / 2), s = 2 * (i % (SPAN / 2));
            const __m512 inv = _mm512_set1_ps(1.0f / total[q]);
            const __m512i o = to_bf16_pair(_mm512_mul_ps(acc[q * SPAN + s], inv), _mm512_mul_ps(acc[q * SPAN + s + 1], inv));
            at::BFloat16* out = rows.out + (q / GROUP) * rows.out_row + (q % GROUP) * HD;
            _mm512_storeu_si512(out + (c0 + s) * 16, o);
        });
    }
}

}  // namespace

#include "../cached_attention_op.h"
