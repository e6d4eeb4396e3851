"""Which runner steps a model: the worker's own (worker.llama_runner) where it computes the model, else the model's
transformers forward (worker.transformers_runner), as its ModelSpec.implementation says."""

from __future__ import annotations

import structlog
import torch

from shared.settings import ModelSpec
from worker.llama_runner import LlamaRunner, ModelNotServable, own_refusal, positions_refusal
from worker.transformers_runner import TransformersRunner, structure_refusal

log = structlog.get_logger(__name__)
Runner = LlamaRunner | TransformersRunner


def choose(config, spec: ModelSpec) -> str:
    """The runner that steps the model, "llmfleet" or "transformers", or ModelNotServable saying why neither does (as
    far as its config tells: the transformers runner checks its weights' step when it is made)."""
    refusal = own_refusal(config, spec.max_context)
    if spec.implementation == "llmfleet" or (spec.implementation == "auto" and refusal is None):
        if refusal:
            raise ModelNotServable(f"the worker's own runner cannot serve this model: {refusal}")
        return "llmfleet"
    if other := structure_refusal(config) or positions_refusal(config, spec.max_context):
        raise ModelNotServable(f"the worker cannot serve this model: {other}")
    if spec.lora_modules or spec.runtime_lora_dir:
        why = refusal or "its implementation is set to transformers"
        raise ModelNotServable(f"LoRA adapters are served by the worker's own runner only ({why})")
    return "transformers"


def build(model: torch.nn.Module, spec: ModelSpec, slots: int, batch_invariant: bool) -> Runner:
    implementation = choose(model.config, spec)
    log.info("worker.runner", implementation=implementation, model_type=model.config.model_type)
    if implementation == "llmfleet":
        return LlamaRunner(model, slots=slots, capacity=spec.max_context, batch_invariant=batch_invariant)
    return TransformersRunner(model, slots=slots, capacity=spec.max_context)
