// block_quant_matmul_int16: the same op as block_quant.cpp (same arguments and packing), computed in 16-bit integers
// with AVX512-VNNI's vpdpwssd (32 products and their sums an instruction), the algorithm of ../avx2/block_quant.cpp
// on 512-bit registers. It needs neither AVX512-BF16 nor VBMI: the block kernel of Ice Lake, and a third variant that
// worker.cpu_kernels times against the other two where those build.
//
// Each row of x is quantized to 16 bits per 32 inputs (a scale each: max |x| / 32767), the codes are widened to 16
// bits, and their integer dot products, exact, are scaled into float32 per block of 32 inputs; a Q4_1 group's minimum
// multiplies the row's float sum of its inputs. A task is one block of 32 outputs, in spans of ~128 inputs: the span's
// codes are widened once, then tiles of up to 7 rows x 32 outputs run through the span with their float32 sums in
// registers (per block of inputs, the integer sums take one conversion and one FMA each). A row's result is the same
// operations in the same order whatever the number of rows: it does not depend on the batch, bit for bit.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "../avx512/simd.h"
#include "../prefetch.h"
#include "../tasks.h"

namespace {

constexpr int64_t BLOCK_N = 32;  // outputs per task: one packing block, two vectors
constexpr int64_t XBLOCK = 32;   // inputs per scale of a quantized row
constexpr int64_t PAIR_BYTES = 2 * 64;  // one input pair of a block, the codes widened: 2 vectors of 16 outputs x 2
// Rows per register tile: 7 x 2 integer and 7 x 2 float accumulators, the pair's codes and a row's inputs (31
// registers); 6 rows were 0-10% slower, 12 rows with the float sums in memory 20-40%.
constexpr int64_t TILE_M = 7;
// Inputs a tile runs through with its sums in registers: the span's widened codes (8 KiB) stay in L1. (All of K at
// once, 36-96 KiB, ran 1.25x faster than 12-row tiles in one run on Ice Lake and 0.55x in another an hour later.)
constexpr int64_t SPAN_INPUTS = 128;
constexpr int64_t CHUNK_BYTES = 256 * 1024;

// x as 16-bit integers: round(x / scale) per block of 32 inputs, the blocks' scales, and each group's float sum of
// the inputs (which the group's minimum multiplies). Stored block by block, the rows of a block side by side, so that
// a tile's rows lie at fixed offsets (with rows a row length apart, GCC ran out of registers for their addresses).
struct QuantizedRows {
    std::vector<int16_t> codes;       // [K / 32][M][32]
    std::vector<float> scales, sums;  // [K / 32][M], [K / group size][M]
};

void quantize_rows(const at::BFloat16* X, int64_t M, int64_t K, int64_t gs, QuantizedRows& qx) {
    const int64_t blocks = K / XBLOCK, groups = K / gs;
    qx.codes.resize(M * K);
    qx.scales.resize(M * blocks);
    qx.sums.resize(M * groups);
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
            const at::BFloat16* row = X + m * K;
            for (int64_t b = 0; b < blocks; ++b) {
                const __m512 lo = bf16_to_float(row + b * XBLOCK), hi = bf16_to_float(row + b * XBLOCK + 16);
                const float a = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
                qx.scales[b * M + m] = a / 32767.0f;
                const __m512 inv = _mm512_set1_ps(a > 0.0f ? 32767.0f / a : 0.0f);
                int16_t* dst = qx.codes.data() + (b * M + m) * XBLOCK;
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inv))));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inv))));
            }
            for (int64_t g = 0; g < groups; ++g) {
                __m512 sum = _mm512_setzero_ps();
                for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) sum = _mm512_add_ps(sum, bf16_to_float(row + k));
                qx.sums[g * M + m] = _mm512_reduce_add_ps(sum);
            }
        }
    });
}

// The block's codes of one input pair (k, k+1), at p in the packing, widened to 16 bits: outputs 0-15 then 16-31,
// each output's two codes side by side, as vpdpwssd pairs them.
template <int BITS>
__attribute__((always_inline)) inline void unpack_pair(const uint8_t* p, __m512i v[2]) {
    const __m256i first = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (BITS == 4) {  // outputs 16-31 in the high nibbles of 0-15's bytes
        const __m256i nibble = _mm256_set1_epi8(0xF);
        v[0] = _mm512_cvtepu8_epi16(_mm256_and_si256(first, nibble));
        v[1] = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(first, 4), nibble));
    } else {  // outputs 16-31 in the next 32 bytes
        v[0] = _mm512_cvtepi8_epi16(first);
        v[1] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
    }
}

// acc += the pairwise products of a and b. As an intrinsic, GCC copied every accumulator to another register and to
// the stack at each step of the tile's loop (a third of the speed).
__attribute__((always_inline)) inline void dpwssd(__m512i& acc, __m512i a, __m512i b) {
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
}

