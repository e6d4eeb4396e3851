"""Loads a prepared model directory for serving: device choice, dtype, threads, GPTQ through transformers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.settings import ModelSpec, Settings


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
    # gptqmodel sizes a thread pool at import time and refuses to start on a 2-core machine without this.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)


def load(path: Path, spec: ModelSpec, device: torch.device) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    dtype = getattr(torch, spec.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=str(device))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    eos: set[int] = set()
    for source in (GenerationConfig.from_pretrained(path).eos_token_id, model.config.eos_token_id):
        if source is not None:
            eos.update(source if isinstance(source, list) else [source])
    return LoadedModel(model=model, tokenizer=tokenizer, eos_token_ids=frozenset(eos), device=device)
