// Software prefetch for the attention kernels. A decoding row reads its sequence's keys and values once, from
// memory, and the CPU's own prefetcher left the kernels waiting on it. 30 layers of decode of 32 rows at 450 cached
// keys, each layer's cache its own as served (scratch benchmark, all three kernels on one Zen 5, without -> with):
// AVX512-BF16 11-16 -> 10-13 ms, AVX2 21-29 -> 15-18 ms, AVX512 without BF16 (Ice Lake's) 16-17 -> 11 ms; the same
// reads from one layer's cache, in the CPU's cache: 3.3, 12-13 and 6 ms.
#pragma once
#include <immintrin.h>
#include <c10/util/BFloat16.h>

#include <cstdint>

constexpr int64_t KEYS_AHEAD = 48;  // keys (or values) fetched this far ahead of their use

// `count` bf16 from p into the CPU's cache, a 64-byte line at a time.
template <int64_t COUNT>
__attribute__((always_inline)) inline void prefetch(const c10::BFloat16* p) {
    for (int64_t line = 0; line < COUNT * 2 / 64; ++line)
        _mm_prefetch(reinterpret_cast<const char*>(p + line * 32), _MM_HINT_T0);
}
