#!/usr/bin/env python3
"""Mixer benchmark: what the audio engine costs, and what its small queue buys.

    python bench/mixer_bench.py [--turns N] [--quick] [--seed S] [--json PATH]

No LiveKit server is needed: an ``rtc.AudioSource`` drains in real time on its own,
and the SDK lets us read our own ``LocalAudioTrack`` through an ``rtc.AudioStream``
without a room, so what leaves the source can be observed sample by sample.

Two designs run side by side in the same process, same seed, same turns:

* **ours**  = ``Mixer()`` defaults: 10 ms frames into a 100 ms native queue; barge-in
  drops the unmixed reply and flushes the queue, handing it the same frames again
  without the reply (2 ms fade): the bed keeps playing sample for sample.
* **naive** = ``Mixer(queue_ms=1000, clear_queue_on_barge_in=True)``: LiveKit's
  default 1000 ms queue, and ``clear_queue()`` on barge-in (what pipecat does).

Every timing figure is a median with min-max over repeated turns (or batches, or 1 s
windows); every comparison is a ratio of medians measured in the same run.

Figures
-------
1. Core cost per frame: wall time of ``MixerCore.next_frame()`` alone (no thread, no
   source), 30 batches of 500 frames (10 x 200 with --quick); us per 10 ms frame and %
   of real time (cost / 10 ms).
   Scenarios: silence only; bed only; bed + reply; bed + loud reply + a cue voice with
   the limiter active (the thinking loop stops itself once a reply plays, so the extra
   voice is a one-shot cue; same code path).
2. Writer CPU per minute of audio: the real ``Mixer`` (writer thread + its event loop
   + a real ``AudioSource``) with a bed and a 1 s reply every 2 s. Writer CPU is
   ``time.thread_time()`` sampled inside the writer thread (``Mixer.writer_cpu_s``);
   process CPU is ``resource.getrusage`` (user + sys, every thread, FFI included). Both
   per 1 s window (8 windows; 2 with --quick), normalised to CPU seconds per minute of
   audio handed over. Also the
   longest interval between two ``capture_frame`` returns per window, and underruns.
3. Reply latency at the source. A 2 s reply (a cosine tone, so its first sample is
   loud) is pushed at a random moment (random phase against the frame clock):
   (a) received -> first sample handed to the source: ``first_played_at -
       first_received_at`` from the core;
   (b) received -> playout, estimated: (a) + the source queue depth at hand-off, from
       the writer's wall-clock bookkeeping (``Mixer._handed_until``);
   (c) received -> playout, observed: the first reply sample found in the audio read
       back from our own local track (see "Observed playout" below).
4. Barge-in to silence. ``Mixer.interrupt(reply_id)`` at a random moment 0.1-0.6 s
   after the reply started to play out: interrupt -> last reply sample handed
   (``silent_at - interrupted_at``); -> silence at playout, estimated (queue depth, and
   for naive the moment ``clear_queue()`` ran) and observed (last reply sample read
   back). Bed lost per barge-in: ``Mixer.cleared_ms`` (queued audio thrown away by
   ``clear_queue()``, the writer's estimate) and, observed, the jump in bed position
   across the barge-in: the bed is a 6 s loop of seeded noise, so every 50 ms stretch
   of it read back is located in the loop by cross-correlation; continuity means the
   bed advanced exactly as many samples as were played. Dropout per barge-in: hard
   silence (runs of >= 1 ms of exact zeros, which the noise bed never contains)
   inserted by the source between the two stretches.
5. Queue sweep: ours at OUTPUT_QUEUE_MS = 20, 30, 40, 60, 100, 200, 1000 with 10 ms
   frames (and 20 ms frames at 40 and 60), each for 12 s of the same turns (5 points of
   2.5 s with --quick), while the MAIN thread is loaded: every 100 ms it parses a JSON
   document for a time drawn from 5-30 ms (``GilLoad``; the measured burst lengths are
   printed) in ``json.loads`` (C code that holds the GIL the whole time;
   a pure-Python busy loop would let other threads in every 5 ms,
   sys.getswitchinterval(), and is a milder load). Underruns and underrun time (the
   writer's wall-clock counter), hard silence actually emitted (observed), reply
   latency and barge-in-to-silence at playout, writer CPU. The bench prints the
   smallest 10 ms-frame queue with no underrun AND no observed silence that stays
   clean at every larger size, and the distribution of writer stalls to size the
   margin from (a queue of Q ms rides out a stall of about Q + 10 ms).

The writer's underrun counter is an estimate: it assumes the native queue holds
``queue_ms``, but the observed hand-off -> playout delay is about one frame longer, so
the counter can report a short underrun where the observed audio had none. Observed
hard silence is the ground truth; both are printed.

The bench shares the machine with whatever else runs there: every run records the CPU
other processes used meanwhile (and time stolen by the hypervisor), from /proc/stat,
and the report notes when that (with hypervisor steal) exceeded 0.3 cores. ``--wait-quiet S`` first waits (up
to S seconds) for a quiet machine.

Observed playout
----------------
``rtc.AudioStream.from_track(LocalAudioTrack.create_audio_track(source))`` works
without a room: the native source emits exactly 10 ms every 10 ms to its track sinks
(the WebRTC encoder's input), sample-identical to what was captured, with hard silence
where it ran dry. It is read on its own thread. Arrival times on the Python side lag
by a variable dispatch delay, so the emission clock is fitted as the smallest
``arrival - sample_index / rate`` within +-1 s of each event (the dispatch delay is
>= 0; drift over a run is < 1 ms). "Playout" therefore means "left the AudioSource for
the encoder"; Opus framing (20 ms), the network and the listener's jitter buffer come
on top and are the same for both designs (the end-to-end bench with a real room comes
later). The estimated figures come from wall-clock bookkeeping only; both are printed
so the estimate can be judged against the observation.

Limits: one process on this machine; the writer thread shares the GIL with the bench
(which polls reply stats every 2 ms and reads the tap); the observed reply onset and
silence are where the reply tone crosses 0.2 of full scale (the bed stays below 0.09),
which is within about 1 ms of the true first/last sample of a 5 ms fade.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import math
import os
import random
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np

from mixer import DEFAULT_QUEUE_MS, SAMPLE_RATE, Mixer, MixerCore, MixerSettings

RATE = SAMPLE_RATE
BED_LOOP_S = 6.0
BED_PEAK = 0.3  # noise peak in the bed "file"; the mixer's ambient volume (0.3) scales it to 0.09
REPLY_AMP = 0.5
REPLY_HZ = 440.0
REPLY_S = 2.0
THRESH = int(0.2 * 32767)  # |sample| above this is reply audio (the bed never exceeds 0.09)
ZERO_RUN = 24  # >= 1 ms of exact zeros = hard silence inserted by the source
SEG = 1200  # 50 ms stretch of bed located by cross-correlation
POLL_S = 0.002


# --- signals -----------------------------------------------------------------------------


def make_bed(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1.0, 1.0, int(BED_LOOP_S * RATE)) * BED_PEAK).astype(np.float32)


def tone(amp: float, seconds: float, hz: float = REPLY_HZ) -> np.ndarray:
    n = np.arange(int(seconds * RATE))
    return (amp * np.cos(2 * np.pi * hz * n / RATE)).astype(np.float32)


def pcm(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


class BedLocator:
    """Finds where a stretch of played-back audio sits in the bed loop."""

    def __init__(self, bed: np.ndarray) -> None:
        self.n = len(bed)
        self.spec = np.fft.rfft(bed.astype(np.float64))

    def locate(self, seg: np.ndarray) -> int | None:
        x = np.zeros(self.n)
        x[: len(seg)] = seg
        corr = np.fft.irfft(self.spec * np.conj(np.fft.rfft(x)), self.n)
        p = int(np.argmax(corr))
        if corr[p] < 8 * float(np.std(corr)):  # no clear peak: not (only) bed
            return None
        return p


# --- statistics and tables ----------------------------------------------------------------


def stats(xs: list[float | None]) -> dict[str, Any] | None:
    v = [float(x) for x in xs if x is not None and math.isfinite(x)]
    if not v:
        return None
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def fmt_num(x: float, digits: int | None = None) -> str:
    if digits is None:
        a = abs(x)
        digits = 0 if a >= 100 else 1 if a >= 10 else 2 if a >= 0.1 else 3
        if x == 0:
            digits = 0
    return f"{x:.{digits}f}"


def fmt_stats(s: dict[str, Any] | None, digits: int | None = None) -> str:
    if s is None:
        return "n/a"
    return f"{fmt_num(s['median'], digits)} ({fmt_num(s['min'], digits)}-{fmt_num(s['max'], digits)})"


def fmt_ratio(naive: dict[str, Any] | None, ours: dict[str, Any] | None) -> str:
    if naive is None or ours is None:
        return "n/a"
    a, b = naive["median"], ours["median"]
    if b == 0:
        return "n/a (ours 0)" if a != 0 else "1 (both 0)"
    return f"{a / b:.2f}x" if a / b < 10 else f"{a / b:.0f}x"


def table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    right = right if right is not None else set(range(1, len(headers)))
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(cells).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


# --- 1. core cost --------------------------------------------------------------------------


def bench_core(bed: np.ndarray, batches: int, frames: int) -> dict[str, Any]:
    n = RATE // 100
    batch_samples = frames * n
    reply_soft = pcm(tone(REPLY_AMP, batch_samples / RATE))
    reply_loud = pcm(tone(0.95, batch_samples / RATE))
    cue = tone(0.5, batch_samples / RATE + 0.5, hz=880.0)
    out: dict[str, Any] = {}
    scenarios = [
        ("silence only", "silence"),
        ("bed only", "bed"),
        ("bed + reply", "reply"),
        ("bed + loud reply + cue, limiter on", "loud"),
    ]
    for label, kind in scenarios:
        core = MixerCore(MixerSettings(frame_ms=10))
        if kind != "silence":
            core.set_bed("bed", bed, fade_ms=0)
        per_frame_us: list[float] = []
        limited = 0
        for b in range(batches + 1):  # batch 0 warms up (ramps, ducker, caches)
            if kind == "reply":
                core.push_reply(f"r{b}", reply_soft)
            elif kind == "loud":
                core.push_reply(f"r{b}", reply_loud)
                core.voices = [v for v in core.voices if v.kind != "cue"]
                core.play_cue("cue", cue, 0.5)
            lim0 = core.limiter.active_samples
            t = time.perf_counter()
            for _ in range(frames):
                core.next_frame()
            dt = time.perf_counter() - t
            if b:
                per_frame_us.append(dt / frames * 1e6)
                limited += core.limiter.active_samples - lim0
        s = stats(per_frame_us)
        out[label] = {
            "us_per_frame": per_frame_us,
            "stats": s,
            "pct_real_time": {k: s[k] / 10000 * 100 for k in ("median", "min", "max")},
            "limiter_active_fraction": limited / (batches * batch_samples),
        }
    return out


# --- helpers around a running Mixer -----------------------------------------------------


class Tap:
    """Reads back what our AudioSource emits, through a LocalAudioTrack + AudioStream,
    on its own thread and event loop (no room involved)."""

    def __init__(self, source: Any) -> None:
        from livekit import rtc

        self._rtc = rtc
        self.track = rtc.LocalAudioTrack.create_audio_track("bench-tap", source)
        self.arrivals: list[float] = []
        self.chunks: list[np.ndarray] = []
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stream: Any = None
        self._thread = threading.Thread(target=self._main, name="bench-tap", daemon=True)
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("tap did not start")

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def run() -> None:
            self._stream = self._rtc.AudioStream.from_track(
                track=self.track, sample_rate=RATE, num_channels=1, frame_size_ms=10, loop=loop
            )
            self._ready.set()
            async for ev in self._stream:
                self.arrivals.append(time.monotonic())
                self.chunks.append(np.frombuffer(ev.frame.data, dtype=np.int16).copy())

        try:
            loop.run_until_complete(run())
        finally:
            loop.close()

    def stop(self) -> Observed:
        if self._loop is not None and self._stream is not None:
            asyncio.run_coroutine_threadsafe(self._stream.aclose(), self._loop).result(5)
        self._thread.join(5)
        return Observed(self.arrivals, self.chunks)


class Observed:
    """The audio that left the source, with its emission clock fitted to arrivals."""

    def __init__(self, arrivals: list[float], chunks: list[np.ndarray]) -> None:
        self.arr = np.array(arrivals)
        lens = np.array([len(c) for c in chunks])
        self.starts = np.concatenate(([0], np.cumsum(lens)[:-1])) if len(lens) else np.zeros(0)
        self.data = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
        self.offsets = self.arr - self.starts / RATE
        self.t0_global = float(self.offsets.min()) if len(self.offsets) else 0.0
        z = np.concatenate(([0], (self.data == 0).astype(np.int8), [0]))
        d = np.diff(z)
        s, e = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
        keep = (e - s) >= ZERO_RUN
        self.zero_runs = list(zip(s[keep].tolist(), e[keep].tolist()))
        self.loud = np.flatnonzero(np.abs(self.data.astype(np.int32)) > THRESH)

    def t0_near(self, t: float, half: float = 1.0) -> float:
        i0, i1 = np.searchsorted(self.arr, t - half), np.searchsorted(self.arr, t + half)
        if i1 - i0 < 20:
            return self.t0_global
        return float(self.offsets[i0:i1].min())

    def time_of(self, s: int) -> float:
        return self.t0_near(self.t0_global + s / RATE) + s / RATE

    def sample_at(self, t: float) -> int:
        return max(0, round((t - self.t0_near(t)) * RATE))

    def zeros_between(self, a: int, b: int) -> int:
        return sum(max(0, min(e, b) - max(s, a)) for s, e in self.zero_runs)

    def first_loud(self, a: int, b: int) -> int | None:
        i = np.searchsorted(self.loud, a)
        return int(self.loud[i]) if i < len(self.loud) and self.loud[i] < b else None

    def last_loud(self, a: int, b: int) -> int | None:
        i = np.searchsorted(self.loud, b) - 1
        return int(self.loud[i]) if i >= 0 and self.loud[i] >= a else None

    def clear_stretch(self, start: int) -> int:
        """First index >= start from which SEG samples contain no hard silence."""
        moved = True
        while moved:
            moved = False
            for s, e in self.zero_runs:
                if s < start + SEG and e > start:
                    start, moved = e + 48, True
        return start


@dataclass
class Probe:
    """Instruments a running Mixer's source: every frame handed over (with the
    writer's estimate of when it plays), every capture return, every clear_queue()."""

    mixer: Mixer
    keep_frames: bool = True
    handed: list[tuple[float, float, np.ndarray]] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)
    clears: list[float] = field(default_factory=list)

    def install(self) -> None:
        source = self.mixer.source
        orig_capture, orig_clear = source.capture_frame, source.clear_queue
        mixer, handed, returns, clears = self.mixer, self.handed, self.returns, self.clears
        keep = self.keep_frames

        async def capture_frame(frame: Any) -> None:
            if keep:
                handed.append((time.monotonic(), mixer._handed_until, np.frombuffer(frame.data, dtype=np.int16).copy()))
            await orig_capture(frame)
            returns.append(time.monotonic())

        def clear_queue() -> None:
            clears.append(time.monotonic())
            orig_clear()

        source.capture_frame = capture_frame
        source.clear_queue = clear_queue

    def max_gap_ms(self, t0: float, t1: float) -> float | None:
        """The writer's longest stall: the longest interval between two capture returns
        beyond its regular one (a batch)."""
        r = [t for t in self.returns if t0 <= t <= t1]
        if len(r) < 2:
            return None
        return max(0.0, float(np.max(np.diff(r))) * 1000 - getattr(self.mixer, "batch_ms", 10))


