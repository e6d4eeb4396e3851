"""The GPU benchmark's parts, run on the CPU with a tiny shape: random-weight checkpoints (bf16 and GPTQ 4-bit) that the
worker's loader serves, and the in-process check of the runner against the model's own forward pass."""

import json

import pytest
import torch

from loadtest import gpu_steps, random_model
from shared.settings import ModelSpec


@pytest.fixture(scope="module")
def tiny(model_dir, settings, tmp_path_factory):
    tokenizer = settings.dense_model_dir("SmolLM2-135M-Instruct")
    root = tmp_path_factory.mktemp("random")
    bf16 = random_model.build("tiny", root / "tiny", tokenizer)
    gptq = random_model.build("tiny", root / "tiny-gptq", tokenizer, gptq=True)
    return bf16, gptq


def test_each_weight_lies_within_half_a_step_of_its_4_bit_grid_point():
    weight = torch.randn(64, 256)
    tensors = random_model.gptq_tensors(weight)
    codes = torch.stack([(tensors["qweight"] >> (4 * k)) & 0xF for k in range(8)], dim=1).reshape(256, 64)
    scales = tensors["scales"].float().repeat_interleave(random_model.GROUP, dim=0)
    restored = (codes - 8) * scales
    # Half a step, and a little for the scale's float16 rounding at the group's largest weight.
    assert torch.all((restored - weight.t()).abs() <= scales * 0.51)
    assert torch.all(tensors["qzeros"] == 0x77777777)


@pytest.mark.parametrize("quantization", ["none", "gptq"])
def test_the_runner_on_a_random_checkpoint_matches_its_forward_pass(tiny, quantization):
    path = tiny[quantization == "gptq"]
    assert ("quantization_config" in json.loads((path / "config.json").read_text())) == (quantization == "gptq")
    spec = ModelSpec(path=path, quantization=quantization)
    result = gpu_steps.run(path, spec, torch.device("cpu"), batches=[1, 4], position=64, prefill=32)
    assert result["check"]["max_relative_error"] < 2e-2
    assert result["check"]["greedy_agree"] == result["check"]["steps"]
    assert all(step["ms"] > 0 for step in result["steps"].values())
