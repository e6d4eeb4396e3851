// bf16 activations times GGUF block-quantized weights with AVX2, FMA and F16C, for CPUs without AVX512-BF16: Q4_1
// (weight = scale * code + min, 4-bit codes) and Q8_0 (weight = scale * code, signed 8-bit codes), a scale (and
// min) per group of inputs per output. Same op, arguments and packing as ../avx512/block_quant.cpp.
//
// Integer dot products: each row of x is quantized to 16 bits per 32 inputs (a scale each: max |x| / 32767, far
// finer than x's own bf16 steps for all but its smallest inputs), and the codes, widened to 16 bits, multiply it with
// vpmaddwd: 16 products an instruction on the pipes where a float FMA makes 8. The integer sums of a block of inputs
// are exact, then scaled in float32; a Q4_1 group's minimum multiplies the row's float sum of its inputs. (8-bit
// inputs and vpmaddubsw, llama.cpp's way, were faster again, ~1.4x, but not as good: with SmolLM2's outlier inputs,
// teacher-forced top-1 agreement with bf16 fell from 96% to 90%.)
//
// A task is one block of 32 outputs. A row's result is the same operations in the same order whatever the number of
// rows: it does not depend on the batch, bit for bit.
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
#include "simd.h"

namespace {

constexpr int64_t BLOCK_N = 32;  // outputs per task: one packing block
constexpr int64_t VECS = BLOCK_N / 8;
constexpr int64_t XBLOCK = 32;  // inputs per scale of a quantized row
constexpr int64_t PAIR_BYTES = VECS * 32;  // one input pair of a block, the codes widened: 4 vectors of 8 outputs x 2
// Rows per register tile: 2 x 4 accumulators and the pair's 4 vectors of codes in registers (3 rows must read the
// codes from memory for every row: load-bound, 10-20% slower at 8-512 rows).
constexpr int64_t TILE_M = 2;
constexpr int64_t CHUNK_BYTES = 256 * 1024;

inline __m256 load_half(const at::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// x as 16-bit integers per row: round(x / scale) per block of 32 inputs, the blocks' scales, and each group's float
// sum of the inputs (which the group's minimum multiplies). The codes are stored block by block, [K / 32][M][32]: the
// rows a tile reads, and the next tile's, lie side by side (row by row, each row's block was a line K x 2 bytes from
// the last row's: one layer 3-9% slower at 8-512 rows on a Zen 3).
struct QuantizedRows {
    std::vector<int16_t> codes;
    std::vector<float> scales, sums;
};

void quantize_rows(const at::BFloat16* X, int64_t M, int64_t K, int64_t gs, QuantizedRows& qx) {
    const int64_t blocks = K / XBLOCK, groups = K / gs;
    qx.codes.resize(M * K);
    qx.scales.resize(M * blocks);
    qx.sums.resize(M * groups);
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (int64_t m = begin; m < end; ++m) {
            const at::BFloat16* row = X + m * K;
            for (int64_t b = 0; b < blocks; ++b) {
                __m256 v[4];
                __m256 amax = _mm256_setzero_ps();
                for (int i = 0; i < 4; ++i) {
                    v[i] = bf16_to_float(row + b * XBLOCK + 8 * i);
                    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
                }
                const float a = max8(amax);
                qx.scales[m * blocks + b] = a / 32767.0f;
                const __m256 inv = _mm256_set1_ps(a > 0.0f ? 32767.0f / a : 0.0f);
                for (int i = 0; i < 4; i += 2) {
                    const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
                    const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(v[i + 1], inv));
                    // The pack interleaves 128-bit lanes; the permute puts the 16 values back in order.
                    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qx.codes.data() + (b * M + m) * XBLOCK + 8 * i), packed);
                }
            }
            for (int64_t g = 0; g < groups; ++g) {
                __m256 sum = _mm256_setzero_ps();
                for (int64_t k = g * gs; k < (g + 1) * gs; k += 8) sum = _mm256_add_ps(sum, bf16_to_float(row + k));
                qx.sums[m * groups + g] = sum8(sum);
            }
        }
    });
}

