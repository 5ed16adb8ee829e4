#!/usr/bin/env python3
"""LiveKit room <-> AssemblyAI Voice Agent API bridge: the composition root.

Reads the configuration (flags > environment > ./.env > defaults), joins the room as
the agent participant, publishes ONE audio track fed by the mixer (reply + ambient bed
+ cues), bridges the user's microphone to the Voice Agent API and its replies back,
and shuts down cleanly on SIGTERM/SIGINT.

    python worker.py            run the worker
    python worker.py --help     every setting, with its environment variable and default
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import dataclasses
import datetime
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

import bridge
import control
import scheduling
from bridge import (
    EXIT_CONFIG,
    EXIT_DUPLICATE_IDENTITY,
    EXIT_INTERNAL,
    EXIT_LIVEKIT_AUTH,
    EXIT_LIVEKIT_UNREACHABLE,
    EXIT_OK,
    EXIT_ROOM_DELETED,
    FatalError,
)

log = logging.getLogger("worker")

SAMPLE_RATE = 24000


# --- configuration ---------------------------------------------------------------------


class ConfigError(Exception):
    """A missing or invalid setting. ``str()`` is one line naming the variable."""


def _setting(default: Any, help: str, parse: Callable[[str], Any] = str, *, required: bool = False,
             secret: bool = False, group: str = "general") -> Any:
    return field(default=default, metadata={"help": help, "parse": parse, "required": required,
                                            "secret": secret, "group": group})


def _nonempty(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty")
    return v.strip()


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(v: str) -> str:
        u = urlparse(v.strip())
        if u.scheme not in schemes or not u.netloc:
            raise ValueError(f"must be a URL starting with {' or '.join(s + '://' for s in schemes)}, "
                             f"got {v.strip()[:80]!r}")
        return v.strip()
    return parse


def _number(kind: type, lo: float | None = None, hi: float | None = None, multiple: int | None = None) -> Callable[[str], Any]:
    def parse(v: str) -> Any:
        try:
            x = kind(v.strip())
        except ValueError:
            raise ValueError(f"must be {'an integer' if kind is int else 'a number'}, got {v.strip()[:40]!r}") from None
        if isinstance(x, float) and not math.isfinite(x):
            raise ValueError(f"must be a finite number, got {v.strip()!r}")
        if (lo is not None and x < lo) or (hi is not None and x > hi):
            raise ValueError(f"must be between {lo:g} and {hi:g}, got {v.strip()}" if hi is not None
                             else f"must be at least {lo:g}, got {v.strip()}")
        if multiple and x % multiple:
            raise ValueError(f"must be a multiple of {multiple}, got {v.strip()}")
        return x
    return parse


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda v: None if not v.strip() else parse(v)


def _bool(v: str) -> bool:
    s = v.strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be 1/0, true/false, yes/no or on/off, got {v.strip()[:20]!r}")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(v: str) -> str:
        s = v.strip().lower()
        if s not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {v.strip()[:40]!r}")
        return s
    return parse


def _csv(v: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in v.split(",") if x.strip())


def _keyterms(v: str) -> tuple[str, ...]:
    terms = _csv(v)
    if len(terms) > 100:
        raise ValueError(f"at most 100 terms, got {len(terms)}")
    return terms


def _directory(v: str) -> str:
    path = Path(v.strip()).expanduser()
    if not path.is_dir():
        raise ValueError(f"must be an existing folder, got {v.strip()[:120]!r}")
    return str(path)


def _identity(v: str) -> str:
    s = v.strip()
    if not s or len(s) > 128 or any(c.isspace() for c in s):
        raise ValueError("must be 1-128 characters without spaces")
    return s


@dataclass(frozen=True)
class Config:
    # LiveKit
    livekit_url: str = _setting(None, "LiveKit server URL, e.g. ws://localhost:7880 or wss://<project>.livekit.cloud",
                                _url("ws", "wss", "http", "https"), required=True, group="LiveKit")
    livekit_api_key: str = _setting(None, "LiveKit API key (livekit-server --dev: devkey)", _nonempty,
                                    required=True, group="LiveKit")
    livekit_api_secret: str = _setting(None, "LiveKit API secret (livekit-server --dev: secret)", _nonempty,
                                       required=True, secret=True, group="LiveKit")
    room_name: str = _setting("voice-agent-demo", "room to join", _identity, group="LiveKit")
    agent_identity: str = _setting("voice-agent", "participant identity of the agent", _identity, group="LiveKit")
    user_identity: str | None = _setting(None, "only bridge this participant (empty: the first user with a microphone)",
                                         _optional(_identity), group="LiveKit")
    # Voice Agent API
    assemblyai_api_key: str = _setting(None, "AssemblyAI API key (sent as 'Authorization: Bearer <key>')", _nonempty,
                                       required=True, secret=True, group="Voice Agent API")
    voice_agent_url: str = _setting("wss://agents.assemblyai.com/v1/ws",
                                    "Voice Agent API WebSocket URL (EU: wss://agents.eu.assemblyai.com/v1/ws)",
                                    _url("ws", "wss"), group="Voice Agent API")
    system_prompt: str = _setting("You are a friendly, helpful voice assistant. Keep answers short and conversational.",
                                  "the agent's instructions", group="Voice Agent API")
    greeting: str = _setting("Hi! How can I help you today?",
                             "spoken when a call starts (empty: the agent waits for the user)", group="Voice Agent API")
    voice: str = _setting("", "voice id (empty: the service default)", group="Voice Agent API")
    keyterms: tuple[str, ...] = _setting((), "comma-separated words to recognise reliably (names, products; max 100)",
                                         _keyterms, group="Voice Agent API")
    turn_profile: str = _setting("default", "turn detection: default (the service's adaptive pacing), fast, standard "
                                 "or deliberate", _choice(*bridge.TURN_PROFILES), group="Voice Agent API")
    vad_threshold: float | None = _setting(None, "override: speech detection threshold 0.0-1.0 (higher ignores more noise)",
                                           _optional(_number(float, 0.0, 1.0)), group="Voice Agent API")
    min_silence_ms: int | None = _setting(None, "override: silence before a confident end of turn, 50-10000 ms",
                                          _optional(_number(int, 50, 10000)), group="Voice Agent API")
    max_silence_ms: int | None = _setting(None, "override: longest silence before the turn ends anyway, 50-10000 ms",
                                          _optional(_number(int, 50, 10000)), group="Voice Agent API")
    interrupt_response: bool | None = _setting(None, "override: let the user interrupt the agent (1/0)",
                                               _optional(_bool), group="Voice Agent API")
    tools_module: str = _setting("", "your tools: a module name or a .py path (several: comma-separated); every "
                                 "public async def with type hints and a docstring becomes a tool",
                                 group="Voice Agent API")
    tool_timeout_s: float = _setting(20.0, "a tool call taking longer is answered with an error",
                                     _number(float, 0.1, 600), group="Voice Agent API")
    end_call_tool: bool = _setting(True, "offer the agent the built-in end_call tool (hang up after its goodbye)",
                                   _bool, group="Voice Agent API")
    end_call_action: str = _setting("delete_room", "what end_call does after the goodbye has played: delete_room "
                                    "(ends the call for everyone) or leave (the agent leaves)",
                                    _choice("delete_room", "leave"), group="Voice Agent API")
    barge_in: str = _setting("interrupted", "when to drop the agent's queued audio: 'interrupted' (the service "
                             "interrupted the reply) or 'speech' (as soon as the user starts speaking)",
                             _choice(*bridge.BARGE_IN_POLICIES), group="Voice Agent API")
    reconnect_give_up_s: float = _setting(120.0, "stop retrying the Voice Agent API after this many seconds of failure",
                                          _number(float, 1, 86400), group="Voice Agent API")
    input_backlog_ms: int = _setting(500, "microphone audio older than this is dropped after a stall, so the agent "
                                     "hears the present", _number(int, 100, 10000), group="Voice Agent API")
    # Audio
    ambient_sound: str = _setting("builtin:office", "ambient bed: a sound file (WAV, MP3, FLAC, OGG, AAC...), "
                                  "builtin:<name>, a clip list 'source[:volume[:probability]], ...' (one pick per "
                                  "call), or none", group="Audio")
    ambient_volume: float = _setting(0.3, "ambient volume, 0.0-1.0", _number(float, 0.0, 1.0), group="Audio")
    ambient_target_lufs: float = _setting(-30.0, "beds are normalised to this loudness (LUFS) before AMBIENT_VOLUME "
                                          "applies", _number(float, -70.0, -6.0), group="Audio")
    ambient_duck_db: float = _setting(-6.0, "how far the ambient dips under the agent's speech, in dB (0: off)",
                                      _number(float, -40.0, 0.0), group="Audio")
    thinking_sound: str = _setting("none", "cue looped from the end of the user's turn until the reply starts: a "
                                   "sound file, builtin:<name>, a clip list (a pick per thinking phase), or none",
                                   group="Audio")
    thinking_volume: float = _setting(0.3, "thinking cue volume, 0.0-1.0", _number(float, 0.0, 1.0), group="Audio")
    cue_target_lufs: float = _setting(-24.0, "cues are normalised to this loudness (LUFS) before their volume applies",
                                      _number(float, -70.0, -6.0), group="Audio")
    mix_frame_ms: int = _setting(10, "mixer frame, 10 or 20 ms", _number(int, 10, 20, multiple=10), group="Audio")
    output_queue_ms: int = _setting(100, "audio queued in the published track, in ms (multiple of 10; lower = less "
                                    "latency, more risk of underruns)", _number(int, 20, 1000, multiple=10),
                                    group="Audio")
    idle_timeout_s: float = _setting(30.0, "end the Voice Agent session (billed while open) when no user has been in "
                                     "the room for this long; the next user starts a new call",
                                     _number(float, 0, 86400), group="LiveKit")
    mix_participants: bool = _setting(False, "1: mix every user's microphone into the one session (meetings); "
                                      "0: bridge one user", _bool, group="LiveKit")
    # Control
    control_identities: tuple[str, ...] = _setting((), "comma-separated identities allowed to call the control RPC "
                                                   "methods (mix_audio, play, state); empty: nobody", _csv,
                                                   group="Control")
    ambient_dir: str = _setting("", "folder of sound files the control API may play by name (clip); empty: "
                                "built-ins only", _optional(_directory), group="Control")
    state_dir: str = _setting("state", "where the active bed is kept so a restarted worker resumes it; empty: "
                              "not kept", group="Control")
    control_max_upload_mb: float = _setting(20.0, "largest audio upload accepted by the control API, in MB",
                                            _number(float, 0.01, 500), group="Control")
    control_max_audio_s: float = _setting(600.0, "longest audio accepted by the control API, in seconds",
                                          _number(float, 1, 3600), group="Control")
    control_rate_per_min: float = _setting(30.0, "control calls allowed per caller per minute (bursts of 10)",
                                           _number(float, 1, 6000), group="Control")
    audio_priority: str = _setting("realtime", "CPU scheduling for the audio: realtime (real-time scheduling for the "
                                   "audio and media threads, nice -10 for the rest), nice (nice -10 only) or normal; "
                                   "needs CAP_SYS_NICE, else it falls back quietly",
                                   _choice("realtime", "nice", "normal"), group="Audio")
    barge_in_clear_queue: bool = _setting(False, "for benchmarks only: also flush the track's queue on barge-in, like "
                                          "naive bridges do (it throws away queued ambient too)", _bool, group="Audio")
    # Operations
    startup_check: bool = _setting(True, "at start, open and end a Voice Agent session to prove the key (about 1 s "
                                   "billed) before reporting ready; 0: trust it until the first call",
                                   _bool, group="Operations")
    shutdown_timeout_s: float = _setting(5.0, "longest clean shutdown on SIGTERM before exiting anyway",
                                         _number(float, 0.5, 60), group="Operations")
    log_level: str = _setting("info", "debug, info, warning or error", _choice("debug", "info", "warning", "error"),
                              group="Operations")
    log_format: str = _setting("text", "text (human) or json (one object per line)", _choice("text", "json"),
                               group="Operations")

    def turn_detection(self) -> dict[str, Any]:
        td = dict(bridge.TURN_PROFILES[self.turn_profile])
        for key, value in (("vad_threshold", self.vad_threshold), ("min_silence", self.min_silence_ms),
                           ("max_silence", self.max_silence_ms), ("interrupt_response", self.interrupt_response)):
            if value is not None:
                td[key] = value
        return td

    @property
    def secrets(self) -> list[str]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata["secret"] and getattr(self, f.name)]


def env_name(f: dataclasses.Field) -> str:
    return f.name.upper()


def load_config(env: Mapping[str, str], *, optional: tuple[str, ...] = ()) -> Config:
    """Build the configuration from a mapping of variables (already merged from flags,
    the environment and .env). Raises ConfigError naming the first bad variable.
    ``optional`` names required variables a sub-command can do without."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        name = env_name(f)
        raw = env.get(name)
        if raw is None or (f.metadata["required"] and not raw.strip()):
            if name in optional:
                values[f.name] = ""
            elif f.metadata["required"]:
                raise ConfigError(f"{name} is not set: {f.metadata['help']}")
            continue
        try:
            values[f.name] = f.metadata["parse"](raw)
        except ValueError as e:
            raise ConfigError(f"{name} {e}") from None
    cfg = Config(**values)
    td = cfg.turn_detection()
    if td.get("min_silence", 0) >= td.get("max_silence", 10**9):
        raise ConfigError(f"MIN_SILENCE_MS ({td['min_silence']}) must be less than MAX_SILENCE_MS "
                          f"({td['max_silence']}, from {'MAX_SILENCE_MS' if cfg.max_silence_ms else 'TURN_PROFILE'})")
    if cfg.output_queue_ms < 2 * cfg.mix_frame_ms:
        raise ConfigError(f"OUTPUT_QUEUE_MS must be at least two mixer frames ({2 * cfg.mix_frame_ms} ms)")
    return cfg


