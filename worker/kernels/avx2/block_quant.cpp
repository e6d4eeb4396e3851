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

// The block's codes of one input pair (k, k+1), at p in the packing, widened to 16 bits within each 128-bit lane:
// 4 vectors of 8 outputs x the pair's two codes, outputs {0-3, 8-11}, {4-7, 12-15}, {16-19, 24-27}, {20-23, 28-31}
// ("lane order"). Widening across lanes (vpmovzxbw from the upper half) made the one-row kernel, which widens as it
// reads, ~1.7x slower on a Zen 3. The codes CODES_BYTES_AHEAD on are fetched into the cache.
template <int BITS>
__attribute__((always_inline)) inline void unpack_pair(const uint8_t* p, __m256i v[VECS]) {
    prefetch<64>(p + CODES_BYTES_AHEAD);
    const __m256i first = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (BITS == 4) {  // outputs 16-31 in the high nibbles of 0-15's bytes
        const __m256i nibble = _mm256_set1_epi8(0xF), zero = _mm256_setzero_si256();
        const __m256i lo = _mm256_and_si256(first, nibble);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(first, 4), nibble);
        v[0] = _mm256_unpacklo_epi8(lo, zero);
        v[1] = _mm256_unpackhi_epi8(lo, zero);
        v[2] = _mm256_unpacklo_epi8(hi, zero);
        v[3] = _mm256_unpackhi_epi8(hi, zero);
    } else {  // outputs 16-31 in the next 32 bytes; each byte's sign spread over its upper neighbour
        const __m256i second = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
        const __m256i zero = _mm256_setzero_si256();
        const __m256i sign1 = _mm256_cmpgt_epi8(zero, first), sign2 = _mm256_cmpgt_epi8(zero, second);
        v[0] = _mm256_unpacklo_epi8(first, sign1);
        v[1] = _mm256_unpackhi_epi8(first, sign1);
        v[2] = _mm256_unpacklo_epi8(second, sign2);
        v[3] = _mm256_unpackhi_epi8(second, sign2);
    }
}

// 4 vectors of a block's 32 outputs in order <-> in lane order: vectors 0 and 1 (2 and 3) swap their upper and
// lower 128-bit halves. The scales and minimums are put in lane order, the results back in order.
__attribute__((always_inline)) inline void swap_halves(__m256 v[VECS]) {
    for (int j = 0; j < VECS; j += 2) {
        const __m256 a = v[j], b = v[j + 1];
        v[j] = _mm256_permute2f128_ps(a, b, 0x20);
        v[j + 1] = _mm256_permute2f128_ps(a, b, 0x31);
    }
}

// One group of a block: its scales and minimums, in lane order.
struct Group {
    __m256 scale[VECS], min[VECS];
    bool has_min;

    // Group g of the block of outputs from n0.
    Group(const at::Half* S, const at::Half* Z, int64_t groups, int64_t n0, int64_t g) : has_min(Z != nullptr) {
        const int64_t at = n0 * groups + g * BLOCK_N;
        for (int j = 0; j < VECS; ++j) {
            scale[j] = load_half(S + at + j * 8);
            min[j] = has_min ? load_half(Z + at + j * 8) : _mm256_setzero_ps();
        }
        swap_halves(scale);
        swap_halves(min);
    }
};

// Where a tile's rows are: the first row's 16-bit inputs at a block of inputs (the next row's XBLOCK on), that
// block's scale and its group's sum (the next row's a row of blocks or groups on).
struct Rows {
    const int16_t* codes;
    const float *scales, *sums;
    int64_t blocks, groups;
    Rows at(int64_t r) const { return {codes + r * XBLOCK, scales + r * blocks, sums + r * groups, blocks, groups}; }
};

