"""The audio engine: one published track carrying reply + ambient bed + cues.

* ``MixerCore`` is pure: ``next_frame()`` returns exactly one frame (10 or 20 ms of
  24 kHz mono int16) mixing the reply buffer and the voices (the ambient bed, looped from
  memory and ducked under speech; the thinking cue; one-shot cues; streams), every gain a
  per-sample ramp, through a limiter that never lets the sum wrap or hard-clip. It takes
  its clock from the frames it produces, so it can be tested sample-exactly. It keeps the
  last frames it mixed in parts (reply, ducked voices, the rest) with the state they were
  mixed from, so frames already handed to the output can be mixed again differently
  (``rerender``): without the reply at barge-in, with the reply at its start.
* ``Mixer`` owns the core and ONE writer: a dedicated audio thread with its own event
  loop that feeds the ``AudioSource``. Nothing on that thread waits on network I/O, and a
  busy main event loop (JSON, room events, logging) cannot starve the bed. The main loop
  talks to the core through thread-safe methods (a lock around each call; microseconds).

How the writer feeds the output, and why (README, *Latency and benchmarks*):

* In batches: it mixes and captures ``batch_ms`` (100 ms) at a time, not one 10 ms frame.
  Each ``capture_frame`` is a round trip through the SDK (a protobuf request, a task on
  its Rust runtime, a callback that takes the GIL and wakes two event loops); at 100 a
  second that, not the mixing, was most of a call's CPU.
* It keeps between ``queue_ms`` and ``queue_ms + batch_ms`` queued in the source: the
  least is what rides out a stall of this thread. The source's native queue is sized so
  that a regular capture overfills it by one 10 ms block and completes at the source's
  next 10 ms tick, which tells the writer where that clock is (``_check_clock``); it knows,
  at any moment, how much of what it handed over has not been played yet.
* What must change now flushes the queue and hands it the same frames again, mixed
  anew (``_rerender``): at barge-in without the reply (a 2 ms fade; the bed goes on
  sample for sample), and when a reply starts (or resumes after running dry) with the
  reply mixed in from the first frame not yet played, so it does not wait behind the
  queued bed; and when a cue, the thinking cue or a bed (from silence) starts, with it
  mixed in. Everything else (a volume change, a stop) takes effect with the next batch.
  The replacement is made between two ticks of the source, checked after the mixing, and
  in one go (``_DirectSource``: clear_queue() and the capture request without letting go
  of the GIL in between), so that no other thread can leave the queue empty at a tick.

Playback is reported as typed events (``ReplyStartedPlaying``, ``ReplyAudioStopped``)
delivered on the listener's event loop at the moment the audio leaves the source;
``wait_for_playout()`` and the handles of ``play()`` resolve at that moment too.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Union

import numpy as np

from pcm import SAMPLE_RATE

import scheduling

log = logging.getLogger("mixer")

DEFAULT_QUEUE_MS = 100  # audio always queued ahead of the listener; README says why 100
DEFAULT_BATCH_MS = 400  # mixed and handed over at once, at most; README says why 400
MIN_BATCH_MS = 100  # ... at least, while reply audio is waiting
INT16_SCALE = 32767.0
TICK_S = 0.01  # the AudioSource hands 10 ms to its track every 10 ms
BLOCK = SAMPLE_RATE // 100  # samples per tick
# A tick runs at most this late (the source's clock thread runs at SCHED_FIFO, set by WebRTC).
TICK_LATE_S = 0.001
# A re-render replaces the source's queue only this long before its next tick at the least
# (else just after it): the time to hand the frames over and for the SDK's own thread to queue
# them (a tick before that finds the queue empty, and this SDK then sends 10 ms of silence).
# In one go (_DirectSource), the request is made no later than REPLACE_LEAD_S before the tick:
# the SDK's thread then has that long to queue the frames (0.3 ms was not always enough in CI,
# where that thread runs at normal priority on a loaded machine). Through the SDK's public
# calls, which let other threads take the GIL in between: measured, 0.5 ms lost some races.
HANDOFF_S = 0.002
REPLACE_LEAD_S = 0.0015
HANDOFF_PUBLIC_S = 0.001
# The source's clock starts this long after its constructor returns; once the phase learned
# from six completions is within PHASE_TOLERANCE_S of that, what is learned later stays that
# close (see Mixer._phase_prior).
CLOCK_START_S = 0.0001
PHASE_TOLERANCE_S = 0.0004
# Reply audio that arrives while the reply's earlier audio is still queued ahead of the
# listener is mixed into the queue (a "fill") only FILL_LEAD_S before that audio runs out,
# all at once, instead of at each chunk (an API that sends faster than real time sends a
# chunk every few tens of ms, and each fill costs about as much as a hand-over); a fill
# less than FILL_DEFER_S away is done at once.
FILL_LEAD_S = 0.04
FILL_DEFER_S = 0.02


def _wrap(d: float) -> float:
    """A difference of two phases of the source's clock, in [-5, 5) ms."""
    return (d + TICK_S / 2) % TICK_S - TICK_S / 2


# --- building blocks ----------------------------------------------------------------


class Ramp:
    """A gain that moves to a target over a given time, interpolated per sample
    (no zipper noise). ``shape="power"`` follows a quarter sine (equal-power fades
    for crossfades of uncorrelated material); ``"linear"`` is linear in amplitude."""

    __slots__ = ("value", "_start", "_target", "_len", "_pos", "_shape")

    def __init__(self, value: float = 0.0) -> None:
        self.value = value
        self._start = value
        self._target = value
        self._len = 0
        self._pos = 0
        self._shape = "linear"

    def to(self, target: float, samples: int, shape: str = "linear") -> None:
        self._start = self.value
        self._target = target
        self._len = max(0, int(samples))
        self._pos = 0
        self._shape = shape
        if self._len == 0:
            self.value = target

    @property
    def target(self) -> float:
        return self._target

    @property
    def moving(self) -> bool:
        return self._pos < self._len

    def render(self, n: int) -> np.ndarray | float:
        """Gains for the next ``n`` samples (a scalar when constant)."""
        if not self.moving:
            return self.value
        idx = np.arange(self._pos + 1, self._pos + n + 1, dtype=np.float64)
        t = np.minimum(idx / self._len, 1.0)
        if self._shape == "power":
            if self._target >= self._start:
                w = np.sin(t * math.pi / 2)
            else:
                w = 1.0 - np.cos(t * math.pi / 2)
        else:
            w = t
        gains = self._start + (self._target - self._start) * w
        self._pos += n
        self.value = float(gains[-1])
        if not self.moving:
            self.value = self._target
        return gains.astype(np.float32)


class Voice:
    """A sound in the mix besides the reply: a bed, the thinking cue, a one-shot cue or a
    stream. Every voice lives in ``MixerCore.voices`` and leaves it by one rule: when its
    sound has ended (``finished``), or when it was stopped (``retiring``) and its fade-out
    reached zero. It then counts as ``completed`` only if it ended on its own.

    ``gain`` is its volume (ramped on changes); ``fade`` its fade-in and fade-out. Beds are
    ``ducked`` under the agent's speech; the thinking cue ``yields`` to a reply (it fades out
    when the reply starts, also when the reply's start is mixed into frames already queued)."""

    def __init__(self, name: str, kind: str, volume: float = 1.0, *, ducked: bool = False,
                 yields: bool = False) -> None:
        self.name = name
        self.kind = kind  # "bed" | "thinking" | "cue" | "stream"
        self.ducked = ducked
        self.yields = yields
        self.gain = Ramp(volume)
        self.fade = Ramp(1.0)
        self.finished = False
        self.retiring = False
        self.on_done: Callable[[bool], None] | None = None  # called where the frame is mixed
        self.handle: PlayHandle | None = None  # Mixer's handle on it, if any
        # Started after frames already handed over: it may be mixed into them (rerender_voices)
        # until a frame of its own is mixed.
        self.early = False

    def read(self, n: int) -> np.ndarray:  # pragma: no cover - every kind overrides it
        raise NotImplementedError

    def stop(self, samples: int) -> None:
        if not self.retiring:
            self.retiring = True
            self.fade.to(0.0, samples, "power")

    @property
    def done(self) -> bool:
        return self.finished or (self.retiring and not self.fade.moving and self.fade.value == 0.0)

    @property
    def completed(self) -> bool:
        return self.finished and not self.retiring


class LoopVoice(Voice):
    """A sound from memory, looped (the loader makes the buffer seamless) or played once."""

    def __init__(self, name: str, samples: np.ndarray, loop: bool = True, kind: str | None = None,
                 volume: float = 1.0, **flags: bool) -> None:
        super().__init__(name, kind or ("bed" if loop else "cue"), volume, **flags)
        self.samples = np.ascontiguousarray(samples, dtype=np.float32)
        self.loop = loop
        self.pos = 0

    def read(self, n: int) -> np.ndarray:
        """The next ``n`` samples; a view into the buffer when they do not wrap (read-only)."""
        size = len(self.samples)
        if self.finished or size == 0:
            self.finished = True
            return np.zeros(n, dtype=np.float32)
        if self.pos + n <= size:
            out = self.samples[self.pos:self.pos + n]
            self.pos += n
            if self.pos == size:
                if self.loop:
                    self.pos = 0
                else:
                    self.finished = True
            return out
        out = np.zeros(n, dtype=np.float32)
        filled = 0
        while filled < n:
            take = min(n - filled, size - self.pos)
            out[filled:filled + take] = self.samples[self.pos:self.pos + take]
            filled += take
            self.pos += take
            if self.pos >= size:
                if not self.loop:
                    self.finished = True
                    break
                self.pos = 0
        return out


@dataclass
class ReplyStats:
    reply_id: str
    received: int = 0  # samples
    played: int = 0  # samples handed to the source
    first_received_at: float | None = None
    first_played_at: float | None = None
    interrupted_at: float | None = None
    silent_at: float | None = None  # last reply sample handed after an interruption


class ReplyBuffer:
    """Unmixed reply audio, in arrival order, any chunk length."""

    def __init__(self) -> None:
        self._segments: collections.deque[tuple[str, np.ndarray]] = collections.deque()
        self._offset = 0
        self.queued = 0
        self._per_reply: dict[str, int] = {}

    def push(self, reply_id: str, samples: np.ndarray) -> None:
        self._segments.append((reply_id, samples))
        self.queued += len(samples)
        self._per_reply[reply_id] = self._per_reply.get(reply_id, 0) + len(samples)

    def read(self, n: int) -> tuple[np.ndarray, list[tuple[str, int]]]:
        """Up to ``n`` samples (zero-padded) and which reply they came from."""
        out = np.zeros(n, dtype=np.float32)
        _, owners = self.read_into(out)
        return out, owners

    def read_into(self, out: np.ndarray) -> tuple[int, list[tuple[str, int]]]:
        """Fill ``out`` from the start with up to ``len(out)`` samples; returns how many and
        which reply they came from (the rest of ``out`` is left as it was)."""
        n = len(out)
        owners: list[tuple[str, int]] = []
        filled = 0
        while filled < n and self._segments:
            rid, seg = self._segments[0]
            take = min(n - filled, len(seg) - self._offset)
            out[filled:filled + take] = seg[self._offset:self._offset + take]
            filled += take
            self._offset += take
            self.queued -= take
            left = self._per_reply[rid] - take
            if left:
                self._per_reply[rid] = left
            else:
                del self._per_reply[rid]
            if owners and owners[-1][0] == rid:
                owners[-1] = (rid, owners[-1][1] + take)
            else:
                owners.append((rid, take))
            if self._offset >= len(seg):
                self._segments.popleft()
                self._offset = 0
        return filled, owners

    def has(self, reply_id: str) -> bool:
        return reply_id in self._per_reply

    def head_reply(self) -> str | None:
        return self._segments[0][0] if self._segments else None

    def drop(self, reply_id: str | None) -> int:
        """Remove every queued sample of ``reply_id`` (all replies if None)."""
        kept: collections.deque[tuple[str, np.ndarray]] = collections.deque()
        dropped = 0
        for i, (rid, seg) in enumerate(self._segments):
            start = self._offset if i == 0 else 0
            if reply_id is None or rid == reply_id:
                dropped += len(seg) - start
            else:
                kept.append((rid, seg[start:] if start else seg))
        self._segments = kept
        self._offset = 0
        self.queued -= dropped
        if reply_id is None:
            self._per_reply.clear()
        else:
            self._per_reply.pop(reply_id, None)
        return dropped


