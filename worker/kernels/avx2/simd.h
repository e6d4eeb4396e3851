// What the AVX2 kernels share: bfloat16 <-> float32 (AVX2 has no bf16 instructions), horizontal sums and e^x.
#pragma once
#include <immintrin.h>
#include <cstdint>

#include "../exp2_fit.h"
#include "../unroll.h"

// 8 bf16 -> 8 floats: the bf16 bits are a float's upper half.
inline __m256 bf16_to_float(const void* p) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

// 8 float16 -> 8 floats (F16C).
inline __m256 load_half(const void* p) { return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p))); }

// 8 floats -> 8 bf16, rounded to nearest even as torch rounds (no NaN among these results).
inline __m128i float_to_bf16(__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i bias = _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}

// The sum of 8 floats, in a fixed order.
inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The largest of 8 floats.
inline float max8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// 2^t for t <= 0: 2^n * p(f), n the nearest integer, f = t - n in [-0.5, 0.5], p the fit of exp2_fit.h. Below -125,
// 2^-125.
inline __m256 exp2_nonpositive(__m256 t) {
    t = _mm256_max_ps(t, _mm256_set1_ps(-125.0f));
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(EXP2_FIT[0]);
    for (int i = 1; i <= EXP2_DEGREE; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_FIT[i]));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

// e^x for x <= 0.
inline __m256 exp_nonpositive(__m256 x) { return exp2_nonpositive(_mm256_mul_ps(x, _mm256_set1_ps(LOG2_E))); }

// e^(x - top) for x <= top, given top_log2e = top log2(e): one FMA before 2^t (a softmax's subtraction folded in).
inline __m256 exp_below(__m256 x, __m256 top_log2e) {
    return exp2_nonpositive(_mm256_fmsub_ps(x, _mm256_set1_ps(LOG2_E), top_log2e));
}
