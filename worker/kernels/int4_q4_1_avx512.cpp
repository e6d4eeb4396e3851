// W4A16 matmul for GGUF Q4_1 blocks (weight = scale * code + min per group of inputs) with AVX512-BF16.
//
// gptqmodel's AVX512-BF16 GPTQ kernel (gptqmodel_ext/int4_qzero_group_scaled_cpu, Apache-2.0, after the
// Hugging Face kernels-community `quantization-gptq` CPU kernel by jiqing-feng, Intel), changed in one place:
// GPTQ's integer zero point per group becomes a float minimum, added as min * (sum of the group's inputs)
// after the group's exact integer dot product. Weights use gptqmodel's `pack_gptq_int4` layout.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cmath>

namespace {

constexpr int64_t BLOCK_M = 32;  // rows of x per task
constexpr int64_t BLOCK_N = 32;  // output features per task (one packing block)
constexpr int64_t BLOCK_K = 128;
constexpr int64_t TINY_M = 4;    // rows per register tile of the small-batch path

template <int n>
struct Unroll {
    template <typename F, typename... Args>
    __attribute__((always_inline)) inline void operator()(const F& f, Args... args) const {
        Unroll<n - 1>{}(f, args...);
        f(std::integral_constant<int, n - 1>{}, args...);
    }
};
template <>
struct Unroll<1> {
    template <typename F, typename... Args>
    __attribute__((always_inline)) inline void operator()(const F& f, Args... args) const {
        f(std::integral_constant<int, 0>{}, args...);
    }
};

inline int64_t div_up(int64_t x, int64_t y) { return (x + y - 1) / y; }

inline __m512 load_half(const at::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// bf16 of the codes 0..15 (index = code).
inline __m512i code_lut() {
    return _mm512_set_epi16(
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100,
        0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
}

// Each group's sum of one row of x, which the group's minimum multiplies. (Summed the same way whatever the batch.)
void group_sums(const at::BFloat16* row, int64_t K, int64_t gs, float* out) {
    for (int64_t start = 0; start < K; start += gs) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = start; k < start + gs; k += 32) {
            const __m512i v = _mm512_loadu_si512(row + k);  // 32 bf16
            acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16)));
            acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16)));
        }
        out[start / gs] = _mm512_reduce_add_ps(acc);
    }
}

// Up to 4 rows x 32 or 64 outputs, all of K, accumulating in registers (the path for a few rows).
template <int ROWS, int N>
void tiny_tile(const at::BFloat16* A, const uint8_t* B, at::BFloat16* C, const at::Half* scale, const at::Half* mins,
               const float* xsum, int64_t K, int64_t gs, int64_t lda, int64_t ldb, int64_t ldc, int64_t ld_groups,
               int64_t ld_xsum) {
    constexpr int COLS = N / 16;
    const __m256i nibble = _mm256_set1_epi8(0xF);
    const __m512i lut = code_lut();
    const float* a = reinterpret_cast<const float*>(A);  // two bf16 per float
    __m512 acc[ROWS * COLS];
    __m512 dot[ROWS * COLS];
    __m512bh vb[COLS];
    Unroll<ROWS * COLS>{}([&](auto i) { acc[i] = _mm512_setzero_ps(); });
    for (int64_t k = 0; k < K / 2; k += gs / 2) {
        const int64_t group = 2 * k / gs;
        Unroll<ROWS * COLS>{}([&](auto i) { dot[i] = _mm512_setzero_ps(); });
        for (int64_t kk = k; kk < k + gs / 2; ++kk) {
            Unroll<COLS / 2>{}([&](auto c) {
                const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + kk * ldb + c * 32));
                const __m256i lo = packed & nibble;
                const __m256i hi = _mm256_srli_epi16(packed, 4) & nibble;
                vb[2 * c] = (__m512bh)_mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(lo), lut);
                vb[2 * c + 1] = (__m512bh)_mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(hi), lut);
            });
            _mm_prefetch(reinterpret_cast<const char*>(B + (kk + 64) * ldb), _MM_HINT_T0);
            Unroll<ROWS * COLS>{}([&](auto i) {
                constexpr int row = i / COLS, col = i % COLS;
                const __m512bh va = (__m512bh)_mm512_set1_ps(a[row * (lda / 2) + kk]);
                dot[i] = _mm512_dpbf16_ps(dot[i], va, vb[col]);
            });
        }
        Unroll<ROWS * COLS>{}([&](auto i) {
            constexpr int row = i / COLS, col = i % COLS;
            const __m512 s = load_half(scale + group * ld_groups + col * 16);
            const __m512 m = load_half(mins + group * ld_groups + col * 16);
            acc[i] = _mm512_fmadd_ps(dot[i], s, acc[i]);
            acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(xsum[row * ld_xsum + group]), m, acc[i]);
        });
    }
    Unroll<ROWS * COLS>{}([&](auto i) {
        constexpr int row = i / COLS, col = i % COLS;
        if constexpr (col % 2 == 0) {
            _mm512_storeu_si512(C + row * ldc + col * 16, (__m512i)_mm512_cvtne2ps_pbh(acc[i + 1], acc[i]));
        }
    });
}