class StreamVoice(Voice):
    """Programmatic audio fed by an async iterator (``Mixer.play``, ``Mixer.play_stream``)."""

    def __init__(self, name: str, volume: float) -> None:
        super().__init__(name, "stream", volume)
        self.buffer = ReplyBuffer()
        self.ended = False  # the iterator is exhausted: finished once drained
        self.on_space: Callable[[], None] | None = None  # called after a read, for the feeder

    def read(self, n: int) -> np.ndarray:
        samples, _ = self.buffer.read(n)
        if self.ended and self.buffer.queued == 0:
            self.finished = True
        if self.on_space is not None:
            self.on_space()
        return samples


class Limiter:
    """Peak limiter with instant attack and linear release, computed per sample
    without a Python loop: g[n] = min(r[n], g[n-1] + step) with r the gain that keeps
    |x| <= ceiling. The output can never exceed the ceiling; below it, gain is 1."""

    def __init__(self, ceiling: float = 0.89, release_ms: float = 80.0, sample_rate: int = SAMPLE_RATE) -> None:
        self.ceiling = ceiling
        self.step = 1.0 / (release_ms * sample_rate / 1000.0)
        self.gain = 1.0
        self.active_samples = 0

    def process(self, x: np.ndarray) -> np.ndarray:
        peak = float(np.max(np.abs(x))) if len(x) else 0.0
        if peak <= self.ceiling and self.gain >= 1.0:
            return x
        n = len(x)
        k = np.arange(1, n + 1, dtype=np.float64)
        mag = np.abs(x).astype(np.float64)
        required = np.minimum(1.0, self.ceiling / np.maximum(mag, 1e-12))
        # g[n] = min(prev + n*step, min_k<=n (required[k] + (n-k)*step)), capped at 1
        candidates = np.minimum.accumulate(required - k * self.step) + k * self.step
        g = np.minimum(np.minimum(candidates, self.gain + k * self.step), 1.0)
        self.gain = float(g[-1])
        self.active_samples += int(np.count_nonzero(g < 1.0))
        return (x * g).astype(np.float32)


class Ducker:
    """Gain for the bed: dips by ``depth_db`` while the agent speaks (attack), holds
    through short pauses, and comes back (release). Interpolated per sample in dB."""

    def __init__(
        self,
        depth_db: float = -6.0,
        attack_ms: float = 60.0,
        release_ms: float = 600.0,
        hold_ms: float = 250.0,
        sample_rate: int = SAMPLE_RATE,
    ) -> None:
        self.depth_db = min(0.0, depth_db)
        self.attack_db_per_sample = abs(self.depth_db) / max(1.0, attack_ms * sample_rate / 1000)
        self.release_db_per_sample = abs(self.depth_db) / max(1.0, release_ms * sample_rate / 1000)
        self.hold_samples = int(hold_ms * sample_rate / 1000)
        self.level_db = 0.0
        self._since_speech = 10**9

    @property
    def state(self) -> tuple[float, int]:
        return self.level_db, self._since_speech

    @state.setter
    def state(self, value: tuple[float, int]) -> None:
        self.level_db, self._since_speech = value

    def render(self, n: int, speech: bool) -> np.ndarray | float:
        if speech:
            self._since_speech = 0
        else:
            self._since_speech += n
        target = self.depth_db if self._since_speech <= self.hold_samples else 0.0
        if self.level_db == target:
            return 1.0 if target == 0.0 else 10 ** (target / 20)
        step = self.attack_db_per_sample if target < self.level_db else self.release_db_per_sample
        k = np.arange(1, n + 1, dtype=np.float64)
        if target < self.level_db:
            db = np.maximum(self.level_db - k * step, target)
        else:
            db = np.minimum(self.level_db + k * step, target)
        self.level_db = float(db[-1])
        return (10 ** (db / 20)).astype(np.float32)


@dataclass
class MixerCounters:
    frames: int = 0
    underruns: int = 0
    underrun_ms: float = 0.0
    barge_ins: int = 0
    reply_samples_dropped: int = 0
    reply_samples_overflow: int = 0  # over max_reply_backlog_s: dropped on arrival
    reply_holes: int = 0  # a reply ran dry and resumed later: the API was late
    reply_hole_ms: float = 0.0
    limiter_samples: int = 0
    queue_ms: float = 0.0
    last_reply_latency_ms: float | None = None
    last_barge_in_to_silence_ms: float | None = None
    reply_latencies_ms: list[float] = field(default_factory=list)
    barge_in_to_silence_ms: list[float] = field(default_factory=list)


# --- playback events and handles -----------------------------------------------------------


@dataclass(frozen=True)
class ReplyStartedPlaying:
    """A reply's first sample left the source (``at``: ``time.monotonic()``)."""

    reply_id: str
    at: float


@dataclass(frozen=True)
class ReplyAudioStopped:
    """Reply audio stopped leaving the source: the reply ran out (it ended, or the API is
    late with the rest) or was interrupted. ``reply_id`` is the reply heard last."""

    reply_id: str | None
    at: float
    interrupted: bool


PlaybackEvent = Union[ReplyStartedPlaying, ReplyAudioStopped]


@dataclass(frozen=True)
class PlayoutDone:
    """What ``Mixer.wait_for_playout`` returns: how much of the reply was handed to the
    source, and whether it was interrupted (``reply_id`` None: every reply)."""

    reply_id: str | None
    played_ms: float
    interrupted: bool


class PlayHandle:
    """A sound the mixer plays (``Mixer.play``, ``play_cue``, ``start_thinking``). Await it
    (the result says whether it played to its end; cancelling the awaiting task stops the
    sound), or ``await wait_for_playout()`` (not tied to the sound), or ``stop()`` it. It is
    done when the sound's last sample, or the end of its fade-out, has left the source."""

    def __init__(self, mixer: "Mixer", voice: Voice, loop: asyncio.AbstractEventLoop) -> None:
        self._mixer = mixer
        self.voice = voice
        self._loop = loop
        self._done: asyncio.Future[bool] = loop.create_future()
        self._task: asyncio.Task[None] | None = None  # a stream's feeder

    @property
    def name(self) -> str:
        return self.voice.name

    def done(self) -> bool:
        return self._done.done()

    def stop(self, fade_ms: float | None = None) -> None:
        """Fade the sound out (default: a cue's fade, 50 ms)."""
        if not self.done():
            self._mixer._stop_voice(self.voice, fade_ms)
        if self._task is not None:
            self._task.cancel()

    async def wait_for_playout(self) -> bool:
        """Until the sound has finished or was stopped; True if it played to its end."""
        return await asyncio.shield(self._done)

    def __await__(self):  # type: ignore[no-untyped-def]
        return self._await().__await__()

    async def _await(self) -> bool:
        try:
            return await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self.stop()
            raise

    def _resolve(self, completed: bool) -> None:
        if not self._done.done():
            self._done.set_result(completed)


def _log_feeder_error(task: "asyncio.Task[None]") -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a stream played by the mixer failed", exc_info=task.exception())


class _Dispatcher:
    """Delivers playback events on one event loop at the moment they are heard. Reply
    events of frames mixed again before they were heard are withdrawn (``cancel_from``)
    and replaced by the new mix's. Runs on its loop only."""

    def __init__(self, mixer: "Mixer", loop: asyncio.AbstractEventLoop) -> None:
        self.mixer = mixer
        self.loop = loop
        self.listeners: list[Callable[[PlaybackEvent], None]] = []
        self.waiters: list[tuple[str | None, asyncio.Future[PlayoutDone]]] = []
        self._timers: collections.deque[tuple[int, asyncio.TimerHandle]] = collections.deque()

    def post(self, cancel_from: int | None, items: list[tuple[int, float, str, str | None, bool]]) -> None:
        if cancel_from is not None:
            kept: collections.deque[tuple[int, asyncio.TimerHandle]] = collections.deque()
            for pos, handle in self._timers:
                if pos >= cancel_from:
                    handle.cancel()
                else:
                    kept.append((pos, handle))
            self._timers = kept
        while self._timers and self._timers[0][1].cancelled():
            self._timers.popleft()
        now = self.loop.time()
        for pos, at, kind, rid, interrupted in items:
            handle = self.loop.call_at(max(at, now), self._fire, kind, rid, at, interrupted)
            self._timers.append((pos, handle))
        if len(self._timers) > 64:  # fired ones: forget
            self._timers = collections.deque((p, h) for p, h in self._timers
                                             if not h.cancelled() and h.when() > now)

    def _fire(self, kind: str, rid: str | None, at: float, interrupted: bool) -> None:
        event: PlaybackEvent | None = None
        if kind == "playing" and rid is not None:
            event = ReplyStartedPlaying(rid, at)
        elif kind == "idle":
            event = ReplyAudioStopped(rid, at, interrupted)
        if event is not None:
            for callback in list(self.listeners):
                try:
                    callback(event)
                except Exception:
                    log.exception("playback listener failed")
        if kind in ("ended", "idle") and self.waiters:
            self.mixer._resolve_waiters(self, kind, rid)


# --- the pure core ----------------------------------------------------------------------


@dataclass
class MixerSettings:
    frame_ms: int = 10
    ambient_volume: float = 0.3
    ambient_fade_in_ms: int = 1500
    ambient_crossfade_ms: int = 800
    ambient_fade_out_ms: int = 600
    volume_ramp_ms: int = 120
    duck_db: float = -6.0
    duck_attack_ms: float = 60.0
    duck_release_ms: float = 600.0
    reply_volume: float = 1.0
    # A raised-cosine fade: 2 ms of it leaves less above 3 kHz (-77 dB, the click) than a
    # quarter-cosine over 5 ms (-67 dB), and the reply is gone 2.5 ms sooner.
    barge_in_fade_ms: float = 2.0
    thinking_volume: float = 0.3
    cue_fade_ms: int = 150
    limiter_ceiling: float = 0.89
    max_reply_backlog_s: float = 120.0  # reply audio held ahead of playback, at most
    # The jitter cushion: a reply's first sample waits until this much of it has arrived,
    # or this long since its first chunk arrived, whichever comes first. It starts at
    # reply_cushion_ms (0: replies start at once) and can adapt: when a reply runs dry and
    # its audio resumes later (the API was late: a hole the listener hears), the cushion
    # grows to that hole, up to reply_cushion_max_ms; each new reply takes 10 ms off it
    # again. Off by default (README, "The jitter cushion"): an API that sends faster than
    # real time needs none; holes are counted either way (counters.reply_holes).
    reply_cushion_ms: float = 0.0
    reply_cushion_max_ms: float = 0.0


