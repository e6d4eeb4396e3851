// A block_quant_matmul op: checks its arguments and calls the `run<BITS>` defined by the source that includes this
// header last, under the name BLOCK_QUANT_OP (block_quant_matmul unless that source names another).
#ifndef BLOCK_QUANT_OP
#define BLOCK_QUANT_OP block_quant_matmul
#endif
#define BLOCK_QUANT_STR2(name) #name
#define BLOCK_QUANT_STR(name) BLOCK_QUANT_STR2(name)

// Layout of `packed`, per block of 32 outputs, for each pair of inputs (k, k+1): the codes of outputs 0-15 then
// 16-31, each output's two codes side by side (the order AVX512-BF16's dot product takes). 4-bit: outputs 16-31 in
// the high nibbles of the bytes of outputs 0-15, 32 bytes a pair; 8-bit: 64 bytes a pair.
//
// x [M, K] bf16 times the block-quantized weight [N, K] -> [M, N] bf16. packed: uint8 [N, K * bits / 8] in the
// layout above; scales and mins: float16 [N / 32, K / group_size, 32], a block of outputs' groups one after another
// (GGUF's [K / group_size, N] put a block's groups N apart: a row decoded read one line a group, each far from the
// last; one row, 30 layers' products of a step on a Zen 3, 11.0 -> 8.8 ms); no mins for Q8_0.
namespace {

torch::Tensor checked_matmul(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                                 const std::optional<torch::Tensor>& mins, int64_t group_size, int64_t bits) {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(), "x: contiguous 2D bfloat16");
    TORCH_CHECK(bits == 4 || bits == 8, "bits: 4 or 8");
    TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous(), "packed: uint8");
    const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
    TORCH_CHECK(packed.size(1) * 8 == K * bits && N % BLOCK_N == 0, "packed: [N (a multiple of 32), K * bits / 8]");
    TORCH_CHECK(group_size % 32 == 0 && K % group_size == 0, "group_size: a multiple of 32 that divides K");
    TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 3 &&
                    scales.size(0) == N / BLOCK_N && scales.size(1) == K / group_size && scales.size(2) == BLOCK_N,
                "scales: float16 [N / 32, K / group_size, 32]");
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmfleet, ops) {
    ops.def(BLOCK_QUANT_STR(BLOCK_QUANT_OP)
            "(Tensor x, Tensor packed, Tensor scales, Tensor? mins, int group_size, int bits) -> Tensor");
    ops.impl(BLOCK_QUANT_STR(BLOCK_QUANT_OP), torch::kCPU, &checked_matmul);
}
