"""Our forward step over the slot KV cache computes what transformers' own generate computes."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import FRANCE_QUESTION
from worker import cpu_kernels
from worker.block_quant import DECODE_TILE_ROWS
from worker.int4_calls import LayerCalls
from worker.llama_runner import LlamaRunner, PrefillChunk, add_rms_norm, check_kv_fits, rms_norm

# Attention through worker.cpu_kernels' cached_attention, or through torch matmuls (other CPUs, GPUs).
attention = pytest.mark.parametrize("kernel", [True, False], ids=["kernel-attention", "matmul-attention"])


def make_runner(loaded_model, slots: int, capacity: int, kernel: bool, batch_invariant=False) -> LlamaRunner:
    runner = LlamaRunner(loaded_model.model, slots=slots, capacity=capacity, batch_invariant=batch_invariant)
    if kernel and not runner.attention_kernel:
        pytest.skip("the attention kernel needs a CPU with AVX512 or AVX2")
    runner.attention_kernel = kernel
    if not kernel:
        runner.layer_chain = None  # it attends with the kernel: the matmul cases would not reach the matmul attention
    return runner


def test_the_kernel_set_this_cpu_can_run_builds():
    # Otherwise a kernel that no longer compiles would only show as the kernel cases below being skipped.
    if cpu_kernels.cpu_isa() is None:
        pytest.skip("no kernel set for this CPU")
    assert cpu_kernels.isa() == cpu_kernels.cpu_isa()


def test_every_op_the_worker_calls_directly_binds_to_its_kernel():
    if not cpu_kernels.available():
        pytest.skip("no kernels on this CPU")
    names = [*cpu_kernels.block_quant_ops(), "cached_attention", "rotary_to_cache", "rms_norm", "add_rms_norm"]
    if cpu_kernels.tile_op():
        names.append(cpu_kernels.tile_op())
    if cpu_kernels.amx():
        names.append("prompt_attention_amx")
    for name in names:  # a signature other than the kernel's throws here
        assert callable(cpu_kernels.op(name))
    gate_up = torch.randn(3, 2 * 1536, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert torch.equal(cpu_kernels.op("silu_mul")(gate_up), torch.ops.llmfleet.silu_mul(gate_up))
    with pytest.raises(KeyError):
        cpu_kernels.op("no_such_op")


def chat_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def greedy(runner: LlamaRunner, prompt: list[int], n: int, chunk: int, slot: int = 0) -> list[int]:
    logits = None
    for start in range(0, len(prompt), chunk):
        logits = runner.step([], [], [], [PrefillChunk(slot, prompt[start : start + chunk], start)])
    tokens = [int(logits[-1].argmax())]
    for i in range(n - 1):
        logits = runner.step([slot], [tokens[-1]], [len(prompt) + i], [])
        tokens.append(int(logits[0].argmax()))
    return tokens


@attention
def test_greedy_tokens_match_transformers_generate(loaded_model, kernel):
    prompt = chat_ids(loaded_model.tokenizer, FRANCE_QUESTION)
    expected = loaded_model.model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt) :]
    runner = make_runner(loaded_model, 2, 256, kernel)
    assert greedy(runner, prompt, 8, chunk=len(prompt)) == expected.tolist()


@attention
def test_chunked_prefill_gives_the_same_tokens(loaded_model, kernel):
    """Batch invariant: otherwise, where the CPU has a tile op, the whole prompt's rows take it and the chunks of 7 do
    not, and this prompt's 7th token is a tie of two logits in bf16 that any other rounding decides."""
    prompt = chat_ids(loaded_model.tokenizer, "Describe a sunny day at the beach in two sentences.")
    runner = make_runner(loaded_model, 2, 256, kernel, batch_invariant=True)
    whole = greedy(runner, prompt, 8, chunk=len(prompt), slot=0)
    assert greedy(runner, prompt, 8, chunk=7, slot=1) == whole


