"""Logs never hold API keys or personal data, and never the prompt at INFO."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx

from shared.logging import mask_text
from tests.conftest import MODEL
from tests.fleet import wait_until


def test_mask_text_hides_keys_emails_phones_and_cards():
    line = (
        "key llmf-0a1b2c3d4e5f-s3cr3tS3cr3t_x Bearer abc.def sk-abcdefghijkl mail alice.b+x@example.co.uk "
        "card 4111 1111 1111 1111 phone +1 (555) 123-4567 at 2026-01-02 port 127.0.0.1:8000"
    )
    masked = mask_text(line)
    for secret in ("s3cr3tS3cr3t", "abc.def", "abcdefghijkl", "alice", "4111", "555"):
        assert secret not in masked
    assert "llmf-0a1b2c3d4e5f-***" in masked and "2026-01-02" in masked and "127.0.0.1:8000" in masked


def test_the_standard_librarys_records_are_masked_json_lines_too():
    """uvicorn's errors, arq's and httpx's records: they went out as plain text, unmasked."""
    code = """if True:
        import logging
        from shared.logging import configure
        configure("INFO", process="test")
        try:
            raise ValueError("sk-abcdefghijkl")
        except ValueError:
            logging.getLogger("uvicorn.error").exception("Exception in ASGI application for bob@example.org")
        logging.getLogger("arq.worker").debug("below the level")
    """
    stderr = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    (line,) = [json.loads(raw) for raw in stderr.splitlines()]
    assert line["event"] == "Exception in ASGI application for [email]" and line["level"] == "error"
    assert line["logger"] == "uvicorn.error" and line["process"] == "test"
    assert "ValueError: sk-***" in line["exception"] and "abcdefghijkl" not in stderr


def test_gateway_log_lines_hold_no_secret_and_no_prompt(fleet, gateway_url, auth_headers):
    prompt = "Zanzibar note: mail bob@example.org, call +44 20 7946 0958, card 4111-1111-1111-1111."
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "user": "alice.liddell@example.com"}
    assert httpx.post(f"{gateway_url}/v1/completions", json=body, headers=auth_headers, timeout=120).status_code == 200
    wrong = "llmf-0a1b2c3d4e5f-NotTheRealSecretAtAll"
    httpx.get(f"{gateway_url}/v1/models", headers={"Authorization": f"Bearer {wrong}"}, timeout=10)
    log = next(p.log for p in fleet.procs if p.url == gateway_url)
    wait_until(lambda: "NotTheRealSecret" in log.read_text() or "llmf-0a1b2c3d4e5f-***" in log.read_text(), 10, "log")
    text = log.read_text()
    assert "[email]" in text and "llmf-0a1b2c3d4e5f-***" in text  # the lines were written, masked
    api_key = auth_headers["Authorization"].split()[1]
    # bare digit runs like "7946" can occur by chance in hex request ids, so the numbers are matched as written
    leaks = ("alice.liddell", "NotTheRealSecret", api_key, "Zanzibar", "bob@example.org", "7946 0958", "4111-1111")
    for secret in leaks:
        assert secret not in text, secret


def test_every_line_the_fleets_processes_write_is_a_json_record(fleet, http):
    """torch's, transformers' and gptqmodel's own output included (their handlers, progress bars and banner)."""
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1}).status_code == 200
    names = set()
    for proc in fleet.procs:
        names.add(proc.log.name.split("-")[0])
        for raw in proc.log.read_text().splitlines():
            assert isinstance(json.loads(raw), dict), f"{proc.log.name}: {raw!r}"
    assert {"worker", "gateway"} <= names
