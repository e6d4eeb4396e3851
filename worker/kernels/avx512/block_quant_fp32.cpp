// block_quant_matmul_fp32: the same op as block_quant.cpp (same arguments and packing), computed with float32 FMAs
// instead of AVX512-BF16's dot product, the algorithm of ../avx2/block_quant.cpp on 512-bit registers. On Intel
// CPUs without AMX the bf16 dot product runs at half the rate of float32 FMAs (Emerald Rapids, one layer's MLP at
// 512 rows: bf16 dense 16.8 ms, float32 dense 9.1); on AMD's it runs at twice their rate. worker.cpu_kernels times
// both once per process and serves the faster.
//
// A task is one block of 32 outputs. For each group of inputs, the block's codes are converted to float32 once into
// a small buffer, and every row of x (converted to float32 once per call) multiplies them through up to 12-row x
// 32-output register tiles: each output's dot product with the group's codes, input by input, then scaled (and the
// row's group sum times the minimum added) into a per-task accumulator. The same operations in the same order for
// any number of rows: a row's result does not depend on the batch, bit for bit.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <optional>
#include <vector>

#include "../tasks.h"
#include "simd.h"

namespace {

constexpr int64_t BLOCK_N = 32;  // outputs per task: one packing block, two vectors
constexpr int64_t TILE_M = 12;   // rows per register tile: 12 x 2 accumulators
constexpr int64_t CHUNK_BYTES = 512 * 1024;

// The codes of one input pair (k, k+1) of a block as floats, [input][outputs 0-15, 16-31]: per vector, one byte
// permute moves each output's code byte into its 32-bit lane (4-bit: the low byte, both nibbles; 8-bit: the top byte,
// for the sign), the rest of the lane zeroed.
template <int BITS>
__attribute__((always_inline)) inline void unpack_pair(const uint8_t* p, __m512 codes[2][2]) {
    // In lane o, every byte 2 * o (the output's first input; + 1 for the second).
    const __m512i first = _mm512_set_epi32(0x1E1E1E1E, 0x1C1C1C1C, 0x1A1A1A1A, 0x18181818, 0x16161616, 0x14141414,
                                           0x12121212, 0x10101010, 0x0E0E0E0E, 0x0C0C0C0C, 0x0A0A0A0A, 0x08080808,
                                           0x06060606, 0x04040404, 0x02020202, 0x00000000);
    const __m512i index[2] = {first, _mm512_add_epi8(first, _mm512_set1_epi8(1))};
    auto load = [](const uint8_t* q) { return _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q))); };
    if constexpr (BITS == 4) {  // outputs 16-31 in the high nibbles
        const __m512i v = load(p);
        for (int i = 0; i < 2; ++i) {
            const __m512i b = _mm512_maskz_permutexvar_epi8(0x1111111111111111ULL, index[i], v);
            codes[i][0] = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0xF)));
            codes[i][1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
        }
    } else {  // outputs 16-31 in the next 32 bytes
        for (int h = 0; h < 2; ++h) {
            const __m512i v = load(p + 32 * h);
            for (int i = 0; i < 2; ++i) {
                const __m512i b = _mm512_maskz_permutexvar_epi8(0x8888888888888888ULL, index[i], v);
                codes[i][h] = _mm512_cvtepi32_ps(_mm512_srai_epi32(b, 24));
            }
        }
    }
}

// One group of a block: its scales and minimums, and the tile's first row's sum of the group's inputs.
struct Group {
    __m512 scale[2], min[2];
    bool has_min;
    const float* sums;  // rows `stride` apart
    int64_t stride;
};

// acc[ROWS][32] += dot * scale (+ the row's group sum * min); rows of acc are a block apart.
template <int ROWS>
__attribute__((always_inline)) inline void finish(const __m512* dot, const Group& g, float* acc) {
    Unroll<ROWS * 2>{}([&](auto i) {
        constexpr int r = i / 2, h = i % 2;
        float* a_ptr = acc + r * BLOCK_N + h * 16;
        __m512 a = _mm512_fmadd_ps(dot[i], g.scale[h], _mm512_loadu_ps(a_ptr));
        if (g.has_min) a = _mm512_fmadd_ps(_mm512_set1_ps(g.sums[r * g.stride]), g.min[h], a);
        _mm512_storeu_ps(a_ptr, a);
    });
}

// Up to 12 rows x the block's 32 outputs over one group, the codes read as floats from `w` [input][output].
template <int ROWS>
void tile(const float* x, int64_t K, const float* w, int64_t gs, const Group& g, float* acc) {
    __m512 dot[ROWS * 2];
    Unroll<ROWS * 2>{}([&](auto i) { dot[i] = _mm512_setzero_ps(); });
    for (int64_t k = 0; k < gs; ++k) {
        const __m512 w0 = _mm512_loadu_ps(w + k * BLOCK_N), w1 = _mm512_loadu_ps(w + k * BLOCK_N + 16);
        Unroll<ROWS>{}([&](auto r) {
            const __m512 xb = _mm512_set1_ps(x[r * K + k]);
            dot[2 * r] = _mm512_fmadd_ps(xb, w0, dot[2 * r]);
            dot[2 * r + 1] = _mm512_fmadd_ps(xb, w1, dot[2 * r + 1]);
        });
    }
    finish<ROWS>(dot, g, acc);
}