// Up to 32 rows x 32 outputs: each group's codes unpacked to bf16 once, then a brgemm (the path for many rows).
void brgemm_tile(const at::BFloat16* A, const uint8_t* B, at::BFloat16* C, const at::Half* scale, const at::Half* mins,
                 const float* xsum, int64_t M, int64_t K, int64_t gs, int64_t lda, int64_t ldc, int64_t ld_groups,
                 int64_t ld_xsum, at::BFloat16* Btmp, float* Ctmp) {
    const __m256i nibble = _mm256_set1_epi8(0xF);
    const __m512i lut = code_lut();
    alignas(64) float acc[BLOCK_M * BLOCK_N];
    std::fill_n(acc, M * BLOCK_N, 0.0f);
    for (int64_t start = 0; start < K; start += gs) {
        const int64_t group = start / gs;
        for (int64_t offset = 0; offset < gs; offset += BLOCK_K) {
            const int64_t k = start + offset;
            const int64_t kb = std::min<int64_t>(BLOCK_K, gs - offset);
            for (int64_t kk = 0; kk < kb / 2; ++kk) {
                const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + (k / 2 + kk) * BLOCK_N));
                const __m256i lo = packed & nibble;
                const __m256i hi = _mm256_srli_epi16(packed, 4) & nibble;
                _mm512_storeu_si512(Btmp + kk * 2 * BLOCK_N, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(lo), lut));
                _mm512_storeu_si512(Btmp + kk * 2 * BLOCK_N + BLOCK_N,
                                    _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(hi), lut));
            }
            at::native::cpublas::brgemm(M, BLOCK_N, kb, lda, BLOCK_N, BLOCK_N, offset != 0, A + k, Btmp, Ctmp);
        }
        for (int64_t m = 0; m < M; ++m) {
            const __m512 xs = _mm512_set1_ps(xsum[m * ld_xsum + group]);
            for (int64_t n = 0; n < BLOCK_N; n += 16) {
                __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(Ctmp + m * BLOCK_N + n),
                                           load_half(scale + group * ld_groups + n),
                                           _mm512_loadu_ps(acc + m * BLOCK_N + n));
                v = _mm512_fmadd_ps(xs, load_half(mins + group * ld_groups + n), v);
                _mm512_storeu_ps(acc + m * BLOCK_N + n, v);
            }
        }
    }
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t n = 0; n < BLOCK_N; n += 32) {
            const __m512 lo = _mm512_loadu_ps(acc + m * BLOCK_N + n);
            const __m512 hi = _mm512_loadu_ps(acc + m * BLOCK_N + n + 16);
            _mm512_storeu_si512(C + m * ldc + n, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    }
}

template <int ROWS>
void tiny_rows(const at::BFloat16* A, const uint8_t* B, at::BFloat16* C, const at::Half* scale, const at::Half* mins,
               const float* xsum, int64_t K, int64_t gs, int64_t lda, int64_t ldc, int64_t ld_groups,
               int64_t ld_xsum) {
    tiny_tile<ROWS, 32>(A, B, C, scale, mins, xsum, K, gs, lda, BLOCK_N, ldc, ld_groups, ld_xsum);
}

}  // namespace