// The block's codes of one input pair (k, k+1), at p in the packing, widened to 16 bits: 4 vectors of 8 outputs x
// the pair's two codes, outputs 0-7, 8-15, 16-23, 24-31.
template <int BITS>
__attribute__((always_inline)) inline void unpack_pair(const uint8_t* p, __m256i v[VECS]) {
    const __m256i first = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (BITS == 4) {  // outputs 16-31 in the high nibbles of 0-15's bytes
        const __m256i nibble = _mm256_set1_epi8(0xF);
        const __m256i lo = _mm256_and_si256(first, nibble);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(first, 4), nibble);
        v[0] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(lo));
        v[1] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(lo, 1));
        v[2] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(hi));
        v[3] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(hi, 1));
    } else {  // outputs 16-31 in the next 32 bytes
        const __m256i second = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
        v[0] = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(first));
        v[1] = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(first, 1));
        v[2] = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(second));
        v[3] = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(second, 1));
    }
}

// One group of a block: its scales and minimums.
struct Group {
    __m256 scale[VECS], min[VECS];
    bool has_min;
};

// Where a tile's rows are: the first row's 16-bit inputs at a block of inputs (the next row's XBLOCK on), that
// block's scale and its group's sum (the next row's a row of blocks or groups on).
struct Rows {
    const int16_t* codes;
    const float *scales, *sums;
    int64_t blocks, groups;
    Rows at(int64_t r) const { return {codes + r * XBLOCK, scales + r * blocks, sums + r * groups, blocks, groups}; }
};

// ROWS rows x the block's 32 outputs over one block of 32 inputs: the exact integer dot products (under 2^31:
// 32 x 128 x 32767), scaled into the float32 accumulators `acc` (rows a block apart), and, after a group's last block
// of inputs, its minimum times the row's group sum. The codes come widened from a buffer (`codes`, 16 pairs), or
// with DIRECT straight from the packing: the same integers, the same float operations, the same bits.
// Not inlined: inside run() the compiler spilled an accumulator in the loop (20% slower).
template <int BITS, int ROWS, bool DIRECT>
__attribute__((noinline)) void tile(const Rows& x, const uint8_t* codes, const Group& g, bool last_of_group, float* acc) {
    __m256i dot[ROWS * VECS];
    Unroll<ROWS * VECS>{}([&](auto i) { dot[i] = _mm256_setzero_si256(); });
    for (int64_t kk = 0; kk < XBLOCK / 2; ++kk) {
        __m256i c[VECS];
        if constexpr (DIRECT) {
            unpack_pair<BITS>(codes + kk * 8 * BITS, c);
            prefetch<64>(codes + kk * 8 * BITS + CODES_BYTES_AHEAD);
        } else {
            for (int j = 0; j < VECS; ++j) c[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + kk * PAIR_BYTES + j * 32));
            // Loaded once for all rows (the compiler would read them again for each: load-bound).
            Unroll<VECS>{}([&](auto j) { __asm__("" : "+x"(c[j])); });
        }
        Unroll<ROWS>{}([&](auto r) {
            int32_t pair;
            std::memcpy(&pair, x.codes + r * XBLOCK + 2 * kk, 4);
            const __m256i xb = _mm256_set1_epi32(pair);
            Unroll<VECS>{}([&](auto j) { dot[r * VECS + j] = _mm256_add_epi32(dot[r * VECS + j], _mm256_madd_epi16(c[j], xb)); });
        });
    }
    Unroll<ROWS>{}([&](auto r) {
        const __m256 xs = _mm256_set1_ps(x.scales[r * x.blocks]);
        const __m256 sum = _mm256_set1_ps(x.sums[r * x.groups]);
        Unroll<VECS>{}([&](auto j) {
            float* a_ptr = acc + r * BLOCK_N + j * 8;
            const __m256 d = _mm256_cvtepi32_ps(dot[r * VECS + j]);
            __m256 a = _mm256_fmadd_ps(d, _mm256_mul_ps(g.scale[j], xs), _mm256_loadu_ps(a_ptr));
            if (g.has_min && last_of_group) a = _mm256_fmadd_ps(sum, g.min[j], a);
            _mm256_storeu_ps(a_ptr, a);
        });
    });
}