def gather_env(cli: Mapping[str, str | None], cwd: Path | None = None) -> dict[str, str]:
    """Flags win over the real environment, which wins over ./.env."""
    from dotenv import dotenv_values

    merged: dict[str, str] = {}
    dotenv_path = (cwd or Path.cwd()) / ".env"
    if dotenv_path.is_file():
        merged.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    merged.update(os.environ)
    merged.update({k: v for k, v in cli.items() if v is not None})
    return merged


# --- logging -------------------------------------------------------------------------------


class LogContext(logging.Filter):
    """Adds room / session id / reply id to every record, and removes secrets."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.fields: dict[str, str | None] = {"room": None, "session_id": None, "reply_id": None}
        # Redacting a 1-3 character "secret" would mangle every line; real ones are long.
        self.secrets = [s for s in secrets if len(s) >= 6]

    def add_secret(self, s: str) -> None:
        if len(s) >= 6:
            self.secrets.append(s)

    def redact(self, text: str) -> str:
        for s in self.secrets:
            if s in text:
                text = text.replace(s, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        for k, v in self.fields.items():
            setattr(record, k, v)
        return True


class TextFormatter(logging.Formatter):
    def __init__(self, ctx: LogContext) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        self.ctx = ctx

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        extra = " ".join(f"{k}={getattr(record, k)}" for k in ("session_id", "reply_id") if getattr(record, k, None))
        return self.ctx.redact(f"{line} [{extra}]" if extra else line)


class JsonFormatter(logging.Formatter):
    def __init__(self, ctx: LogContext) -> None:
        super().__init__()
        self.ctx = ctx

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k in ("room", "session_id", "reply_id"):
            v = getattr(record, k, None)
            if v:
                obj[k] = v
        for k, v in getattr(record, "fields", {}).items():
            obj[k] = v
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return self.ctx.redact(json.dumps(obj, default=str))


def setup_logging(cfg: Config | None, level: str = "info", fmt: str = "text") -> LogContext:
    ctx = LogContext(cfg.secrets if cfg else [])
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ctx)
    handler.setFormatter(JsonFormatter(ctx) if fmt == "json" else TextFormatter(ctx))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The SDKs are chatty at debug; keep them at info unless asked.
    for name in ("livekit", "websockets"):
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
    return ctx


# --- the worker ------------------------------------------------------------------------------


AGENT_STATE = "lk.agent.state"
MAX_CHAT_CHARS = 4000
MAX_CHAT_BYTES = 4 * MAX_CHAT_CHARS  # UTF-8: at most 4 bytes a character
CHAT_PER_MINUTE, CHAT_BURST = 20.0, 5
MAX_MIXED_INPUTS = 16  # MIX_PARTICIPANTS=1: microphones mixed at most


def mint_token(cfg: Config, identity: str, *, kind: str | None = None, name: str | None = None,
               ttl: datetime.timedelta = datetime.timedelta(hours=6)) -> str:
    from livekit import api

    token = (
        api.AccessToken(cfg.livekit_api_key, cfg.livekit_api_secret)
        .with_identity(identity)
        .with_name(name or identity)
        .with_grants(api.VideoGrants(room_join=True, room=cfg.room_name, can_publish=True, can_subscribe=True,
                                     can_publish_data=True, can_update_own_metadata=True))
        .with_ttl(ttl)
    )
    if kind:
        token = token.with_kind(kind)
    return token.to_jwt()


def server_api(cfg: Config) -> Any:
    """LiveKit's server API (rooms, participants) for the configured server."""
    from livekit import api

    http_url = cfg.livekit_url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
    return api.LiveKitAPI(http_url, cfg.livekit_api_key, cfg.livekit_api_secret)


def session_settings(cfg: Config, tools: list[dict[str, Any]] | None = None) -> bridge.SessionSettings:
    return bridge.SessionSettings(
        tools=list(tools or []),
        system_prompt=cfg.system_prompt or None,
        greeting=cfg.greeting or None,
        voice=cfg.voice or None,
        keyterms=list(cfg.keyterms),
        turn_detection=cfg.turn_detection(),
    )