// The exact integer dot products of ROWS rows with a block's 32 outputs over one block of 32 inputs (under 2^31: 32 x
// 128 x 32767), the codes read BITS wide: 4 or 8 from the packing, widened here, or 16 from the buffer of a block's
// codes widened (16 pairs).
template <int BITS, int ROWS>
__attribute__((always_inline)) inline void dot_block(const Rows& x, const uint8_t* codes, __m256i (&dot)[ROWS * VECS]) {
    Unroll<ROWS * VECS>{}([&](auto i) { dot[i] = _mm256_setzero_si256(); });
    for (int64_t kk = 0; kk < XBLOCK / 2; ++kk) {
        __m256i c[VECS];
        if constexpr (BITS == 16) {
            for (int j = 0; j < VECS; ++j) c[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + kk * PAIR_BYTES + j * 32));
            // Loaded once for all rows (the compiler would read them again for each: load-bound).
            Unroll<VECS>{}([&](auto j) { __asm__("" : "+x"(c[j])); });
        } else {
            unpack_pair<BITS>(codes + kk * 8 * BITS, c);
        }
        Unroll<ROWS>{}([&](auto r) {
            int32_t pair;
            std::memcpy(&pair, x.codes + r * XBLOCK + 2 * kk, 4);
            const __m256i xb = _mm256_set1_epi32(pair);
            Unroll<VECS>{}([&](auto j) { dot[r * VECS + j] = _mm256_add_epi32(dot[r * VECS + j], _mm256_madd_epi16(c[j], xb)); });
        });
    }
}

// A row's dot products scaled into its float32 accumulators, and after a group's last block of inputs its minimum
// times the row's group sum: the same operations in the same order however many rows a call has.
__attribute__((always_inline)) inline void scale_into(const __m256i dot[VECS], const Group& g, float x_scale, float x_sum,
                                                      bool last_of_group, __m256 acc[VECS]) {
    const __m256 xs = _mm256_set1_ps(x_scale), sum = _mm256_set1_ps(x_sum);
    Unroll<VECS>{}([&](auto j) {
        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[j]), _mm256_mul_ps(g.scale[j], xs), acc[j]);
        if (g.has_min && last_of_group) acc[j] = _mm256_fmadd_ps(sum, g.min[j], acc[j]);
    });
}

// A row's 32 results, in lane order, as bf16 in order.
__attribute__((always_inline)) inline void store_row(__m256 acc[VECS], uint16_t* out) {
    swap_halves(acc);
    for (int j = 0; j < VECS; ++j) _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j * 8), float_to_bf16(acc[j]));
}

// ROWS rows x the block's 32 outputs over one block of inputs, the codes widened in `widened` (16 pairs), into the
// float32 accumulators `acc` (rows a block apart). Not inlined: inside run() the compiler spilled an accumulator in
// the loop (20% slower). Flattened, here and in few_rows(): GCC left some of the helpers' unrolled lambdas as calls,
// and the dot products in memory (2-3x slower).
template <int ROWS>
__attribute__((noinline, flatten)) void tile(const Rows& x, const uint8_t* widened, const Group& g, bool last_of_group, float* acc) {
    __m256i dot[ROWS * VECS];
    dot_block<16, ROWS>(x, widened, dot);
    Unroll<ROWS>{}([&](auto r) {
        __m256 a[VECS];
        for (int j = 0; j < VECS; ++j) a[j] = _mm256_loadu_ps(acc + r * BLOCK_N + j * 8);
        scale_into(dot + r * VECS, g, x.scales[r * x.blocks], x.sums[r * x.groups], last_of_group, a);
        for (int j = 0; j < VECS; ++j) _mm256_storeu_ps(acc + r * BLOCK_N + j * 8, a[j]);
    });
}

