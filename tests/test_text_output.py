"""Incremental text with stop strings: nothing after a stop, and nothing that could still become one."""

from __future__ import annotations

from worker.text_output import TextOutput


def feed(
    tokenizer, text: str, stop: list[str], min_tokens: int = 0, include_stop: bool = False
) -> tuple[list[str], TextOutput]:
    output = TextOutput(tokenizer, stop, min_tokens, include_stop=include_stop)
    deltas = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        deltas.append(output.add(token))
        if output.stopped:
            break
    deltas.append(output.finish())
    return deltas, output


def test_text_arrives_whole_without_stop_strings(loaded_model):
    text = "Héllo wörld, naïve café — 東京 🙂 done."
    deltas, output = feed(loaded_model.tokenizer, text, [])
    assert "".join(deltas) == text == output.text
    assert not any("\ufffd" in d for d in deltas)


def test_stop_string_ends_the_text_before_it(loaded_model):
    deltas, output = feed(loaded_model.tokenizer, "one, two, three, four", ["three"])
    assert output.stopped
    assert "".join(deltas) == output.text == "one, two, "


def test_the_stop_string_stays_when_asked(loaded_model):
    deltas, output = feed(loaded_model.tokenizer, "one, two, three, four", ["three"], include_stop=True)
    assert output.stopped and output.stop_string == "three"
    assert "".join(deltas) == output.text == "one, two, three"


def test_text_that_may_start_a_stop_string_is_held_back(loaded_model):
    output = TextOutput(loaded_model.tokenizer, ["END!"])
    released = ""
    for token in loaded_model.tokenizer("abc EN", add_special_tokens=False)["input_ids"]:
        released += output.add(token)
    assert released == "abc "
    assert output.finish() == "EN"


def test_earliest_of_several_stop_strings_wins(loaded_model):
    _, output = feed(loaded_model.tokenizer, "alpha beta gamma delta", ["delta", "beta"])
    assert output.text == "alpha "


def test_a_stop_string_ends_the_text_only_from_the_min_tokens_th_token_on(loaded_model):
    tokenizer = loaded_model.tokenizer
    before_third = len(tokenizer("one, two", add_special_tokens=False)["input_ids"])
    deltas, output = feed(tokenizer, "one, two, three, four", [","], min_tokens=before_third + 1)
    assert output.stopped and "".join(deltas) == output.text == "one, two"


def test_special_tokens_stay_in_the_text_when_not_skipped(loaded_model):
    tokenizer = loaded_model.tokenizer
    ids = tokenizer("Hi<|im_end|> there", add_special_tokens=False)["input_ids"]
    assert "".join(map(TextOutput(tokenizer, []).add, ids)) == "Hi there"
    kept = TextOutput(tokenizer, [], skip_special_tokens=False)
    assert "".join(map(kept.add, ids)) + kept.finish() == "Hi<|im_end|> there"
