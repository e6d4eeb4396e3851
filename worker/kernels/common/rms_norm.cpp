// RMSNorm of bf16 rows, as transformers' LlamaRMSNorm computes it (float32 inside: x * rsqrt(mean(x^2) + eps),
// rounded to bf16, times the bf16 weight) in one op instead of its eight: on an AVX2 CPU those took ~60 us a call
// at one row, 61 calls a decode step. Plain C++ that the compiler vectorizes for either instruction set; each row's
// sum of squares in the same 16 lanes whatever the number of rows, so a row's result does not depend on the batch.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <tuple>

namespace {

constexpr int64_t LANES = 16;

void normalize(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* out, int64_t H, float eps) {
    float lanes[LANES] = {};
    int64_t i = 0;
    for (; i + LANES <= H; i += LANES)
        for (int64_t l = 0; l < LANES; ++l) {
            const float v = static_cast<float>(x[i + l]);
            lanes[l] += v * v;
        }
    for (int64_t l = 0; i + l < H; ++l) {
        const float v = static_cast<float>(x[i + l]);
        lanes[l] += v * v;
    }
    float sum = 0.0f;
    for (int64_t l = 0; l < LANES; ++l) sum += lanes[l];
    const float inv = 1.0f / std::sqrt(sum / static_cast<float>(H) + eps);
    for (int64_t j = 0; j < H; ++j) {
        const at::BFloat16 y = static_cast<float>(x[j]) * inv;
        out[j] = static_cast<float>(w[j]) * static_cast<float>(y);
    }
}

void check(const torch::Tensor& x, const torch::Tensor& weight) {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x: contiguous bfloat16");
    TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.dim() == 1 && weight.is_contiguous() &&
                    x.dim() >= 1 && x.size(-1) == weight.size(0), "weight: bfloat16 [x.size(-1)]");
}

// out = the norm of each row of x, or, with delta, of x + delta (rounded to bf16, as torch adds), written to sum.
void norm_rows(const torch::Tensor& x, const torch::Tensor* delta, torch::Tensor* sum, const torch::Tensor& weight,
               double eps, torch::Tensor& out) {
    const int64_t H = weight.size(0), rows = H ? x.numel() / H : 0;
    const auto* X = x.data_ptr<at::BFloat16>();
    const auto* D = delta ? delta->data_ptr<at::BFloat16>() : nullptr;
    auto* S = sum ? sum->data_ptr<at::BFloat16>() : nullptr;
    const auto* W = weight.data_ptr<at::BFloat16>();
    auto* O = out.data_ptr<at::BFloat16>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const at::BFloat16* row = X + r * H;
            if (D != nullptr) {
                for (int64_t j = 0; j < H; ++j) S[r * H + j] = static_cast<float>(row[j]) + static_cast<float>(D[r * H + j]);
                row = S + r * H;
            }
            normalize(row, W, O + r * H, H, static_cast<float>(eps));
        }
    });
}

}  // namespace

// x [..., H] bf16, weight [H] bf16 -> like x.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
    check(x, weight);
    auto out = at::empty_like(x);
    norm_rows(x, nullptr, nullptr, weight, eps, out);
    return out;
}

// The residual stream's update and the norm after it in one op: (x + delta, rms_norm(x + delta)). Separately, the
// add was another op and pass over the rows, twice a layer.
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(const torch::Tensor& x, const torch::Tensor& delta,
                                                      const torch::Tensor& weight, double eps) {
    check(x, weight);
    TORCH_CHECK(delta.scalar_type() == at::kBFloat16 && delta.is_contiguous() && delta.sizes() == x.sizes(),
                "delta: like x");
    auto sum = at::empty_like(x), out = at::empty_like(x);
    norm_rows(x, &delta, &sum, weight, eps, out);
    return {sum, out};
}

TORCH_LIBRARY_FRAGMENT(llmfleet, ops) {
    ops.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
    ops.impl("rms_norm", torch::kCPU, &rms_norm);
    ops.def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
    ops.impl("add_rms_norm", torch::kCPU, &add_rms_norm);
}
