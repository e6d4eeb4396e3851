// The cached_attention op of every instruction set's kernel: checks its arguments and runs the `attend<GROUP, HD,
// ROWS>` of the source that includes this header last (with its TILE_ROWS<GROUP, HD>), one (tile of rows, KV head)
// task at a time.
#pragma once
#include "attention_args.h"
#include "tasks.h"

namespace {

template <int GROUP, int HD>
void run(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
         const torch::Tensor& slots, const torch::Tensor& lengths, double scale, torch::Tensor& out) {
    const int64_t B = q.size(0), n_kv = q.size(1), capacity = k_cache.size(2);
    const int64_t* slot = slots.data_ptr<int64_t>();
    const int64_t* length = lengths.data_ptr<int64_t>();
    const int64_t longest = B ? *std::max_element(length, length + B) : 0;
    const auto* Q = q.data_ptr<at::BFloat16>();
    const auto* K = k_cache.data_ptr<at::BFloat16>();
    const auto* V = v_cache.data_ptr<at::BFloat16>();
    auto* O = out.data_ptr<at::BFloat16>();
    const int64_t q_row = q.stride(0), out_row = out.stride(0);
    // Tasks: (tile, KV head). A tile is up to TILE_ROWS<GROUP, HD> rows of one prompt chunk (the same slot, each row
    // one key more than the one before), which read the same keys and values once for all of them.
    constexpr int64_t ROWS = TILE_ROWS<GROUP, HD>;
    std::vector<int64_t> tiles;  // each tile's first row
    for (int64_t b = 0; b < B;) {
        tiles.push_back(b);
        int64_t rows = 1;
        while (rows < ROWS && b + rows < B && slot[b + rows] == slot[b] && length[b + rows] == length[b] + rows) ++rows;
        b += rows;
    }
    tiles.push_back(B);
    const int64_t T = static_cast<int64_t>(tiles.size()) - 1;
    for_each_task(T * n_kv, [&](int64_t task) {
        thread_local std::vector<float> scores;  // rows of scores padded to 16 (avx2/ stores 8 lanes at a time)
        scores.resize(std::max<size_t>(scores.size(), ROWS * GROUP * ((longest + 15) / 16 * 16)));
        const int64_t t = task / n_kv, h = task % n_kv, b = tiles[t], rows = tiles[t + 1] - b;
        const int64_t cache_row = (slot[b] * n_kv + h) * capacity * HD;
        const int64_t head = h * GROUP * HD;
        const QueryRows r{Q + b * q_row + head, O + b * out_row + head, q_row, out_row, length[b]};
        if (rows == ROWS)
            attend<GROUP, HD, ROWS>(r, K + cache_row, V + cache_row, static_cast<float>(scale), scores.data());
        else
            for (int64_t i = 0; i < rows; ++i)
                attend<GROUP, HD, 1>(r.at(i), K + cache_row, V + cache_row, static_cast<float>(scale), scores.data());
    });
}

}  // namespace

// q, out [rows, kv_heads, group, head_dim] bf16; k_cache, v_cache [slots, kv_heads, capacity, head_dim] bf16; slots
// and lengths (keys to attend, the row's own included) int64 [rows].
void cached_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                      const torch::Tensor& slots, const torch::Tensor& lengths, double scale, torch::Tensor& out) {
    check_attention_args(q, k_cache, v_cache, out);
    TORCH_CHECK(slots.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong && slots.size(0) == q.size(0) &&
                    lengths.size(0) == q.size(0), "slots, lengths: int64 [B]");
    const int64_t* length = lengths.data_ptr<int64_t>();
    const int64_t* slot = slots.data_ptr<int64_t>();
    for (int64_t b = 0; b < q.size(0); ++b) {
        TORCH_CHECK(length[b] >= 1 && length[b] <= k_cache.size(2), "lengths: 1..capacity");
        TORCH_CHECK(slot[b] >= 0 && slot[b] < k_cache.size(0), "slots: 0..slots-1");
    }
    const int64_t group = q.size(2), hd = q.size(3);
#define CASE(G, H) \
    if (group == G && hd == H) { run<G, H>(q, k_cache, v_cache, slots, lengths, scale, out); return; }
    CASE(1, 64) CASE(2, 64) CASE(3, 64) CASE(4, 64) CASE(5, 64) CASE(6, 64) CASE(7, 64) CASE(8, 64)
    CASE(1, 128) CASE(2, 128) CASE(3, 128) CASE(4, 128) CASE(5, 128) CASE(6, 128) CASE(7, 128) CASE(8, 128)
#undef CASE
    TORCH_CHECK(false, "cached_attention: query heads per KV head 1-8 and head size 64 or 128 only");
}

TORCH_LIBRARY_FRAGMENT(llmfleet, ops) {
    ops.def("cached_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor lengths, float scale, "
            "Tensor(a!) out) -> ()");
    ops.impl("cached_attention", torch::kCPU, &cached_attention);
}
