// block_quant_matmul_amx: the block_quant_matmul op (same arguments and packing) on AMX tiles, for prompt rows on
// CPUs with AMX-BF16 (Sapphire Rapids and later). A task is one block of 32 outputs: its weights are computed once
// (scale * code + min in float32, rounded to bf16) into a buffer laid out as AMX takes its second operand, then every
// 32 rows of x times that buffer accumulate in four 16 x 16 float32 tiles, 32 inputs a step. The packing already holds
// each output's two codes of an input pair side by side, the order the tiles want. Each output is the same float32
// sum in the same order for any number of rows: a row's result does not depend on the batch, bit for bit.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "../tasks.h"
#include "amx.h"
#include "rounded_weights.h"
#include "simd.h"

#define BLOCK_QUANT_OP block_quant_matmul_amx

namespace {

constexpr int64_t BLOCK_N = 32;  // outputs per task: one packing block, two tiles of 16
constexpr int64_t TILE_K = 32;   // inputs per tile step: 16 pairs

// Tile results, float32 [16 rows][16 outputs], rounded into out (rows N apart); `rows` of the 16 are real.
void store_rows(const float* tile, int64_t rows, at::BFloat16* out, int64_t N) {
    for (int64_t r = 0; r < rows; ++r) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * N), float_to_bf16(_mm512_loadu_ps(tile + r * 16)));
    }
}

// 16 or 32 rows (TILES of 16, their x at a[0], a[1], K apart) times the block's weights w, into out. Tiles 0-3: the
// 2 x 2 accumulators (rows 0-15 / 16-31 x outputs 0-15 / 16-31); 4-5: x; 6-7: the weights.
template <int TILES>
__attribute__((target("amx-tile,amx-bf16"))) void rows_times_block(const at::BFloat16* const* a, const int64_t* real,
                                                                   const at::BFloat16* w, int64_t K, at::BFloat16* out,
                                                                   int64_t N) {
    asm volatile("" ::: "memory");  // w and x written before this point are what the tile loads read
    _tile_zero(0);
    _tile_zero(1);
    if constexpr (TILES == 2) {
        _tile_zero(2);
        _tile_zero(3);
    }
    const int64_t stride = K * 2;
    for (int64_t k = 0; k < K; k += TILE_K) {
        _tile_loadd(6, w + k * 16, 64);
        _tile_loadd(7, w + K * 16 + k * 16, 64);
        _tile_loadd(4, a[0] + k, stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if constexpr (TILES == 2) {
            _tile_loadd(5, a[1] + k, stride);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    alignas(64) float c[4][TILE_ROWS * 16];
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    if constexpr (TILES == 2) {
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
    }
    asm volatile("" ::: "memory");
    for (int t = 0; t < TILES; ++t) {
        store_rows(c[2 * t], real[t], out + t * TILE_ROWS * N, N);
        store_rows(c[2 * t + 1], real[t], out + t * TILE_ROWS * N + 16, N);
    }
}


template <int BITS>
void run(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
         const std::optional<torch::Tensor>& mins, int64_t gs, torch::Tensor& out) {
    TORCH_CHECK(amx_permitted(), "block_quant_matmul_amx: this CPU or kernel does not let the process use AMX");
    const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
    const auto* X = x.data_ptr<at::BFloat16>();
    // The last, partial tile's rows, zero-padded to 16, so that every tile load reads 16 rows.
    const int64_t full = M / TILE_ROWS * TILE_ROWS, tiles = div_up(M, TILE_ROWS);
    std::vector<at::BFloat16> tail(M > full ? TILE_ROWS * K : 0, at::BFloat16(0.0f));
    if (M > full) std::memcpy(tail.data(), X + full * K, (M - full) * K * sizeof(at::BFloat16));
    auto tile_x = [&](int64_t t) { return t * TILE_ROWS < full ? X + t * TILE_ROWS * K : tail.data(); };
    auto tile_rows = [&](int64_t t) { return std::min(TILE_ROWS, M - t * TILE_ROWS); };

    const auto* codes = packed.data_ptr<uint8_t>();
    auto* C = out.data_ptr<at::BFloat16>();
    const auto* S = scales.data_ptr<at::Half>();
    const at::Half* Z = mins.has_value() ? mins->data_ptr<at::Half>() : nullptr;
    const int64_t NB = N / BLOCK_N;
    const int nth = at::get_num_threads();
    Shares shares(NB, nth);
#pragma omp parallel num_threads(nth)
    {
        thread_local std::vector<at::BFloat16> w;  // kept between calls: no allocation a call
        w.resize(std::max<size_t>(w.size(), K * BLOCK_N));
        configure_tiles();
        shares.run([&](int64_t nb) {
            const int64_t n0 = nb * BLOCK_N;
            const int64_t block_scales = n0 * (K / gs);
            rounded_weights<BITS>(codes + n0 * K * BITS / 8, S + block_scales,
                                  Z == nullptr ? nullptr : Z + block_scales, K, gs, w.data());
            for (int64_t t = 0; t < tiles; t += 2) {
                const at::BFloat16* a[2] = {tile_x(t), t + 1 < tiles ? tile_x(t + 1) : nullptr};
                const int64_t real[2] = {tile_rows(t), t + 1 < tiles ? tile_rows(t + 1) : 0};
                if (t + 1 < tiles) {
                    rows_times_block<2>(a, real, w.data(), K, C + t * TILE_ROWS * N + n0, N);
                } else {
                    rows_times_block<1>(a, real, w.data(), K, C + t * TILE_ROWS * N + n0, N);
                }
            }
        });
        release_tiles();
    }
}

}  // namespace

#include "../block_quant_op.h"

// Whether this process may use the tiles: worker.cpu_kernels.amx() asks before anything runs on them.
TORCH_LIBRARY_FRAGMENT(llmfleet, ops) {
    ops.def("amx_permitted() -> bool", [] { return amx_permitted(); });
}
