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

// Scores (scaled dot products) of the GROUP queries with keys 0..len-1, and each query's highest. The cache holds
// each block of 16 keys with the dimension pairs outermost (rotary_to_cache, LLMFLEET_KEYS_TRANSPOSED): one load is
// one pair of dimensions of 16 keys, so a query head's 16 scores are one chain of bf16 dot products (two: even and
// odd pairs) with no sums across lanes, whether the row decodes or is one of a prompt chunk's. Against the keys
// stored row by row (a horizontal sum per key for decoding rows, lane_sums' shuffles per 16 keys for a chunk's),
// 30 layers' attention (scratch benchmark, Zen 4): decode of 32 rows at 450 cached keys 15.5 -> 13.3 ms, a 300-row
// chunk after 900 cached 141 -> 91 ms. A block's lanes past `len` hold whatever the cache holds there: masked out.
template <int GROUP, int HD>
void scores_by_block(const at::BFloat16* q, const at::BFloat16* k, int64_t len, float scale, float* scores,
                     float (&top)[GROUP]) {
    __m512 tops[GROUP];
    std::fill_n(tops, GROUP, _mm512_set1_ps(-INFINITY));
    int32_t q_pairs[GROUP][HD / 2];
    std::memcpy(q_pairs, q, sizeof(q_pairs));
    for (int64_t j0 = 0; j0 < len; j0 += 16) {
        const __mmask16 valid = len - j0 >= 16 ? 0xFFFF : (__mmask16)((1u << (len - j0)) - 1);
        const at::BFloat16* block = k + j0 * HD;
        __m512 even[GROUP], odd[GROUP];
        for (int g = 0; g < GROUP; ++g) even[g] = odd[g] = _mm512_setzero_ps();
        Unroll<HD / 2>{}([&](auto p) {
            const __m512bh keys = (__m512bh)_mm512_loadu_si512(block + p * 32);
            prefetch<32>(block + KEYS_AHEAD * HD + p * 32);  // a line a load
            for (int g = 0; g < GROUP; ++g) {
                __m512& acc = p % 2 ? odd[g] : even[g];
                acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(q_pairs[g][p]), keys);
            }
        });
        for (int g = 0; g < GROUP; ++g) {
            const __m512 s = _mm512_mul_ps(_mm512_add_ps(even[g], odd[g]), _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(scores + g * len + j0, valid, s);
            tops[g] = _mm512_mask_max_ps(tops[g], valid, tops[g], s);
        }
    }
    for (int g = 0; g < GROUP; ++g) top[g] = _mm512_reduce_max_ps(tops[g]);
}

template <int GROUP>
constexpr int TILE_ROWS = 1;  // a row at a time

// One sequence's GROUP query heads that share one KV head; HD the head size. Every row the same way, whether other
// rows of the call read its keys too or not.
template <int GROUP, int HD, int ROWS>
void attend(const QueryRows& rows, const at::BFloat16* k, const at::BFloat16* v, float scale, float* scores,
            bool /*keys_cached*/) {
    const at::BFloat16* q = rows.q;
    at::BFloat16* out = rows.out;
    const int64_t len = rows.len;
    constexpr int PAIRS = HD / 32;  // 32 bf16 values a register
    constexpr int CHUNKS = HD / 16; // 16 floats a register for the weighted sum

    float top[GROUP];
    scores_by_block<GROUP, HD>(q, k, len, scale, scores, top);

    // Softmax: each score's e^(s - max) summed in float32, and kept as bf16 over the row's own scores (the bf16 of
    // element j at bytes 2j..2j+1 of the row, written behind the floats still to read), one bf16 zero after the last
    // when the length is odd: the weighted sum takes the keys two at a time.
    float total[GROUP];
    for (int g = 0; g < GROUP; ++g) {
        float* row = scores + g * len;
        auto* probs = reinterpret_cast<uint16_t*>(row);
        const __m512 max = _mm512_set1_ps(top[g]);
        __m512 sum = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 16 <= len; j += 16) {
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + j), max));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + j), (__m256i)_mm512_cvtneps_pbh(e));
            sum = _mm512_add_ps(sum, e);
        }
        if (j < len) {
            const __mmask16 tail = (__mmask16)((1u << (len - j)) - 1);
            const __m512 e = _mm512_maskz_mov_ps(tail, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, row + j), max)));
            _mm256_mask_storeu_epi16(probs + j, tail, (__m256i)_mm512_cvtneps_pbh(e));
            sum = _mm512_add_ps(sum, e);
        }
        if (len % 2) probs[len] = 0;
        total[g] = _mm512_reduce_add_ps(sum);
    }

    // The weighted sum with AVX512-BF16's dot product, two keys at a time: per pair of keys, the values interleaved
    // dimension by dimension (value j, value j + 1), dotted with the pair's two bf16 probabilities.
    const __m512i first_half = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                                39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i second_half = _mm512_add_epi16(first_half, _mm512_set1_epi16(16));
    __m512 acc[GROUP][CHUNKS];
    for (int g = 0; g < GROUP; ++g)
        for (int c = 0; c < CHUNKS; ++c) acc[g][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; j += 2) {
        prefetch<2 * HD>(v + (j + KEYS_AHEAD) * HD);
        __m512bh pairs[CHUNKS];
        for (int c = 0; c < PAIRS; ++c) {
            const __m512i a = _mm512_loadu_si512(v + j * HD + c * 32);
            const __m512i b = j + 1 < len ? _mm512_loadu_si512(v + (j + 1) * HD + c * 32) : _mm512_setzero_si512();
            pairs[2 * c] = (__m512bh)_mm512_permutex2var_epi16(a, first_half, b);
            pairs[2 * c + 1] = (__m512bh)_mm512_permutex2var_epi16(a, second_half, b);
        }
        for (int g = 0; g < GROUP; ++g) {
            uint32_t pair;
            std::memcpy(&pair, reinterpret_cast<const uint16_t*>(scores + g * len) + j, sizeof(pair));
            const __m512bh p = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
            for (int c = 0; c < CHUNKS; ++c) acc[g][c] = _mm512_dpbf16_ps(acc[g][c], p, pairs[c]);
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

}  // namespace

#include "../cached_attention_op.h"
