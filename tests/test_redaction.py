"""No secret in the logs, in any form: the formatters redact the message, every field value
(recursively) and the exception text BEFORE serialising, so JSON escaping cannot hide a secret
from the redaction; and a message cut short somewhere before it was logged leaves no usable
part of a secret behind."""

from __future__ import annotations

import io
import json
import logging
import re
import urllib.parse

import pytest

import exits
import logs
from harness import ASSEMBLYAI_KEY, WorkerProcess, worker_env

# A quote, a backslash and a non-ASCII character: json.dumps escapes all three.
SECRET = 'sk-"quoted\\back\u00e9slash-' + "Vb3q" * 6
KEY = "aai-" + "Zt9w" * 8


def forms(secret: str) -> list[str]:
    """How a secret can appear in output: as is, JSON-escaped (ASCII or not), repr-escaped,
    URL-encoded; and any 8 consecutive characters of each (a cut secret)."""
    whole = {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1], repr(secret)[1:-1],
             urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret, safe="")}
    return sorted(whole)


def leaks(output: str, secret: str) -> list[str]:
    """Every run of 8 characters of any form of ``secret`` found in ``output``."""
    found = []
    for form in forms(secret):
        for i in range(len(form) - 7):
            if form[i:i + 8] in output:
                found.append(form[i:i + 8])
    return found


