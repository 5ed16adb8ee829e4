"""Runtime control of the ambient bed and cues, with "mix_audio" semantics, over LiveKit RPC.

Authorised room participants (``CONTROL_IDENTITIES``) call RPC methods on the agent:

* ``mix_audio`` — ``{"audio": <base64 WAV>, "volume": 0.3}`` or ``{"clip": "cafe.wav"}`` (a file in
  ``AMBIENT_DIR`` or a built-in) replaces the bed (crossfade) and loops it for the rest of the
  call, under speech and in silences; ``{"volume": 0.1}`` alone re-levels it (a ramp);
  ``{"stop": true}`` fades it out. Audio too large for an RPC payload (15 KiB) is uploaded as a
  byte stream on topic ``mix_audio``, with the same fields as stream attributes; its outcome is
  sent back to the uploader as a text message on topic ``mix_audio.result``.
* ``play`` — a one-shot cue (``clip`` or ``audio``, ``volume``); answers when it has finished
  or was stopped.
* ``state`` — the active bed, volumes and counters.

The active bed (its audio and volume) is persisted per room in ``STATE_DIR``, atomically, so a
worker restarted mid-call resumes the same bed; the state is removed when the call ends
normally. Uploads are bounded in size (the declared size is checked before reading) and in
duration (enforced while decoding, see sounds.decode_bytes), callers are rate-limited, refusals
are logged at a bounded rate, and decoding runs in one ordinary-priority thread one file at a
time, so a flood of calls cannot starve the audio loop. The state file is checked on load: a
damaged or hostile one is ignored with one warning.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import os
import re
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sounds
from exits import EXIT_CONFIG

log = logging.getLogger("control")

TOPIC_UPLOAD = "mix_audio"
TOPIC_RESULT = "mix_audio.result"
METHODS = ("mix_audio", "play", "state")

# RPC error codes (application range; 1500 is the SDK's generic one).
ERR_INVALID = 2400
ERR_FORBIDDEN = 2403
ERR_RATE = 2429


class ControlError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ControlSettings:
    identities: frozenset[str] = frozenset()
    ambient_dir: Path | None = None
    state_dir: Path | None = None
    max_upload_bytes: int = 20 * 1024 * 1024
    max_audio_s: float = 600.0
    calls_per_minute: float = 30.0
    burst: int = 10
    default_volume: float = 0.3
    bed_target_lufs: float | None = -30.0
    cue_target_lufs: float | None = -24.0


@dataclass
class Bed:
    """What is playing, as the state file records it."""

    source: str  # "builtin:office", "clip:cafe.wav", "upload:<sha256>", or "stopped"
    volume: float
    name: str = ""
    audio: bytes | None = field(default=None, repr=False)  # the uploaded file, for uploads


_STATE_MAX_JSON_BYTES = 4096
_UPLOAD_SOURCE = re.compile(r"upload:[0-9a-f]{1,64}")  # a digest of the audio


class BedStore:
    """One room's active bed on disk: a JSON file and, for uploads, the audio beside it.
    Written to a temporary file, flushed, then renamed: a crash leaves the old or the new
    state, never half of one. What is read back is checked: the files live in a directory
    another process could write to, so a file that is too large, not the JSON we write, or
    names an unknown source is ignored (one warning), never trusted and never fatal."""

    def __init__(self, state_dir: Path, room: str, max_audio_bytes: int = ControlSettings.max_upload_bytes) -> None:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", room)[:80]
        digest = hashlib.sha1(room.encode()).hexdigest()[:8]
        self.dir = state_dir
        self.json_path = state_dir / f"{safe}-{digest}.json"
        self.audio_path = state_dir / f"{safe}-{digest}.audio"
        self.max_audio_bytes = max_audio_bytes

    def save(self, bed: Bed) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if bed.audio is not None:
            _atomic_write(self.audio_path, bed.audio)
        meta = {"source": bed.source, "volume": bed.volume, "name": bed.name, "saved_at": time.time()}
        _atomic_write(self.json_path, json.dumps(meta).encode())
        if bed.audio is None and self.audio_path.exists():
            self.audio_path.unlink()

    def load(self) -> Bed | None:
        try:
            return self._load()
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
            log.warning("ignoring the control state in %s (%s); the configured bed plays",
                        self.json_path, " ".join(reason.split())[:200])
            return None

    def _load(self) -> Bed:
        raw = _read_capped(self.json_path, _STATE_MAX_JSON_BYTES)
        if raw is None:
            raise ValueError(f"larger than {_STATE_MAX_JSON_BYTES} bytes")
        if _nesting(raw) > 2:  # a flat object; never hand a deep document to the parser
            raise ValueError("nested too deep for a state file")
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        source, volume, name = meta.get("source"), meta.get("volume"), meta.get("name", "")
        if not isinstance(source, str) or not _known_source(source):
            raise ValueError(f"unknown source {str(source)[:60]!r}")
        if isinstance(volume, bool) or not isinstance(volume, (int, float)) or not 0.0 <= volume <= 1.0:
            raise ValueError(f"volume {str(volume)[:20]} is not a number from 0.0 to 1.0")
        if not isinstance(name, str) or len(name) > 300:
            raise ValueError("bad name")
        bed = Bed(source, float(volume), name)
        if source.startswith("upload:"):
            try:
                audio = _read_capped(self.audio_path, self.max_audio_bytes)
            except FileNotFoundError:
                raise ValueError("the saved audio is missing") from None
            if audio is None:
                raise ValueError(f"the saved audio is larger than the upload limit ({self.max_audio_bytes} bytes)")
            if not audio:
                raise ValueError("the saved audio is empty")
            bed.audio = audio
        return bed

    def clear(self) -> None:
        for p in (self.json_path, self.audio_path):
            try:
                p.unlink()
            except FileNotFoundError:
                pass


def _known_source(source: str) -> bool:
    """The sources save() writes: stopped, configured, a built-in, a file name, an upload digest."""
    if source in ("stopped", "configured"):
        return True
    if source.startswith("builtin:"):
        return source[len("builtin:"):] in sounds.BUILTINS
    if source.startswith("clip:"):
        clip = source[len("clip:"):]
        return 0 < len(clip) <= 200 and "/" not in clip and "\\" not in clip and not clip.startswith(".")
    return _UPLOAD_SOURCE.fullmatch(source) is not None


def _read_capped(path: Path, limit: int) -> bytes | None:
    """A regular file's bytes, or None when it is larger than ``limit`` (never reads more).
    Not through a symbolic link, and never blocking on a FIFO or a device put in its place."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path.name} is not a regular file")
        data = f.read(limit + 1)
    return None if len(data) > limit else data


