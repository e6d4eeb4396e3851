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

#include "../prefetch.h"
#include "../tasks.h"
#include "amx.h"
#include "simd.h"

#define BLOCK_QUANT_OP block_quant_matmul_amx

namespace {

constexpr int64_t BLOCK_N = 32;  // outputs per task: one packing block, two tiles of 16
constexpr int64_t TILE_K = 32;   // inputs per tile step: 16 pairs

// The block's weights as bf16, [half][input pair][output in half][input in pair]: half h holds outputs 16h to 16h + 15.
template <int BITS>
void weights(const uint8_t* codes, const at::Half* scales, const at::Half* mins, int64_t K, int64_t gs,
             at::BFloat16* out) {
    const __m512i first8 = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i dup[2] = {first8, _mm512_add_epi32(first8, _mm512_set1_epi32(8))};
    auto half_out = [&](int h) { return out + h * K * 16; };
    for (int64_t group = 0; group < K / gs; ++group) {
        // Each output's scale and minimum, twice (once per input of a pair): [half][outputs 0-7 / 8-15].
        __m512 scale[2][2], min[2][2];
        for (int h = 0; h < 2; ++h) {
            const __m512 s = load_half(scales + group * BLOCK_N + 16 * h);
            const __m512 m = mins == nullptr ? _mm512_setzero_ps() : load_half(mins + group * BLOCK_N + 16 * h);
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
            weights<BITS>(codes + n0 * K * BITS / 8, S + block_scales, Z == nullptr ? nullptr : Z + block_scales, K, gs,
                          w.data());
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