@attention
def test_a_prompts_logits_do_not_depend_on_how_it_is_chunked(loaded_model, kernel):
    """Batch invariant, prompt rows (on AMX tiles where the CPU has them) get the same bits in a chunk of 1, 7 or all
    of them: a prompt prefix taken from the cache holds exactly what recomputing it would. (By default, without AMX,
    a chunk of DECODE_TILE_ROWS or more rows takes the CPU's tile op, worker.block_quant.TileRows.)"""
    prompt = chat_ids(loaded_model.tokenizer, "Describe a sunny day at the beach in two sentences.")
    runner = make_runner(loaded_model, 3, 256, kernel, batch_invariant=True)
    last = []
    for slot, chunk in enumerate((len(prompt), 7, 1)):
        for start in range(0, len(prompt), chunk):
            logits = runner.step([], [], [], [PrefillChunk(slot, prompt[start : start + chunk], start)])
        last.append(logits[-1])
    assert torch.equal(last[0], last[1]) and torch.equal(last[0], last[2])


@attention
def test_a_sequence_in_a_higher_slot_is_unaffected_by_an_empty_lower_slot(loaded_model, kernel):
    prompt = chat_ids(loaded_model.tokenizer, "Name a planet.")
    runner = make_runner(loaded_model, 4, 128, kernel)
    assert greedy(runner, prompt, 6, chunk=64, slot=3) == greedy(runner, prompt, 6, chunk=64, slot=0)


@attention
def test_logits_do_not_depend_on_the_rest_of_the_batch(loaded_model, kernel):
    """Batch invariance: a sequence decoded alone, or beside others at other lengths and a prompt chunk, gets
    bit-identical logits (on a CPU with AMX, with batch_invariant only: otherwise the prompt chunk takes the decoding
    rows to AMX tiles with it)."""
    tok = loaded_model.tokenizer
    prompts = [chat_ids(tok, text) for text in ("Name a planet.", "Write a long poem about the sea and the wind.")]
    alone = make_runner(loaded_model, 2, 256, kernel, batch_invariant=True)
    alone.step([], [], [], [PrefillChunk(0, prompts[0], 0)])
    together = make_runner(loaded_model, 2, 256, kernel, batch_invariant=True)
    together.step([], [], [], [PrefillChunk(1, prompts[1], 0), PrefillChunk(0, prompts[0], 0)])
    n = len(prompts[0])
    a = alone.step([0], [42], [n], [])
    b = together.step([0, 1], [42, 99], [n, len(prompts[1])], [PrefillChunk(1, [5, 6, 7], len(prompts[1]) + 1)])
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("batch_invariant", [True, False], ids=["batch-invariant", "default"])
def test_a_sequence_decoded_alone_or_among_many_gets_the_same_token(loaded_model, batch_invariant):
    """Beside DECODE_TILE_ROWS others, decoding rows go to the CPU's tile op where it has one (AMX tiles, or the rounded
    weights on AVX512-BF16, float32 weights on AVX2 where faster), unless batch invariant: then a sequence's logits are
    the same bits alone or among many; otherwise the same greedy token."""
    prompt = chat_ids(loaded_model.tokenizer, "Name a planet.")
    n = DECODE_TILE_ROWS + 1
    runner = LlamaRunner(loaded_model.model, slots=n, capacity=128, batch_invariant=batch_invariant)
    for slot in range(n):
        runner.step([], [], [], [PrefillChunk(slot, prompt, 0)])
    alone = runner.step([0], [42], [len(prompt)], [])[0]
    among_many = runner.step(list(range(n)), [42] * n, [len(prompt)] * n, [])[0]
    if batch_invariant or cpu_kernels.tile_op() is None:
        assert torch.equal(alone, among_many)
    assert alone.argmax() == among_many.argmax()
    assert (alone.float() - among_many.float()).abs().max() < 0.05 * alone.float().abs().max()


def test_fused_int4_calls_give_the_modules_products_bit_for_bit(loaded_model):
    layer = loaded_model.model.model.layers[0]
    assert LayerCalls.usable(layer)  # the default model on a CPU: worker.block_quant layers, or gptqmodel's ATen ones
    x = torch.randn(5, loaded_model.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    x = x.to(torch.bfloat16)
    attn = layer.self_attn
    separate = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
    calls = LayerCalls(layer, torch.bfloat16)
    assert torch.equal(calls.qkv(x), separate)
    mlp = layer.mlp
    assert torch.equal(calls.gate_up(x), torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], dim=-1))
    # silu(gate) * up is one op rounding once where worker.cpu_kernels runs; the module rounds after each op.
    fused, reference = calls.mlp(x).float(), mlp(x).float()
    assert ((fused - reference).abs() <= reference.abs() / 64 + reference.abs().mean() / 16).all()