def _nesting(raw: bytes) -> int:
    """How deep JSON brackets nest in ``raw`` (outside strings), without parsing it: the
    parser's own recursion limit differs between Python versions."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
            continue
        if byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class RateLimiter:
    """A token bucket per caller."""

    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, who: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(who, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[who] = (tokens, now)
            return False
        self._buckets[who] = (tokens - 1.0, now)
        if len(self._buckets) > 1000:  # forget the oldest callers
            for key in sorted(self._buckets, key=lambda k: self._buckets[k][1])[:500]:
                del self._buckets[key]
        return True


class LogLimiter:
    """Bounds the warnings callers can make us write. Per caller: the first ``first`` are
    logged, then one a minute, saying how many were not. In all: at most ``per_minute`` lines
    a minute; what is over that is counted and said in one line when the next minute starts.
    Each refusal is logged, or counted in its caller's next line, or in that summary."""

    def __init__(self, first: int = 3, per_minute: int = 20, window_s: float = 60.0) -> None:
        self.first, self.per_minute, self.window_s = first, per_minute, window_s
        self._callers: dict[str, list[float]] = {}  # who -> [times seen, last logged at, not logged since]
        self._window_start = -float("inf")
        self._lines = 0  # lines written in this window
        self._over: set[str] = set()  # callers over the global cap in this window
        self._over_count = 0

    def allow(self, who: str, now: float | None = None) -> tuple[bool, int]:
        """(log this one?, how many from ``who`` were not logged since its last line)."""
        now = time.monotonic() if now is None else now
        if now - self._window_start >= self.window_s:
            if self._over_count:
                log.warning("control: %d more refusals from %s callers were not logged in the last minute",
                            self._over_count, len(self._over) if len(self._over) < 1000 else "1000 or more")
            self._window_start, self._lines, self._over, self._over_count = now, 0, set(), 0
        entry = self._callers.get(who)
        if entry is None:
            if len(self._callers) >= 1000:  # forget the callers logged longest ago
                for key in sorted(self._callers, key=lambda k: self._callers[k][1])[:500]:
                    del self._callers[key]
            entry = self._callers[who] = [0, -float("inf"), 0]
        entry[0] += 1
        if entry[0] > self.first and now - entry[1] < self.window_s:
            entry[2] += 1
            return False, 0
        if self._lines >= self.per_minute:
            self._over_count += 1
            if len(self._over) < 1000:
                self._over.add(who)
            return False, 0
        self._lines += 1
        suppressed, entry[1], entry[2] = int(entry[2]), now, 0
        return True, suppressed


