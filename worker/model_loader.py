"""Loads a prepared model directory for serving: device choice, dtype, threads, GPTQ through transformers."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from shared.settings import ModelSpec, Settings
from worker import cpu_kernels, gguf_grid

log = structlog.get_logger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    eos_token_ids: frozenset[int]
    device: torch.device


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def configure_torch(settings: Settings) -> None:
    """torch and the libraries on it: threads, gptqmodel's pool, and their output as the worker's JSON lines."""
    # gptqmodel sizes a thread pool at import time and refuses to start on a 2-core machine without this.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    _library_logs_as_json()


def _library_logs_as_json() -> None:
    # torch and transformers give their loggers handlers of their own, and gptqmodel's logger (logbar) prints a banner
    # and notes in a format of its own when it is first imported (progress bars: worker/__init__.py).
    import transformers.utils.logging as transformers_logging

    torch_logger = logging.getLogger("torch")
    torch_logger.handlers.clear()
    torch_logger.propagate = True
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    with contextlib.redirect_stdout(io.StringIO()):  # the blank line logbar prints when it makes its logger
        from logbar import LogBar

        LogBar.shared().setLevel(logging.ERROR)


def own_gptq_layers(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """A GPTQ checkpoint's 4-bit layers onto the worker's own block kernel where it runs (bf16): the runner then
    calls them fused, and chains a step's layers in one call where all are so; the layers it cannot take stay
    gptqmodel's. Returns how many it took."""
    from worker.block_quant import BlockQuantLinear

    if dtype != torch.bfloat16 or not cpu_kernels.available():
        return 0
    taken = 0
    for name, module in list(model.named_modules()):
        if (own := BlockQuantLinear.from_gptq_module(module)) is not None:
            model.set_submodule(name, own)
            taken += 1
    log.info("model.gptq_on_own_kernel", layers=taken)
    return taken


def load(path: Path, spec: ModelSpec, device: torch.device) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GPTQConfig

    dtype = getattr(torch, spec.dtype)
    has_blocks = (path / gguf_grid.GGUF_BLOCKS_FILE).is_file()
    exact_grid = has_blocks and device.type == "cpu"
    if has_blocks and not exact_grid:
        # Not measured on a GPU: on the CPU the rounded zero points give perplexity x1.73 of bf16, GPTQ x1.47.
        log.warning("model.gguf_grid_rounded", device=str(device), advice="set grid: gptq for this model on a GPU")
    backend = "auto"
    if exact_grid:
        backend = gguf_grid.ATEN_BACKEND
    elif spec.quantization == "gptq" and device.type == "cuda":
        backend = spec.gpu_kernel
    options = {"quantization_config": GPTQConfig(bits=spec.bits, backend=backend)} if backend != "auto" else {}
    with warnings.catch_warnings():
        # Passing a backend for a quantized checkpoint is what that warning describes; it is meant.
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=str(device), **options)
    model.eval()
    if exact_grid:
        gguf_grid.load_blocks(model, path, dtype, own_kernel=spec.cpu_kernel == "auto")
    elif spec.quantization == "gptq" and device.type == "cpu" and spec.cpu_kernel == "auto":
        own_gptq_layers(model, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    eos: set[int] = set()
    for source in (GenerationConfig.from_pretrained(path).eos_token_id, model.config.eos_token_id):
        if source is not None:
            eos.update(source if isinstance(source, list) else [source])
    return LoadedModel(model=model, tokenizer=tokenizer, eos_token_ids=frozenset(eos), device=device)
