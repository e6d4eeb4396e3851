"""The GGUF's block-quantized weights computed as they are stored, on CPUs where worker.cpu_kernels builds: the linear
layers' Q4_1 blocks (weight = scale * code + min, per group of 32 inputs) and the tied embedding's Q8_0 blocks
(scale * code).

The kernels (worker/kernels/<isa>/block_quant*.cpp): with AVX512-BF16, gptqmodel's AVX512-BF16 GPTQ kernel with each
group's integer zero point replaced by the float minimum, and an 8-bit variant, or the same computed with float32
FMAs or in 16-bit integers (worker.cpu_kernels.block_quant_op() serves the fastest on this CPU); with AVX512-VNNI
but no BF16 (Ice Lake), and with AVX2, the inputs quantized to 16 bits per 32 and dotted with the codes in integers
(vpdpwssd, vpmaddwd), then scaled. ATen's int4 kernel, the fallback for the linear layers (worker.gguf_grid), takes
the minimum only as a bf16 offset and its scales in bf16. One layer's MLP in-process (`python -m
loadtest.engine_steps`), ATen -> this kernel, 1 / 32 / 512 rows: AMD EPYC with AVX512-BF16 0.13 / 1.08 / 16.5 -> 0.08
/ 0.60 / 7.9 ms, at half ATen's error against the float32 product; AMD EPYC (Zen 3) with AVX2 only 0.28 / 2.22 /
34.1 -> 0.14 / 1.31 / 19.3 ms; Ice Lake 0.17 / 1.54 / 27.1 -> 0.12 / 0.78 / 12.0 ms."""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker import cpu_kernels

