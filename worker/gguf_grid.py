"""The embedded GGUF's own 4-bit weights as a GPTQ checkpoint, carried over exactly instead of re-quantized.

The GGUF stores every linear layer as Q4_1: blocks of 32 weights along the input dimension, each weight
`d * code + m` with a 4-bit code and a per-block scale d and minimum m. That is GPTQ's asymmetric group-32
layout, `scale * (code - zero)`, except that GPTQ's zero points are integers and here zero = -m / d is not.
Re-quantizing the dequantized weights with GPTQ loses what rounding the zero points or re-fitting the grid
costs (perplexity x1.47 at best, loadtest/RESULTS.md); carrying the blocks over loses nothing.

So the checkpoint holds the GGUF's codes and scales in GPTQ's format with the zero points rounded (any GPTQ
loader serves it, close to the source), and beside it `GGUF_BLOCKS_FILE` holds every block's exact m, and the tied
embedding's Q8_0 blocks (`d * code`, 8-bit codes; the checkpoint has it dequantized, in bf16). `load_blocks` makes
the loaded layers compute `d * code + m` exactly: where worker.cpu_kernels builds, through worker.block_quant's kernel,
which serves the embedding from its Q8_0 blocks too (a quarter of its bf16 memory); elsewhere through gptqmodel's
ATen int4 kernel (`TorchAtenLinear`, which the worker loads this checkpoint with, worker.model_loader), whose
`scale * (code - 8) + offset` takes a float offset per group. That is on the CPU only: a GPU serves the rounded
zero points (perplexity x1.73 of bf16, measured on the CPU; GPTQ's x1.47 is better there).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

GGUF_BLOCKS_FILE = "gguf_blocks.safetensors"
EMBEDDING = "model.embed_tokens"
BLOCK = 32
_Q4_1_BYTES = 20  # fp16 d, fp16 m, 16 bytes of two codes each
_Q8_0_BYTES = 34  # fp16 d, 32 int8 codes
_LAYERS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
ATEN_BACKEND = "gptq_torch_aten"


def q4_1_blocks(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_1 tensor's bytes [rows, blocks * 20] -> codes uint8 [rows, in], d and m float16 [rows, in / 32]."""
    blocks = raw.reshape(raw.shape[0], -1, _Q4_1_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    packed = blocks[..., 4:]
    codes = np.concatenate([packed & 0xF, packed >> 4], axis=-1)  # code j in the low nibble, j + 16 in the high
    return codes.reshape(raw.shape[0], -1), d, m


def q8_0_blocks(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A Q8_0 tensor's bytes [rows, blocks * 34] -> codes int8 [rows, in], d float16 [rows, in / 32]."""
    blocks = raw.reshape(raw.shape[0], -1, _Q8_0_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    return blocks[..., 2:].copy().view(np.int8).reshape(raw.shape[0], -1), d


def _unpermute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves q/k rows for its rope; transformers' GGUF loader undoes it like this."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).swapaxes(2, 1).reshape(rows.shape)


def _pack_int4(values: np.ndarray) -> np.ndarray:
    """[n, cols] values 0..15 -> int32 [n / 8, cols], value 8r+k of a column in bits 4k of row r (GPTQ's layout)."""
    v = values.astype(np.uint32).reshape(-1, 8, values.shape[1])
    packed = np.zeros((v.shape[0], v.shape[2]), dtype=np.uint32)
    for k in range(8):
        packed |= v[:, k] << np.uint32(4 * k)
    return packed.view(np.int32)


def gptq_tensors(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> dict[str, torch.Tensor]:
    """One layer's GPTQ (v1 format) tensors, zero points rounded, plus its exact minimums as `mins`."""
    in_features = codes.shape[1]
    # v1 stores zero - 1 in a nibble, so zero 0 cannot be stored; the exact m replaces these at load anyway.
    zeros = np.clip(np.rint(-m.astype(np.float32) / d.astype(np.float32)), 1, 15)
    return {
        "qweight": torch.from_numpy(_pack_int4(codes.T)),
        "qzeros": torch.from_numpy(np.ascontiguousarray(_pack_int4(zeros - 1).T)),
        "scales": torch.from_numpy(np.ascontiguousarray(d.T)),
        "g_idx": torch.arange(in_features, dtype=torch.int32) // BLOCK,
        "mins": torch.from_numpy(np.ascontiguousarray(m.T)),
    }


def write_checkpoint(gguf_path: Path, dense: Path, out: Path) -> None:
    """Write into `out` a GPTQ checkpoint of the dense checkpoint `dense` (converted from `gguf_path`, whose
    config, tokenizer and unquantized tensors it takes) with the GGUF's Q4_1 layers, and GGUF_BLOCKS_FILE."""
    import gguf
    from safetensors.torch import load_file, save_file

    config = json.loads((dense / "config.json").read_text())
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors = {k: v for k, v in load_file(dense / "model.safetensors").items() if not _is_linear(k)}
    blocks = {}
    for tensor in gguf.GGUFReader(gguf_path).tensors:
        if tensor.name == "token_embd.weight" and tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            if config.get("tie_word_embeddings"):
                codes, d = q8_0_blocks(np.asarray(tensor.data))
                blocks[f"{EMBEDDING}.codes"] = torch.from_numpy(codes)
                blocks[f"{EMBEDDING}.scales"] = torch.from_numpy(d)
            continue
        parts = tensor.name.split(".")  # blk.N.attn_q.weight
        if parts[0] != "blk" or parts[2] not in _LAYERS:
            continue
        if tensor.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            raise ValueError(f"{tensor.name} is {tensor.tensor_type.name}, not Q4_1")
        codes, d, m = q4_1_blocks(np.asarray(tensor.data))
        if parts[2] in heads:
            codes, d, m = (_unpermute_rows(a, heads[parts[2]]) for a in (codes, d, m))
        name = f"model.layers.{parts[1]}.{_LAYERS[parts[2]]}"
        layer = gptq_tensors(codes, d, m)
        blocks[f"{name}.mins"] = layer.pop("mins")
        tensors.update({f"{name}.{key}": value for key, value in layer.items()})
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    save_file(blocks, out / GGUF_BLOCKS_FILE)
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": BLOCK,
        "desc_act": False,
        "sym": False,
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for item in dense.iterdir():
        if item.name not in ("config.json", "model.safetensors"):
            shutil.copy2(item, out / item.name)


def _is_linear(name: str) -> bool:
    return any(name.endswith(f"{layer}.weight") for layer in _LAYERS.values())


@torch.no_grad()
def load_blocks(model: torch.nn.Module, path: Path, dtype: torch.dtype, own_kernel: bool = True) -> None:
    """Make `model` (loaded from `path` for `dtype` activations) compute the GGUF's blocks exactly: through
    worker.block_quant's kernel where `own_kernel` and it runs here, else the 4-bit layers through ATen's."""
    from gptqmodel.nn_modules.qlinear.torch_fused import pack_scales_and_zeros
    from safetensors import safe_open

    from worker import cpu_kernels
    from worker.block_quant import BlockQuantEmbedding, BlockQuantLinear, pack

    own_kernel = own_kernel and dtype == torch.bfloat16 and cpu_kernels.available()
    with safe_open(path / GGUF_BLOCKS_FILE, "pt") as blocks, safe_open(path / "model.safetensors", "pt") as checkpoint:
        if own_kernel and f"{EMBEDDING}.codes" in blocks.keys():
            codes, scales = blocks.get_tensor(f"{EMBEDDING}.codes"), blocks.get_tensor(f"{EMBEDDING}.scales")
            head = BlockQuantLinear(pack(codes, 8), scales.t(), None, 8, BLOCK)
            model.lm_head = head
            model.model.embed_tokens = BlockQuantEmbedding(head, dtype)
        for key in blocks.keys():
            if not key.endswith(".mins"):
                continue
            mins, name = blocks.get_tensor(key), key.removesuffix(".mins")
            layer = model.get_submodule(name)
            if type(layer).__name__ != "TorchAtenLinear":
                raise RuntimeError(f"{key}: layer {type(layer).__name__} cannot carry float zero points")
            if own_kernel:
                # The scales from the file: the loaded layer holds them converted to the model's dtype.
                scales = checkpoint.get_tensor(f"{name}.scales")
                model.set_submodule(name, BlockQuantLinear.from_gptq(layer.qweight, scales, mins, layer.group_size))
                continue
            layer.transform_cpu(dtype=dtype)
            # ATen: scale * (code - 8) + offset == d * code + m
            offsets = mins.float() + 8 * layer.scales.float()
            layer.qzeros = offsets.to(layer.scales.dtype).contiguous()
            layer.scales_and_zeros = pack_scales_and_zeros(layer.scales, layer.qzeros)
