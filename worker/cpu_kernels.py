"""The worker's own CPU kernels, built once by torch's extension builder (~30-60 s, cached in ~/.cache/torch_extensions)
and registered as torch.ops.llmfleet.*: `block_quant_matmul` (worker.block_quant; with AVX512 also `_fp32` and `_int16`
variants, see block_quant_op(); for many rows `_amx` and `_rounded` on AVX512, `_dense` on AVX2, see tile_op()),
`cached_attention` and `prompt_attention_amx` (worker.slot_attention), `rms_norm`, `add_rms_norm` and `rotary_to_cache`
(worker.llama_runner) and `silu_mul` (worker.int4_calls), which the worker calls through op(). One kernel set per
instruction set (KERNEL_SETS: sources in worker/kernels/<isa>/, with worker/kernels/common/): AVX512-BF16 (with AMX
where the CPU has it); AVX512-VNNI without BF16 (Ice Lake: the 16-bit integer block kernel, float32 attention); AVX2
with FMA and F16C. Elsewhere (ARM) or where the build fails, `isa()` is None and the worker uses library kernels
instead."""

from __future__ import annotations

import fcntl
import functools
import hashlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import structlog

log = structlog.get_logger(__name__)

KERNELS = Path(__file__).parent / "kernels"
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
_AVX512 = ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx512bw", "-mavx512vnni"]
# Each kernel set's sources (globs under worker/kernels) and compiler flags.
KERNEL_SETS = {
    "avx512": (
        ["avx512/*.cpp", "avx512_vnni/block_quant_int16.cpp", "common/*.cpp"],
        [*_AVX512, "-mavx512bf16", "-mavx512vbmi"],
    ),
    "avx512_vnni": (["avx512_vnni/*.cpp", "common/*.cpp"], _AVX512),
    "avx2": (["avx2/*.cpp", "common/*.cpp"], _AVX2),
}


