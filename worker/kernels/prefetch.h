// Software prefetch for the kernels that stream from memory: attention (a decoding row reads its sequence's keys and
// values once) and the block kernels (a step reads every layer's weights once: ~96 MB for the default model, three
// times a 32 MB L3). The CPU's own prefetcher left them waiting on memory. Scratch benchmarks, every kernel set on
// one Zen 5, without -> with:
// - Attention, 30 layers of decode of 32 rows at 450 cached keys, each layer's cache its own as served: AVX512-BF16
//   11-16 -> 10-13 ms, AVX2 21-29 -> 15-18 ms, AVX512 without BF16 (Ice Lake's) 16-17 -> 11 ms; the same reads from
//   one layer's cache, in the CPU's cache, 3.3, 12-13 and 6 ms.
// - Block kernels, the 8-bit output projection (49152 x 576) at 32 rows: bf16 dot 4.7-4.8 -> 3.7 ms, AVX2 9.4-12.0
//   -> 8.1-10.1 ms, 16-bit integers 4.1-5.0 -> 3.5-3.7 ms; 30 gate_up layers at 1 row, 16-bit integers 2.3 -> 1.3 ms.
// - The AMX block kernel, whose weights are computed from the codes every call (an AMX Xeon, the whole model's block
//   calls at 1 / 32 / 128 rows): 11.7-12.9 -> 10.4-11.2, 14.0 -> 11.7-11.9, 37.8 -> 29.6-31.4 ms.
#pragma once
#include <immintrin.h>

#include <cstdint>

constexpr int64_t KEYS_AHEAD = 48;           // keys (or values) fetched this far ahead of their use
constexpr int64_t CODES_BYTES_AHEAD = 2048;  // the block kernels' packed weights

// COUNT elements from p into the CPU's cache, a 64-byte line at a time.
template <int64_t COUNT, typename T>
__attribute__((always_inline)) inline void prefetch(const T* p) {
    for (int64_t line = 0; line < COUNT * int64_t(sizeof(T)) / 64; ++line)
        _mm_prefetch(reinterpret_cast<const char*>(p) + line * 64, _MM_HINT_T0);
}
