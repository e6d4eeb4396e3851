"""LoRA adapters served beside their base model (vLLM's --lora-modules, TGI's adapter_id): PEFT adapter directories
(adapter_config.json, adapter_model.safetensors) loaded when the worker starts. A request that names an adapter gets
the base model's projections plus the adapter's low-rank updates; rows of other adapters, and of none, share the step.

Each layer's updates are held by the projection groups the runner calls (worker.int4_calls.projection_groups: q/k/v,
o, gate/up, down): A stacked over the group's targeted projections [ranks, in], B block-diagonal over them [out,
ranks] with the scale (alpha / r) folded in, zeros where a projection is not targeted, so one group is two matmuls."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from worker.int4_calls import projection_groups


class AdapterNotServable(ValueError):
    pass


@dataclass(frozen=True)
class Update:
    a: torch.Tensor
    """[ranks, in_features]"""
    b: torch.Tensor
    """[out_features of the group, ranks], scaled"""


@dataclass(frozen=True)
class Adapter:
    name: str
    layers: list[dict[int, Update]]
    """Per layer: projection group (0 q/k/v, 1 o, 2 gate/up, 3 down) -> its update."""


_UNSUPPORTED = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out weights", "modules_to_save": "modules_to_save"}


def load(name: str, path: Path, model: torch.nn.Module) -> Adapter:
    """The adapter at `path` for `model`; AdapterNotServable, saying why, where it changes anything but the layers'
    projections or is not plain LoRA."""
    from safetensors.torch import load_file

    def refuse(why: str) -> AdapterNotServable:
        return AdapterNotServable(f"the worker cannot serve the adapter {name!r} ({path}): {why}")

    try:
        config = json.loads((path / "adapter_config.json").read_text())
        tensors = load_file(path / "adapter_model.safetensors")
    except (OSError, ValueError) as exc:
        raise refuse(f"its files do not read ({exc})") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise refuse(f"its type is {config['peft_type']}, not LORA")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise refuse(f"it uses {what}")
    if config.get("bias", "none") != "none":
        raise refuse("it trains biases")
    names = {module: module_name for module_name, module in model.named_modules()}
    where = {}  # module name -> (layer, group, first output row)
    for number, layer in enumerate(model.model.layers):
        for group, modules in enumerate(projection_groups(layer)):
            row = 0
            for module in modules:
                where[names[module]] = (number, group, row)
                row += module.out_features
    updates: dict[tuple[int, int], list[tuple[int, torch.Tensor, torch.Tensor, float]]] = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise refuse(f"it holds {key}, not a LoRA projection update")
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        if module not in where:
            raise refuse(f"it updates {module}, which is not one of the layers' projections")
        a, b = tensors[key], tensors[key.replace(".lora_A.", ".lora_B.")]
        rank = a.shape[0]
        patterns = config.get("alpha_pattern") or {}
        alpha = next((v for k, v in patterns.items() if module.endswith(k)), config["lora_alpha"])
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        number, group, row = where[module]
        updates.setdefault((number, group), []).append((row, a, b, scale))
    layers: list[dict[int, Update]] = [{} for _ in model.model.layers]
    dtype, device = model.dtype, model.device
    for (number, group), parts in updates.items():
        out_features = sum(m.out_features for m in projection_groups(model.model.layers[number])[group])
        ranks = sum(a.shape[0] for _, a, _, _ in parts)
        stacked_b = torch.zeros(out_features, ranks)
        at = 0
        for row, a, b, scale in parts:
            stacked_b[row : row + b.shape[0], at : at + a.shape[0]] = b.float() * scale
            at += a.shape[0]
        stacked_a = torch.cat([a.float() for _, a, _, _ in parts])
        layers[number][group] = Update(*(t.to(device=device, dtype=dtype) for t in (stacked_a, stacked_b)))
    return Adapter(name, layers)


class AdapterRows:
    """The rows of a step that take each adapter."""

    def __init__(self, adapters: list[Adapter | None]):
        self.adapters = adapters
        rows: dict[str, list[int]] = {}
        named: dict[str, Adapter] = {}
        for row, adapter in enumerate(adapters):
            if adapter is not None:
                rows.setdefault(adapter.name, []).append(row)
                named[adapter.name] = adapter
        self.groups = [(named[name], torch.tensor(taken)) for name, taken in rows.items()]

    def __bool__(self) -> bool:
        return bool(self.groups)

    def subset(self, rows: torch.Tensor) -> AdapterRows:
        return AdapterRows([self.adapters[i] for i in rows.tolist()])

    def add(self, out: torch.Tensor, x: torch.Tensor, layer: int, group: int) -> torch.Tensor:
        """`out`, a projection group's product of x, plus each row's adapter update."""
        for adapter, rows in self.groups:
            update = adapter.layers[layer].get(group)
            if update is not None:
                rows = rows.to(x.device)
                out = out.index_add(0, rows, (x.index_select(0, rows) @ update.a.t() @ update.b.t()).to(out.dtype))
        return out
