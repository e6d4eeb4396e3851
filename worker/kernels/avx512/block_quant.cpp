// bf16 activations times GGUF block-quantized weights, with AVX512-BF16: Q4_1 (weight = scale * code + min, 4-bit
// codes) and Q8_0 (weight = scale * code, signed 8-bit codes), a scale (and min) per group of inputs per output.
//
// After gptqmodel's AVX512-BF16 GPTQ kernel (gptqmodel_ext/int4_qzero_group_scaled_cpu, Apache-2.0, after the
// Hugging Face kernels-community `quantization-gptq` CPU kernel by jiqing-feng, Intel): each group's codes are dotted
// with the inputs exactly in bf16/fp32, then scaled in fp32. Where GPTQ subtracts an integer zero point, the group's
// float minimum is added here as min * (sum of the group's inputs).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <optional>
#include <vector>

#include "../prefetch.h"
#include "../tasks.h"
#include "simd.h"

namespace {

constexpr int64_t BLOCK_N = 32;  // outputs per task: one packing block
// Rows per register tile: 16 chains of dot products in flight, enough to cover the latency of AVX512-BF16's dot
// product (one layer's MLP in-process, Zen 5, 4 -> 8 rows: 32 rows 0.33 -> 0.28 ms, 512 rows 4.05 -> 3.33 ms).
constexpr int64_t TILE_M = 8;

inline __m512 int8_to_float(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }

// The bf16 codes of one input pair of a block: outputs 0-15 in lo, 16-31 in hi (exact: |code| <= 128).
template <int BITS>
__attribute__((always_inline)) inline void unpack(const uint8_t* p, __m512i& lo, __m512i& hi) {
    if constexpr (BITS == 4) {
        // bf16 of 0..15, indexed by the code.
        const __m512i lut = _mm512_set_epi16(
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100,
            0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
        const __m256i nibble = _mm256_set1_epi8(0xF);
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        lo = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(packed & nibble), lut);
        hi = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(_mm256_srli_epi16(packed, 4) & nibble), lut);
    } else {
        const __m512i v = _mm512_loadu_si512(p);
        lo = (__m512i)_mm512_cvtne2ps_pbh(int8_to_float(_mm512_extracti32x4_epi32(v, 1)),
                                         int8_to_float(_mm512_extracti32x4_epi32(v, 0)));
        hi = (__m512i)_mm512_cvtne2ps_pbh(int8_to_float(_mm512_extracti32x4_epi32(v, 3)),
                                         int8_to_float(_mm512_extracti32x4_epi32(v, 2)));
    }
}

// Each group's sum of one row of x, which the group's minimum multiplies (summed the same way whatever the batch).
void group_sums(const at::BFloat16* row, int64_t K, int64_t gs, float* out) {
    for (int64_t start = 0; start < K; start += gs) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = start; k < start + gs; k += 32) {
            const __m512i v = _mm512_loadu_si512(row + k);  // 32 bf16
            const __m512i lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(v));
            const __m512i hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1));
            acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(lo, 16)));
            acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16)));
        }
        out[start / gs] = _mm512_reduce_add_ps(acc);
    }
}

struct Tile {
    const at::BFloat16* x;  // first row of the tile, rows K apart
    const uint8_t* codes;   // the block's packed codes
    at::BFloat16* out;      // first row and output of the tile, rows N apart
    const at::Half* scales; // the block's group 0, groups BLOCK_N apart
    const at::Half* mins;   // likewise, or nullptr
    const float* sums;      // the tile's first row's group sums, rows `groups` apart
    int64_t K, N, gs, groups;
};

// Up to TILE_M rows x one block of 32 outputs, all of K, accumulated in registers. The codes come unpacked per use from
// t.codes, or, with `unpacked`, from a buffer that holds them unpacked already (the same values: bitwise the same
// result, whichever way a row is computed).
template <int BITS, int ROWS>
void tile(const Tile& t, const at::BFloat16* unpacked) {
    constexpr int64_t PAIR_BYTES = 8 * BITS;  // 32 outputs x 2 inputs
    const float* a = reinterpret_cast<const float*>(t.x);  // two bf16 per float
    __m512 acc[ROWS * 2];
    __m512 dot[ROWS * 2];
    __m512i vb[2];
    Unroll<ROWS * 2>{}([&](auto i) { acc[i] = _mm512_setzero_ps(); });
    for (int64_t group = 0; group < t.groups; ++group) {
        Unroll<ROWS * 2>{}([&](auto i) { dot[i] = _mm512_setzero_ps(); });
        for (int64_t kk = group * t.gs / 2; kk < (group + 1) * t.gs / 2; ++kk) {
            if (unpacked != nullptr) {
                vb[0] = _mm512_loadu_si512(unpacked + kk * 2 * BLOCK_N);
                vb[1] = _mm512_loadu_si512(unpacked + kk * 2 * BLOCK_N + BLOCK_N);
            } else {
                unpack<BITS>(t.codes + kk * PAIR_BYTES, vb[0], vb[1]);
                prefetch<64>(t.codes + kk * PAIR_BYTES + CODES_BYTES_AHEAD);
            }
            Unroll<ROWS * 2>{}([&](auto i) {
                constexpr int row = i / 2, half = i % 2;
                const __m512bh va = (__m512bh)_mm512_set1_ps(a[row * (t.K / 2) + kk]);
                dot[i] = _mm512_dpbf16_ps(dot[i], va, (__m512bh)vb[half]);
            });
        }
        Unroll<ROWS * 2>{}([&](auto i) {
            constexpr int row = i / 2, half = i % 2;
            acc[i] = _mm512_fmadd_ps(dot[i], load_half(t.scales + group * BLOCK_N + half * 16), acc[i]);
            if (t.mins != nullptr) {
                const __m512 sum = _mm512_set1_ps(t.sums[row * t.groups + group]);
                acc[i] = _mm512_fmadd_ps(sum, load_half(t.mins + group * BLOCK_N + half * 16), acc[i]);
            }
        });
    }
    Unroll<ROWS>{}([&](auto row) {
        _mm512_storeu_si512(t.out + row * t.N, (__m512i)_mm512_cvtne2ps_pbh(acc[2 * row + 1], acc[2 * row]));
    });
}

