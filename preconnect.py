"""Pre-connect audio: what the user said before the agent was in the room.

LiveKit's frontends (livekit-client's ``preConnectBuffer``, on by default in components-react's
``useSession`` and in agent-starter-react) record the microphone from the moment it is
published, before any agent has joined. Once an agent is in the room they send the recording
to it as a byte stream on ``lk.agent.pre-connect-audio-buffer`` (to the agent only;
attributes ``trackId``, ``sampleRate``, ``channels``; WebM/Opus, or MP4 on iOS), and stop
recording when the agent subscribes to the microphone. The publication advertises it
(``TF_PRECONNECT_BUFFER`` among its audio features; older clients set the participant
attribute ``lk.agent.pre-connect-audio``).

``PreConnectAudio`` receives those streams and hands the audio to the microphone's pump
(room.py), which feeds it to the session ahead of the live microphone: the pump waits for it
(``take``, at most ``WAIT_S``) before reading the live track, whose frames queue meanwhile,
so the two meet without a gap and without an overlap. The stream is input from a
participant like any other: its sender must be a user of the call and the track one of its
own microphones, its declared size is checked before a byte is read, it is read with a cap,
and it is decoded as a hostile file (sounds.decode_bytes: the container recognised from its
first bytes, one demuxer, no I/O, the duration limited while decoding, in the one decoding
thread at ordinary priority). Anything wrong with it costs one log line and the recording,
never the call. What was never claimed is forgotten (bounded in number and age).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import control
from bridge import wait_event
from logs import LogLimiter, one_line

log = logging.getLogger("worker")

TOPIC = "lk.agent.pre-connect-audio-buffer"
ATTRIBUTE = "lk.agent.pre-connect-audio"  # older clients: the participant says it records
TF_PRECONNECT_BUFFER = 6  # livekit_models.proto AudioTrackFeature
MAX_BYTES = 1024 * 1024  # a 10 s recording is ~60-160 kB (Opus / AAC)
MAX_SECONDS = 12.0  # livekit-client stops recording after 10 s
WAIT_S = 3.0  # after the microphone is bridged, its recording may take this long to arrive and decode
MAX_AGE_S = 3.0  # a recording finished this long before its microphone was bridged is stale
MAX_SLOTS = 8  # recordings received or awaited at once
FORGET_S = 30.0  # a recording nobody claimed is forgotten after this
STREAMS_PER_MINUTE, STREAMS_BURST = 6.0, 3


def decode(data: bytes, name: str) -> bytes:
    """A recording -> PCM16 24 kHz mono, through sounds.py's hardened decoding. Raises
    sounds.SoundError (one line) for anything it cannot use."""
    import numpy as np

    import sounds

    sound = sounds.decode_bytes(data, name=name, max_duration_s=MAX_SECONDS)
    return np.clip(np.round(sound.samples * 32767.0), -32768, 32767).astype("<i2").tobytes()


@dataclass
class _Slot:
    """One microphone's recording: awaited by its pump, received by its stream, or both."""

    track_sid: str
    identity: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    pcm: bytes = b""
    finished_at: float | None = None
    task: asyncio.Task[None] | None = None
    waiting: bool = False
    created: float = field(default_factory=time.monotonic)


