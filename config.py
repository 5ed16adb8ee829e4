"""The worker's configuration: every setting with its variable, default, help and parser
(``Config``, which `--help` and the README are generated from / checked against), where
settings come from (flags > environment > ./.env > defaults), and what they become: the
Voice Agent session's settings and the sound banks."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

import bridge
from environment import ConfigError

log = logging.getLogger("worker")


def _setting(default: Any, help: str, parse: Callable[[str], Any] = str, *, required: bool = False,
             secret: bool = False, group: str = "general", missing: str | None = None,
             shown_default: str | None = None) -> Any:
    """``missing``: what the one line says when a required setting is not set (default: its help).
    ``shown_default``: what `--help` (and the docs) say instead of "required" or the default,
    where that alone would mislead (LIVEKIT_URL empty starts a local server)."""
    return field(default=default, metadata={"help": help, "parse": parse, "required": required,
                                            "secret": secret, "group": group, "missing": missing,
                                            "shown_default": shown_default})


def shown_default(f: dataclasses.Field) -> str:
    """A setting's default as `--help` shows it: booleans as 1/0, as the docs and .env.example write them."""
    if f.metadata["shown_default"]:
        return f.metadata["shown_default"]
    if f.metadata["required"]:
        return "required"
    if f.default in (None, "", ()):
        return "default: empty"
    if isinstance(f.default, bool):
        return f"default: {int(f.default)}"
    return f"default: {f.default!r}"


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


def _ip_address(v: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(v.strip()))
    except ValueError:
        raise ValueError(f"must be an IP address of this machine, e.g. 127.0.0.1 or 0.0.0.0, got {v.strip()[:60]!r}") \
            from None


def _identity(v: str) -> str:
    s = v.strip()
    if not s or len(s) > 128 or any(c.isspace() for c in s):
        raise ValueError("must be 1-128 characters without spaces")
    return s


def _agent_name(v: str) -> str:
    s = v.strip()
    if len(s) > 128 or any(c.isspace() or not c.isprintable() for c in s):
        raise ValueError("must be at most 128 printable characters without spaces")
    return s


def _command(v: str) -> tuple[str, ...]:
    """A command as shell words, or a JSON list of strings."""
    import shlex

    s = v.strip()
    if not s:
        return ()
    try:
        cmd = json.loads(s) if s.startswith("[") else shlex.split(s)
    except ValueError as e:
        raise ValueError(f"must be shell words or a JSON list of strings ({e})") from None
    if not cmd or not all(isinstance(c, str) and c for c in cmd):
        raise ValueError("must name a program (shell words or a JSON list of strings)")
    return tuple(cmd)


TRANSCRIPTION_PROMPT_CHARS = 1750
LANGUAGE_CODE_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-")


def _transcription_prompt(v: str) -> str:
    s = v.strip()
    if len(s) > TRANSCRIPTION_PROMPT_CHARS:
        raise ValueError(f"must be at most {TRANSCRIPTION_PROMPT_CHARS} characters, got {len(s)}")
    return s


def _language_codes(v: str) -> tuple[str, ...]:
    codes = _csv(v)
    for code in codes:
        base, _, region = code.partition("-")
        if not (2 <= len(base) <= 3 and base.isalpha() and base.islower() and set(code) <= LANGUAGE_CODE_CHARS
                and (not region or 2 <= len(region) <= 4)):
            raise ValueError(f"must be comma-separated language codes like en,es,pt-BR, got {code[:20]!r}")
    return tuple(dict.fromkeys(codes))


# Fields with a variable of their own, which SESSION_EXTRA must not set (or change the type of):
# the bridge builds them, and two places for one value would leave one silently ignored.
SESSION_EXTRA_OWNED = {
    "system_prompt": "SYSTEM_PROMPT", "greeting": "GREETING", "tools": "TOOLS_MODULE / END_CALL_TOOL",
    "agent_id": "AGENT_ID", "input.format": "nothing: the bridge streams 24 kHz PCM",
    "output.format": "nothing: the bridge plays 24 kHz PCM", "output.voice": "VOICE", "output.volume": "VOICE_VOLUME",
    "input.keyterms": "KEYTERMS", "input.transcription_mode": "TRANSCRIPTION_MODE",
    "input.transcription_prompt": "TRANSCRIPTION_PROMPT", "input.language_codes": "LANGUAGE_CODES",
    "input.turn_detection.vad_threshold": "VAD_THRESHOLD", "input.turn_detection.min_silence": "MIN_SILENCE_MS",
    "input.turn_detection.max_silence": "MAX_SILENCE_MS",
    "input.turn_detection.interrupt_response": "INTERRUPT_RESPONSE",
    "input.turn_detection.interruption_delay": "INTERRUPTION_DELAY_MS",
}
SESSION_EXTRA_OBJECTS = ("input", "output", "input.turn_detection")
SESSION_EXTRA_BYTES = 16 * 1024


