"""The default model's 4-bit layers are the embedded GGUF's own Q4_1 blocks, carried over exactly."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.conftest import MODEL
from worker import cpu_kernels, gguf_grid
from worker.model_store import embedded_gguf_path


def test_q4_1_blocks_decode_as_the_gguf_package_dequantizes():
    tensor = next(t for t in gguf.GGUFReader(embedded_gguf_path()).tensors if t.name == "blk.0.ffn_down.weight")
    codes, d, m = gguf_grid.q4_1_blocks(np.asarray(tensor.data))
    rows = codes.shape[0]
    weights = codes.reshape(rows, -1, gguf_grid.BLOCK) * d[..., None].astype(np.float32) + m[..., None]
    assert np.array_equal(weights.reshape(rows, -1), gguf.quants.dequantize(tensor.data, tensor.tensor_type))


@pytest.fixture(scope="module")
def aten_model(settings, model_dir):
    """The default model served as on a CPU where worker.cpu_kernels does not build: through ATen's int4 kernel."""
    from worker import model_loader

    spec = settings.models[MODEL].model_copy(update={"cpu_kernel": "aten"})
    loaded = model_loader.load(model_dir, spec, torch.device("cpu"))
    assert type(loaded.model.model.layers[0].mlp.down_proj).__name__ == "TorchAtenLinear"
    return loaded


