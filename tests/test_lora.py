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

from shared import keys
from shared.protocol import AdapterSource
from shared.settings import Settings
from tests.conftest import MODEL
from tests.fleet import create_api_key
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


def test_a_runtime_adapter_is_loaded_once_the_most_recent_kept_the_unloaded_dropped(tmp_path):
    base = tiny_model("llama")
    root, outside = tmp_path / "root", tmp_path / "outside"
    for path in (root / "a", root / "b", outside):
        write_adapter(base, path, merge=False)
    (root / "sneaky").symlink_to(outside)
    adapters = lora.Adapters("m", base, runtime_dir=root, max_loaded=1)

    def source(directory: str, revision: str) -> AdapterSource:
        return AdapterSource(model="m", path=str(root / directory), revision=revision)

    first = adapters.get("a", source("a", "1"))
    assert adapters.get("a", source("a", "1")) is first and first.key == "a@1"
    assert adapters.get("a", source("a", "2")) is not first, "loaded again in place: another adapter"
    adapters.get("b", source("b", "3"))
    assert list(adapters.loaded) == ["3"], "one kept: the most recently used"
    adapters.keep({"1", "2"})
    assert not adapters.loaded, "unloaded since"
    with pytest.raises(lora.AdapterNotServable, match="does not lie under"):
        adapters.get("c", source("sneaky", "4"))
    with pytest.raises(lora.AdapterNotServable, match="no LoRA adapter 'd'"):
        adapters.get("d", None)


def test_an_adapter_loaded_at_runtime_is_served_until_it_is_unloaded(
    fleet, redis_server, model_dir, loaded_model, tmp_path
):
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, for a model that sets runtime_lora_dir (named
    "based" here, so that only this worker serves it). A load is answered once the worker has served through the
    adapter: one it cannot serve is refused saying why. Loaded again in place, its KV is apart from the first one's."""
    root = tmp_path / "adapters"
    write_adapter(loaded_model.model, root / "tuned", merge=False)
    write_adapter(loaded_model.model, root / "retrained", rank=8, alpha=32.0, merge=False)
    write_adapter(loaded_model.model, root / "dora", merge=False, use_dora=True)
    models = json.dumps({"based": {"path": str(model_dir), "runtime_lora_dir": str(root)}})
    worker = fleet.worker("based", LLMFLEET_MODELS=models)
    gateway = fleet.gateway(LLMFLEET_MODELS=models, LLMFLEET_PROTECTION__AUTH="open")
    try:
        served = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
        question = [{"role": "user", "content": "Name three rivers of France and say where each of them ends."}]

        def post(path: str, **body) -> httpx.Response:
            return httpx.post(f"{gateway.url}/v1/{path}", json=body, timeout=120)

        def ask(model: str):
            return served.chat.completions.create(model=model, messages=question, max_tokens=12, temperature=0)

        loaded = post("load_lora_adapter", lora_name="tuned", lora_path="tuned")
        assert (loaded.status_code, loaded.text) == (200, "Success: LoRA adapter 'tuned' added successfully.")
        again = post("load_lora_adapter", lora_name="tuned", lora_path=str(root / "tuned"))
        assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
        refused = post("load_lora_adapter", lora_name="dora", lora_path="dora")
        assert refused.status_code == 400 and "DoRA" in refused.json()["error"]["message"]
        outside = post("load_lora_adapter", lora_name="far", lora_path="../elsewhere")
        assert outside.status_code == 400 and outside.json()["error"]["param"] == "lora_path"
        # An entry of a model that takes no runtime adapters (since the settings changed) is not served.
        stale = AdapterSource(model=MODEL, path=str(root / "tuned"), revision="0").model_dump_json()
        redis_server.client().hset(keys.lora_adapters(), "stale", stale)
        with pytest.raises(openai.NotFoundError):
            ask("stale")
        assert [m.id for m in served.models.list()] == ["based", "tuned"]
        card = served.models.retrieve("tuned")
        assert (card.model_extra["parent"], card.model_extra["root"]) == ("based", str(root / "tuned"))

        tuned, based = ask("tuned"), ask("based")
        assert tuned.model == "tuned" and tuned.choices[0].message.content != based.choices[0].message.content
        assert ask("tuned").usage.prompt_tokens_details.cached_tokens == tuned.usage.prompt_tokens - 1
        info = [line for line in httpx.get(f"{worker.url}/metrics").text.splitlines() if "lora_requests_info{" in line]
        assert info and 'max_lora="8"' in info[0]

        replaced = post("load_lora_adapter", lora_name="tuned", lora_path="retrained", load_inplace=True)
        assert replaced.status_code == 200
        retrained = ask("tuned")
        assert retrained.usage.prompt_tokens_details.cached_tokens == 0, "none of the first adapter's KV"
        assert retrained.choices[0].message.content != tuned.choices[0].message.content

        unloaded = post("unload_lora_adapter", lora_name="tuned")
        assert (unloaded.status_code, unloaded.text) == (200, "Success: LoRA adapter 'tuned' removed successfully.")
        with pytest.raises(openai.NotFoundError):
            ask("tuned")
        assert post("unload_lora_adapter", lora_name="tuned").status_code == 404
    finally:
        worker.stop()
        gateway.stop()


def test_only_an_admin_key_loads_adapters_and_where_no_model_takes_one_at_runtime_it_is_a_404(
    fleet, gateway_url, api_key
):
    body = {"lora_name": "x", "lora_path": "/x"}

    def load(key: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.post(f"{gateway_url}/v1/load_lora_adapter", json=body, headers=headers, timeout=30)

    refused = load(api_key)
    assert refused.status_code == 403 and "--admin" in refused.json()["error"]["message"]
    loaded = load(create_api_key(fleet.redis_server, name="operator", admin=True))
    assert loaded.status_code == 404 and "runtime_lora_dir" in loaded.json()["error"]["message"]