class _Frame:
    """One mixed frame, kept in parts with the state it was mixed from (for rerender)."""

    __slots__ = ("pos", "ducked", "plain", "yielding", "reply", "out", "has_ducked", "has_plain", "has_yielding",
                 "reply_end", "owners", "duck_before", "limiter_before", "speaking_before", "last_reply_before",
                 "events")

    def __init__(self, n: int) -> None:
        self.pos = 0
        self.ducked = np.zeros(n, np.float32)  # beds, before ducking
        self.plain = np.zeros(n, np.float32)  # cues and streams
        self.yielding = np.zeros(n, np.float32)  # the thinking cue
        self.reply = np.zeros(n, np.float32)  # after the reply volume
        self.out = np.zeros(n, np.int16)
        self.has_ducked = self.has_plain = self.has_yielding = False
        self.reply_end = 0  # reply samples in this frame run up to here (0: none)
        self.owners: list[tuple[str, int]] = []
        self.duck_before: tuple[float, int] = (0.0, 0)
        self.limiter_before = 1.0
        self.speaking_before = False
        self.last_reply_before: str | None = None
        self.events: list[tuple[str, str | None, int]] = []


class MixerCore:
    """Pure mixing core. Not thread-safe by itself (``Mixer`` adds the lock).

    ``clock`` (default ``time.monotonic``) only timestamps counters and the reply cushion;
    the audio itself depends on nothing but the calls made.
    """

    def __init__(self, settings: MixerSettings | None = None, clock: Callable[[], float] = time.monotonic,
                 history_frames: int = 32) -> None:
        self.s = settings or MixerSettings()
        if self.s.frame_ms not in (10, 20):
            raise ValueError("frame_ms must be 10 or 20")
        self.frame = SAMPLE_RATE * self.s.frame_ms // 1000
        self.clock = clock
        self.reply = ReplyBuffer()
        self.reply_gain = self.s.reply_volume
        self._tail: np.ndarray | None = None  # faded remainder of an interrupted reply
        self._tail_owner: str | None = None
        self.voices: list[Voice] = []  # beds, thinking cue, cues, streams; in the order started
        self.bed_volume = self.s.ambient_volume
        self.ducker = Ducker(self.s.duck_db, self.s.duck_attack_ms, self.s.duck_release_ms)
        self.limiter = Limiter(self.s.limiter_ceiling)
        self.stats: collections.OrderedDict[str, ReplyStats] = collections.OrderedDict()
        self._first_pos: dict[str, int] = {}  # output position of each reply's first sample
        self.counters = MixerCounters()
        self.samples_out = 0
        # Reply playback, for the application, as (kind, reply_id, output position):
        # "playing" a reply's first sample, "idle" reply audio stopped (reply_id: the reply
        # heard last), "ended" the last queued sample of a reply. Drained by Mixer.
        self.events: list[tuple[str, str | None, int]] = []
        # Voices that left the mix: (voice, completed, output position). Drained by Mixer.
        self.finished: list[tuple[Voice, bool, int]] = []
        self._speaking = False
        self._last_reply: str | None = None
        self._last_reply_end = 0  # reply samples in the last frame mixed
        self._reply_tail: tuple[str, int] | None = None  # (reply, position after its last sample mixed)
        self.cushion_ms = self.s.reply_cushion_ms  # the jitter cushion now (see MixerSettings)
        self._history: collections.deque[_Frame] = collections.deque()
        self._history_frames = max(2, history_frames)
        self._mix = np.zeros(self.frame, np.float32)
        self._scratch = np.zeros(self.frame, np.float32)

    def _ms(self, ms: float) -> int:
        return int(round(ms * SAMPLE_RATE / 1000))

    # -- the voices, by kind (read-only views; MixerCore.voices is the collection) --

    @property
    def beds(self) -> list[Voice]:
        return [v for v in self.voices if v.kind == "bed"]

    @property
    def thinking(self) -> Voice | None:
        current = [v for v in self.voices if v.kind == "thinking"]
        return current[-1] if current else None

    @property
    def cues(self) -> list[Voice]:
        return [v for v in self.voices if v.kind == "cue"]

    @property
    def streams(self) -> list[Voice]:
        return [v for v in self.voices if v.kind == "stream"]

    # -- reply --

    def push_reply(self, reply_id: str, pcm: bytes) -> None:
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / INT16_SCALE
        if not len(samples):
            return
        st = self._stats(reply_id)
        if st.interrupted_at is not None:
            self.counters.reply_samples_dropped += len(samples)
            return
        room = int(self.s.max_reply_backlog_s * SAMPLE_RATE) - self.reply.queued
        if len(samples) > room:
            # Far more than any real reply runs ahead of playback: a runaway or hostile
            # stream. What does not fit is dropped (counted), and memory stays bounded.
            if self.counters.reply_samples_overflow == 0:
                log.warning("reply audio arrives %.0f s ahead of playback: dropping the excess",
                            self.s.max_reply_backlog_s)
            self.counters.reply_samples_overflow += len(samples) - max(0, room)
            samples = samples[:max(0, room)]
            if not len(samples):
                return
        if st.first_received_at is None:
            st.first_received_at = self.clock()
        st.received += len(samples)
        self.reply.push(reply_id, samples)

    def _stats(self, reply_id: str) -> ReplyStats:
        st = self.stats.get(reply_id)
        if st is None:
            st = self.stats[reply_id] = ReplyStats(reply_id)
            while len(self.stats) > 32:
                old, _ = self.stats.popitem(last=False)
                self._first_pos.pop(old, None)
        return st

    def interrupt(self, reply_id: str | None = None) -> ReplyStats | None:
        """Barge-in: fade the playing reply out over a few ms and drop the rest of its
        queued audio (``None`` = every queued reply). Returns the reply's stats."""
        head = self.reply.head_reply()
        target = reply_id if reply_id is not None else head
        now = self.clock()
        if target is not None:
            st = self._stats(target)
            if st.interrupted_at is None:
                st.interrupted_at = now
                self.counters.barge_ins += 1
        if head is not None and (reply_id is None or head == reply_id):
            n = max(1, self._ms(self.s.barge_in_fade_ms))
            tail, owners = self.reply.read(n)
            self._tail = tail * self._fade_out(n)
            self._tail_owner = owners[0][0] if owners else head
        dropped = self.reply.drop(reply_id)
        self.counters.reply_samples_dropped += dropped
        if target is None:
            return None
        st = self._stats(target)
        if self._tail is None:
            # Nothing of it is left to mix: its audio ends with what was already handed over.
            self.events.append(("ended", target, self.samples_out))
            if st.silent_at is None:
                st.silent_at = now
                self._record_silence(st)
        return st

    def _fade_out(self, n: int) -> np.ndarray:
        """A raised-cosine fade from 1 to 0 over ``n`` samples (the first below 1, the last 0)."""
        return (0.5 * (1.0 + np.cos(np.linspace(0.0, math.pi, n + 1, dtype=np.float64)[1:]))).astype(np.float32)

    def _record_silence(self, st: ReplyStats) -> None:
        if st.interrupted_at is not None and st.silent_at is not None:
            ms = (st.silent_at - st.interrupted_at) * 1000
            self.counters.last_barge_in_to_silence_ms = ms
            self.counters.barge_in_to_silence_ms.append(ms)
            del self.counters.barge_in_to_silence_ms[:-100]

    def _held(self, now: float) -> bool:
        """The reply cushion: a reply's start waits for enough of it (or long enough)."""
        cushion = self.cushion_ms
        if cushion <= 0 or self._speaking or not self.reply.queued:
            return False
        st = self.stats.get(self.reply.head_reply() or "")
        if st is None or st.first_played_at is not None or st.first_received_at is None:
            return False
        if self.reply.queued >= cushion * SAMPLE_RATE / 1000:
            return False
        return now < st.first_received_at + cushion / 1000

    def hold_until(self) -> float | None:
        """When a reply held by the cushion may start (None: nothing is held)."""
        if not self._held(self.clock()):
            return None
        st = self.stats[self.reply.head_reply() or ""]
        return (st.first_received_at or 0.0) + self.cushion_ms / 1000

    def wants_fill(self) -> bool:
        """Reply audio is waiting while the frames mixed last carry none (a reply's start,
        or its continuation after it ran dry): it could be mixed into frames already handed
        over but not yet played (``rerender(..., "fill")``)."""
        return bool(self.reply.queued) and self._tail is None and self._last_reply_end < self.frame \
            and not self._held(self.clock())

    def _last_reply_frame(self, lo: int = 0) -> int | None:
        """Index in the history, from ``lo`` on, of the last frame carrying reply audio."""
        hist = self._history
        for i in range(len(hist) - 1, lo - 1, -1):
            if hist[i].reply_end:
                return i
        return None

    def fill_from(self) -> int:
        """Where ``rerender(..., "fill")`` would start mixing the waiting reply audio: the
        output position right after the last reply sample mixed (if none is, the oldest
        frame kept: long played)."""
        i = self._last_reply_frame()
        if i is not None:
            return self._history[i].pos + self._history[i].reply_end
        return self._history[0].pos if self._history else self.samples_out

    def wants_voices(self) -> bool:
        """A bed (from silence), the thinking cue or a cue was started and has no frame of
        its own yet: it could be mixed into frames already handed over (rerender_voices)."""
        return any(v.early for v in self.voices)

    def reply_queued_ms(self) -> float:
        return self.reply.queued * 1000 / SAMPLE_RATE

    def played_ms(self, reply_id: str) -> float:
        st = self.stats.get(reply_id)
        return 0.0 if st is None else st.played * 1000 / SAMPLE_RATE

    # -- ambient bed --

    def set_bed(self, name: str, samples: np.ndarray, volume: float | None = None, fade_ms: int | None = None) -> Voice:
        """Start (fade in) or replace (equal-power crossfade) the looping bed."""
        if volume is not None:
            self.bed_volume = volume
        first = not any(not b.retiring for b in self.beds)
        fade = self._ms(fade_ms if fade_ms is not None else (self.s.ambient_fade_in_ms if first else self.s.ambient_crossfade_ms))
        for old in self.beds:
            old.stop(fade)
        bed = LoopVoice(name, samples, loop=True, kind="bed", volume=self.bed_volume, ducked=True)
        bed.fade.value = 0.0
        bed.fade.to(1.0, fade, "power")
        bed.early = first  # a crossfade starts with the old bed's fade-out, in the next frame
        self.voices.append(bed)
        return bed

    def set_bed_volume(self, volume: float, ramp_ms: int | None = None) -> None:
        self.bed_volume = volume
        for bed in self.beds:
            if not bed.retiring:
                bed.gain.to(volume, self._ms(ramp_ms if ramp_ms is not None else self.s.volume_ramp_ms))

    def stop_bed(self, fade_ms: int | None = None) -> None:
        for bed in self.beds:
            bed.stop(self._ms(fade_ms if fade_ms is not None else self.s.ambient_fade_out_ms))

    @property
    def bed_name(self) -> str | None:
        current = [b for b in self.beds if not b.retiring]
        return current[-1].name if current else None

    # -- cues and streams --

    def start_thinking(self, name: str, samples: np.ndarray, volume: float | None = None) -> Voice:
        current = self.thinking
        if current is not None and not current.retiring:
            return current
        voice = LoopVoice(name, samples, loop=True, kind="thinking",
                          volume=self.s.thinking_volume if volume is None else volume, yields=True)
        voice.fade.value = 0.0
        voice.fade.to(1.0, self._ms(self.s.cue_fade_ms), "power")
        voice.early = True
        self.voices.append(voice)
        return voice

    def stop_thinking(self) -> None:
        for v in self.voices:
            if v.kind == "thinking":
                v.stop(self._ms(self.s.cue_fade_ms))

    def play_cue(self, name: str, samples: np.ndarray, volume: float, on_done: Callable[[bool], None] | None = None,
                 loop: bool = False) -> Voice:
        """A one-shot cue (or a looping one). ``on_done(completed)`` runs (on the mixing
        thread) when it finished (True) or was stopped (False)."""
        voice = LoopVoice(name, samples, loop=loop, kind="cue", volume=volume)
        voice.fade.value = 0.0
        voice.fade.to(1.0, self._ms(5))
        voice.on_done = on_done
        voice.early = True
        self.voices.append(voice)
        return voice

    def add_stream(self, name: str, volume: float) -> StreamVoice:
        voice = StreamVoice(name, volume)
        self.voices.append(voice)
        return voice

    def stop_cue(self, voice: Voice, fade_ms: float = 50) -> None:
        voice.stop(self._ms(fade_ms))

    # -- the frame --

    def next_frame(self) -> np.ndarray:
        """Exactly one frame of int16 samples."""
        return self._render().out.copy()

    def render(self, frames: int, out: np.ndarray | None = None) -> np.ndarray:
        """``frames`` frames in one int16 array (into ``out`` if given)."""
        n = self.frame
        if out is None:
            out = np.empty(frames * n, np.int16)
        for i in range(frames):
            out[i * n:(i + 1) * n] = self._render().out
        return out

    def _slot(self) -> _Frame:
        if len(self._history) >= self._history_frames:
            slot = self._history.popleft()
        else:
            slot = _Frame(self.frame)
        self._history.append(slot)
        return slot

    def _render(self) -> _Frame:
        n = self.frame
        now = self.clock()
        slot = self._slot()
        slot.pos = self.samples_out
        slot.duck_before = self.ducker.state
        slot.limiter_before = self.limiter.gain
        slot.speaking_before = self._speaking
        slot.last_reply_before = self._last_reply
        slot.events = []
        reply = slot.reply
        reply[:] = 0.0
        owners: list[tuple[str, int]] = []
        end = 0

        # Reply: the faded tail of an interrupted reply first, then the buffer.
        if self._tail is not None:
            t = self._tail[:n]
            reply[:len(t)] = t * self.reply_gain
            owner = self._tail_owner or ""
            owners.append((owner, len(t)))
            st = self._stats(owner)
            st.played += len(t)
            self._tail = self._tail[n:] if len(self._tail) > n else None
            end = len(t)
            if self._tail is None:
                st.silent_at = now
                self._record_silence(st)
                if not self.reply.has(owner):
                    slot.events.append(("ended", owner, slot.pos + end))
        if self.reply.queued and not self._held(now):
            k = self._read_reply(slot, 0, now)
            end = max(end, k)
            owners = owners + slot.owners
        slot.owners = owners
        slot.reply_end = end
        self._after_reply(slot)
        self._mix_voices(slot)
        duck = self.ducker.render(n, slot.reply_end > 0)
        self._finish(slot, duck)
        self.samples_out += n
        self.counters.frames += 1
        if slot.events:
            self.events.extend(slot.events)
            del self.events[:-1000]  # nobody drains them when the core is used alone
        if len(self.finished) > 1000:
            del self.finished[:-1000]
        return slot

    def _read_reply(self, slot: _Frame, start: int, now: float) -> int:
        """Mix reply audio into ``slot`` from sample ``start`` on; sets ``slot.owners`` to
        the replies read (and keeps the stats); returns where the reply samples end."""
        scratch = self._scratch[:self.frame - start]
        k, owners = self.reply.read_into(scratch)
        if self.reply_gain != 1.0:
            scratch[:k] *= self.reply_gain
        slot.reply[start:start + k] += scratch[:k]
        pos = slot.pos + start
        tail = self._reply_tail
        if owners and tail is not None and tail[0] == owners[0][0] and pos > tail[1]:
            # The reply resumes after running dry: its audio came too late, a hole.
            hole_ms = (pos - tail[1]) * 1000 / SAMPLE_RATE
            self.counters.reply_holes += 1
            self.counters.reply_hole_ms += hole_ms
            self.cushion_ms = min(max(self.cushion_ms, hole_ms), max(self.s.reply_cushion_max_ms, self.s.reply_cushion_ms))
        for rid, count in owners:
            st = self._stats(rid)
            if st.first_played_at is None:
                st.first_played_at = now
                if st.first_received_at is not None:
                    ms = (now - st.first_received_at) * 1000
                    self.counters.last_reply_latency_ms = ms
                    self.counters.reply_latencies_ms.append(ms)
                    del self.counters.reply_latencies_ms[:-100]
            if rid not in self._first_pos:
                self._first_pos[rid] = pos
                slot.events.append(("playing", rid, pos))
                self.cushion_ms = max(self.s.reply_cushion_ms, self.cushion_ms - 10.0)
            st.played += count
            pos += count
            if not self.reply.has(rid):
                slot.events.append(("ended", rid, pos))
            self._last_reply = rid
            self._reply_tail = (rid, pos)
        slot.owners = owners
        return start + k if k else 0

    def _after_reply(self, slot: _Frame) -> None:
        """Speaking transitions of the frame just given its reply part."""
        speech = slot.reply_end > 0
        self._last_reply_end = slot.reply_end
        if speech:
            for v in self.voices:
                if v.yields:
                    v.stop(self._ms(self.s.cue_fade_ms))
        if speech != self._speaking:
            self._speaking = speech
            if not speech:
                slot.events.append(("idle", self._last_reply, slot.pos))

    def _mix_voices(self, slot: _Frame) -> None:
        n = self.frame
        slot.has_ducked = slot.has_plain = slot.has_yielding = False
        for v in self.voices:
            v.early = False
            samples = v.read(n)
            g = v.gain.render(n)
            f = v.fade.render(n)
            gain = g * f if not (isinstance(g, float) and g == 1.0) else f
            if v.ducked:
                target, first = slot.ducked, not slot.has_ducked
                slot.has_ducked = True
            elif v.yields:
                target, first = slot.yielding, not slot.has_yielding
                slot.has_yielding = True
            else:
                target, first = slot.plain, not slot.has_plain
                slot.has_plain = True
            if first:
                np.multiply(samples, gain, out=target)
            else:
                target += samples * gain
        if any(v.done for v in self.voices):
            still = []
            for v in self.voices:
                if not v.done:
                    still.append(v)
                    continue
                self.finished.append((v, v.completed, slot.pos + n))
                if v.on_done is not None:
                    try:
                        v.on_done(v.completed)
                    except Exception:
                        log.exception("voice completion callback failed")
            self.voices = still

    def _finish(self, slot: _Frame, duck: np.ndarray | float) -> None:
        """Sum the parts, limit, and write the frame's int16 output."""
        mix = self._mix
        if slot.has_ducked:
            np.multiply(slot.ducked, duck, out=mix)
        else:
            mix[:] = 0.0
        if slot.has_plain:
            mix += slot.plain
        if slot.has_yielding:
            mix += slot.yielding
        if slot.reply_end:
            mix += slot.reply
        out = self.limiter.process(mix)
        self.counters.limiter_samples = self.limiter.active_samples
        np.multiply(out, INT16_SCALE, out=mix)
        np.rint(mix, out=mix)
        np.clip(mix, -32768, 32767, out=mix)
        slot.out[:] = mix

    # -- mixing again what was handed over but not yet played --

    def rerender_voices(self, frames: int) -> tuple[np.ndarray, int]:
        """The last ``frames`` frames were handed to the output but not yet played. Mix the
        voices started since (``wants_voices``) into them, from the first, as if they had
        started in time: a cue, the thinking cue, a bed is heard at once instead of behind
        the queue. The thinking cue is not, where those frames carry the reply (it would
        stop at once). Returns the frames' samples and the position from which they changed."""
        n = self.frame
        frames = min(frames, len(self._history))
        hist = self._history
        i0 = len(hist) - frames
        early = [v for v in self.voices if v.early]
        for v in early:
            v.early = False
        if frames <= 0 or not early:
            return np.zeros(0, np.int16), self.samples_out
        if any(hist[i].reply_end for i in range(i0, len(hist))):
            early = [v for v in early if not v.yields]
            if not early:
                return np.zeros(0, np.int16), self.samples_out
        first = hist[i0]
        self.ducker.state = first.duck_before
        self.limiter.gain = first.limiter_before
        for i in range(i0, len(hist)):
            slot = hist[i]
            for v in early:
                if v.done:
                    continue
                samples = v.read(n)
                gain = v.gain.render(n) * v.fade.render(n)
                if v.ducked:
                    target, has = slot.ducked, slot.has_ducked
                    slot.has_ducked = True
                elif v.yields:
                    target, has = slot.yielding, slot.has_yielding
                    slot.has_yielding = True
                else:
                    target, has = slot.plain, slot.has_plain
                    slot.has_plain = True
                if has:
                    target += samples * gain
                else:
                    np.multiply(samples, gain, out=target)
                if v.done:  # a short cue ended in these frames
                    self.voices.remove(v)
                    self.finished.append((v, v.completed, slot.pos + n))
                    if v.on_done is not None:
                        try:
                            v.on_done(v.completed)
                        except Exception:
                            log.exception("voice completion callback failed")
            duck = self.ducker.render(n, slot.reply_end > 0)
            self._finish(slot, duck)
        return np.concatenate([hist[i].out for i in range(i0, len(hist))]), first.pos

    def rerender(self, frames: int, mode: str) -> tuple[np.ndarray, int]:
        """The last ``frames`` frames were handed to the output but not yet played (they
        sit in its queue, about to be flushed). Mix them again:

        * ``"drop"`` (barge-in, after ``interrupt``): without the reply (a few-ms fade at
          the start, silence after); their reply samples no longer count as played.
        * ``"fill"`` (``wants_fill()``): with the waiting reply audio mixed in from the
          first sample after the reply's last one in the stream (or from the first of
          these frames), so it does not wait behind them. The thinking cue fades out from
          there, as if the reply had started in time.

        Everything else is what it was (the bed continues sample for sample); the ducker
        and the limiter run again from the state they had there. Returns the frames'
        samples (int16, ``frames`` x frame) and the output position from which they
        changed; reply events from that position on are replaced (``events``)."""
        data, changed, _ = self.rerender_split(frames, mode, None)  # unsplit: no rest
        return data, changed

    def rerender_split(self, frames: int, mode: str, split: int | None
                       ) -> tuple[np.ndarray, int, Callable[[], np.ndarray] | None]:
        """``rerender``, in two parts: the first ``split`` of the frames now, the others
        when ``rest()`` is called (None: nothing left), so that the first part can be
        handed over before the rest is mixed. Nothing else may mix in between."""
        steps = self._rerender_steps(frames, mode, split)
        data, changed, more = next(steps)
        if not more:
            return data, changed, None

        def rest() -> np.ndarray:
            return next(steps)[0]
        return data, changed, rest

    def _rerender_steps(self, frames: int, mode: str, split: int | None
                        ) -> Iterator[tuple[np.ndarray, int, bool]]:
        """rerender_split's work: yields (the first part's samples, changed, more to come),
        then, if more, (the rest's samples, changed, False)."""
        n = self.frame
        frames = min(frames, len(self._history))
        hist = self._history
        i0 = len(hist) - frames
        empty = np.zeros(0, np.int16)
        if frames <= 0:
            yield empty, self.samples_out, False
            return
        now = self.clock()
        if mode == "drop":
            j, o = i0, 0
            self._tail = None  # the fade goes into the first re-mixed frame
            self._reply_tail = None
        elif mode == "fill":
            if not self.wants_fill():
                yield empty, self.samples_out, False
                return
            j, o = i0, 0
            last = self._last_reply_frame(i0)
            if last is not None:
                j, o = (last + 1, 0) if hist[last].reply_end >= n else (last, hist[last].reply_end)
            if j >= len(hist):
                yield empty, self.samples_out, False
                return
        else:
            raise ValueError(f"unknown rerender mode {mode!r}")
        changed = hist[j].pos + o
        for rid, pos in list(self._first_pos.items()):
            if pos >= changed:  # its start is mixed again
                del self._first_pos[rid]
        first = hist[j]
        self.ducker.state = first.duck_before
        self.limiter.gain = first.limiter_before
        self._speaking = first.speaking_before
        self._last_reply = first.last_reply_before
        fade_n = max(1, self._ms(self.s.barge_in_fade_ms))
        cut = self._fade_out(fade_n)
        yield_fade: Ramp | None = None
        interrupted: set[str] = set()
        # Once the reply runs dry in these frames, the later ones take none of it: audio that
        # arrives between the two parts of a split re-mix belongs right after the reply's
        # last sample (a fill from there), not at the start of the rest.
        dry = False

        def mix(i: int) -> None:
            nonlocal yield_fade, dry
            slot = hist[i]
            slot.events = [e for e in slot.events if e[2] < changed]
            if mode == "drop":
                kept = min(fade_n, slot.reply_end) if i == j else 0
                for rid, count in slot.owners:
                    st = self.stats.get(rid)
                    if st is not None:
                        st.played -= count
                    interrupted.add(rid)
                first_owner = slot.owners[0][0] if slot.owners else None
                if kept:
                    slot.reply[:kept] *= cut[:kept]
                slot.reply[kept:] = 0.0
                slot.owners = [(first_owner, kept)] if kept and first_owner is not None else []
                if kept and first_owner is not None:
                    self._stats(first_owner).played += kept
                    self._last_reply = first_owner
                    if first_owner not in self._first_pos:
                        self._first_pos[first_owner] = slot.pos
                        slot.events.append(("playing", first_owner, slot.pos))
                slot.reply_end = kept
                if i == j:
                    for rid in sorted(interrupted):
                        if not self.reply.has(rid):
                            slot.events.append(("ended", rid, slot.pos + kept))
            else:
                start = o if i == j else 0
                fade_from = 0
                if not self.reply.queued:
                    dry = True
                elif not dry:
                    owners_before = slot.owners
                    k = self._read_reply(slot, start, now)
                    slot.owners = owners_before + slot.owners
                    dry = k < n
                    if k:
                        slot.reply_end = k
                        if yield_fade is None:  # the thinking cue fades out from the reply's start
                            yield_fade = Ramp(1.0)
                            yield_fade.to(0.0, self._ms(self.s.cue_fade_ms), "power")
                            fade_from = start
                if yield_fade is not None:
                    g = yield_fade.render(n - fade_from)
                    if slot.has_yielding:
                        slot.yielding[fade_from:] *= g
            speech = slot.reply_end > 0
            self._last_reply_end = slot.reply_end
            if speech != self._speaking:
                self._speaking = speech
                if not speech:
                    slot.events.append(("idle", self._last_reply, slot.pos))
            duck = self.ducker.render(n, speech)
            self._finish(slot, duck)
            self.events.extend(e for e in slot.events if e[2] >= changed)

        cut_at = len(hist) if split is None else min(len(hist), i0 + max(1, split))
        for i in range(j, cut_at):
            mix(i)
        if mode == "drop":
            for st in self.stats.values():  # the interrupted reply is silent from these frames on
                if st.interrupted_at is not None and (st.silent_at is None or st.silent_at > now):
                    st.silent_at = now
                    self._record_silence(st)
        if cut_at < len(hist):
            yield np.concatenate([hist[i].out for i in range(i0, cut_at)]), changed, True
            for i in range(max(j, cut_at), len(hist)):
                mix(i)
        if yield_fade is not None:  # and the live thinking cue goes on fading from there
            for v in self.voices:
                if v.yields and not v.retiring:
                    v.retiring = True
                    if v.fade.moving or v.fade.value != 1.0:  # still fading in: both at once
                        fade = Ramp(v.fade.value * yield_fade.value)
                        fade.to(0.0, yield_fade._len - yield_fade._pos, "power")
                        v.fade = fade
                    else:
                        v.fade = yield_fade
        lo = cut_at if cut_at < len(hist) else i0  # the rest, or all of them
        yield np.concatenate([hist[i].out for i in range(lo, len(hist))]), changed, False