def test_the_silu_mul_kernel_rounds_the_float32_result_once_row_by_row():
    if not cpu_kernels.available():
        pytest.skip("the silu_mul kernel needs a CPU where worker.cpu_kernels builds")
    gate_up = (torch.randn(33, 2 * 1536, generator=torch.Generator().manual_seed(0)) * 4).to(torch.bfloat16)
    gate, up = gate_up.float().chunk(2, dim=-1)
    fused, reference = torch.ops.llmfleet.silu_mul(gate_up), torch.nn.functional.silu(gate) * up
    assert ((fused.float() - reference).abs() <= reference.abs() / 256 + 1e-30).all()
    assert torch.equal(torch.ops.llmfleet.silu_mul(gate_up[5:6]), fused[5:6])


def test_a_token_decoded_or_prefilled_gets_the_same_logits_with_the_attention_kernel(loaded_model, monkeypatch):
    """The kernel computes a prompt's rows as it computes decoding ones. (With a tile op a step does not: prompt
    rows go to AMX tiles, or many rows to the tile op's weights, worker.block_quant.TileRows; here they take the
    decoding rows' kernels.)"""
    monkeypatch.setattr(cpu_kernels, "amx", lambda: False)
    monkeypatch.setattr(cpu_kernels, "tile_op", lambda: None)
    prompt = chat_ids(loaded_model.tokenizer, "Name a planet.")
    decoded = make_runner(loaded_model, 1, 128, True)
    decoded.step([], [], [], [PrefillChunk(0, prompt[:-1], 0)])
    by_decode = decoded.step([0], [prompt[-1]], [len(prompt) - 1], [])
    by_prefill = make_runner(loaded_model, 1, 128, True).step([], [], [], [PrefillChunk(0, prompt, 0)])
    assert torch.equal(by_decode[0], by_prefill[0])


@pytest.mark.parametrize("group,head_dim", [(3, 64), (1, 128), (2, 64), (4, 64)])
def test_the_attention_kernel_gives_a_row_the_same_bits_alone_or_among_its_prompt_chunks_rows(group, head_dim):
    """The kernel may attend a prompt chunk's rows together (a tile reads their keys once); each row still gets
    what it gets alone, and what softmax attention in float32 gives, to bf16's precision."""
    if not cpu_kernels.available():
        pytest.skip("the attention kernel needs a CPU with AVX512 or AVX2")
    gen = torch.Generator().manual_seed(0)
    n_kv, capacity = 2, 64
    keys, values = (torch.randn(3, n_kv, capacity, head_dim, generator=gen).to(torch.bfloat16) for _ in "kv")
    # Into the caches in the layout this CPU's kernel reads (keys may be stored block by block), rotated by angle 0.
    k_cache, v_cache = torch.empty_like(keys), torch.empty_like(values)
    tokens = keys.permute(0, 2, 1, 3).reshape(-1, n_kv, head_dim)
    qkv = torch.cat([tokens, tokens, values.permute(0, 2, 1, 3).reshape(-1, n_kv, head_dim)], dim=1).contiguous()
    cos = torch.ones(capacity, head_dim, dtype=torch.bfloat16)
    sin = torch.zeros_like(cos)
    cache_slots, positions = torch.arange(3).repeat_interleave(capacity), torch.arange(capacity).repeat(3)
    torch.ops.llmfleet.rotary_to_cache(qkv, n_kv, cos, sin, cache_slots, positions, k_cache, v_cache)
    # A decoding row, a chunk of 7 rows, a decoding row, a chunk of 3 rows in another slot.
    slots = [1] + [0] * 7 + [2] + [1] * 3
    lengths = [40, *range(20, 27), 5, *range(41, 44)]
    q = torch.randn(len(slots), n_kv, group, head_dim, generator=gen).to(torch.bfloat16)
    out = torch.empty_like(q)
    scale = head_dim**-0.5

    def attention(rows: slice, out: torch.Tensor) -> None:
        slot_rows, length_rows = torch.tensor(slots[rows]), torch.tensor(lengths[rows])
        torch.ops.llmfleet.cached_attention(q[rows], k_cache, v_cache, slot_rows, length_rows, scale, out)

    attention(slice(None), out)
    for row, (slot, length) in enumerate(zip(slots, lengths)):
        alone = torch.empty_like(q[row : row + 1])
        attention(slice(row, row + 1), alone)
        assert torch.equal(alone[0], out[row])
        k, v = keys[slot, :, :length].float(), values[slot, :, :length].float()
        weights = torch.softmax(q[row].float() @ k.transpose(1, 2) * scale, dim=-1)
        assert torch.allclose(out[row].float(), weights @ v, atol=2e-2, rtol=2e-2)