async def wait_stats(mixer: Mixer, reply_id: str, attr: str, timeout: float) -> Any:
    """The reply's stats once ``attr`` (a timestamp) is set."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = mixer.reply_stats(reply_id)
        if st is not None and getattr(st, attr) is not None:
            return st
        await asyncio.sleep(POLL_S)
    raise TimeoutError(f"reply {reply_id}: {attr} not reached in {timeout} s")


async def sleep_until(t: float) -> None:
    d = t - time.monotonic()
    if d > 0:
        await asyncio.sleep(d)


# --- 2. writer CPU --------------------------------------------------------------------------


def cpu_now() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class MachineLoad:
    """CPU used on this machine by OTHER processes (and stolen by the hypervisor)
    while a run lasts, in cores, from /proc/stat: the bench shares the machine."""

    def __init__(self) -> None:
        self.t, self.own, self.busy, self.steal = time.monotonic(), cpu_now(), *self._stat()

    @staticmethod
    def _stat() -> tuple[float, float]:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return math.nan, math.nan
        hz = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq, steal = (v + [0] * 8)[:8]
        return (user + nice + system + irq + softirq) / hz, steal / hz

    def done(self) -> dict[str, float]:
        busy, steal = self._stat()
        wall = time.monotonic() - self.t
        return {"other_cores": max(0.0, (busy - self.busy) - (cpu_now() - self.own)) / wall,
                "steal_cores": (steal - self.steal) / wall}


def _captures(mixer: Any) -> int:
    """capture_frame calls the writer made so far: hand-overs and re-mixes."""
    return sum(getattr(mixer, k, 0) for k in ("hand_overs", "fills", "flushes", "voice_fills"))


async def run_cpu(design: str, mixer_kw: dict[str, Any], bed: np.ndarray, seconds: float) -> dict[str, Any]:
    mixer = Mixer(MixerSettings(), **mixer_kw)
    mixer.start()
    probe = Probe(mixer, keep_frames=False)
    probe.install()
    mixer.set_bed("bed", bed, fade_ms=20)
    reply = pcm(tone(REPLY_AMP, 1.0))
    frame_s = mixer.core.frame / RATE
    await asyncio.sleep(0.5)  # warm-up: the naive source fills its 1 s queue here
    c = mixer.core.counters
    u0, ums0 = c.underruns, c.underrun_ms
    machine = MachineLoad()
    prev = (time.monotonic(), mixer.writer_cpu_s, cpu_now(), c.frames)
    t_start, captures0 = prev[0], _captures(mixer)
    windows: list[dict[str, float | None]] = []
    for i in range(int(seconds)):
        if i % 2 == 0:
            mixer.push_reply(f"cpu{i}", reply)
        await sleep_until(prev[0] + 1.0)
        cur = (time.monotonic(), mixer.writer_cpu_s, cpu_now(), c.frames)
        audio_min = (cur[3] - prev[3]) * frame_s / 60
        windows.append({
            "writer_cpu_s_per_min": (cur[1] - prev[1]) / audio_min if audio_min else None,
            "process_cpu_s_per_min": (cur[2] - prev[2]) / audio_min if audio_min else None,
            "max_capture_gap_ms": probe.max_gap_ms(prev[0], cur[0]),
        })
        prev = cur
    result = {
        "design": design,
        "windows": windows,
        "captures_per_s": (_captures(mixer) - captures0) / (time.monotonic() - t_start),
        "underruns": c.underruns - u0,
        "underrun_ms": c.underrun_ms - ums0,
        "machine": machine.done(),
        "writer_priority": getattr(mixer, "priority", "?"),
    }
    await mixer.aclose()
    return result


# --- 3 + 4. turns: reply latency and barge-in ------------------------------------------------


def parse_burst(doc: str) -> float:
    """One burst of main-thread load: json.loads (C code, holds the GIL throughout),
    result freed inside the burst; the cyclic GC is held off so bursts keep their size."""
    gc.disable()
    try:
        t = time.perf_counter()
        obj = json.loads(doc)
        del obj
        return time.perf_counter() - t
    finally:
        gc.enable()


class GilLoad:
    """Main-thread load: every 100 ms, one json.loads of a document (a list of small
    event objects) sized so the parse takes a target drawn uniformly from 5-30 ms.
    Documents come in 2.5 ms steps calibrated on an idle thread; the parse runs
    slower next to the writer and tap threads, so the choice follows the recent
    measured/nominal ratio to keep the GIL-holding time itself on target."""

    def __init__(self, seed: int, lo_ms: float = 5.0, hi_ms: float = 30.0) -> None:
        self.rng = random.Random(seed)
        self.lo, self.hi = lo_ms, hi_ms
        item = {"type": "transcript.partial", "item_id": "item_0123456789", "text": "okay, let me check that for you",
                "confidence": 0.93, "final": False, "words": [1, 2, 3]}
        probe = json.dumps([item] * 20000)
        per_item_ms = statistics.median(parse_burst(probe) for _ in range(5)) * 1000 / 20000
        self.docs = [(ms, json.dumps([item] * max(1, int(ms / per_item_ms)))) for ms in np.arange(2.5, 45.1, 2.5)]
        self.ratios: collections.deque[float] = collections.deque(maxlen=20)

    def burst(self) -> tuple[float, float]:
        """One burst; returns (target ms, measured ms)."""
        target = self.rng.uniform(self.lo, self.hi)
        k = statistics.median(self.ratios) if self.ratios else 1.0
        nominal, doc = min(self.docs, key=lambda d: abs(d[0] * k - target))
        took = parse_burst(doc) * 1000
        self.ratios.append(took / nominal)
        return target, took


async def load_task(load: GilLoad, bursts: list[float], stop: asyncio.Event) -> None:
    nxt = time.monotonic()
    while not stop.is_set():
        nxt += 0.1
        await sleep_until(nxt)
        bursts.append(load.burst()[1])


async def run_turns(
    label: str,
    bed: np.ndarray,
    locator: BedLocator,
    rng: random.Random,
    *,
    queue_ms: int = DEFAULT_QUEUE_MS,
    frame_ms: int = 10,
    naive: bool = False,
    turns: int | None = None,
    seconds: float | None = None,
    load: GilLoad | None = None,
) -> dict[str, Any]:
    mixer = Mixer(MixerSettings(frame_ms=frame_ms), queue_ms=queue_ms, clear_queue_on_barge_in=naive)
    source = mixer.start()
    probe = Probe(mixer)
    probe.install()
    tap = Tap(source)
    mixer.set_bed("bed", bed, fade_ms=20)
    reply = pcm(tone(REPLY_AMP, REPLY_S))
    frame_s = frame_ms / 1000
    await asyncio.sleep(0.5 if naive or queue_ms > 200 else 0.3)  # warm-up (fills the queue)

    bursts: list[float] = []
    stop_load = asyncio.Event()
    loader = asyncio.create_task(load_task(load, bursts, stop_load)) if load is not None else None

    c = mixer.core.counters
    u0, ums0 = c.underruns, c.underrun_ms
    machine = MachineLoad()
    t_start = time.monotonic()
    cpu0, frames0 = mixer.writer_cpu_s, c.frames
    live: list[dict[str, Any]] = []
    i = 0
    # the longest a turn can take; a timed run starts no turn it cannot finish
    longest_turn = 0.25 + 0.6 + 0.2 + (2 * queue_ms / 1000 if not naive else queue_ms / 1000) + 0.05
    try:
        while (turns is not None and i < turns) or (
            seconds is not None and (i == 0 or time.monotonic() - t_start + longest_turn <= seconds)
        ):
            t_turn = time.monotonic()
            await asyncio.sleep(rng.uniform(0.12, 0.25))  # random phase against the frame clock
            rid = f"{label}-{i}"
            mixer.push_reply(rid, reply)
            st = await wait_stats(mixer, rid, "first_played_at", 5 + queue_ms / 1000)
            heard = st.first_played_at + queue_ms / 1000  # when it starts to play out (roughly)
            await sleep_until(heard + rng.uniform(0.1, 0.6))
            mixer.interrupt(rid)
            st = await wait_stats(mixer, rid, "silent_at", 5)
            await asyncio.sleep(0.15 + (0.03 if naive else queue_ms / 1000 + 0.03))
            live.append({"rid": rid, "t_turn": t_turn, "received": st.first_received_at, "handed": st.first_played_at,
                         "interrupted": st.interrupted_at, "silent": st.silent_at, "t_end": time.monotonic()})
            i += 1
    finally:
        if loader is not None:
            stop_load.set()
            await loader
    t_stop = time.monotonic()
    load_on_machine = machine.done()
    audio_min = (c.frames - frames0) * frame_s / 60
    writer_cpu = (mixer.writer_cpu_s - cpu0) / audio_min if audio_min else None
    underruns, underrun_ms = c.underruns - u0, c.underrun_ms - ums0
    cleared = list(mixer.cleared_ms)
    obs = tap.stop()
    await mixer.aclose()

    # -- analysis, after the run --
    # Every clear_queue() (flushes and fills call it too); the naive design's, with what
    # they threw away (Mixer.cleared_ms, one per clear: a naive mixer neither flushes nor fills).
    clears = list(zip(probe.clears, cleared)) if naive else [(t, 0.0) for t in probe.clears]
    handed_t = np.array([h[0] for h in probe.handed])
    out_turns = []
    for t in live:
        r: dict[str, Any] = {"rid": t["rid"]}
        rec, t_int, t_end = t["received"], t["interrupted"], t["t_end"]
        r["handed_ms"] = (t["handed"] - rec) * 1000
        r["silent_handed_ms"] = (t["silent"] - t_int) * 1000
        # estimated playout from the writer's bookkeeping
        lo, hi = np.searchsorted(handed_t, rec), np.searchsorted(handed_t, t_end)
        clear_t = next((ct for ct, _ in clears if t_int <= ct <= t_end), None)
        r["cleared_ms"] = next((ms for ct, ms in clears if t_int <= ct <= t_end), 0.0)  # 0: nothing cleared
        est_start = est_silence = None
        for k in range(lo, hi):
            t_call, until, x = probe.handed[k]
            loud = np.flatnonzero(np.abs(x.astype(np.int32)) > THRESH)
            if not len(loud):
                continue
            play0 = until - len(x) / RATE  # until: when the queue runs out after this hand-over
            if est_start is None:
                est_start = play0 + loud[0] / RATE
            t_last = play0 + (loud[-1] + 1) / RATE
            if clear_t is not None and t_call < clear_t:
                t_last = min(t_last, clear_t)  # still queued when the queue was cleared
            est_silence = t_last if est_silence is None else max(est_silence, t_last)
        r["queue_at_handoff_ms"] = None if est_start is None else (est_start - t["handed"]) * 1000
        r["est_play_ms"] = None if est_start is None else (est_start - rec) * 1000
        r["est_silence_ms"] = None if est_silence is None else (est_silence - t_int) * 1000
        # observed on our own track
        s_rec, s_end = obs.sample_at(rec) - 480, obs.sample_at(t_end)
        onset = obs.first_loud(s_rec, s_end)
        last = obs.last_loud(onset, s_end) if onset is not None else None
        r["obs_play_ms"] = None if onset is None else (obs.time_of(onset) - rec) * 1000
        r["obs_silence_ms"] = None if last is None else (obs.time_of(last + 1) - t_int) * 1000
        r["bed_lost_obs_ms"] = r["dropout_obs_ms"] = None
        if onset is not None and last is not None and onset - SEG - 240 >= 0:
            a = onset - SEG - 240
            b = obs.clear_stretch(last + 1 + 360)
            if b + SEG <= len(obs.data):
                pa, pb = locator.locate(obs.data[a : a + SEG]), locator.locate(obs.data[b : b + SEG])
                zeros = obs.zeros_between(a, b)
                r["dropout_obs_ms"] = obs.zeros_between(obs.sample_at(t_int), b) * 1000 / RATE
                if pa is not None and pb is not None:
                    lost = (pb - pa) - ((b - a) - zeros)
                    lost = (lost + locator.n // 2) % locator.n - locator.n // 2
                    r["bed_lost_obs_ms"] = lost * 1000 / RATE
        r["max_capture_gap_ms"] = probe.max_gap_ms(t["t_turn"], t_end)
        out_turns.append(r)

    s0, s1 = obs.sample_at(t_start), obs.sample_at(t_stop)
    return {
        "label": label,
        "queue_ms": queue_ms,
        "frame_ms": frame_ms,
        "naive": naive,
        "seconds": t_stop - t_start,
        "turns": out_turns,
        "underruns": underruns,
        "underrun_ms": underrun_ms,
        "obs_silence_ms": obs.zeros_between(s0, s1) * 1000 / RATE,
        "load_bursts_ms": bursts,
        "load_duty": (sum(bursts) / 1000 / (t_stop - t_start)) if bursts else 0.0,
        "machine": load_on_machine,
        "writer_cpu_s_per_min": writer_cpu,
        "writer_priority": getattr(mixer, "priority", "?"),
    }


def col(run: dict[str, Any], key: str) -> dict[str, Any] | None:
    return stats([t[key] for t in run["turns"]])


# --- 6. a late API: the reply cushion -----------------------------------------------------


async def run_late(bed: np.ndarray, rng: random.Random, cushion_ms: float, gap_ms: float, reps: int,
                   first_ms: float = 40.0, cushion_max_ms: float | None = None) -> dict[str, Any]:
    """Replies whose first chunk (first_ms) is followed by the rest only gap_ms after it
    was due (a late API; gap 0: the rest comes right behind it, a burst), with the reply
    cushion starting at cushion_ms and adapting up to cushion_max_ms (None: fixed).
    Observed: first chunk received -> first sample out; holes inside the reply (stretches
    > 2 ms without a loud sample of the 440 Hz tone)."""
    top = cushion_ms if cushion_max_ms is None else cushion_max_ms
    mixer = Mixer(MixerSettings(reply_cushion_ms=cushion_ms, reply_cushion_max_ms=top))
    source = mixer.start()
    tap = Tap(source)
    mixer.set_bed("bed", bed, fade_ms=20)
    reply = tone(REPLY_AMP, 1.0)
    first = int(first_ms * RATE / 1000)
    await asyncio.sleep(0.3)
    sent: list[float] = []
    for i in range(reps):
        await asyncio.sleep(rng.uniform(0.1, 0.2))
        t_rec = time.monotonic()
        mixer.push_reply(f"late{i}", pcm(reply[:first]))
        await sleep_until(t_rec + (first_ms + gap_ms) / 1000 if gap_ms else t_rec + 0.005)
        mixer.push_reply(f"late{i}", pcm(reply[first:]))
        sent.append(t_rec)
        await asyncio.sleep(1.25)
    obs = tap.stop()
    await mixer.aclose()
    out = []
    for t_rec in sent:
        s0, s1 = obs.sample_at(t_rec) - 480, obs.sample_at(t_rec + 1.3)
        onset = obs.first_loud(s0, s1)
        if onset is None:
            out.append({"latency_ms": None, "holes_ms": None})
            continue
        last = obs.last_loud(onset, s1)
        loud = obs.loud[(obs.loud >= onset) & (obs.loud <= last)]
        gaps = np.diff(loud)
        holes = gaps[gaps > RATE * 2 // 1000]
        out.append({"latency_ms": (obs.time_of(onset) - t_rec) * 1000, "holes_ms": float(holes.sum()) * 1000 / RATE,
                    "zeros_ms": obs.zeros_between(onset, last) * 1000 / RATE})
    return {"cushion_ms": cushion_ms, "cushion_max_ms": top, "gap_ms": gap_ms, "first_ms": first_ms, "replies": out,
            "cushion_end_ms": mixer.core.cushion_ms}


# --- main ----------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    turns = args.turns if args.turns is not None else (4 if quick else 20)
    cpu_s = args.cpu_seconds if args.cpu_seconds is not None else (2 if quick else 8)
    sweep_s = args.sweep_seconds if args.sweep_seconds is not None else (2.5 if quick else 12.0)
    sweep = [(20, 10), (40, 10), (100, 10), (200, 10), (40, 20)] if quick else \
        [(20, 10), (30, 10), (40, 10), (60, 10), (100, 10), (200, 10), (1000, 10), (40, 20), (60, 20)]
    rng = random.Random(args.seed)
    bed = make_bed(args.seed)
    locator = BedLocator(bed)
    designs = {"ours": {}, "naive": {"queue_ms": 1000, "clear_queue_on_barge_in": True}}
    results: dict[str, Any] = {"seed": args.seed, "quick": quick, "turns": turns}
    t_all = time.monotonic()

    def progress(msg: str) -> None:
        print(f"[{time.monotonic() - t_all:5.1f}s] {msg}", file=sys.stderr, flush=True)

    progress("1/6 core cost per frame")
    results["core"] = bench_core(bed, batches=10 if quick else 30, frames=200 if quick else 500)

    progress(f"2/6 writer CPU ({cpu_s:.0f} s per design and batch size)")
    results["cpu"] = {name: await run_cpu(name, kw, bed, cpu_s) for name, kw in designs.items()}
    results["cpu_batches"] = {b: await run_cpu(f"batch {b}", {"batch_ms": b}, bed, cpu_s) for b in (10, 100, 400)}

    progress(f"3-4/6 reply latency and barge-in ({turns} turns per design)")
    results["turns_runs"] = {
        "ours": await run_turns("ours", bed, locator, rng, turns=turns),
        "naive": await run_turns("naive", bed, locator, rng, queue_ms=1000, naive=True, turns=turns),
    }

    progress(f"5/6 queue sweep under main-thread load ({len(sweep)} configs x {sweep_s:.0f} s)")
    load = GilLoad(args.seed)
    results["sweep"] = []
    for q, f in sweep:
        progress(f"    queue {q} ms, frame {f} ms")
        results["sweep"].append(await run_turns(f"q{q}f{f}", bed, locator, rng, queue_ms=q, frame_ms=f,
                                                seconds=sweep_s, load=load))
    late_reps = 3 if quick else 8
    progress(f"6/6 a late API and the reply cushion ({late_reps} replies per point)")
    results["late"] = [await run_late(bed, rng, cushion, gap, late_reps, cushion_max_ms=top)
                       for gap in (0.0, 80.0) for cushion, top in ((0.0, None), (40.0, None), (80.0, None), (0.0, 60.0))]
    results["elapsed_s"] = time.monotonic() - t_all
    return results


def report(res: dict[str, Any]) -> str:
    out: list[str] = []
    core = res["core"]
    out.append("1. Core cost per frame: MixerCore.next_frame(), 10 ms frames of 24 kHz mono, no thread")
    rows = []
    for label, d in core.items():
        p = d["pct_real_time"]
        lim = f"{d['limiter_active_fraction'] * 100:.0f}%"
        rows.append([label, fmt_stats(d["stats"], 1), f"{p['median']:.2f}% ({p['min']:.2f}-{p['max']:.2f})", lim])
    out.append(table(["scenario", "us/frame median (min-max)", "% of real time", "limiter on"], rows))

    cpu, tr = res["cpu"], res["turns_runs"]

    def cpu_col(name: str, key: str) -> dict[str, Any] | None:
        return stats([w[key] for w in cpu[name]["windows"]])

    def int_stats(v: float) -> dict[str, Any]:
        return {"median": v, "min": v, "max": v, "n": 1}

    rows_spec: list[tuple[str, dict[str, Any] | None, dict[str, Any] | None, bool]] = [
        ("writer thread CPU, s per min of audio", cpu_col("ours", "writer_cpu_s_per_min"), cpu_col("naive", "writer_cpu_s_per_min"), True),
        ("process CPU, s per min of audio", cpu_col("ours", "process_cpu_s_per_min"), cpu_col("naive", "process_cpu_s_per_min"), True),
        ("longest writer stall beyond its batch, ms (per 1 s)", cpu_col("ours", "max_capture_gap_ms"), cpu_col("naive", "max_capture_gap_ms"), True),
        ("reply: received -> first sample handed (a), ms", col(tr["ours"], "handed_ms"), col(tr["naive"], "handed_ms"), True),
        ("reply: source queue depth at hand-off, ms", col(tr["ours"], "queue_at_handoff_ms"), col(tr["naive"], "queue_at_handoff_ms"), True),
        ("reply: received -> playout, estimated (b), ms", col(tr["ours"], "est_play_ms"), col(tr["naive"], "est_play_ms"), True),
        ("reply: received -> playout, OBSERVED, ms", col(tr["ours"], "obs_play_ms"), col(tr["naive"], "obs_play_ms"), True),
        ("barge-in -> last reply sample handed, ms", col(tr["ours"], "silent_handed_ms"), col(tr["naive"], "silent_handed_ms"), True),
        ("barge-in -> silence at playout, estimated, ms", col(tr["ours"], "est_silence_ms"), col(tr["naive"], "est_silence_ms"), True),
        ("barge-in -> silence at playout, OBSERVED, ms", col(tr["ours"], "obs_silence_ms"), col(tr["naive"], "obs_silence_ms"), True),
        ("bed lost per barge-in, Mixer.cleared_ms, ms", col(tr["ours"], "cleared_ms"), col(tr["naive"], "cleared_ms"), True),
        ("bed lost per barge-in, OBSERVED (bed jump), ms", col(tr["ours"], "bed_lost_obs_ms"), col(tr["naive"], "bed_lost_obs_ms"), True),
        ("hard silence per barge-in, OBSERVED, ms", col(tr["ours"], "dropout_obs_ms"), col(tr["naive"], "dropout_obs_ms"), True),
    ]
    rows = [[m, fmt_stats(o), fmt_stats(n), fmt_ratio(n, o)] for m, o, n, _ in rows_spec]
    for label, key in (("underruns (writer counter), count", "underruns"), ("underrun time (writer counter), ms", "underrun_ms")):
        o = cpu["ours"][key] + tr["ours"][key]
        n = cpu["naive"][key] + tr["naive"][key]
        rows.append([label, fmt_num(o), fmt_num(n), fmt_ratio(int_stats(n), int_stats(o))])
    o, n = tr["ours"]["obs_silence_ms"], tr["naive"]["obs_silence_ms"]
    rows.append(["hard silence over the turns run, OBSERVED, ms", fmt_num(o), fmt_num(n), fmt_ratio(int_stats(n), int_stats(o))])
    out.append("")
    out.append(f"2-4. Ours = Mixer() (10 ms frames, {DEFAULT_QUEUE_MS} ms queue, flush + re-render on barge-in) vs naive = Mixer(queue_ms=1000, clear_queue_on_barge_in=True)"
               f"\n     CPU: {len(cpu['ours']['windows'])} x 1 s windows each; turns: {len(tr['ours']['turns'])} ours, "
               f"{len(tr['naive']['turns'])} naive; median (min-max)")
    out.append(table(["metric", "ours", "naive", "naive/ours"], rows))

    def other(*runs: dict[str, Any]) -> str:
        o = max(r["machine"]["other_cores"] for r in runs)
        st = max(r["machine"]["steal_cores"] for r in runs)
        return f"{o:.2f} cores" + (f" (+{st:.2f} stolen)" if st >= 0.01 else "")

    prio = sorted({r.get("writer_priority", "?") for r in [*cpu.values(), *tr.values(), *res["sweep"]]})
    out.append(f"     writer thread scheduling: {', '.join(prio)}")
    out.append(f"     other processes on this machine meanwhile (worst run): ours {other(cpu['ours'], tr['ours'])}, "
               f"naive {other(cpu['naive'], tr['naive'])}, of {os.cpu_count()} cores")

    out.append("")
    sw = res["sweep"]
    duty = stats([r["load_duty"] * 100 for r in sw])
    all_bursts = [b for r in sw for b in r["load_bursts_ms"]]
    bursts = stats(all_bursts)
    p95 = float(np.percentile(all_bursts, 95)) if all_bursts else math.nan
    out.append("5. Queue sweep (ours), main thread loaded with json.loads bursts holding the GIL every 100 ms"
               f"\n   (burst {fmt_stats(bursts, 1)} ms, p95 {p95:.0f} ms; duty {fmt_stats(duty, 0)}%); "
               "median (min-max) over turns")
    rows = []
    for r in sw:
        rows.append([
            f"{r['queue_ms']}", f"{r['frame_ms']}", f"{len(r['turns'])}", f"{r['underruns']}", fmt_num(r["underrun_ms"], 0),
            fmt_num(r["obs_silence_ms"], 0), fmt_stats(col(r, "est_play_ms"), 0), fmt_stats(col(r, "obs_play_ms"), 0),
            fmt_stats(col(r, "est_silence_ms"), 0), fmt_stats(col(r, "obs_silence_ms"), 0),
            fmt_stats(col(r, "max_capture_gap_ms"), 0), fmt_num(r["writer_cpu_s_per_min"], 1),
            f"{r['machine']['other_cores']:.2f}/{r['machine']['steal_cores']:.2f}",
        ])
    out.append(table(["queue ms", "frame ms", "turns", "underruns", "underrun ms", "silence obs ms",
                      "reply->play est", "reply->play OBS", "barge->silence est", "barge->silence OBS",
                      "max writer stall", "writer CPU s/min", "other/steal cores"], rows))

    ten = {r["queue_ms"]: r for r in sw if r["frame_ms"] == 10}
    clean = sorted(q for q, r in ten.items() if r["underruns"] == 0 and r["obs_silence_ms"] == 0)
    out.append("")
    dirty = sorted(q for q in ten if q not in clean)
    out.append(f"10 ms frames under load: clean (no underrun, no observed silence) at {', '.join(map(str, clean)) or 'none'} ms"
               f"; not clean at {', '.join(map(str, dirty)) or 'none'} ms.")
    # the smallest queue that ran clean and stays clean at every larger size up to the default
    smallest = next((q for q in clean if all(c in clean for c in ten if q < c <= DEFAULT_QUEUE_MS)), None)
    if smallest is None or smallest > DEFAULT_QUEUE_MS:
        out.append(f"The default ({DEFAULT_QUEUE_MS} ms) did not run clean under load in this run: underruns mean the writer "
                   "was starved (see 'other/steal cores'); observed silence without underruns is most likely a barge-in "
                   "flush that missed the output's queue by a frame (its depth is estimated from the writer's clock).")
    else:
        out.append(f"Smallest 10 ms-frame queue that ran clean under load, as did every larger size up to the default "
                   f"({DEFAULT_QUEUE_MS} ms): {smallest} ms.")
    gaps = [t["max_capture_gap_ms"] for r in sw for t in r["turns"] if t["max_capture_gap_ms"] is not None]
    if gaps:
        p50, p90, p99 = np.percentile(gaps, [50, 90, 99])
        out.append(f"Writer stalls under load (longest interval between capture returns beyond the batch, per turn, all "
                   "sweep points): "
                   f"p50 {p50:.0f}, p90 {p90:.0f}, p99 {p99:.0f}, max {max(gaps):.0f} ms;\n"
                   f"a queue of Q ms rides out a stall of about Q + 10 ms (the observed depth), so pick the margin from these.")
    busy = [r for r in [*cpu.values(), *tr.values(), *sw] if r["machine"]["other_cores"] + r["machine"]["steal_cores"] > 0.3]
    if busy:
        out.append(f"NOTE: other processes plus hypervisor steal took > 0.3 cores during {len(busy)} of "
                   f"{len(cpu) + len(tr) + len(sw)} runs (see 'other/steal cores' and the JSON): some underruns and stalls there "
                   "may come from the machine, not the mixer (--wait-quiet waits for other processes, not for steal).")
    if res.get("cpu_batches"):
        out.append("")
        out.append("2b. Batch size (ours; batch = audio mixed and handed to the source per capture_frame call): "
                   "CPU s per min of audio")
        rows = []
        for b, run in res["cpu_batches"].items():
            w = stats([x["writer_cpu_s_per_min"] for x in run["windows"]])
            pr = stats([x["process_cpu_s_per_min"] for x in run["windows"]])
            rate = run.get("captures_per_s")
            rows.append([f"{b} ms", f"{rate:.1f}" if rate is not None else "?", fmt_stats(w), fmt_stats(pr),
                         f"{run['underruns']}"])
        out.append(table(["batch", "captures/s", "writer thread", "whole process", "underruns"], rows))
    if res.get("late"):
        out.append("")
        out.append("6. A late API: the reply's first chunk (40 ms), then the rest gap ms after it was due; "
                   "with the reply cushion (MixerSettings.reply_cushion_ms, fixed or adapting up to "
                   "reply_cushion_max_ms; the default is a fixed 0)")
        rows = []
        for run in res["late"]:
            rs = run["replies"]
            top = run.get("cushion_max_ms", run["cushion_ms"])
            cushion = f"{run['cushion_ms']:.0f}" if top == run["cushion_ms"] else \
                f"{run['cushion_ms']:.0f}->{top:.0f} (ended {run.get('cushion_end_ms', 0):.0f})"
            rows.append([f"{run['gap_ms']:.0f}", cushion,
                         fmt_stats(stats([r["latency_ms"] for r in rs]), 0),
                         fmt_stats(stats([r["holes_ms"] for r in rs]), 0),
                         fmt_stats(stats([r.get("zeros_ms") for r in rs]), 0)])
        out.append(table(["gap ms", "cushion ms", "chunk in -> out, ms", "holes in the reply, ms",
                          "hard silence, ms"], rows))
    out.append(f"(seed {res['seed']}, {res['elapsed_s']:.0f} s)")
    return "\n".join(out)


def wait_quiet(limit_s: float, max_other_cores: float = 0.3) -> None:
    """Wait (up to limit_s) until other processes use less than max_other_cores."""
    end = time.monotonic() + limit_s
    while True:
        m = MachineLoad()
        time.sleep(3)
        other = m.done()["other_cores"]
        if other < max_other_cores or time.monotonic() >= end:
            print(f"other processes use {other:.2f} cores; starting", file=sys.stderr, flush=True)
            return
        print(f"other processes use {other:.2f} cores; waiting for a quieter machine", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=None, help="turns per design for latency/barge-in (default 20; 4 with --quick)")
    ap.add_argument("--quick", action="store_true", help="a ~30 s smoke run: fewer turns, shorter runs, 4 sweep points")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", metavar="PATH", help="write the raw numbers here")
    ap.add_argument("--cpu-seconds", type=float, default=None, help="length of each CPU run (default 8; 2 with --quick)")
    ap.add_argument("--sweep-seconds", type=float, default=None, help="length of each sweep point (default 12; 2.5 with --quick)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="first wait up to S seconds until other processes use < 0.3 cores")
    args = ap.parse_args()
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet)
    res = asyncio.run(main_async(args))
    print(report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=float)


if __name__ == "__main__":
    main()
    # Skip the interpreter's teardown of the LiveKit native library: it can abort on the way
    # out ("panic in a function that cannot unwind"), after the results, with exit 134.
    import exits

    exits.exit_now(0)