# --- the writer ---------------------------------------------------------------------------


class _DirectSource:
    """The two calls the writer makes to one ``rtc.AudioSource`` (``capture_frame`` and
    ``clear_queue``), made straight into the SDK's native library through a ctypes
    prototype that keeps the GIL during the call.

    Through the SDK's Python API each call releases the GIL (ctypes) and must take it back
    after, and prepares its request in Python first: a thread that takes the GIL meanwhile
    (the event loop, for up to Python's 5 ms switch interval when it is busy) delays the
    request by that much. At a re-render, that leaves the source's queue empty at a tick,
    and this SDK then sends 10 ms of silence; at a regular hand-over, the writer takes the
    delayed request for an early completion and misplaces the source's clock by a block.
    Here the time is taken just before the native call, and a re-render's clear and capture
    are made back to back. Both native calls are short and run no Python code (the capture's
    completion comes later, on the SDK's own thread). This uses the SDK's internals (livekit
    1.2: ``FfiClient``, its request protobuf): where they are missing, ``create`` returns
    None and the writer uses the public calls."""

    def __init__(self, source: Any) -> None:
        from livekit.rtc._ffi_client import FfiClient, FfiHandle
        from livekit.rtc._proto import ffi_pb2

        self._client = FfiClient.instance
        self._handle_cls = FfiHandle
        self._pb = ffi_pb2
        self._source_handle = source._ffi_handle.handle
        fn = self._client._ffi_lib.livekit_ffi_request
        u8p = ctypes.POINTER(ctypes.c_ubyte)
        # The same function, through a prototype that keeps the GIL during the call.
        self._request = ctypes.PYFUNCTYPE(ctypes.c_uint64, u8p, ctypes.c_size_t, ctypes.POINTER(u8p),
                                          ctypes.POINTER(ctypes.c_size_t))(ctypes.cast(fn, ctypes.c_void_p).value)
        clear = ffi_pb2.FfiRequest()
        clear.clear_audio_buffer.source_handle = self._source_handle
        self._clear = clear.SerializeToString()
        self._capture = ffi_pb2.FfiRequest()
        self._capture.capture_audio_frame.source_handle = self._source_handle

    @classmethod
    def create(cls, source: Any) -> "_DirectSource | None":
        try:
            return cls(source)
        except Exception as e:  # another SDK version: the public calls will do
            log.debug("the audio source through the SDK's public calls (%s)", e)
            return None

    async def capture(self, frame: Any, clear: bool = False, deadline: float | None = None) -> float | None:
        """Queue ``frame`` (after emptying the source's queue, with ``clear``); returns once
        the SDK says it is queued, with the time just before the native call(s). None, and
        nothing done, if that time would have been past ``deadline``."""
        buffer = self._capture.capture_audio_frame.buffer
        buffer.data_ptr = frame._proto_info().data_ptr
        buffer.sample_rate, buffer.num_channels = frame.sample_rate, frame.num_channels
        buffer.samples_per_channel = frame.samples_per_channel
        capture = self._capture.SerializeToString()
        u8p = ctypes.POINTER(ctypes.c_ubyte)
        k_ptr, k_rp, k_rl = ctypes.cast(ctypes.c_char_p(capture), u8p), u8p(), ctypes.c_size_t()
        if clear:  # prepared before the time is taken: the two calls then come back to back
            c_ptr, c_rp, c_rl = ctypes.cast(ctypes.c_char_p(self._clear), u8p), u8p(), ctypes.c_size_t()
        async_id: int | None = None
        queue = self._client.queue.subscribe(
            loop=asyncio.get_running_loop(),
            filter_fn=lambda e: e.WhichOneof("message") == "capture_audio_frame"
            and (async_id is None or e.capture_audio_frame.async_id == async_id))
        try:
            at = time.monotonic()
            if deadline is not None and at > deadline:
                return None
            h_clear = self._request(c_ptr, len(self._clear), ctypes.byref(c_rp), ctypes.byref(c_rl)) if clear else None
            h_capture = self._request(k_ptr, len(capture), ctypes.byref(k_rp), ctypes.byref(k_rl))
            resp = self._pb.FfiResponse()
            resp.ParseFromString(ctypes.string_at(k_rp, k_rl.value))
            for h in (h_clear, h_capture):
                if h:
                    self._handle_cls(h).dispose()
            if h_clear == 0 or not h_capture or not resp.HasField("capture_audio_frame"):
                raise RuntimeError("the SDK refused a request to the audio source")
            async_id = resp.capture_audio_frame.async_id
            done = await queue.wait_for(lambda e: e.capture_audio_frame.async_id == async_id)
        finally:
            self._client.queue.unsubscribe(queue)
        if done.capture_audio_frame.error:
            raise RuntimeError(done.capture_audio_frame.error)
        return at


