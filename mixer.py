"""The audio engine: one published track carrying reply + ambient bed + cues.

* ``MixerCore`` is pure: ``next_frame()`` returns exactly one frame (10 or 20 ms of
  24 kHz mono int16) mixing the reply buffer, the ambient bed (looped from memory,
  ducked under speech) and cues, every gain a per-sample ramp, through a limiter that
  never lets the sum wrap or hard-clip. It takes its clock from the frames it produces,
  so it can be tested sample-exactly.
* ``Mixer`` owns the core and ONE writer: a dedicated audio thread with its own event
  loop that pushes frames into the ``AudioSource`` as its (small) queue drains. Nothing
  on that thread waits on network I/O, and a busy main event loop (JSON, room events,
  logging) cannot starve the bed. The main loop talks to the core through thread-safe
  methods (a lock around each call; each call is microseconds).

Barge-in removes only the UNMIXED reply buffer, with a short fade; the bed continues
sample-continuously because it lives in a separate voice of the mix.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import numpy as np

import scheduling

log = logging.getLogger("mixer")

SAMPLE_RATE = 24000
DEFAULT_QUEUE_MS = 100  # audio handed ahead to the output; README says why 100
INT16_SCALE = 32767.0


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


class LoopVoice:
    """A sound looped from memory (the buffer is prepared seamless by the loader)."""

    def __init__(self, name: str, samples: np.ndarray, loop: bool = True) -> None:
        self.name = name
        self.samples = np.ascontiguousarray(samples, dtype=np.float32)
        self.loop = loop
        self.pos = 0
        self.gain = Ramp(0.0)
        self.finished = False  # one-shot reached its end
        self.retiring = False  # fading out, removed at zero

    def read(self, n: int) -> np.ndarray:
        out = np.zeros(n, dtype=np.float32)
        if self.finished or len(self.samples) == 0:
            self.finished = True
            return out
        filled = 0
        while filled < n:
            take = min(n - filled, len(self.samples) - self.pos)
            out[filled : filled + take] = self.samples[self.pos : self.pos + take]
            filled += take
            self.pos += take
            if self.pos >= len(self.samples):
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

    def push(self, reply_id: str, samples: np.ndarray) -> None:
        self._segments.append((reply_id, samples))
        self.queued += len(samples)

    def read(self, n: int) -> tuple[np.ndarray, list[tuple[str, int]]]:
        """Up to ``n`` samples (zero-padded) and which reply they came from."""
        out = np.zeros(n, dtype=np.float32)
        owners: list[tuple[str, int]] = []
        filled = 0
        while filled < n and self._segments:
            rid, seg = self._segments[0]
            take = min(n - filled, len(seg) - self._offset)
            out[filled : filled + take] = seg[self._offset : self._offset + take]
            filled += take
            self._offset += take
            self.queued -= take
            owners.append((rid, take))
            if self._offset >= len(seg):
                self._segments.popleft()
                self._offset = 0
        return out, owners

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
        return dropped


class StreamVoice:
    """Programmatic audio fed by an async iterator (``Mixer.play_stream``)."""

    def __init__(self, name: str, volume: float) -> None:
        self.name = name
        self.buffer = ReplyBuffer()
        self.gain = Ramp(volume)
        self.ended = False  # the iterator is exhausted: remove once drained


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
    limiter_samples: int = 0
    queue_ms: float = 0.0
    last_reply_latency_ms: float | None = None
    last_barge_in_to_silence_ms: float | None = None
    reply_latencies_ms: list[float] = field(default_factory=list)
    barge_in_to_silence_ms: list[float] = field(default_factory=list)


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
    barge_in_fade_ms: float = 5.0
    thinking_volume: float = 0.3
    cue_fade_ms: int = 150
    limiter_ceiling: float = 0.89
    max_reply_backlog_s: float = 120.0  # reply audio held ahead of playback, at most


class MixerCore:
    """Pure mixing core. Not thread-safe by itself (``Mixer`` adds the lock).

    ``clock`` (default ``time.monotonic``) only timestamps counters; the audio itself
    depends on nothing but the calls made.
    """

    def __init__(self, settings: MixerSettings | None = None, clock: Callable[[], float] = time.monotonic,
                 history_frames: int = 128) -> None:
        self.s = settings or MixerSettings()
        if self.s.frame_ms not in (10, 20):
            raise ValueError("frame_ms must be 10 or 20")
        self.frame = SAMPLE_RATE * self.s.frame_ms // 1000
        self.clock = clock
        self.reply = ReplyBuffer()
        self.reply_gain = self.s.reply_volume
        self._tail: np.ndarray | None = None  # faded remainder of an interrupted reply
        self._tail_owner: str | None = None
        self.beds: list[LoopVoice] = []  # the current bed last; older ones fading out
        self.bed_volume = self.s.ambient_volume
        self.cues: list[tuple[LoopVoice, Callable[[bool], None] | None]] = []
        self.thinking: LoopVoice | None = None
        self.streams: list[StreamVoice] = []
        self.ducker = Ducker(self.s.duck_db, self.s.duck_attack_ms, self.s.duck_release_ms)
        self.limiter = Limiter(self.s.limiter_ceiling)
        self.stats: collections.OrderedDict[str, ReplyStats] = collections.OrderedDict()
        self.counters = MixerCounters()
        self.samples_out = 0
        # Playback transitions for the application: ("playing", reply_id) when a reply's
        # first sample is mixed, ("idle", None) when reply audio stops. Drained by Mixer.
        self.events: list[tuple[str, str | None]] = []
        self._speaking = False
        # The last frames mixed, as (everything but the reply, the reply, reply owners).
        self.history: collections.deque[tuple[np.ndarray, np.ndarray, list[tuple[str, int]]]] = \
            collections.deque(maxlen=history_frames)

    def _ms(self, ms: float) -> int:
        return int(round(ms * SAMPLE_RATE / 1000))

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
                self.stats.popitem(last=False)
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
            fade = np.cos(np.linspace(0.0, math.pi / 2, n + 1, dtype=np.float64)[1:]).astype(np.float32)
            self._tail = tail * fade
            self._tail_owner = owners[0][0] if owners else head
        dropped = self.reply.drop(reply_id)
        self.counters.reply_samples_dropped += dropped
        if target is None:
            return None
        st = self._stats(target)
        if self._tail is None and st.silent_at is None:
            st.silent_at = now
            self._record_silence(st)
        return st

    def _record_silence(self, st: ReplyStats) -> None:
        if st.interrupted_at is not None and st.silent_at is not None:
            ms = (st.silent_at - st.interrupted_at) * 1000
            self.counters.last_barge_in_to_silence_ms = ms
            self.counters.barge_in_to_silence_ms.append(ms)
            del self.counters.barge_in_to_silence_ms[:-100]

    def rerender_without_reply(self, frames: int) -> list[np.ndarray]:
        """Barge-in, part two: the last ``frames`` frames were handed to the output but not
        yet played (they sit in its queue, about to be flushed). Return them again without
        the reply (a few-ms fade at the start, silence after), everything else identical:
        the bed continues sample for sample. Their reply samples no longer count as played."""
        frames = min(frames, len(self.history))
        if frames <= 0:
            return []
        self._tail = None  # the fade is in the first re-rendered frame now
        fade_n = max(1, self._ms(self.s.barge_in_fade_ms))
        fade = np.cos(np.linspace(0.0, math.pi / 2, fade_n + 1, dtype=np.float64)[1:]).astype(np.float32)
        out = []
        start = len(self.history) - frames
        kept_reply = 0
        for i in range(start, len(self.history)):
            rest, reply_part, owners = self.history[i]
            if i == start:
                faded = np.zeros_like(reply_part)
                k = min(fade_n, len(reply_part))
                faded[:k] = reply_part[:k] * fade[:k]
                kept_reply = k if reply_part.any() else 0
            else:
                faded = np.zeros_like(reply_part)
            for rid, count in owners:
                st = self.stats.get(rid)
                if st is not None:
                    st.played -= count
            self.history[i] = (rest, faded, owners if i == start and kept_reply else [])
            limited = self.limiter.process(rest + faded)
            out.append(np.clip(np.round(limited * INT16_SCALE), -32768, 32767).astype(np.int16))
        first_owner = self.history[start][2]
        if kept_reply and first_owner:
            st = self.stats.get(first_owner[0][0])
            if st is not None:
                st.played += kept_reply
        now = self.clock()
        for st in self.stats.values():  # the interrupted reply is silent from these frames on
            if st.interrupted_at is not None and (st.silent_at is None or st.silent_at > now):
                st.silent_at = now
                self._record_silence(st)
        return out

    def reply_queued_ms(self) -> float:
        return self.reply.queued * 1000 / SAMPLE_RATE

    def played_ms(self, reply_id: str) -> float:
        st = self.stats.get(reply_id)
        return 0.0 if st is None else st.played * 1000 / SAMPLE_RATE

    # -- ambient bed --

    def set_bed(self, name: str, samples: np.ndarray, volume: float | None = None, fade_ms: int | None = None) -> None:
        """Start (fade in) or replace (equal-power crossfade) the looping bed."""
        if volume is not None:
            self.bed_volume = volume
        first = not any(not b.retiring for b in self.beds)
        fade = self._ms(fade_ms if fade_ms is not None else (self.s.ambient_fade_in_ms if first else self.s.ambient_crossfade_ms))
        for old in self.beds:
            if not old.retiring:
                old.retiring = True
                old.gain.to(0.0, fade, "power")
        bed = LoopVoice(name, samples, loop=True)
        bed.gain.to(self.bed_volume, fade, "power")
        self.beds.append(bed)

    def set_bed_volume(self, volume: float, ramp_ms: int | None = None) -> None:
        self.bed_volume = volume
        for bed in self.beds:
            if not bed.retiring:
                bed.gain.to(volume, self._ms(ramp_ms if ramp_ms is not None else self.s.volume_ramp_ms))

    def stop_bed(self, fade_ms: int | None = None) -> None:
        for bed in self.beds:
            if not bed.retiring:
                bed.retiring = True
                bed.gain.to(0.0, self._ms(fade_ms if fade_ms is not None else self.s.ambient_fade_out_ms), "power")

    @property
    def bed_name(self) -> str | None:
        current = [b for b in self.beds if not b.retiring]
        return current[-1].name if current else None

    # -- cues --

    def start_thinking(self, name: str, samples: np.ndarray, volume: float | None = None) -> None:
        if self.thinking is not None and not self.thinking.retiring:
            return
        voice = LoopVoice(name, samples, loop=True)
        voice.gain.to(self.s.thinking_volume if volume is None else volume, self._ms(self.s.cue_fade_ms), "power")
        self.thinking = voice

    def stop_thinking(self) -> None:
        if self.thinking is not None and not self.thinking.retiring:
            self.thinking.retiring = True
            self.thinking.gain.to(0.0, self._ms(self.s.cue_fade_ms), "power")

    def play_cue(self, name: str, samples: np.ndarray, volume: float, on_done: Callable[[bool], None] | None = None) -> LoopVoice:
        """A one-shot cue. ``on_done(completed)`` runs (on the mixing thread) when it
        finished (True) or was stopped (False)."""
        voice = LoopVoice(name, samples, loop=False)
        voice.gain.to(volume, self._ms(5))
        self.cues.append((voice, on_done))
        return voice

    def stop_cue(self, voice: LoopVoice, fade_ms: int = 50) -> None:
        voice.retiring = True
        voice.gain.to(0.0, self._ms(fade_ms), "power")

    # -- the frame --

    def next_frame(self) -> np.ndarray:
        """Exactly one frame of int16 samples."""
        n = self.frame
        now = self.clock()
        reply_part = np.zeros(n, dtype=np.float32)
        owners_in_frame: list[tuple[str, int]] = []

        # Reply: the faded tail of an interrupted reply first, then the buffer.
        speech = False
        if self._tail is not None:
            t = self._tail[:n]
            reply_part[: len(t)] += t * self.reply_gain
            owner = self._stats(self._tail_owner or "")
            owner.played += len(t)
            self._tail = self._tail[n:] if len(self._tail) > n else None
            speech = True
            if self._tail is None:
                owner.silent_at = now
                self._record_silence(owner)
        if self.reply.queued:
            r, owners = self.reply.read(n)
            reply_part += r * self.reply_gain
            speech = True
            owners_in_frame = owners
            for rid, count in owners:
                st = self._stats(rid)
                if st.first_played_at is None:
                    st.first_played_at = now
                    self.events.append(("playing", rid))
                    if st.first_received_at is not None:
                        ms = (now - st.first_received_at) * 1000
                        self.counters.last_reply_latency_ms = ms
                        self.counters.reply_latencies_ms.append(ms)
                        del self.counters.reply_latencies_ms[:-100]
                st.played += count
            if self.thinking is not None:
                self.stop_thinking()

        if speech != self._speaking:
            self._speaking = speech
            if not speech:
                self.events.append(("idle", None))

        # Everything but the reply: kept apart so a barge-in can re-render queued frames
        # without the reply (see rerender_without_reply).
        mix = np.zeros(n, dtype=np.float32)

        # Bed(s), ducked under the agent's speech.
        if self.beds:
            duck = self.ducker.render(n, speech)
            for bed in self.beds:
                mix += bed.read(n) * bed.gain.render(n) * duck
            self.beds = [b for b in self.beds if not (b.retiring and not b.gain.moving and b.gain.value == 0.0)]
        else:
            self.ducker.render(n, speech)

        # Cues.
        if self.thinking is not None:
            mix += self.thinking.read(n) * self.thinking.gain.render(n)
            if self.thinking.retiring and not self.thinking.gain.moving:
                self.thinking = None
        if self.cues:
            still = []
            for voice, on_done in self.cues:
                mix += voice.read(n) * voice.gain.render(n)
                if voice.finished or (voice.retiring and not voice.gain.moving):
                    if on_done is not None:
                        try:
                            on_done(voice.finished and not voice.retiring)
                        except Exception:
                            log.exception("cue completion callback failed")
                else:
                    still.append((voice, on_done))
            self.cues = still

        if self.streams:
            for voice in self.streams:
                samples, _ = voice.buffer.read(n)
                mix += samples * voice.gain.render(n)
            self.streams = [v for v in self.streams if not (v.ended and v.buffer.queued == 0)]

        self.history.append((mix, reply_part, owners_in_frame))
        out = self.limiter.process(mix + reply_part)
        self.counters.frames += 1
        self.counters.limiter_samples = self.limiter.active_samples
        self.samples_out += n
        return np.clip(np.round(out * INT16_SCALE), -32768, 32767).astype(np.int16)


# --- the writer ---------------------------------------------------------------------------


class Mixer:
    """Thread-safe facade over ``MixerCore`` plus the single writer (an audio thread
    with its own event loop) feeding one ``rtc.AudioSource``."""

    def __init__(self, settings: MixerSettings | None = None, *, queue_ms: int = DEFAULT_QUEUE_MS,
                 clear_queue_on_barge_in: bool = False, flush_on_barge_in: bool = True,
                 priority: str = "realtime", on_air: bool = True) -> None:
        self.core = MixerCore(settings)
        # Underruns are counted (and warned about) only while the track is on air. A caller
        # that starts the writer before it publishes (the worker: LiveKit's threads must
        # start on the audio thread) passes False and sets it once the track is published,
        # so a busy start-up, or a config error right after it, says nothing about starving.
        self.on_air = on_air
        self.priority_mode = priority
        self.queue_ms = queue_ms
        # Barge-in without waiting for the queue: flush the output's queue and hand it the
        # same frames again without the reply, so the reply stops within a frame and the
        # bed goes on sample for sample.
        self.flush_on_barge_in = flush_on_barge_in
        self._flush_requested = False
        self.flushes = 0
        # The naive design (benchmark baseline only): also flush the source's queue on
        # barge-in, which throws away the bed audio queued with it.
        self.clear_queue_on_barge_in = clear_queue_on_barge_in
        self.cleared_ms: list[float] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._source_ready = threading.Event()
        self._error: BaseException | None = None
        self.source = None  # rtc.AudioSource, created on the audio thread
        self.heartbeat = time.monotonic()  # last frame handed to the source (watchdog)
        # on_event(name, reply_id, delay_s): called ON THE AUDIO THREAD for playback
        # transitions; delay_s is how long until the frame is actually heard.
        self.on_event: Callable[[str, str | None, float], None] | None = None
        self.priority = "normal"  # scheduling the audio thread got
        self._handed_until = 0.0  # monotonic time when the queued audio runs out
        self.writer_cpu_s = 0.0  # CPU seconds used so far by the writer thread (for the bench)

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
            self.source = rtc.AudioSource(SAMPLE_RATE, 1, queue_size_ms=self.queue_ms, loop=loop)
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

    async def _write_loop(self, rtc) -> None:
        frame_s = self.core.frame / SAMPLE_RATE
        counters = self.core.counters
        while not self._stop.is_set():
            if self._flush_requested:
                self._flush_requested = False
                await self._flush_without_reply(rtc, frame_s)
            with self._lock:
                samples = self.core.next_frame()
                events, self.core.events = self.core.events, []
            now = time.monotonic()
            if self.on_air and self._handed_until and now > self._handed_until + 0.002:
                counters.underruns += 1
                gap_ms = (now - self._handed_until) * 1000
                counters.underrun_ms += gap_ms
                if counters.underruns <= 5 or counters.underruns % 100 == 0:
                    log.warning("audio underrun: the published track was starved for %.0f ms (queue %d ms; "
                                "%d underruns so far)", gap_ms, self.queue_ms, counters.underruns)
            self._handed_until = max(self._handed_until, now) + frame_s
            counters.queue_ms = max(0.0, (self._handed_until - now) * 1000)
            frame = rtc.AudioFrame(samples.tobytes(), SAMPLE_RATE, 1, len(samples))
            await self.source.capture_frame(frame)
            ahead = self._handed_until - time.monotonic() - self.queue_ms / 1000
            if ahead > 0.1:
                # The source stopped pacing us (closed?): never spin, least of all at
                # real-time priority.
                await asyncio.sleep(ahead)
            self.heartbeat = time.monotonic()
            self.writer_cpu_s = time.thread_time()
            if events and self.on_event is not None:
                # Heard once the queue ahead of this frame has played out.
                delay = max(0.0, self._handed_until - self.heartbeat - frame_s)
                for name, reply_id in events:
                    try:
                        self.on_event(name, reply_id, delay)
                    except Exception:
                        log.exception("playback event handler failed")

    async def _flush_without_reply(self, rtc, frame_s: float) -> None:
        """Replace what the output still has queued by the same frames without the reply.
        Runs right after a capture returned, i.e. just after the output took a frame: the
        whole queue is ours to replace before it takes the next one."""
        t0 = time.monotonic()
        queued = max(0, round((self._handed_until - t0) / frame_s))
        with self._lock:
            recent = list(self.core.history)[-queued:] if queued else []
            if not any(reply.any() for _, reply, _ in recent):
                return  # the reply had not reached the queue: dropping the buffer was enough
            frames = self.core.rerender_without_reply(queued)
        # If this thread lost the GIL while rendering, the output took frames meanwhile:
        # those have played, so they are not pushed again (the bed would repeat).
        late = int((time.monotonic() - t0) / frame_s)
        data = np.concatenate(frames[late:]) if len(frames) > late else None
        self.source.clear_queue()
        if data is not None:
            # One hand-off: the native queue is whole again after a single call (the SDK
            # splits it into queue-sized pieces natively), not after one Python round
            # trip per frame, each of which could wait for the GIL while the queue ran dry.
            await self.source.capture_frame(rtc.AudioFrame(data.tobytes(), SAMPLE_RATE, 1, len(data)))
        self.flushes += 1

    async def aclose(self, fade_ms: int = 0) -> None:
        """Stop the writer (after an optional bed fade-out) and join the thread."""
        if fade_ms:
            with self._lock:
                self.core.stop_bed(fade_ms)
            await asyncio.sleep(fade_ms / 1000 + self.queue_ms / 1000)
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 2.0)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    # -- thread-safe control, called from the main loop --

    def push_reply(self, reply_id: str, pcm: bytes) -> None:
        with self._lock:
            self.core.push_reply(reply_id, pcm)

    def interrupt(self, reply_id: str | None = None) -> ReplyStats | None:
        with self._lock:
            st = self.core.interrupt(reply_id)
        if self.clear_queue_on_barge_in and self._loop is not None:
            self._loop.call_soon_threadsafe(self._clear_source_queue)
        elif self.flush_on_barge_in:
            self._flush_requested = True  # the writer does it between two captures
        return st

    def _clear_source_queue(self) -> None:
        now = time.monotonic()
        self.cleared_ms.append(max(0.0, (self._handed_until - now) * 1000))
        self._handed_until = now
        self.source.clear_queue()

    def set_bed(self, name: str, samples: np.ndarray, volume: float | None = None, fade_ms: int | None = None) -> None:
        with self._lock:
            self.core.set_bed(name, samples, volume, fade_ms)

    def set_bed_volume(self, volume: float, ramp_ms: int | None = None) -> None:
        with self._lock:
            self.core.set_bed_volume(volume, ramp_ms)

    def stop_bed(self, fade_ms: int | None = None) -> None:
        with self._lock:
            self.core.stop_bed(fade_ms)

    def start_thinking(self, name: str, samples: np.ndarray, volume: float | None = None) -> None:
        with self._lock:
            self.core.start_thinking(name, samples, volume)

    def stop_thinking(self) -> None:
        with self._lock:
            self.core.stop_thinking()

    async def play_cue(self, name: str, samples: np.ndarray, volume: float) -> bool:
        """Play a one-shot cue; returns True when it finished, False if stopped."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()

        def on_done(completed: bool) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(completed))

        with self._lock:
            voice = self.core.play_cue(name, samples, volume, on_done)
        try:
            return await done
        except asyncio.CancelledError:
            with self._lock:
                self.core.stop_cue(voice)
            raise

    async def play_stream(self, frames: "AsyncIterator[object]", volume: float = 1.0, name: str = "stream",
                          max_buffer_s: float = 1.0) -> None:
        """Mix programmatic audio: an async iterator of ``rtc.AudioFrame`` of any rate and
        channel count (downmixed, resampled to 24 kHz). Returns once it has been played.
        The iterator is read ahead by at most ``max_buffer_s``."""
        from livekit import rtc

        voice = StreamVoice(name, volume)
        with self._lock:
            self.core.streams.append(voice)
        resampler = None
        rate = None
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
                    chunks = [f.data for f in resampler.push(rtc.AudioFrame(pcm.tobytes(), rate, 1, len(pcm)))]
                else:
                    chunks = [pcm]
                with self._lock:
                    for c in chunks:
                        voice.buffer.push(name, np.frombuffer(c, dtype=np.int16).astype(np.float32) / INT16_SCALE)
                while voice.buffer.queued > max_buffer_s * SAMPLE_RATE:
                    await asyncio.sleep(0.02)
            if resampler is not None:
                with self._lock:
                    for f in resampler.flush():
                        voice.buffer.push(name, np.frombuffer(f.data, dtype=np.int16).astype(np.float32) / INT16_SCALE)
        finally:
            voice.ended = True
        while voice.buffer.queued:
            await asyncio.sleep(0.02)

    def reply_stats(self, reply_id: str) -> ReplyStats | None:
        with self._lock:
            st = self.core.stats.get(reply_id)
            return None if st is None else ReplyStats(**st.__dict__)

    async def wait_reply_played(self, poll_s: float = 0.01) -> None:
        """Until every queued reply sample has been handed over and played out."""
        while True:
            with self._lock:
                queued = self.core.reply.queued > 0 or self.core._tail is not None
            if not queued:
                break
            await asyncio.sleep(poll_s)
        await asyncio.sleep(self.queue_ms / 1000)

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
                "reply_queued_ms": round(self.core.reply_queued_ms(), 1),
                "reply_latency_ms": c.last_reply_latency_ms,
                "barge_in_to_silence_ms": c.last_barge_in_to_silence_ms,
                "limiter_samples": c.limiter_samples,
                "bed": self.core.bed_name,
                "bed_volume": self.core.bed_volume,
            }
