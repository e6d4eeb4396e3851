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
#include <optional>
#include <vector>

#include "simd.h"

namespace {

constexpr int64_t BLOCK_N = 32;  // outputs per task: one packing block
constexpr int64_t VECS = BLOCK_N / 8;
constexpr int64_t TILE_M = 6;    // rows per register tile: 6 x 2 accumulators
constexpr int64_t CHUNK_BYTES = 256 * 1024;

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

// One group's codes of a block as floats, [input][output].
template <int BITS>
void unpack_group(const uint8_t* codes, int64_t gs, float* w) {
    for (int64_t kk = 0; kk < gs / 2; ++kk) {
        __m256i q[2][VECS];
        unpack_pair<BITS>(codes + kk * 8 * BITS, q);
        for (int i = 0; i < 2; ++i)
            for (int j = 0; j < VECS; ++j) _mm256_storeu_ps(w + (2 * kk + i) * BLOCK_N + j * 8, _mm256_cvtepi32_ps(q[i][j]));
    }
}

// One group of a block: its scales and minimums, and each row's sum of the group's inputs.
struct Group {
    __m256 scale[VECS], min[VECS];
    bool has_min;
    const float* sums;  // the tile's first row's sum, rows `stride` apart
    int64_t stride;
};

// acc[ROWS][VECS * 8] += dot * scale (+ the row's group sum * min), for the group's first VECS vectors of outputs
// (`acc`, `g` and `w` point at the first; rows of acc are a block apart).
template <int ROWS, int N_VECS>
__attribute__((always_inline)) inline void finish(const __m256* dot, const Group& g, float* acc) {
    Unroll<ROWS * N_VECS>{}([&](auto i) {
        constexpr int r = i / N_VECS, j = i % N_VECS;
        float* a_ptr = acc + r * BLOCK_N + j * 8;
        __m256 a = _mm256_fmadd_ps(dot[i], g.scale[j], _mm256_loadu_ps(a_ptr));
        if (g.has_min) a = _mm256_fmadd_ps(_mm256_set1_ps(g.sums[r * g.stride]), g.min[j], a);
        _mm256_storeu_ps(a_ptr, a);
    });
}

// Up to 6 rows x 16 outputs (half a block) over one group, the codes read as floats from `w`: each output's dot
// product with the codes accumulated input by input, then scaled. (3 rows x 32 outputs would read each code once
// from memory per row: load-bound.)
template <int ROWS>
void tile(const float* x, int64_t K, const float* w, int64_t gs, const Group& g, float* acc) {
    constexpr int HALF = VECS / 2;
    __m256 dot[ROWS * HALF];
    Unroll<ROWS * HALF>{}([&](auto i) { dot[i] = _mm256_setzero_ps(); });
    for (int64_t k = 0; k < gs; ++k) {
        __m256 wv[HALF];
        Unroll<HALF>{}([&](auto j) { wv[j] = _mm256_loadu_ps(w + k * BLOCK_N + j * 8); });
        Unroll<ROWS>{}([&](auto r) {
            const __m256 xb = _mm256_broadcast_ss(x + r * K + k);
            Unroll<HALF>{}([&](auto j) { dot[r * HALF + j] = _mm256_fmadd_ps(xb, wv[j], dot[r * HALF + j]); });
        });
    }
    finish<ROWS, HALF>(dot, g, acc);
}

// The same for one or two rows, the codes unpacked as they are read: the same operations in the same order, so
// the same bits.
template <int BITS, int ROWS>
void tile_direct(const float* x, int64_t K, const uint8_t* codes, int64_t gs, const Group& g, float* acc) {
    __m256 dot[ROWS * VECS];
    Unroll<ROWS * VECS>{}([&](auto i) { dot[i] = _mm256_setzero_ps(); });
    for (int64_t kk = 0; kk < gs / 2; ++kk) {
        __m256i q[2][VECS];
        unpack_pair<BITS>(codes + kk * 8 * BITS, q);
        for (int i = 0; i < 2; ++i) {
            __m256 xb[ROWS];
            Unroll<ROWS>{}([&](auto r) { xb[r] = _mm256_broadcast_ss(x + r * K + 2 * kk + i); });
            Unroll<VECS>{}([&](auto j) {
                const __m256 c = _mm256_cvtepi32_ps(q[i][j]);
                Unroll<ROWS>{}([&](auto r) { dot[r * VECS + j] = _mm256_fmadd_ps(xb[r], c, dot[r * VECS + j]); });
            });
        }
    }
    finish<ROWS, VECS>(dot, g, acc);
}

template <int BITS>
void run(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
         const std::optional<torch::Tensor>& mins, int64_t gs, torch::Tensor& out) {
    const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), groups = K / gs, NB = N / BLOCK_N;
    // x in float32, and each row's sum of each group's inputs (which the group's minimum multiplies), 8 lanes then
    // across, the same for every row.
    std::vector<float> xf(M * K), sums(mins.has_value() ? M * groups : 0);
    const auto* X = x.data_ptr<at::BFloat16>();
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
            for (int64_t k = 0; k < K; k += 8) _mm256_storeu_ps(&xf[m * K + k], bf16_to_float(X + m * K + k));
            for (int64_t g = 0; g < static_cast<int64_t>(sums.size()) / M; ++g) {
                __m256 sum = _mm256_setzero_ps();
                for (int64_t k = g * gs; k < (g + 1) * gs; k += 8) sum = _mm256_add_ps(sum, _mm256_loadu_ps(&xf[m * K + k]));
                sums[m * groups + g] = sum8(sum);
            }
        }
    });
    const auto* codes = packed.data_ptr<uint8_t>();
    auto* C = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    const auto* S = scales.data_ptr<at::Half>();
    const at::Half* Z = mins.has_value() ? mins->data_ptr<at::Half>() : nullptr;
    const int nth = at::get_num_threads();
    // Rows go in chunks whose float32 inputs stay in L2 while every block of the thread's outputs reads them.
    const int64_t chunk_rows = div_up(div_up(M, div_up(M * K * 4, CHUNK_BYTES)), TILE_M) * TILE_M;
