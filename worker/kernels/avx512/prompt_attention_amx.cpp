// prompt_attention_amx: attention of one prompt chunk's rows over its slot's cache on AMX tiles, where the CPU has
// AMX-BF16 (worker.slot_attention.KernelAttention; decoding rows keep cached_attention). The chunk's rows are at
// positions start, start + 1, ...: each attends to the keys up to its own. A task is 16 rows of one query head:
// scores = q · keys on tiles (the cache's blocks of 16 keys, stored with the dimension pairs outermost, are the tiles'
// second operand as they lie), softmax in float32 over each row's own keys, probabilities rounded to bf16, and their
// product with the values on tiles, from the values repacked once a call to pairs of keys outermost. Each row is the
// same float32 sums in the same order whichever tile and chunk it is in: keys past a row's own get probability 0.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../attention_args.h"
#include "../tasks.h"
#include "amx.h"
#include "simd.h"

namespace {

// Values [len, HD] of one (slot, head) -> [pair of keys][chunk of 16 dimensions][dimension][key in pair], blocks of
// 16 pairs per chunk: the tiles' second operand for the weighted sum. `pairs` is a multiple of 16.
template <int HD>
void repack_values(const at::BFloat16* v, int64_t pairs, at::BFloat16* out) {
    const __m512i first_half = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                                39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i second_half = _mm512_add_epi16(first_half, _mm512_set1_epi16(16));
    constexpr int64_t CHUNKS = HD / 16;
    for (int64_t p = 0; p < pairs; ++p) {
        const int64_t block = p / 16, row = p % 16;
        for (int64_t c = 0; c < HD / 32; ++c) {
            const __m512i a = _mm512_loadu_si512(v + 2 * p * HD + c * 32);
            const __m512i b = _mm512_loadu_si512(v + (2 * p + 1) * HD + c * 32);
            // Chunk 2c then 2c + 1, each 16 dimensions x the pair's two keys.
            at::BFloat16* base = out + (block * CHUNKS * 16 + row) * 32;
            _mm512_storeu_si512(base + (2 * c) * 16 * 32, _mm512_permutex2var_epi16(a, first_half, b));
            _mm512_storeu_si512(base + (2 * c + 1) * 16 * 32, _mm512_permutex2var_epi16(a, second_half, b));
        }
    }
}

// 16 rows (q: their query head's HD values, HD apart, zero past the real rows) x keys [0, keys) of `k` -> scores
// [16][stride] float32, unscaled.
template <int HD>
__attribute__((target("amx-tile,amx-bf16"))) void scores_on_tiles(const at::BFloat16* q, const at::BFloat16* k,
                                                                  int64_t keys, float* scores, int64_t stride) {
    static_assert(HD == 64 || HD == 128, "head size 64 or 128");
    asm volatile("" ::: "memory");
    // Tiles 2-5: the rows' dimensions 32 at a time; 0-1: two blocks of 16 keys' scores; 6-7: those blocks' keys.
    _tile_loadd(2, q, HD * 2);
    _tile_loadd(3, q + 32, HD * 2);
    if constexpr (HD == 128) {
        _tile_loadd(4, q + 64, HD * 2);
        _tile_loadd(5, q + 96, HD * 2);
    }
    for (int64_t j0 = 0; j0 < keys; j0 += 32) {
        const at::BFloat16* b0 = k + j0 * HD;  // a block of 16 keys: HD / 2 rows of 64 bytes
        const at::BFloat16* b1 = b0 + 16 * HD;
        const bool two = j0 + 16 < keys;
        _tile_zero(0);
        _tile_zero(1);
        _tile_loadd(6, b0, 64);
        _tile_dpbf16ps(0, 2, 6);
        if (two) {
            _tile_loadd(7, b1, 64);
            _tile_dpbf16ps(1, 2, 7);
        }
        _tile_loadd(6, b0 + 16 * 32, 64);
        _tile_dpbf16ps(0, 3, 6);
        if (two) {
            _tile_loadd(7, b1 + 16 * 32, 64);
            _tile_dpbf16ps(1, 3, 7);
        }
        if constexpr (HD == 128) {
            _tile_loadd(6, b0 + 32 * 32, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(6, b0 + 48 * 32, 64);
            _tile_dpbf16ps(0, 5, 6);
            if (two) {
                _tile_loadd(7, b1 + 32 * 32, 64);
                _tile_dpbf16ps(1, 4, 7);
                _tile_loadd(7, b1 + 48 * 32, 64);
                _tile_dpbf16ps(1, 5, 7);
            }
        }
        _tile_stored(0, scores + j0, stride * 4);
        if (two) _tile_stored(1, scores + j0 + 16, stride * 4);
    }
    asm volatile("" ::: "memory");
}

// Probabilities [16][stride] bf16 (keys two at a time, zero past each row's own) x the repacked values -> [16][HD]
// float32.
template <int HD>
__attribute__((target("amx-tile,amx-bf16"))) void weighted_sum_on_tiles(const at::BFloat16* probs, int64_t stride,
                                                                        const at::BFloat16* values, int64_t keys,
                                                                        float* out) {
    constexpr int64_t CHUNKS = HD / 16;
    asm volatile("" ::: "memory");
    for (int64_t c0 = 0; c0 < CHUNKS; c0 += 4) {  // four chunks of 16 dimensions a pass: tiles 0-3
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t j0 = 0; j0 < keys; j0 += 32) {
            const at::BFloat16* block = values + (j0 / 32) * CHUNKS * 16 * 32;
            _tile_loadd(4, probs + j0, stride * 2);
            _tile_loadd(5, block + (c0 + 0) * 16 * 32, 64);
            _tile_dpbf16ps(0, 4, 5);
            _tile_loadd(6, block + (c0 + 1) * 16 * 32, 64);
            _tile_dpbf16ps(1, 4, 6);
            _tile_loadd(7, block + (c0 + 2) * 16 * 32, 64);
            _tile_dpbf16ps(2, 4, 7);
            _tile_loadd(5, block + (c0 + 3) * 16 * 32, 64);
            _tile_dpbf16ps(3, 4, 5);
        }
        _tile_stored(0, out + (c0 + 0) * 16, HD * 4);
        _tile_stored(1, out + (c0 + 1) * 16, HD * 4);
        _tile_stored(2, out + (c0 + 2) * 16, HD * 4);
        _tile_stored(3, out + (c0 + 3) * 16, HD * 4);
    }
    asm volatile("" ::: "memory");
}

// Row by row: softmax of the scaled scores over the row's own `len` keys, bf16 probabilities over the scores' memory
// (zero up to `width`, a multiple of 32), and the sum of the unrounded ones. scale > 0, so the largest score is the
// largest scaled one, and e^(scale (x - max)) = 2^(c x - c max) with c = scale log2(e): one FMA a lane.
float softmax_row(float* row, int64_t len, int64_t width, float scale) {
    // Four running maxima, where one would wait out max's latency at every vector (the op 1.59 -> 1.47 ms for 512 rows
    // after 1,024 keys, one layer, AMX Xeon); the same maximum either way.
    __m512 top4[4];
    std::fill_n(top4, 4, _mm512_set1_ps(-INFINITY));
    int64_t j = 0;
    for (; j + 64 <= len; j += 64) {
        for (int a = 0; a < 4; ++a) top4[a] = _mm512_max_ps(top4[a], _mm512_loadu_ps(row + j + 16 * a));
    }
    __m512 tops = _mm512_max_ps(_mm512_max_ps(top4[0], top4[1]), _mm512_max_ps(top4[2], top4[3]));
    for (; j + 16 <= len; j += 16) tops = _mm512_max_ps(tops, _mm512_loadu_ps(row + j));
    const __mmask16 tail = first_lanes(len - j);
    if (j < len) tops = _mm512_mask_max_ps(tops, tail, tops, _mm512_maskz_loadu_ps(tail, row + j));
    const float c = scale * LOG2_E;
    const __m512 by = _mm512_set1_ps(c), shift = _mm512_set1_ps(c * _mm512_reduce_max_ps(tops));
    auto* probs = reinterpret_cast<uint16_t*>(row);  // element j at bytes 2j..2j+1, behind the floats still to read
    __m512 sum = _mm512_setzero_ps();
    for (j = 0; j + 16 <= len; j += 16) {
        const __m512 e = exp2_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(row + j), by, shift));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + j), (__m256i)_mm512_cvtneps_pbh(e));
        sum = _mm512_add_ps(sum, e);
    }
    if (j < len) {
        const __m512 t = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(tail, row + j), by, shift);
        const __m512 e = _mm512_maskz_mov_ps(tail, exp2_nonpositive(t));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + j), (__m256i)_mm512_cvtneps_pbh(e));
        sum = _mm512_add_ps(sum, e);
        j += 16;
    }
    std::fill(probs + j, probs + width, 0);
    return _mm512_reduce_add_ps(sum);
}

