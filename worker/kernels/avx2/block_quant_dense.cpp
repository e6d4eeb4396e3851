// block_quant_matmul_dense: the block_quant_matmul op (same arguments and packing) for a step's many rows on AVX2
// CPUs whose float32 FMAs outrun their 16-bit integer products there (Zen 1; worker.cpu_kernels.tile_op() times it). A
// task is one block of 32 outputs: its weights are computed once a call in float32 (scale * code + min, exact), then
// every row of x, converted to float32 once a call, takes its dot product with them over all of K in FMAs, TILE_M
// rows at a time. Each output is the same sum in the same order for any number of rows: a row's result does not
// depend on the batch (it does differ in the last bits from the exact kernel's, block_quant.cpp, which quantizes x
// to 16 bits).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <optional>
#include <vector>

#include "../prefetch.h"
#include "../row_tiles.h"
#include "../tasks.h"
#include "simd.h"

#define BLOCK_QUANT_OP block_quant_matmul_dense

namespace {

constexpr int64_t BLOCK_N = 32;  // outputs a task: one packing block, two halves of 16
constexpr int64_t HALF = 16;
constexpr int TILE_M = 6;  // rows a register tile: 6 x 2 accumulators, 2 vectors of weights and a broadcast

// 16 codes (16-bit, outputs in order) as floats times their outputs' scales plus minimums, stored at w.
__attribute__((always_inline)) inline void store_weights(__m256i codes, const __m256 scale[2], const __m256 min[2],
                                                         float* w) {
    const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(codes)));
    const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(codes, 1)));
    _mm256_storeu_ps(w, _mm256_fmadd_ps(lo, scale[0], min[0]));
    _mm256_storeu_ps(w + 8, _mm256_fmadd_ps(hi, scale[1], min[1]));
}

// The block's weights in float32, [half][input][output in half]: half h holds outputs 16h to 16h + 15.
template <int BITS>
void dense_weights(const uint8_t* codes, const at::Half* scales, const at::Half* mins, int64_t K, int64_t gs, float* w) {
    for (int64_t group = 0; group < K / gs; ++group) {
        __m256 scale[2][2], min[2][2];  // [half][outputs 0-7 / 8-15]
        for (int h = 0; h < 2; ++h)
            for (int q = 0; q < 2; ++q) {
                const int64_t at = group * BLOCK_N + HALF * h + 8 * q;
                scale[h][q] = load_half(scales + at);
                min[h][q] = mins == nullptr ? _mm256_setzero_ps() : load_half(mins + at);
            }
        for (int64_t pair = group * gs / 2; pair < (group + 1) * gs / 2; ++pair) {
            prefetch<64>(codes + pair * 8 * BITS + CODES_BYTES_AHEAD);
            // Per half, 16 words: an output's two codes, input k in the low byte, k + 1 in the high.
            __m256i words[2];
            if constexpr (BITS == 4) {  // outputs 16-31 in the high nibbles
                const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + pair * 32));
                const __m256i nibble = _mm256_set1_epi8(0xF);
                words[0] = _mm256_and_si256(v, nibble);
                words[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
            } else {  // outputs 16-31 in the next 32 bytes
                for (int h = 0; h < 2; ++h)
                    words[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + pair * 64 + 32 * h));
            }
            for (int h = 0; h < 2; ++h) {
                float* at = w + h * K * HALF + 2 * pair * HALF;
                // Signed for 8 bits: each byte's sign spread over its word by the arithmetic shift.
                const __m256i first = _mm256_srai_epi16(_mm256_slli_epi16(words[h], 8), 8);
                const __m256i second = BITS == 4 ? _mm256_srli_epi16(words[h], 8) : _mm256_srai_epi16(words[h], 8);
                store_weights(first, scale[h], min[h], at);
                store_weights(second, scale[h], min[h], at + HALF);
            }
        }
    }
}

// ROWS rows of x (float32, K apart) times one half's weights w ([input][16]), into out (bf16, rows N apart).
template <int ROWS>
__attribute__((noinline)) void tile(const float* x, const float* w, uint16_t* out, int64_t K, int64_t N) {
    __m256 acc[ROWS * 2];
    Unroll<ROWS * 2>{}([&](auto i) { acc[i] = _mm256_setzero_ps(); });
    for (int64_t k = 0; k < K; ++k) {
        const __m256 w0 = _mm256_loadu_ps(w + k * HALF), w1 = _mm256_loadu_ps(w + k * HALF + 8);
        Unroll<ROWS>{}([&](auto r) {
            const __m256 xb = _mm256_broadcast_ss(x + r * K + k);
            acc[2 * r] = _mm256_fmadd_ps(xb, w0, acc[2 * r]);
            acc[2 * r + 1] = _mm256_fmadd_ps(xb, w1, acc[2 * r + 1]);
        });
    }
    Unroll<ROWS>{}([&](auto r) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + r * N), float_to_bf16(acc[2 * r]));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + r * N + 8), float_to_bf16(acc[2 * r + 1]));
    });
}

template <int BITS>
void run(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
         const std::optional<torch::Tensor>& mins, int64_t gs, torch::Tensor& out) {
    const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), groups = K / gs;
    static thread_local std::vector<float> calling_thread_x;  // kept between calls: no allocation a call
    calling_thread_x.resize(std::max<size_t>(calling_thread_x.size(), M * K));
    float* xf = calling_thread_x.data();
    const auto* X = x.data_ptr<at::BFloat16>();
    at::parallel_for(0, M * K / 8, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) _mm256_storeu_ps(xf + 8 * i, bf16_to_float(X + 8 * i));
    });
    const auto* codes = packed.data_ptr<uint8_t>();
    auto* C = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    const auto* S = scales.data_ptr<at::Half>();
    const at::Half* Z = mins.has_value() ? mins->data_ptr<at::Half>() : nullptr;
    const int nth = at::get_num_threads();
    Shares shares(N / BLOCK_N, nth);
#pragma omp parallel num_threads(nth)
    {
        thread_local std::vector<float> w;  // kept between calls
        w.resize(std::max<size_t>(w.size(), K * BLOCK_N));
        shares.run([&](int64_t nb) {
            const int64_t n0 = nb * BLOCK_N;
            dense_weights<BITS>(codes + n0 * K * BITS / 8, S + n0 * groups, Z == nullptr ? nullptr : Z + n0 * groups,
                                K, gs, w.data());
            for (int h = 0; h < 2; ++h) {
                row_tiles<TILE_M>(M, [&](auto rows, int64_t r) {
                    tile<rows>(xf + r * K, w.data() + h * K * HALF, C + r * N + n0 + h * HALF, K, N);
                });
            }
        });
    }
}

}  // namespace

#include "../block_quant_op.h"