// A tile's rows: the first row's 16-bit inputs, block scales and group sums; the next rows follow each, and the next
// block of inputs (or group) lies `rows` (M) rows on.
struct Rows {
    const int16_t* codes;
    const float *scales, *sums;
    int64_t rows;
    Rows at(int64_t r) const { return {codes + r * XBLOCK, scales + r, sums + r, rows}; }
};

// A block of outputs' group scales and minimums in float32, [group][32 outputs]; no minimums for Q8_0.
struct Groups {
    const float *scale, *min;
};

// ROWS rows x the block's 32 outputs over one span of inputs (whole groups: `groups` of gs), into the float32 sums
// `acc` (rows a block apart; zeroed first on the first span). The codes come widened from a buffer (`codes`, the
// span's), or with DIRECT straight from the packing: the same integers, the same float operations, the same bits.
// Per block of 32 inputs the integer dot products are exact (under 2^31: 32 x 128 x 32767).
template <int BITS, int ROWS, bool DIRECT>
__attribute__((noinline)) void tile(const Rows& x, const uint8_t* codes, const Groups& g, int64_t groups, int64_t gs,
                                    bool first, float* acc_out) {
    __m512 acc[ROWS * 2];
    Unroll<ROWS * 2>{}([&](auto i) {
        acc[i] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc_out + (i / 2) * BLOCK_N + (i % 2) * 16);
    });
    const int64_t per_group = gs / XBLOCK;
    for (int64_t group = 0; group < groups; ++group) {
        for (int64_t b = group * per_group; b < (group + 1) * per_group; ++b) {
            __m512i dot[ROWS * 2];
            Unroll<ROWS * 2>{}([&](auto i) { dot[i] = _mm512_setzero_si512(); });
            const int16_t* xb_codes = x.codes + b * x.rows * XBLOCK;
            // A fixed count (with the bounds b * 16 and (b + 1) * 16, GCC stored every accumulator at every step)
            for (int64_t kk = 0; kk < XBLOCK / 2; ++kk) {
                const int64_t pair_at = b * XBLOCK / 2 + kk;
                __m512i c[2];
                if constexpr (DIRECT) {
                    unpack_pair<BITS>(codes + pair_at * 8 * BITS, c);
                    prefetch<64>(codes + pair_at * 8 * BITS + CODES_BYTES_AHEAD);
                } else {
                    for (int h = 0; h < 2; ++h) c[h] = _mm512_loadu_si512(codes + pair_at * PAIR_BYTES + h * 64);
                }
                Unroll<ROWS>{}([&](auto r) {
                    int32_t pair;
                    std::memcpy(&pair, xb_codes + r * XBLOCK + 2 * kk, 4);
                    const __m512i xb = _mm512_set1_epi32(pair);
                    dpwssd(dot[2 * r], c[0], xb);
                    dpwssd(dot[2 * r + 1], c[1], xb);
                });
            }
            const float* ws = g.scale + group * BLOCK_N;
            const float* xs = x.scales + b * x.rows;
            Unroll<ROWS * 2>{}([&](auto i) {
                constexpr int r = i / 2, h = i % 2;
                const __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(ws + h * 16), _mm512_set1_ps(xs[r]));
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i]), scale, acc[i]);
            });
        }
        if (g.min) {
            const float* mins = g.min + group * BLOCK_N;
            const float* sums = x.sums + group * x.rows;
            Unroll<ROWS * 2>{}([&](auto i) {
                constexpr int r = i / 2, h = i % 2;
                acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(sums[r]), _mm512_loadu_ps(mins + h * 16), acc[i]);
            });
        }
    }
    Unroll<ROWS * 2>{}([&](auto i) { _mm512_storeu_ps(acc_out + (i / 2) * BLOCK_N + (i % 2) * 16, acc[i]); });
}

template <int BITS>
void tiles(const Rows& x, int64_t rows, const uint8_t* widened, const Groups& g, int64_t groups, int64_t gs,
           bool first, float* acc) {
    for (int64_t r = 0; r < rows; r += TILE_M) {
        const Rows xr = x.at(r);
        float* ar = acc + r * BLOCK_N;
        switch (std::min(TILE_M, rows - r)) {
            case 1: tile<BITS, 1, false>(xr, widened, g, groups, gs, first, ar); break;
            case 2: tile<BITS, 2, false>(xr, widened, g, groups, gs, first, ar); break;
            case 3: tile<BITS, 3, false>(xr, widened, g, groups, gs, first, ar); break;
            case 4: tile<BITS, 4, false>(xr, widened, g, groups, gs, first, ar); break;
            case 5: tile<BITS, 5, false>(xr, widened, g, groups, gs, first, ar); break;
            case 6: tile<BITS, 6, false>(xr, widened, g, groups, gs, first, ar); break;
            default: tile<BITS, TILE_M, false>(xr, widened, g, groups, gs, first, ar); break;
        }
    }
}

