"""LoRA adapters served beside their base model (vLLM's --lora-modules, TGI's adapter_id): PEFT adapter directories
(adapter_config.json, adapter_model.safetensors), the configured ones loaded when the worker starts, those loaded at
runtime (gateway.lora_adapters) on the first request that names them. A request that names an adapter gets the base
model's projections plus the adapter's low-rank updates; rows of other adapters, and of none, share the step.

Each layer's updates are held by the projection groups the runner calls (worker.int4_calls.projection_groups: q/k/v,
o, gate/up, down): A stacked over the group's targeted projections [ranks, in], B block-diagonal over them [out,
ranks] with the scale (alpha / r) folded in, zeros where a projection is not targeted, so one group is two matmuls."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.protocol import AdapterSource
from worker.int4_calls import projection_groups


class AdapterNotServable(ValueError):
    pass


@dataclass(frozen=True)
class Update:
    a_t: torch.Tensor
    """A transposed: [in_features, ranks]"""
    b_t: torch.Tensor
    """B transposed, scaled: [ranks, out_features of the group]. Both float32: a CPU's bf16 matmul of a few rows
    costs ~18 us a call against ~3.5 in float32 (a decode step's 120 updates 8 -> ~2 ms, Zen 4)."""


@dataclass(frozen=True)
class Adapter:
    name: str
    layers: list[dict[int, Update]]
    """Per layer: projection group (0 q/k/v, 1 o, 2 gate/up, 3 down) -> its update."""
    key: str
    """What the prefix cache keeps its KV under: its name, and a runtime adapter's revision."""


_UNSUPPORTED = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out weights", "modules_to_save": "modules_to_save"}


def load(name: str, path: Path, model: torch.nn.Module, cache_key: str | None = None) -> Adapter:
    """The adapter at `path` for `model` (`cache_key`: Adapter.key, its name by default); AdapterNotServable, saying
    why, where it changes anything but the layers' projections or is not plain LoRA."""
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
    where = {}  # module name -> (layer, group, first output row, module)
    widths = {}  # (layer, group) -> the group's output features
    for number, layer in enumerate(model.model.layers):
        for group, modules in enumerate(projection_groups(layer)):
            row = 0
            for module in modules:
                where[names[module]] = (number, group, row, module)
                row += module.out_features
            widths[number, group] = row
    patterns = config.get("alpha_pattern") or {}
    updates: dict[tuple[int, int], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for tensor_name in tensors:
        if not tensor_name.endswith((".lora_A.weight", ".lora_B.weight")):
            raise refuse(f"it holds {tensor_name}, not a LoRA projection update")
        if tensor_name.endswith(".lora_B.weight"):
            continue
        name_of = tensor_name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        if name_of not in where:
            raise refuse(f"it updates {name_of}, which is not one of the layers' projections")
        number, group, row, module = where[name_of]
        a, b = tensors[tensor_name], tensors.get(tensor_name.replace(".lora_A.", ".lora_B."))
        rank = a.shape[0]
        if b is None or a.shape[1] != module.in_features or tuple(b.shape) != (module.out_features, rank):
            shape = f"{module.in_features} -> {module.out_features}"
            raise refuse(f"its update of {name_of} does not fit the model's projection ({shape})")
        alpha = next((v for k, v in patterns.items() if name_of.endswith(k)), config["lora_alpha"])
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        updates.setdefault((number, group), []).append((row, a.float(), b.float() * scale))
    layers: list[dict[int, Update]] = [{} for _ in model.model.layers]
    for (number, group), parts in updates.items():
        stacked_b = torch.zeros(widths[number, group], sum(a.shape[0] for _, a, _ in parts))
        at = 0
        for row, a, b in parts:
            stacked_b[row : row + b.shape[0], at : at + a.shape[0]] = b
            at += a.shape[0]
        stacked_a = torch.cat([a for _, a, _ in parts])
        layers[number][group] = Update(*(t.t().contiguous().to(model.device) for t in (stacked_a, stacked_b)))
    return Adapter(name, layers, cache_key or name)


class Adapters:
    """A worker's adapters: its model's configured ones, and those loaded at runtime, each on the first request that
    names it, at most `max_loaded` of them (the least recently used dropped, and loaded again when named)."""

    def __init__(
        self, model_name: str, model: torch.nn.Module | None = None, configured: dict[str, Adapter] | None = None,
        runtime_dir: Path | None = None, max_loaded: int = 8,
    ):  # fmt: skip
        self.model_name, self.model, self.configured = model_name, model, configured or {}
        self.runtime_dir, self.max_loaded = runtime_dir, max_loaded
        self.loaded: OrderedDict[str, Adapter] = OrderedDict()
        """Runtime adapters by revision, the most recently used last."""

    @property
    def served(self) -> bool:
        """Whether the model takes any adapter."""
        return bool(self.configured) or self.runtime_dir is not None

    @property
    def most(self) -> int:
        """Adapters the worker holds at most."""
        return len(self.configured) + (self.max_loaded if self.runtime_dir is not None else 0)

    def get(self, name: str, source: AdapterSource | None) -> Adapter:
        """The adapter a request names; AdapterNotServable, saying why, where the worker cannot serve it."""
        if source is None:
            if name not in self.configured:  # the gateway's settings differ
                why = f"its models.{self.model_name}.lora_modules do not name it"
                raise AdapterNotServable(f"the worker has no LoRA adapter {name!r}: {why}")
            return self.configured[name]
        if source.revision in self.loaded:
            self.loaded.move_to_end(source.revision)
            return self.loaded[source.revision]
        path = Path(source.path).resolve()
        if self.runtime_dir is None or not path.is_relative_to(self.runtime_dir.resolve()):
            where = f"models.{self.model_name}.runtime_lora_dir ({self.runtime_dir})"
            raise AdapterNotServable(f"the worker cannot serve the adapter {name!r}: {path} does not lie under {where}")
        adapter = self.loaded[source.revision] = load(name, path, self.model, cache_key=f"{name}@{source.revision}")
        while len(self.loaded) > self.max_loaded:
            self.loaded.popitem(last=False)
        return adapter

    def keep(self, revisions: set[str]) -> None:
        """Drop the runtime adapters unloaded since they were loaded (running sequences keep theirs to the end)."""
        for revision in [r for r in self.loaded if r not in revisions]:
            del self.loaded[revision]


class AdapterRows:
    """The rows of a step that take each adapter: each adapter's update computed for all of them and masked to its
    own (fewer ops than gathering and scattering its rows; the ranks are small)."""

    def __init__(self, adapters: list[Adapter | None], device: torch.device):
        self.adapters, self.device = adapters, device
        named = {a.name: a for a in adapters if a is not None}
        self.groups = []
        for name, adapter in named.items():
            mine = [a is not None and a.name == name for a in adapters]
            mask = None if all(mine) else torch.tensor(mine, dtype=torch.float32, device=device).unsqueeze(1)
            self.groups.append((adapter, mask))

    def __bool__(self) -> bool:
        return bool(self.groups)

    def subset(self, rows: torch.Tensor) -> AdapterRows:
        return AdapterRows([self.adapters[i] for i in rows.tolist()], self.device)

    def add(self, out: torch.Tensor, x: torch.Tensor, layer: int, group: int) -> torch.Tensor:
        """`out`, a projection group's product of x, plus each row's adapter update."""
        x = x.float()
        for adapter, mask in self.groups:
            update = adapter.layers[layer].get(group)
            if update is not None:
                low = x @ update.a_t
                out = out + ((low if mask is None else low * mask) @ update.b_t).to(out.dtype)
        return out
