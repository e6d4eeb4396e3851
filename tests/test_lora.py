"""LoRA adapters (vLLM's --lora-modules): a PEFT adapter directory served beside its base model. The runner's rows
that name an adapter compute what the base model with the adapter merged into its weights computes, beside rows of
the base model in the same step; an adapter the worker cannot serve is refused at start-up."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pydantic
import pytest
import torch
from safetensors.torch import save_file

from shared.settings import Settings
from tests.conftest import MODEL
from tests.test_architectures import SHAPE, save_tiny, tiny_model
from worker import lora
from worker.llama_runner import LlamaRunner, PrefillChunk

TARGETS = ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")


def write_adapter(model: torch.nn.Module, out: Path, targets=TARGETS, rank: int = 4, alpha: float = 8.0,
                  merge: bool = True, **config) -> torch.nn.Module | None:  # fmt: skip
    """A random adapter for `model` as PEFT writes one; returns the model with it merged into its weights (with
    `merge`: its weights must be plain ones)."""
    generator = torch.Generator().manual_seed(0)
    merged = copy.deepcopy(model) if merge else None
    tensors = {}
    for name, module in (merged or model).named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            a = (torch.randn(rank, module.in_features, generator=generator) * 0.1).to(torch.bfloat16)
            b = (torch.randn(module.out_features, rank, generator=generator) * 0.1).to(torch.bfloat16)
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
            if merge:
                with torch.no_grad():
                    module.weight += (b.float() @ a.float() * (alpha / rank)).to(module.weight.dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    settings = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets), **config}
    (out / "adapter_config.json").write_text(json.dumps(settings))
    return merged


def logits_of(model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0, -1].float()


def test_rows_of_an_adapter_compute_the_merged_model_beside_rows_of_the_base_model(tmp_path):
    base = tiny_model("llama")
    merged = write_adapter(base, tmp_path / "adapter")
    adapter = lora.load("tuned", tmp_path / "adapter", base)
    runner = LlamaRunner(base, slots=2, capacity=512)
    prompt = torch.randint(0, SHAPE["vocab_size"], (40,), generator=torch.Generator().manual_seed(1)).tolist()
    chunks = [PrefillChunk(0, prompt, 0), PrefillChunk(1, prompt, 0)]
    logits = runner.step([], [], [], chunks, adapters=[adapter, None]).float()
    tuned, plain = logits_of(merged, prompt), logits_of(base, prompt)
    assert (tuned - plain).abs().max() > 0.5, "the adapter changes the logits"
    assert (logits[0] - tuned).abs().max() < 0.05 and (logits[1] - plain).abs().max() < 0.05
    # Decoding: one row with the adapter, one without, in one step.
    after = runner.step([0, 1], [7, 7], [40, 40], [], adapters=[adapter, None]).float()
    assert (after[0] - logits_of(merged, prompt + [7])).abs().max() < 0.05
    assert (after[1] - logits_of(base, prompt + [7])).abs().max() < 0.05


@pytest.mark.parametrize(
    "targets, config, reason",
    [
        (("q_proj",), {"use_dora": True}, "DoRA"),
        (("q_proj", "lm_head"), {}, "lm_head, which is not one of the layers' projections"),
        (("q_proj",), {"peft_type": "IA3"}, "not LORA"),
    ],
)
def test_an_adapter_the_worker_would_not_compute_is_refused_saying_why(tmp_path, targets, config, reason):
    base = tiny_model("llama")
    write_adapter(base, tmp_path, targets=targets, **config)
    with pytest.raises(lora.AdapterNotServable, match=reason):
        lora.load("tuned", tmp_path, base)


def test_an_adapter_is_served_by_its_name_beside_its_model(fleet, model_dir, loaded_model, client, tmp_path):
    """A worker of the default model (named "based" here, so that only this worker serves it) with an adapter; its
    prefix cache never hands one's KV to the other: the model's answer is the shared worker's."""
    write_adapter(loaded_model.model, tmp_path / "tuned", merge=False)
    models = json.dumps({"based": {"path": str(model_dir), "lora_modules": {"tuned": str(tmp_path / "tuned")}}})
    worker = fleet.worker("based", LLMFLEET_MODELS=models)
    gateway = fleet.gateway(LLMFLEET_MODELS=models, LLMFLEET_PROTECTION__AUTH="open")
    try:
        served = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
        card = served.models.retrieve("tuned")
        assert card.model_extra["parent"] == "based" and card.model_extra["root"] == str(tmp_path / "tuned")
        question = [{"role": "user", "content": "Name three rivers of France and say where each of them ends."}]

        def ask(on: openai.OpenAI, model: str):
            return on.chat.completions.create(model=model, messages=question, max_tokens=12, temperature=0)

        tuned = ask(served, "tuned")
        based, shared = ask(served, "based"), ask(client, MODEL)
        assert (based.model, based.choices[0].message.content) == ("based", shared.choices[0].message.content)
        assert tuned.model == "tuned" and tuned.choices[0].message.content != shared.choices[0].message.content
        # Its own KV, though: the prompt's, from the first answer.
        assert ask(served, "tuned").usage.prompt_tokens_details.cached_tokens == tuned.usage.prompt_tokens - 1
        generated = httpx.post(
            f"{gateway.url}/generate",
            json={"inputs": "The Loire", "parameters": {"max_new_tokens": 4, "adapter_id": "tuned"}},
            timeout=60,
        )
        assert generated.status_code == 200 and generated.json()["generated_text"]
    finally:
        worker.stop()
        gateway.stop()


def test_an_adapter_may_not_take_a_name_another_model_has():
    with pytest.raises(pydantic.ValidationError, match="given twice"):
        Settings(models={"base": {"aliases": ["tuned"], "lora_modules": {"tuned": "/adapters/tuned"}}})


def test_a_worker_refuses_an_adapter_it_cannot_serve_when_it_prepares_the_model(settings, model_dir, tmp_path):
    base = tiny_model("llama", vocab_size=49152)
    path = save_tiny(base, tmp_path / "tiny", settings.dense_model_dir(MODEL))
    write_adapter(base, tmp_path / "dora", use_dora=True, merge=False)
    spec = {
        "path": path,
        "quantization": "none",
        "max_context": 4096,
        "lora_modules": {"tuned": str(tmp_path / "dora")},
    }
    env = {**os.environ, "LLMFLEET_MODELS": json.dumps({"tiny": spec})}
    done = subprocess.run(
        [sys.executable, "-m", "worker", "--model", "tiny", "--prepare-only"], env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == os.EX_CONFIG and "adapter 'tuned'" in done.stdout + done.stderr