class Controller:
    """Owns the runtime bed: validation, decoding off the audio loop, the mixer calls,
    persistence. ``mixer`` is a ``mixer.Mixer``."""

    def __init__(self, settings: ControlSettings, mixer: Any, room: str) -> None:
        self.s = settings
        self.mixer = mixer
        self.room = room
        self.store = BedStore(settings.state_dir, room, settings.max_upload_bytes) if settings.state_dir else None
        self.active: Bed | None = None  # set while a runtime bed overrides the configured one
        self.limiter = RateLimiter(settings.calls_per_minute, settings.burst)
        self.denied_log = LogLimiter()
        self._decode = asyncio.Semaphore(1)
        self.counters: dict[str, int] = {"calls": 0, "denied": 0, "rate_limited": 0, "invalid": 0, "uploads": 0}

    # -- the RPC surface --

    def register(self, room: Any, spawn: Any) -> None:
        """Register the RPC methods and the upload topic on a joined room. ``spawn(coro,
        name)`` runs a task owned by the caller (uploads are read in one)."""
        from livekit import rtc

        for method in METHODS:
            room.local_participant.register_rpc_method(method, self._rpc_handler(method, rtc))
        room.register_byte_stream_handler(
            TOPIC_UPLOAD, lambda reader, who: spawn(self._on_upload(room, reader, who), "control-upload"))

    def _rpc_handler(self, method: str, rtc: Any) -> Any:
        async def handler(data: Any) -> str:
            try:
                return json.dumps(await self.handle(method, data.caller_identity, data.payload))
            except ControlError as e:
                raise rtc.RpcError(e.code, _fit(str(e), RPC_MESSAGE_CHARS)) from None
        return handler

    async def handle(self, method: str, caller: str, payload: str | dict[str, Any]) -> dict[str, Any]:
        """Check the caller, parse, dispatch. Raises ControlError for the caller."""
        self._admit(method, caller)
        try:
            args = payload if isinstance(payload, dict) else (json.loads(payload) if payload.strip() else {})
        except ValueError:
            self.counters["invalid"] += 1
            raise ControlError(ERR_INVALID, "payload is not JSON") from None
        if not isinstance(args, dict):
            self.counters["invalid"] += 1
            raise ControlError(ERR_INVALID, "payload must be a JSON object")
        try:
            if method == "mix_audio":
                result = await self.mix_audio(args)
            elif method == "play":
                result = await self.play(args)
            else:
                result = self.state()
        except ControlError as e:
            if e.code == ERR_INVALID:
                self.counters["invalid"] += 1
            log.info("control: %s from %s refused: %s", method, caller, e)
            raise
        log.info("control: %s from %s: %s", method, caller, _summary(args))
        return result

    def _admit(self, what: str, caller: str) -> None:
        """Every call, RPC or upload: only CONTROL_IDENTITIES, and at a bounded rate."""
        self.counters["calls"] += 1
        if caller not in self.s.identities:
            self._denied(what, caller)
        if not self.limiter.allow(caller):
            self.counters["rate_limited"] += 1
            raise ControlError(ERR_RATE, "too many control calls; slow down")

    def _denied(self, what: str, caller: str) -> None:
        self.counters["denied"] += 1
        logged, suppressed = self.denied_log.allow(caller)
        if logged:
            more = f"; {suppressed} more refused since the last line" if suppressed else ""
            log.warning("control: %s denied for %s (not in CONTROL_IDENTITIES)%s", what, _printable(caller), more)
        raise ControlError(ERR_FORBIDDEN, f"{caller} may not control this agent")

    # -- methods --

    async def mix_audio(self, args: dict[str, Any], audio: bytes | None = None) -> dict[str, Any]:
        known = {"audio", "clip", "volume", "stop"}
        unknown = set(args) - known
        if unknown:
            raise ControlError(ERR_INVALID, f"unknown field(s): {', '.join(sorted(unknown))}")
        volume = _volume(args.get("volume"))
        if args.get("stop") is not None:
            if args["stop"] is not True or len(args) != 1:
                raise ControlError(ERR_INVALID, '"stop" must be true and alone')
            self.mixer.stop_bed()
            kept = self._set(Bed("stopped", 0.0, "none"))
            return {"ok": True, "bed": None, **kept}
        if audio is None and "audio" in args:
            audio = _b64(args["audio"])
        if audio is not None and "clip" in args:
            raise ControlError(ERR_INVALID, 'give "audio" or "clip", not both')
        if audio is None and "clip" not in args:
            if volume is None:
                raise ControlError(ERR_INVALID, 'give "audio", "clip", "volume" or "stop"')
            playing = self.mixer.snapshot()["bed"]
            if playing is None:
                raise ControlError(ERR_INVALID, "no bed is playing: there is nothing to re-level")
            self.mixer.set_bed_volume(volume)
            if self.active is not None:
                kept = self._set(Bed(self.active.source, volume, self.active.name, self.active.audio))
            else:
                kept = self._set(Bed("configured", volume, str(playing)))
            return {"ok": True, "bed": playing, "volume": volume, **kept}
        volume = self.s.default_volume if volume is None else volume
        bed, sound = await self._resolve(args.get("clip"), audio, self.s.bed_target_lufs, loop=True)
        bed.volume = volume
        self.mixer.set_bed(sound.name, sound.samples, volume)
        kept = self._set(bed)
        return {"ok": True, "bed": sound.name, "volume": volume, "duration_s": round(sound.duration_s, 2), **kept}

    async def play(self, args: dict[str, Any], audio: bytes | None = None) -> dict[str, Any]:
        unknown = set(args) - {"audio", "clip", "volume"}
        if unknown:
            raise ControlError(ERR_INVALID, f"unknown field(s): {', '.join(sorted(unknown))}")
        if audio is None and "audio" in args:
            audio = _b64(args["audio"])
        if (audio is None) == ("clip" not in args):
            raise ControlError(ERR_INVALID, 'give exactly one of "audio" or "clip"')
        volume = _volume(args.get("volume"))
        _, sound = await self._resolve(args.get("clip"), audio, self.s.cue_target_lufs, loop=False)
        completed = await self.mixer.play_cue(sound.name, sound.samples, 1.0 if volume is None else volume)
        return {"ok": True, "completed": completed, "duration_s": round(sound.duration_s, 2)}

    def state(self) -> dict[str, Any]:
        snap = self.mixer.snapshot()
        return {
            "bed": snap["bed"],
            "bed_volume": snap["bed_volume"],
            "source": None if self.active is None else self.active.source,
            "runtime": self.active is not None,
            "counters": {**self.counters, **{k: snap[k] for k in ("underruns", "barge_ins", "frames")}},
        }

    # -- persistence and call lifecycle --

    def _set(self, bed: Bed) -> dict[str, Any]:
        """Make ``bed`` the call's and keep it in STATE_DIR. Returns what the caller's answer
        must add when it could not be kept (ok false, and why): the bed plays, but a restart
        would not bring it back, and the caller must not be told otherwise."""
        self.active = bed
        if self.store is not None:
            try:
                self.store.save(bed)
            except OSError as e:
                log.warning("could not persist the bed in %s: %s", self.store.dir, e)
                return {"ok": False, "error": f"the bed plays, but it could not be kept in STATE_DIR "
                                              f"({e.strerror or _one_line(e)}): a restart would not bring it back"}
        return {}

    async def restore(self) -> bool:
        """After a restart: bring back the bed the call had. True if there was one."""
        if self.store is None:
            return False
        bed = self.store.load()
        if bed is None:
            return False
        try:
            if bed.source == "stopped":
                self.mixer.stop_bed(0)
            elif bed.source == "configured":
                self.mixer.set_bed_volume(bed.volume, 0)
            else:
                _, sound = await self._resolve(bed.source[len("clip:"):] if bed.source.startswith("clip:")
                                               else bed.source if bed.source.startswith("builtin:") else None,
                                               bed.audio, self.s.bed_target_lufs, loop=True)
                self.mixer.set_bed(sound.name, sound.samples, bed.volume, fade_ms=300)
        except Exception as e:  # a bad state file never stops the worker: ControlError, or anything else
            log.warning("could not restore the persisted bed (%s); keeping the configured one", _one_line(e))
            self.store.clear()
            return False
        self.active = bed
        log.info("restored the call's bed after a restart: %s at %.2f", bed.name or bed.source, bed.volume)
        return True

    def call_ended(self) -> None:
        """The call ended normally: the runtime bed is dropped with it."""
        self.active = None
        if self.store is not None:
            self.store.clear()

    # -- sources --

    async def _resolve(self, clip: Any, audio: bytes | None, target: float | None,
                       loop: bool) -> tuple[Bed, sounds.Sound]:
        if audio is not None:
            if len(audio) > self.s.max_upload_bytes:
                raise ControlError(ERR_INVALID, f"audio is {len(audio)} bytes; the limit is {self.s.max_upload_bytes}")
            digest = hashlib.sha256(audio).hexdigest()[:16]
            # The duration limit is enforced while decoding: a longer file is never decoded whole.
            sound = await self._decode_off_loop(lambda: sounds.decode_bytes(
                audio, name=f"upload-{digest}", target_lufs=target, max_duration_s=self.s.max_audio_s))
            bed = Bed(f"upload:{digest}", 0.0, sound.name, audio)
        else:
            source = self._clip_source(clip)
            sound = await self._decode_off_loop(lambda: sounds.load(source, target_lufs=target,
                                                                    max_duration_s=self.s.max_audio_s))
            bed = Bed(source if source.startswith("builtin:") else f"clip:{clip}", 0.0, sound.name)
        if loop:
            try:
                sounds.check_loop(sound)
            except sounds.SoundError as e:
                raise ControlError(ERR_INVALID, str(e)) from None
        if loop and not sound.name.startswith("builtin:"):
            seamless = sounds.make_seamless_loop(sound.samples, int(0.25 * sounds.SAMPLE_RATE))
            sound = sounds.Sound(sound.name, seamless, sound.source_rate, sound.loudness_lufs)
        return bed, sound

    def _clip_source(self, clip: Any) -> str:
        if not isinstance(clip, str) or not clip.strip() or len(clip) > 200:
            raise ControlError(ERR_INVALID, '"clip" must be a file name or a built-in name')
        clip = clip.strip()
        name = clip[len("builtin:"):] if clip.lower().startswith("builtin:") else clip
        if name.lower() in sounds.BUILTINS:
            return "builtin:" + name.lower()
        if clip.lower().startswith("builtin:"):
            raise ControlError(ERR_INVALID, f"no built-in {name!r}; built-ins: {', '.join(sounds.BUILTINS)}")
        if "/" in clip or "\\" in clip or clip.startswith("."):
            raise ControlError(ERR_INVALID, '"clip" is a file name in AMBIENT_DIR, not a path')
        if self.s.ambient_dir is None:
            raise ControlError(ERR_INVALID, f"no file clips: AMBIENT_DIR is not set (built-ins: "
                                            f"{', '.join(sounds.BUILTINS)})")
        path = self.s.ambient_dir / clip
        if not path.is_file():
            raise ControlError(ERR_INVALID, f"no clip named {clip!r} in AMBIENT_DIR")
        return str(path)

    async def _decode_off_loop(self, fn: Any) -> sounds.Sound:
        """Run a decode in sounds' decoding thread, at ordinary priority (the worker's own
        threads may be real-time, and a thread inherits its creator's policy)."""
        async with self._decode:  # one decode at a time: a flood queues here, not on the CPU
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(sounds.decode_executor(), sounds.run_in_background, fn)
            except sounds.SoundError as e:
                raise ControlError(ERR_INVALID, str(e)) from None
            except ValueError as e:
                raise ControlError(ERR_INVALID, f"cannot use this audio: {_one_line(e)}") from None
            except Exception as e:  # a decoder bug must cost the caller a refusal, not the worker its life
                log.warning("control: decoding failed unexpectedly: %s", _one_line(e), exc_info=e)
                raise ControlError(ERR_INVALID, "cannot use this audio: it could not be decoded") from None

    # -- byte-stream uploads --

    async def _on_upload(self, room: Any, reader: Any, caller: str) -> None:
        """One byte-stream upload, start to end: whatever the stream or its bytes do (refused,
        aborted by the sender, cut by a disconnect, undecodable), the caller gets a result
        message and this task ends normally, so an upload can never take the worker down."""
        from livekit import rtc

        result: dict[str, Any]
        try:
            result = await self._upload(reader, caller)
        except ControlError as e:
            result = {"ok": False, "code": e.code, "error": str(e)}
            if e.code != ERR_FORBIDDEN:
                log.info("control: upload from %s refused: %s", _printable(caller), e)
        except rtc.StreamError as e:
            self.counters["invalid"] += 1
            result = {"ok": False, "code": ERR_INVALID, "error": "the upload was aborted before it ended"}
            log.info("control: upload from %s aborted: %s", _printable(caller), _one_line(e))
        except Exception as e:  # noqa: BLE001 - see the docstring
            self.counters["invalid"] += 1
            result = {"ok": False, "code": ERR_INVALID, "error": "the upload failed"}
            log.warning("control: upload from %s failed: %s", _printable(caller), _one_line(e), exc_info=e)
        finally:
            _close_reader(reader)
        try:
            await room.local_participant.send_text(json.dumps(result), topic=TOPIC_RESULT,
                                                   destination_identities=[caller])
        except Exception as e:  # noqa: BLE001 - the caller may have left
            log.debug("could not send the upload result to %s: %s", _printable(caller), _one_line(e))

    async def _upload(self, reader: Any, caller: str) -> dict[str, Any]:
        """Check the caller, the action and the declared size before reading a byte, then read
        at most the upload limit, then hand the bytes to mix_audio or play."""
        self._admit("upload", caller)
        info = reader.info
        attrs = dict(info.attributes or {})
        action = attrs.pop("action", "mix_audio")
        if action not in ("mix_audio", "play"):
            self.counters["invalid"] += 1
            raise ControlError(ERR_INVALID, f"unknown action {str(action)[:40]!r}")
        limit = self.s.max_upload_bytes
        declared = info.size or 0
        if declared > limit:
            self.counters["invalid"] += 1
            raise ControlError(ERR_INVALID, f"upload of {declared} bytes is larger than the limit of {limit} bytes")
        args: dict[str, Any] = {}
        for key, value in attrs.items():
            if key == "volume":
                try:
                    args["volume"] = float(value)
                except ValueError:
                    args["volume"] = value  # reported by validation below
            elif key == "stop":
                args["stop"] = value.lower() == "true"
            else:
                args[key] = value
        data = bytearray()
        async for chunk in reader:
            if len(data) + len(chunk) > limit:
                self.counters["invalid"] += 1
                raise ControlError(ERR_INVALID, f"upload larger than the limit of {limit} bytes")
            data += chunk
        self.counters["uploads"] += 1
        handler = self.mix_audio if action == "mix_audio" else self.play
        try:
            result = await handler(args, audio=bytes(data))
        except ControlError as e:
            if e.code == ERR_INVALID:
                self.counters["invalid"] += 1
            raise
        log.info("control: %s upload from %s (%d bytes): %s", action, _printable(caller), len(data), _summary(args))
        return result