def test_the_rms_norm_kernel_computes_the_models_norm_row_by_row(loaded_model):
    """worker.llama_runner.rms_norm: what LlamaRMSNorm computes (up to a bf16 rounding step where the two sums of
    squares round differently), and a row's bits the same alone or among others."""
    module = loaded_model.model.model.layers[3].post_attention_layernorm
    norm = rms_norm(module)
    if norm is module:
        pytest.skip("the rms_norm kernel needs a CPU where worker.cpu_kernels builds")
    x = (torch.randn(33, module.weight.shape[0], generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    fused, reference = norm(x).float(), module(x).float()
    assert ((fused - reference).abs() <= reference.abs() / 64 + 1e-6).all()
    assert (fused == reference).float().mean() > 0.99
    assert torch.equal(norm(x[5:6]), norm(x)[5:6])
    # With the residual update before it: bitwise the add, then the norm.
    delta = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    summed, normed = add_rms_norm(module)(x, delta)
    assert torch.equal(summed, x + delta) and torch.equal(normed, norm(x + delta))


def test_prefault_makes_the_first_positions_of_every_slot_resident(loaded_model):
    import psutil

    runner = LlamaRunner(loaded_model.model, slots=8, capacity=2048)
    expected = 8 * 256 * runner.kv_bytes_per_token
    before = psutil.Process().memory_info().rss
    runner.prefault(256)
    assert psutil.Process().memory_info().rss - before > 0.9 * expected
    assert all(not cache.any() for cache in runner.k_cache)


def test_a_gpu_kv_cache_that_would_not_fit_is_refused_with_the_settings_to_lower(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2**30, 2**31))
    gpu = torch.device("cuda")
    check_kv_fits(2**20, 1024, gpu)  # 1 GiB: fits
    with pytest.raises(MemoryError, match="max_context or batch.max_running"):
        check_kv_fits(2**20, 1025, gpu)
    check_kv_fits(2**40, 1024, torch.device("cpu"))  # mapped on demand: never refused


@pytest.mark.parametrize(
    ("sequences", "batch_invariant"),
    [(2, False), (DECODE_TILE_ROWS + 2, False), (DECODE_TILE_ROWS + 2, True)],
    ids=["vector kernels", "tile op", "batch invariant"],  # on AMX, the last one's mixed step splits its rows
)
def test_a_steps_layers_in_one_call_give_the_bits_of_the_op_by_op_loop(loaded_model, sequences, batch_invariant):
    runner = LlamaRunner(loaded_model.model, slots=sequences + 2, capacity=256, batch_invariant=batch_invariant)
    if runner.layer_chain is None:
        pytest.skip("the layer chain needs the worker's own kernels (AVX512 or AVX2)")
    ids = loaded_model.tokenizer(FRANCE_QUESTION)["input_ids"]
    lengths = [len(ids) - slot % 7 for slot in range(sequences)]
    runner.step([], [], [], [PrefillChunk(slot, ids[:length], 0) for slot, length in enumerate(lengths)])
    decoding = (list(range(sequences)), [7 + slot for slot in range(sequences)], lengths)
    chunks = [PrefillChunk(sequences, ids[:9], 0), PrefillChunk(sequences + 1, ids[:4], 0)]
    for step in ((*decoding, []), (*decoding, chunks), ([], [], [], chunks)):
        chained = runner.step(*step)
        chain, runner.layer_chain = runner.layer_chain, None
        looped = runner.step(*step)
        runner.layer_chain = chain
        assert torch.equal(chained, looped)
