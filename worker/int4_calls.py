"""A layer's 4-bit projections as direct kernel calls, the ones that read the same input fused into one.

The CPU kernels of the default model (worker.gguf_grid) pack output rows independently (gptqmodel's ATen
`TorchAtenLinear` each row, worker.block_quant each block of 32), so the packed weights of q/k/v, or of gate/up,
concatenate into one matrix whose product is bitwise the product of the separate calls. One call instead of three
(two), and none of the module's per-call Python, saves ~160 us per layer at one sequence on ATen (q/k/v 127 -> 50
us, gate/up 177 -> 96 us), ~5 ms a decode step. Where the layers are another kernel (CUDA, gptqmodel's AVX512-BF16
one), `ModuleCalls` calls the modules.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker import cpu_kernels
from worker.block_quant import BlockQuantLinear, TileRows


def _plain_aten_int4(module: torch.nn.Module) -> bool:
    return (
        type(module).__name__ == "TorchAtenLinear"
        and module.bias is None
        and not module.adapter
        and module.qweight.device.type == "cpu"
        and module._ret_idx_is_identity()
    )


class Int4Call:
    """x -> the outputs of `modules` side by side ([tokens, sum of out_features]), in one kernel call."""

    def __init__(self, modules: list[torch.nn.Module], dtype: torch.dtype):
        for module in modules:
            module.transform_cpu(dtype=dtype)  # a no-op where the module already did it
        self.group_size = modules[0].group_size
        self.weight = torch.cat([m.qweight for m in modules])
        self.scales_and_zeros = torch.cat([m.scales_and_zeros for m in modules], dim=1).contiguous()
        start = 0
        for module in modules:
            module.qweight = self.weight[start : start + module.out_features]  # the modules keep working, on its memory
            start += module.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, self.scales_and_zeros)


def projection_groups(layer: torch.nn.Module) -> list[list[torch.nn.Module]]:
    """A decoder layer's projections by the input they read: q/k/v, o, gate/up, down (Phi-3 has q/k/v and gate/up
    fused already, in that order)."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = [attn.qkv_proj] if hasattr(attn, "qkv_proj") else [attn.q_proj, attn.k_proj, attn.v_proj]
    gate_up = [mlp.gate_up_proj] if hasattr(mlp, "gate_up_proj") else [mlp.gate_proj, mlp.up_proj]
    return [qkv, [attn.o_proj], gate_up, [mlp.down_proj]]


def _gated_activation(mlp: torch.nn.Module, cpu_bf16: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """[tokens, gate | up] -> act(gate) * up: one kernel call for silu in bf16 where worker.cpu_kernels runs."""
    act = getattr(mlp, "act_fn", None) or mlp.activation_fn  # Phi-3's name
    if type(act).__name__ in ("SiLU", "SiLUActivation") and cpu_bf16 and cpu_kernels.available():
        return cpu_kernels.op("silu_mul")

    def gated(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return act(gate) * up

    return gated


class LayerCalls:
    """One decoder layer's projections: q/k/v fused, o, gate/up fused, down; each a function of a contiguous
    [tokens, in_features] x."""

    def __init__(self, layer: torch.nn.Module, dtype: torch.dtype, tile_rows: TileRows | None = None):
        groups = projection_groups(layer)
        self.products: list[BlockQuantLinear] | None = None
        """q/k/v, o, gate/up and down on the worker's own kernel (worker.llama_runner's layer chain reads them)."""
        if isinstance(groups[0][0], BlockQuantLinear):
            self.products = [BlockQuantLinear.concat(modules) for modules in groups]
            calls = [product.rows_call(tile_rows) for product in self.products]
        else:
            calls = [Int4Call(modules, dtype) for modules in groups]
        self.qkv, self.o, self.gate_up, self.down = calls
        self.gated = _gated_activation(layer.mlp, cpu_bf16=dtype == torch.bfloat16)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gated(self.gate_up(x)))

    @staticmethod
    def usable(layer: torch.nn.Module) -> bool:
        projections = [p for group in projection_groups(layer) for p in group]
        own = all(isinstance(p, BlockQuantLinear) for p in projections)
        return own or all(_plain_aten_int4(p) for p in projections)


def _side_by_side(modules: list[torch.nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    return modules[0] if len(modules) == 1 else lambda x: torch.cat([m(x) for m in modules], dim=-1)


class ModuleCalls:
    """LayerCalls' interface over the layer's own modules, whatever their kernel."""

    def __init__(self, layer: torch.nn.Module):
        qkv, (self.o,), gate_up, (self.down,) = projection_groups(layer)
        self.qkv, self.gate_up = _side_by_side(qkv), _side_by_side(gate_up)
        self.gated = _gated_activation(layer.mlp, cpu_bf16=False)  # the modules may be on a GPU
        self.mlp = layer.mlp


def layer_calls(layer: torch.nn.Module, dtype: torch.dtype, tile_rows: TileRows) -> LayerCalls | ModuleCalls:
    return LayerCalls(layer, dtype, tile_rows) if LayerCalls.usable(layer) else ModuleCalls(layer)