TOPIC_TRANSCRIPTION = "lk.transcription"
TOPIC_CHAT = "lk.chat"
ATTR_FINAL = "lk.transcription_final"
ATTR_TRACK = "lk.transcribed_track_id"
ATTR_SEGMENT = "lk.segment_id"


@dataclass
class _AgentSegment:
    """The caption of one reply: words with the sample position where their audio starts."""

    reply_id: str
    segment_id: str
    words: list[tuple[int, str]] = field(default_factory=list)
    shown: int = 0
    writer: Any = None
    done: bool = False  # reply.done seen: flush once the audio has played
    cut: int | None = None  # interrupted: nothing past this sample is ever shown
    created: float = field(default_factory=time.monotonic)


class Captions:
    """Transcripts for the frontend, as ``lk.transcription`` text streams.

    User text goes out with the user's identity and microphone track (each interim
    update is a new stream of the same segment, carrying the full text so far); agent
    text goes out word by word as its audio is actually played, in one stream per reply
    that is closed final, and cut where an interruption cut the audio. One task writes
    everything, in order.
    """

    TICK_S = 0.05
    MAX_CHARS = 4000  # a caption longer than this shows its end

    def __init__(self, worker: "Worker") -> None:
        self.w = worker
        # User captions waiting to go out, oldest segment first. A newer text of the same
        # segment replaces a waiting one: a flood of interim updates costs one stream.
        self._pending: collections.OrderedDict[str, tuple[Any, ...]] = collections.OrderedDict()
        self._wake = asyncio.Event()
        self._agent: dict[str, _AgentSegment] = {}
        self._user_segment: dict[str, str] = {}  # item_id -> segment id (insertion ordered)
        self._turn = 0
        self.published = 0

    # -- called from bridge events (never block) --

    MAX_WORDS = 2000  # words held for one agent caption
    MAX_SEGMENTS = 16  # agent captions open at once; the oldest is closed first

    def user(self, identity: str, track_sid: str | None, item_id: str | None, text: str, final: bool) -> None:
        key = (item_id or f"turn-{self._turn}")[:128]
        segment = self._user_segment.setdefault(key, f"SG_{key}")
        while len(self._user_segment) > self.MAX_SEGMENTS:  # item ids that never got a final text
            self._user_segment.pop(next(iter(self._user_segment)))
        if final:
            self._user_segment.pop(key, None)
            self._turn += 1
        if len(text) > self.MAX_CHARS:
            text = "\u2026" + text[-self.MAX_CHARS:]
        self._pending[segment] = (identity, track_sid, segment, text, final)
        self._wake.set()

    def agent_word(self, reply_id: str, text: str, position: int) -> None:
        seg = self._segment(reply_id)
        if seg.cut is None and len(seg.words) < self.MAX_WORDS:
            seg.words.append((position, text[:200]))

    def agent_text(self, reply_id: str, text: str, received: int) -> None:
        """The full reply text. Used only if no word-level deltas came: words are then
        spread over the reply's audio in proportion to their place in the text."""
        seg = self._segment(reply_id)
        if seg.words or not text.strip():
            return
        offset = 0
        for word in text.split():
            at = text.index(word, offset)
            seg.words.append((int(received * at / max(1, len(text))), (" " if at else "") + word))
            offset = at + len(word)

    def agent_done(self, reply_id: str, cut_at: int | None = None) -> None:
        seg = self._segment(reply_id)
        seg.done = True
        if cut_at is not None and seg.cut is None:
            seg.cut = cut_at

    def all_done(self) -> None:
        for seg in self._agent.values():
            seg.done = True

    def _segment(self, reply_id: str) -> _AgentSegment:
        seg = self._agent.get(reply_id)
        if seg is None:
            for old in list(self._agent.values())[:max(0, len(self._agent) - self.MAX_SEGMENTS + 1)]:
                old.done = True  # closed (with what was shown) on the next tick
                old.cut = -1  # nothing more is shown
            seg = self._agent[reply_id] = _AgentSegment(reply_id, f"SG_{reply_id[:128]}")
        return seg

    # -- the writer task --

    async def run(self) -> None:
        while True:
            await bridge.wait_event(self._wake, self.TICK_S)
            self._wake.clear()
            try:
                while self._pending:
                    _, args = self._pending.popitem(last=False)
                    await self._publish_user(*args)
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # captions are best effort: never take the call down
                log.warning("could not publish a caption: %s", _one_line(e))

    async def _publish_user(self, identity: str, track_sid: str | None, segment: str, text: str, final: bool) -> None:
        attrs = {ATTR_FINAL: "true" if final else "false", ATTR_SEGMENT: segment}
        if track_sid:
            attrs[ATTR_TRACK] = track_sid
        room = self.w.room
        if room is None or not room.isconnected():
            return
        writer = await room.local_participant.stream_text(topic=TOPIC_TRANSCRIPTION, sender_identity=identity,
                                                          attributes=attrs)
        await writer.write(text)
        await writer.aclose()
        self.published += 1

    async def _tick(self) -> None:
        room = self.w.room
        for rid, seg in list(self._agent.items()):
            st = self.w.mixer.reply_stats(rid)
            played = st.played if st is not None else 0
            received = st.received if st is not None else 0
            limit = played if seg.cut is None else min(played, seg.cut)
            finished = seg.done and (seg.cut is not None or played >= received)
            if finished and seg.cut is None:
                limit = 1 << 62  # all audio played: show the rest of the text
            stale = time.monotonic() - seg.created > 120
            due = [w for w in seg.words[seg.shown:] if w[0] <= limit]
            if room is not None and room.isconnected() and (due or (finished and seg.writer is None and seg.shown < len(seg.words))):
                if seg.writer is None and due:
                    seg.writer = await room.local_participant.stream_text(
                        topic=TOPIC_TRANSCRIPTION, sender_identity=self.w.cfg.agent_identity,
                        attributes={ATTR_FINAL: "false", ATTR_SEGMENT: seg.segment_id,
                                    **({ATTR_TRACK: self.w.track_sid} if self.w.track_sid else {})})
                if due:
                    await seg.writer.write("".join(text for _, text in due))
                    seg.shown += len(due)
            if finished or stale:
                if seg.writer is not None:
                    attrs = {ATTR_FINAL: "true", ATTR_SEGMENT: seg.segment_id}
                    if self.w.track_sid:
                        attrs[ATTR_TRACK] = self.w.track_sid
                    await seg.writer.aclose(attributes=attrs)
                    self.published += 1
                del self._agent[rid]

    def agent_shown_text(self, reply_id: str) -> str | None:
        seg = self._agent.get(reply_id)
        return None if seg is None else "".join(t for _, t in seg.words[: seg.shown])


@dataclass
class _Input:
    identity: str
    track_sid: str
    stream: Any  # rtc.AudioStream
    task: asyncio.Task[None] | None = None  # its pump (single-user mode)
    mix_source: Any = None  # what was added to the room mixer (MIX_PARTICIPANTS=1)