class Mixer:
    """Thread-safe facade over ``MixerCore`` plus the single writer (an audio thread
    with its own event loop) feeding one ``rtc.AudioSource``."""

    def __init__(self, settings: MixerSettings | None = None, *, queue_ms: int = DEFAULT_QUEUE_MS,
                 batch_ms: int = DEFAULT_BATCH_MS, clear_queue_on_barge_in: bool = False,
                 flush_on_barge_in: bool = True, start_reply_at_once: bool | None = None,
                 priority: str = "realtime", on_air: bool = True, direct_calls: bool = True) -> None:
        settings = settings or MixerSettings()
        frame_ms = settings.frame_ms
        self.batch_frames = max(1, -(-int(batch_ms) // frame_ms))
        self.batch_ms = self.batch_frames * frame_ms
        # While reply audio is waiting, a hand-over mixes no further than it goes, but at
        # least this much (MIN_BATCH_MS).
        self.min_batch_frames = min(self.batch_frames, max(1, MIN_BATCH_MS // frame_ms))
        # The least audio queued ahead of the listener (what rides out a stall of the
        # writer); up to batch_ms more right after a hand-over.
        self.queue_ms = queue_ms
        # The source's own queue: a regular hand-over overfills it by one 10 ms block, so
        # that capture completes at the source's next tick (see _check_clock).
        self.source_queue_ms = max(10, queue_ms + self.batch_ms - 10)
        # The most audio ever queued ahead of the listener (right after a full batch), ms:
        # how long a change to the bed (its volume, its stop) can take to be heard.
        self.max_queue_ms = self.source_queue_ms + 10
        history = (self.source_queue_ms + 10 + frame_ms) // frame_ms + 4
        self.core = MixerCore(settings, history_frames=history)
        # Underruns are counted (and warned about) only while the track is on air. A caller
        # that starts the writer before it publishes (the worker: LiveKit's threads must
        # start on the audio thread) passes False and sets it once the track is published,
        # so a busy start-up, or a config error right after it, says nothing about starving.
        self.on_air = on_air
        self.priority_mode = priority
        # Capture (and replace the source's queue with clear_queue() and a capture in one
        # go) straight into the SDK's native library, keeping the GIL (_DirectSource);
        # False: through the SDK's public calls.
        self.direct_calls = direct_calls
        self._direct: _DirectSource | None = None
        # Barge-in without waiting for the queue: flush the output's queue and hand it the
        # same frames again without the reply, so the reply stops within a frame and the
        # bed goes on sample for sample.
        self.flush_on_barge_in = flush_on_barge_in
        # The naive design (benchmark baseline only): also flush the source's queue on
        # barge-in, which throws away the bed audio queued with it; and replies wait
        # behind the queue.
        self.clear_queue_on_barge_in = clear_queue_on_barge_in
        self.start_reply_at_once = (not clear_queue_on_barge_in) if start_reply_at_once is None \
            else start_reply_at_once
        self._flush_requested = False
        self._fill_requested = False
        self._fill_due: float | None = None  # a deferred fill: when (see FILL_LEAD_S)
        self._fill_forced = False  # the deferred fill is due: do it, do not defer again
        self.flushes = 0
        self.fills = 0
        self.hand_overs = 0  # regular hand-overs (a batch each)
        self.voice_fills = 0
        self.cleared_ms: list[float] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._source_ready = threading.Event()
        self._error: BaseException | None = None
        self.source = None  # rtc.AudioSource, created on the audio thread
        self.heartbeat = time.monotonic()  # last hand-over to the source (watchdog)
        self.priority = "normal"  # scheduling the audio thread got
        # The source's clock, as the writer knows it: _handed_until is the first tick of the
        # source that would find its queue empty (what was handed over runs out then), and
        # _end_pos the output position after the last sample handed over. _phase: where the
        # source's ticks fall (seconds modulo 10 ms), None until the first capture told us.
        self._handed_until = 0.0
        self._end_pos = 0
        self._phase: float | None = None
        # Where the ticks must fall: the source's clock is a native task that runs as its
        # constructor returns and then every 10 ms of the monotonic clock, without drift
        # (WebRTC's RepeatingTask). Measured: the phase learned from completions settles
        # 0.05-0.3 ms after that moment. Completions reach this thread late when other
        # threads hold the GIL, and learning from them alone drifts then by a few ms (a
        # re-render then replaces the queue a block off: the bed skips or repeats 10 ms); so
        # once the phase learned from the first completions agrees with this one, what is
        # learned later stays within PHASE_TOLERANCE_S of it. None: unknown, or no agreement.
        self._phase_prior: float | None = None
        self._prior_confirmed = False
        self._cleared = False  # clear_queue() ran while a capture was pending
        self.writer_cpu_s = 0.0  # CPU seconds used so far by the writer thread (for the bench)
        self.misses = 0  # flushes during which the output took blocks being mixed again
        self.races = 0  # re-mixes a tick of the output split before the queue was cleared (fixed up)
        self.gaps = 0  # re-mixes whose hand-over may have come after a tick (a 10 ms gap, likely)
        self.clock_fixes = 0  # hand-overs that showed the writer's idea of the queue off by a block
        self._offsets: collections.deque[float] = collections.deque(maxlen=16)  # see _check_clock
        self._lateness: collections.deque[float] = collections.deque(maxlen=8)
        self._dispatchers: dict[asyncio.AbstractEventLoop, _Dispatcher] = {}
        self._ended_at: dict[str, float] = {}  # when each reply's last sample handed over is heard
        self._quiet_at = 0.0  # when the reply audio handed over so far has been heard
        self._wake_fut: asyncio.Future[None] | None = None
        self._frames: dict[int, tuple[Any, np.ndarray]] = {}  # (rtc.AudioFrame, its samples) per length

    # -- lifecycle --

    def start(self) -> "object":
        """Start the audio thread; returns the ``rtc.AudioSource`` to publish."""
        self._thread = threading.Thread(target=self._thread_main, name="mixer-writer", daemon=True)
        self._thread.start()
        if not self._source_ready.wait(10):
            raise RuntimeError("audio thread did not start")
        if self._error is not None:
            raise self._error
        return self.source

    def _thread_main(self) -> None:
        from livekit import rtc

        scheduling.name_thread("mixer-writer")
        self.priority = scheduling.raise_audio_thread(self.priority_mode)
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            # LiveKit starts its media threads on its first call: make it here, so they
            # inherit this thread's scheduling whatever ran before (Mixer.start is called
            # before anything else touches LiveKit).
            self.source = rtc.AudioSource(SAMPLE_RATE, 1, queue_size_ms=self.source_queue_ms, loop=loop)
            self._phase_prior = (time.monotonic() + CLOCK_START_S) % TICK_S
            self._direct = _DirectSource.create(self.source) if self.direct_calls else None
        except BaseException as e:  # reported to start()
            self._error = e
            self._source_ready.set()
            return
        scheduling.audio_thread_above_media(self.priority)
        self._source_ready.set()
        try:
            loop.run_until_complete(self._write_loop(rtc))
        except BaseException as e:
            self._error = e
            log.exception("audio writer stopped")
        finally:
            try:
                loop.run_until_complete(self.source.aclose())
            except Exception:
                pass
            loop.close()

    def _frame_of(self, rtc: Any, samples: int) -> tuple[Any, np.ndarray]:
        """An ``rtc.AudioFrame`` of ``samples`` and the int16 view to fill it through, reused
        from one hand-over to the next (the SDK copies it during capture_frame's request);
        one per length (a batch, and the few lengths a flush hands over)."""
        cached = self._frames.get(samples)
        if cached is None:
            raw = bytearray(samples * 2)
            cached = self._frames[samples] = (rtc.AudioFrame(raw, SAMPLE_RATE, 1, samples),
                                              np.frombuffer(raw, dtype=np.int16))
        return cached

    # -- the source's clock --

    def _next_tick(self, t: float) -> float:
        """The first tick of the source at or after ``t`` (t itself before the first sync)."""
        if self._phase is None:
            return t
        k = math.ceil((t - self._phase - 0.0003) / TICK_S)  # a tick may run a little late
        return self._phase + k * TICK_S

    def _queued_s(self, t: float) -> float:
        """Audio handed over and not yet played at ``t``."""
        return max(0.0, self._handed_until - self._next_tick(t))

    def _time_of(self, pos: int) -> float:
        """When the 10 ms block holding output position ``pos`` is played (``pos`` at the
        end of what was handed over: when that has been played)."""
        blocks = -(-(self._end_pos - pos) // BLOCK)
        return self._handed_until - blocks * TICK_S

    def _check_clock(self, t_call: float, t_done: float, expected: float) -> None:
        """A regular hand-over overfills the source's queue by a block, so its capture
        completes at the tick that brings the queue back to source_queue_ms: ``expected``,
        if the writer's idea of the queue is right (if that is already past, at once).
        Compare, and learn where the ticks fall and how much is queued. A completion is
        reported a little after its tick (a callback), sometimes much later (the callback
        waited for the GIL: any amount), never before it."""
        if self._cleared:  # clear_queue() ran meanwhile: it says nothing
            return
        high = (self.source_queue_ms + 10) / 1000
        waited = t_done - t_call >= 0.001  # an immediate completion takes ~0.3 ms
        if self._phase is None:
            if waited:  # it waited for a tick: that tick was just now (a first guess)
                self._phase = t_done % TICK_S
                self._handed_until = t_done + high
            return
        overfilled = expected - t_call >= 0.001  # meant to wait for a tick
        late = t_done - max(expected, t_call)
        if late < -0.0015:
            # Done before its tick: less was queued than thought. If it waited for an
            # earlier tick the queue is known again; if it did not wait at all, at most
            # this much is queued (the next hand-over tells more).
            self.clock_fixes += 1
            self._lateness.clear()
            if waited:
                tick = t_done - ((t_done - self._phase) % TICK_S)
                self._handed_until = min(self._handed_until, tick + high)
            else:
                self._handed_until = min(self._handed_until, self._next_tick(t_call) + high - TICK_S)
            return
        if overfilled and late <= 0.002:
            # On time: where the ticks fall, to a fraction of a ms. The earliest of the
            # recent completions (the second earliest: one could be a stray) is the best.
            self._offsets.append(late)
            shift = sorted(self._offsets)[1] if len(self._offsets) > 1 else late
            if abs(shift) > 5e-5:
                self._shift_clock(shift)
            if self._phase_prior is not None and not self._prior_confirmed and len(self._offsets) >= 6:
                # Learned from enough completions: the clock's start, if they agree on it.
                off = _wrap(self._phase - self._phase_prior)
                if abs(off) <= PHASE_TOLERANCE_S:
                    self._prior_confirmed = True
                else:
                    log.debug("the source's ticks are %.2f ms from where its start put them", off * 1000)
                    self._phase_prior = None
        if not waited and not overfilled:
            return
        # Consistently late by the same amount (three in a row, within a ms): the ticks fall
        # later than thought (a first guess off), or a whole tick late: a block more is
        # queued than thought (a flush that a tick split). A wait for the GIL is late by
        # any amount, never the same three times.
        self._lateness.append(late)
        last = list(self._lateness)[-3:]
        if len(last) == 3 and min(last) > 0.002 and max(last) - min(last) < 0.001:
            low = min(last)
            blocks = int((low + 0.0015) // TICK_S)
            self.clock_fixes += 1
            self._handed_until += blocks * TICK_S
            if low - blocks * TICK_S > 0.0015:
                self._shift_clock(low - blocks * TICK_S)
            self._lateness.clear()

    def _shift_clock(self, shift: float) -> None:
        """The ticks fall ``shift`` later than thought (earlier if negative): the same ticks,
        better placed, and what was learned relative to the old guess moves with them (no
        further than PHASE_TOLERANCE_S from where the clock's start puts them, once known)."""
        if self._phase_prior is not None and self._prior_confirmed:
            off = _wrap(self._phase + shift - self._phase_prior)
            off = min(PHASE_TOLERANCE_S, max(-PHASE_TOLERANCE_S, off))
            shift = _wrap(self._phase_prior + off - self._phase)
            if shift == 0.0:
                return
        self._phase = (self._phase + shift) % TICK_S
        self._handed_until += shift
        for q in (self._offsets, self._lateness):
            for i in range(len(q)):
                q[i] -= shift

    # -- the writer --

    async def _write_loop(self, rtc: Any) -> None:
        n = self.core.frame
        batch_s = self.batch_frames * n / SAMPLE_RATE
        high = (self.source_queue_ms + 10) / 1000  # queued right after a regular hand-over
        # Prime: fill the queue in one hand-over that overfills it by a block, so the
        # capture returns at a tick and the source's clock is known from the start.
        await self._hand_over(rtc, round(high * SAMPLE_RATE) // n)
        while not self._stop.is_set():
            while self._flush_requested or self._fill_requested:
                # (again if one came meanwhile: its wake-up found this thread busy)
                await self._urgent(rtc)
            # Until the source's clock is known (a few completions), one frame at a time:
            # each waits for a tick, which tells where the ticks fall.
            frames = self.batch_frames if len(self._offsets) >= 6 else 1
            batch_s = frames * n / SAMPLE_RATE
            now = time.monotonic()
            queued = self._queued_s(now)
            behind = queued + batch_s < high - 0.005  # no tick to wait for: hand over now
            if behind or (queued + batch_s <= high + 1e-4 and self._next_tick(now) - now <= 0.0035):
                if self._fill_due is not None:
                    # The deferred fill first: the new frames must follow the reply audio
                    # waiting for it, not take it.
                    self._fill_forced = self._fill_requested = True
                    continue
                if frames > self.min_batch_frames:
                    with self._lock:
                        reply = self.core.reply.queued if not self.core.hold_until() else 0
                        short = any(v.kind != "bed" for v in self.core.voices)
                    if short:
                        # A cue, the thinking cue or a stream plays: its stop (or a stream's
                        # next audio) must not wait behind a long queue.
                        frames = self.min_batch_frames
                    elif reply:
                        # No further than the reply audio received (whole frames of it: the
                        # rest is mixed on by the next hand-over, not mixed again): frames
                        # mixed beyond it would have to be mixed again when more arrives
                        # (a fill). The next hand-over comes sooner instead, as cheap as a
                        # fill. With less than MIN_BATCH_MS waiting, the usual batch.
                        whole = reply // n
                        frames = min(frames, whole) if whole >= self.min_batch_frames else frames
                await self._hand_over(rtc, frames)
                continue
            # Sleep until just before the tick after which one more batch fits: that
            # capture then completes at the tick (_check_clock), a few ms later.
            wake = self._handed_until - (high - batch_s) - 0.003
            hold = None
            if self.start_reply_at_once:
                with self._lock:
                    hold = self.core.hold_until()
            if hold is not None:
                wake = min(wake, hold)
            if self._fill_due is not None:
                wake = min(wake, self._fill_due)
            await self._sleep_until(wake)
            if hold is not None and time.monotonic() >= hold - 0.0005:
                self._fill_requested = True  # the cushion's wait is over
            if self._fill_due is not None and time.monotonic() >= self._fill_due - 0.0005:
                self._fill_forced = self._fill_requested = True

    async def _sleep_until(self, t: float) -> None:
        loop = asyncio.get_running_loop()
        if t <= loop.time():
            return
        fut = loop.create_future()
        self._wake_fut = fut
        handle = loop.call_at(t, self._wake_now)
        try:
            await fut
        finally:
            handle.cancel()
            self._wake_fut = None

    def _wake_now(self) -> None:
        fut = self._wake_fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _wake(self) -> None:
        """From any thread: the writer looks at its requests now."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._wake_now)
            except RuntimeError:  # closing
                pass

    async def _hand_over(self, rtc: Any, frames: int) -> None:
        """Mix ``frames`` frames and hand them to the source in one capture."""
        n = self.core.frame
        frame, buf = self._frame_of(rtc, frames * n)
        with self._lock:
            self.core.render(frames, buf)
            items = self._drain_locked()
            now = time.monotonic()
            counters = self.core.counters
            tick = self._next_tick(now)
            if self.on_air and self._handed_until and now > self._handed_until + 0.002:
                counters.underruns += 1
                gap_ms = (tick - self._handed_until) * 1000 if self._phase is not None \
                    else (now - self._handed_until) * 1000
                counters.underrun_ms += gap_ms
                if counters.underruns <= 5 or counters.underruns % 100 == 0:
                    log.warning("audio underrun: the published track was starved for %.0f ms (queue %d ms; "
                                "%d underruns so far)", gap_ms, self.queue_ms, counters.underruns)
            self._handed_until = max(self._handed_until, tick) + frames * n / SAMPLE_RATE
            expected = self._handed_until - (self.source_queue_ms + 10) / 1000  # see _check_clock
            self._end_pos = self.core.samples_out
            counters.queue_ms = max(0.0, (self._handed_until - now) * 1000)
            posts = self._timed_locked(items)
        self._cleared = False
        self.hand_overs += 1
        t_call = await self._capture(frame)
        t_done = time.monotonic()
        self._check_clock(t_call, t_done, expected)
        self._deliver(posts, None)
        self.heartbeat = time.monotonic()
        self.writer_cpu_s = time.thread_time()
        if self._handed_until - self.heartbeat > (self.source_queue_ms + 10) / 1000 + 0.2:
            # The source stopped pacing us (closed?): never spin, least of all at
            # real-time priority.
            await asyncio.sleep(0.1)

    async def _capture(self, frame: Any) -> float:
        """Queue ``frame`` after what the source holds; returns the time just before the call."""
        if self._direct is not None:
            return await self._direct.capture(frame)  # type: ignore[return-value]  # without a deadline, never None
        t_call = time.monotonic()
        await self.source.capture_frame(frame)
        return t_call

    async def _urgent(self, rtc: Any) -> None:
        flush, self._flush_requested = self._flush_requested, False
        forced, self._fill_forced = self._fill_forced, False
        self._fill_requested = False
        if flush:
            await self._rerender(rtc, "drop")
        if self.start_reply_at_once:
            self._fill_due = None
            with self._lock:
                fill = self.core.wants_fill()
                at = self.core.fill_from() if fill else 0
            if fill and not forced and self._phase is not None:
                # The reply's audio already queued plays until about then: the new audio
                # can wait, to be mixed in with whatever else arrives meanwhile.
                due = self._time_of(at) - FILL_LEAD_S
                if due - time.monotonic() > FILL_DEFER_S:
                    self._fill_due = due
                    fill = False
            if fill:
                await self._rerender(rtc, "fill")
            with self._lock:
                voices = self.core.wants_voices()
            if voices:
                await self._rerender(rtc, "voices")

    async def _rerender(self, rtc: Any, mode: str) -> None:
        """Replace what the source still has queued by the same frames mixed again (see
        MixerCore.rerender). Done between two ticks of the source, so that the whole queue
        is ours to replace before it takes the next block."""
        n = self.core.frame
        tick = await self._after_tick()
        blocks = round((self._handed_until - tick) / TICK_S)
        if blocks <= 0:
            return  # nothing queued: the next frames mixed carry the change
        frames = -(-blocks * BLOCK // n)
        rest: Callable[[], np.ndarray] | None = None
        with self._lock:
            if mode == "drop":
                recent = list(self.core._history)[-frames:]
                if not any(f.reply_end for f in recent):
                    return  # the reply had not reached the queue: dropping the buffer was enough
            total = min(frames, len(self.core._history)) * n
            if mode == "voices":
                data, changed = self.core.rerender_voices(frames)
            else:
                # A long queue in two parts: the first MIN_BATCH_MS (plenty to mix the rest
                # in before it has played) replaces the queue at once; the rest is mixed
                # and queued after it. The barge-in (or the reply's start) then waits for
                # the mixing of 100 ms, not of all that is queued.
                data, changed, rest = self.core.rerender_split(frames, mode, self.min_batch_frames)
            if not len(data):
                return
            posts = self._timed_locked(self._drain_locked())
        # Replace the queue now, unless the source's next tick is about to take its first
        # block (then just after that tick). If this thread lost the GIL while mixing, or
        # waited for that tick, the source took blocks meanwhile: those have played, so they
        # are not handed over again (the bed would repeat).
        checked = await self._clear_of_tick()
        while True:
            late = round((self._next_tick(checked) - tick) / TICK_S)
            keep = (blocks - late) * BLOCK
            if keep <= 0 or (rest is not None and total - keep >= len(data)):
                if rest is not None:  # the first part has played meanwhile (or nothing is left)
                    with self._lock:
                        data = np.concatenate([data, rest()])
                        posts += self._timed_locked(self._drain_locked())
                    rest = None
                    checked = await self._clear_of_tick()
                    continue
                self.misses += 1
                self._deliver(posts, None if mode == "voices" else changed)
                return
            head = len(data) if rest is not None else total
            frame, buf = self._frame_of(rtc, head - (total - keep))
            buf[:] = data[total - keep:head]
            # One hand-off: the queue is whole again after a single call.
            if self._direct is None:
                # Through the public calls both release the GIL: a thread that takes it in
                # between and holds it past the source's next tick makes that tick send
                # nothing (counted, a likely gap: gaps).
                self.source.clear_queue()
                cleared = time.monotonic()
                await self.source.capture_frame(frame)
                break
            # In one go, and only if the tick the first block is for is still far enough
            # (this thread may have lost the GIL since the check); else check again.
            deadline = None if self._phase is None else self._next_tick(checked) - REPLACE_LEAD_S
            at = await self._direct.capture(frame, clear=True, deadline=deadline)
            if at is not None:
                cleared = at
                break
            checked = await self._clear_of_tick()
        if late:
            self.misses += 1
        if self._phase is not None and self._next_tick(time.monotonic() - 0.0004) > self._next_tick(cleared):
            self.gaps += 1
        self._lateness.clear()  # the queue is now what the writer handed over: older evidence is void
        if self._phase is not None and self._next_tick(cleared + 0.0002) - self._next_tick(checked) > TICK_S / 2:
            # A tick fell between the check and the hand-off: it played a block we handed
            # over again, or silence. Either way the queue now runs out a block later.
            self.races += 1
            self._handed_until += TICK_S
        if rest is not None:
            with self._lock:
                more = rest()
                posts += self._timed_locked(self._drain_locked())
            frame, buf = self._frame_of(rtc, len(more))
            buf[:] = more
            await self._capture(frame)
        self._deliver(posts, None if mode == "voices" else changed)
        if mode == "drop":
            self.flushes += 1
        elif mode == "fill":
            self.fills += 1
        else:
            self.voice_fills += 1
        self.heartbeat = time.monotonic()

    async def _after_tick(self) -> float:
        """Wait, if the source's last tick may not have run yet, until it surely has. Returns
        the time of its next tick, which takes the first block handed over from then on."""
        now = time.monotonic()
        if self._phase is None:
            return self._next_tick(now)
        prev = self._phase + TICK_S * math.floor((now - self._phase) / TICK_S)
        if now - prev < TICK_LATE_S:
            await asyncio.sleep(prev + TICK_LATE_S - now)
        return prev + TICK_S

    async def _clear_of_tick(self) -> float:
        """The moment to replace the source's queue: now, if its next tick is at least
        HANDOFF_S away (clear_queue and the capture reach it before), else just after that
        tick. Checked after mixing, so that the mixing's own time does not widen the window
        in which a barge-in lets one more block of the reply out."""
        now = time.monotonic()
        if self._phase is None:
            return now
        nxt = self._next_tick(now)
        if nxt - now >= (HANDOFF_S if self._direct is not None else HANDOFF_PUBLIC_S):
            return now
        await asyncio.sleep(nxt + TICK_LATE_S - now)
        return time.monotonic()

    def _drain_locked(self) -> list[tuple[str, str | None, int]]:
        items, self.core.events = self.core.events, []
        for voice, completed, pos in self.core.finished:
            items.append(("voice", voice, pos, completed))  # type: ignore[arg-type]
        self.core.finished = []
        for item in items:
            if item[0] == "ended" and item[1] is not None:
                self._ended_at[item[1]] = math.inf  # timed once handed over
        return items

    def _timed_locked(self, items: list[Any]) -> list[tuple[Any, ...]]:
        """Events with the time they are heard (the hand-over's bookkeeping is done)."""
        posts = []
        for item in items:
            at = self._time_of(item[2])
            if item[0] == "ended":
                self._ended_at[item[1]] = at
                while len(self._ended_at) > 64:
                    self._ended_at.pop(next(iter(self._ended_at)))
            if item[0] in ("ended", "idle"):
                self._quiet_at = max(self._quiet_at, at)
            posts.append((*item, at))
        return posts

    def _deliver(self, posts: list[tuple[Any, ...]], cancel_from: int | None) -> None:
        """Hand the events to their loops."""
        if not posts and cancel_from is None:
            return
        replies = []
        for post in posts:
            if post[0] == "voice":
                _, voice, pos, completed, at = post
                handle = getattr(voice, "handle", None)
                if handle is not None:
                    self._post(handle._loop, handle._resolve, completed, at)
                continue
            kind, rid, pos, at = post
            interrupted = False
            if rid is not None:
                st = self.core.stats.get(rid)
                interrupted = st is not None and st.interrupted_at is not None
            replies.append((pos, at, kind, rid, interrupted))
        if replies or cancel_from is not None:
            for loop, disp in list(self._dispatchers.items()):
                if loop.is_closed():
                    self._dispatchers.pop(loop, None)
                    continue
                try:
                    loop.call_soon_threadsafe(disp.post, cancel_from, replies)
                except RuntimeError:
                    self._dispatchers.pop(loop, None)

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], arg: Any, at: float) -> None:
        def schedule() -> None:
            loop.call_at(max(at, loop.time()), fn, arg)

        try:
            loop.call_soon_threadsafe(schedule)
        except RuntimeError:  # its loop is gone
            pass

    async def aclose(self, fade_ms: int = 0) -> None:
        """Stop the writer (after an optional bed fade-out) and join the thread."""
        if fade_ms:
            with self._lock:
                self.core.stop_bed(fade_ms)
            await asyncio.sleep(fade_ms / 1000 + (self.source_queue_ms + 10) / 1000)
        self._stop.set()
        self._wake()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 2.0)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    # -- thread-safe control, called from the main loop --

    def push_reply(self, reply_id: str, pcm: bytes) -> None:
        with self._lock:
            was_waiting = self.core.reply.queued > 0
            self.core.push_reply(reply_id, pcm)
            wake = self.start_reply_at_once and not self._fill_requested and self._fill_due is None and \
                (self.core.wants_fill() or (not was_waiting and self.core.reply.queued > 0))
            if wake:
                self._fill_requested = True
        if wake:
            self._wake()

    def interrupt(self, reply_id: str | None = None) -> ReplyStats | None:
        with self._lock:
            st = self.core.interrupt(reply_id)
        if self.clear_queue_on_barge_in and self._loop is not None:
            self._loop.call_soon_threadsafe(self._clear_source_queue)
        elif self.flush_on_barge_in:
            self._flush_requested = True  # the writer does it between two captures
            self._wake()
        return st

    def _clear_source_queue(self) -> None:
        now = time.monotonic()
        tick = self._next_tick(now)
        self.cleared_ms.append(max(0.0, (self._handed_until - tick) * 1000))
        self._handed_until = tick
        self._cleared = True
        self.source.clear_queue()

    def set_bed(self, name: str, samples: np.ndarray, volume: float | None = None, fade_ms: int | None = None) -> None:
        with self._lock:
            self.core.set_bed(name, samples, volume, fade_ms)
        self._started()

    def _started(self) -> None:
        """A voice started: mix it into the queued frames (the writer does, at once)."""
        if self.start_reply_at_once and not self._fill_requested:
            self._fill_requested = True
            self._wake()

    def set_bed_volume(self, volume: float, ramp_ms: int | None = None) -> None:
        with self._lock:
            self.core.set_bed_volume(volume, ramp_ms)

    def stop_bed(self, fade_ms: int | None = None) -> None:
        with self._lock:
            self.core.stop_bed(fade_ms)

    def start_thinking(self, name: str, samples: np.ndarray, volume: float | None = None) -> PlayHandle | None:
        """Loop the thinking cue until the reply starts (or ``stop_thinking``). Returns its
        handle when called on an event loop (the one already playing, if any)."""
        with self._lock:
            voice = self.core.start_thinking(name, samples, volume)
            handle = self._handle_locked(voice)
        self._started()
        return handle

    def stop_thinking(self) -> None:
        with self._lock:
            self.core.stop_thinking()

    def play(self, sound: "np.ndarray | AsyncIterator[Any]", *, volume: float = 1.0, name: str = "sound",
             loop: bool = False, max_buffer_s: float = 1.0) -> PlayHandle:
        """Play a sound over the bed: samples (24 kHz mono float32, once or ``loop``-ed), or
        an async iterator of ``rtc.AudioFrame`` of any rate and channel count (downmixed,
        resampled to 24 kHz, read ahead by at most ``max_buffer_s``). Call it on an event
        loop; the handle can be awaited or stopped (``PlayHandle``)."""
        if isinstance(sound, np.ndarray):
            with self._lock:
                voice = self.core.play_cue(name, sound, volume, loop=loop)
                handle = self._handle_locked(voice)
            assert handle is not None
            self._started()
            return handle
        with self._lock:
            stream = self.core.add_stream(name, volume)
            handle = self._handle_locked(stream)
        assert handle is not None
        handle._task = asyncio.get_running_loop().create_task(self._feed(stream, sound, max_buffer_s))
        handle._task.add_done_callback(_log_feeder_error)
        return handle

    def play_cue(self, name: str, samples: np.ndarray, volume: float) -> PlayHandle:
        """A one-shot cue. ``await mixer.play_cue(...)`` is True when it finished and False
        if it was stopped (as before: cancelling the awaiting task stops it)."""
        return self.play(samples, volume=volume, name=name)

    async def play_stream(self, frames: "AsyncIterator[object]", volume: float = 1.0, name: str = "stream",
                          max_buffer_s: float = 1.0) -> None:
        """Mix programmatic audio (see ``play``); returns once it has been played."""
        await self.play(frames, volume=volume, name=name, max_buffer_s=max_buffer_s)

    def _handle_locked(self, voice: Voice) -> PlayHandle | None:
        handle = getattr(voice, "handle", None)
        if handle is not None:
            return handle
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        handle = PlayHandle(self, voice, loop)
        voice.handle = handle  # type: ignore[attr-defined]
        if self._thread is None:  # no writer: nothing is "heard"; done once mixed out
            voice.on_done = lambda completed: loop.call_soon_threadsafe(handle._resolve, completed)
        return handle

    def _stop_voice(self, voice: Voice, fade_ms: float | None) -> None:
        with self._lock:
            self.core.stop_cue(voice, 50 if fade_ms is None else fade_ms)

    async def _feed(self, voice: StreamVoice, frames: "AsyncIterator[Any]", max_buffer_s: float) -> None:
        from livekit import rtc

        loop = asyncio.get_running_loop()
        limit = max_buffer_s * SAMPLE_RATE
        space: list[asyncio.Future[None]] = []

        def on_space() -> None:  # on the mixing thread, under the lock
            if space and voice.buffer.queued <= limit:
                fut = space.pop()
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))

        voice.on_space = on_space
        resampler = None
        rate = None

        def push(data: Any) -> None:
            with self._lock:
                voice.buffer.push(voice.name, np.frombuffer(data, dtype=np.int16).astype(np.float32) / INT16_SCALE)

        try:
            async for frame in frames:
                pcm = np.frombuffer(frame.data, dtype=np.int16)
                if frame.num_channels > 1:
                    pcm = pcm.reshape(-1, frame.num_channels).mean(axis=1).astype(np.int16)
                if frame.sample_rate != SAMPLE_RATE:
                    if resampler is None or rate != frame.sample_rate:
                        resampler = rtc.AudioResampler(frame.sample_rate, SAMPLE_RATE, num_channels=1,
                                                       quality=rtc.AudioResamplerQuality.HIGH)
                        rate = frame.sample_rate
                    for f in resampler.push(rtc.AudioFrame(pcm.tobytes(), rate, 1, len(pcm))):
                        push(f.data)
                else:
                    push(pcm.tobytes())
                while voice.buffer.queued > limit and not voice.retiring:
                    fut = loop.create_future()
                    with self._lock:
                        if voice.buffer.queued <= limit:
                            break
                        space.append(fut)
                    await fut
            if resampler is not None:
                for f in resampler.flush():
                    push(f.data)
        finally:
            with self._lock:
                voice.ended = True

    def reply_stats(self, reply_id: str) -> ReplyStats | None:
        with self._lock:
            st = self.core.stats.get(reply_id)
            return None if st is None else ReplyStats(**st.__dict__)

    @property
    def reply_queued_ms(self) -> float:
        """Reply audio received and not yet mixed."""
        with self._lock:
            return self.core.reply_queued_ms()

    def add_listener(self, callback: Callable[[PlaybackEvent], None],
                     loop: asyncio.AbstractEventLoop | None = None) -> Callable[[], None]:
        """Call ``callback(event)`` on ``loop`` (default: the running one) for every
        ``ReplyStartedPlaying`` / ``ReplyAudioStopped``, at the moment it is heard (leaves
        the source). Returns a function that removes the listener."""
        loop = loop or asyncio.get_running_loop()
        with self._lock:
            disp = self._dispatcher_locked(loop)
            disp.listeners.append(callback)

        def remove() -> None:
            if callback in disp.listeners:
                disp.listeners.remove(callback)

        return remove

    def _dispatcher_locked(self, loop: asyncio.AbstractEventLoop) -> _Dispatcher:
        disp = self._dispatchers.get(loop)
        if disp is None:
            disp = self._dispatchers[loop] = _Dispatcher(self, loop)
        return disp

    def _pending_locked(self, reply_id: str | None) -> bool:
        core = self.core
        if reply_id is None:
            return core.reply.queued > 0 or core._tail is not None
        return core.reply.has(reply_id) or (core._tail is not None and core._tail_owner == reply_id)

    def _done_locked(self, reply_id: str | None) -> PlayoutDone:
        if reply_id is None:
            return PlayoutDone(None, 0.0, False)
        st = self.core.stats.get(reply_id)
        return PlayoutDone(reply_id, 0.0 if st is None else st.played * 1000 / SAMPLE_RATE,
                           st is not None and st.interrupted_at is not None)

    async def wait_for_playout(self, reply_id: str | None = None) -> PlayoutDone:
        """Until every sample of ``reply_id`` received so far (``None``: of every reply)
        has been heard, i.e. has left the source, or was dropped by a barge-in. Returns
        how much of it was played and whether it was interrupted."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._pending_locked(reply_id) or \
                    (reply_id is not None and self._ended_at.get(reply_id) == math.inf):
                fut: asyncio.Future[PlayoutDone] = loop.create_future()
                self._dispatcher_locked(loop).waiters.append((reply_id, fut))
                at = None
            else:
                fut = None  # type: ignore[assignment]
                at = self._quiet_at if reply_id is None else self._ended_at.get(reply_id, 0.0)
        if fut is not None:
            return await fut
        if at is not None and at > time.monotonic():
            await asyncio.sleep(at - time.monotonic())
        with self._lock:
            return self._done_locked(reply_id)

    def _resolve_waiters(self, disp: _Dispatcher, kind: str, rid: str | None) -> None:
        """On a dispatcher's loop, when a reply event fires."""
        with self._lock:
            still = []
            for want, fut in disp.waiters:
                if fut.done():
                    continue
                if (want is not None and kind == "ended" and want == rid and not self._pending_locked(want)) or \
                        (want is None and kind == "idle" and not self._pending_locked(None)):
                    fut.set_result(self._done_locked(want))
                else:
                    still.append((want, fut))
            disp.waiters = still

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            c = self.core.counters
            return {
                "frames": c.frames,
                "underruns": c.underruns,
                "underrun_ms": round(c.underrun_ms, 1),
                "queue_ms": round(c.queue_ms, 1),
                "barge_ins": c.barge_ins,
                "flushes": self.flushes,
                "fills": self.fills,
                "voice_fills": self.voice_fills,
                "flush_races": self.races,
                "flush_gaps": self.gaps,
                "clock_fixes": self.clock_fixes,
                "reply_holes": c.reply_holes,
                "reply_hole_ms": round(c.reply_hole_ms, 1),
                "reply_cushion_ms": round(self.core.cushion_ms, 1),
                "reply_queued_ms": round(self.core.reply_queued_ms(), 1),
                "reply_latency_ms": c.last_reply_latency_ms,
                "barge_in_to_silence_ms": c.last_barge_in_to_silence_ms,
                "limiter_samples": c.limiter_samples,
                "bed": self.core.bed_name,
                "bed_volume": self.core.bed_volume,
            }
