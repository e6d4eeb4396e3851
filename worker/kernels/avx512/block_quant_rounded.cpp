// block_quant_matmul_rounded: the block_quant_matmul op (same arguments and packing) for a step's many rows on
// AVX512-BF16 without AMX. A task is one block of 32 outputs: its weights are rounded to bf16 once
// (rounded_weights.h), then every 8 rows take the dot product with them over all of K, with no scale to apply per
// group of inputs: the exact kernel (block_quant.cpp) spends one multiply-add in nine on its groups' scales and
// minimums. The model's block calls, Zen 4: 16 / 32 / 128 / 512 rows 13.1 / 21.7 / 76.8 / 306 -> 12.1 / 19.9 / 67.3 /
// 269 ms; below ~12 rows the rounding costs more than it saves (1 row 3.1 -> 6.1 ms). Each output is the same sum
// in the same order for any number of rows: a row's result does not depend on the batch.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <optional>
#include <vector>

#include "../row_tiles.h"
#include "../tasks.h"
#include "rounded_weights.h"
#include "simd.h"

#define BLOCK_QUANT_OP block_quant_matmul_rounded

namespace {

constexpr int64_t BLOCK_N = ROUNDED_BLOCK_N;
constexpr int64_t TILE_M = 8;  // rows a register tile: 16 accumulators

// ROWS rows of x (K apart) times the block's rounded weights w, into out (rows N apart).
template <int ROWS>
void tile(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* out, int64_t K, int64_t N) {
    const float* a = reinterpret_cast<const float*>(x);  // two bf16 per float
    const at::BFloat16* upper = w + K * 16;               // outputs 16-31
    __m512 acc[ROWS * 2];
    Unroll<ROWS * 2>{}([&](auto i) { acc[i] = _mm512_setzero_ps(); });
    for (int64_t kk = 0; kk < K / 2; ++kk) {
        const __m512bh lo = (__m512bh)_mm512_loadu_si512(w + kk * 32);
        const __m512bh hi = (__m512bh)_mm512_loadu_si512(upper + kk * 32);
        Unroll<ROWS>{}([&](auto row) {
            const __m512bh pair = (__m512bh)_mm512_set1_ps(a[row * (K / 2) + kk]);
            acc[2 * row] = _mm512_dpbf16_ps(acc[2 * row], pair, lo);
            acc[2 * row + 1] = _mm512_dpbf16_ps(acc[2 * row + 1], pair, hi);
        });
    }
    Unroll<ROWS>{}([&](auto row) {
        _mm512_storeu_si512(out + row * N, (__m512i)_mm512_cvtne2ps_pbh(acc[2 * row + 1], acc[2 * row]));
    });
}

template <int BITS>
void run(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
         const std::optional<torch::Tensor>& mins, int64_t gs, torch::Tensor& out) {
    const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), groups = K / gs;
    const auto* X = x.data_ptr<at::BFloat16>();
    const auto* codes = packed.data_ptr<uint8_t>();
    auto* C = out.data_ptr<at::BFloat16>();
    const auto* S = scales.data_ptr<at::Half>();
    const at::Half* Z = mins.has_value() ? mins->data_ptr<at::Half>() : nullptr;
    const int nth = at::get_num_threads();
    Shares shares(N / BLOCK_N, nth);
#pragma omp parallel num_threads(nth)
    {
        thread_local std::vector<at::BFloat16> w;  // kept between calls: no allocation a call
        w.resize(std::max<size_t>(w.size(), K * BLOCK_N));
        shares.run([&](int64_t nb) {
            const int64_t n0 = nb * BLOCK_N;
            rounded_weights<BITS>(codes + n0 * K * BITS / 8, S + n0 * groups, Z == nullptr ? nullptr : Z + n0 * groups,
                                  K, gs, w.data());
            row_tiles<TILE_M>(M, [&](auto rows, int64_t r) { tile<rows>(X + r * K, w.data(), C + r * N + n0, K, N); });
        });
    }
}

}  // namespace

#include "../block_quant_op.h"