class Worker(bridge.BridgeEvents):
    """Owns the room, the mixer, the Voice Agent session and every task it starts."""

    def __init__(self, cfg: Config, log_ctx: LogContext) -> None:
        self.cfg = cfg
        self.log_ctx = log_ctx
        self.room: Any = None
        self.mixer: Any = None
        self.client: bridge.VoiceAgentClient | None = None
        self.captions = Captions(self)
        self.track_sid: str | None = None
        self.ambient: Any = None  # sounds.ClipBank
        self.thinking: Any = None  # sounds.ClipBank
        self._rng = random.Random()
        self.controller: Any = None  # control.Controller
        self.tools: Any = None  # tools.ToolRegistry
        self._hangup: asyncio.Task[None] | None = None
        self._hung_up = False  # we ended the call ourselves: the disconnect that follows is expected
        self._restored = False
        self._bed_source: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._exit_code = EXIT_OK
        self._fatal_message: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._session_task: asyncio.Task[None] | None = None
        self._inputs: dict[str, _Input] = {}  # identity -> the microphone we bridge
        self._room_mixer: Any = None  # rtc.AudioMixer when MIX_PARTICIPANTS=1
        self._mix_task: asyncio.Task[None] | None = None
        self._idle_task: asyncio.Task[None] | None = None
        self._state = ""
        self._state_lock = asyncio.Lock()
        self._playing: str | None = None  # the reply being spoken (audible, or stalled mid-way)
        self._audible = False  # reply audio is playing out right now
        self._disconnected = asyncio.Event()
        self._disconnect_reason: int | None = None
        self._turn_ended_at: float | None = None
        self._calls = 0
        self._turns = 0
        self.notifier = SystemdNotifier()
        self._in_room = asyncio.Event()
        self._api_verified = asyncio.Event()
        self._input_errors = LogLimiter()  # failures of tasks that handle outside input
        self._chat_rate = control.RateLimiter(CHAT_PER_MINUTE, CHAT_BURST)

    # -- task ownership --

    def _spawn(self, coro: Any, name: str, *, isolated: bool = False) -> asyncio.Task[Any]:
        """A task this worker owns. An ``isolated`` task handles input from outside (a
        participant, an upload, a stream): whatever it raises is logged (rate-limited) and
        the call goes on; any other task's crash is a bug that ends the process."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._isolated_done if isolated else self._task_done)
        return task

    def _isolated_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        if self._input_errors.allow(task.get_name().split("-")[0]):
            log.warning("%s failed (the call goes on): %s: %s", task.get_name(), type(exc).__name__,
                        _one_line(exc), exc_info=exc if log.isEnabledFor(logging.DEBUG) else None)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, FatalError):
            self.fail(exc.exit_code, str(exc))
        elif exc is not None:
            log.error("task %s crashed: %s", task.get_name(), exc, exc_info=exc)
            self.fail(EXIT_INTERNAL, f"internal error in {task.get_name()}: {exc}")

    def fail(self, code: int, message: str) -> None:
        if self._fatal_message is None:
            self._exit_code, self._fatal_message = code, message
        self._stop.set()

    def request_stop(self) -> None:
        self._stop.set()

    # -- main --

    async def run(self) -> int:
        from livekit import rtc

        import mixer as mixer_mod

        self._loop = asyncio.get_running_loop()
        self.log_ctx.fields["room"] = self.cfg.room_name
        self.mixer = mixer_mod.Mixer(
            mixer_mod.MixerSettings(frame_ms=self.cfg.mix_frame_ms, ambient_volume=self.cfg.ambient_volume,
                                    duck_db=self.cfg.ambient_duck_db, thinking_volume=self.cfg.thinking_volume),
            queue_ms=self.cfg.output_queue_ms,
            clear_queue_on_barge_in=self.cfg.barge_in_clear_queue,
            priority=self.cfg.audio_priority,
            on_air=False,  # until the track is published
        )
        self.mixer.on_event = self._on_playback_event
        source = self.mixer.start()  # first LiveKit call: its media threads start on the audio thread
        # Sounds and tools are loaded before we touch the network: a bad file fails fast.
        self.ambient, self.thinking = load_banks(self.cfg)
        self.tools = load_tool_registry(self.cfg, self._end_call_tool)
        self.controller = control.Controller(control.ControlSettings(
            identities=frozenset(self.cfg.control_identities),
            ambient_dir=Path(self.cfg.ambient_dir) if self.cfg.ambient_dir else None,
            state_dir=Path(self.cfg.state_dir) if self.cfg.state_dir else None,
            max_upload_bytes=int(self.cfg.control_max_upload_mb * 1024 * 1024),
            max_audio_s=self.cfg.control_max_audio_s,
            calls_per_minute=self.cfg.control_rate_per_min,
            default_volume=self.cfg.ambient_volume,
            bed_target_lufs=self.cfg.ambient_target_lufs,
            cue_target_lufs=self.cfg.cue_target_lufs,
        ), self.mixer, self.cfg.room_name)
        self._restored = await self.controller.restore()
        if not self._restored:
            self._pick_bed()
        log.info("audio: %d ms frames, %d ms output queue, audio thread scheduling %s",
                 self.cfg.mix_frame_ms, self.cfg.output_queue_ms, self.mixer.priority)
        self._track = rtc.LocalAudioTrack.create_audio_track("agent-audio", source)
        try:
            self._spawn(self._room_loop(), "room")
            self._spawn(self.captions.run(), "captions")
            self._spawn(self._report_counters(), "counters")
            self._spawn(self._startup_check(), "startup-check")
            self._spawn(self._notify_ready(), "sd-ready")
            if self.notifier.watchdog_s:
                self._spawn(self._watchdog(), "sd-watchdog")
            await self._stop.wait()
        finally:
            await self._shutdown()
        if self._fatal_message:
            report_fatal(self.cfg, self.log_ctx, self._fatal_message, self._exit_code)
        return self._exit_code

    async def _shutdown(self) -> None:
        t0 = time.monotonic()
        # asyncio.wait, not wait_for: a step that ignores cancellation (an SDK call waiting
        # for a dead peer) must not hold the exit past the bound.
        graceful = asyncio.ensure_future(self._graceful_stop())
        done, _ = await asyncio.wait({graceful}, timeout=self.cfg.shutdown_timeout_s)
        if graceful in done:
            if not graceful.cancelled() and graceful.exception() is not None:
                log.warning("clean shutdown failed: %s", _one_line(graceful.exception()))
        else:
            graceful.cancel()
            log.warning("clean shutdown took longer than %.1f s; exiting anyway", self.cfg.shutdown_timeout_s)
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1.0)
        if self.mixer is not None:
            await asyncio.wait({asyncio.ensure_future(self.mixer.aclose())}, timeout=2.5)
        log.info("stopped in %.2f s", time.monotonic() - t0)

    async def _graceful_stop(self) -> None:
        self.notifier.notify("STOPPING=1")
        fade_ms = 300
        if self.mixer is not None:
            self.mixer.stop_bed(fade_ms)
        # The bed fades out while the session ends; then leave the room.
        await asyncio.gather(self._end_session(),
                             asyncio.sleep((fade_ms + self.cfg.output_queue_ms) / 1000))
        if self.room is not None and self.room.isconnected():
            await self.room.disconnect()

    async def _startup_check(self) -> None:
        """Prove the API key once at start (systemd then knows a bad key before any call)."""
        if not self.cfg.startup_check:
            self._api_verified.set()
            return
        attempt = 0
        while True:
            try:
                sid = await bridge.verify_session(self.cfg.voice_agent_url, self.cfg.assemblyai_api_key,
                                                  session_settings(self.cfg, self.tools.definitions()))
                log.info("Voice Agent API key verified (session %s opened and ended)", sid)
                self._api_verified.set()
                return
            except (OSError, asyncio.TimeoutError) as e:
                attempt += 1
                if attempt * 2 > self.cfg.reconnect_give_up_s:
                    raise FatalError(bridge.EXIT_API_GAVE_UP,
                                     f"cannot reach the Voice Agent API at {self.cfg.voice_agent_url}: {_one_line(e)}")
                log.warning("cannot verify the Voice Agent API yet (%s); retrying", _one_line(e))
                await asyncio.sleep(min(10, 0.5 * 2**attempt))

    async def _notify_ready(self) -> None:
        await self._in_room.wait()
        await self._api_verified.wait()
        log.info("ready: in room %s, waiting for a user", self.cfg.room_name)
        self.notifier.notify("READY=1", f"STATUS=in room {self.cfg.room_name}, waiting for a user")

    async def _watchdog(self) -> None:
        """WATCHDOG=1 while both loops are alive: this task proves the main loop, the
        heartbeat proves the audio thread. A hung loop stops the pings; systemd restarts us."""
        interval = self.notifier.watchdog_s / 2
        while True:
            await asyncio.sleep(interval)
            stale = time.monotonic() - self.mixer.heartbeat
            if self.mixer.alive and stale < max(1.0, interval):
                self.notifier.notify("WATCHDOG=1")
            else:
                log.error("audio loop stalled for %.1f s: not pinging the systemd watchdog", stale)

    async def _report_counters(self) -> None:
        """Mixer and bridge counters, periodically, at debug level (benchmarks read them too)."""
        while True:
            await asyncio.sleep(10)
            log.debug("counters", extra={"fields": self.counters()})

    def counters(self) -> dict[str, Any]:
        """Everything worth watching for leaks and health, in one place (also on SIGUSR1)."""
        client = self.client
        return {
            "mixer": self.mixer.snapshot(),
            "bridge": dict(client.counters) if client is not None else None,
            "control": dict(self.controller.counters) if self.controller is not None else None,
            "tasks": len(asyncio.all_tasks()),
            "owned_tasks": len(self._tasks),
            "threads": threading.active_count(),
            "inputs": len(self._inputs),
            "caption_segments": len(self.captions._agent),
            "calls": self._calls,
            "rss_kb": _rss_kb(),
        }

    def dump_counters(self) -> None:
        log.info("counters", extra={"fields": self.counters()})
        if log.isEnabledFor(logging.DEBUG):
            for task in asyncio.all_tasks():
                frames = task.get_stack()[-4:]  # the innermost frames: where it waits
                where = " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(frames))
                log.debug("task %s at %s", task.get_name(), where or "(not started)")

    # -- the room --

    async def _room_loop(self) -> None:
        """Join, then rejoin after a full disconnect, until stopped."""
        from livekit import rtc

        attempt = 0
        failing_since: float | None = None
        while not self._stop.is_set():
            room = rtc.Room()
            self._wire_room(room)
            token = mint_token(self.cfg, self.cfg.agent_identity, kind="agent", name="Voice Agent")
            self.log_ctx.add_secret(token)
            try:
                await room.connect(self.cfg.livekit_url, token, rtc.RoomOptions(auto_subscribe=True))
            except rtc.ConnectError as e:
                msg = self.log_ctx.redact(str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
                if any(s in msg.lower() for s in ("401", "unauthorized", "invalid token", "signature", "invalid api key")):
                    raise FatalError(EXIT_LIVEKIT_AUTH,
                                     f"LiveKit rejected LIVEKIT_API_KEY/LIVEKIT_API_SECRET ({msg})") from None
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > self.cfg.reconnect_give_up_s:
                    raise FatalError(EXIT_LIVEKIT_UNREACHABLE,
                                     f"cannot join LiveKit at {self.cfg.livekit_url}: {msg}") from None
                delay = min(10.0, 0.5 * 2**attempt)
                attempt += 1
                log.warning("cannot join LiveKit at %s (%s); retrying in %.1f s", self.cfg.livekit_url, msg, delay)
                await asyncio.sleep(delay)
                continue
            attempt, failing_since = 0, None
            self.room = room
            self._disconnected.clear()
            log.info("joined room %s as %s", self.cfg.room_name, self.cfg.agent_identity)
            pub = await room.local_participant.publish_track(
                self._track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
            self.track_sid = pub.sid
            self.mixer.on_air = True
            self.controller.register(room, lambda coro, name: self._spawn(coro, name, isolated=True))
            if self._restored and not self._in_room.is_set():
                self._spawn(self._forget_restored_bed_if_nobody_comes(), "restored-bed")
            self._in_room.set()
            self._state = ""
            await self._update_state()
            self._scan_participants()
            await self._disconnected.wait()
            self._release_all_inputs()
            if self._stop.is_set():
                break
            reason = self._disconnect_reason
            if self._hung_up:
                self._hung_up = False
                await self._wait_for_empty_room()
                continue
            if reason == rtc.DisconnectReason.DUPLICATE_IDENTITY:
                raise FatalError(EXIT_DUPLICATE_IDENTITY,
                                 f"another participant joined room {self.cfg.room_name} as "
                                 f"{self.cfg.agent_identity!r}; this worker was disconnected (duplicate identity)")
            if reason in (rtc.DisconnectReason.ROOM_DELETED, rtc.DisconnectReason.PARTICIPANT_REMOVED):
                raise FatalError(EXIT_ROOM_DELETED,
                                 f"removed from room {self.cfg.room_name} "
                                 f"({rtc.DisconnectReason.Name(reason).lower()})")
            log.warning("disconnected from the room (%s); rejoining",
                        rtc.DisconnectReason.Name(reason) if reason is not None else "unknown")
            await asyncio.sleep(0.5)

    async def _wait_for_empty_room(self) -> None:
        """After hanging up, be back for the next call: rejoin once nobody from this call
        is left in the room (at once after delete_room: the room is gone)."""
        from livekit import api

        while not self._stop.is_set():
            try:
                async with server_api(self.cfg) as lk:
                    res = await lk.room.list_participants(api.ListParticipantsRequest(room=self.cfg.room_name))
                if not any(p.identity != self.cfg.agent_identity for p in res.participants):
                    break
            except Exception as e:
                if "not_found" in str(e).lower() or "404" in str(e):
                    break
                log.debug("cannot list the room's participants yet: %s", _one_line(e))
            await asyncio.sleep(2.0)
        log.info("call ended; rejoining %s for the next one", self.cfg.room_name)

    def _wire_room(self, room: Any) -> None:
        self._disconnect_reason = None

        def on_disconnected(reason: int) -> None:
            self._disconnect_reason = reason
            self._disconnected.set()

        room.on("disconnected", on_disconnected)
        room.on("track_subscribed", lambda track, pub, p: self._scan_participants())
        room.on("track_unsubscribed", self._on_track_unsubscribed)
        room.on("participant_disconnected", self._on_participant_disconnected)
        room.on("reconnecting", lambda: log.warning("LiveKit connection interrupted; resuming"))
        room.on("reconnected", lambda: log.info("LiveKit connection resumed"))
        room.register_text_stream_handler(TOPIC_CHAT, self._on_chat)

    async def _forget_restored_bed_if_nobody_comes(self) -> None:
        """A restored bed belongs to a call; if no user shows up, that call is over."""
        await asyncio.sleep(self.cfg.idle_timeout_s)
        if self._calls == 0 and self.controller.active is not None:
            log.info("no user came back within %.0f s: dropping the restored bed", self.cfg.idle_timeout_s)
            self._call_ended()

    def _call_ended(self) -> None:
        """A call ended normally: its runtime bed goes with it."""
        had_runtime_bed = self.controller.active is not None
        self.controller.call_ended()
        if had_runtime_bed:
            self._bed_source = None
            self._pick_bed()

    def _pick_bed(self) -> None:
        choice = self.ambient.pick(self._rng)
        source = None if choice is None else choice.clip.source
        if choice is None:
            if self._bed_source is not None:
                self.mixer.stop_bed()
        else:
            volume = choice.clip.volume if choice.clip.volume is not None else self.cfg.ambient_volume
            if source != self._bed_source:
                self.mixer.set_bed(choice.sound.name, choice.sound.samples, volume)
            else:
                self.mixer.set_bed_volume(volume)
        if self.ambient:
            log.info("ambient: %s", source or "silence (no clip picked)")
        self._bed_source = source

    # -- agent state --

    def _desired_state(self) -> str:
        client = self.client
        if client is None or not client.protocol.ever_ready:
            return "initializing"
        if self._playing is not None:
            return "speaking"
        if self._turn_ended_at is not None or self._tools_running:
            return "thinking"
        return "listening"

    @property
    def _tools_running(self) -> bool:
        client = self.client
        return client is not None and bool(client.tools_running)

    async def _update_state(self) -> None:
        # One update at a time, re-reading the desired state once in: two set_attributes in
        # flight can complete out of order and leave the older state published.
        async with self._state_lock:
            while True:
                state = self._desired_state()
                room = self.room
                if state == self._state or room is None or not room.isconnected():
                    return
                try:
                    await room.local_participant.set_attributes({AGENT_STATE: state})
                    self._state = state
                    log.debug("%s -> %s", AGENT_STATE, state)
                except Exception as e:  # state is cosmetic; never fatal
                    self._state = ""
                    log.debug("could not set %s=%s: %s", AGENT_STATE, state, e)
                    return

    def _state_changed(self) -> None:
        if self.room is not None and self._desired_state() != self._state:
            self._spawn(self._update_state(), "agent-state")

    def _on_playback_event(self, name: str, reply_id: str | None, delay: float) -> None:
        """From the audio thread: a reply became audible, or reply audio stopped."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(loop.call_later, delay, self._playback_changed, name, reply_id)

    def _playback_changed(self, name: str, reply_id: str | None) -> None:
        if name == "playing":
            self._playing, self._audible = reply_id, True
            self._turn_ended_at = None
        elif name == "idle":
            self._audible = False
            client = self.client
            if client is None or client.protocol.current_reply is None \
                    or client.protocol.current_reply != self._playing:
                self._playing = None  # the reply is over; else a stall mid-reply: still speaking
        self._state_changed()

    # -- users and their microphones --

    def _eligible(self, participant: Any) -> bool:
        from livekit import rtc

        if participant.identity == self.cfg.agent_identity:
            return False
        if self.cfg.user_identity:
            return participant.identity == self.cfg.user_identity
        return participant.kind in (rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD,
                                    rtc.ParticipantKind.PARTICIPANT_KIND_SIP)

    def _scan_participants(self) -> None:
        """(Re)consider every subscribed microphone. Idempotent: safe to call after any
        room event, including the ones the SDK re-emits after a reconnect."""
        from livekit import rtc

        room = self.room
        if room is None:
            return
        for p in room.remote_participants.values():
            if not self._eligible(p):
                continue
            for pub in p.track_publications.values():
                track = pub.track
                if track is None or track.kind != rtc.TrackKind.KIND_AUDIO \
                        or pub.source != rtc.TrackSource.SOURCE_MICROPHONE:
                    continue
                current = self._inputs.get(p.identity)
                if current is not None and current.track_sid == track.sid:
                    continue  # already bridged
                if current is None and self._inputs and not self.cfg.mix_participants:
                    continue  # someone else is the user
                if current is None and len(self._inputs) >= MAX_MIXED_INPUTS:
                    continue  # a meeting this big is not one conversation; never unbounded
                self._attach(p.identity, track)

    def _attach(self, identity: str, track: Any) -> None:
        from livekit import rtc

        self._release_input(identity)
        # 50 ms frames (one input.audio message each): a fifth of the SDK round trips of
        # 10 ms frames, no added delay. The room mixer (MIX_PARTICIPANTS) needs 10 ms ones.
        stream = rtc.AudioStream.from_track(track=track, sample_rate=SAMPLE_RATE, num_channels=1,
                                            frame_size_ms=10 if self.cfg.mix_participants else 50)
        inp = _Input(identity, track.sid, stream)
        self._inputs[identity] = inp
        if self.cfg.mix_participants:
            inp.mix_source = _frames(stream)
            self._room_mix().add_stream(inp.mix_source)
            log.info("mixing the microphone of %s (%d in the mix)", identity, len(self._inputs))
        else:
            inp.task = self._spawn(self._pump(stream, identity), f"mic-{identity}", isolated=True)
            log.info("bridging the microphone of %s", identity)
        self._user_arrived()

    def _room_mix(self) -> Any:
        from livekit import rtc

        if self._room_mixer is None:
            self._room_mixer = rtc.AudioMixer(SAMPLE_RATE, 1, blocksize=SAMPLE_RATE // 50, stream_timeout_ms=40)
            self._mix_task = self._spawn(self._pump(self._room_mixer, None), "mic-mix")
        return self._room_mixer

    async def _pump(self, source: Any, identity: str | None) -> None:
        try:
            async for item in source:
                frame = getattr(item, "frame", item)
                client = self.client
                if client is not None:
                    client.send_audio(bytes(frame.data))
        finally:
            if identity is not None:
                await source.aclose()

    def _on_track_unsubscribed(self, track: Any, publication: Any, participant: Any) -> None:
        inp = self._inputs.get(participant.identity)
        if inp is not None and inp.track_sid == track.sid:
            self._release_input(participant.identity)
            self._after_departure()

    def _on_participant_disconnected(self, participant: Any) -> None:
        if participant.identity in self._inputs:
            log.info("%s left", participant.identity)
            self._release_input(participant.identity)
            self._after_departure()

    def _release_input(self, identity: str) -> None:
        inp = self._inputs.pop(identity, None)
        if inp is None:
            return
        if inp.task is not None:
            inp.task.cancel()  # the pump closes its stream
        else:
            self._room_mixer.remove_stream(inp.mix_source)
            self._spawn(inp.stream.aclose(), "mic-close")

    def _release_all_inputs(self) -> None:
        for identity in list(self._inputs):
            self._release_input(identity)

    def _after_departure(self) -> None:
        self._scan_participants()  # the next user, if someone is waiting
        if not self._inputs:
            self._start_idle_timer()

    # -- the Voice Agent session: starts with the first user, ends when the last has gone --

    def _user_arrived(self) -> None:
        if self._idle_task is not None:
            self._idle_task.cancel()
            self._idle_task = None
        if self._session_task is not None and not self._session_task.done():
            return
        self._calls += 1
        self.client = bridge.VoiceAgentClient(
            self.cfg.voice_agent_url,
            self.cfg.assemblyai_api_key,
            session_settings(self.cfg, self.tools.definitions()),
            self,
            bridge.ClientOptions(barge_in=self.cfg.barge_in, give_up_after_s=self.cfg.reconnect_give_up_s,
                                 input_backlog_ms=self.cfg.input_backlog_ms, tool_timeout_s=self.cfg.tool_timeout_s),
        )
        log.info("starting a Voice Agent session (call %d)", self._calls)
        if self._calls > 1 and self.controller.active is None:
            self._pick_bed()  # one ambient pick per call
        self._session_task = self._spawn(self._run_session(self.client), "session")

    def _start_idle_timer(self) -> None:
        if self._idle_task is None and self._session_task is not None and not self._session_task.done():
            self._idle_task = self._spawn(self._idle_then_end(), "idle")

    async def _idle_then_end(self) -> None:
        await asyncio.sleep(self.cfg.idle_timeout_s)
        self._idle_task = None
        if not self._inputs:
            log.info("no user for %.0f s: ending the Voice Agent session", self.cfg.idle_timeout_s)
            await self._end_session()
            self._call_ended()

    async def _end_session(self) -> None:
        client, task = self.client, self._session_task
        if client is not None:
            await client.end(timeout=1.5)
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), 1.0)
            except (asyncio.TimeoutError, Exception):
                pass

    async def _run_session(self, client: bridge.VoiceAgentClient) -> None:
        try:
            await client.run()
        finally:
            if self.client is client:
                self.client = None
                self._playing = None
                self._turn_ended_at = None
                self.log_ctx.fields["session_id"] = None
                self.log_ctx.fields["reply_id"] = None
                self._state_changed()

    # -- text typed in the frontend --

    def _on_chat(self, reader: Any, sender: str) -> None:
        """Who sent it and how big it says it is are checked before a byte is read."""
        refusal = None
        if sender not in self._inputs:
            refusal = "not the bridged user"
        elif (reader.info.size or 0) > MAX_CHAT_BYTES:
            refusal = f"{reader.info.size} bytes, over the {MAX_CHAT_BYTES}-byte limit"
        elif not self._chat_rate.allow(sender):
            refusal = "too many messages"
        if refusal is not None:
            reader.close()
            if self._input_errors.allow(f"chat:{sender}"):
                log.info("ignoring chat from %s (%s)", sender[:64], refusal)
            return
        self._spawn(self._read_chat(reader, sender), "chat", isolated=True)

    async def _read_chat(self, reader: Any, sender: str) -> None:
        """Text typed in the frontend becomes the user's turn. Read with a cap: a stream that
        grows past it (whatever its header said) is closed and dropped."""
        from livekit import rtc

        parts: list[str] = []
        size = 0
        try:
            async for chunk in reader:
                size += len(chunk.encode())
                if size > MAX_CHAT_BYTES:
                    reader.close()
                    log.info("ignoring chat from %s (over %d bytes)", sender[:64], MAX_CHAT_BYTES)
                    return
                parts.append(chunk)
        except rtc.StreamError as e:  # aborted by its sender, or cut by a disconnect
            log.info("chat from %s was not completed (%s)", sender[:64], _one_line(e))
            return
        text = "".join(parts).strip()
        if not text:
            return
        if len(text) > MAX_CHAT_CHARS:
            log.warning("chat message from %s truncated to %d characters", sender[:64], MAX_CHAT_CHARS)
            text = text[:MAX_CHAT_CHARS]
        client = self.client
        if client is None or not client.protocol.ready:
            log.warning("chat message from %s dropped: no Voice Agent session yet", sender)
            return
        log.info("chat from %s (%d characters)", sender, len(text))
        await client.send_text(text)

    # -- BridgeEvents: called on the event loop by the bridge --

    def on_session_ready(self, session_id: str, resumed: bool) -> None:
        self.log_ctx.fields["session_id"] = session_id
        log.info("Voice Agent session %s (%s)", "resumed" if resumed else "ready", session_id)
        self._state_changed()

    def on_speech_started(self) -> None:
        log.debug("user started speaking")
        self.mixer.stop_thinking()
        self._turn_ended_at = None
        self._state_changed()

    def on_speech_stopped(self) -> None:
        self._turn_ended_at = time.monotonic()
        choice = self.thinking.pick(self._rng)  # a new pick every thinking phase
        if choice is not None:
            volume = choice.clip.volume if choice.clip.volume is not None else self.cfg.thinking_volume
            self.mixer.start_thinking(choice.sound.name, choice.sound.samples, volume)
        self._state_changed()

    def _user_caption_identity(self) -> tuple[str, str | None] | None:
        if len(self._inputs) != 1:
            return None  # nobody, or a mix of several people: no single speaker to attribute
        inp = next(iter(self._inputs.values()))
        return inp.identity, inp.track_sid

    def on_user_transcript(self, text: str, item_id: str | None, final: bool) -> None:
        who = self._user_caption_identity()
        if who is not None and text:
            self.captions.user(who[0], who[1], item_id, text, final)

    def on_reply_started(self, reply_id: str) -> None:
        self.log_ctx.fields["reply_id"] = reply_id

    def on_reply_audio(self, reply_id: str, pcm: bytes) -> None:
        if self._turn_ended_at is not None:
            self._turns += 1
            latency_ms = (time.monotonic() - self._turn_ended_at) * 1000
            barge_ins = self.client.protocol.counters["barge_ins"] if self.client is not None else 0
            log.info("turn %d: first reply audio %.0f ms after the user's end of turn; %d barge-ins so far",
                     self._turns, latency_ms, barge_ins,
                     extra={"fields": {"turn": self._turns, "latency_ms": round(latency_ms), "barge_ins": barge_ins}})
            self._turn_ended_at = None
        self.mixer.push_reply(reply_id, pcm)

    def on_agent_transcript_delta(self, reply_id: str, delta: str, start_ms: float | None) -> None:
        if start_ms is not None:
            position = int(start_ms * SAMPLE_RATE / 1000)
        else:
            st = self.mixer.reply_stats(reply_id)
            position = st.received if st is not None else 0
        self.captions.agent_word(reply_id, delta, position)

    def on_agent_transcript(self, reply_id: str, text: str, interrupted: bool) -> None:
        st = self.mixer.reply_stats(reply_id)
        self.captions.agent_text(reply_id, text, st.received if st is not None else 0)

    def on_interrupt(self, reply_id: str, reason: str) -> None:
        st = self.mixer.interrupt(reply_id)
        played = st.played if st is not None else 0
        self.captions.agent_done(reply_id, cut_at=played)
        if st is not None:
            log.info("reply %s interrupted (%s) after %.2f s of %.2f s received",
                     reply_id, reason, st.played / SAMPLE_RATE, st.received / SAMPLE_RATE)

    def on_reply_done(self, reply_id: str, status: str) -> None:
        self.captions.agent_done(reply_id)
        if not self._audible and self._playing == reply_id:
            self._playing = None  # its audio had already finished playing
        if self.log_ctx.fields["reply_id"] == reply_id:
            self.log_ctx.fields["reply_id"] = None
        self._state_changed()

    def on_session_lost(self) -> None:
        # The reply in flight is abandoned: close its caption once its audio has played,
        # and let the state follow the audio, not a reply that will never be "done".
        self.captions.all_done()
        if not self._audible:
            self._playing = None
        self._state_changed()

    # -- tools --

    async def on_tool_call(self, name: str, arguments: dict[str, Any], call_id: str) -> Any:
        """Runs concurrently with the audio path (the bridge owns the task and its timeout).
        While it runs the agent is 'thinking' and the thinking cue plays."""
        import tools as tools_mod

        log.info("tool %s called (%s)", name, call_id)
        choice = self.thinking.pick(self._rng) if name != "end_call" else None
        if choice is not None:
            volume = choice.clip.volume if choice.clip.volume is not None else self.cfg.thinking_volume
            self.mixer.start_thinking(choice.sound.name, choice.sound.samples, volume)
        self._state_changed_soon()
        user = next(iter(self._inputs), None)
        ctx = tools_mod.ToolContext(self.cfg.room_name, user, call_id, self._play_cue_for_tool, self._end_call_from_tool)
        try:
            return await self.tools.call(name, arguments, ctx)
        except (tools_mod.ToolCallError, tools_mod.ToolFailed) as e:
            raise bridge.ToolError(str(e)) from None  # meant for the agent; anything else is not
        finally:
            self._state_changed_soon()

    def _state_changed_soon(self) -> None:
        # The bridge counts a tool as running until its task ends: look again next tick.
        asyncio.get_running_loop().call_soon(self._state_changed)

    async def _play_cue_for_tool(self, clip: str, volume: float | None) -> bool:
        import sounds

        try:
            sound = await asyncio.to_thread(sounds.load, clip, target_lufs=self.cfg.cue_target_lufs)
        except sounds.SoundError as e:
            log.warning("tool cue %s cannot be played: %s", clip, e)
            return False
        return await self.mixer.play_cue(sound.name, sound.samples,
                                         self.cfg.thinking_volume if volume is None else volume)

    async def _end_call_tool(self) -> dict[str, Any]:
        """The built-in end_call tool: answer at once, hang up after the goodbye."""
        await self._end_call_from_tool("the agent ended the call")
        return {"ok": True, "note": "The call will end once your current reply has been heard. Say goodbye now if "
                                    "you have not."}

    async def _end_call_from_tool(self, reason: str | None) -> None:
        if self._hangup is None or self._hangup.done():
            self._hangup = self._spawn(self._hang_up(reason or "end_call"), "hang-up")

    async def _hang_up(self, reason: str) -> None:
        """Let the agent finish: the reply that called the tool, and a goodbye it may speak
        after the tool's result, must be fully heard in the room. Then fade the bed, end the
        session and end the call for everyone (or only leave)."""
        await asyncio.sleep(0.2)  # the tool.result goes out first
        grace_s = 2.0
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < grace_s:
            client = self.client
            busy = client is not None and client.protocol.current_reply is not None
            if busy or self.mixer.snapshot()["reply_queued_ms"] or self._playing is not None:
                quiet_since = time.monotonic()
            await asyncio.sleep(0.05)
        await self.mixer.wait_reply_played()
        log.info("hanging up (%s): %s", reason, "deleting the room" if self.cfg.end_call_action == "delete_room"
                 else "leaving the room")
        self.mixer.stop_bed(500)
        await asyncio.gather(self._end_session(), asyncio.sleep(0.5 + self.cfg.output_queue_ms / 1000))
        self._call_ended()
        self._hung_up = True
        room = self.room
        if self.cfg.end_call_action == "delete_room":
            from livekit import api

            try:
                async with server_api(self.cfg) as lk:
                    await lk.room.delete_room(api.DeleteRoomRequest(room=self.cfg.room_name))
                return
            except Exception as e:
                log.warning("could not delete room %s (%s); leaving it instead", self.cfg.room_name, _one_line(e))
        if room is not None and room.isconnected():
            await room.disconnect()

    def on_session_ended(self) -> None:
        log.info("Voice Agent session ended")


