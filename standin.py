"""A local stand-in for AssemblyAI's Voice Agent API: the tests' double of the service, and
the echo agent of `python worker.py demo` (no account, no key, nothing leaves this machine).

It is a test double of a remote service, so it tries to be honest: it follows the Voice Agent
API's contract as documented (the team's notes: voice-agent-api.md), rejects what the real
service rejects, and where the contract is silent (close code after a clean end, event order on
barge-in, greeting wrapping, chunk sizes, back-channel events, optional SDK-only fields ...) it
lets a test pick the variant through `StandInOptions`, which stays mutable while the server runs.

There is no speech recognition and no LLM. A user's "transcript" describes the audio it heard
("tone 440 Hz 1.5 s": dominant frequency and duration; with `describe="speech"`, as the demo
runs it, "(1.5 s of speech)"), and replies are sine tones (or, in echo mode, the user's last
turn played back, after a two-note chime as the greeting) with a made-up sentence spread over
the audio. Its "model" knows only what the real model is reported to see: the system prompt,
`reply.create` instructions and the audio, never `conversation.message` content ([sdk]: "not
reliably visible to the model", [3p]: "never reaches the model"). With `model_echo` its replies
say what it was told, so a test can check that something reached the model, not merely the
socket. It listens on loopback only.

By hand (reply mode echo, so you hear yourself back); `python worker.py demo` does the same
for you, with the key in the environment rather than on a command line:

    python standin.py --port 8765
    VOICE_AGENT_URL=ws://127.0.0.1:8765/v1/ws ASSEMBLYAI_API_KEY=standin python worker.py

Reading order: options and records (what tests see), pure audio helpers, the turn detector,
config validation, one `_Session` per Voice Agent session (it outlives its sockets, for resume),
and `StandIn`, the server that owns the sockets and the sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import datetime
import hmac
import ipaddress
import json
import logging
import math
import random
import re
import secrets
import signal
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine, Literal, Mapping, NamedTuple
from urllib.parse import urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

log = logging.getLogger("standin")

PATH = "/v1/ws"
SAMPLE_RATE = 24_000
ENCODING_RATES = {"audio/pcm": 24_000, "audio/pcmu": 8_000, "audio/pcma": 8_000}
FRAME_MS = 20

# Voices the real service is documented to have, from two sources (no list is hard-coded in
# the bridge: the catalogue changes):
# - AssemblyAI's docs, "Supported languages" (assemblyai.com/docs/voice-agents/voice-agent-api/
#   supported-languages), recommended voices: ivy james tyler winter bella david kyle helen
#   martha river emma victor eleanor, pierre, giulia luca, lucia mateo diego, arjun, dmitri;
# - AssemblyAI's skill notes (github.com/AssemblyAI/assemblyai-skill, skills/assemblyai/
#   references/voice-agents.md), 18 English voices: ivy james tyler autumn sam mia bella david
#   jack kyle helen martha river emma victor eleanor sophie oliver, and multilingual arjun ethan
#   mei dmitri lukas lena pierre mina joon ren hana giulia luca lucia mateo diego.
# Left out: ivy, claire and dawn, found invalid on the live service on 2026-09-24 [3p]
# (voice-agent-api.md), although the docs still use ivy and claire in examples.
VOICES = ("james", "tyler", "winter", "autumn", "sam", "mia", "bella", "david", "jack", "kyle", "helen",
          "martha", "river", "emma", "victor", "eleanor", "sophie", "oliver", "arjun", "ethan", "mei",
          "dmitri", "lukas", "lena", "pierre", "mina", "joon", "ren", "hana", "giulia", "luca", "lucia",
          "mateo", "diego")

# --------------------------------------------------------------------------------------------
# Options and records: the part of the stand-in that tests read and steer.
# --------------------------------------------------------------------------------------------


@dataclass
class StandInOptions:
    """Behaviour switches. Read when used, so a test may change them between steps
    (`max_message_bytes` applies from the next connection, `compression` from `start()`)."""

    api_key: str = "standin"
    seed: int = 1  # seeds the server's random.Random (chunk sizes)
    # -- auth: how a missing/malformed/wrong key is refused. Observed live: a session.error
    #    frame (UNAUTHORIZED) then close 1008; the docs also allow an HTTP 401/403 upgrade
    #    refusal, and a bare close 1008 whose reason says UNAUTHORIZED.
    auth_failure: Literal["http", "close1008", "error_frame"] = "error_frame"
    auth_http_status: int = 401  # for auth_failure="http" (the contract allows 401 or 403)
    auth_close_reason: str = "UNAUTHORIZED"  # for the close 1008 of "close1008" and "error_frame"
    # -- refused handshakes: the next sockets get this session.error, then a close. At capacity
    #    the service sends server_error ("at capacity, try again later") and closes 1008;
    #    also seen: at_capacity, concurrency_exceeded; agent_init_failed / agent_timeout come
    #    before session.ready when the agent worker fails to start. None: accept.
    refuse_sessions_with: str | None = None
    refuse_close_code: int = 1008
    # -- limits
    max_message_bytes: int = 1 << 20  # larger client messages: close 1009
    rate_limit_s: float | None = 1.1  # audio seconds allowed in any 1 s of wall clock; None = off
    compression: str | None = "deflate"  # permessage-deflate offered by the server (read at start)
    # -- turn detection (energy based)
    speech_threshold_dbfs: float = -45.0  # shifted by turn_detection.vad_threshold (see _Session)
    speech_start_ms: int = 60  # this much voice in a row starts speech
    default_min_silence_ms: int = 600  # when the session sets no turn_detection.min_silence
    user_delta_ms: int = 400  # transcript.user.delta cadence while speech continues
    default_interruption_delay_ms: int = 150  # when the session sets no interruption_delay
    speech_started_on_backchannel: bool = True  # False: during a reply, announce speech only if it interrupts
    # -- replies
    reply_mode: Literal["tone", "echo"] = "tone"
    # What the user's "transcript" and an echo's text say: "tone" ("tone 440 Hz 1.5 s", what the
    # tests match), or "speech" ("(1.5 s of speech)", for people trying the demo)
    describe: Literal["tone", "speech"] = "tone"
    think_ms: int = 150  # pause between the end of a user turn / reply.create and reply.started
    reply_freq_hz: float = 1000.0
    reply_seconds: float = 2.0
    greeting_freq_hz: float = 660.0
    greeting_seconds: float = 1.0
    reply_amplitude: float = 0.5  # full scale = 1.0; scaled by output.volume / 100 when set
    chunk_ms: tuple[int, int] = (40, 120)  # reply.audio chunk duration bounds, drawn per chunk
    lead_ms: int = 300  # how far ahead of real time the reply audio may run
    # -- reply pacing, for benchmarks of a bursty or jittery API (lead_ms above is the burst)
    first_chunk_ms: int | None = None  # duration of every reply's first chunk (None: drawn like the rest)
    chunk_gap_ms: tuple[int, int] | None = None  # (k, ms): chunk k (0 = first) of every reply is sent ms late
    chunk_jitter_ms: int = 0  # every chunk after the first is held back a random 0..this ms
    # A barge-in is decided a random 0..this ms after the audio that triggers it (a real API's
    # processing and network time vary): without it, the decision is locked to the client's
    # 10 ms audio clocks at one phase for a whole session, which a benchmark must not measure.
    barge_in_jitter_ms: int = 0
    wrap_greeting: bool = True  # False: bare greeting audio + transcript, no reply.started/done
    barge_in_order: Literal["transcript_first", "done_first"] = "transcript_first"
    late_audio_after_interrupt: int = 0  # reply.audio chunks sent after the interruption events
    omit_done_status: bool = False  # completed reply.done without `status` (allowed by the contract)
    sdk_fields: bool = True  # False: leave out every field only the SDK models list
    unknown_events: bool = False  # sprinkle an unknown event type (clients must ignore it)
    odd_chunks: bool = False  # reply.audio chunks of odd byte length (a sample split across two chunks)
    model_echo: bool = False  # reply text says what the model was told (system prompt, instructions, heard)
    # -- tools
    tool_call_on_turn: tuple[str, dict] | None = None  # one-shot: next user turn calls this tool
    strict_tool_result_json: bool = True  # tool.result.result must parse as JSON
    # -- lifecycle
    extra_updated_before_ready: bool = False  # spurious session.updated before session.ready [3p]
    clean_close_code: int = 1000  # close code after session.ended
    resume_window_s: float = 30.0
    fail_next_resume: str | None = None  # one-shot: the next resume fails with this code
    resume_forgets: bool = False  # every resume fails with session_not_found
    max_session_s: float = 10_800.0  # then close 1008 "session_expired", without warning
    uppercase_codes: bool = False  # "UNAUTHORIZED" instead of "unauthorized"
    voices: tuple[str, ...] = field(default_factory=lambda: VOICES)
    # An invalid voice in the FIRST update closed the socket with 1008 [3p]; with this, a
    # session.error invalid_value (param output.voice) comes first. Later updates: an error only.
    invalid_voice_error_frame: bool = True
    # Stored agents (agent_id -> what the REST API stored): the first update {agent_id} applies it.
    known_agents: Mapping[str, dict] = field(default_factory=lambda: {
        "agent_standin": {"system_prompt": "You are the stand-in's stored agent.",
                          "greeting": "Hello from the stored agent."}})


@dataclass
class ReplyRecord:
    reply_id: str
    kind: str  # "greeting" | "turn" | "create" (reply.create and trigger_reply) | "tool"
    started_at: float | None = None
    first_audio_at: float | None = None
    interrupted_at: float | None = None
    done_at: float | None = None
    status: str | None = None  # "completed" | "interrupted" | "abandoned" (socket gone mid-reply)
    samples_sent: int = 0  # before any interruption; late chunks are counted in late_chunks
    text: str = ""  # planned text; the truncated text once interrupted
    item_id: str = ""
    duration_s: float = 0.0
    call_id: str | None = None  # tool replies: the tool.call and the spoken answer share it
    late_chunks: int = 0
    instructions: str | None = None  # reply.create instructions it answers, if any
    prompt: str = ""  # the system prompt when it was composed: with instructions and audio, all the model sees


@dataclass
class SessionRecord:
    session_id: str
    updates: list[dict] = field(default_factory=list)
    received: list[tuple[float, dict]] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)
    audio_arrivals: list[tuple[float, int]] = field(default_factory=list)
    audio_before_ready: int = 0
    sent: list[tuple[float, dict]] = field(default_factory=list)
    errors_sent: list[str] = field(default_factory=list)
    replies: list[ReplyRecord] = field(default_factory=list)
    tool_results: list[dict] = field(default_factory=list)
    tool_timeouts: list[str] = field(default_factory=list)  # call ids the service gave up on
    ended: bool = False
    resumes: int = 0
    sockets: int = 0
    config: dict = field(default_factory=dict)
    ready_at: float | None = None
    dropped_at: float | None = None
    expired: bool = False

    def events(self, type: str) -> list[dict]:
        """Server events of that type, in the order sent."""
        return [m for _, m in self.sent if m.get("type") == type]

    def received_events(self, type: str) -> list[dict]:
        return [m for _, m in self.received if m.get("type") == type]


# --------------------------------------------------------------------------------------------
# Audio helpers (pure).
# --------------------------------------------------------------------------------------------


def tone(freq_hz: float, seconds: float, rate: int = SAMPLE_RATE, amplitude: float = 0.5,
         fade_ms: float = 5.0) -> np.ndarray:
    """A sine as int16, with linear fades at both ends."""
    n = max(0, int(round(seconds * rate)))
    t = np.arange(n) / rate
    x = amplitude * np.sin(2 * np.pi * freq_hz * t)
    fade = min(n // 2, int(rate * fade_ms / 1000))
    if fade:
        ramp = np.linspace(0.0, 1.0, fade, endpoint=False)
        x[:fade] *= ramp
        x[n - fade:] *= ramp[::-1]
    return np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)


def chime(rate: int = SAMPLE_RATE, amplitude: float = 0.5) -> np.ndarray:
    """Two short rising tones: the echo-mode greeting."""
    return np.concatenate([tone(660, 0.25, rate, amplitude), tone(880, 0.35, rate, amplitude)])


def rms_dbfs(pcm: np.ndarray) -> float:
    if len(pcm) == 0:
        return -math.inf
    rms = math.sqrt(float(np.mean(np.square(pcm.astype(np.float64)))))
    return 20 * math.log10(rms / 32768) if rms > 0 else -math.inf


def dominant_frequency(pcm: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    """Strongest frequency above 20 Hz: Hann window, zero padding, log-parabolic peak interpolation."""
    x = pcm.astype(np.float64)
    if len(x) < 32:
        return 0.0
    x = (x - x.mean()) * np.hanning(len(x))
    n = 1 << (2 * len(x) - 1).bit_length()
    spectrum = np.abs(np.fft.rfft(x, n))
    lo = max(1, int(20 * n / rate))
    k = lo + int(np.argmax(spectrum[lo:]))
    offset = 0.0
    if 0 < k < len(spectrum) - 1:
        a, b, c = np.log(spectrum[k - 1:k + 2] + 1e-12)
        denominator = a - 2 * b + c
        if denominator < 0:
            offset = 0.5 * (a - c) / denominator
    return (k + offset) * rate / n


def describe_audio(pcm: np.ndarray, rate: int = SAMPLE_RATE) -> str:
    """The stand-in's "transcript" of a user turn."""
    return f"tone {dominant_frequency(pcm, rate):.0f} Hz {len(pcm) / rate:.1f} s"


