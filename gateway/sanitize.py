"""What the gateway does to text before it reaches a tokenizer: refuse what is not valid Unicode, normalise to
NFC, strip control characters; then refuse prompts that match the operator's deny-list."""

from __future__ import annotations

import re
import unicodedata

from gateway.errors import APIError

CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
"""Unicode category Cc (C0, DEL, C1) less tab, newline and carriage return."""


def clean_text(text: str) -> str:
    """NFC text without control characters other than tab and newlines; a 400 for lone surrogates (which JSON
    escapes such as \\ud800 can carry, and which no UTF-8 tokenizer can take)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "The request contains text that is not valid Unicode.", code="invalid_encoding") from None
    text = unicodedata.normalize("NFC", text)
    return CONTROLS.sub("", text)


class DenyList:
    """The configured patterns (settings.protection.deny_patterns), compiled once, case-insensitive."""

    def __init__(self, patterns: list[str]):
        self.patterns = [re.compile(p, re.IGNORECASE) for p in patterns]

    def check(self, texts: list[str]) -> None:
        for text in texts:
            if any(p.search(text) for p in self.patterns):
                # Neutral on purpose: naming the pattern would teach a client how to get around it.
                raise APIError(400, "The request was refused by the content policy.", code="content_policy")
