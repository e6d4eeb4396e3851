// bf16 activations times GGUF block-quantized weights with AVX2, FMA and F16C, for CPUs without AVX512-BF16: Q4_1
// (weight = scale * code + min, 4-bit codes) and Q8_0 (weight = scale * code, signed 8-bit codes), a scale (and
// min) per group of inputs per output. Same op, arguments and packing as ../avx512/block_quant.cpp.
//
// A task is one block of 32 outputs. For each group of inputs, the block's weights are dequantized to float32 once
// (scale * code + min, one rounding) into a small buffer, and every row of x (converted to float32 once per call)
// multiplies them through 3-row x 32-output register tiles, whose accumulators wait in a per-task buffer between
// groups. Each output is accumulated in input order with one FMA per input, whatever the number of rows: a row's
// result does not depend on the batch, bit for bit.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "bf16.h"

namespace {

constexpr int64_t BLOCK_N = 32;  // outputs per task: one packing block
constexpr int64_t VECS = BLOCK_N / 8;
constexpr int64_t TILE_M = 3;    // rows per register tile: 3 x 4 accumulators

template <int n>
struct Unroll {
    template <typename F>
    __attribute__((always_inline)) inline void operator()(const F& f) const {
        Unroll<n - 1>{}(f);
        f(std::integral_constant<int, n - 1>{});
    }
};
template <>
struct Unroll<1> {
    template <typename F>
    __attribute__((always_inline)) inline void operator()(const F& f) const {
        f(std::integral_constant<int, 0>{});
    }
};

inline int64_t div_up(int64_t x, int64_t y) { return (x + y - 1) / y; }

inline __m256 load_half(const at::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Codes of one input pair (k, k+1) of a block as int32, [input][8 outputs]: 32 bytes of (output, input) pairs for
// outputs 0-15 (and, 4-bit, 16-31 in their high nibbles; 8-bit, in the next 32 bytes).
template <int BITS>
inline void unpack_pair(const uint8_t* p, __m256i codes[2][VECS]) {
    // Within each 128-bit lane: the 8 outputs' first inputs, then their second inputs.
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    __m256i halves[2];
    const __m256i first = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (BITS == 4) {
        const __m256i nibble = _mm256_set1_epi8(0xF);
        halves[0] = _mm256_and_si256(first, nibble);
        halves[1] = _mm256_and_si256(_mm256_srli_epi16(first, 4), nibble);
    } else {
        halves[0] = first;
        halves[1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
    }
    for (int h = 0; h < 2; ++h) {
        const __m256i s = _mm256_shuffle_epi8(halves[h], split);
        const __m128i lanes[2] = {_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1)};
        for (int l = 0; l < 2; ++l) {
            for (int i = 0; i < 2; ++i) {
                const __m128i bytes = i == 0 ? lanes[l] : _mm_unpackhi_epi64(lanes[l], lanes[l]);
                codes[i][h * 2 + l] = BITS == 4 ? _mm256_cvtepu8_epi32(bytes) : _mm256_cvtepi8_epi32(bytes);
            }
        }
    }
}

// One group's weights of a block in float32, [input][output].
template <int BITS>
void dequantize(const uint8_t* codes, const at::Half* scales, const at::Half* mins, int64_t gs, float* w) {
    __m256 scale[VECS], min[VECS];
    for (int j = 0; j < VECS; ++j) {
        scale[j] = load_half(scales + j * 8);
        min[j] = mins != nullptr ? load_half(mins + j * 8) : _mm256_setzero_ps();
    }
    for (int64_t kk = 0; kk < gs / 2; ++kk) {
        __m256i q[2][VECS];
        unpack_pair<BITS>(codes + kk * 8 * BITS, q);
        for (int i = 0; i < 2; ++i)
            for (int j = 0; j < VECS; ++j)
                _mm256_storeu_ps(w + (2 * kk + i) * BLOCK_N + j * 8,
                                 _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[i][j]), scale[j], min[j]));
    }
}

// acc[ROWS][32] += x[ROWS][gs] w[gs][32], input by input.
template <int ROWS>
void tile(const float* x, int64_t K, const float* w, int64_t gs, float* acc) {
    __m256 a[ROWS * VECS];
    Unroll<ROWS * VECS>{}([&](auto i) { a[i] = _mm256_loadu_ps(acc + i * 8); });
    for (int64_t k = 0; k < gs; ++k) {
        __m256 xb[ROWS];
        Unroll<ROWS>{}([&](auto r) { xb[r] = _mm256_broadcast_ss(x + r * K + k); });
        Unroll<ROWS * VECS>{}([&](auto i) {
            constexpr int r = i / VECS, j = i % VECS;
            a[i] = _mm256_fmadd_ps(xb[r], _mm256_loadu_ps(w + k * BLOCK_N + j * 8), a[i]);
        });
    }
    Unroll<ROWS * VECS>{}([&](auto i) { _mm256_storeu_ps(acc + i * 8, a[i]); });
}

template <int BITS>
void run(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
         const std::optional<torch::Tensor>& mins, int64_t gs, torch::Tensor& out) {
    const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), groups = K / gs, NB = N / BLOCK_N;
    std::vector<float> xf(M * K);
    const auto* X = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    at::parallel_for(0, M * K, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const uint32_t bits = static_cast<uint32_t>(X[i]) << 16;
            std::memcpy(&xf[i], &bits, 4);
        }
    });
    const auto* codes = packed.data_ptr<uint8_t>();
    auto* C = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    const auto* S = scales.data_ptr<at::Half>();
    const at::Half* Z = mins.has_value() ? mins->data_ptr<at::Half>() : nullptr;
    const int nth = at::get_num_threads();
#pragma omp parallel num_threads(nth)
    {
        thread_local std::vector<float> w, acc;  // kept between calls: no allocation a call
        w.resize(std::max<size_t>(w.size(), gs * BLOCK_N));
        acc.resize(std::max<size_t>(acc.size(), M * BLOCK_N));
        const int64_t per = div_up(NB, nth), first = omp_get_thread_num() * per;
        for (int64_t nb = first; nb < std::min(NB, first + per); ++nb) {
            const int64_t n0 = nb * BLOCK_N;
            std::fill_n(acc.data(), M * BLOCK_N, 0.0f);
            for (int64_t g = 0; g < groups; ++g) {
                dequantize<BITS>(codes + (n0 * K + g * gs * BLOCK_N) * BITS / 8, S + g * N + n0,
                                 Z == nullptr ? nullptr : Z + g * N + n0, gs, w.data());
                for (int64_t r = 0; r < M; r += TILE_M) {
                    const float* xr = xf.data() + r * K + g * gs;
                    float* ar = acc.data() + r * BLOCK_N;
                    switch (std::min(TILE_M, M - r)) {
                        case 1: tile<1>(xr, K, w.data(), gs, ar); break;
                        case 2: tile<2>(xr, K, w.data(), gs, ar); break;
                        default: tile<3>(xr, K, w.data(), gs, ar); break;
                    }
                }
            }
            for (int64_t r = 0; r < M; ++r)
                for (int j = 0; j < VECS; ++j)
                    _mm_storeu_si128(reinterpret_cast<__m128i*>(C + r * N + n0 + j * 8),
                                     float_to_bf16(_mm256_loadu_ps(acc.data() + r * BLOCK_N + j * 8)));
        }
    }
}

}  // namespace

#include "../block_quant_op.h"