async def _frames(stream: Any) -> Any:
    """AudioStream events -> frames, for rtc.AudioMixer."""
    async for event in stream:
        yield event.frame


def _rss_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _one_line(e: BaseException) -> str:
    return (str(e) or type(e).__name__).splitlines()[0][:200]


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


def load_bank(cfg: Config, variable: str) -> Any:
    """Decode every clip a sound variable names, once, at start; a bad file or entry is a
    configuration error."""
    import sounds

    target = cfg.ambient_target_lufs if variable == "AMBIENT_SOUND" else cfg.cue_target_lufs
    try:
        return sounds.ClipBank(getattr(cfg, variable.lower()), variable, target_lufs=target, loop=True)
    except sounds.SoundError as e:
        message = str(e)
        raise ConfigError(message if message.startswith(variable) else f"{variable}: {message}") from None


def load_tool_registry(cfg: Config, end_call_cb: Callable[[], Any]) -> Any:
    """The tools the agent is offered: the built-in end_call, and TOOLS_MODULE's."""
    import tools as tools_mod

    loaded: list[Any] = []
    if cfg.tools_module.strip():
        try:
            loaded = tools_mod.load_tools(cfg.tools_module)
        except tools_mod.ToolError as e:
            raise ConfigError(f"TOOLS_MODULE: {e}") from None
    if cfg.end_call_tool:
        async def end_call() -> dict[str, Any]:
            """End the call when the conversation is over. Say goodbye first, then call this: the line is closed
            once your goodbye has been heard."""
            return await end_call_cb()

        loaded.append(tools_mod.make_tool(end_call, "end_call"))
    return tools_mod.ToolRegistry(loaded)


