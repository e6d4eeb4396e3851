// Attention of query rows over the slot KV cache with AVX512-BF16: a row (one token: a decoding one, or one of a
// prompt chunk) attends to its sequence's first `length` cached keys. Each task (a KV head of a decoding row, or of
// up to 4 rows of one prompt chunk) reads those keys and values straight from the cache (no gather, no padding to the
// longest sequence, no mask), with scores and softmax in float32 and the weighted sum of the values accumulated in
// float32 from bf16 probabilities, as flash attention and torch's bf16 matmul path take them (a 1.5k-token prefill's
// attention 266 -> 222 ms against float32 FMAs, Zen 5; teacher-forced perplexity over 1,023 held-out tokens 19.43 ->
// 19.50, the matmul path 19.39). The scores take 16 keys at a time, transposed, which the task's rows share. A
// row's result depends on that row only, so a token's output is the same in any batch, and the same whether it was
// decoded or prefilled.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../attention_row.h"
#include "simd.h"

namespace {

// Keys j0..j0 + 15 (those past the last, `len - 1`, repeated) transposed: kt[p] holds dimension pair p of the 16
// keys, key i in lane i, so that one query's dot products with them are a chain of dpbf16 over the pairs.
template <int HD>
void transpose_keys(const at::BFloat16* k, int64_t j0, int64_t len, __m512i* kt) {
    for (int half = 0; half < HD / 32; ++half) {  // the keys' dimension pairs 16 * half .. 16 * half + 15
        __m512i r[16], t[16], u[16];
        Unroll<16>{}([&](auto i) {
            r[i] = _mm512_loadu_si512(k + std::min<int64_t>(j0 + i, len - 1) * HD + half * 32);
        });
        Unroll<8>{}([&](auto i) {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        });
        Unroll<4>{}([&](auto i) {  // u[4 * i + c]: pair 4 * lane + c of keys 4 * i .. 4 * i + 3, in each 128-bit lane
            u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
            u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
            u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
            u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
        });
        __m512i* out = kt + half * 16;
        Unroll<4>{}([&](auto c) {
            const __m512i a = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88);
            const __m512i b = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xDD);
            const __m512i e = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
            const __m512i f = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xDD);
            out[c] = _mm512_shuffle_i32x4(a, e, 0x88);
            out[4 + c] = _mm512_shuffle_i32x4(b, f, 0x88);
            out[8 + c] = _mm512_shuffle_i32x4(a, e, 0xDD);
            out[12 + c] = _mm512_shuffle_i32x4(b, f, 0xDD);
        });
    }
}

// Scores (scaled dot products) of N rows' GROUP query heads with the sequence's keys (the rows' `longest` len), 16
// keys at a time, and each head's highest. A head's score for a key is one sum whatever the other rows of the task: even and odd dimension
// pairs in two chains of dpbf16, added at the end. Row r's scores for query head g go to scores + (r * GROUP + g) *
// stride, only its own `len` of them. Unless the keys are in the CPU cache already (`keys_cached`), the values of
// each 16 keys are prefetched into L2 meanwhile, for the weighted sum that follows: a decode step's keys and values
// outgrow the L3 (32 sequences at 450, in-process, alternated: p50 56.9 -> 55.1 and 55.0 -> 53.4 ms a step on
// Zen 4; prefetched into L1, slower; for a prompt chunk's cached keys, ~4% slower).
template <int N, int GROUP, int HD>
void scores_of(const Row* rows, int64_t longest, const at::BFloat16* k, const at::BFloat16* v, bool keys_cached,
               float scale, float* scores, int64_t stride, float (&top)[N][GROUP]) {
    constexpr int P = HD / 2;
    __m512 tops[N][GROUP];
    Unroll<N>{}([&](auto r) { Unroll<GROUP>{}([&](auto g) { tops[r][g] = _mm512_set1_ps(-INFINITY); }); });
    alignas(64) __m512i kt[P];
    for (int64_t j0 = 0; j0 < longest; j0 += 16) {
        transpose_keys<HD>(k, j0, longest, kt);
        if (!keys_cached) {
            const char* values = reinterpret_cast<const char*>(v + j0 * HD);
            for (int64_t line = 0; line < (std::min<int64_t>(j0 + 16, longest) - j0) * HD * 2; line += 64)
                _mm_prefetch(values + line, _MM_HINT_T1);
        }
        __m512 even[N][GROUP], odd[N][GROUP];
        Unroll<N>{}([&](auto r) {
            Unroll<GROUP>{}([&](auto g) { even[r][g] = odd[r][g] = _mm512_setzero_ps(); });
        });
        for (int p = 0; p < P; p += 2) {
            const __m512bh k0 = (__m512bh)kt[p], k1 = (__m512bh)kt[p + 1];
            Unroll<N>{}([&](auto r) {
                Unroll<GROUP>{}([&](auto g) {
                    int32_t q0, q1;  // query dimension pairs p and p + 1
                    std::memcpy(&q0, rows[r].q + g * HD + 2 * p, 4);
                    std::memcpy(&q1, rows[r].q + g * HD + 2 * p + 2, 4);
                    even[r][g] = _mm512_dpbf16_ps(even[r][g], (__m512bh)_mm512_set1_epi32(q0), k0);
                    odd[r][g] = _mm512_dpbf16_ps(odd[r][g], (__m512bh)_mm512_set1_epi32(q1), k1);
                });
            });
        }
        Unroll<N>{}([&](auto r) {
            const int64_t left = rows[r].len - j0;
            if (left <= 0) return;
            const __mmask16 valid = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
            Unroll<GROUP>{}([&](auto g) {
                const __m512 s = _mm512_mul_ps(_mm512_add_ps(even[r][g], odd[r][g]), _mm512_set1_ps(scale));
                _mm512_mask_storeu_ps(scores + (r * GROUP + g) * stride + j0, valid, s);
                tops[r][g] = _mm512_mask_max_ps(tops[r][g], valid, tops[r][g], s);
            });
        });
    }
    Unroll<N>{}([&](auto r) { Unroll<GROUP>{}([&](auto g) { top[r][g] = _mm512_reduce_max_ps(tops[r][g]); }); });
}

