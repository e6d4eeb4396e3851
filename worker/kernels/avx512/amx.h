// What the AMX kernels share: the process's permission to use the tiles, and one tile layout.
#pragma once
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdint>

// Linux hands out AMX's tile state only to a process that asks for it (arch_prctl ARCH_REQ_XCOMP_PERM).
inline bool amx_permitted() {
    static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return permitted;
}

constexpr int64_t TILE_ROWS = 16;

// Every tile 16 rows of 64 bytes: 16 x 32 bf16 operands, 16 x 16 float32 results. Per thread, before its tiles.
__attribute__((target("amx-tile"))) inline void configure_tiles() {
    struct alignas(64) {
        uint8_t palette = 1, start_row = 0, reserved[14] = {};
        uint16_t colsb[16] = {};
        uint8_t rows[16] = {};
    } config;
    for (int t = 0; t < 8; ++t) {
        config.rows[t] = TILE_ROWS;
        config.colsb[t] = 64;
    }
    asm volatile("" ::: "memory");  // the tile instructions are asm that names only pointers: order memory around them
    _tile_loadconfig(&config);
}

// Per thread, after its tiles: the tile state back to its initial, cheap to save at a context switch.
__attribute__((target("amx-tile"))) inline void release_tiles() { _tile_release(); }