template <int BITS>
void run(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
         const std::optional<torch::Tensor>& mins, int64_t gs, torch::Tensor& out) {
    const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), groups = K / gs, blocks = K / XBLOCK;
    const int64_t NB = N / BLOCK_N;
    static thread_local QuantizedRows calling_thread_rows;  // kept between calls: no allocation a call
    quantize_rows(x.data_ptr<at::BFloat16>(), M, K, gs, calling_thread_rows);
    const QuantizedRows& qx = calling_thread_rows;  // the threads below read the calling thread's
    auto rows_at = [&](int64_t m, int64_t k) {
        return Rows{qx.codes.data() + (k / XBLOCK * M + m) * XBLOCK, qx.scales.data() + m * blocks + k / XBLOCK,
                    qx.sums.data() + m * groups + k / gs, blocks, groups};
    };
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
        thread_local std::vector<float> acc;
        widened.resize(std::max<size_t>(widened.size(), gs / 2 * PAIR_BYTES));
        acc.resize(std::max<size_t>(acc.size(), chunk_rows * BLOCK_N));
        for (int64_t m0 = 0; m0 < M; m0 += chunk_rows) {
            const int64_t rows = std::min(chunk_rows, M - m0);
            shares.run([&](int64_t nb) {
                const int64_t n0 = nb * BLOCK_N;
                std::fill_n(acc.data(), rows * BLOCK_N, 0.0f);
                for (int64_t g = 0; g < groups; ++g) {
                    Group group;
                    group.has_min = Z != nullptr;
                    for (int j = 0; j < VECS; ++j) {
                        group.scale[j] = load_half(S + n0 * groups + g * BLOCK_N + j * 8);
                        group.min[j] = group.has_min ? load_half(Z + n0 * groups + g * BLOCK_N + j * 8) : _mm256_setzero_ps();
                    }
                    const uint8_t* block = codes + (n0 * K + g * gs * BLOCK_N) * BITS / 8;
                    for (int64_t k = 0; k < gs; k += XBLOCK) {
                        const bool last = k + XBLOCK == gs;
                        const Rows xr = rows_at(m0, g * gs + k);
                        const uint8_t* packed_k = block + k * BLOCK_N * BITS / 8;
                        if (M <= 2) {  // few rows: widening as they read beats a round trip through the buffer
                            if (M == 1) tile<BITS, 1, true>(xr, packed_k, group, last, acc.data());
                            else tile<BITS, 2, true>(xr, packed_k, group, last, acc.data());
                            continue;
                        }
                        for (int64_t kk = 0; kk < XBLOCK / 2; ++kk) {
                            __m256i c[VECS];
                            unpack_pair<BITS>(packed_k + kk * 8 * BITS, c);
                            prefetch<64>(packed_k + kk * 8 * BITS + CODES_BYTES_AHEAD);
                            for (int j = 0; j < VECS; ++j)
                                _mm256_storeu_si256(reinterpret_cast<__m256i*>(widened.data() + kk * PAIR_BYTES + j * 32), c[j]);
                        }
                        for (int64_t r = 0; r < rows; r += TILE_M) {
                            float* ar = acc.data() + r * BLOCK_N;
                            if (rows - r == 1) tile<BITS, 1, false>(xr.at(r), widened.data(), group, last, ar);
                            else tile<BITS, TILE_M, false>(xr.at(r), widened.data(), group, last, ar);
                        }
                    }
                }
                for (int64_t r = 0; r < rows; ++r)
                    for (int j = 0; j < VECS; ++j)
                        _mm_storeu_si128(reinterpret_cast<__m128i*>(C + (m0 + r) * N + n0 + j * 8),
                                         float_to_bf16(_mm256_loadu_ps(acc.data() + r * BLOCK_N + j * 8)));
            }, m0 / chunk_rows);
        }
    }
}

}  // namespace

#include "../block_quant_op.h"