// Softmax, then the weighted sum of the values, of one row's GROUP query heads that share one KV head; HD the head
// size. `scores` holds the row's scores, head after head `stride` apart, and `top` each head's highest.
template <int GROUP, int HD>
void weigh_values(const Row& row, const at::BFloat16* v, float* scores, int64_t stride, const float (&top)[GROUP]) {
    constexpr int PAIRS = HD / 32;  // 32 bf16 a register
    constexpr int CHUNKS = HD / 16; // 16 floats a register for the weighted sum
    const int64_t len = row.len;
    // Softmax: each score's e^(s - max) summed in float32, and kept as bf16 over the row's own scores (the bf16 of
    // element j at bytes 2j..2j+1 of the row, written behind the floats still to read), one bf16 zero after the last
    // when the length is odd: the weighted sum takes the keys two at a time.
    float total[GROUP];
    for (int g = 0; g < GROUP; ++g) {
        float* own = scores + g * stride;
        auto* probs = reinterpret_cast<uint16_t*>(own);
        const __m512 max = _mm512_set1_ps(top[g]);
        __m512 sum = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 16 <= len; j += 16) {
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(own + j), max));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + j), (__m256i)_mm512_cvtneps_pbh(e));
            sum = _mm512_add_ps(sum, e);
        }
        if (j < len) {
            const __mmask16 tail = (__mmask16)((1u << (len - j)) - 1);
            const __m512 e = _mm512_maskz_mov_ps(tail, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, own + j), max)));
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
        __m512bh pairs[CHUNKS];
        for (int c = 0; c < PAIRS; ++c) {
            const __m512i a = _mm512_loadu_si512(v + j * HD + c * 32);
            const __m512i b = j + 1 < len ? _mm512_loadu_si512(v + (j + 1) * HD + c * 32) : _mm512_setzero_si512();
            pairs[2 * c] = (__m512bh)_mm512_permutex2var_epi16(a, first_half, b);
            pairs[2 * c + 1] = (__m512bh)_mm512_permutex2var_epi16(a, second_half, b);
        }
        for (int g = 0; g < GROUP; ++g) {
            uint32_t pair;
            std::memcpy(&pair, reinterpret_cast<const uint16_t*>(scores + g * stride) + j, sizeof(pair));
            const __m512bh p = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
            for (int c = 0; c < CHUNKS; ++c) acc[g][c] = _mm512_dpbf16_ps(acc[g][c], p, pairs[c]);
        }
    }
    for (int g = 0; g < GROUP; ++g) {
        const __m512 inv = _mm512_set1_ps(1.0f / total[g]);
        for (int c = 0; c < CHUNKS; c += 2) {
            const __m512 lo = _mm512_mul_ps(acc[g][c], inv), hi = _mm512_mul_ps(acc[g][c + 1], inv);
            _mm512_storeu_si512(row.out + g * HD + c * 16, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    }
}

template <int GROUP>
constexpr int ROWS_PER_TASK = std::max(1, std::min(4, 12 / GROUP));  // 2 * rows * GROUP score chains in registers

template <int N, int GROUP, int HD>
void attend_rows(const Row* rows, const at::BFloat16* k, const at::BFloat16* v, bool keys_cached, float scale,
                 float* scores) {
    int64_t longest = 0;
    for (int r = 0; r < N; ++r) longest = std::max(longest, rows[r].len);
    const int64_t stride = div_up(longest, 16) * 16;
    float top[N][GROUP];
    scores_of<N, GROUP, HD>(rows, longest, k, v, keys_cached, scale, scores, stride, top);
    for (int r = 0; r < N; ++r) weigh_values<GROUP, HD>(rows[r], v, scores + r * GROUP * stride, stride, top[r]);
}

// The n (1..ROWS_PER_TASK) rows of a task: a decoding row alone, or rows of one prompt chunk.
template <int GROUP, int HD>
void attend(const Row* rows, int n, const at::BFloat16* k, const at::BFloat16* v, float scale, float* scores,
            bool keys_cached) {
    Unroll<ROWS_PER_TASK<GROUP>>{}([&](auto r) {
        if (n == r + 1) attend_rows<r + 1, GROUP, HD>(rows, k, v, keys_cached, scale, scores);
    });
}

}  // namespace

#include "../cached_attention_op.h"