template <int BITS>
void rows(Tile t, int64_t count, const at::BFloat16* unpacked) {
    for (int64_t r = 0; r < count; r += TILE_M) {
        Tile sub = t;
        sub.x += r * t.K;
        sub.out += r * t.N;
        sub.sums += r * t.groups;
        switch (std::min(TILE_M, count - r)) {
            case 1: tile<BITS, 1>(sub, unpacked); break;
            case 2: tile<BITS, 2>(sub, unpacked); break;
            case 3: tile<BITS, 3>(sub, unpacked); break;
            case 4: tile<BITS, 4>(sub, unpacked); break;
            case 5: tile<BITS, 5>(sub, unpacked); break;
            case 6: tile<BITS, 6>(sub, unpacked); break;
            case 7: tile<BITS, 7>(sub, unpacked); break;
            default: tile<BITS, 8>(sub, unpacked); break;
        }
    }
}

template <int BITS>
void run(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
         const std::optional<torch::Tensor>& mins, int64_t gs, torch::Tensor& out) {
    const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), groups = K / gs;
    std::vector<float> sums(M * groups);  // filled only where there are mins
    const auto* X = x.data_ptr<at::BFloat16>();
    if (mins.has_value()) {
        at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
            for (int64_t m = begin; m < end; ++m) group_sums(X + m * K, K, gs, sums.data() + m * groups);
        });
    }
    const auto* codes = packed.data_ptr<uint8_t>();
    auto* C = out.data_ptr<at::BFloat16>();
    const auto* S = scales.data_ptr<at::Half>();
    const at::Half* Z = mins.has_value() ? mins->data_ptr<at::Half>() : nullptr;
    const int64_t NB = N / BLOCK_N;
    const int nth = at::get_num_threads();
    if (M > 8) {
        // A task is a block of outputs for all rows: its codes are unpacked once, then read by every row tile (in
        // one layer's MLP in-process, replacing oneDNN brgemm calls group by group: 32 rows 0.68 -> 0.60 ms, 512 rows
        // 10.95 -> 7.86 ms, where bf16 dense takes 7.07). Up to 8 rows, unpacking as they read is faster.
        Shares shares(NB, nth);
#pragma omp parallel num_threads(nth)
        {
            thread_local std::vector<at::BFloat16> unpacked;  // kept between calls: no allocation a call
            unpacked.resize(std::max<size_t>(unpacked.size(), K * BLOCK_N));
            shares.run([&](int64_t nb) {
                const int64_t n0 = nb * BLOCK_N;
                const Tile t{X, codes + n0 * K * BITS / 8, C + n0, S + n0 * groups,
                             Z == nullptr ? nullptr : Z + n0 * groups, sums.data(), K, N, gs, groups};
                for (int64_t kk = 0; kk < K / 2; ++kk) {
                    __m512i lo, hi;
                    unpack<BITS>(t.codes + kk * 8 * BITS, lo, hi);
                    prefetch<64>(t.codes + kk * 8 * BITS + CODES_BYTES_AHEAD);
                    _mm512_storeu_si512(unpacked.data() + kk * 2 * BLOCK_N, lo);
                    _mm512_storeu_si512(unpacked.data() + kk * 2 * BLOCK_N + BLOCK_N, hi);
                }
                rows<BITS>(t, M, unpacked.data());
            });
        }
        return;
    }
    // Few rows: a task is a block of outputs, its codes unpacked as they are read.
    Shares shares(NB, nth);
#pragma omp parallel num_threads(nth)
    {
        shares.run([&](int64_t nb) {
            const int64_t n0 = nb * BLOCK_N;
            const Tile t{X, codes + n0 * K * BITS / 8, C + n0, S + n0 * groups,
                         Z == nullptr ? nullptr : Z + n0 * groups, sums.data(), K, N, gs, groups};
            rows<BITS>(t, M, nullptr);
        });
    }
}

}  // namespace

#include "../block_quant_op.h"
