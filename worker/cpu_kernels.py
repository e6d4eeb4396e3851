"""The worker's own CPU kernels (worker/kernels/*.cpp, AVX512-BF16), built once by torch's extension builder (~30 s,
cached in ~/.cache/torch_extensions) and registered as torch.ops.llmfleet.*: `block_quant_matmul`
(worker.block_quant) and `cached_attention` (worker.slot_attention). Where the CPU lacks AVX512-BF16 or the build
fails, `available()` is False and the worker uses library kernels instead.
"""

from __future__ import annotations

import functools
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

SOURCES = sorted((Path(__file__).parent / "kernels").glob("*.cpp"))
_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bf16", "-mavx512vl", "-mavx512dq", "-mavx512bw", "-mavx512vbmi"]


@functools.cache
def available() -> bool:
    """Build (first time only) and load the kernels."""
    from gptqmodel.utils.cpu_features import has_avx512_bf16
    from torch.utils.cpp_extension import load

    if not has_avx512_bf16():
        return False
    try:
        load(
            name="llmfleet_cpu_kernels",
            sources=[str(s) for s in SOURCES],
            extra_cflags=_FLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as exc:  # a missing compiler must not stop the worker: the library kernels still serve
        log.warning("cpu_kernels.unavailable", error=str(exc))
        return False
    return True