#pragma omp parallel num_threads(nth)
    {
        thread_local std::vector<float> w, acc;  // kept between calls: no allocation a call
        w.resize(std::max<size_t>(w.size(), gs * BLOCK_N));
        acc.resize(std::max<size_t>(acc.size(), chunk_rows * BLOCK_N));
        const int64_t per = div_up(NB, nth), first = omp_get_thread_num() * per;
        for (int64_t m0 = 0; m0 < M; m0 += chunk_rows) {
            const int64_t rows = std::min(chunk_rows, M - m0);
            for (int64_t nb = first; nb < std::min(NB, first + per); ++nb) {
                const int64_t n0 = nb * BLOCK_N;
                std::fill_n(acc.data(), rows * BLOCK_N, 0.0f);
                for (int64_t g = 0; g < groups; ++g) {
                    Group group;
                    group.has_min = Z != nullptr;
                    group.stride = groups;
                    for (int j = 0; j < VECS; ++j) {
                        group.scale[j] = load_half(S + g * N + n0 + j * 8);
                        group.min[j] = group.has_min ? load_half(Z + g * N + n0 + j * 8) : _mm256_setzero_ps();
                    }
                    const uint8_t* block = codes + (n0 * K + g * gs * BLOCK_N) * BITS / 8;
                    const float* xg = xf.data() + m0 * K + g * gs;
                    const float* sg = sums.data() + m0 * groups + g;
                    if (M <= 2) {  // few rows: unpacking as they read beats a round trip through the buffer
                        group.sums = sg;
                        if (M == 1) tile_direct<BITS, 1>(xg, K, block, gs, group, acc.data());
                        else tile_direct<BITS, 2>(xg, K, block, gs, group, acc.data());
                        continue;
                    }
                    unpack_group<BITS>(block, gs, w.data());
                    for (int half = 0; half < 2; ++half) {
                        Group part = group;
                        std::copy_n(group.scale + half * VECS / 2, VECS / 2, part.scale);
                        std::copy_n(group.min + half * VECS / 2, VECS / 2, part.min);
                        const float* wh = w.data() + half * BLOCK_N / 2;
                        for (int64_t r = 0; r < rows; r += TILE_M) {
                            part.sums = sg + r * groups;
                            const float* xr = xg + r * K;
                            float* ar = acc.data() + r * BLOCK_N + half * BLOCK_N / 2;
                            switch (std::min(TILE_M, rows - r)) {
                                case 1: tile<1>(xr, K, wh, gs, part, ar); break;
                                case 2: tile<2>(xr, K, wh, gs, part, ar); break;
                                case 3: tile<3>(xr, K, wh, gs, part, ar); break;
                                case 4: tile<4>(xr, K, wh, gs, part, ar); break;
                                case 5: tile<5>(xr, K, wh, gs, part, ar); break;
                                default: tile<6>(xr, K, wh, gs, part, ar); break;
                            }
                        }
                    }
                }
                for (int64_t r = 0; r < rows; ++r)
                    for (int j = 0; j < VECS; ++j)
                        _mm_storeu_si128(reinterpret_cast<__m128i*>(C + (m0 + r) * N + n0 + j * 8),
                                         float_to_bf16(_mm256_loadu_ps(acc.data() + r * BLOCK_N + j * 8)));
            }
        }
    }
}

}  // namespace

#include "../block_quant_op.h"
