"""Models the worker's own runner does not compute, stepped through their own transformers forward with the worker's
slot attention (worker.transformers_runner): each one's step gives the logits of its forward (tiny random
checkpoints), a model it cannot step is refused saying why, and such models, the default one too, are served through
the gateway."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import torch

from loadtest import random_model
from shared.settings import ModelSpec
from tests.conftest import FRANCE_QUESTION, MODEL
from tests.fleet import create_api_key
from tests.test_architectures import LONGROPE_PHI3, SHAPE, save_tiny, tiny_model
from worker import cpu_kernels, model_loader, runner_choice
from worker.block_quant import BlockQuantLinear
from worker.llama_runner import LlamaRunner, ModelNotServable, PrefillChunk
from worker.transformers_runner import TransformersRunner

CPU = torch.device("cpu")
WINDOW = 16
STEPPED = {
    "gemma2-windows-softcaps": ("gemma2", {"sliding_window": WINDOW}),
    "gemma3-windows-qk-norms": ("gemma3_text", {"sliding_window": WINDOW}),
    "olmo2-norms-after-blocks": ("olmo2", {}),
    "phi-partial-rotary": ("phi", {"partial_rotary_factor": 0.5}),
    "mixtral-experts": ("mixtral", {"num_local_experts": 4, "sliding_window": None}),
    "deepseek-v3-latent-attention": ("deepseek_v3", {"n_routed_experts": 4, "num_experts_per_tok": 2,
                                     "q_lora_rank": None, "kv_lora_rank": 32, "qk_rope_head_dim": 16,
                                     "qk_nope_head_dim": 16, "v_head_dim": 48, "first_k_dense_replace": 1,
                                     "n_group": 1, "topk_group": 1, "head_dim": 16, "num_key_value_heads": 4}),
    "gpt2-learned-positions": ("gpt2", {}),
}  # fmt: skip


@pytest.mark.parametrize("case", STEPPED)
def test_each_model_steps_as_its_own_forward_computes_it(case):
    """One step mixes what the scheduler mixes: two decoding rows (their keys a view of the slots between them, or
    gathered from slots far apart), a sequence's token with two guesses after it, and a new prompt's chunk, after
    steps that prefilled the sequences in chunks; every row's logits against the model's own forward over each whole
    sequence (its own attention). The prompts run past the windows."""
    model_type, extra = STEPPED[case]
    model = tiny_model(model_type, **extra)
    generator = torch.Generator().manual_seed(1)
    a, b, c, d = (torch.randint(0, SHAPE["vocab_size"], (n,), generator=generator).tolist() for n in (40, 30, 25, 20))
    with torch.no_grad():
        expected = [model(torch.tensor([s]), use_cache=False).logits[0].float() for s in (a, b, c, d)]
    runner = TransformersRunner(model, slots=8, capacity=128)
    for far in (3, 7):  # d's slot: the single rows' span (0-3) a view, or 0 and 7 gathered
        runner.step([], [], [], [PrefillChunk(0, a[:20], 0), PrefillChunk(1, b[:26], 0), PrefillChunk(far, d[:19], 0)])
        runner.step([], [], [], [PrefillChunk(0, a[20:38], 20)])
        logits = runner.step(
            [0, far, 1, 1, 1], [a[38], d[19], b[26], b[27], b[28]], [38, 19, 26, 27, 28], [PrefillChunk(2, c, 0)],
            every_row=True,
        ).float()  # fmt: skip
        wanted = torch.cat([expected[0][38:39], expected[3][19:20], expected[1][26:29], expected[2]])
        assert (logits - wanted).abs().max() < 0.05
        assert (logits.argmax(-1) == wanted.argmax(-1)).float().mean() > 0.95
        assert runner.last_hidden.shape == (len(wanted), model.config.hidden_size)


@pytest.mark.parametrize("model_type, extra", [("gemma2", {"sliding_window": WINDOW}), ("olmo2", {})])
def test_their_gptq_checkpoints_step_on_the_workers_kernel_as_gptqmodel_computes_them(
    model_type, extra, settings, model_dir, tmp_path
):
    """A GPTQ checkpoint of a type only this runner steps: its 4-bit layers on the worker's block kernel, against
    the forward of the same checkpoint on gptqmodel's kernel."""
    dense = tiny_model(model_type, **extra)
    path = Path(save_tiny(dense, tmp_path, settings.dense_model_dir(MODEL)))
    random_model.write_gptq(dense, path)  # each weight rounded to its group's 4-bit grid
    theirs = model_loader.load(path, ModelSpec(path=path, quantization="gptq", cpu_kernel="aten"), CPU).model
    ours = model_loader.load(path, ModelSpec(path=path, quantization="gptq"), CPU).model
    if cpu_kernels.available():
        assert any(isinstance(module, BlockQuantLinear) for module in ours.modules())
    prompt = torch.randint(0, SHAPE["vocab_size"], (60,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        expected = theirs(torch.tensor([prompt]), use_cache=False).logits[0].float()
    runner = TransformersRunner(ours, slots=1, capacity=128)
    chunks = [PrefillChunk(0, prompt[start : start + 20], start) for start in range(0, 60, 20)]
    logits = torch.cat([runner.step([], [], [], [chunk], every_row=True).float() for chunk in chunks])
    assert (logits - expected).abs().max() < 0.05
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.95


def test_a_copied_prefix_continues_as_the_sequence_it_came_from():
    model = tiny_model("gemma2", sliding_window=WINDOW)
    prompt = list(range(3, 43))
    runner = TransformersRunner(model, slots=2, capacity=128)
    whole = runner.step([], [], [], [PrefillChunk(0, prompt, 0)])
    runner.copy_prefix(0, 1, 30)
    continued = runner.step([], [], [], [PrefillChunk(1, prompt[30:], 30)])
    assert (whole - continued).abs().max() < 0.05


@pytest.mark.parametrize(
    "model_type, extra, reason",
    [
        ("qwen3_next", {}, "keep a state besides keys and values"),
        ("mamba", {}, "keep a state besides keys and values"),
        ("bloom", {}, "attention is not one transformers lets a server replace"),
        ("gpt_oss", {}, "sink logits"),
    ],
)
def test_a_model_it_cannot_step_is_refused_saying_why(model_type, extra, reason):
    with pytest.raises(ModelNotServable, match=reason):
        TransformersRunner(tiny_model(model_type, **extra), slots=1, capacity=64)


@pytest.mark.parametrize(
    "model_type, spec, chosen",
    [
        ("llama", {}, "llmfleet"),
        ("olmo2", {}, "transformers"),
        ("mistral", {"max_context": 512, "implementation": "auto"}, "llmfleet"),
        ("llama", {"implementation": "transformers"}, "transformers"),
    ],
)
def test_auto_takes_the_own_runner_where_it_computes_the_model(model_type, spec, chosen):
    config = tiny_model(model_type).config
    assert runner_choice.choose(config, ModelSpec(**{"max_context": 1024, **spec})) == chosen


def test_a_sliding_window_shorter_than_the_context_goes_to_the_transformers_runner():
    config = tiny_model("mistral", sliding_window=256).config
    assert runner_choice.choose(config, ModelSpec(max_context=512)) == "transformers"


@pytest.mark.parametrize(
    "model_type, extra, spec, reason",
    [
        ("olmo2", {}, {"implementation": "llmfleet"}, "own runner cannot serve this model: its model type 'olmo2'"),
        ("olmo2", {}, {"lora_modules": {"tuned": "/adapters/tuned"}}, "LoRA adapters are served by the worker's own"),
        ("phi3", LONGROPE_PHI3, {"max_context": 2048}, "longrope angles change past 1024"),
        ("llama", {}, {"max_context": 8192}, "its positions go to 4096"),
    ],
)  # fmt: skip
def test_neither_runner_serves_what_it_would_compute_otherwise(model_type, extra, spec, reason):
    config = tiny_model(model_type, **extra).config
    with pytest.raises(ModelNotServable, match=reason):
        runner_choice.choose(config, ModelSpec(**{"max_context": 1024, **spec}))


def test_the_default_model_steps_as_on_the_own_runner(loaded_model):
    """The real GPTQ model (its 4-bit layers on the worker's kernel) through the transformers runner: the same next
    token after each position of a prompt as the own runner gives."""
    prompt = loaded_model.tokenizer("The capital of France is Paris, and the capital of Italy is")["input_ids"]
    chunk = PrefillChunk(0, prompt, 0)
    own = LlamaRunner(loaded_model.model, slots=1, capacity=128).step([], [], [], [chunk], every_row=True)
    attention = loaded_model.model.config._attn_implementation
    try:
        stepped = TransformersRunner(loaded_model.model, slots=1, capacity=128).step(
            [], [], [], [chunk], every_row=True
        )
    finally:
        loaded_model.model.set_attn_implementation(attention)  # the session's model, for the tests after
    assert (own.argmax(-1) == stepped.argmax(-1)).float().mean() > 0.9


def test_a_gemma2_checkpoint_and_the_default_model_are_served_through_the_gateway(fleet, settings, model_dir, tmp_path):
    """A tiny Gemma 2 (windows of 16 positions, soft-capped scores) by auto, and the default model with its
    implementation set to transformers, each by a worker of its own behind one gateway: greedy answers, whole and
    streamed alike, the default model's the capital of France."""
    gemma = save_tiny(tiny_model("gemma2", vocab_size=49152, sliding_window=WINDOW), tmp_path / "gemma2",
                      settings.dense_model_dir(MODEL))  # fmt: skip
    models = json.dumps({
        "tiny-gemma2": {"path": gemma, "quantization": "none", "max_context": 1024},
        "smollm2-transformers": {"path": str(model_dir), "implementation": "transformers", "max_context": 2048},
    })  # fmt: skip
    workers = [fleet.worker(name, LLMFLEET_MODELS=models) for name in ("tiny-gemma2", "smollm2-transformers")]
    gateway = fleet.gateway(LLMFLEET_MODELS=models)
    try:
        client = openai.OpenAI(
            base_url=f"{gateway.url}/v1", api_key=create_api_key(fleet.redis_server), max_retries=0, timeout=120
        )
        messages = [{"role": "user", "content": FRANCE_QUESTION}]
        for model in ("tiny-gemma2", "smollm2-transformers"):
            reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24)
            stream = client.chat.completions.create(
                model=model, messages=messages, temperature=0, max_tokens=24, stream=True
            )
            streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert reply.usage.completion_tokens > 0 and streamed == reply.choices[0].message.content
        assert "Paris" in reply.choices[0].message.content
    finally:
        for worker in workers:
            worker.stop()
        gateway.stop()
