"""Llama models of a named size with random weights, for speed runs where no real checkpoint of that size can be
fetched (a GPU machine reaches no hub): the bf16 checkpoint, and a GPTQ 4-bit one (symmetric, group 128, the layout
gptqmodel's CUDA kernels take) rounded from it to the nearest grid point. The tokenizer is the default model's, so
any prompt tokenizes; what the model answers is noise, so runs force the output length.

    python -m loadtest.random_model llama-1b /tmp/models/llama-1b [--gptq]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# Llama 3.2 1B and Llama 3.1 8B shapes (rotary embedding plain: the worker's runner implements the default rope),
# and a tiny one for tests.
SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
}  # fmt: skip
GROUP = 128
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj")


def default_tokenizer_dir() -> Path:
    from shared.settings import DEFAULT_MODEL, Settings

    return Settings().dense_model_dir(DEFAULT_MODEL)


@torch.no_grad()
def build(shape: str, out: Path, tokenizer_dir: Path, gptq: bool = False, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        **SHAPES[shape], vocab_size=len(tokenizer), max_position_embeddings=8192, rope_theta=500000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if gptq:
        write_gptq(model, out)
    return out


def write_gptq(model: torch.nn.Module, out: Path) -> None:
    """Replace the checkpoint's linear layers by their GPTQ (v1) tensors, each weight rounded to the nearest point of
    its group's symmetric 4-bit grid."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(out / "model.safetensors")
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in _PROJECTIONS:
            del tensors[f"{name}.weight"]
            tensors.update({f"{name}.{k}": v.cpu() for k, v in gptq_tensors(module.weight).items()})
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq", "pack_dtype": "int32",
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))


def gptq_tensors(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """weight [out, in] -> qweight int32 [in / 8, out], qzeros int32 [in / GROUP, out / 8] (each zero 8, stored as 7
    as v1 stores zero - 1), scales float16 [in / GROUP, out], g_idx int32 [in]."""
    out_features, in_features = weight.shape
    groups = weight.float().t().reshape(in_features // GROUP, GROUP, out_features)
    scales = (groups.abs().amax(dim=1, keepdim=True) / 7.5).clamp(min=1e-8).half()
    codes = (groups / scales.float()).round().add(8).clamp(0, 15).to(torch.int32).reshape(in_features, out_features)
    zeros = torch.full((in_features // GROUP, out_features), 7, dtype=torch.int32, device=weight.device)
    return {
        "qweight": _pack(codes),
        "qzeros": _pack(zeros.t()).t().contiguous(),
        "scales": scales.squeeze(1).contiguous(),
        "g_idx": torch.arange(in_features, dtype=torch.int32, device=weight.device) // GROUP,
    }


def _pack(values: torch.Tensor) -> torch.Tensor:
    """int32 [n, cols] of 0..15 -> [n / 8, cols]: value 8r + k of a column in bits 4k of row r."""
    v = values.reshape(-1, 8, values.shape[1])
    packed = torch.zeros(v.shape[0], v.shape[2], dtype=torch.int32, device=v.device)
    for k in range(8):
        packed |= v[:, k] << (4 * k)
    return packed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.random_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--gptq", action="store_true", help="also write its 4-bit form (GPTQ, g128, symmetric)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: the default model's")
    args = parser.parse_args(argv)
    print(build(args.shape, args.out, args.tokenizer or default_tokenizer_dir(), args.gptq))


if __name__ == "__main__":
    main()
