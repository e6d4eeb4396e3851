// A call's rows in register tiles: ROWS rows at a time, the last tile smaller, each tile's size a compile-time constant.
#pragma once
#include <cstdint>
#include <type_traits>

// tile(rows, first) for rows 0..M in tiles of ROWS rows, the last one smaller: `rows` a std::integral_constant.
template <int ROWS, typename Tile>
void row_tiles(int64_t M, const Tile& tile, int64_t first = 0) {
    for (; first + ROWS <= M; first += ROWS) tile(std::integral_constant<int, ROWS>{}, first);
    if constexpr (ROWS > 1) {
        if (first < M) row_tiles<ROWS - 1>(M, tile, first);
    }
}