BLOCK_N = 32  # outputs per packing block


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [out, in] (uint8 0..15 for 4 bits, int8 for 8) -> the kernel's uint8 [out, in * bits / 8]."""
    out_features, in_features = codes.shape
    # [block, half, output in half, input pair, input in pair] -> [block, input pair, half, output in half, input]
    blocks = codes.view(torch.uint8).reshape(out_features // BLOCK_N, 2, 16, in_features // 2, 2).permute(0, 3, 1, 2, 4)
    if bits == 4:
        blocks = blocks[:, :, 0] | (blocks[:, :, 1] << 4)
    return blocks.reshape(out_features, -1).contiguous()


def by_block(scales: torch.Tensor) -> torch.Tensor:
    """Groups' scales (or minimums) float16 [in / group, out], as GGUF stores them -> the kernels' [out / BLOCK_N,
    in / group, BLOCK_N]: a block of outputs' groups side by side (worker/kernels/block_quant_op.h). Already so: as
    is."""
    if scales.dim() == 3:
        return scales
    groups, out_features = scales.shape
    return scales.t().reshape(out_features // BLOCK_N, BLOCK_N, groups).transpose(1, 2).contiguous()


DECODE_TILE_ROWS = 16
"""Rows a step needs before its decoding rows too go to AMX tiles, or, without AMX, before its rows go to the tile op's
vector kernel over weights computed once a call (unless batch invariant): below ~12 rows the exact vector kernels are
faster (AMX, one layer's gate/up projection at 8 / 16 rows: 0.11 / 0.18 ms vector, 0.12 / 0.12 on tiles; Zen 4, the
model's block calls at 8 / 16 rows: 6.7 / 13.1 ms exact, 9.1 / 12.1 rounded)."""


class TileRows:
    """Where the rows of a runner's step that go to the CPU's tile op start (cpu_kernels.tile_op(): the weights computed
    once a call, then every row against them), its decoding rows first, then its prompt chunks' rows; read by
    the step's layer calls.

    On CPUs with AMX, prompt rows are computed on AMX tiles (block_quant_matmul_amx; from ~12 rows on faster than the
    vector kernels, 4x at 512 rows; their attention too, worker.slot_attention.KernelAttention), and so are decoding
    rows when a step decodes DECODE_TILE_ROWS or more or has prompt rows too. On AVX512-BF16 without AMX, all of a
    step's rows go to block_quant_matmul_rounded when it has DECODE_TILE_ROWS or more (10-14% faster from 32 rows, Zen
    4), none when fewer; on AVX2 likewise to block_quant_matmul_dense where it is faster (Zen 1, the model's block calls
    of a step at 16 / 32 / 128 / 256 rows: 69 / 129 / 501 / 986 -> 66 / 116 / 410 / 792 ms). The other rows take the
    exact vector kernels (fastest for a few rows). Batch invariant (the setting `batch.batch_invariant`), decoding rows
    always take the exact vector kernels, and so does every row without AMX: a row's bits then never depend on what else
    is in the step, and prompt rows' never on how the prompt was chunked. On AMX, either way, a token computed as a
    decoding row and the same token computed as a prompt row differ in the last bits."""

    start = 0


class BlockQuantLinear(torch.nn.Module):
    """A linear layer over GGUF blocks: bf16 activations in and out (a bias, Qwen2's q/k/v, added to the product)."""

    def __init__(
        self,
        packed: torch.Tensor,
        scales: torch.Tensor,
        mins: torch.Tensor | None,
        bits: int,
        group: int,
        bias: torch.Tensor | None = None,
    ):
        """scales, mins: float16 [in / group, out] (or already by_block)."""
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales", by_block(scales))  # float16 [out / BLOCK_N, in / group, BLOCK_N]
        self.register_buffer("mins", None if mins is None else by_block(mins))
        self.register_buffer("bias", bias)
        self.bits, self.group_size = bits, group
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 8 // bits
        self.matmul = cpu_kernels.op(cpu_kernels.block_quant_op())

    @classmethod
    def from_gptq(
        cls,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        mins: torch.Tensor,
        group: int,
        bias: torch.Tensor | None = None,
    ) -> BlockQuantLinear:
        """Q4_1 from a GPTQ checkpoint's int32 qweight [in / 8, out] and the groups' float16 scales and minimums."""
        shifts = torch.arange(0, 32, 4, dtype=torch.int32)
        codes = (qweight.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF  # [in / 8, 8, out]
        codes = codes.reshape(-1, qweight.shape[1]).t().to(torch.uint8)
        return cls(pack(codes, 4), scales, mins, 4, group, bias)

    @classmethod
    def from_gptq_module(cls, module: torch.nn.Module) -> BlockQuantLinear | None:
        """A loaded GPTQ layer (gptqmodel's, zero points as it holds them: integers) as Q4_1 blocks, d = scale and
        m = -scale * zero (rounded to float16 where the zero is not a power of two); None where the layer is not one
        the kernel computes (not 4 bits, act-order's permuted groups, a group not a multiple of 32)."""
        if not all(hasattr(module, name) for name in ("qweight", "qzeros", "scales", "g_idx", "bits", "group_size")):
            return None
        group, (in_features, out_features) = module.group_size, (module.in_features, module.out_features)
        if (
            module.bits != 4
            or group % 32
            or in_features % group
            or out_features % BLOCK_N
            or not torch.equal(module.g_idx.cpu(), torch.arange(in_features, dtype=module.g_idx.dtype) // group)
        ):
            return None
        shifts = torch.arange(0, 32, 4, dtype=torch.int32)
        zeros = ((module.qzeros.unsqueeze(2) >> shifts) & 0xF).reshape(module.qzeros.shape[0], -1)  # [groups, out]
        mins = (-module.scales.float() * zeros).to(torch.float16)
        bias = module.bias.to(torch.bfloat16) if getattr(module, "bias", None) is not None else None
        return cls.from_gptq(module.qweight, module.scales, mins, group, bias)

    @classmethod
    def concat(cls, layers: list[BlockQuantLinear]) -> BlockQuantLinear:
        """One layer whose outputs are those of `layers` side by side; the layers keep working, on its memory."""
        fused = cls(
            torch.cat([layer.packed for layer in layers]),
            torch.cat([layer.scales for layer in layers]),
            torch.cat([layer.mins for layer in layers]) if layers[0].mins is not None else None,
            layers[0].bits,
            layers[0].group_size,
            _concat_biases(layers),
        )
        start = 0
        for layer in layers:
            layer.packed = fused.packed[start : start + layer.out_features]
            blocks = slice(start // BLOCK_N, (start + layer.out_features) // BLOCK_N)
            layer.scales = fused.scales[blocks]
            if layer.mins is not None:
                layer.mins = fused.mins[blocks]
            if layer.bias is not None:
                layer.bias = fused.bias[start : start + layer.out_features]
            start += layer.out_features
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        out = self.matmul(rows, self.packed, self.scales, self.mins, self.group_size, self.bits)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def rows_call(self, tile_rows: TileRows | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The product as a plain function of a contiguous [tokens, in_features] x, bound to the weights as they are
        now: none of nn.Module's call machinery and no reshapes, ~5 us less a call (121 calls a decode step). With
        `tile_rows`, where the CPU has a tile op (cpu_kernels.tile_op()), the rows from tile_rows.start on are
        computed by it."""
        matmul, packed, scales, mins, group, bits = (
            self.matmul, self.packed, self.scales, self.mins, self.group_size, self.bits
        )  # fmt: skip
        tile_op = cpu_kernels.tile_op() if tile_rows is not None else None
        if tile_op is None:
            product = lambda x: matmul(x, packed, scales, mins, group, bits)  # noqa: E731
        else:
            tiles = cpu_kernels.op(tile_op)

            def product(x: torch.Tensor) -> torch.Tensor:
                start = tile_rows.start
                if start >= x.shape[0]:
                    return matmul(x, packed, scales, mins, group, bits)
                if start == 0:
                    return tiles(x, packed, scales, mins, group, bits)
                decoding = matmul(x[:start], packed, scales, mins, group, bits)
                return torch.cat([decoding, tiles(x[start:], packed, scales, mins, group, bits)])

        if self.bias is None:
            return product
        bias = self.bias
        return lambda x: product(x).add_(bias)


def _concat_biases(layers: list[BlockQuantLinear]) -> torch.Tensor | None:
    """The fused layer's bias: the layers' side by side (zeros for those without one), None where none has one."""
    if all(layer.bias is None for layer in layers):
        return None
    zeros = [torch.zeros(layer.out_features, dtype=torch.bfloat16) for layer in layers]
    return torch.cat([zero if layer.bias is None else layer.bias for zero, layer in zip(zeros, layers)])


class BlockQuantEmbedding(torch.nn.Module):
    """Rows of a Q8_0 BlockQuantLinear's weight (the tied embedding, read in the output projection's layout)."""

    def __init__(self, weight: BlockQuantLinear, dtype: torch.dtype):
        super().__init__()
        self.weight, self.dtype = weight, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        flat = ids.reshape(-1)
        blocks = w.packed.view(w.out_features // BLOCK_N, w.in_features // 2, 2, 16, 2)
        codes = blocks[flat // BLOCK_N, :, (flat % BLOCK_N) // 16, flat % 16].reshape(-1, w.in_features)
        scales = w.scales[flat // BLOCK_N, :, flat % BLOCK_N].float()  # [tokens, groups]
        rows = codes.view(torch.int8).float().view(len(flat), -1, w.group_size) * scales.unsqueeze(-1)
        return rows.to(self.dtype).view(*ids.shape, w.in_features)