// One or two rows (one or two sequences decoding) x a block of 32 outputs, all of K: the codes widened as they are
// read (a round trip through a buffer costs more than it saves for so few rows), the accumulators in registers
// throughout. The same operations as tile()'s: the same bits. `x` is the rows at input 0, their inputs' blocks
// XBLOCK x ROWS apart.
template <int BITS, int ROWS>
__attribute__((noinline, flatten)) void few_rows(Rows x, const uint8_t* block, const at::Half* S, const at::Half* Z,
                                        int64_t n0, int64_t gs, uint16_t* out, int64_t N) {
    __m256 acc[ROWS * VECS];
    Unroll<ROWS * VECS>{}([&](auto i) { acc[i] = _mm256_setzero_ps(); });
    for (int64_t g = 0; g < x.groups; ++g) {
        const Group group(S, Z, x.groups, n0, g);
        for (int64_t k = 0; k < gs; k += XBLOCK, block += XBLOCK * BLOCK_N * BITS / 8) {
            __m256i dot[ROWS * VECS];
            dot_block<BITS, ROWS>(x, block, dot);
            Unroll<ROWS>{}([&](auto r) {
                scale_into(dot + r * VECS, group, x.scales[r * x.blocks], x.sums[r * x.groups], k + XBLOCK == gs, acc + r * VECS);
            });
            x.codes += ROWS * XBLOCK;
            x.scales += 1;
        }
        x.sums += 1;
    }
    Unroll<ROWS>{}([&](auto r) { store_row(acc + r * VECS, out + r * N); });
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
    if (M <= 2) {
        Shares shares(NB, nth);
#pragma omp parallel num_threads(nth)
        shares.run([&](int64_t nb) {
            const uint8_t* block = codes + nb * BLOCK_N * K * BITS / 8;
            if (M == 1) few_rows<BITS, 1>(rows_at(0, 0), block, S, Z, nb * BLOCK_N, gs, C + nb * BLOCK_N, N);
            else few_rows<BITS, 2>(rows_at(0, 0), block, S, Z, nb * BLOCK_N, gs, C + nb * BLOCK_N, N);
        });
        return;
    }
    // Rows go in chunks whose quantized inputs stay in L2 while every block of the thread's outputs reads them.
    const int64_t chunk_rows = div_up(div_up(M, div_up(M * K * 2, CHUNK_BYTES)), TILE_M) * TILE_M;
    Shares shares(NB, nth, div_up(M, chunk_rows));
#pragma omp parallel num_threads(nth)
    {
        thread_local std::vector<uint8_t> widened;  // kept between calls
        thread_local std::vector<float> acc;
        widened.resize(std::max<size_t>(widened.size(), XBLOCK / 2 * PAIR_BYTES));
        acc.resize(std::max<size_t>(acc.size(), chunk_rows * BLOCK_N));
        for (int64_t m0 = 0; m0 < M; m0 += chunk_rows) {
            const int64_t rows = std::min(chunk_rows, M - m0);
            shares.run([&](int64_t nb) {
                const int64_t n0 = nb * BLOCK_N;
                std::fill_n(acc.data(), rows * BLOCK_N, 0.0f);
                const uint8_t* block = codes + n0 * K * BITS / 8;
                for (int64_t g = 0; g < groups; ++g) {
                    const Group group(S, Z, groups, n0, g);
                    for (int64_t k = 0; k < gs; k += XBLOCK, block += XBLOCK * BLOCK_N * BITS / 8) {
                        for (int64_t kk = 0; kk < XBLOCK / 2; ++kk) {
                            __m256i c[VECS];
                            unpack_pair<BITS>(block + kk * 8 * BITS, c);
                            for (int j = 0; j < VECS; ++j)
                                _mm256_storeu_si256(reinterpret_cast<__m256i*>(widened.data() + kk * PAIR_BYTES + j * 32), c[j]);
                        }
                        const Rows xr = rows_at(m0, g * gs + k);
                        const bool last = k + XBLOCK == gs;
                        for (int64_t r = 0; r < rows; r += TILE_M) {
                            float* ar = acc.data() + r * BLOCK_N;
                            if (rows - r == 1) tile<1>(xr.at(r), widened.data(), group, last, ar);
                            else tile<TILE_M>(xr.at(r), widened.data(), group, last, ar);
                        }
                    }
                }
                for (int64_t r = 0; r < rows; ++r) {
                    __m256 result[VECS];
                    for (int j = 0; j < VECS; ++j) result[j] = _mm256_loadu_ps(acc.data() + r * BLOCK_N + j * 8);
                    store_row(result, C + (m0 + r) * N + n0);
                }
            }, m0 / chunk_rows);
        }
    }
}

}  // namespace

#include "../block_quant_op.h"