def resample(pcm: np.ndarray, src: int, dst: int) -> np.ndarray:
    if src == dst or len(pcm) == 0:
        return pcm
    if src == 3 * dst:  # 24 kHz -> 8 kHz: a 3-tap average is lowpass enough for a test double
        usable = len(pcm) - len(pcm) % 3
        return pcm[:usable].reshape(-1, 3).mean(axis=1).round().astype(np.int16)
    n = int(round(len(pcm) * dst / src))
    return np.interp(np.arange(n) * src / dst, np.arange(len(pcm)), pcm).round().astype(np.int16)


def _g711_table(encoding: str) -> np.ndarray:
    """The 256 linear values of G.711 mu-law or A-law codes (ITU-T G.711)."""
    codes = np.arange(256, dtype=np.int32)
    if encoding == "audio/pcmu":
        u = ~codes & 0xFF
        magnitude = (((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 7)
        return np.where(u & 0x80, 0x84 - magnitude, magnitude - 0x84)
    a = codes ^ 0x55
    exponent, mantissa = (a >> 4) & 7, a & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8,
                         ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    return np.where(a & 0x80, magnitude, -magnitude)


def sample_width(encoding: str) -> int:
    """Bytes per sample on the wire: 16-bit PCM or 8-bit G.711."""
    return 2 if encoding == "audio/pcm" else 1


def decode_audio(raw: bytes, encoding: str) -> np.ndarray:
    """Wire bytes -> int16 samples at the encoding's own rate."""
    if encoding == "audio/pcm":
        return np.frombuffer(raw, dtype="<i2").astype(np.int16)
    return _g711_table(encoding)[np.frombuffer(raw, dtype=np.uint8)].astype(np.int16)


def encode_audio(pcm: np.ndarray, encoding: str) -> bytes:
    if encoding == "audio/pcm":
        return pcm.astype("<i2").tobytes()
    table = _g711_table(encoding)  # nearest code per sample
    order = np.argsort(table, kind="stable")
    values = table[order]
    index = np.searchsorted((values[1:] + values[:-1]) / 2, pcm.astype(np.float64))
    return order[index].astype(np.uint8).tobytes()


# --------------------------------------------------------------------------------------------
# Turn detection (pure: works in audio time, knows nothing of sockets or clocks).
# --------------------------------------------------------------------------------------------


class TurnEvent(NamedTuple):
    kind: Literal["started", "progress", "stopped"]
    audio: np.ndarray  # the turn's audio so far (voiced span: onset to last voiced frame)


class TurnDetector:
    """Energy VAD over 20 ms frames.

    Speech starts after `start_ms` of frames louder than `threshold_dbfs`, and stops after
    `min_silence_ms` of quieter frames. While speech lasts, a "progress" event comes every
    `progress_ms`. Parameters are plain attributes: the session retunes them before each feed.
    """

    def __init__(self, rate: int = SAMPLE_RATE, *, threshold_dbfs: float = -45.0,
                 start_ms: int = 60, min_silence_ms: int = 600, progress_ms: int = 400) -> None:
        self.rate = rate
        self.threshold_dbfs = threshold_dbfs
        self.start_ms = start_ms
        self.min_silence_ms = min_silence_ms
        self.progress_ms = progress_ms
        self.frame = rate * FRAME_MS // 1000
        self.reset()

    def reset(self) -> None:
        self._pending = np.zeros(0, dtype=np.int16)  # samples short of a whole frame
        self._onset: list[np.ndarray] = []  # voiced frames not yet long enough to be speech
        self._turn: list[np.ndarray] = []  # frames since the onset, trailing silence included
        self._voiced_frames = 0  # frames of the turn up to its last voiced one
        self._start_frames = 0  # frames of the turn when "started" fired
        self._silence_ms = 0
        self._next_progress_ms = 0
        self.in_speech = False

    @property
    def voiced_since_start_ms(self) -> int:
        """Speech duration since "started" fired, up to the last voiced frame."""
        if not self.in_speech:
            return 0
        return (self._voiced_frames - self._start_frames) * FRAME_MS

    def feed(self, pcm: np.ndarray) -> list[TurnEvent]:
        samples = np.concatenate([self._pending, pcm.astype(np.int16)])
        whole = len(samples) - len(samples) % self.frame
        self._pending = samples[whole:]
        events: list[TurnEvent] = []
        for start in range(0, whole, self.frame):
            event = self._frame(samples[start:start + self.frame])
            if event is not None:
                events.append(event)
        return events

    def _frame(self, frame: np.ndarray) -> TurnEvent | None:
        voiced = rms_dbfs(frame) > self.threshold_dbfs
        if not self.in_speech:
            if not voiced:
                self._onset.clear()
                return None
            self._onset.append(frame)
            if len(self._onset) * FRAME_MS < self.start_ms:
                return None
            self.in_speech = True
            self._turn = self._onset
            self._start_frames = len(self._turn)
            self._onset = []
            self._voiced_frames = len(self._turn)
            self._silence_ms = 0
            self._next_progress_ms = self.progress_ms
            return TurnEvent("started", self._voiced())
        self._turn.append(frame)
        if voiced:
            self._voiced_frames = len(self._turn)
            self._silence_ms = 0
        else:
            self._silence_ms += FRAME_MS
            if self._silence_ms >= self.min_silence_ms:
                audio = self._voiced()
                self.in_speech = False
                self._turn = []
                return TurnEvent("stopped", audio)
        if voiced and self._voiced_frames * FRAME_MS >= self._next_progress_ms:
            self._next_progress_ms += self.progress_ms
            return TurnEvent("progress", self._voiced())
        return None

    def _voiced(self) -> np.ndarray:
        return np.concatenate(self._turn[:self._voiced_frames])


# --------------------------------------------------------------------------------------------
# Session config validation (pure).
# --------------------------------------------------------------------------------------------


class ConfigError(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


SESSION_FIELDS = {"system_prompt", "greeting", "tools", "agent_id", "input", "output"}
# Documented input settings ([doc], [sdk], AssemblyAI's skill notes; value sets from clients
# seen in use where the docs give none).
INPUT_FIELDS = {"format", "keyterms", "turn_detection", "transcription_mode", "transcription_prompt",
                "language_codes", "voice_focus", "voice_focus_threshold", "continuous_partials"}
TRANSCRIPTION_MODES = ("min_latency", "balanced", "max_accuracy")
VOICE_FOCUS = ("near-field", "far-field")
TRANSCRIPTION_PROMPT_CHARS = 1750
LANGUAGE_CODE = re.compile(r"[a-z]{2,3}(-[A-Za-z]{2,4})?")
OUTPUT_FIELDS = {"voice", "format", "volume"}
FORMAT_FIELDS = {"encoding", "sample_rate"}
TOOL_FIELDS = {"type", "name", "description", "parameters"}
TOOL_OPTIONAL_FIELDS = {"execution_mode", "timeout_seconds"}
TOOL_EXECUTION_MODES = ("interactive", "hold")
TOOL_TIMEOUT_RANGE = (1, 300)
DEFAULT_TOOL_TIMEOUT_S = 120
TURN_DETECTION_RANGES = {
    "vad_threshold": (0.0, 1.0),
    "min_silence": (50, 10_000),
    "max_silence": (50, 10_000),
    "interruption_delay": (0, 1_000),
}
DEFAULT_MIN_SILENCE_MS, DEFAULT_MAX_SILENCE_MS = 1000, 3000  # the service's documented defaults
IMMUTABLE_AFTER_READY = ("greeting", "output.voice", "output.format")  # input.format is mutable (AssemblyAI's notes)
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _known_fields(obj: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(obj, dict):
        raise ConfigError("invalid_config", f"{where} must be an object", where)
    for key in obj:
        if key not in allowed:
            raise ConfigError("invalid_config", f"unknown field {where}.{key}", f"{where}.{key}")
    return obj


def _check_string(obj: dict, key: str, where: str) -> None:
    if key in obj and not isinstance(obj[key], str):
        raise ConfigError("invalid_value", f"{where}{key} must be a string", f"{where}{key}")


def normalized_format(fmt: dict | None) -> dict:
    fmt = fmt or {"encoding": "audio/pcm"}
    return {"encoding": fmt["encoding"], "sample_rate": fmt.get("sample_rate", ENCODING_RATES[fmt["encoding"]])}


def _check_format(fmt: Any, where: str) -> None:
    _known_fields(fmt, FORMAT_FIELDS, where)
    encoding = fmt.get("encoding")
    if encoding not in ENCODING_RATES:
        raise ConfigError("invalid_value", f"{where}.encoding must be one of {sorted(ENCODING_RATES)}",
                          f"{where}.encoding")
    if "sample_rate" in fmt and fmt["sample_rate"] != ENCODING_RATES[encoding]:
        raise ConfigError("invalid_value", f"{encoding} is {ENCODING_RATES[encoding]} Hz only",
                          f"{where}.sample_rate")


def _check_tools(tools: Any) -> None:
    if not isinstance(tools, list):
        raise ConfigError("invalid_config", "tools must be an array", "tools")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        _known_fields(tool, TOOL_FIELDS | TOOL_OPTIONAL_FIELDS, where)
        missing = TOOL_FIELDS - tool.keys()
        if missing:
            raise ConfigError("invalid_config", f"{where} lacks {sorted(missing)}", f"{where}.{min(missing)}")
        if tool["type"] != "function":
            raise ConfigError("invalid_config", f'{where}.type must be "function"', f"{where}.type")
        if not isinstance(tool["name"], str) or not TOOL_NAME.fullmatch(tool["name"]):
            raise ConfigError("invalid_config", f"{where}.name must match {TOOL_NAME.pattern}", f"{where}.name")
        if tool["name"] in names:
            raise ConfigError("invalid_config", f"duplicate tool name {tool['name']!r}", f"{where}.name")
        names.add(tool["name"])
        if not isinstance(tool["description"], str):
            raise ConfigError("invalid_config", f"{where}.description must be a string", f"{where}.description")
        params = tool["parameters"]
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise ConfigError("invalid_config", f"{where}.parameters must be a JSON schema object",
                              f"{where}.parameters")
        if "execution_mode" in tool and tool["execution_mode"] not in TOOL_EXECUTION_MODES:
            raise ConfigError("invalid_value", f"{where}.execution_mode must be one of {TOOL_EXECUTION_MODES}",
                              f"{where}.execution_mode")
        lo, hi = TOOL_TIMEOUT_RANGE
        if "timeout_seconds" in tool and not (_is_number(tool["timeout_seconds"]) and lo <= tool["timeout_seconds"] <= hi):
            raise ConfigError("invalid_value", f"{where}.timeout_seconds must be a number in {lo}..{hi}",
                              f"{where}.timeout_seconds")


def _check_input(inp: Any) -> None:
    _known_fields(inp, INPUT_FIELDS, "input")
    if "format" in inp:
        _check_format(inp["format"], "input.format")
    if "keyterms" in inp:
        terms = inp["keyterms"]
        if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
            raise ConfigError("invalid_value", "input.keyterms must be an array of strings", "input.keyterms")
        if len(terms) > 100:
            raise ConfigError("invalid_value", "at most 100 keyterms", "input.keyterms")
    if "transcription_mode" in inp and inp["transcription_mode"] not in TRANSCRIPTION_MODES:
        raise ConfigError("invalid_value", f"input.transcription_mode must be one of {TRANSCRIPTION_MODES}",
                          "input.transcription_mode")
    if "transcription_prompt" in inp:
        prompt = inp["transcription_prompt"]
        if not isinstance(prompt, str) or len(prompt) > TRANSCRIPTION_PROMPT_CHARS:
            raise ConfigError("invalid_value", f"input.transcription_prompt must be a string of at most "
                              f"{TRANSCRIPTION_PROMPT_CHARS} characters", "input.transcription_prompt")
    if "language_codes" in inp:
        codes = inp["language_codes"]
        if not isinstance(codes, list) or not all(isinstance(c, str) and LANGUAGE_CODE.fullmatch(c) for c in codes):
            raise ConfigError("invalid_value", "input.language_codes must be an array of language codes",
                              "input.language_codes")
    if "voice_focus" in inp and inp["voice_focus"] not in VOICE_FOCUS:
        raise ConfigError("invalid_value", f"input.voice_focus must be one of {VOICE_FOCUS}", "input.voice_focus")
    threshold = inp.get("voice_focus_threshold")
    if "voice_focus_threshold" in inp and not (_is_number(threshold) and 0 <= threshold <= 1):
        raise ConfigError("invalid_value", "input.voice_focus_threshold must be a number in 0..1",
                          "input.voice_focus_threshold")
    if "continuous_partials" in inp and not isinstance(inp["continuous_partials"], bool):
        raise ConfigError("invalid_value", "input.continuous_partials must be a boolean", "input.continuous_partials")
    if "turn_detection" in inp:
        td = _known_fields(inp["turn_detection"], set(TURN_DETECTION_RANGES) | {"interrupt_response"},
                           "input.turn_detection")
        for key, value in td.items():
            param = f"input.turn_detection.{key}"
            if key == "interrupt_response":
                if not isinstance(value, bool):
                    raise ConfigError("invalid_value", f"{param} must be a boolean", param)
                continue
            lo, hi = TURN_DETECTION_RANGES[key]
            if not _is_number(value) or not lo <= value <= hi:
                raise ConfigError("invalid_value", f"{param} must be a number in {lo}..{hi}", param)


def _check_output(out: Any, voices: tuple[str, ...]) -> None:
    _known_fields(out, OUTPUT_FIELDS, "output")
    if "voice" in out and out["voice"] not in voices:
        raise ConfigError("invalid_value", f"unknown voice {out['voice']!r}; known: {', '.join(voices)}",
                          "output.voice")
    if "format" in out:
        _check_format(out["format"], "output.format")
    volume = out.get("volume")
    if volume is not None and (not _is_number(volume) or not 0 <= volume <= 100):
        raise ConfigError("invalid_value", "output.volume must be 0..100 or null", "output.volume")


def _merge(current: dict, update: dict) -> dict:
    """Nested merge for input/output/turn_detection; every other value (tools, format ...) replaces."""
    merged = dict(current)
    for key, value in update.items():
        if key in ("input", "output", "turn_detection") and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _lookup(config: dict, path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def validate_update(update: Any, current: dict, *, ready: bool, voices: tuple[str, ...],
                    known_agents: Mapping[str, dict]) -> dict:
    """Check one session.update payload against the config so far; return the merged config.

    Raises ConfigError. An update is all or nothing: nothing of a rejected update is applied.
    """
    _known_fields(update, SESSION_FIELDS, "session")
    if "agent_id" in update:
        if ready:
            raise ConfigError("agent_id_not_first", "agent_id is only allowed in the first update", "agent_id")
        if len(update) > 1:
            raise ConfigError("invalid_config", "agent_id is exclusive with every other field", "agent_id")
        if not isinstance(update["agent_id"], str):
            raise ConfigError("invalid_value", "agent_id must be a string", "agent_id")
        if update["agent_id"] not in known_agents:
            raise ConfigError("agent_not_found", f"no agent {update['agent_id']!r}", "agent_id")
        return {**known_agents[update["agent_id"]], "agent_id": update["agent_id"]}
    for key in ("system_prompt", "greeting"):
        _check_string(update, key, "")
    if "tools" in update:
        _check_tools(update["tools"])
    if "input" in update:
        _check_input(update["input"])
    if "output" in update:
        _check_output(update["output"], voices)
    merged = _merge(current, update)
    td = _lookup(merged, "input.turn_detection") or {}
    if td.get("min_silence", DEFAULT_MIN_SILENCE_MS) >= td.get("max_silence", DEFAULT_MAX_SILENCE_MS):
        raise ConfigError("invalid_value", "min_silence must be less than max_silence",
                          "input.turn_detection.min_silence")
    if ready:
        for path in IMMUTABLE_AFTER_READY:
            if _lookup(update, path) is None:
                continue
            old, new = _lookup(current, path), _lookup(update, path)
            if path.endswith("format"):
                old, new = normalized_format(old), normalized_format(new)
            elif path == "output.voice":
                old = old or voices[0]
            if old != new:
                raise ConfigError("immutable_field", f"{path} cannot change after session.ready", path)
    return merged


# --------------------------------------------------------------------------------------------
# One Voice Agent session.
# --------------------------------------------------------------------------------------------

# Fields that only AssemblyAI's SDK models list; left out when options.sdk_fields is False.
SDK_ONLY_FIELDS = {
    "session.ready": ("config", "expires_at"),
    "session.updated": ("config",),
    "session.error": ("param", "session_id"),
    "reply.started": ("item_id",),
    "reply.audio": ("reply_id",),
    "transcript.agent.delta": ("reply_id", "item_id", "start_ms", "end_ms"),
    "reply.done": ("reply_id",),
}
QUIET_EVENTS = {"reply.audio", "transcript.agent.delta", "transcript.user.delta"}  # logged at debug


class _Word(NamedTuple):
    text: str
    start_ms: int
    end_ms: int


def spread_words(text: str, duration_ms: float) -> list[_Word]:
    words = text.split()
    step = duration_ms / max(1, len(words))
    return [_Word(w, int(i * step), int((i + 1) * step)) for i, w in enumerate(words)]


@dataclass
class _OnAir:
    """A reply whose audio is being sent or is still "playing" on the client (per real time)."""

    record: ReplyRecord
    pcm: np.ndarray  # int16 at `rate`
    rate: int
    words: list[_Word]
    wrapped: bool  # inside reply.started / reply.done
    interrupt: asyncio.Event = field(default_factory=asyncio.Event)
    t0: float | None = None  # monotonic time of the first audio chunk
    sent: int = 0  # samples
    words_sent: int = 0
    chunks: int = 0  # reply.audio chunks sent
    raw: bytes | None = None  # the whole reply encoded (odd_chunks cuts it by bytes)
    sent_bytes: int = 0

    @property
    def sent_ms(self) -> float:
        return 1000 * self.sent / self.rate

    def played_ms(self, at: float) -> float:
        return 0.0 if self.t0 is None else min(self.sent_ms, 1000 * (at - self.t0))

    def interrupt_now(self) -> None:
        self.record.interrupted_at = time.monotonic()
        self.interrupt.set()


@dataclass
class _UserTurn:
    item_id: str
    announced: bool  # input.speech.started was sent


async def _wait_event(event: asyncio.Event, timeout: float) -> bool:
    """True if the event is set within `timeout` seconds."""
    if event.is_set():
        return True
    if timeout <= 0:
        return False
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
        return True
    except TimeoutError:
        return False


class _Session:
    """Server side of one session. It outlives its sockets: `run()` serves one socket, and a
    resumed session runs again on the next. Owns every task it starts (replies, tool calls,
    expiry) and cancels them when its socket goes away."""

    def __init__(self, server: StandIn, record: SessionRecord) -> None:
        self.server = server
        self.record = record
        self.ws: ServerConnection | None = None
        self.config: dict = {}
        self.ready = False
        self.created_at = time.monotonic()
        self.detector: TurnDetector | None = None
        self.on_air: _OnAir | None = None
        self._turn: _UserTurn | None = None
        self._last_turn_audio = np.zeros(0, dtype=np.int16)
        self._tasks: set[asyncio.Task] = set()
        self._last_reply: asyncio.Task | None = None  # replies play one after another
        self._pending_tools: dict[str, tuple[str, asyncio.Future[dict]]] = {}
        self._window: collections.deque[tuple[float, int]] = collections.deque()  # rate limit
        self._window_samples = 0
        self._last_rate_error = -math.inf
        self._ids = 0
        self._handlers: dict[str, Callable[[dict], Coroutine[Any, Any, None]]] = {
            "session.update": self._on_update,
            "input.audio": self._on_audio,
            "session.resume": self._on_late_resume,
            "reply.create": self._on_reply_create,
            "conversation.message": self._on_conversation_message,
            "tool.result": self._on_tool_result,
            "session.end": self._on_end,
        }

    @property
    def opts(self) -> StandInOptions:
        return self.server.options

    @property
    def sid(self) -> str:
        return self.record.session_id

    def _new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}_{self._ids}"

    def _format(self, side: str) -> dict:
        return normalized_format(_lookup(self.config, f"{side}.format"))

    def expired(self, now: float) -> bool:
        dropped = self.record.dropped_at
        too_long_gone = dropped is not None and now - dropped > self.opts.resume_window_s
        return too_long_gone or now - self.created_at > self.opts.max_session_s

    # -- socket lifecycle ---------------------------------------------------------------------

    async def run(self, ws: ServerConnection, first: str | bytes | None, *, resumed: bool = False) -> None:
        """Serve this session on `ws` until the socket closes."""
        self.ws = ws
        self.record.sockets += 1
        self.record.dropped_at = None
        self._spawn(self._expire_later())
        try:
            if resumed:
                self.record.resumes += 1
                self.detector = self._new_detector()
                await self._send_ready()
            if first is not None:
                await self._on_frame(first)
            async for frame in ws:
                await self._on_frame(frame)
        except ConnectionClosed:
            pass
        finally:
            await self._cancel_tasks()
            self.on_air = None
            self._turn = None
            self.ws = None
            if not self.record.ended:
                self.record.dropped_at = time.monotonic()
                log.info("[%s] socket closed without session.end (resumable for %.0f s)",
                         self.sid, self.opts.resume_window_s)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("[%s] task failed", self.sid, exc_info=task.exception())

    async def _cancel_tasks(self) -> None:
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Session end or server shutdown: stop tasks and forget pending tool calls."""
        await self._cancel_tasks()
        for _, future in self._pending_tools.values():
            future.cancel()
        self._pending_tools.clear()

    async def _expire_later(self) -> None:
        await asyncio.sleep(max(0.0, self.created_at + self.opts.max_session_s - time.monotonic()))
        self.record.expired = True
        log.info("[%s] session reached max_session_s: closing 1008", self.sid)
        if self.ws is not None:
            await self.ws.close(1008, "session_expired")

    # -- sending ------------------------------------------------------------------------------

    async def send(self, event: dict, *, verbatim: bool = False) -> None:
        """Send one event on the current socket and record it. `verbatim` skips the option-driven
        shaping (code case, SDK-only fields): for events a test injects."""
        if self.ws is None:
            log.debug("[%s] no socket: %s not sent", self.sid, event.get("type"))
            return
        if not verbatim:
            event = self.server.shape(event)
        await self.ws.send(json.dumps(event))
        kind = event.get("type")
        if kind == "reply.audio" and isinstance(event.get("data"), str):
            data = event["data"]  # recorded as its decoded byte length
            recorded = {**event, "data": len(data) * 3 // 4 - data[-2:].count("=")}
        else:
            recorded = event
        self.record.sent.append((time.monotonic(), recorded))
        if kind == "session.error":  # canonical case, whatever uppercase_codes sent
            self.record.errors_sent.append(str(event.get("code")).lower())
        level = logging.DEBUG if kind in QUIET_EVENTS else logging.INFO
        log.log(level, "[%s] -> %s", self.sid, _summary(recorded))

    async def _error(self, code: str, message: str, param: str | None = None) -> None:
        event: dict[str, Any] = {"type": "session.error", "code": code, "message": message}
        if param is not None:
            event["param"] = param
        if self.ready:
            event["session_id"] = self.sid
        await self.send(event)

    async def _send_ready(self) -> None:
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(
            seconds=self.created_at + self.opts.max_session_s - time.monotonic())
        await self.send({"type": "session.ready", "session_id": self.sid, "config": self.config,
                         "expires_at": expires.isoformat(timespec="seconds").replace("+00:00", "Z")})
        await self._maybe_unknown_event()

    async def _maybe_unknown_event(self) -> None:
        if self.opts.unknown_events:
            await self.send({"type": "standin.unknown_event", "note": "clients must ignore unknown types"})

    # -- client messages ----------------------------------------------------------------------

    async def _on_frame(self, frame: str | bytes) -> None:
        now = time.monotonic()
        if isinstance(frame, bytes):
            self.record.received.append((now, {"_binary": len(frame)}))
            return await self._error("invalid_format", "binary frames are not accepted: send JSON text")
        try:
            message = json.loads(frame)
        except ValueError:
            self.record.received.append((now, {"_raw": frame[:200]}))
            return await self._error("invalid_format", "message is not valid JSON")
        if not isinstance(message, dict):
            self.record.received.append((now, {"_raw": frame[:200]}))
            return await self._error("invalid_format", "message must be a JSON object")
        kind = message.get("type")
        if kind != "input.audio":
            self.record.received.append((now, message))
            log.info("[%s] <- %s", self.sid, kind)
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            what = "missing type" if kind is None else f"unknown type {kind!r}"
            return await self._error("invalid_format", what, "type")
        if not self.ready and kind not in ("session.update", "input.audio", "session.end"):
            return await self._error("invalid_value", f"{kind} before session.ready", "type")
        await handler(message)

    async def _on_update(self, message: dict) -> None:
        update = message.get("session")
        self.record.updates.append(update)
        if update is None:
            return await self._error("invalid_config", "session.update needs a session object", "session")
        try:
            merged = validate_update(update, self.config, ready=self.ready, voices=self.opts.voices,
                                     known_agents=self.opts.known_agents)
        except ConfigError as error:
            if error.param == "output.voice" and not self.ready and self.ws is not None:
                # Observed live [3p]: an invalid voice in the first update closes the socket, 1008.
                if self.opts.invalid_voice_error_frame:
                    await self._error(error.code, error.message, error.param)
                await self.ws.close(1008, "invalid voice")
                return
            return await self._error(error.code, error.message, error.param)
        format_changed = self._format("input") != normalized_format(_lookup(merged, "input.format"))
        self.config = self.record.config = merged
        if self.ready:
            if format_changed:  # input.format is mutable: the new rate from the next chunk on
                self.detector = self._new_detector()
            return await self.send({"type": "session.updated", "config": merged})
        if self.opts.extra_updated_before_ready:
            await self.send({"type": "session.updated", "config": merged})
        self.ready = True
        self.record.ready_at = time.monotonic()
        self.detector = self._new_detector()
        await self._send_ready()
        if merged.get("greeting"):
            self.schedule_reply("greeting", think=False)

    async def _on_late_resume(self, message: dict) -> None:
        await self._error("invalid_value", "session.resume must be the first message of a new socket", "type")

    async def _on_reply_create(self, message: dict) -> None:
        instructions = message.get("instructions")
        if "instructions" in message and not isinstance(instructions, str):
            return await self._error("invalid_value", "instructions must be a string", "instructions")
        air = self.on_air
        if air is not None and air.record.kind == "greeting" and not air.interrupt.is_set():
            # [sdk]: a reply.create sent while the greeting plays replaces the greeting.
            log.info("[%s] reply.create replaces the greeting %s", self.sid, air.record.reply_id)
            air.interrupt_now()
        self.schedule_reply("create", instructions=instructions)

    async def _on_conversation_message(self, message: dict) -> None:
        # Accepted, recorded (received), and invisible to the model: nothing reads its content.
        if message.get("role") not in ("user", "system"):
            return await self._error("invalid_value", 'role must be "user" or "system"', "role")
        if not isinstance(message.get("content"), str):
            return await self._error("invalid_value", "content must be a string", "content")

    async def _on_tool_result(self, message: dict) -> None:
        call_id, result = message.get("call_id"), message.get("result")
        if not isinstance(call_id, str) or call_id not in self._pending_tools:
            return await self._error("invalid_value", f"no pending tool call {call_id!r}", "call_id")
        if not isinstance(result, str):
            return await self._error("invalid_value", "result must be a string (JSON-encoded)", "result")
        if self.opts.strict_tool_result_json:
            try:
                json.loads(result)
            except ValueError:
                return await self._error("invalid_value", "result must be a JSON-encoded string", "result")
        if "is_error" in message and not isinstance(message["is_error"], bool):
            return await self._error("invalid_value", "is_error must be a boolean", "is_error")
        name, future = self._pending_tools.pop(call_id)
        self.record.tool_results.append(message)
        if not future.done():
            future.set_result(message)
        answer = f"The tool {name} returned {result[:200]}."
        self.schedule_reply("tool", text=answer, call_id=call_id)

    async def _on_end(self, message: dict) -> None:
        self.record.ended = True
        await self.close()
        fmt = self._format("input")
        audio_s = len(self.record.audio) / sample_width(fmt["encoding"]) / fmt["sample_rate"]
        await self.send({"type": "session.ended",
                         "session_duration_seconds": round(time.monotonic() - self.created_at, 3),
                         "audio_duration_seconds": round(audio_s, 3)})
        if self.ws is not None:
            await self.ws.close(self.opts.clean_close_code, "session ended")

    # -- input audio and turns ----------------------------------------------------------------

    async def _on_audio(self, message: dict) -> None:
        if not self.ready:
            self.record.audio_before_ready += 1
            return await self._error("invalid_audio", "audio before session.ready", "audio")
        data = message.get("audio")
        if not isinstance(data, str) or not data:
            return await self._error("invalid_audio", "audio must be a non-empty base64 string", "audio")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return await self._error("invalid_audio", "audio is not valid base64", "audio")
        fmt = self._format("input")
        width = sample_width(fmt["encoding"])
        if len(raw) % width:
            return await self._error("invalid_audio", f"odd byte length {len(raw)} for 16-bit PCM", "audio")
        now = time.monotonic()
        samples = len(raw) // width
        accepted = self._admit(samples, now, fmt["sample_rate"])
        if accepted < samples and now - self._last_rate_error >= 1.0:
            self._last_rate_error = now
            await self._error("audio_rate_violation",
                              f"audio arrives faster than real time; dropped {samples - accepted} samples")
        if accepted == 0:
            return
        raw = raw[:accepted * width]
        self.record.audio += raw
        self.record.audio_arrivals.append((now, accepted))
        await self._listen(decode_audio(raw, fmt["encoding"]))

    def _admit(self, samples: int, now: float, rate: int) -> int:
        """How many of these samples fit the sliding 1 s rate window."""
        if self.opts.rate_limit_s is None:
            return samples
        while self._window and self._window[0][0] <= now - 1.0:
            self._window_samples -= self._window.popleft()[1]
        accepted = max(0, min(samples, int(self.opts.rate_limit_s * rate) - self._window_samples))
        if accepted:
            self._window.append((now, accepted))
            self._window_samples += accepted
        return accepted

    def _turn_detection(self, key: str, default: Any) -> Any:
        return (_lookup(self.config, "input.turn_detection") or {}).get(key, default)

    def _new_detector(self) -> TurnDetector:
        detector = TurnDetector(self._format("input")["sample_rate"])
        self._tune(detector)
        return detector

    def _tune(self, detector: TurnDetector) -> None:
        """Apply the session's turn_detection (and the options) to the detector."""
        vad = self._turn_detection("vad_threshold", 0.5)
        detector.threshold_dbfs = self.opts.speech_threshold_dbfs + (vad - 0.5) * 40
        detector.start_ms = self.opts.speech_start_ms
        detector.min_silence_ms = self._turn_detection("min_silence", self.opts.default_min_silence_ms)
        detector.progress_ms = self.opts.user_delta_ms

    async def _listen(self, pcm: np.ndarray) -> None:
        assert self.detector is not None
        self._tune(self.detector)
        for event in self.detector.feed(pcm):
            if event.kind == "started":
                await self._on_speech_started()
            elif event.kind == "progress":
                await self._on_speech_progress(event.audio)
            else:
                await self._on_speech_stopped(event.audio)
        await self._maybe_barge_in()

    async def _on_speech_started(self) -> None:
        self._turn = _UserTurn(self._new_id("item"), announced=False)
        if self.on_air is None or self.opts.speech_started_on_backchannel:
            await self._announce_turn()

    async def _announce_turn(self) -> None:
        assert self._turn is not None
        self._turn.announced = True
        await self.send({"type": "input.speech.started"})

    def _describe(self, audio: np.ndarray) -> str:
        rate = self.detector.rate if self.detector else SAMPLE_RATE
        if self.opts.describe == "speech":
            return f"({len(audio) / rate:.1f} s of speech)"
        return describe_audio(audio, rate)

    async def _on_speech_progress(self, audio: np.ndarray) -> None:
        if self._turn is not None and self._turn.announced:
            await self.send({"type": "transcript.user.delta", "item_id": self._turn.item_id,
                             "text": self._describe(audio)})

    async def _maybe_barge_in(self) -> None:
        air, detector = self.on_air, self.detector
        if air is None or self._turn is None or air.interrupt.is_set() or not detector.in_speech:
            return
        if not self._turn_detection("interrupt_response", True):
            return
        delay = self._turn_detection("interruption_delay", self.opts.default_interruption_delay_ms)
        if detector.voiced_since_start_ms < delay:
            return
        if self.opts.barge_in_jitter_ms:
            await asyncio.sleep(self.server.rng.uniform(0, self.opts.barge_in_jitter_ms) / 1000)
            if self.on_air is not air or air.interrupt.is_set() or self._turn is None:
                return
        if not self._turn.announced:
            await self._announce_turn()
        log.info("[%s] barge-in: interrupting %s", self.sid, air.record.reply_id)
        air.interrupt_now()

    async def _on_speech_stopped(self, audio: np.ndarray) -> None:
        turn, self._turn = self._turn, None
        self._last_turn_audio = audio
        if turn is None or not turn.announced:
            return  # a back-channel that was never announced stays invisible
        await self.send({"type": "input.speech.stopped"})
        await self.send({"type": "transcript.user", "item_id": turn.item_id,
                         "text": self._describe(audio)})
        if self.on_air is not None:
            log.info("[%s] turn ended while %s is on air: no reply of its own", self.sid,
                     self.on_air.record.reply_id)
            return
        if self.opts.tool_call_on_turn is not None:
            name, arguments = self.opts.tool_call_on_turn
            self.opts.tool_call_on_turn = None
            self.start_tool_call(name, arguments)
        else:
            self.schedule_reply("turn")

    # -- replies ------------------------------------------------------------------------------

    def schedule_reply(self, kind: str, *, think: bool = True, seconds: float | None = None,
                       freq_hz: float | None = None, text: str | None = None,
                       call_id: str | None = None, instructions: str | None = None) -> ReplyRecord:
        """Queue a spoken reply after any reply already queued; return its record at once."""
        record = ReplyRecord(self._new_id("reply"), kind, item_id=self._new_id("item"), call_id=call_id,
                             instructions=instructions)
        self.record.replies.append(record)
        self._chain(record, lambda: self._spoken_reply(record, think, seconds, freq_hz, text))
        return record

    def start_tool_call(self, name: str, arguments: dict) -> tuple[ReplyRecord, asyncio.Future[dict]]:
        call_id = self._new_id("call")
        future: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        self._pending_tools[call_id] = (name, future)
        record = ReplyRecord(self._new_id("reply"), "tool", item_id=self._new_id("item"), call_id=call_id)
        self.record.replies.append(record)
        self._chain(record, lambda: self._tool_call(record, name, arguments))
        return record, future

    def _chain(self, record: ReplyRecord, reply: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `reply` once the previously queued reply is over. A reply cut short by a closed
        socket (or never started) ends "abandoned": no reply.done was sent for it."""
        previous = self._last_reply

        async def after_previous() -> None:
            try:
                if previous is not None and not previous.done():
                    await asyncio.wait({previous})
                await reply()
            except ConnectionClosed:
                pass
            finally:
                if record.status is None:
                    record.status, record.done_at = "abandoned", time.monotonic()

        self._last_reply = self._spawn(after_previous())

    def _compose(self, record: ReplyRecord, seconds: float | None, freq_hz: float | None,
                 text: str | None) -> tuple[np.ndarray, str]:
        """The audio (at SAMPLE_RATE) and text of a reply."""
        opts = self.opts
        volume = _lookup(self.config, "output.volume")
        amplitude = opts.reply_amplitude * (1.0 if volume is None else volume / 100)
        if record.kind == "greeting":
            text = self.config.get("greeting", "")
            if opts.reply_mode == "echo":
                return chime(SAMPLE_RATE, amplitude), text
            return tone(opts.greeting_freq_hz, opts.greeting_seconds, SAMPLE_RATE, amplitude), text
        record.prompt = self.config.get("system_prompt", "")
        if text is None and opts.model_echo:
            text = self._model_says(record)
        echo = opts.reply_mode == "echo" and seconds is None and freq_hz is None and record.kind != "tool"
        if echo and len(self._last_turn_audio):
            rate = self.detector.rate if self.detector else SAMPLE_RATE
            if opts.describe == "speech":
                said = f"Here is what you said, played back ({len(self._last_turn_audio) / rate:.1f} s)."
            else:
                said = f"You said: {describe_audio(self._last_turn_audio, rate)}."
            return resample(self._last_turn_audio, rate, SAMPLE_RATE), text or said
        pcm = tone(freq_hz or opts.reply_freq_hz, seconds or opts.reply_seconds, SAMPLE_RATE, amplitude)
        return pcm, text or f"This is reply number {self.record.replies.index(record) + 1}."

    def _model_says(self, record: ReplyRecord, tail: int = 300) -> str:
        """model_echo: what the "model" was told, as its reply. Only what the real model is
        reported to see: the instructions of this reply, the system prompt (its end, where a
        replayed conversation sits) and, for a turn, what it heard. conversation.message
        content is never here."""
        parts = []
        if record.instructions:
            parts.append("Told: " + record.instructions[-tail:])
        if record.prompt:
            parts.append("Knows: " + record.prompt[-tail:])
        if record.kind == "turn" and len(self._last_turn_audio):
            parts.append("Heard: " + describe_audio(self._last_turn_audio, self.detector.rate if self.detector
                                                    else SAMPLE_RATE))
        return " ".join(parts) or "I was told nothing."

    async def _spoken_reply(self, record: ReplyRecord, think: bool, seconds: float | None,
                            freq_hz: float | None, text: str | None) -> None:
        if think:
            await asyncio.sleep(self.opts.think_ms / 1000)
        pcm, text = self._compose(record, seconds, freq_hz, text)
        wrapped = record.kind != "greeting" or self.opts.wrap_greeting
        await self._play(record, pcm, text, wrapped)

    async def _tool_call(self, record: ReplyRecord, name: str, arguments: dict) -> None:
        await asyncio.sleep(self.opts.think_ms / 1000)
        record.started_at = time.monotonic()
        await self.send({"type": "reply.started", "reply_id": record.reply_id, "item_id": record.item_id})
        await self.send({"type": "tool.call", "call_id": record.call_id, "name": name, "arguments": arguments})
        self._spawn(self._tool_deadline(record.call_id or "", name))
        await self._send_done(record, "completed")

    def _tool_timeout(self, name: str) -> float:
        for tool in self.config.get("tools") or []:
            if tool.get("name") == name:
                return tool.get("timeout_seconds", DEFAULT_TOOL_TIMEOUT_S)
        return DEFAULT_TOOL_TIMEOUT_S

    async def _tool_deadline(self, call_id: str, name: str) -> None:
        """The service gives up on a tool call after the tool's timeout_seconds (default 120):
        the agent apologises and the session goes on; a tool.result sent later is an error
        (no such pending call). The apology's wording is ours: the real one is the model's."""
        timeout = self._tool_timeout(name)
        await asyncio.sleep(timeout)
        pending = self._pending_tools.pop(call_id, None)
        if pending is None:
            return
        log.info("[%s] tool call %s (%s) timed out after %g s", self.sid, call_id, name, timeout)
        self.record.tool_timeouts.append(call_id)
        if not pending[1].done():
            pending[1].set_result(None)
        self.schedule_reply("tool", text=f"Sorry, {name} did not answer in time. Let us try something else.",
                            call_id=call_id)

    async def _send_done(self, record: ReplyRecord, status: str) -> None:
        event: dict[str, Any] = {"type": "reply.done", "status": status, "reply_id": record.reply_id}
        if status == "completed" and self.opts.omit_done_status:
            del event["status"]
        await self.send(event)
        record.status, record.done_at = status, time.monotonic()

    async def _play(self, record: ReplyRecord, pcm: np.ndarray, text: str, wrapped: bool) -> None:
        """Send one reply: started, paced audio with word deltas, then transcript and done
        once the audio has "played" (or the interruption events if barge-in stops it)."""
        out = self._format("output")
        pcm = resample(pcm, SAMPLE_RATE, out["sample_rate"])
        air = _OnAir(record, pcm, out["sample_rate"], spread_words(text, 1000 * len(pcm) / out["sample_rate"]),
                     wrapped)
        record.text, record.duration_s = text, len(pcm) / air.rate
        try:
            await self._maybe_unknown_event()
            record.started_at = time.monotonic()
            if wrapped:
                await self.send({"type": "reply.started", "reply_id": record.reply_id, "item_id": record.item_id})
            self.on_air = air
            interrupted = await self._stream(air, out["encoding"])
            if not interrupted:
                remaining = air.t0 + len(pcm) / air.rate - time.monotonic() if air.t0 else 0.0
                interrupted = await _wait_event(air.interrupt, remaining)
            if interrupted:
                await self._end_interrupted(air, out["encoding"])
            else:
                await self._end_completed(air)
        finally:
            if self.on_air is air:
                self.on_air = None

    async def _stream(self, air: _OnAir, encoding: str) -> bool:
        """Send the audio no faster than real time plus lead_ms. True if interrupted."""
        while air.sent < len(air.pcm):
            ahead = 0.0 if air.t0 is None else air.sent / air.rate - (time.monotonic() - air.t0)
            lead = self.opts.lead_ms / 1000
            if ahead >= lead:
                if await _wait_event(air.interrupt, ahead - lead + 0.001):
                    return True
                continue
            delay = self._chunk_delay(air)
            if delay > 0 and await _wait_event(air.interrupt, delay):
                return True
            await self._send_chunk(air, encoding)
            if air.t0 is None:
                air.t0 = air.record.first_audio_at = time.monotonic()
            air.record.samples_sent = air.sent
            for word in air.words[air.words_sent:]:
                if word.start_ms >= air.sent_ms:
                    break
                space = " " if air.words_sent else ""
                air.words_sent += 1
                await self.send({"type": "transcript.agent.delta", "delta": space + word.text,
                                 "reply_id": air.record.reply_id, "item_id": air.record.item_id,
                                 "start_ms": word.start_ms, "end_ms": word.end_ms})
            if air.interrupt.is_set():
                return True
        return False

    def _chunk_delay(self, air: _OnAir) -> float:
        """How long to hold the next chunk back (StandInOptions: chunk_gap_ms, chunk_jitter_ms)."""
        delay = 0.0
        gap = self.opts.chunk_gap_ms
        if gap is not None and air.chunks == gap[0]:
            delay += gap[1] / 1000
        if self.opts.chunk_jitter_ms and air.chunks:
            delay += self.server.rng.uniform(0, self.opts.chunk_jitter_ms) / 1000
        return delay

    async def _send_chunk(self, air: _OnAir, encoding: str) -> None:
        lo, hi = self.opts.chunk_ms
        ms = self.opts.first_chunk_ms if self.opts.first_chunk_ms is not None and air.sent == 0 \
            else self.server.rng.randint(lo, hi)
        n = max(1, ms * air.rate // 1000)
        air.chunks += 1
        if self.opts.odd_chunks and sample_width(encoding) == 2:
            # Cut the byte stream, not the samples: every other chunk ends half-way into a sample
            # and the next one starts with its second byte.
            if air.raw is None:
                air.raw = encode_audio(air.pcm, encoding)
            size = 2 * n + (1 if air.chunks % 2 else -1)
            data = air.raw[air.sent_bytes:air.sent_bytes + size]
            if not data:  # late audio after the end: repeat the tail
                data = air.raw[-size:]
            air.sent_bytes += len(data)
            await self.send({"type": "reply.audio", "data": base64.b64encode(data).decode(),
                             "reply_id": air.record.reply_id})
            air.sent = min(len(air.pcm), air.sent_bytes // 2)
            return
        chunk = air.pcm[air.sent:air.sent + n]
        if len(chunk) == 0:  # late audio after the end: repeat the tail
            chunk = air.pcm[-n:]
        await self.send({"type": "reply.audio", "data": base64.b64encode(encode_audio(chunk, encoding)).decode(),
                         "reply_id": air.record.reply_id})
        air.sent = min(len(air.pcm), air.sent + len(chunk))

    async def _finish(self, air: _OnAir, status: str) -> None:
        """reply.done for a wrapped reply; a bare one (unwrapped greeting) just ends."""
        if air.wrapped:
            await self._send_done(air.record, status)
        else:
            air.record.status, air.record.done_at = status, time.monotonic()

    async def _send_transcript(self, air: _OnAir, interrupted: bool) -> None:
        record = air.record
        await self.send({"type": "transcript.agent", "text": record.text, "reply_id": record.reply_id,
                         "item_id": record.item_id, "interrupted": interrupted})

    async def _end_completed(self, air: _OnAir) -> None:
        await self._send_transcript(air, interrupted=False)
        await self._finish(air, "completed")

    async def _end_interrupted(self, air: _OnAir, encoding: str) -> None:
        """The interruption events in the configured order, then any late audio."""
        played = air.played_ms(air.record.interrupted_at or time.monotonic())
        air.record.text = " ".join(w.text for w in air.words if w.start_ms < played)
        done_first = self.opts.barge_in_order == "done_first"
        if done_first:
            await self._finish(air, "interrupted")
        await self._send_transcript(air, interrupted=True)
        if not done_first:
            await self._finish(air, "interrupted")
        self.on_air = None
        for _ in range(self.opts.late_audio_after_interrupt):
            await self._send_chunk(air, encoding)
            air.record.late_chunks += 1


def _summary(event: dict) -> str:
    """One log line for an event: its type and short fields (never audio)."""
    parts = [str(event.get("type"))]
    for key, value in event.items():
        if key in ("type", "config"):
            continue
        text = repr(value)
        parts.append(f"{key}={text if len(text) <= 60 else text[:57] + '...'}")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# The server.
# --------------------------------------------------------------------------------------------


def _require_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the stand-in listens on loopback only, not {host!r}")


class StandIn:
    """The Voice Agent API stand-in server. `async with StandIn(options) as agent: ...`"""

    def __init__(self, options: StandInOptions | None = None) -> None:
        self.options = options or StandInOptions()
        self.rng = random.Random(self.options.seed)
        self.sessions: list[SessionRecord] = []
        self.http_rejections = 0  # upgrades refused (bad path, bad key in "http" mode)
        self.auth_failures = 0  # bad keys, however refused
        self.refused_sessions = 0  # handshakes refused with refuse_sessions_with
        self.resume_failures: list[tuple[float, str, str]] = []  # (time, session_id, code)
        self.offered_extensions: list[str | None] = []  # each upgrade's Sec-WebSocket-Extensions
        self.url = ""
        self._server: Server | None = None
        self._sessions: dict[str, _Session] = {}
        self._sockets: list[ServerConnection] = []  # open, oldest first
        self._unauthorized: weakref.WeakSet[ServerConnection] = weakref.WeakSet()

    @property
    def connections(self) -> int:
        return len(self._sockets)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        _require_loopback(host)
        ws_logger = logging.getLogger("standin.websockets")
        # websockets logs request headers (the key) at debug: never below info (-q sets warning)
        ws_logger.setLevel(max(logging.INFO, ws_logger.level))
        self._server = await serve(self._handle, host, port, process_request=self._process_request,
                                   max_size=self.options.max_message_bytes, compression=self.options.compression,
                                   close_timeout=2, logger=ws_logger)
        bound = self._server.sockets[0].getsockname()
        self.url = f"ws://{host}:{bound[1]}{PATH}"
        log.info("stand-in listening on %s", self.url)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        for session in self._sessions.values():
            await session.close()
        self._server = None

    async def __aenter__(self) -> StandIn:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- helpers for tests --------------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or predicate}")
            await asyncio.sleep(0.01)

    async def drop(self, code: int | None = 1011, reason: str = "") -> None:
        """Close every open socket with `code`; None aborts the TCP connection with no close frame."""
        sockets = list(self._sockets)
        if code is None:
            for ws in sockets:
                ws.transport.abort()
        else:
            await asyncio.gather(*(ws.close(code, reason) for ws in sockets))
        await self.wait_for(lambda: not any(ws in self._sockets for ws in sockets), 5, "sockets to close")

    async def send_raw(self, frame: str | bytes, session: SessionRecord | None = None) -> None:
        """Send any frame, as is, on the session's socket (default: the newest open socket)."""
        ws = self._socket_for(session)
        await ws.send(frame)
        owner = next((s for s in self._sessions.values() if s.ws is ws), None)
        if owner is not None:
            try:
                recorded = json.loads(frame)
            except ValueError:
                recorded = None
            if not isinstance(recorded, dict):
                recorded = {"type": None, "raw": frame[:200]}
            owner.record.sent.append((time.monotonic(), recorded))

    async def send_event(self, event: dict, session: SessionRecord | None = None) -> None:
        """Send an event exactly as given (no code-case or field shaping) and record it."""
        await self._live(session).send(event, verbatim=True)

    async def trigger_reply(self, seconds: float | None = None, freq_hz: float | None = None,
                            session: SessionRecord | None = None) -> ReplyRecord:
        """A server-initiated reply (kind "create"), started without think time."""
        return self._live(session).schedule_reply("create", think=False, seconds=seconds, freq_hz=freq_hz)

    async def call_tool(self, name: str, arguments: dict, session: SessionRecord | None = None,
                        timeout: float = 10) -> dict | None:
        """Make the agent call a tool; return the client's tool.result message, or None if the
        service gave up waiting first (the tool's timeout_seconds)."""
        record, future = self._live(session).start_tool_call(name, arguments)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise AssertionError(f"no tool.result for {name} ({record.call_id}) within {timeout} s") from None

    def input_pcm(self, session: SessionRecord | None = None) -> np.ndarray:
        record = session or self.sessions[-1]
        fmt = normalized_format(_lookup(record.config, "input.format"))
        return decode_audio(bytes(record.audio), fmt["encoding"])

    def _live(self, record: SessionRecord | None) -> _Session:
        """The session (default: the newest) if it is ready and has a socket."""
        if record is None:
            candidates = [s for s in self._sessions.values() if s.ws is not None and s.ready]
            if not candidates:
                raise RuntimeError("no ready session with an open socket")
            return candidates[-1]
        session = self._sessions[record.session_id]
        if session.ws is None or not session.ready:
            raise RuntimeError(f"session {record.session_id} is not ready on an open socket")
        return session

    def _socket_for(self, record: SessionRecord | None) -> ServerConnection:
        if record is not None:
            ws = self._sessions[record.session_id].ws
        else:
            ws = self._sockets[-1] if self._sockets else None
        if ws is None:
            raise RuntimeError("no open socket")
        return ws

    def shape(self, event: dict) -> dict:
        """Apply the wire-format options to a server event."""
        event = dict(event)
        if self.options.uppercase_codes and isinstance(event.get("code"), str):
            event["code"] = event["code"].upper()
        if not self.options.sdk_fields:
            for key in SDK_ONLY_FIELDS.get(event.get("type", ""), ()):
                event.pop(key, None)
        return event

    # -- connections --------------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path != PATH:
            self.http_rejections += 1
            return connection.respond(404, "Not Found\n")
        self.offered_extensions.append(request.headers.get("Sec-WebSocket-Extensions"))
        protocol = connection.protocol
        if hasattr(protocol, "max_message_size"):
            protocol.max_message_size = self.options.max_message_bytes
        else:  # websockets < 15
            protocol.max_size = self.options.max_message_bytes
        header = request.headers.get("Authorization")
        if header is not None and header.startswith("Bearer ") and hmac.compare_digest(
                header[len("Bearer "):].encode(), self.options.api_key.encode()):
            return None
        self.auth_failures += 1
        log.info("refusing a connection: missing or wrong API key (%s)", self.options.auth_failure)
        if self.options.auth_failure == "http":
            self.http_rejections += 1
            response = connection.respond(self.options.auth_http_status, "Unauthorized\n")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        self._unauthorized.add(connection)
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        self._sockets.append(ws)
        try:
            if ws in self._unauthorized:
                return await self._refuse(ws)
            try:
                first = await ws.recv()
            except ConnectionClosed:
                return
            if self.options.refuse_sessions_with:
                return await self._refuse_session(ws, self.options.refuse_sessions_with)
            resume_id = _resume_target(first)
            if resume_id is not None:
                return await self._resume(ws, resume_id)
            record = SessionRecord(session_id=f"sess_{secrets.token_hex(6)}")
            session = _Session(self, record)
            self.sessions.append(record)
            self._sessions[record.session_id] = session
            log.info("[%s] new socket", record.session_id)
            await session.run(ws, first)
        finally:
            self._sockets.remove(ws)

    async def _refuse_session(self, ws: ServerConnection, code: str) -> None:
        """A refused handshake (at capacity, an agent that failed to start): the error, then a
        close, after the client's first message."""
        self.refused_sessions += 1
        messages = {"server_error": "at capacity, try again later", "at_capacity": "at capacity, try again later",
                    "concurrency_exceeded": "too many concurrent sessions for this account",
                    "agent_init_failed": "the agent failed to initialise", "agent_timeout": "the agent did not start "
                    "within 10 seconds"}
        log.info("refusing a session: %s", code)
        error = self.shape({"type": "session.error", "code": code, "message": messages.get(code, code)})
        try:
            await ws.send(json.dumps(error))
            await ws.close(self.options.refuse_close_code, "")
        except ConnectionClosed:
            pass

    async def _refuse(self, ws: ServerConnection) -> None:
        if self.options.auth_failure == "error_frame":
            error = self.shape({"type": "session.error", "code": "unauthorized", "message": "invalid API key"})
            await ws.send(json.dumps(error))
        await ws.close(1008, self.options.auth_close_reason)

    async def _resume(self, ws: ServerConnection, session_id: str) -> None:
        session = self._sessions.get(session_id)
        now = time.monotonic()
        code = None
        if self.options.resume_forgets:
            code = "session_not_found"
        elif self.options.fail_next_resume:
            code, self.options.fail_next_resume = self.options.fail_next_resume, None
        elif session is None or session.record.ended or not session.ready:
            code = "session_not_found"
        elif session.expired(now):
            code = "session_expired"
        if code is not None:
            self.resume_failures.append((now, session_id, code))
            log.info("[%s] resume refused: %s", session_id, code)
            error = {"type": "session.error", "code": code, "message": f"cannot resume: {code}",
                     "session_id": session_id}
            try:
                await ws.send(json.dumps(self.shape(error)))
                await ws.close(1008, code)
            except ConnectionClosed:
                pass
            return
        assert session is not None
        if session.ws is not None:  # the old socket is still open on our side: take over
            await session.ws.close(1008, "session resumed on another socket")
            await self.wait_for(lambda: session.ws is None, 5, "the old socket to close")
        log.info("[%s] resumed", session_id)
        await session.run(ws, None, resumed=True)


def _resume_target(frame: str | bytes) -> str | None:
    """The session_id if this first frame is a session.resume, else None."""
    if not isinstance(frame, str):
        return None
    try:
        message = json.loads(frame)
    except ValueError:
        return None
    if isinstance(message, dict) and message.get("type") == "session.resume":
        session_id = message.get("session_id")
        return session_id if isinstance(session_id, str) else ""
    return None


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------


async def _serve_until_signal(options: StandInOptions, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    standin = StandIn(options)
    # Its connection lines at the command line's level (-q: warnings only), never below info.
    logging.getLogger("standin.websockets").setLevel(max(logging.INFO, logging.getLogger().level))
    await standin.start(host, port)
    try:
        print(f"Voice Agent stand-in on {standin.url} (Ctrl-C to stop)", flush=True)
        await stop.wait()
    finally:
        await standin.stop()


def main(argv: list[str] | None = None) -> None:
    import os

    parser = argparse.ArgumentParser(description="Local stand-in for the AssemblyAI Voice Agent API.")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    parser.add_argument("--port", type=int, default=8765, help="0: any free port (the first line printed says which)")
    parser.add_argument("--api-key", default=os.environ.get("STANDIN_API_KEY", "standin"),
                        help="the key clients must send as Bearer (default: $STANDIN_API_KEY, else 'standin'; "
                             "the environment keeps it off the command line)")
    parser.add_argument("--reply", choices=("echo", "tone"), default="echo",
                        help="echo: play your turn back; tone: a 1 kHz tone")
    parser.add_argument("--describe", choices=("tone", "speech"), default="tone",
                        help="what transcripts say: 'tone 440 Hz 1.5 s' or '(1.5 s of speech)'")
    parser.add_argument("--min-silence-ms", type=int, default=600)
    parser.add_argument("-v", "--verbose", action="store_true", help="also log audio chunks and deltas")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    args = parser.parse_args(argv)
    _require_loopback(args.host)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    options = StandInOptions(api_key=args.api_key, reply_mode=args.reply, describe=args.describe,
                             default_min_silence_ms=args.min_silence_ms)
    asyncio.run(_serve_until_signal(options, args.host, args.port))


if __name__ == "__main__":
    main()