// The same for one or two rows, the codes unpacked as they are read: the same operations in the same order.
template <int BITS, int ROWS>
void tile_direct(const float* x, int64_t K, const uint8_t* codes, int64_t gs, const Group& g, float* acc) {
    __m512 dot[ROWS * 2];
    Unroll<ROWS * 2>{}([&](auto i) { dot[i] = _mm512_setzero_ps(); });
    for (int64_t kk = 0; kk < gs / 2; ++kk) {
        __m512 q[2][2];
        unpack_pair<BITS>(codes + kk * 8 * BITS, q);
        for (int i = 0; i < 2; ++i) {
            Unroll<ROWS>{}([&](auto r) {
                const __m512 xb = _mm512_set1_ps(x[r * K + 2 * kk + i]);
                dot[2 * r] = _mm512_fmadd_ps(xb, q[i][0], dot[2 * r]);
                dot[2 * r + 1] = _mm512_fmadd_ps(xb, q[i][1], dot[2 * r + 1]);
            });
        }
    }
    finish<ROWS>(dot, g, acc);
}

template <int BITS>
void run(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
         const std::optional<torch::Tensor>& mins, int64_t gs, torch::Tensor& out) {
    const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), groups = K / gs, NB = N / BLOCK_N;
    // x in float32, and each row's sum of each group's inputs (which the group's minimum multiplies), 16 lanes then
    // across, the same for every row.
    std::vector<float> xf(M * K), sums(mins.has_value() ? M * groups : 0);
    const auto* X = x.data_ptr<at::BFloat16>();
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
            for (int64_t k = 0; k < K; k += 16) {
                const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(X + m * K + k));
                _mm512_storeu_ps(&xf[m * K + k], _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)));
            }
            for (int64_t g = 0; g < static_cast<int64_t>(sums.size()) / M; ++g) {
                __m512 sum = _mm512_setzero_ps();
                for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) sum = _mm512_add_ps(sum, _mm512_loadu_ps(&xf[m * K + k]));
                sums[m * groups + g] = _mm512_reduce_add_ps(sum);
            }
        }
    });
    const auto* codes = packed.data_ptr<uint8_t>();
    auto* C = out.data_ptr<at::BFloat16>();
    const auto* S = scales.data_ptr<at::Half>();
    const at::Half* Z = mins.has_value() ? mins->data_ptr<at::Half>() : nullptr;
    const int nth = at::get_num_threads();
    // Rows go in chunks whose float32 inputs stay in L2 while every block of the thread's outputs reads them.
    const int64_t chunk_rows = div_up(div_up(M, div_up(M * K * 4, CHUNK_BYTES)), TILE_M) * TILE_M;
    Shares shares(NB, nth, div_up(M, chunk_rows));
#pragma omp parallel num_threads(nth)
    {
        thread_local std::vector<float> w, acc;  // kept between calls: no allocation a call
        w.resize(std::max<size_t>(w.size(), gs * BLOCK_N));
        acc.resize(std::max<size_t>(acc.size(), chunk_rows * BLOCK_N));
        for (int64_t m0 = 0; m0 < M; m0 += chunk_rows) {
            const int64_t rows = std::min(chunk_rows, M - m0);
            shares.run([&](int64_t nb) {
                const int64_t n0 = nb * BLOCK_N;
                std::fill_n(acc.data(), rows * BLOCK_N, 0.0f);
                for (int64_t g = 0; g < groups; ++g) {
                    Group group;
                    group.has_min = Z != nullptr;
                    group.stride = groups;
                    for (int h = 0; h < 2; ++h) {
                        group.scale[h] = load_half(S + n0 * groups + g * BLOCK_N + h * 16);
                        group.min[h] = group.has_min ? load_half(Z + n0 * groups + g * BLOCK_N + h * 16) : _mm512_setzero_ps();
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
                    for (int64_t kk = 0; kk < gs / 2; ++kk) {
                        __m512 q[2][2];
                        unpack_pair<BITS>(block + kk * 8 * BITS, q);
                        for (int i = 0; i < 2; ++i)
                            for (int h = 0; h < 2; ++h) _mm512_storeu_ps(w.data() + (2 * kk + i) * BLOCK_N + h * 16, q[i][h]);
                    }
                    for (int64_t r = 0; r < rows; r += TILE_M) {
                        group.sums = sg + r * groups;
                        const float* xr = xg + r * K;
                        float* ar = acc.data() + r * BLOCK_N;
                        switch (std::min(TILE_M, rows - r)) {
                            case 1: tile<1>(xr, K, w.data(), gs, group, ar); break;
                            case 2: tile<2>(xr, K, w.data(), gs, group, ar); break;
                            case 3: tile<3>(xr, K, w.data(), gs, group, ar); break;
                            case 4: tile<4>(xr, K, w.data(), gs, group, ar); break;
                            case 5: tile<5>(xr, K, w.data(), gs, group, ar); break;
                            case 6: tile<6>(xr, K, w.data(), gs, group, ar); break;
                            case 7: tile<7>(xr, K, w.data(), gs, group, ar); break;
                            case 8: tile<8>(xr, K, w.data(), gs, group, ar); break;
                            case 9: tile<9>(xr, K, w.data(), gs, group, ar); break;
                            case 10: tile<10>(xr, K, w.data(), gs, group, ar); break;
                            case 11: tile<11>(xr, K, w.data(), gs, group, ar); break;
                            default: tile<12>(xr, K, w.data(), gs, group, ar); break;
                        }
                    }
                }
                for (int64_t r = 0; r < rows; ++r)
                    _mm512_storeu_si512(C + (m0 + r) * N + n0,
                                        (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(acc.data() + r * BLOCK_N + 16),
                                                                     _mm512_loadu_ps(acc.data() + r * BLOCK_N)));
            }, m0 / chunk_rows);
        }
    }
}

}  // namespace

#define BLOCK_QUANT_OP block_quant_matmul_fp32
#include "../block_quant_op.h"
