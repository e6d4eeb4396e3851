"""The worker's own CPU kernels, built once by torch's extension builder (~30-60 s, cached in
~/.cache/torch_extensions) and registered as torch.ops.llmfleet.*: `block_quant_matmul` (worker.block_quant),
`cached_attention` (worker.slot_attention) and `rms_norm` (worker.llama_runner). One source set per instruction set
(worker/kernels/<isa>/*.cpp, with worker/kernels/common/*.cpp): AVX512-BF16, or AVX2 with FMA and F16C on CPUs
without AVX512. Elsewhere (AVX512 without BF16, not measured with these kernels; ARM) or where the build fails,
`isa()` is None and the worker uses library kernels instead.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

KERNELS = Path(__file__).parent / "kernels"
_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bf16", "-mavx512vl", "-mavx512dq", "-mavx512bw", "-mavx512vbmi"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
}


def _cpu_isa() -> str | None:
    import torch
    from gptqmodel.utils.cpu_features import has_avx512_bf16

    if has_avx512_bf16():
        return "avx512"
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    if torch.backends.cpu.get_cpu_capability() == "AVX2" and {"fma", "f16c"} <= flags:
        return "avx2"
    return None


def sources(isa: str) -> list[Path]:
    """The instruction set's own sources, and the plain C++ ones (worker/kernels/common) compiled for it."""
    return sorted((KERNELS / isa).glob("*.cpp")) + sorted((KERNELS / "common").glob("*.cpp"))


@functools.cache
def isa() -> str | None:
    """Build (first time only) and load this CPU's kernels; the instruction set they use, or None."""
    from torch.utils.cpp_extension import load

    chosen = _cpu_isa()
    if chosen is None:
        return None
    try:
        # A build per checkout: the build file names absolute source paths, so two checkouts sharing one build
        # directory would rebuild each other's kernels (~60 s) whenever either loads them.
        checkout = hashlib.sha1(str(KERNELS.resolve()).encode()).hexdigest()[:8]
        load(
            name=f"llmfleet_cpu_kernels_{chosen}_{checkout}",
            sources=[str(s) for s in sources(chosen)],
            extra_cflags=["-O3", "-fopenmp", *_FLAGS[chosen]],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as exc:  # a missing compiler must not stop the worker: the library kernels still serve
        log.warning("cpu_kernels.unavailable", isa=chosen, error=str(exc))
        return None
    return chosen


def available() -> bool:
    return isa() is not None