def load_banks(cfg: Config) -> tuple[Any, Any]:
    return load_bank(cfg, "AMBIENT_SOUND"), load_bank(cfg, "THINKING_SOUND")


# --- systemd ----------------------------------------------------------------------------------------


class SystemdNotifier:
    """sd_notify(3) over $NOTIFY_SOCKET, without a dependency: READY=1 once we can take
    calls, STATUS= lines, and WATCHDOG=1 pings while the audio loop is alive."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        addr = environ.get("NOTIFY_SOCKET", "")
        self.address = ("\0" + addr[1:]) if addr.startswith("@") else addr
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and (not pid or pid == str(os.getpid())) else 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *lines: str) -> bool:
        if not self.address:
            return False
        import socket

        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError as e:
            log.debug("sd_notify failed: %s", e)
            return False


# --- preflight check ---------------------------------------------------------------------------


async def preflight(env: Mapping[str, str], out: Callable[[str], None] = print) -> int:
    """`python worker.py check`: every precondition, one line each, with the fix."""
    failures = 0

    def ok(what: str) -> None:
        out(f"\u2713 {what}")

    def bad(what: str, fix: str) -> None:
        nonlocal failures
        failures += 1
        out(f"\u2717 {what}\n    fix: {fix}")

    if sys.version_info >= (3, 10):
        ok(f"Python {sys.version.split()[0]}")
    else:
        bad(f"Python {sys.version.split()[0]} is too old", "use Python 3.10 or newer")
    try:
        cfg = load_config(env)
    except ConfigError as e:
        bad(f"configuration: {e}", "set it in the environment or .env (see .env.example)")
        out("1 check failed" if failures == 1 else f"{failures} checks failed")
        return 1
    ok("configuration: every variable present and valid")

    from livekit import api

    redact = LogContext(cfg.secrets).redact
    try:
        async with server_api(cfg) as lk:
            rooms = await asyncio.wait_for(lk.room.list_rooms(api.ListRoomsRequest()), 10)
        ok(f"LiveKit at {cfg.livekit_url}: reachable, key and secret accepted ({len(rooms.rooms)} rooms)")
    except api.TwirpError as e:
        if e.status in (401, 403) or "unauthenticated" in str(e.code).lower():
            bad(f"LiveKit at {cfg.livekit_url} rejected LIVEKIT_API_KEY/LIVEKIT_API_SECRET",
                "copy the key and secret of this server (livekit-server --dev: devkey / secret)")
        else:
            bad(f"LiveKit at {cfg.livekit_url}: {redact(str(e))[:160]}", "check LIVEKIT_URL and the server's logs")
    except Exception as e:
        bad(f"LiveKit at {cfg.livekit_url} is not reachable ({redact(_one_line(e))})",
            "start the server (livekit-server --dev) or fix LIVEKIT_URL")

    try:
        sid = await bridge.verify_session(cfg.voice_agent_url, cfg.assemblyai_api_key, session_settings(cfg))
        ok(f"Voice Agent API at {cfg.voice_agent_url}: key accepted, session {sid} opened and ended")
    except FatalError as e:
        bad(f"Voice Agent API: {redact(str(e))}", "set ASSEMBLYAI_API_KEY to a key from your AssemblyAI dashboard"
            if e.exit_code == bridge.EXIT_API_AUTH else "fix the session setting named above")
    except Exception as e:
        bad(f"Voice Agent API at {cfg.voice_agent_url} is not reachable ({redact(_one_line(e))})",
            "check VOICE_AGENT_URL and this machine's access to it")

    for variable in ("AMBIENT_SOUND", "THINKING_SOUND"):
        try:
            bank = load_bank(cfg, variable)
        except ConfigError as e:
            bad(str(e), f"point {variable} at a playable file, a builtin:<name>, or none")
            continue
        ok(f"{variable}: " + (", ".join(f"{s.name} ({s.duration_s:.1f} s)" for s in bank.sounds()) or "none"))

    out("all checks passed" if not failures else ("1 check failed" if failures == 1 else f"{failures} checks failed"))
    return 0 if not failures else 1


# --- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worker.py",
        description="Bridge a LiveKit room to AssemblyAI's Voice Agent API. Every setting is an environment "
                    "variable (also read from ./.env); a flag overrides it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=exit_code_help(),
    )
    parser.add_argument("command", nargs="?", default="run", choices=("run", "token", "check", "control"),
                        help="run (default): run the worker; token: print a user token and what to paste into "
                             "the Agents Playground or meet.livekit.io; check: verify the configuration, the "
                             "LiveKit server, the Voice Agent API key and the sound files, one line each; "
                             "control METHOD [JSON]: call the running worker's control API (mix_audio, play, "
                             "state) as --identity")
    parser.add_argument("method", nargs="?", help="control: mix_audio, play or state")
    parser.add_argument("payload", nargs="?", default="{}", help="control: the JSON payload (default {})")
    parser.add_argument("--identity", default=None,
                        help="token: the user's identity (default: user); control: the caller's identity, which "
                             "must be in CONTROL_IDENTITIES (default: operator)")
    parser.add_argument("--file", default=None,
                        help="control mix_audio/play: send this sound file as the audio (large files go as a "
                             "byte stream)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(Config):
        g = f.metadata["group"]
        if g not in groups:
            groups[g] = parser.add_argument_group(g)
        default = "required" if f.metadata["required"] else (f"default: {f.default!r}" if f.default not in (None, "")
                                                             else "default: empty")
        groups[g].add_argument(
            "--" + f.name.replace("_", "-"), dest=env_name(f), metavar="VALUE",
            help=f"{f.metadata['help']} [env {env_name(f)}; {default}]",
        )
    return parser


EXIT_CODES = [
    (EXIT_OK, "stopped cleanly (SIGTERM/SIGINT)"),
    (EXIT_INTERNAL, "internal error (a bug: please report it)"),
    (EXIT_CONFIG, "configuration error: a missing or invalid variable, or a bad sound file"),
    (bridge.EXIT_API_AUTH, "the Voice Agent API rejected ASSEMBLYAI_API_KEY"),
    (bridge.EXIT_API_CONFIG, "the Voice Agent API rejected the session configuration"),
    (bridge.EXIT_API_GAVE_UP, "gave up reconnecting to the Voice Agent API"),
    (EXIT_LIVEKIT_AUTH, "LiveKit rejected LIVEKIT_API_KEY / LIVEKIT_API_SECRET"),
    (EXIT_LIVEKIT_UNREACHABLE, "gave up joining the LiveKit server"),
    (EXIT_DUPLICATE_IDENTITY, "another participant joined with the agent's identity"),
    (EXIT_ROOM_DELETED, "the room was deleted or the agent was removed from it"),
]


def exit_code_help() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:>2}  {text}" for code, text in EXIT_CODES)


def main(argv: list[str] | None = None) -> int:
    # PyJWT warns about short HMAC keys; livekit-server --dev's "secret" is one. Not ours to nag about.
    warnings.filterwarnings("ignore", message="The HMAC key is")
    args = build_parser().parse_args(argv)
    cli = {k: v for k, v in vars(args).items() if k.isupper()}
    if args.command == "check":
        logging.basicConfig(level=logging.CRITICAL)
        return asyncio.run(preflight(gather_env(cli)))
    try:
        cfg = load_config(gather_env(cli),
                          optional=("ASSEMBLYAI_API_KEY",) if args.command in ("token", "control") else ())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "token":
        return print_token(cfg, args.identity or "user")
    if args.command == "control":
        return asyncio.run(control_client(cfg, args.method, args.payload, args.identity or "operator", args.file))
    log_ctx = setup_logging(cfg, cfg.log_level, cfg.log_format)
    if cfg.audio_priority != "normal":
        scheduling.raise_main_thread(cfg.audio_priority)
    return asyncio.run(_run(cfg, log_ctx))


async def control_client(cfg: Config, method: str | None, payload: str, identity: str, file: str | None) -> int:
    """`python worker.py control METHOD [JSON] [--file F]`: join as ``identity``, call the
    worker's control method, print the JSON answer."""
    from livekit import rtc

    if method not in control.METHODS:
        print(f"error: control needs a method: {', '.join(control.METHODS)}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        args = json.loads(payload)
        assert isinstance(args, dict)
    except (ValueError, AssertionError):
        print("error: the payload must be a JSON object, e.g. '{\"clip\": \"builtin:cafe\", \"volume\": 0.3}'",
              file=sys.stderr)
        return EXIT_CONFIG
    audio = Path(file).read_bytes() if file else None
    room = rtc.Room()
    await room.connect(cfg.livekit_url, mint_token(cfg, identity, name=identity), rtc.RoomOptions(auto_subscribe=False))
    try:
        if audio is not None and len(audio) > 10_000:
            # Too big for an RPC payload: a byte stream, answered on mix_audio.result.
            answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()

            def on_result(reader: Any, sender: str) -> None:
                async def read() -> None:
                    text = await reader.read_all()
                    if not answer.done():
                        answer.set_result(text)
                asyncio.ensure_future(read())

            room.register_text_stream_handler(control.TOPIC_RESULT, on_result)
            attrs = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in args.items()}
            attrs["action"] = method
            writer = await room.local_participant.stream_bytes(
                name=Path(file).name, topic=control.TOPIC_UPLOAD, attributes=attrs,
                destination_identities=[cfg.agent_identity], total_size=len(audio))
            for i in range(0, len(audio), 15000):
                await writer.write(audio[i:i + 15000])
            await writer.aclose()
            result = await asyncio.wait_for(answer, 60)
            print(result)
            return 0 if json.loads(result).get("ok") else 1
        if audio is not None:
            args["audio"] = base64.b64encode(audio).decode()
        try:
            print(await room.local_participant.perform_rpc(destination_identity=cfg.agent_identity, method=method,
                                                           payload=json.dumps(args), response_timeout=60))
            return 0
        except rtc.RpcError as e:
            print(f"error: {e.message} (code {e.code})", file=sys.stderr)
            return 1
    finally:
        await room.disconnect()