def _close_reader(reader: Any) -> None:
    """Close a reader we stop reading (refused, aborted, too large): it would otherwise keep
    its FFI subscription for the life of the process. Closing a finished one is a no-op."""
    try:
        reader.close()
    except Exception as e:  # noqa: BLE001
        log.debug("could not close an upload stream: %s", _one_line(e))


# The longest refusal text sent back (LiveKit bounds an RPC error's message at 256 bytes).
RPC_MESSAGE_CHARS = 200


def _fit(text: str, limit: int) -> str:
    """``text`` within ``limit`` characters, shortened at the end of a clause ("; ...": the
    fix, such as an ffmpeg command, is the last one), so no command is cut in the middle;
    the worker's log has the whole line."""
    if len(text) <= limit:
        return text
    cut = text.rfind("; ", 0, limit - len(" (more in the worker's log)"))
    head = text[:cut] if cut > 0 else text[:limit - len(" (more in the worker's log)")].rsplit(" ", 1)[0]
    return head + " (more in the worker's log)"


def _one_line(e: BaseException) -> str:
    return " ".join((str(e) or type(e).__name__).split())[:200]


def _printable(text: str) -> str:
    """A caller's identity as it goes into a log line: no control characters, bounded."""
    return "".join(c if c.isprintable() else "?" for c in str(text))[:80]


