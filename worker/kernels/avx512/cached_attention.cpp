// Attention of query rows over the slot KV cache with AVX512-BF16: a row (one token: a decoding one, or one of a
// prompt chunk) attends to its sequence's first `length` cached keys. Each (row, KV head) task reads those keys and
// values straight from the cache (no gather, no padding to the longest sequence, no mask), with scores and softmax in
// float32 and the weighted sum of the values accumulated in float32 from bf16 probabilities, as flash attention and
// torch's bf16 matmul path take them (a 1.5k-token prefill's attention 266 -> 222 ms against float32 FMAs, Zen 5;
// teacher-forced perplexity over 1,023 held-out tokens 19.43 -> 19.50, the matmul path 19.39). A task's result
// depends on its own row only, so a token's output is the same in any batch, and the same whether it was decoded
// or prefilled.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../attention_args.h"
#include "../prefetch.h"
#include "simd.h"

namespace {

// acc += the bf16 pairs of `keys` dotted with the pair at q, which the instruction broadcasts from memory itself
// ({1to16}). As intrinsics, GCC hoisted the queries' broadcasts out of the loop over the keys and kept them on the
// stack (a 64-byte reload a product), or with a memory clobber broadcast each apart: one (2 rows, KV head) task's
// scores over 1,000 keys in L2 (Zen 4, one thread) 5.0-6.1 us by the stack, 4.1-5.1 broadcast apart, 3.7-4.3 here.
__attribute__((always_inline)) inline __m512 dot_broadcast(__m512 acc, __m512bh keys, const int32_t* q) {
    asm("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(keys), "m"(*q));
    return acc;
}

// Scores (scaled dot products) of the QUERIES = ROWS * GROUP queries (row r's head g is query r * GROUP + g, its
// scores at scores + query * stride) with the keys of each row, and each query's highest. The cache holds each block of
// 16 keys with the dimension pairs outermost (rotary_to_cache): one load is one pair of
// dimensions of 16 keys, so a query's 16 scores are one chain of bf16 dot products (two: even and odd pairs) with no
// sums across lanes, whether the row decodes or is one of a prompt chunk's. Against the keys stored row by row (a
// horizontal sum per key for decoding rows, lane_sums' shuffles per 16 keys for a chunk's), 30 layers' attention
// (scratch benchmark, Zen 4): decode of 32 rows at 450 cached keys 15.5 -> 13.3 ms, a 300-row chunk after 900 cached
// 141 -> 91 ms. A block's lanes past a row's length hold whatever the cache holds there: masked out.
template <int GROUP, int HD, int ROWS>
void scores_by_block(const QueryRows& rows, const at::BFloat16* k, int64_t stride, float scale, float* scores,
                     float (&top)[ROWS * GROUP]) {
    constexpr int QUERIES = ROWS * GROUP;
    const int64_t longest = rows.len + ROWS - 1;
    __m512 tops[QUERIES];
    std::fill_n(tops, QUERIES, _mm512_set1_ps(-INFINITY));
    int32_t q_pairs[QUERIES][HD / 2];
    for (int r = 0; r < ROWS; ++r) std::memcpy(q_pairs[r * GROUP], rows.q + r * rows.q_row, sizeof(q_pairs) / ROWS);
    for (int64_t j0 = 0; j0 < longest; j0 += 16) {
        __mmask16 valid[ROWS];
        for (int r = 0; r < ROWS; ++r) valid[r] = first_lanes(rows.len + r - j0);
        const at::BFloat16* block = k + j0 * HD;
        __m512 even[QUERIES], odd[QUERIES];
        for (int i = 0; i < QUERIES; ++i) even[i] = odd[i] = _mm512_setzero_ps();
        Unroll<HD / 2>{}([&](auto p) {
            const __m512bh keys = (__m512bh)_mm512_loadu_si512(block + p * 32);
            prefetch<32>(block + KEYS_AHEAD * HD + p * 32);  // a line a load
            for (int i = 0; i < QUERIES; ++i) {
                __m512& acc = p % 2 ? odd[i] : even[i];
                acc = dot_broadcast(acc, keys, &q_pairs[i][p]);
            }
        });
        for (int i = 0; i < QUERIES; ++i) {
            const __m512 s = _mm512_mul_ps(_mm512_add_ps(even[i], odd[i]), _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(scores + i * stride + j0, valid[i / GROUP], s);
            tops[i] = _mm512_mask_max_ps(tops[i], valid[i / GROUP], tops[i], s);
        }
    }
    for (int i = 0; i < QUERIES; ++i) top[i] = _mm512_reduce_max_ps(tops[i]);
}

// Rows of a prompt chunk attended together: each block of keys loaded, and each pair of values interleaved, once for
// both rows' query heads (up to 24 accumulators in the weighted sum; 4 rows spill registers and run slower). 30
// layers' attention of a 300-row chunk after 900 cached keys (scratch benchmark, Zen 5): 54-59 -> 43-47 ms.
template <int GROUP, int HD>
constexpr int TILE_ROWS = GROUP * HD <= 192 ? 2 : 1;

// ROWS rows' GROUP query heads that share one KV head; HD the head size. Every score is the same chain of dot
// products, and every output the same sum over its keys in order, whatever ROWS: a row's keys past its own length
// (the later rows') get probability 0 and add +-0, which leaves a sum's bits as they are (never -0: it starts at +0).
template <int GROUP, int HD, int ROWS>
void attend(const QueryRows& rows, const at::BFloat16* k, const at::BFloat16* v, float scale, float* scores) {
    constexpr int QUERIES = ROWS * GROUP;
    constexpr int PAIRS = HD / 32;  // 32 bf16 values a register
    constexpr int CHUNKS = HD / 16; // 16 floats a register for the weighted sum
    const int64_t longest = rows.len + ROWS - 1;

    float top[QUERIES];
    scores_by_block<GROUP, HD, ROWS>(rows, k, longest, scale, scores, top);

    // Softmax: each score's e^(s - max) summed in float32, and kept as bf16 over the query's own scores (the bf16 of
    // element j at bytes 2j..2j+1 of its scores, written behind the floats still to read), then bf16 zeros up to the
    // last row's keys rounded up to even: the weighted sum takes the keys two at a time.
    float total[QUERIES];
    for (int i = 0; i < QUERIES; ++i) {
        const int64_t len = rows.len + i / GROUP;
        float* row = scores + i * longest;
        auto* probs = reinterpret_cast<uint16_t*>(row);
        const __m512 top_log2e = _mm512_set1_ps(top[i] * LOG2_E);
        __m512 sum = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 16 <= len; j += 16) {
            const __m512 e = exp_below(_mm512_loadu_ps(row + j), top_log2e);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + j), (__m256i)_mm512_cvtneps_pbh(e));
            sum = _mm512_add_ps(sum, e);
        }
        if (j < len) {
            const __mmask16 tail = first_lanes(len - j);
            const __m512 e = _mm512_maskz_mov_ps(tail, exp_below(_mm512_maskz_loadu_ps(tail, row + j), top_log2e));
            _mm256_mask_storeu_epi16(probs + j, tail, (__m256i)_mm512_cvtneps_pbh(e));
            sum = _mm512_add_ps(sum, e);
        }
        std::fill(probs + len, probs + longest + longest % 2, 0);
        total[i] = _mm512_reduce_add_ps(sum);
    }