template <int HD>
void run(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache, int64_t slot,
         int64_t start, double scale, torch::Tensor& out) {
    const int64_t n = q.size(0), n_kv = q.size(1), group = q.size(2), capacity = k_cache.size(2);
    const int64_t last = start + n;                   // keys the chunk's last row attends to
    const int64_t width = div_up(last, 32) * 32;      // keys the tiles cover, in steps of 32
    TORCH_CHECK(width <= capacity, "prompt_attention_amx: the cache's capacity must be a multiple of 32");
    const auto* Q = q.data_ptr<at::BFloat16>();
    const auto* K = k_cache.data_ptr<at::BFloat16>();
    const auto* V = v_cache.data_ptr<at::BFloat16>();
    auto* O = out.data_ptr<at::BFloat16>();
    const int64_t q_row = q.stride(0), out_row = out.stride(0);
    auto cache_rows = [&](int64_t h) { return (slot * n_kv + h) * capacity * HD; };

    // Every element is written by the repack below: no zeroing (up to ~0.6 MB a layer for a 1.5k-token context).
    const torch::Tensor repacked = at::empty({n_kv * width * HD}, v_cache.options());
    auto* values = repacked.data_ptr<at::BFloat16>();
    at::parallel_for(0, n_kv * (width / 32), 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
            const int64_t h = task / (width / 32), block = task % (width / 32);
            repack_values<HD>(V + cache_rows(h) + block * 32 * HD, 16, values + (h * width + block * 32) * HD);
        }
    });

    const int64_t tiles = div_up(n, TILE_ROWS);
    at::parallel_for(0, n_kv * group * tiles, 1, [&](int64_t begin, int64_t end) {
        configure_tiles();
        std::vector<float> scores(TILE_ROWS * width);
        alignas(64) at::BFloat16 rows_q[TILE_ROWS * HD];
        alignas(64) float sums[TILE_ROWS * HD];
        for (int64_t task = begin; task < end; ++task) {
            const int64_t t = task % tiles, head = task / tiles, h = head / group;
            const int64_t r0 = t * TILE_ROWS, real = std::min(TILE_ROWS, n - r0);
            const int64_t keys = start + r0 + real;  // the tile's last row's keys
            const int64_t tile_width = div_up(keys, 32) * 32;
            std::fill_n(rows_q, TILE_ROWS * HD, at::BFloat16(0.0f));
            for (int64_t r = 0; r < real; ++r) std::memcpy(rows_q + r * HD, Q + (r0 + r) * q_row + head * HD, HD * 2);
            scores_on_tiles<HD>(rows_q, K + cache_rows(h), keys, scores.data(), tile_width);
            float total[TILE_ROWS];
            for (int64_t r = 0; r < TILE_ROWS; ++r) {
                float* row = scores.data() + r * tile_width;
                if (r < real) {
                    total[r] = softmax_row(row, start + r0 + r + 1, tile_width, static_cast<float>(scale));
                } else {
                    std::fill_n(reinterpret_cast<uint16_t*>(row), tile_width, 0);
                }
            }
            // Probabilities of row r at scores + r * tile_width, as bf16: rows tile_width * 4 bytes apart.
            weighted_sum_on_tiles<HD>(reinterpret_cast<const at::BFloat16*>(scores.data()), tile_width * 2,
                                      values + h * width * HD, tile_width, sums);
            for (int64_t r = 0; r < real; ++r) {
                at::BFloat16* o = O + (r0 + r) * out_row + head * HD;
                const __m512 inv = _mm512_set1_ps(1.0f / total[r]);
                for (int64_t c = 0; c < HD; c += 16) {
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + c),
                                        float_to_bf16(_mm512_mul_ps(_mm512_loadu_ps(sums + r * HD + c), inv)));
                }
            }
        }
        release_tiles();
    });
}

