"""The default model's 4-bit layers are the embedded GGUF's own Q4_1 blocks, carried over exactly."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.conftest import MODEL
from worker import gguf_grid
from worker.model_store import embedded_gguf_path


def test_q4_1_blocks_decode_as_the_gguf_package_dequantizes():
    tensor = next(t for t in gguf.GGUFReader(embedded_gguf_path()).tensors if t.name == "blk.0.ffn_down.weight")
    codes, d, m = gguf_grid.q4_1_blocks(np.asarray(tensor.data))
    rows = codes.shape[0]
    weights = codes.reshape(rows, -1, gguf_grid.BLOCK) * d[..., None].astype(np.float32) + m[..., None]
    assert np.array_equal(weights.reshape(rows, -1), gguf.quants.dequantize(tensor.data, tensor.tensor_type))


@pytest.mark.parametrize("name", ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.29.mlp.down_proj"])
def test_served_layers_compute_the_dense_checkpoints_weights(loaded_model, settings, name):
    """The dense checkpoint is the GGUF dequantized by transformers (q/k rows in its order). With the zero points
    rounded, as GPTQ stores them, a layer's output is off by 8-14% of its range; with the exact minimums, by under 1%:
    what bf16 rounding of scales and activations costs."""
    with safe_open(settings.dense_model_dir(MODEL) / "model.safetensors", "pt") as dense:
        weight = dense.get_tensor(f"model.{name}.weight").float()
    x = torch.randn(8, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    exact = x.float() @ weight.T
    served = loaded_model.model.model.get_submodule(name)(x).float()
    assert (served - exact).abs().max() < 0.02 * exact.abs().max()
