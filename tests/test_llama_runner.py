"""Our forward step over the slot KV cache computes what transformers' own generate computes."""

from __future__ import annotations

import torch

from worker.llama_runner import LlamaRunner, PrefillChunk


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


def test_greedy_tokens_match_transformers_generate(loaded_model):
    prompt = chat_ids(loaded_model.tokenizer, "What is the capital of France?")
    expected = loaded_model.model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt) :]
    runner = LlamaRunner(loaded_model.model, slots=2, capacity=256)
    assert greedy(runner, prompt, 8, chunk=len(prompt)) == expected.tolist()


def test_chunked_prefill_gives_the_same_tokens(loaded_model):
    prompt = chat_ids(loaded_model.tokenizer, "Describe a sunny day at the beach in two sentences.")
    runner = LlamaRunner(loaded_model.model, slots=2, capacity=256)
    whole = greedy(runner, prompt, 8, chunk=len(prompt), slot=0)
    # 16: a chunk size the GPTQ kernel handles with the same arithmetic as the whole prompt, so any difference
    # would come from our chunk bookkeeping (odd row counts round differently in bf16, a numeric not logic effect).
    assert greedy(runner, prompt, 8, chunk=16, slot=1) == whole


def test_a_sequence_in_a_higher_slot_is_unaffected_by_an_empty_lower_slot(loaded_model):
    prompt = chat_ids(loaded_model.tokenizer, "Name a planet.")
    runner = LlamaRunner(loaded_model.model, slots=4, capacity=128)
    assert greedy(runner, prompt, 6, chunk=64, slot=3) == greedy(runner, prompt, 6, chunk=64, slot=0)