// q, out [rows, kv_heads, group, head_dim] bf16, one prompt chunk's rows (positions start, start + 1, ...) of slot
// `slot`; k_cache, v_cache [slots, kv_heads, capacity, head_dim] bf16, the keys stored transposed (KEY_BLOCK).
void prompt_attention_amx(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                          int64_t slot, int64_t start, double scale, torch::Tensor& out) {
    TORCH_CHECK(amx_permitted(), "prompt_attention_amx: this CPU or kernel does not let the process use AMX");
    check_attention_args(q, k_cache, v_cache, out);
    TORCH_CHECK(slot >= 0 && slot < k_cache.size(0) && start >= 0 && start + q.size(0) <= k_cache.size(2),
                "slot, start: within the cache");
    if (q.size(0) == 0) return;
    TORCH_CHECK(scale > 0, "prompt_attention_amx: scale > 0");
    TORCH_CHECK(q.size(3) == 64 || q.size(3) == 128, "prompt_attention_amx: head size 64 or 128 only");
    if (q.size(3) == 64) {
        run<64>(q, k_cache, v_cache, slot, start, scale, out);
    } else {
        run<128>(q, k_cache, v_cache, slot, start, scale, out);
    }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmfleet, ops) {
    ops.def("prompt_attention_amx(Tensor q, Tensor k_cache, Tensor v_cache, int slot, int start, float scale, "
            "Tensor(a!) out) -> ()");
    ops.impl("prompt_attention_amx", torch::kCPU, &prompt_attention_amx);
}