template <int BITS>
void run(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
         const std::optional<torch::Tensor>& mins, int64_t gs, torch::Tensor& out) {
    const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), groups = K / gs, NB = N / BLOCK_N;
    // Inputs per span: whole groups, ~SPAN_INPUTS.
    const int64_t span_groups = std::max<int64_t>(1, SPAN_INPUTS / gs);
    static thread_local QuantizedRows calling_thread_rows;  // kept between calls: no allocation a call
    quantize_rows(x.data_ptr<at::BFloat16>(), M, K, gs, calling_thread_rows);
    const QuantizedRows& qx = calling_thread_rows;  // the threads below read the calling thread's
    const auto* codes = packed.data_ptr<uint8_t>();
    auto* C = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    const auto* S = scales.data_ptr<at::Half>();
    const at::Half* Z = mins.has_value() ? mins->data_ptr<at::Half>() : nullptr;
    const int nth = at::get_num_threads();
    // Rows go in chunks whose quantized inputs stay in L2 while every block of the thread's outputs reads them.
    const int64_t chunk_rows = div_up(div_up(M, div_up(M * K * 2, CHUNK_BYTES)), TILE_M) * TILE_M;
    Shares shares(NB, nth, div_up(M, chunk_rows));
#pragma omp parallel num_threads(nth)
    {
        thread_local std::vector<uint8_t> widened;  // kept between calls
        thread_local std::vector<float> group_scales, group_mins, acc;
        widened.resize(std::max<size_t>(widened.size(), span_groups * gs / 2 * PAIR_BYTES));
        group_scales.resize(std::max<size_t>(group_scales.size(), groups * BLOCK_N));
        group_mins.resize(std::max<size_t>(group_mins.size(), groups * BLOCK_N));
        acc.resize(std::max<size_t>(acc.size(), chunk_rows * BLOCK_N));
        for (int64_t m0 = 0; m0 < M; m0 += chunk_rows) {
            const int64_t rows = std::min(chunk_rows, M - m0);
            shares.run([&](int64_t nb) {
                const int64_t n0 = nb * BLOCK_N;
                for (int64_t g = 0; g < groups; ++g) {
                    for (int h = 0; h < 2; ++h) {
                        const int64_t at = n0 * groups + g * BLOCK_N + h * 16;
                        _mm512_storeu_ps(group_scales.data() + g * BLOCK_N + h * 16, load_half(S + at));
                        if (Z) _mm512_storeu_ps(group_mins.data() + g * BLOCK_N + h * 16, load_half(Z + at));
                    }
                }
                for (int64_t g0 = 0; g0 < groups; g0 += span_groups) {
                    const int64_t n_groups = std::min(span_groups, groups - g0), k0 = g0 * gs;
                    const Groups span{group_scales.data() + g0 * BLOCK_N, Z ? group_mins.data() + g0 * BLOCK_N : nullptr};
                    const Rows xr{qx.codes.data() + (k0 / XBLOCK * M + m0) * XBLOCK, qx.scales.data() + k0 / XBLOCK * M + m0,
                                  qx.sums.data() + g0 * M + m0, M};
                    const uint8_t* block = codes + (n0 * K + k0 * BLOCK_N) * BITS / 8;
                    if (M <= 2) {  // few rows: widening as they read beats a round trip through the buffer
                        if (M == 1) tile<BITS, 1, true>(xr, block, span, n_groups, gs, g0 == 0, acc.data());
                        else tile<BITS, 2, true>(xr, block, span, n_groups, gs, g0 == 0, acc.data());
                        continue;
                    }
                    for (int64_t kk = 0; kk < n_groups * gs / 2; ++kk) {
                        __m512i v[2];
                        unpack_pair<BITS>(block + kk * 8 * BITS, v);
                        prefetch<64>(block + kk * 8 * BITS + CODES_BYTES_AHEAD);
                        for (int h = 0; h < 2; ++h) _mm512_storeu_si512(widened.data() + kk * PAIR_BYTES + h * 64, v[h]);
                    }
                    tiles<BITS>(xr, rows, widened.data(), span, n_groups, gs, g0 == 0, acc.data());
                }
                for (int64_t r = 0; r < rows; ++r)
                    for (int h = 0; h < 2; ++h)
                        _mm256_storeu_si256(reinterpret_cast<__m256i*>(C + (m0 + r) * N + n0 + h * 16),
                                            float_to_bf16(_mm512_loadu_ps(acc.data() + r * BLOCK_N + h * 16)));
            }, m0 / chunk_rows);
        }
    }
}

}  // namespace

#define BLOCK_QUANT_OP block_quant_matmul_int16
#include "../block_quant_op.h"