def _session_extra(v: str) -> dict[str, Any] | None:
    """A JSON object merged into each session's first session.update. Its values are never
    echoed in an error or a log line (they may hold something secret)."""
    if not v.strip():
        return None
    if len(v.encode()) > SESSION_EXTRA_BYTES:
        raise ValueError(f"must be at most {SESSION_EXTRA_BYTES} bytes of JSON")
    try:
        extra = json.loads(v)
    except ValueError as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ValueError(f"must be a JSON object, e.g. {{\"input\": {{\"voice_focus\": \"far-field\"}}}}: "
                         f"not valid JSON{where}") from None
    if not isinstance(extra, dict):
        raise ValueError(f"must be a JSON object ({{...}}), got a JSON {type(extra).__name__}")
    for path, variable in SESSION_EXTRA_OWNED.items():
        if _at_path(extra, path) is not _MISSING:
            raise ValueError(f"sets {path}, which has a setting of its own: use {variable}")
    for path in SESSION_EXTRA_OBJECTS:
        value = _at_path(extra, path)
        if value is not _MISSING and not isinstance(value, dict):
            raise ValueError(f"{path} must be a JSON object")
    return extra


_MISSING = object()


def _at_path(obj: dict[str, Any], path: str) -> Any:
    """The value at a dotted path of nested objects, or _MISSING."""
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def extra_paths(extra: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The leaf paths of SESSION_EXTRA, for the log (its values are not logged)."""
    out: list[str] = []
    for key, value in extra.items():
        path = f"{prefix}{key}"
        out += extra_paths(value, path + ".") if isinstance(value, dict) and value else [path]
    return out


# The one line for a missing key: where to get one, and what runs without.
MISSING_API_KEY = ("get a key at https://www.assemblyai.com/dashboard (API Keys) and set it in the environment or "
                   "./.env; ./scripts/run demo runs without one (a local echo agent)")
# What a local LiveKit server (worker.py's run and demo, LIVEKIT_URL empty) provides.
LOCAL_SERVER_PROVIDES = ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")


@dataclass(frozen=True)
class Config:
    # LiveKit
    livekit_url: str = _setting(None, "LiveKit server URL, e.g. ws://localhost:7880 or wss://<project>.livekit.cloud; "
                                "empty: run and demo start a local LiveKit server in dev mode (and use its keys)",
                                _url("ws", "wss", "http", "https"), required=True, group="LiveKit",
                                shown_default="empty: a local server; required by token, control, check and "
                                              "under systemd")
    livekit_api_key: str = _setting(None, "LiveKit API key (livekit-server --dev: devkey)", _nonempty,
                                    required=True, group="LiveKit", shown_default="required with LIVEKIT_URL")
    livekit_api_secret: str = _setting(None, "LiveKit API secret (livekit-server --dev: secret)", _nonempty,
                                       required=True, secret=True, group="LiveKit",
                                       shown_default="required with LIVEKIT_URL")
    local_server_bind: str = _setting("127.0.0.1", "where the local LiveKit server (LIVEKIT_URL empty) listens: "
                                      "127.0.0.1, this machine only; an address of this machine, or 0.0.0.0 for all, "
                                      "lets others join (its keys, devkey / secret, are public: anyone who reaches "
                                      "it can use it)", _ip_address, group="LiveKit")
    room_name: str = _setting("voice-agent-demo", "room to join", _identity, group="LiveKit")
    agent_identity: str = _setting("voice-agent", "participant identity of the agent", _identity, group="LiveKit")
    user_identity: str | None = _setting(None, "only bridge this participant (empty: the first user with a microphone)",
                                         _optional(_identity), group="LiveKit")
    # Voice Agent API
    assemblyai_api_key: str = _setting(None, "AssemblyAI API key (sent as 'Authorization: Bearer <key>')", _nonempty,
                                       required=True, secret=True, group="Voice Agent API", missing=MISSING_API_KEY)
    voice_agent_url: str = _setting("wss://agents.assemblyai.com/v1/ws",
                                    "Voice Agent API WebSocket URL (EU: wss://agents.eu.assemblyai.com/v1/ws)",
                                    _url("ws", "wss"), group="Voice Agent API")
    system_prompt: str = _setting("You are a friendly, helpful voice assistant. Keep answers short and conversational.",
                                  "the agent's instructions", group="Voice Agent API")
    greeting: str = _setting("Hi! How can I help you today?",
                             "spoken when a call starts (empty: the agent waits for the user)", group="Voice Agent API")
    voice: str = _setting("", "voice id (empty: the service default)", group="Voice Agent API")
    voice_volume: float | None = _setting(None, "the agent's voice level at the service, 0-100 (empty: its native "
                                          "level); the ambient has AMBIENT_VOLUME", _optional(_number(float, 0, 100)),
                                          group="Voice Agent API")
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
    interruption_delay_ms: int | None = _setting(None, "override: how long the user must speak before the agent "
                                                 "stops, 0-1000 ms (empty: the service's default)",
                                                 _optional(_number(int, 0, 1000)), group="Voice Agent API")
    transcription_mode: str | None = _setting(None, "speech recognition: min_latency (answers sooner), balanced or "
                                              "max_accuracy (empty: the service's default)",
                                              _optional(_choice("min_latency", "balanced", "max_accuracy")),
                                              group="Voice Agent API")
    transcription_prompt: str = _setting("", "context for speech recognition (what callers talk about, how names "
                                         "and numbers look), at most 1750 characters", _transcription_prompt,
                                         group="Voice Agent API")
    language_codes: tuple[str, ...] = _setting((), "comma-separated languages the caller speaks, e.g. en,es "
                                               "(empty: detected)", _language_codes, group="Voice Agent API")
    agent_id: str | None = _setting(None, "a stored agent (AssemblyAI's agents API): the session uses its prompt, "
                                    "greeting, voice, tools and settings, and the session settings here are "
                                    "ignored (a warning at start lists those set)", _optional(_identity),
                                    group="Voice Agent API")
    session_extra: dict[str, Any] | None = _setting(None, "a JSON object deep-merged into each session's first "
                                                    "session.update, for fields this version does not know yet, "
                                                    "e.g. {\"input\": {\"voice_focus\": \"far-field\"}}; fields "
                                                    "with a setting of their own are refused; values never logged",
                                                    _session_extra, secret=True, group="Voice Agent API")
    tools_module: str = _setting("", "your tools: a module name or a .py path (several: comma-separated); every "
                                 "public async def with type hints and a docstring becomes a tool",
                                 group="Voice Agent API")
    tool_timeout_s: float = _setting(20.0, "a tool call taking longer is answered with an error (the service is "
                                     "told to wait 5 s more: timeout_seconds, at most 300)",
                                     _number(float, 0.1, 295), group="Voice Agent API")
    tool_execution_mode: str | None = _setting(None, "how the agent waits for a tool: interactive (a short phrase "
                                               "while it runs) or hold (silent; for slow tools) (empty: the "
                                               "service's default, interactive)",
                                               _optional(_choice(*bridge.TOOL_EXECUTION_MODES)),
                                               group="Voice Agent API")
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
    output_batch_ms: int = _setting(400, "the most audio the mixer hands to the published track at a time, in ms "
                                    "(multiple of 10; lower = a change to the bed is heard sooner, more CPU)",
                                    _number(int, 10, 1000, multiple=10), group="Audio")
    idle_timeout_s: float | None = _setting(None, "end the Voice Agent session (billed while open) when no user has "
                                            "been in the room for this long; the next user starts a new call (empty: "
                                            "30 s in one room; 5 s for a serve call, whose slot then frees: a page "
                                            "reload that is back within it keeps the call)",
                                            _optional(_number(float, 0, 86400)), group="LiveKit")
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
    audio_priority: str = _setting("realtime", "CPU scheduling: realtime (real-time round-robin for the whole worker: "
                                   "audio thread 12 > LiveKit's media threads 10 > event loop 5), nice (nice -10) or "
                                   "normal; needs CAP_SYS_NICE, else it falls back quietly",
                                   _choice("realtime", "nice", "normal"), group="Audio")
    tokio_worker_threads: int = _setting(1, "worker threads of the LiveKit SDK's Rust runtime (tokio's own variable, "
                                         "set for the SDK before it starts): a call needs one; each more only adds "
                                         "wake-ups between them", _number(int, 1, 64), group="Audio")
    barge_in_clear_queue: bool = _setting(False, "for benchmarks only: also flush the track's queue on barge-in, like "
                                          "naive bridges do (it throws away queued ambient too)", _bool, group="Audio")
    # Serve mode (python worker.py serve): LiveKit agent dispatch, one call process per room
    agent_name: str = _setting("", "serve: empty: automatic dispatch (every new room gets the agent); a name: "
                               "explicit dispatch (only rooms that ask for this agent name)", _agent_name,
                               group="Serve mode")
    max_calls: int | None = _setting(None, "serve: calls this host runs at once; a job beyond it is refused (empty: "
                                     "from the cores and the memory this process may use: cores x 0.7 / 0.1, at "
                                     "most (memory - 384 MB) / 90 MB, see README)",
                                     _optional(_number(int, 1, 1000)), group="Serve mode")
    load_threshold: float | None = _setting(None, "serve: refuse jobs while the host's CPU (0-1, 5 s moving average, "
                                            "starting calls counted) is at or above this; 1: only MAX_CALLS limits "
                                            "(empty: 0.7, or 1 in dev mode: a local or loopback LiveKit server, not "
                                            "under systemd or Kubernetes)", _optional(_number(float, 0.05, 1.0)),
                                            group="Serve mode")
    rescue_interval_s: float = _setting(2.0, "serve: how often this host looks for rooms with a user and no agent "
                                        "(a job LiveKit could not place, a call whose host died) and serves them "
                                        "while it has room; 0: never", _number(float, 0, 60), group="Serve mode")
    recovery_greeting: str = _setting("Sorry, I lost you for a moment. Where were we?", "serve: what the agent says "
                                      "when it takes over a call whose Voice Agent session could not be resumed "
                                      "(instead of GREETING); empty: nothing", group="Serve mode")
    drain_timeout_s: float = _setting(600.0, "serve: on SIGTERM, how long calls in progress may go on before they are "
                                      "ended", _number(float, 0, 7 * 86400), group="Serve mode")
    job_stop_timeout_s: float = _setting(10.0, "serve: a call asked to end that is still running after this long is "
                                         "killed (at least SHUTDOWN_TIMEOUT_S + 4)", _number(float, 1, 600),
                                         group="Serve mode")
    job_start_timeout_s: float = _setting(30.0, "serve: a call not in its room this long after its assignment is "
                                          "killed", _number(float, 1, 600), group="Serve mode")
    health_port: int = _setting(0, "serve: answer GET /healthz (alive), /readyz (registered, not draining), "
                                "/status and /metrics (Prometheus) on this port; 0: off", _number(int, 0, 65535),
                                group="Serve mode")
    health_host: str = _setting("127.0.0.1", "serve: address of the health endpoint (0.0.0.0 in a container)",
                                _nonempty, group="Serve mode")
    serve_job_command: tuple[str, ...] = _setting((), "serve, for tests and benchmarks: the command run per job, as "
                                                  "shell words or a JSON list (empty: python worker.py job)",
                                                  _command, group="Serve mode")
    # Operations
    metrics_port: int = _setting(0, "single-room worker: serve GET /metrics (Prometheus) on this port; 0: off (serve "
                                 "mode: on HEALTH_PORT)", _number(int, 0, 65535), group="Operations")
    metrics_host: str = _setting("127.0.0.1", "single-room worker: address of the metrics endpoint (0.0.0.0 in a "
                                 "container)", _nonempty, group="Operations")
    startup_check: bool = _setting(True, "at start, open and end a Voice Agent session to prove the key (about 1 s "
                                   "billed) before reporting ready; a success is remembered for an hour (a hash, "
                                   "never the key, in STATE_DIR or ~/.cache/voice-agent), so restarts do not repeat "
                                   "it; 0: trust it until the first call",
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
                           ("max_silence", self.max_silence_ms), ("interrupt_response", self.interrupt_response),
                           ("interruption_delay", self.interruption_delay_ms)):
            if value is not None:
                td[key] = value
        return td

    @property
    def secrets(self) -> list[str]:
        """Strings no log line may contain: the secret settings (for SESSION_EXTRA, every
        string in it: it may carry a token for a field this version does not know)."""
        out: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not f.metadata["secret"] or not value:
                continue
            out += _strings_in(value) if isinstance(value, dict) else [value]
        return out


def _strings_in(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings_in(v)]
    return []


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
                raise ConfigError(f"{name} is not set: {f.metadata['missing'] or f.metadata['help']}")
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


# After SHUTDOWN_TIMEOUT_S of clean shutdown, a call process takes at most this long to exit:
# cancelling its tasks (1 s) and closing the audio thread (2.5 s); see worker.Worker._shutdown.
SHUTDOWN_MARGIN_S = 4.0


def check_serve_config(cfg: Config) -> None:
    """What serve mode needs on top of load_config: a call asked to end (SIGTERM) must be
    able to end cleanly before the serve process kills it."""
    if cfg.shutdown_timeout_s + SHUTDOWN_MARGIN_S > cfg.job_stop_timeout_s:
        raise ConfigError(f"JOB_STOP_TIMEOUT_S ({cfg.job_stop_timeout_s:g}) must be at least SHUTDOWN_TIMEOUT_S "
                          f"({cfg.shutdown_timeout_s:g}) + {SHUTDOWN_MARGIN_S:g}: a call asked to end takes up to "
                          "SHUTDOWN_TIMEOUT_S to end cleanly and a few seconds to close its audio; the serve "
                          "process kills it after JOB_STOP_TIMEOUT_S")





def check_state_dir(cfg: Config) -> None:
    """STATE_DIR, when set, must be a folder this process can write (it is created): found
    at start, not at the first control call, whose bed would then silently not be kept."""
    import os

    if not cfg.state_dir:
        return
    path = Path(cfg.state_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"STATE_DIR {cfg.state_dir[:120]!r}: cannot write there ({e.strerror or e}); make it a "
                          "folder this user can write, or set STATE_DIR empty (the bed is then not kept across "
                          "restarts)") from None


def session_settings(cfg: Config, tools: list[dict[str, Any]] | None = None) -> bridge.SessionSettings:
    if cfg.agent_id:
        # A stored agent: its first update is {agent_id} alone; see log_session_config.
        return bridge.SessionSettings(agent_id=cfg.agent_id)
    return bridge.SessionSettings(
        tools=list(tools or []),
        system_prompt=cfg.system_prompt or None,
        greeting=cfg.greeting or None,
        voice=cfg.voice or None,
        volume=cfg.voice_volume,
        keyterms=list(cfg.keyterms),
        turn_detection=cfg.turn_detection(),
        transcription_mode=cfg.transcription_mode,
        transcription_prompt=cfg.transcription_prompt or None,
        language_codes=list(cfg.language_codes),
        tool_timeout_seconds=bridge.service_tool_timeout(cfg.tool_timeout_s),
        tool_execution_mode=cfg.tool_execution_mode,
        extra=dict(cfg.session_extra or {}),
    )


# What a stored agent (AGENT_ID) defines instead of these variables.
AGENT_DEFINES = ("SYSTEM_PROMPT", "GREETING", "VOICE", "VOICE_VOLUME", "KEYTERMS", "TURN_PROFILE", "VAD_THRESHOLD",
                 "MIN_SILENCE_MS", "MAX_SILENCE_MS", "INTERRUPT_RESPONSE", "INTERRUPTION_DELAY_MS",
                 "TRANSCRIPTION_MODE", "TRANSCRIPTION_PROMPT", "LANGUAGE_CODES", "TOOL_EXECUTION_MODE",
                 "SESSION_EXTRA")


def ignored_by_agent(cfg: Config) -> list[str]:
    """The session settings set (to other than their defaults) that AGENT_ID makes moot."""
    if not cfg.agent_id:
        return []
    return [env_name(f) for f in dataclasses.fields(Config)
            if env_name(f) in AGENT_DEFINES and getattr(cfg, f.name) != f.default]


def log_session_config(cfg: Config) -> None:
    """One line each at start for what the first session.update will not say plainly."""
    if cfg.agent_id:
        ignored = ignored_by_agent(cfg)
        log.info("stored agent %s: each session's first update is {agent_id} alone; the agent's own prompt, "
                 "greeting, voice, tools and settings apply (TOOLS_MODULE and end_call still answer its tool calls "
                 "by name)", cfg.agent_id)
        if ignored:
            log.warning("AGENT_ID is set, so these are ignored: %s", ", ".join(ignored))
    elif cfg.session_extra:
        log.info("SESSION_EXTRA adds %s to each session's first update (values not logged)",
                 ", ".join(extra_paths(cfg.session_extra)))




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


def load_banks(cfg: Config) -> tuple[Any, Any]:
    """The ambient beds and the thinking cues (sounds.ClipBank each)."""
    return load_bank(cfg, "AMBIENT_SOUND"), load_bank(cfg, "THINKING_SOUND")