@pytest.mark.parametrize("kernel", ["served", "aten"])
@pytest.mark.parametrize("name", ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.29.mlp.down_proj"])
def test_served_layers_compute_the_dense_checkpoints_weights(request, settings, kernel, name):
    """The dense checkpoint is the GGUF dequantized by transformers (q/k rows in its order). With the zero points
    rounded, as GPTQ stores them, a layer's output is off by 8-14% of its range; with the exact minimums, by under 1%:
    what bf16 rounding of scales and activations costs. `served`: through worker.block_quant where its kernel
    builds."""
    loaded_model = request.getfixturevalue("loaded_model" if kernel == "served" else "aten_model")
    with safe_open(settings.dense_model_dir(MODEL) / "model.safetensors", "pt") as dense:
        weight = dense.get_tensor(f"model.{name}.weight").float()
    x = torch.randn(8, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    exact = x.float() @ weight.T
    served = loaded_model.model.model.get_submodule(name)(x).float()
    assert (served - exact).abs().max() < 0.02 * exact.abs().max()


def test_q8_0_blocks_decode_as_the_gguf_package_dequantizes():
    tensor = next(t for t in gguf.GGUFReader(embedded_gguf_path()).tensors if t.name == "token_embd.weight")
    codes, d = gguf_grid.q8_0_blocks(np.asarray(tensor.data)[:64])
    weights = codes.reshape(64, -1, gguf_grid.BLOCK) * d[..., None].astype(np.float32)
    assert np.array_equal(weights.reshape(64, -1), gguf.quants.dequantize(tensor.data[:64], tensor.tensor_type))


def _kernel_layers():
    """A random Q4_1 layer and a random Q8_0 one, as worker.block_quant serves them, with their float32 weights."""
    from worker import block_quant, cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("the worker's CPU kernels need AVX512 or AVX2")
    rng = np.random.default_rng(0)
    out_features, in_features = 96, 192
    d = rng.uniform(0.001, 0.02, (out_features, in_features // gguf_grid.BLOCK)).astype(np.float16)
    m = rng.uniform(-0.15, 0.0, d.shape).astype(np.float16)
    codes4 = rng.integers(0, 16, (out_features, in_features), dtype=np.uint8)
    tensors = gguf_grid.gptq_tensors(codes4, d, m)
    q4_1 = block_quant.BlockQuantLinear.from_gptq(tensors["qweight"], tensors["scales"], tensors["mins"], 32)
    codes8 = rng.integers(-128, 128, (out_features, in_features), dtype=np.int8)
    packed8 = block_quant.pack(torch.from_numpy(codes8), 8)
    q8_0 = block_quant.BlockQuantLinear(packed8, torch.from_numpy(d.T.copy()), None, 8, gguf_grid.BLOCK)

    def dense(codes, minimums):
        blocks = codes.reshape(out_features, -1, gguf_grid.BLOCK) * d[..., None].astype(np.float32)
        return torch.from_numpy((blocks + minimums[..., None]).reshape(out_features, -1))

    return {"q4_1": (q4_1, dense(codes4, m)), "q8_0": (q8_0, dense(codes8, np.zeros_like(m)))}


@pytest.mark.parametrize(
    "variant",
    [*cpu_kernels.BLOCK_QUANT_OPS, "block_quant_matmul_amx", "block_quant_matmul_rounded", "block_quant_matmul_dense"],
)
@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_block_kernel_computes_the_blocks_exactly_whatever_the_batch(kind, variant):
    """Each of worker.block_quant's kernel variants against the float32 product of the blocks: off by bf16 output
    rounding (and the 16-bit steps of the integer variants' inputs, the bf16 weights of the AVX512 tile ops), and a
    row's bits the same alone, in a few rows or in many."""
    layer, weight = _kernel_layers()[kind]
    if variant not in [*cpu_kernels.block_quant_ops(), *cpu_kernels.tile_ops()]:
        pytest.skip(f"{variant}: not among this CPU's kernels")
    layer.matmul = getattr(torch.ops.llmfleet, variant)
    x = torch.randn(40, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    exact = x.float() @ weight.T
    served = layer(x)
    assert (served.float() - exact).abs().max() < 0.01 * exact.abs().max()
    for rows in (1, 2, 3, 6, 24, 39):
        assert torch.equal(layer(x[:rows]), served[:rows])


def test_fused_layers_compute_as_the_separate_ones_on_one_copy_of_the_blocks():
    from worker.block_quant import BlockQuantLinear

    first, _ = _kernel_layers()["q4_1"]
    second = BlockQuantLinear(first.packed[:64].clone(), first.scales[:2].clone(), first.mins[:2].clone(), 4, 32)
    x = torch.randn(5, first.in_features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    alone = [first(x), second(x)]
    fused = BlockQuantLinear.concat([first, second])
    assert torch.equal(fused(x), torch.cat(alone, dim=1))
    assert torch.equal(first(x), alone[0]) and torch.equal(second(x), alone[1])
    fused_memory = {t.untyped_storage().data_ptr() for t in (fused.packed, fused.scales, fused.mins)}
    for layer in (first, second):
        assert {t.untyped_storage().data_ptr() for t in (layer.packed, layer.scales, layer.mins)} == fused_memory


def test_block_embedding_reads_the_q8_0_rows_exactly():
    from worker.block_quant import BlockQuantEmbedding

    layer, weight = _kernel_layers()["q8_0"]
    ids = torch.tensor([[0, 95, 17], [40, 40, 63]])
    assert torch.equal(BlockQuantEmbedding(layer, torch.float32)(ids), weight[ids])


def test_a_timed_kernel_choice_is_kept_until_the_kernels_change(monkeypatch, tmp_path):
    """worker.cpu_kernels keeps each choice it times (block_quant_op(); tile_op() on AVX2) beside the built kernels,
    with the sources it timed; a variant other than the first serves only when clearly faster."""
    import torch.utils.cpp_extension

    if not cpu_kernels.available():
        pytest.skip("no kernels on this CPU")
    monkeypatch.setattr(torch.utils.cpp_extension, "_get_build_directory", lambda *args, **kwargs: str(tmp_path))
    seconds, timed = {"first": 1.0, "other": 0.95}, []
    monkeypatch.setattr(cpu_kernels, "_block_quant_seconds", lambda name, calls: timed.append(name) or seconds[name])

    def choose() -> str:
        return cpu_kernels._timed_choice("choice", ["first", "other"], ())

    assert choose() == "first" and len(timed) == 4  # two passes; 5% faster is not clearly faster
    assert choose() == "first" and len(timed) == 4  # the record stands
    (tmp_path / "choice").write_text("first " + "0" * 16)  # timed on other sources
    seconds["other"] = 0.5
    assert choose() == "other" and len(timed) == 8


def test_processes_that_choose_at_once_time_the_kernels_once(monkeypatch, tmp_path):
    """Two timing at once would time each other's load: the second waits for the first's record."""
    import threading
    import time

    import torch.utils.cpp_extension

    if not cpu_kernels.available():  # (built where they are kept, before the build directory is patched)
        pytest.skip("no kernels on this CPU")
    monkeypatch.setattr(torch.utils.cpp_extension, "_get_build_directory", lambda *args, **kwargs: str(tmp_path))
    timed = []
    monkeypatch.setattr(
        cpu_kernels, "_block_quant_seconds", lambda name, calls: timed.append(name) or time.sleep(0.05) or 1.0
    )
    chosen = []
    choosers = [
        threading.Thread(target=lambda: chosen.append(cpu_kernels._timed_choice("choice", ["first", "other"], ())))
        for _ in range(2)
    ]
    for thread in choosers:
        thread.start()
    for thread in choosers:
        thread.join()
    assert chosen == ["first", "first"] and len(timed) == 4
