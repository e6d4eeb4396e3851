// bf16 activations times GGUF block-quantized weights, with AVX512-BF16: Q4_1 (weight = scale * code + min, 4-bit
// codes) and Q8_0 (weight = scale * code, signed 8-bit codes), a scale (and min) per group of inputs per output.
//
// After gptqmodel's AVX512-BF16 GPTQ kernel (gptqmodel_ext/int4_qzero_group_scaled_cpu, Apache-2.0, after the
// Hugging Face kernels-community `quantization-gptq` CPU kernel by jiqing-feng, Intel): each group's codes are dotted
// with the inputs exactly in bf16/fp32, then scaled in fp32. Where GPTQ subtracts an integer zero point, the group's
// float minimum is added here as min * (sum of the group's inputs).
//
// Layout of `packed`, per block of 32 outputs, for each pair of inputs (k, k+1): the codes of outputs 0-15 then
// 16-31, each output's two codes side by side (the order _mm512_dpbf16_ps takes). 4-bit: outputs 16-31 in the high
// nibbles of the bytes of outputs 0-15, 32 bytes a pair; 8-bit: 64 bytes a pair.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <optional>

namespace {

constexpr int64_t BLOCK_M = 32;  // rows of x per task
constexpr int64_t BLOCK_N = 32;  // outputs per task: one packing block
constexpr int64_t BLOCK_K = 128;
constexpr int64_t TINY_M = 4;    // rows per register tile of the few-rows path

template <int n>
struct Unroll {
    template <typename F>
    __attribute__((always_inline)) inline void operator()(const F& f) const {
        Unroll<n - 1>{}(f);
        f(std::integral_constant<int, n - 1>{});
    }
};
template <>
struct Unroll<1> {
    template <typename F>
    __attribute__((always_inline)) inline void operator()(const F& f) const {
        f(std::integral_constant<int, 0>{});
    }
};

inline int64_t div_up(int64_t x, int64_t y) { return (x + y - 1) / y; }

inline __m512 load_half(const at::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

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
    const at::Half* scales; // the block's first output in group 0, groups N apart
    const at::Half* mins;   // likewise, or nullptr
    const float* sums;      // the tile's first row's group sums, rows `groups` apart
    int64_t K, N, gs, groups;
};

// Up to 4 rows, all of K, accumulated in registers: the path for few rows.
template <int BITS, int ROWS>
void tiny_tile(const Tile& t) {
    constexpr int64_t PAIR_BYTES = 8 * BITS;  // 32 outputs x 2 inputs
    const float* a = reinterpret_cast<const float*>(t.x);  // two bf16 per float
    __m512 acc[ROWS * 2];
    __m512 dot[ROWS * 2];
    __m512i vb[2];
    Unroll<ROWS * 2>{}([&](auto i) { acc[i] = _mm512_setzero_ps(); });
    for (int64_t group = 0; group < t.groups; ++group) {
        Unroll<ROWS * 2>{}([&](auto i) { dot[i] = _mm512_setzero_ps(); });
        for (int64_t kk = group * t.gs / 2; kk < (group + 1) * t.gs / 2; ++kk) {
            unpack<BITS>(t.codes + kk * PAIR_BYTES, vb[0], vb[1]);
            _mm_prefetch(reinterpret_cast<const char*>(t.codes + (kk + 2048 / PAIR_BYTES) * PAIR_BYTES), _MM_HINT_T0);
            Unroll<ROWS * 2>{}([&](auto i) {
                constexpr int row = i / 2, half = i % 2;
                const __m512bh va = (__m512bh)_mm512_set1_ps(a[row * (t.K / 2) + kk]);
                dot[i] = _mm512_dpbf16_ps(dot[i], va, (__m512bh)vb[half]);
            });
        }
        Unroll<ROWS * 2>{}([&](auto i) {
            constexpr int row = i / 2, half = i % 2;
            acc[i] = _mm512_fmadd_ps(dot[i], load_half(t.scales + group * t.N + half * 16), acc[i]);
            if (t.mins != nullptr) {
                const __m512 sum = _mm512_set1_ps(t.sums[row * t.groups + group]);
                acc[i] = _mm512_fmadd_ps(sum, load_half(t.mins + group * t.N + half * 16), acc[i]);
            }
        });
    }
    Unroll<ROWS>{}([&](auto row) {
        _mm512_storeu_si512(t.out + row * t.N, (__m512i)_mm512_cvtne2ps_pbh(acc[2 * row + 1], acc[2 * row]));
    });
}

// Up to 32 rows: each group's codes unpacked to bf16 once, then a brgemm: the path for many rows.
template <int BITS>
void brgemm_tile(const Tile& t, int64_t rows, at::BFloat16* Btmp, float* Ctmp) {
    constexpr int64_t PAIR_BYTES = 8 * BITS;
    alignas(64) float acc[BLOCK_M * BLOCK_N];
    std::fill_n(acc, rows * BLOCK_N, 0.0f);
    for (int64_t group = 0; group < t.groups; ++group) {
        for (int64_t offset = 0; offset < t.gs; offset += BLOCK_K) {
            const int64_t k = group * t.gs + offset;
            const int64_t kb = std::min<int64_t>(BLOCK_K, t.gs - offset);
            for (int64_t kk = 0; kk < kb / 2; ++kk) {
                __m512i lo, hi;
                unpack<BITS>(t.codes + (k / 2 + kk) * PAIR_BYTES, lo, hi);
                _mm512_storeu_si512(Btmp + kk * 2 * BLOCK_N, lo);
                _mm512_storeu_si512(Btmp + kk * 2 * BLOCK_N + BLOCK_N, hi);
            }
            at::native::cpublas::brgemm(rows, BLOCK_N, kb, t.K, BLOCK_N, BLOCK_N, offset != 0, t.x + k, Btmp, Ctmp);
        }
        for (int64_t m = 0; m < rows; ++m) {
            for (int64_t n = 0; n < BLOCK_N; n += 16) {
                float* a = acc + m * BLOCK_N + n;
                __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(Ctmp + m * BLOCK_N + n),
                                           load_half(t.scales + group * t.N + n), _mm512_loadu_ps(a));
                if (t.mins != nullptr) {
                    v = _mm512_fmadd_ps(_mm512_set1_ps(t.sums[m * t.groups + group]),
                                        load_half(t.mins + group * t.N + n), v);
                }
                _mm512_storeu_ps(a, v);
            }
        }
    }
    for (int64_t m = 0; m < rows; ++m) {
        const __m512 lo = _mm512_loadu_ps(acc + m * BLOCK_N), hi = _mm512_loadu_ps(acc + m * BLOCK_N + 16);
        _mm512_storeu_si512(t.out + m * t.N, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

template <int BITS>
void tiny_rows(Tile t, int64_t rows) {
    for (int64_t r = 0; r < rows; r += TINY_M) {
        Tile sub = t;
        sub.x += r * t.K;
        sub.out += r * t.N;
        sub.sums += r * t.groups;
        switch (std::min(TINY_M, rows - r)) {
            case 1: tiny_tile<BITS, 1>(sub); break;
            case 2: tiny_tile<BITS, 2>(sub); break;
            case 3: tiny_tile<BITS, 3>(sub); break;
            default: tiny_tile<BITS, 4>(sub); break;
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
    // Above 24 rows the brgemm path is faster (gptqmodel's threshold). A row's bits are the same on both paths:
    // each sums a group's products in the same order.
    const bool many = M > 24;
    const int64_t MB = div_up(M, BLOCK_M), NB = N / BLOCK_N, tasks = MB * NB;
    const int nth = at::get_num_threads();
#pragma omp parallel num_threads(nth)
    {
        alignas(64) at::BFloat16 Btmp[BLOCK_N * BLOCK_K];
        alignas(64) float Ctmp[BLOCK_M * BLOCK_N];
        const int64_t per = div_up(tasks, nth), first = omp_get_thread_num() * per;
        for (int64_t task = first; task < std::min(tasks, first + per); ++task) {
            const int64_t m0 = (task % MB) * BLOCK_M, n0 = (task / MB) * BLOCK_N, rows = std::min(BLOCK_M, M - m0);
            const Tile t{X + m0 * K, codes + n0 * K * BITS / 8, C + m0 * N + n0, S + n0, Z == nullptr ? nullptr : Z + n0,
                         sums.data() + m0 * groups, K, N, gs, groups};
            if (many) {
                brgemm_tile<BITS>(t, rows, Btmp, Ctmp);
            } else {
                tiny_rows<BITS>(t, rows);
            }
        }
        if (many) at::native::cpublas::brgemm_release();
    }
}

}  // namespace

// x [M, K] bf16 times the block-quantized weight [N, K] -> [M, N] bf16. packed: uint8 [N, K * bits / 8] in the
// layout above; scales and mins: float16 [K / group_size, N] (GGUF stores them so); no mins for Q8_0.
torch::Tensor block_quant_matmul(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                                 const std::optional<torch::Tensor>& mins, int64_t group_size, int64_t bits) {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(), "x: contiguous 2D bfloat16");
    TORCH_CHECK(bits == 4 || bits == 8, "bits: 4 or 8");
    TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous(), "packed: uint8");
    const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
    TORCH_CHECK(packed.size(1) * 8 == K * bits && N % BLOCK_N == 0, "packed: [N (a multiple of 32), K * bits / 8]");
    TORCH_CHECK(group_size % 32 == 0 && K % group_size == 0, "group_size: a multiple of 32 that divides K");
    TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.size(0) == K / group_size &&
                    scales.size(1) == N, "scales: float16 [K / group_size, N]");
    if (mins.has_value()) {
        TORCH_CHECK(mins->scalar_type() == at::kHalf && mins->is_contiguous() && mins->sizes() == scales.sizes(),
                    "mins: like scales");
    }
    auto out = at::empty({M, N}, x.options());
    if (M == 0) return out;
    if (bits == 4) {
        run<4>(x, packed, scales, mins, group_size, out);
    } else {
        run<8>(x, packed, scales, mins, group_size, out);
    }
    return out;
}

TORCH_LIBRARY_FRAGMENT(llmfleet, ops) {
    ops.def("block_quant_matmul(Tensor x, Tensor packed, Tensor scales, Tensor? mins, int group_size, int bits) "
            "-> Tensor");
    ops.impl("block_quant_matmul", torch::kCPU, &block_quant_matmul);
}