def _volume(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ControlError(ERR_INVALID, '"volume" must be a number from 0.0 to 1.0')
    return float(value)


def _b64(value: Any) -> bytes:
    if not isinstance(value, str) or not value:
        raise ControlError(ERR_INVALID, '"audio" must be a base64 string')
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ControlError(ERR_INVALID, '"audio" is not valid base64') from None


def _summary(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={'<%d chars>' % len(v) if k == 'audio' and isinstance(v, str) else v!r}"
                     for k, v in args.items()) or "{}"


# --- the client: `python worker.py control` ---------------------------------------------------


async def call(livekit_url: str, token: str, agent_identity: str, method: str | None, payload: str,
               file: str | None) -> int:
    """`python worker.py control METHOD [JSON] [--file F]`: join with ``token`` (an operator's),
    call the worker's control method, print the JSON answer. Returns the exit code."""
    from livekit import rtc

    if method not in METHODS:
        what = "control needs a method" if not method else f"unknown control method {method[:40]!r}"
        print(f"error: {what}: use {', '.join(METHODS)}", file=sys.stderr)
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
    await room.connect(livekit_url, token, rtc.RoomOptions(auto_subscribe=False))
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

            room.register_text_stream_handler(TOPIC_RESULT, on_result)
            attrs = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in args.items()}
            attrs["action"] = method
            writer = await room.local_participant.stream_bytes(
                name=Path(file).name, topic=TOPIC_UPLOAD, attributes=attrs,
                destination_identities=[agent_identity], total_size=len(audio))
            for i in range(0, len(audio), 15000):
                await writer.write(audio[i:i + 15000])
            await writer.aclose()
            result = await asyncio.wait_for(answer, 60)
            print(result)
            return 0 if json.loads(result).get("ok") else 1
        if audio is not None:
            args["audio"] = base64.b64encode(audio).decode()
        try:
            answer_text = await room.local_participant.perform_rpc(destination_identity=agent_identity, method=method,
                                                                   payload=json.dumps(args), response_timeout=60)
            print(answer_text)
            return 0 if json.loads(answer_text).get("ok", True) else 1  # state has no "ok"
        except rtc.RpcError as e:
            print(f"error: {e.message} (code {e.code})", file=sys.stderr)
            return 1
    finally:
        await room.disconnect()
