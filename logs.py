"""Logging for both processes: one line per record on stderr, as text or JSON, with the
call's context (room, session id, reply id) and every secret removed before the line is
built; plus the small helpers that keep log lines short and bounded."""

from __future__ import annotations

import collections
import datetime
import json
import logging
import math
import re
import sys
import time
from typing import Any, Callable, Sequence

# Any JSON Web Token (a LiveKit access token), for LogContext(redact_jwts=True).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


class LogContext(logging.Filter):
    """Adds room / session id / reply id to every record, and removes secrets.

    A secret is removed in the forms it is likely to take in a message: as is, escaped as
    JSON or by repr() (quotes, backslashes, non-ASCII), and URL-encoded. A message that was
    cut short somewhere may hold only a secret's beginning: any run of at least
    ``PARTIAL_MIN`` of its leading characters is removed too. Code that shortens text before
    logging or raising it should cut with ``clip()`` / ``one_line()``, which redact first."""

    PARTIAL_MIN = 8
    MAX_ADDED = 32  # secrets added at run time (the agent's tokens, one per join): the newest

    def __init__(self, secrets: Sequence[str] = (), *, redact_jwts: bool = False) -> None:
        super().__init__()
        # The serve host handles tokens it never minted (every job's): it removes any JWT.
        self.redact_jwts = redact_jwts
        self.fields: dict[str, str | None] = {"room": None, "session_id": None, "reply_id": None}
        # The fields a text line shows at its end (JSON lines carry all of them). A call
        # process of the serve mode adds "room": many calls share one log there.
        self.text_fields: tuple[str, ...] = ("session_id", "reply_id")
        # Redacting a 1-3 character "secret" would mangle every line; real ones are long.
        self.secrets = [s for s in dict.fromkeys(secrets) if len(s) >= 6]
        self._added: collections.deque[str] = collections.deque(maxlen=self.MAX_ADDED)
        self._forms: list[str] = []
        self._rebuild()

    def add_secret(self, s: str) -> None:
        if len(s) >= 6 and s not in self.secrets and s not in self._added:
            self._added.append(s)
            self._rebuild()

    def _rebuild(self) -> None:
        from urllib.parse import quote, quote_plus

        forms: set[str] = set()
        for s in (*self.secrets, *self._added):
            forms.update((s, json.dumps(s)[1:-1], json.dumps(s, ensure_ascii=False)[1:-1], repr(s)[1:-1],
                          quote(s, safe=""), quote_plus(s, safe="")))
        self._forms = [f for f in forms if len(f) >= 6]
        heads = {f[:self.PARTIAL_MIN] for f in self._forms}
        self._heads = re.compile("|".join(map(re.escape, sorted(heads)))) if heads else None

    def redact(self, text: str) -> str:
        """``text`` with every form of every secret, whole or its beginning of at least
        PARTIAL_MIN characters, replaced by ***. At each place, the longest match over all
        forms is removed (a cut secret's raw and escaped forms share their beginning)."""
        if self.redact_jwts:
            text = _JWT.sub("***", text)
        if self._heads is None:
            return text
        out: list[str] = []
        i = 0
        while (m := self._heads.search(text, i)) is not None:
            start = m.start()
            end = max((start + _common_prefix(text, start, f) for f in self._forms
                       if text.startswith(f[:self.PARTIAL_MIN], start)), default=m.end())
            out.append(text[i:start])
            out.append("***")
            i = end
        out.append(text[i:])
        return "".join(out)

    def redact_value(self, value: Any) -> Any:
        """A log field's value with secrets removed, recursively; what JSON cannot hold
        becomes its (redacted) str()."""
        if isinstance(value, str):
            return self.redact(value)
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if isinstance(value, dict):
            return {self.redact(str(k)): self.redact_value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [self.redact_value(v) for v in value]
        return self.redact(str(value))

    def clip(self, text: str, limit: int) -> str:
        """``text[:limit]``, redacted BEFORE it is cut (a cut can leave a secret's beginning,
        which no later redaction recognises for sure)."""
        return self.redact(text)[:limit]

    def one_line(self, e: BaseException, limit: int = 200) -> str:
        """An exception's first line, redacted, then cut: the safe ``one_line``."""
        return self.clip((self.redact(str(e)) or type(e).__name__).splitlines()[0], limit)

    def filter(self, record: logging.LogRecord) -> bool:
        for k, v in self.fields.items():
            setattr(record, k, v)
        return True


def _common_prefix(text: str, start: int, form: str) -> int:
    """How many leading characters of ``form`` ``text`` holds from ``start`` on."""
    n = 0
    limit = min(len(form), len(text) - start)
    while n < limit and text[start + n] == form[n]:
        n += 1
    return n


def _redacted_record(ctx: LogContext, formatter: logging.Formatter, record: logging.LogRecord) -> logging.LogRecord:
    """A copy of ``record`` whose message, exception and stack text are redacted: the
    formatters serialise only redacted text."""
    r = logging.makeLogRecord(record.__dict__)
    r.msg, r.args = ctx.redact(record.getMessage()), None
    exc_text = formatter.formatException(record.exc_info) if record.exc_info else record.exc_text
    r.exc_info, r.exc_text = None, ctx.redact(exc_text) if exc_text else None
    r.stack_info = ctx.redact(formatter.formatStack(record.stack_info)) if record.stack_info else None
    return r


# Control characters (C0, DEL, C1) and the Unicode line breaks: with them a room name, an
# identity, a chat text or an API error would colour the operator's terminal (ANSI escapes)
# or forge log lines of its own (a newline).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    return _ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every control character written as an escape (\\n, \\x1b, ...): what
    a text log line or a terminal shows of a string that came from outside. Backslashes stay
    as they are (paths), so an escape is not told apart from the same characters typed."""
    return (_CONTROL_BUT_NEWLINE if keep_newlines else _CONTROL).sub(_escape, text)


class TextFormatter(logging.Formatter):
    """One line per record. The message and the fields are escaped here, once, after the
    arguments are formatted in, so no call site can forget a string from the room or the
    API; a traceback keeps its lines (escaped otherwise)."""

    def __init__(self, ctx: LogContext) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        self.ctx = ctx

    def formatException(self, ei: Any) -> str:
        """The traceback with its own lines, but each of its texts on one line: an exception's
        message (a room name, an API error) cannot start a line of its own."""
        import traceback

        out = []
        for chunk in traceback.TracebackException(*ei).format():
            if chunk.startswith("  File "):  # a frame: the file, the line of code
                out.append(chunk)
                continue
            core = chunk.strip("\n")
            start = chunk.index(core) if core else 0
            out.append(chunk[:start] + escape_controls(core) + chunk[start + len(core):])
        return "".join(out).rstrip("\n")

    def format(self, record: logging.LogRecord) -> str:
        r = _redacted_record(self.ctx, self, record)
        r.msg = escape_controls(r.msg)
        if r.exc_text:
            r.exc_text = escape_controls(r.exc_text, keep_newlines=True)
        if r.stack_info:
            r.stack_info = escape_controls(r.stack_info, keep_newlines=True)
        line = super().format(r)
        fields = self.ctx.redact_value(getattr(record, "fields", None) or {})
        if fields:
            line += " " + escape_controls(" ".join(f"{k}={v}" for k, v in fields.items()))
        extra = escape_controls(" ".join(f"{k}={self.ctx.redact_value(getattr(record, k))}"
                                         for k in self.ctx.text_fields if getattr(record, k, None)))
        # Everything above is redacted already; this pass catches what the joins made.
        return self.ctx.redact(f"{line} [{extra}]" if extra else line)


class JsonFormatter(logging.Formatter):
    def __init__(self, ctx: LogContext) -> None:
        super().__init__()
        self.ctx = ctx

    def format(self, record: logging.LogRecord) -> str:
        r = _redacted_record(self.ctx, self, record)
        obj: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": r.msg,
        }
        for k in ("room", "session_id", "reply_id"):
            v = getattr(record, k, None)
            if v:
                obj[k] = self.ctx.redact_value(v)
        for k, v in self.ctx.redact_value(getattr(record, "fields", None) or {}).items():
            obj[k] = v
        if r.exc_text:
            obj["exc"] = r.exc_text
        if r.stack_info:
            obj["stack"] = r.stack_info
        # Every value is redacted before serialising: json.dumps escapes quotes, backslashes
        # and non-ASCII, which would hide a secret from a redaction of its output (and a
        # redaction of the output could break the JSON).
        return json.dumps(obj, default=str)


def setup_logging(secrets: Sequence[str] = (), level: str = "info", fmt: str = "text", *,
                  redact_jwts: bool = False) -> LogContext:
    """Every line on stderr, as text or JSON, through the redaction filter."""
    ctx = LogContext(secrets, redact_jwts=redact_jwts)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ctx)
    handler.setFormatter(JsonFormatter(ctx) if fmt == "json" else TextFormatter(ctx))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The SDKs are chatty at debug (websockets logs request headers: a token): never below info.
    for name in ("livekit", "websockets"):
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
    return ctx




def one_line(e: BaseException, limit: int = 200) -> str:
    """An exception's first line, cut to ``limit`` characters: for a log line or an error
    message. Not redacted: where the text can hold a secret, use ``LogContext.one_line``."""
    return (str(e) or type(e).__name__).splitlines()[0][:limit]


class LogLimiter:
    """Rate-limits a log line per key: the first ``burst`` lines, then one a minute. What a
    room participant or the API can trigger at will must not flood the log."""

    def __init__(self, burst: int = 5, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.every_s, self.clock = burst, every_s, clock
        self._seen: collections.OrderedDict[str, tuple[int, float]] = collections.OrderedDict()

    def allow(self, key: str) -> bool:
        now = self.clock()
        count, last = self._seen.pop(key, (0, -math.inf))
        self._seen[key] = (count + 1, last)
        while len(self._seen) > 1000:
            self._seen.popitem(last=False)
        if count < self.burst or now - last >= self.every_s:
            self._seen[key] = (count + 1, now)
            return True
        return False
