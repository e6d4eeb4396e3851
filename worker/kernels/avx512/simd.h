// What the AVX512 kernels share (AVX512F only, so that kernels without AVX512-BF16 use them too): bfloat16 and
// float16 loads, rounding to bfloat16, e^x, and the lane sums of 16 vectors.
#pragma once
#include <torch/extension.h>
#include <immintrin.h>
#include <cstdint>

#include "../exp2_fit.h"
#include "../unroll.h"

// The mask of a vector's first n of 16 lanes: none for n <= 0, all for n >= 16.
inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? 0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

inline __m512 load_half(const at::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// 16 bf16 -> 16 floats: the bf16 bits are a float's upper half.
inline __m512 bf16_to_float(const at::BFloat16* p) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// 16 floats as bf16 in the low halves of their lanes, rounded to nearest even as torch (and AVX512-BF16) rounds (no
// NaN among these results).
inline __m512i bf16_lanes(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF));
    return _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
}

// 16 floats -> 16 bf16, rounded as above.
inline __m256i float_to_bf16(__m512 v) { return _mm512_cvtepi32_epi16(bf16_lanes(v)); }

// 2^t for t <= 0: 2^n * p(f), n the nearest integer, f = t - n in [-0.5, 0.5], p the fit of exp2_fit.h. Below -125,
// 2^-125.
inline __m512 exp2_nonpositive(__m512 t) {
    t = _mm512_max_ps(t, _mm512_set1_ps(-125.0f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(EXP2_FIT[0]);
    for (int i = 1; i <= EXP2_DEGREE; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_FIT[i]));
    return _mm512_scalef_ps(p, n);
}

// e^x for x <= 0.
inline __m512 exp_nonpositive(__m512 x) { return exp2_nonpositive(_mm512_mul_ps(x, _mm512_set1_ps(LOG2_E))); }

// e^(x - top) for x <= top, given top_log2e = top log2(e): one FMA before 2^t (a softmax's subtraction folded in).
inline __m512 exp_below(__m512 x, __m512 top_log2e) {
    return exp2_nonpositive(_mm512_fmsub_ps(x, _mm512_set1_ps(LOG2_E), top_log2e));
}
