"""structlog JSON lines for every process, the standard library's log records included. The request id travels in
the `request_id` field.

Every event passes through `mask_secrets` before it is rendered: API keys, e-mail addresses, phone numbers and
card-like numbers never reach a log line, whatever a caller passed. Prompts are not logged at INFO at all."""

from __future__ import annotations

import logging
import re
import sys

import structlog

_MASKS = [
    # API keys: ours keep their id (not secret, useful to trace), others only a short prefix.
    (re.compile(r"\b(llmf-[0-9a-f]+-)[\w-]+"), r"\1***"),
    (re.compile(r"\b(sk-)[\w-]{8,}"), r"\1***"),
    (re.compile(r"(?i)\b(bearer\s+)\S+"), r"\1***"),
    (re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"), "[email]"),
    # Card-like: 13 to 19 digits, optionally grouped by spaces or dashes.
    (re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])"), "[card]"),
    # Phone-like: 9 to 15 digits with the usual separators, an optional + in front (8 would take dates).
    (re.compile(r"(?<![\w.:-])\+?\(?\d(?:[\s().-]{0,2}\d){8,14}(?![\w-])"), "[phone]"),
]


def mask_text(text: str) -> str:
    for pattern, replacement in _MASKS:
        text = pattern.sub(replacement, text)
    return text


def _mask(value):
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mask(v) for v in value]
    return value


def mask_secrets(_logger, _method: str, event_dict: dict) -> dict:
    """structlog processor; runs before the timestamp is added, so no ISO time is mistaken for a number."""
    return {key: _mask(value) for key, value in event_dict.items()}


def configure(level: str = "INFO", process: str = "llmfleet") -> None:
    """structlog's events and the standard library's records (uvicorn, arq, httpx, ...) alike: masked JSON lines."""
    before_render = [
        structlog.processors.format_exc_info,
        mask_secrets,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *before_render,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            *before_render,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(process=process)
