"""The model types the worker serves besides the default Llama: each one's runner step computes what its
transformers forward computes (tiny random checkpoints, so no weights are fetched), a model it would compute otherwise
is refused before it serves a request, and such a checkpoint is served through the gateway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from loadtest import random_model
from shared.settings import ModelSpec
from tests.conftest import MODEL
from tests.fleet import create_api_key
from worker import cpu_kernels, model_loader
from worker.block_quant import BlockQuantLinear
from worker.int4_calls import projection_groups
from worker.llama_runner import LlamaRunner, ModelNotServable, PrefillChunk

SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=1024, max_position_embeddings=4096,
             pad_token_id=0)  # fmt: skip
CPU = torch.device("cpu")
LONGROPE_PHI3 = {"hidden_size": 256, "original_max_position_embeddings": 1024,
                 "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                     "original_max_position_embeddings": 1024, "long_factor": [4.0] * 32,
                                     "short_factor": [1 + i / 32 for i in range(32)]}}  # fmt: skip
"""Phi-3-mini-128k's kind: short factors within its original 1,024 positions, long ones past them (hidden_size 256:
transformers counts the factors by hidden_size / heads, the rotation by head_dim 64)."""
SERVED = {
    "llama3-rope": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "yarn-rope": ("qwen2", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                  "original_max_position_embeddings": 1024}}),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2-biases": ("qwen2", {}),
    "qwen3-qk-norms": ("qwen3", {}),
    "gemma": ("gemma", {}),
    "smollm3-no-rope-layer": ("smollm3", {"no_rope_layers": [1, 0]}),
    "phi3-fused-projections": ("phi3", {}),
    "granite-multipliers": ("granite", {"embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                            "attention_multiplier": 0.0625, "logits_scaling": 8.0}),
    "phi3-longrope-within-its-original-positions": ("phi3", LONGROPE_PHI3),
    "dynamic-rope-within-its-positions": ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0,
                                          "factor": 2.0}}),
}  # fmt: skip


def tiny_model(model_type: str, vocab_size: int = SHAPE["vocab_size"], **extra) -> torch.nn.Module:
    """Random weights, the norms' and biases' too (at their initial values, a runner that skipped them would match),
    and queries and keys 4x larger: attention that nearly averages every position hides a rotation left out (a layer
    of SmolLM3's rotated: logits 0.02 apart, 0.48 with these)."""
    config = AutoConfig.for_model(model_type, **{**SHAPE, "vocab_size": vocab_size, **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                parameter.add_(torch.randn_like(parameter) * 0.3)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(4)
            if name.endswith("qkv_proj.weight"):  # Phi-3's: the queries' and keys' rows first
                parameter[: (config.num_attention_heads + config.num_key_value_heads) * SHAPE["head_dim"]].mul_(4)
    return model


def assert_runner_matches_forward(model: torch.nn.Module, runner: LlamaRunner | None = None) -> None:
    """The logits of every position of a 300-token prompt, from the runner (prefilled in chunks of 100) and from the
    model's forward: bf16 arithmetic in another order, a few hundredths apart at most (a norm or rotation skipped:
    tenths)."""
    runner = runner or LlamaRunner(model, slots=1, capacity=512)
    prompt = torch.randint(0, SHAPE["vocab_size"], (300,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0].float()
    chunks = [PrefillChunk(0, prompt[start : start + 100], start) for start in range(0, 300, 100)]
    logits = torch.cat([runner.step([], [], [], [chunk], every_row=True).float() for chunk in chunks])
    assert (logits - expected).abs().max() < 0.05
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel-attention", "matmul-attention"])
@pytest.mark.parametrize("case", SERVED)
def test_the_runner_computes_each_served_model_type_as_its_forward_does(case, kernel):
    model_type, extra = SERVED[case]
    model = tiny_model(model_type, **extra)
    runner = LlamaRunner(model, slots=2, capacity=512)
    if kernel and not runner.attention_kernel:
        pytest.skip("the attention kernel needs a CPU with AVX512 or AVX2")
    runner.attention_kernel = kernel
    assert_runner_matches_forward(model, runner)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "phi3"])
def test_their_gptq_checkpoints_run_on_the_workers_kernel_as_gptqmodel_computes_them(
    model_type, settings, model_dir, tmp_path
):
    dense = tiny_model(model_type)
    path = Path(save_tiny(dense, tmp_path, settings.dense_model_dir(MODEL)))
    random_model.write_gptq(dense, path)  # each weight rounded to its group's 4-bit grid
    theirs = model_loader.load(path, ModelSpec(path=path, quantization="gptq", cpu_kernel="aten"), CPU).model
    ours = model_loader.load(path, ModelSpec(path=path, quantization="gptq"), CPU).model
    if cpu_kernels.available():  # on the worker's block kernel, Qwen2's q/k/v with their biases too
        assert all(isinstance(p, BlockQuantLinear) for group in projection_groups(ours.model.layers[0]) for p in group)
    assert_runner_matches_forward(theirs, LlamaRunner(ours, slots=1, capacity=512))


@pytest.mark.parametrize(
    "model_type, extra, capacity, reason",
    [
        ("olmo2", {}, 512, "model type 'olmo2'"),
        ("phi3", {"partial_rotary_factor": 0.75}, 512, "turns only part of each head"),
        ("phi3", LONGROPE_PHI3, 2048, "longrope angles change past 1024 positions"),
        ("mistral", {"sliding_window": 256}, 512, "attend to the last 256 positions only"),
        ("llama", {}, 8192, "its positions go to 4096: set its max_context to 4096 at most"),
    ],
)  # fmt: skip
def test_a_model_the_runner_would_compute_otherwise_is_refused_saying_why(model_type, extra, capacity, reason):
    with pytest.raises(ModelNotServable, match=reason):
        LlamaRunner(tiny_model(model_type, **extra), slots=1, capacity=capacity)


def test_sliding_window_layers_are_served_where_the_window_covers_the_context():
    LlamaRunner(tiny_model("mistral", sliding_window=512), slots=1, capacity=512)


def save_tiny(model: torch.nn.Module, out, tokenizer_dir) -> str:
    """A checkpoint directory as a user would point the worker at: the model, with the default model's tokenizer."""
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return str(out)


def test_a_worker_given_a_model_it_cannot_serve_exits_saying_why(settings, model_dir, tmp_path):
    """Mamba's layers keep a recurrent state: neither the own runner nor the transformers one steps it."""
    tokenizer_dir = settings.dense_model_dir(MODEL)
    path = save_tiny(tiny_model("mamba", vocab_size=49152), tmp_path / "mamba", tokenizer_dir)
    env = {**os.environ, "LLMFLEET_MODELS": json.dumps({"tiny-mamba": {"path": path, "quantization": "none"}})}
    worker = [sys.executable, "-m", "worker", "--model", "tiny-mamba"]
    for command in (worker + ["--prepare-only"], worker):  # at build time already, and at start-up
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == os.EX_CONFIG  # what the supervisor (llmfleet up) takes as "do not restart"
        assert "its layers keep a state besides keys and values" in done.stdout + done.stderr


def test_a_qwen3_checkpoint_is_served_through_the_gateway_with_its_sampling_defaults(
    fleet, settings, model_dir, tmp_path
):
    tokenizer_dir = settings.dense_model_dir(MODEL)
    path = save_tiny(tiny_model("qwen3", vocab_size=49152), tmp_path / "qwen3", tokenizer_dir)
    # Greedy unless a request says otherwise (a random model samples near-uniformly from 49k tokens at temperature 1).
    generation = tmp_path / "qwen3" / "generation_config.json"
    generation.write_text(json.dumps({**json.loads(generation.read_text()), "temperature": 0.0, "top_k": 20}))
    spec = {"path": path, "quantization": "none", "max_context": SHAPE["max_position_embeddings"]}
    models = json.dumps({"tiny-qwen3": spec})
    worker = fleet.worker("tiny-qwen3", LLMFLEET_MODELS=models)
    gateway = fleet.gateway(LLMFLEET_MODELS=models)
    try:
        client = openai.OpenAI(
            base_url=f"{gateway.url}/v1", api_key=create_api_key(fleet.redis_server), max_retries=0, timeout=60
        )

        def answer(**sampling) -> str:
            reply = client.chat.completions.create(
                model="tiny-qwen3", messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
                extra_body={"ignore_eos": True}, **sampling,
            )  # fmt: skip
            assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 8
            return reply.choices[0].message.content

        assert answer(seed=1) == answer(seed=2) == answer(temperature=0)
        assert answer(temperature=1.0, seed=1) != answer(temperature=1.0, seed=2)
    finally:
        worker.stop()
        gateway.stop()
