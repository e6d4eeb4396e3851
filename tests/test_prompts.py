"""The gateway's tokenizers: the ids, text and vocabulary of transformers' AutoTokenizer, without its torch."""

import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from gateway.errors import APIError
from gateway.prompts import PromptTokenizer, bad_words_token_ids, truncated
from gateway.protocol import TemplateOptions
from shared.settings import Settings

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "  Two\tspaces, a tab\n\nlines "}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Ünïcödé, 漢字, emoji 🚀, and <|im_end|> typed as text"},
    ],
    [{"role": "user", "content": ""}],
]
TEXTS = ["Once upon a time", " leading space , odd  spacing .", "<|im_start|>user\nhi<|im_end|>", "naïve café 🚀\n"]


def test_the_gateways_tokenizer_gives_autotokenizers_ids_and_text(model_dir):
    ours, theirs = PromptTokenizer(model_dir), AutoTokenizer.from_pretrained(model_dir)
    for messages in CHATS:
        text = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.chat_ids(messages) == theirs(text, add_special_tokens=False)["input_ids"]
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text) == ids
        assert ours.decode(ids) == theirs.decode(ids)
    assert ours.vocab_size == len(theirs)


def test_the_gateway_and_the_job_runner_load_tokenizers_without_torch(model_dir):
    """transformers' tokenizer classes import torch: ~1 GB in every gateway process for counting tokens."""
    code = (
        "import sys, gateway.app, jobs.worker; from gateway.prompts import Tokenizers; from shared.settings import "
        "DEFAULT_MODEL, Settings; Tokenizers(Settings()).get(DEFAULT_MODEL); print('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_a_template_that_refuses_the_messages_or_no_template_is_a_400(model_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(APIError) as no_template:
        PromptTokenizer(tmp_path).chat_ids(messages)
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(APIError) as refused:
        PromptTokenizer(tmp_path).chat_ids(messages)
    assert no_template.value.status == refused.value.status == 400
    assert "completions" in no_template.value.message and "must alternate" in refused.value.message


def test_template_options_render_as_autotokenizers_do(model_dir):
    ours, theirs = PromptTokenizer(model_dir), AutoTokenizer.from_pretrained(model_dir)
    started = [{"role": "user", "content": "Name a planet."}, {"role": "assistant", "content": "The planet is"}]
    for messages, options in (
        (started, {"continue_final_message": True}),
        (started[:1], {"add_generation_prompt": False}),
    ):
        text = theirs.apply_chat_template(messages, tokenize=False, **options)
        ours_options = TemplateOptions(**{"add_generation_prompt": False, **options})
        assert ours.chat_ids(messages, options=ours_options) == theirs(text, add_special_tokens=False)["input_ids"]
    continued = TemplateOptions(add_generation_prompt=False, continue_final_message=True)
    assert ours.decode(ours.chat_ids(started, options=continued)).endswith("The planet is")


def test_chat_template_kwargs_reach_the_template_but_not_its_own_arguments(model_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    template = "{{ greeting }}{% for m in messages %} {{ m['content'] }}{% endfor %}"
    (tmp_path / "chat_template.jinja").write_text(template)
    ours = PromptTokenizer(tmp_path)
    options = TemplateOptions(chat_template_kwargs={"greeting": "Hello"})
    assert ours.decode(ours.chat_ids([{"role": "user", "content": "there"}], options=options)) == "Hello there"
    with pytest.raises(APIError) as taken:
        TemplateOptions(chat_template_kwargs={"add_generation_prompt": False})
    with pytest.raises(APIError) as both:
        TemplateOptions(continue_final_message=True)
    assert taken.value.status == both.value.status == 400


def test_truncation_keeps_the_prompts_last_tokens_or_what_fits_beside_the_output():
    settings = Settings()
    ids = list(range(100))
    assert truncated(ids, None, 10, 64, settings) == ids
    assert truncated(ids, 5, 10, 64, settings) == ids[-5:]
    assert truncated(ids, -1, 10, 64, settings) == ids[-54:], "room left for max_tokens"
    assert len(truncated(ids, -1, None, 64, settings)) == 64 - min(settings.default_max_tokens, 63)


def test_bad_words_are_tokenized_alone_and_after_a_space(model_dir):
    tokenizer = PromptTokenizer(model_dir)
    found = bad_words_token_ids(tokenizer, ["Paris", " banana", ""])
    assert tokenizer.encode("Paris", special_tokens=False) in found
    assert tokenizer.encode(" Paris", special_tokens=False) in found
    assert tokenizer.encode("banana", special_tokens=False) in found and [] not in found


def test_a_configured_chat_template_replaces_the_models_own_given_as_a_file_or_inline(model_dir, tmp_path):
    inline = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    messages = [{"role": "user", "content": "hi"}]
    expected = PromptTokenizer(model_dir).encode("<user>hi", special_tokens=False)
    assert PromptTokenizer(model_dir, inline).chat_ids(messages) == expected
    (tmp_path / "t.jinja").write_text(inline)
    assert PromptTokenizer(model_dir, str(tmp_path / "t.jinja")).chat_ids(messages) == expected
    with pytest.raises(ValueError, match="neither"):
        PromptTokenizer(model_dir, str(tmp_path / "missing.jinja"))
