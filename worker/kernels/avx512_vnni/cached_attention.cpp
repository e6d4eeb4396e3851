// Attention of query rows over the slot KV cache with AVX512 float32 FMAs, for CPUs without AVX512-BF16 (Ice Lake):
// the same op and the same way as ../avx512/cached_attention.cpp (each (row, KV head) task reads its sequence's first
// `length` keys and values straight from the bf16 cache; scores, softmax and the weighted sum in float32), the keys
// and values converted from bf16 as they are read, by unpack instructions (one per 16 values; widening and shifting
// took two: one layer's 300-row chunk after 900 cached tokens 8.6-10.7 -> 6.5-7.1 ms). A task's result depends on
// its own row only, so a token's output is the same in any batch, and the same whether it was decoded or prefilled.
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
// first and 8i+4..8i+7 in the second (one instruction each). Queries, keys and values all take this order, and
// to_bf16_pair puts the results back in theirs.
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

// One key (HD bf16) as floats in that order, for the dot products below.
template <int HD>
__attribute__((always_inline)) inline void key_to_float(const at::BFloat16* key, float* out) {
    for (int c = 0; c < HD / 16; c += 2) {
        __m512 a, b;
        bf16_pair_to_float(key + c * 16, a, b);
        _mm512_store_ps(out + c * 16, a);
        _mm512_store_ps(out + c * 16 + 16, b);
    }
}

// A key's dot product with a query, chunk by chunk: the same operations wherever a key's score is computed.
template <int CHUNKS>
__attribute__((always_inline)) inline __m512 dot(const __m512 (&q)[CHUNKS], const float* key) {
    __m512 d = _mm512_setzero_ps();
    Unroll<CHUNKS>{}([&](auto c) { d = _mm512_fmadd_ps(q[c], _mm512_loadu_ps(key + c * 16), d); });
    return d;
}

// Scores (scaled dot products) of the GROUP queries with keys 0..len-1, and each query's highest, key by key.
template <int GROUP, int CHUNKS, int HD>
void scores_by_key(const __m512 (&qv)[GROUP][CHUNKS], const at::BFloat16* k, int64_t len, float scale,
                   float* scores, float (&top)[GROUP]) {
    std::fill_n(top, GROUP, -INFINITY);
    alignas(64) float key[HD];
    for (int64_t j = 0; j < len; ++j) {
        prefetch<HD>(k + (j + KEYS_AHEAD) * HD);
        key_to_float<HD>(k + j * HD, key);
        for (int g = 0; g < GROUP; ++g) {
            const float s = _mm512_reduce_add_ps(dot<CHUNKS>(qv[g], key)) * scale;
            scores[g * len + j] = s;
            top[g] = std::max(top[g], s);
        }
    }
}

// The same bits 16 keys at a time (the last 16 padded with the last key), converted to float32 once for the
// QUERIES = ROWS * GROUP queries (row r's head g is query r * GROUP + g, its scores at scores + query * stride) and
// their products summed by lane_sums: for a prompt chunk's rows, whose keys are in the CPU cache. Row r attends to
// len + r keys; a block's keys past a row's own are masked out of its scores.
template <int ROWS, int GROUP, int CHUNKS, int HD>
void scores_by_block(const __m512 (&qv)[ROWS * GROUP][CHUNKS], const at::BFloat16* k, int64_t len, int64_t stride,
                     float scale, float* scores, float (&top)[ROWS * GROUP]) {
    constexpr int QUERIES = ROWS * GROUP;
    const int64_t longest = len + ROWS - 1;
    __m512 tops[QUERIES];
    std::fill_n(tops, QUERIES, _mm512_set1_ps(-INFINITY));
    alignas(64) float keys[16][HD];  // key 4 * (i % 4) + i / 4 in row i: lane_sums puts its score in lane i
    for (int64_t j0 = 0; j0 < longest; j0 += 16) {
        __mmask16 valid[ROWS];
        for (int r = 0; r < ROWS; ++r) valid[r] = first_lanes(len + r - j0);
        for (int i = 0; i < 16; ++i) {
            const at::BFloat16* key = k + std::min<int64_t>(j0 + 4 * (i % 4) + i / 4, longest - 1) * HD;
            key_to_float<HD>(key, keys[i]);
        }
        for (int q = 0; q < QUERIES; ++q) {
            __m512 d[16];
            Unroll<16>{}([&](auto i) { d[i] = dot<CHUNKS>(qv[q], keys[i]); });
            const __m512 s = _mm512_mul_ps(lane_sums(d), _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(scores + q * stride + j0, valid[q / GROUP], s);
            tops[q] = _mm512_mask_max_ps(tops[q], valid[q / GROUP], tops[q], s);
        }
    }
    for (int q = 0; q < QUERIES; ++q) top[q] = _mm512_reduce_max_ps(tops[q]);
}

// Rows of a prompt chunk attended together: each block of keys, and each value, converted once for both rows' query
// heads. 30 layers' attention of a 300-row chunk after 900 cached keys, this kernel timed on a Zen 5 (scratch
// benchmark, outputs bitwise as before): 85-88 -> 75-76 ms.
template <int GROUP, int HD>
constexpr int TILE_ROWS = GROUP <= 3 ? 2 : 1;

// ROWS rows' GROUP query heads that share one KV head; HD the head size. `keys_cached`: the keys are likely in the
// CPU cache (other rows of the call read them too). Every score is the same chain of FMAs and the same sum across
// lanes, and every output the same sum over its keys in order, whatever ROWS: a row's keys past its own length (the
// later rows') get probability 0 and add +-0, which leaves a sum's bits as they are (never -0: it starts at +0).
template <int GROUP, int HD, int ROWS>
void attend(const QueryRows& rows, const at::BFloat16* k, const at::BFloat16* v, float scale, float* scores,
            bool keys_cached) {
    constexpr int QUERIES = ROWS * GROUP;
    constexpr int CHUNKS = HD / 16;  // 16 floats a register
    const int64_t longest = rows.len + ROWS - 1;
    __m512 qv[QUERIES][CHUNKS];
    for (int q = 0; q < QUERIES; ++q) {
        const at::BFloat16* query = rows.q + (q / GROUP) * rows.q_row + (q % GROUP) * HD;
        for (int c = 0; c < CHUNKS; c += 2) bf16_pair_to_float(query + c * 16, qv[q][c], qv[q][c + 1]);
    }

    float top[QUERIES];
    if (ROWS == 1 && !keys_cached)
        scores_by_key<QUERIES, CHUNKS, HD>(qv, k, longest, scale, scores, top);
    else
        scores_by_block<ROWS, GROUP, CHUNKS, HD>(qv, k, rows.len, longest, scale, scores, top);

    float total[QUERIES];
    for (int q = 0; q < QUERIES; ++q) {
        const int64_t len = rows.len + q / GROUP;
        float* row = scores + q * longest;
        const __m512 max = _mm512_set1_ps(top[q]);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < len; j += 16) {
            const __mmask16 part = first_lanes(len - j);
            const __m512 e = _mm512_maskz_mov_ps(part, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(part, row + j), max)));
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