// x [M, K] bf16 @ (scale * code + min)ᵀ -> [M, N] bf16. packed [N, K/2] uint8 (pack_gptq_int4 layout), scales and
// mins [K / group_size, N] float16
// (GGUF stores them so).
torch::Tensor q4_1_matmul(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                          const torch::Tensor& mins, int64_t group_size) {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(), "x: contiguous 2D bfloat16");
    TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed: contiguous uint8");
    TORCH_CHECK(scales.scalar_type() == at::kHalf && mins.scalar_type() == at::kHalf, "scales, mins: float16");
    TORCH_CHECK(scales.is_contiguous() && mins.is_contiguous() && scales.sizes() == mins.sizes(), "scales, mins");
    const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
    TORCH_CHECK(packed.size(1) * 2 == K && N % BLOCK_N == 0, "packed: [N (a multiple of 32), K / 2]");
    TORCH_CHECK(group_size % 32 == 0 && K % group_size == 0 && scales.size(0) == K / group_size &&
                    scales.size(1) == N, "group_size and scales");
    auto out = at::empty({M, N}, x.options());
    if (M == 0) return out;
    const int64_t groups = K / group_size;
    auto xsum = at::empty({M, groups}, x.options().dtype(at::kFloat));
    float* X = xsum.data_ptr<float>();
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) group_sums(x.data_ptr<at::BFloat16>() + m * K, K, group_size, X + m * groups);
    });

    const auto* A = x.data_ptr<at::BFloat16>();
    const auto* B = packed.data_ptr<uint8_t>();
    auto* C = out.data_ptr<at::BFloat16>();
    const at::Half* S = scales.data_ptr<at::Half>();
    const at::Half* Z = mins.data_ptr<at::Half>();
    // Which path a row takes depends on M, so a row's bits can depend on the batch it is in: above 24 rows the
    // brgemm path is faster (gptqmodel's measurement, the same threshold).
    const bool many = M > 24;
    const int64_t MB = div_up(M, BLOCK_M), NB = N / BLOCK_N;
    const int nth = at::get_num_threads();
#pragma omp parallel num_threads(nth)
    {
        alignas(64) at::BFloat16 Btmp[BLOCK_N * BLOCK_K];
        alignas(64) float Ctmp[BLOCK_M * BLOCK_N];
        const int ith = omp_get_thread_num();
        const int64_t tasks = MB * NB, per = div_up(tasks, nth);
        for (int64_t t = ith * per; t < std::min(tasks, (ith + 1) * per); ++t) {
            const int64_t mb = t % MB, nb = t / MB;
            const int64_t m0 = mb * BLOCK_M, rows = std::min(BLOCK_M, M - m0), n0 = nb * BLOCK_N;
            const at::BFloat16* a = A + m0 * K;
            const uint8_t* b = B + n0 * K / 2;
            const float* xs = X + m0 * groups;
            if (many) {
                brgemm_tile(a, b, C + m0 * N + n0, S + n0, Z + n0, xs, rows, K, group_size, K, N, N, groups, Btmp,
                            Ctmp);
                continue;
            }
            for (int64_t r = 0; r < rows; r += TINY_M) {
                const int64_t n_rows = std::min(TINY_M, rows - r);
                auto* c = C + (m0 + r) * N + n0;
                const auto* ar = a + r * K;
                const auto* xr = xs + r * groups;
                switch (n_rows) {
                    case 1: tiny_rows<1>(ar, b, c, S + n0, Z + n0, xr, K, group_size, K, N, N, groups); break;
                    case 2: tiny_rows<2>(ar, b, c, S + n0, Z + n0, xr, K, group_size, K, N, N, groups); break;
                    case 3: tiny_rows<3>(ar, b, c, S + n0, Z + n0, xr, K, group_size, K, N, N, groups); break;
                    default: tiny_rows<4>(ar, b, c, S + n0, Z + n0, xr, K, group_size, K, N, N, groups); break;
                }
            }
        }
        if (many) at::native::cpublas::brgemm_release();
    }
    return out;
}

TORCH_LIBRARY(llmfleet_q4_1, ops) {
    ops.def("matmul(Tensor x, Tensor packed, Tensor scales, Tensor mins, int group_size) -> Tensor");
    ops.impl("matmul", torch::kCPU, &q4_1_matmul);
}
