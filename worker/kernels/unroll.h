// A loop unrolled at compile time, so that arrays of registers indexed by it stay in registers.
#pragma once
#include <type_traits>

// f(0), f(1), ..., f(n - 1), each index a compile-time constant.
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