@pytest.fixture(params=["text", "json"])
def logged(request):
    """A logger wired like the worker's (setup_logging's handler, filter and formatter),
    and what it wrote."""
    ctx = logs.LogContext([SECRET, KEY])
    ctx.fields["room"] = "r1"
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(ctx)
    handler.setFormatter(logs.JsonFormatter(ctx) if request.param == "json" else logs.TextFormatter(ctx))
    logger = logging.getLogger(f"redaction-test-{request.param}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield request.param, logger, buf, ctx
    logger.handlers.clear()


def lines(fmt: str, buf: io.StringIO) -> list[str]:
    out = buf.getvalue().splitlines()
    if fmt == "json":
        for line in out:
            json.loads(line)  # still one valid JSON object per line
    return out


def test_secrets_with_quotes_backslashes_and_non_ascii_never_reach_the_output(logged):
    fmt, log, buf, _ = logged
    log.info("connecting with %s", SECRET)
    log.info("as JSON: %s", json.dumps({"key": SECRET}))
    log.info("as repr: %r", SECRET)
    log.info("in a URL: wss://host/v1/ws?key=%s&x=1", urllib.parse.quote(SECRET, safe=""))
    log.warning("fields", extra={"fields": {"plain": SECRET, "nested": {"list": [KEY, {"deep": SECRET}], "n": 3},
                                            SECRET: "as a key", "obj": RuntimeError(f"boom {KEY}")}})
    try:
        raise ValueError(f"rejected {SECRET} and {KEY}")
    except ValueError:
        log.exception("with a traceback")
    log.info("stack", stack_info=True)
    out = "\n".join(lines(fmt, buf))
    assert leaks(out, SECRET) == [] and leaks(out, KEY) == [], out
    assert out.count("***") >= 9
    if fmt == "json":
        records = [json.loads(x) for x in lines(fmt, buf)]
        assert records[4]["plain"] == "***" and records[4]["nested"] == {"list": ["***", {"deep": "***"}], "n": 3}
        assert records[4]["obj"] == "boom ***" and records[5]["exc"].endswith("ValueError: rejected *** and ***")
        assert all(r["room"] == "r1" for r in records)


def test_a_message_cut_before_it_was_logged_leaves_no_part_of_a_secret(logged):
    """logs.one_line() keeps 200 characters of an exception's text: the cut can fall inside
    a secret. Whatever is left of it (8 characters or more) is removed."""
    fmt, log, buf, ctx = logged
    for keep in (8, 9, 15, len(SECRET) - 1):
        cut = logs.one_line(RuntimeError("x" * (200 - keep) + SECRET + " tail"))
        assert cut.endswith(SECRET[:keep]) and len(cut) == 200
        log.warning("cannot reach the Voice Agent API: %s", cut)
    # A JSON payload cut short: its escaped form of the secret is cut.
    log.info("payload: %s", json.dumps({"k": SECRET})[:20])
    out = "\n".join(lines(fmt, buf))
    assert leaks(out, SECRET) == [], out
    # The helpers for code that cuts: redact first, then cut.
    assert ctx.clip("ab " + SECRET, 12) == "ab ***"
    assert ctx.one_line(RuntimeError("y" * 195 + SECRET)) == "y" * 195 + "***"


def test_short_values_and_ordinary_text_are_left_alone(logged):
    fmt, log, buf, ctx = logged
    log.info("session %s ready in %d ms", "sess_123", 42, extra={"fields": {"latency_ms": 42, "ok": True}})
    out = lines(fmt, buf)[0]
    assert "sess_123" in out and "42" in out and "***" not in out
    assert logs.LogContext(["abc"]).redact("abc abc") == "abc abc"  # too short to be a secret


@pytest.mark.e2e
@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_a_rejected_token_is_not_logged_even_in_part(livekit_server, room_name, tmp_path, fmt):
    """The server answers a bad token with '401 ... invalid token: <the token>', and the worker
    cuts that error to 200 characters for its fatal line: before this fix, the token's first 100
    characters were printed. The wrong secret here has the characters JSON escapes."""
    env = worker_env(livekit_server, "ws://127.0.0.1:9/v1/ws", room_name, LIVEKIT_API_SECRET=SECRET,
                     LOG_FORMAT=fmt, AMBIENT_SOUND="none")
    proc = WorkerProcess(env, tmp_path / "w").start()
    try:
        assert await proc.wait_exit(30) == exits.EXIT_LIVEKIT_AUTH, proc.output()
    finally:
        proc.kill()
    out = proc.output()
    assert "rejected LIVEKIT_API_KEY/LIVEKIT_API_SECRET" in out
    assert "invalid token: ***" in out, "the server's answer changed: check what this test covers"
    # A LiveKit token is a JWT: base64 of '{"alg"...' starts with eyJ.
    assert not re.search(r"eyJ[A-Za-z0-9_-]{5}", out), out[-3000:]
    assert leaks(out, SECRET) == [] and leaks(out, ASSEMBLYAI_KEY) == [], out[-3000:]
    if fmt == "json":
        for line in out.splitlines():
            if line.strip():
                json.loads(line)


def test_strings_from_outside_cannot_colour_the_terminal_or_forge_a_line(logged):
    """A room name, an identity, a chat text or an API error can hold ANSI escapes and line
    breaks: every text line escapes them (JSON escapes them anyway), whatever the call site
    did; a traceback keeps its lines."""
    fmt, log, buf, _ = logged
    evil = "\x1b[31mEVIL\x1b[0m\nFAKE-LOG-LINE\r\u2028\x85\x07"
    log.info("room %s joined by %r", evil, evil, extra={"fields": {"identity": evil}})
    try:
        raise ValueError(evil)
    except ValueError as e:
        log.warning("call failed: %s", e, exc_info=e)
    out = lines(fmt, buf)
    raw = [c for c in buf.getvalue() if (ord(c) < 32 and c != "\n") or 0x7f <= ord(c) <= 0x9f or c in "\u2028\u2029"]
    assert not raw, f"raw control characters in the {fmt} log: {raw!r}"
    assert not any(line.startswith("FAKE-LOG-LINE") for line in out), out
    if fmt == "text":
        assert "\\x1b[31mEVIL\\x1b[0m\\nFAKE-LOG-LINE" in out[0], out[0]
        assert out[1].endswith("call failed: \\x1b[31mEVIL\\x1b[0m\\nFAKE-LOG-LINE\\r\\u2028\\x85\\x07")
        assert out[2] == "Traceback (most recent call last):", out