def print_token(cfg: Config, identity: str) -> int:
    """What a person needs to join the agent's room from a browser."""
    token = mint_token(cfg, identity, ttl=datetime.timedelta(hours=24))
    url = cfg.livekit_url
    print(f"""LiveKit URL:  {url}
Room:         {cfg.room_name}
Identity:     {identity}
Token (24 h): {token}

Agents Playground (https://agents-playground.livekit.io): choose "Manual", paste the URL and the token.
meet.livekit.io: open "Custom", paste the URL and the token.
Or open: https://meet.livekit.io/custom?liveKitUrl={url}&token={token}""")
    return EXIT_OK


async def _run(cfg: Config, log_ctx: LogContext) -> int:
    worker = Worker(cfg, log_ctx)
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signame: str) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second %s: exiting now", signame)
            os._exit(EXIT_OK)
        log.info("%s received: shutting down", signame)
        worker.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    loop.add_signal_handler(signal.SIGUSR1, worker.dump_counters)
    try:
        return await worker.run()
    except ConfigError as e:
        report_fatal(cfg, log_ctx, str(e), EXIT_CONFIG)
        return EXIT_CONFIG
    except FatalError as e:
        report_fatal(cfg, log_ctx, str(e), e.exit_code)
        return e.exit_code


def report_fatal(cfg: Config, log_ctx: LogContext, message: str, code: int) -> None:
    """The one line that says why the process ends: plain on stderr, or a JSON log
    object when LOG_FORMAT=json (log shippers parse every line)."""
    if cfg.log_format == "json":
        log.critical(message, extra={"fields": {"exit_code": code}})
    else:
        print(f"error: {log_ctx.redact(message)}", file=sys.stderr)


if __name__ == "__main__":
    code = main()
    # Everything we own is closed by now. Skip the interpreter's teardown of the LiveKit
    # native library, which can crash on its way out (seen as SIGSEGV after a kick).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