@functools.cache
def _cpu_flags() -> frozenset[str]:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return frozenset(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


def cpu_isa() -> str | None:
    """The kernel set this CPU can run (a key of KERNEL_SETS), or None; whether it builds is isa()."""
    import torch
    from gptqmodel.utils.cpu_features import has_avx512_bf16

    flags = _cpu_flags()
    avx512 = {"avx512f", "avx512vl", "avx512dq", "avx512bw", "avx512_vnni", "fma", "f16c"} <= flags
    if avx512 and has_avx512_bf16() and "avx512vbmi" in flags:
        return "avx512"
    if avx512:
        return "avx512_vnni"
    if torch.backends.cpu.get_cpu_capability() == "AVX2" and {"fma", "f16c"} <= flags:
        return "avx2"
    return None


def sources(isa: str) -> list[Path]:
    """The kernel set's sources."""
    return sorted(path for pattern in KERNEL_SETS[isa][0] for path in KERNELS.glob(pattern))


def _build_name(isa: str) -> str:
    # A build per checkout: the build file names absolute source paths, so two checkouts sharing one build
    # directory would rebuild each other's kernels (~60 s) whenever either loads them.
    checkout = hashlib.sha1(str(KERNELS.resolve()).encode()).hexdigest()[:8]
    return f"llmfleet_cpu_kernels_{isa}_{checkout}"


@functools.cache
def _built() -> tuple[str, ModuleType] | None:
    """Build (first time only) and load this CPU's kernels: their instruction set and module, or None."""
    from torch.utils.cpp_extension import load

    chosen = cpu_isa()
    if chosen is None:
        return None
    try:
        module = load(
            name=_build_name(chosen),
            sources=[str(s) for s in sources(chosen)],
            extra_cflags=["-O3", "-fopenmp", *KERNEL_SETS[chosen][1]],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:  # a missing compiler must not stop the worker: the library kernels still serve
        log.warning("cpu_kernels.unavailable", isa=chosen, error=str(exc))
        return None
    return chosen, module


def isa() -> str | None:
    """The instruction set of this CPU's kernels, built and loaded (see _built), or None."""
    built = _built()
    return built[0] if built else None


def _module() -> ModuleType:
    built = _built()
    assert built is not None, "the kernels did not build"
    return built[1]


@functools.cache
def op(name: str) -> Callable:
    """torch.ops.llmfleet.`name` as a direct call (worker/kernels/common/python_calls.cpp): the same op for ~3 us less
    a call, for the calls of every step. Only where the kernels are available()."""
    return _module().bind(name)


def layer_chain(*args) -> Callable:
    """A step's layers as one call (worker/kernels/common/python_calls.cpp, LayerChain; arguments as there).
    Only where the kernels are available()."""
    return _module().layer_chain(*args)


def available() -> bool:
    return isa() is not None


# A variant other than the first (where the bf16 dot product serves) must be this much faster to serve.
CLEARLY_FASTER = 1.1
BLOCK_QUANT_OPS = ("block_quant_matmul", "block_quant_matmul_fp32", "block_quant_matmul_int16")


@functools.cache
def amx() -> bool:
    """Whether this CPU's kernels include the AMX ones (worker/kernels/avx512/*_amx.cpp), which a step uses for its
    prompt rows (worker.block_quant.TileRows, worker.slot_attention.KernelAttention), and the process may use the
    tiles (Linux grants them on request since 5.16; a VM or an older kernel may refuse)."""
    import torch

    flags = isa() == "avx512" and {"amx_tile", "amx_bf16"} <= _cpu_flags()
    return flags and torch.ops.llmfleet.amx_permitted()


@functools.cache
def tile_op() -> str | None:
    """The block_quant_matmul variant for a step's many rows (worker.block_quant.TileRows), over weights computed once a
    call: on AMX tiles where the process may use them; else, where AVX512-BF16's dot product serves the block kernels
    (block_quant_op()), that dot product over all of K on the weights rounded to bf16; on AVX2, float32 FMAs on the
    weights in float32 where a few test calls ran them clearly faster than the 16-bit integer kernel (Zen 1: 5-25%
    faster from 16 rows; written for Zen 3, the integer kernel makes twice an FMA's products there). None elsewhere."""
    if amx():
        return "block_quant_matmul_amx"
    if isa() == "avx512" and block_quant_op() == BLOCK_QUANT_OPS[0]:
        return "block_quant_matmul_rounded"
    if isa() == "avx2":
        chosen = _timed_choice("tile_op", [BLOCK_QUANT_OPS[0], "block_quant_matmul_dense"], TILE_CALLS)
        return None if chosen == BLOCK_QUANT_OPS[0] else chosen
    return None


def tile_ops() -> list[str]:
    """The tile op variants this machine can run, whether or not tile_op() serves one."""
    import torch

    names = ["block_quant_matmul_amx"] if amx() else []
    return names + [
        name
        for name in ("block_quant_matmul_rounded", "block_quant_matmul_dense")
        if available() and hasattr(torch.ops.llmfleet, name)
    ]


def block_quant_ops() -> list[str]:
    """The block_quant_matmul variants this CPU's kernels have (the same op computed two or three ways on AVX512)."""
    import torch

    return [name for name in BLOCK_QUANT_OPS if available() and hasattr(torch.ops.llmfleet, name)]


@functools.cache
def block_quant_op() -> str:
    """The block_quant_matmul variant this machine serves: on AVX512, whichever of AVX512-BF16's dot product, float32
    FMAs and 16-bit integers (AVX512-VNNI) computed a few test calls faster. Intel's CPUs without AMX run the bf16 dot
    product at half the rate of float32 FMAs, AMD's at twice it. The bf16 dot product, the closest to the bf16 model
    (teacher-forced KL 0.0038 against 0.0042 for 16-bit integers), unless another is clearly faster."""
    names = block_quant_ops()
    if len(names) <= 1:
        return names[0] if names else BLOCK_QUANT_OPS[0]
    return _timed_choice("block_quant_op", names, BLOCK_CALLS)


def _timed_choice(record_name: str, names: list[str], shapes: tuple[tuple[int, int, int], ...]) -> str:
    """The fastest of `names` on calls of `shapes` (_timing_calls), the first unless another is CLEARLY_FASTER. Timed
    once per machine and kept beside the built kernels as `record_name`, so that every process here computes the same
    bits."""
    from torch.utils.cpp_extension import _get_build_directory

    record = Path(_get_build_directory(_build_name(isa()), verbose=False)) / record_name
    # Kept with the sources it was timed on: torch rebuilds changed kernels in place, and the choice is timed again.
    built_from = _sources_digest(isa())
    # One process times at a time (the others wait, then read its record): two timing at once on two cores time each
    # other's load, and the last to write wins. Two workers of a fresh machine did so, and one run of the tests beside
    # the model's preparation: the 16-bit integer variant kept, a decode step of 8 rows 10.2 -> 14.3 ms (Zen 4).
    with open(record.with_name(f"{record_name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if record.is_file():
            name, _, timed_on = record.read_text().partition(" ")
            if name in names and timed_on == built_from:
                return name
        # Two passes, best of each: the variant timed first also paid for the machine's warm-up (4.6 ms against its
        # 0.8 on one start), and lost to a slower one.
        calls = _timing_calls(shapes)
        seconds = {name: _block_quant_seconds(name, calls) for name in names}
        seconds = {name: min(seconds[name], _block_quant_seconds(name, calls)) for name in names}
        chosen = min(seconds, key=lambda name: seconds[name] * (1.0 if name == names[0] else CLEARLY_FASTER))
        record.write_text(f"{chosen} {built_from}")
    log.info(f"cpu_kernels.{record_name}", chosen=chosen, seconds={k: round(v, 5) for k, v in seconds.items()})
    return chosen


def _sources_digest(isa: str) -> str:
    digest = hashlib.sha1()
    for path in [*sources(isa), *sorted(KERNELS.rglob("*.h"))]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _block_quant_seconds(name: str, calls: list[tuple]) -> float:
    """The variant's seconds for `calls` (_timing_calls), best of 5 each, summed."""
    from worker.step_cost import best_seconds

    kernel = op(name)
    total = 0.0
    for args in calls:
        call = functools.partial(kernel, *args)
        call()  # warm-up
        total += best_seconds(call, 5)
    return total


# Test calls as (outputs, bits, rows), inputs 576 (the model's width): an MLP-sized 4-bit layer (1536 x 576), and an
# 8-bit one the size of an output projection (49152 x 576, beyond the CPU's cache). The block kernels serve every row
# count: 1, 32 and 256 rows, and the output projection at 8 (the 4-bit layer alone at 1, 16 and 256 rows timed 16-bit
# integers level with the bf16 dot product on a Zen 5, whose decode steps they made 30% slower). A tile op serves
# DECODE_TILE_ROWS (16) rows and more.
BLOCK_CALLS = ((1536, 4, 1), (1536, 4, 32), (1536, 4, 256), (49152, 8, 8))
TILE_CALLS = ((1536, 4, 32), (1536, 4, 256), (49152, 8, 32))


def _timing_calls(shapes: tuple[tuple[int, int, int], ...]) -> list[tuple]:
    """The calls _block_quant_seconds times, random weights and inputs of `shapes`. Made once for every variant and
    pass, and not kept (~30 MB)."""
    import torch

    k, group, calls = 576, 32, []
    for n, bits, rows in shapes:
        packed = torch.randint(0, 256, (n, k * bits // 8), dtype=torch.uint8)
        scales = torch.rand(n // 32, k // group, 32).half()  # worker.block_quant.by_block's layout
        mins = torch.rand(n // 32, k // group, 32).half() if bits == 4 else None
        calls.append((torch.randn(rows, k).bfloat16(), packed, scales, mins, group, bits))
    return calls