class PreConnectAudio:
    """See the module's docstring. ``is_user(identity)``: a user of the call;
    ``own_microphone(identity, track_sid)``: that track is one of its microphones;
    ``spawn(coro, name, isolated=True)``: the owner's task spawner."""

    def __init__(self, *, spawn: Callable[..., Any], is_user: Callable[[str], bool],
                 own_microphone: Callable[[str, str], bool]) -> None:
        self._spawn = spawn
        self._is_user = is_user
        self._own_microphone = own_microphone
        self._slots: dict[str, _Slot] = {}
        self._errors = LogLimiter()
        self._rate = control.RateLimiter(STREAMS_PER_MINUTE, STREAMS_BURST)
        self.counters = {"received": 0, "refused": 0, "failed": 0, "used": 0, "late": 0, "stale": 0}

    # -- from the room --

    def on_stream(self, reader: Any, sender: str) -> None:
        """The byte stream handler: who sent it, for which track and how big it says it is
        are checked before a byte is read."""
        info = reader.info
        attrs = dict(info.attributes or {})
        track_sid = str(attrs.get("trackId", ""))[:128]
        refusal = None
        if not self._is_user(sender):
            refusal = "not a user of this call"
        elif not track_sid or not self._own_microphone(sender, track_sid):
            refusal = "not for one of the sender's microphones"
        elif (info.size or 0) > MAX_BYTES:
            refusal = f"{info.size} bytes, over the {MAX_BYTES}-byte limit"
        elif not self._rate.allow(sender):
            refusal = "too many recordings"
        if refusal is not None:
            _close(reader)
            self.counters["refused"] += 1
            if self._errors.allow(f"refused:{sender}"):
                log.info("ignoring pre-connect audio from %s (%s)", _printable(sender), refusal)
            return
        self._forget_old()
        slot = self._slots.get(track_sid)
        if slot is not None and slot.task is not None:  # a newer recording of the same microphone
            slot.task.cancel()
        if slot is None or slot.done.is_set():
            slot = _Slot(track_sid)
            self._make_room()
            self._slots[track_sid] = slot
        slot.identity = sender
        slot.task = self._spawn(self._read(slot, reader, sender), "pre-connect", isolated=True)

    def expected(self, participant: Any, publication: Any) -> bool:
        """Whether this microphone's recording is coming (or came): the publication says so,
        or its participant does (older clients), or it is here already."""
        if publication.sid in self._slots:
            return True
        try:
            features = list(publication.audio_features)
        except Exception:  # noqa: BLE001 - an SDK without the field: the attribute still says it
            features = []
        return TF_PRECONNECT_BUFFER in features or (participant.attributes or {}).get(ATTRIBUTE) == "true"

    async def take(self, track_sid: str, timeout: float = WAIT_S) -> bytes:
        """The recording of this microphone, PCM16 24 kHz mono, once it has arrived and been
        decoded (at most ``timeout``); b"" if none came in time, or it could not be used."""
        slot = self._slots.get(track_sid)
        if slot is None:
            self._make_room()
            slot = self._slots[track_sid] = _Slot(track_sid)
        slot.waiting = True
        started = time.monotonic()
        try:
            if not await wait_event(slot.done, timeout):
                self.counters["late"] += 1
                log.info("pre-connect audio for microphone %s did not arrive within %.0f s: starting without it",
                         track_sid, timeout)
                return b""
            if slot.finished_at is not None and started - slot.finished_at > MAX_AGE_S:
                self.counters["stale"] += 1
                log.info("pre-connect audio of %s ended %.1f s before its microphone was bridged: too old, "
                         "not used", _printable(slot.identity), started - slot.finished_at)
                return b""
            if slot.pcm:
                self.counters["used"] += 1
                log.info("pre-connect audio of %s: %.2f s, fed ahead of the live microphone",
                         _printable(slot.identity), len(slot.pcm) / 48000)
            return slot.pcm
        finally:
            if self._slots.get(track_sid) is slot:
                del self._slots[track_sid]
            if slot.task is not None and not slot.task.done():
                slot.task.cancel()

    def clear(self) -> None:
        """Out of the room: every recording is forgotten (a pump still waiting gets b"")."""
        for slot in self._slots.values():
            if slot.task is not None and not slot.task.done():
                slot.task.cancel()
            slot.done.set()
        self._slots.clear()

    # -- reading and decoding --

    async def _read(self, slot: _Slot, reader: Any, sender: str) -> None:
        from livekit import rtc

        import sounds

        self.counters["received"] += 1
        data = bytearray()
        try:
            async for chunk in reader:
                if len(data) + len(chunk) > MAX_BYTES:
                    _close(reader)
                    raise ValueError(f"over the {MAX_BYTES}-byte limit")
                data += chunk
            if not data:
                raise ValueError("empty")
            loop = asyncio.get_running_loop()
            slot.pcm = await loop.run_in_executor(sounds.decode_executor(), decode, bytes(data),
                                                  f"pre-connect audio from {_printable(sender)}")
            log.debug("pre-connect audio from %s: %d bytes, %.2f s", _printable(sender), len(data),
                      len(slot.pcm) / 48000)
        except asyncio.CancelledError:  # replaced by a newer recording, or not awaited any more
            _close(reader)
            raise
        except (rtc.StreamError, sounds.SoundError, ValueError) as e:
            self.counters["failed"] += 1
            slot.pcm = b""
            if self._errors.allow(f"failed:{sender}"):
                # A SoundError's advice (play it, convert it with ffmpeg) is for files, not for
                # a recording a browser sent: keep the reason only.
                reason = one_line(e).split("; check it plays")[0]
                log.info("ignoring pre-connect audio from %s (%s)", _printable(sender), reason[:200])
        except Exception as e:  # noqa: BLE001 - a decoder bug costs the recording, not the call
            self.counters["failed"] += 1
            slot.pcm = b""
            log.warning("ignoring pre-connect audio from %s (%s: %s)", _printable(sender), type(e).__name__,
                        one_line(e)[:200])
        slot.finished_at = time.monotonic()
        slot.done.set()

    # -- bounds --

    def _forget_old(self) -> None:
        now = time.monotonic()
        for sid, slot in list(self._slots.items()):
            if not slot.waiting and now - slot.created > FORGET_S:
                if slot.task is not None and not slot.task.done():
                    slot.task.cancel()
                del self._slots[sid]

    def _make_room(self) -> None:
        """At most MAX_SLOTS: the oldest recording nobody waits for goes first."""
        while len(self._slots) >= MAX_SLOTS:
            idle = [s for s in self._slots.values() if not s.waiting] or list(self._slots.values())
            oldest = min(idle, key=lambda s: s.created)
            if oldest.task is not None and not oldest.task.done():
                oldest.task.cancel()
            oldest.done.set()
            del self._slots[oldest.track_sid]


def _close(reader: Any) -> None:
    try:
        reader.close()
    except Exception:  # noqa: BLE001 - closing a finished reader
        pass


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in str(text))[:64]
