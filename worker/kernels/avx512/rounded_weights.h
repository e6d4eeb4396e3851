// A block of 32 outputs' weights computed from their codes, scale * code + min in float32 rounded to bf16, in the
// order AVX512-BF16's dot product and AMX's tiles take their second operand: the block kernels that serve a step's
// many rows compute these once a call and then read them for every row (block_quant_matmul_amx on AMX tiles,
// block_quant_matmul_rounded with the vector dot product): the bf16 model's weights, where the exact kernels
// (block_quant.cpp) multiply each group's dot product by its scale instead.
#pragma once
#include <torch/extension.h>
#include <immintrin.h>
#include <cstdint>

#include "../prefetch.h"
#include "simd.h"

constexpr int64_t ROUNDED_BLOCK_N = 32;  // outputs a block: one packing block, two halves of 16

// The block's weights as bf16, [half][input pair][output in half][input in pair]: half h holds outputs 16h to 16h + 15.
template <int BITS>
void rounded_weights(const uint8_t* codes, const at::Half* scales, const at::Half* mins, int64_t K, int64_t gs,
                     at::BFloat16* out) {
    const __m512i first8 = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i dup[2] = {first8, _mm512_add_epi32(first8, _mm512_set1_epi32(8))};
    auto half_out = [&](int h) { return out + h * K * 16; };
    for (int64_t group = 0; group < K / gs; ++group) {
        // Each output's scale and minimum, twice (once per input of a pair): [half][outputs 0-7 / 8-15].
        __m512 scale[2][2], min[2][2];
        for (int h = 0; h < 2; ++h) {
            const __m512 s = load_half(scales + group * ROUNDED_BLOCK_N + 16 * h);
            const __m512 m = mins == nullptr ? _mm512_setzero_ps() : load_half(mins + group * ROUNDED_BLOCK_N + 16 * h);
            for (int q = 0; q < 2; ++q) {
                scale[h][q] = _mm512_permutexvar_ps(dup[q], s);
                min[h][q] = _mm512_permutexvar_ps(dup[q], m);
            }
        }
        for (int64_t pair = group * gs / 2; pair < (group + 1) * gs / 2; ++pair) {
            prefetch<64>(codes + pair * 8 * BITS + CODES_BYTES_AHEAD);
            __m128i bytes[2][2];  // [half][outputs 0-7 / 8-15]: each output's two codes
            if constexpr (BITS == 4) {
                const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + pair * 32));
                const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi8(0xF));
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0xF));
                bytes[0][0] = _mm256_castsi256_si128(lo), bytes[0][1] = _mm256_extracti128_si256(lo, 1);
                bytes[1][0] = _mm256_castsi256_si128(hi), bytes[1][1] = _mm256_extracti128_si256(hi, 1);
            } else {
                for (int h = 0; h < 2; ++h) {
                    for (int q = 0; q < 2; ++q) {
                        bytes[h][q] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + pair * 64 + 32 * h + 16 * q));
                    }
                }
            }
            for (int h = 0; h < 2; ++h) {
                __m512 w[2];
                for (int q = 0; q < 2; ++q) {
                    const __m512i c = BITS == 4 ? _mm512_cvtepu8_epi32(bytes[h][q]) : _mm512_cvtepi8_epi32(bytes[h][q]);
                    w[q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), scale[h][q], min[h][q]);
                }
                _mm512_storeu_si512(half_out(h) + pair * 32, (__m512i)_mm512_cvtne2ps_pbh(w[1], w[0]));
            }
        }
    }
}