    // The weighted sum with AVX512-BF16's dot product, two keys at a time: per pair of keys, the values interleaved
    // dimension by dimension (value j, value j + 1), dotted with the pair's two bf16 probabilities.
    const __m512i first_half = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                                39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i second_half = _mm512_add_epi16(first_half, _mm512_set1_epi16(16));
    __m512 acc[QUERIES][CHUNKS];
    for (int i = 0; i < QUERIES; ++i)
        for (int c = 0; c < CHUNKS; ++c) acc[i][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < longest; j += 2) {
        prefetch<2 * HD>(v + (j + KEYS_AHEAD) * HD);
        __m512bh pairs[CHUNKS];
        for (int c = 0; c < PAIRS; ++c) {
            const __m512i a = _mm512_loadu_si512(v + j * HD + c * 32);
            const __m512i b = j + 1 < longest ? _mm512_loadu_si512(v + (j + 1) * HD + c * 32) : _mm512_setzero_si512();
            pairs[2 * c] = (__m512bh)_mm512_permutex2var_epi16(a, first_half, b);
            pairs[2 * c + 1] = (__m512bh)_mm512_permutex2var_epi16(a, second_half, b);
        }
        for (int i = 0; i < QUERIES; ++i) {
            uint32_t pair;
            std::memcpy(&pair, reinterpret_cast<const uint16_t*>(scores + i * longest) + j, sizeof(pair));
            const __m512bh p = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
            for (int c = 0; c < CHUNKS; ++c) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], p, pairs[c]);
        }
    }
    for (int i = 0; i < QUERIES; ++i) {
        const __m512 inv = _mm512_set1_ps(1.0f / total[i]);
        at::BFloat16* out = rows.out + (i / GROUP) * rows.out_row + (i % GROUP) * HD;
        for (int c = 0; c < CHUNKS; c += 2) {
            const __m512 lo = _mm512_mul_ps(acc[i][c], inv), hi = _mm512_mul_ps(acc[i][c + 1], inv);
            _mm512_storeu_si512(out + c * 16, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    }
}

}  // namespace

#include "../cached_attention_op.h"
