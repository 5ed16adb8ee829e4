#!/usr/bin/env python3
"""End-to-end benchmark: the worker in a real LiveKit room, as a user hears it.

    python bench/e2e_bench.py [--quick] [--turns N] [--seed S] [--json PATH]
    ./scripts/bench            # both benches, in their own network namespace (preferred)

Real parts only: the local livekit-server (``.tools/bin/server``), ``python worker.py`` as
a subprocess configured through its environment, the Voice Agent API stand-in
(``standin.py``), and Python-SDK participants (``tests/harness.py:RoomUser``) who
speak into a real-time microphone and record what they hear with arrival times. Every
time is ``time.monotonic()`` in this process: the stand-in's records and the listener's
arrival times share one clock. A user joins once its worker has logged "ready: in room".

Designs, back to back in the same run (the order reversed every other round), each in
fresh rooms with fresh processes:

* **ours**    = the worker's defaults (the output queue the worker reports in its log).
* **minimal** = ``bench/minimal_bridge.py``: no mixer, no bed; each reply chunk captured
  straight into an ``AudioSource`` with the SDK's default 1000 ms queue, ``clear_queue()``
  on barge-in, written like the provider's tutorial. Every figure of ours is also given
  as a ratio ours/minimal.
* **naive**   = the worker with ``OUTPUT_QUEUE_MS=1000`` and ``BARGE_IN_CLEAR_QUEUE=1``:
  LiveKit's default queue, replies wait behind it, and ``clear_queue()`` on barge-in
  (which also throws away queued bed).
* **ours-normal** = ours with ``AUDIO_PRIORITY=normal``: what real-time scheduling costs.
* **ours-no-bed** = ours with ``AMBIENT_SOUND=none``: what playing the bed costs (the same
  bridge, mixer and writer, with nothing but replies to play, like minimal). Both extra
  designs run in full runs only; ``--designs`` picks any of them.
* **ours-b100** = ours with ``OUTPUT_BATCH_MS=100``: the mixer's batches as they were before
  they grew to 400 ms (what that change bought). Only when ``--designs`` names it.
* **ours-tokio2** = ours with ``TOKIO_WORKER_THREADS=2``: the SDK's runtime with two worker
  threads (tokio's default on a 2-core host), as it ran before the worker set one. Only when
  ``--designs`` names it.

Signals (tones at multiples of 50 Hz, so 20 ms windows hold whole periods): the bed is a
3 s loop of a 300 Hz tone plus seeded noise band-limited to 1.4-4 kHz
(``AMBIENT_TARGET_LUFS=-12``, ``AMBIENT_VOLUME=0.5``); replies the bench triggers are
1000 Hz tones (amplitude 0.5); the stand-in's answer to a user turn is 800 Hz (1000 Hz in
the density runs, where it is the measured reply); the user speaks 450 Hz.

Figures
-------
1. Reply latency: the stand-in sends the first reply chunk (``ReplyRecord.first_audio_at``)
   -> the listener has the first 20 ms window (hop 10 ms) whose 1000 Hz amplitude exceeds
   0.1; the time of a window is the arrival of the 10 ms frame that completes it, so the
   figure carries about +5..20 ms of detection delay, the same for every design.
   1b. The same for a late API (the stand-in's ``first_chunk_ms=40``,
   ``chunk_gap_ms=(1, LATE_GAP_MS)``), and the silence heard inside such a reply: 10 ms
   steps below the threshold between its first and last audible windows.
2. Barge-in to silence: the stand-in decides the user interrupted (``interrupted_at``; the
   user speaks 0.6 s over a 4 s reply, 0.4-1.0 s after they started to hear it) -> the
   first window after which the 1000 Hz amplitude stays below 0.05 (until the next
   triggered reply or 2.5 s). The stand-in decides a random 0-10 ms after the audio that
   triggers it (``barge_in_jitter_ms``): otherwise every barge-in of a session lands at the
   same phase of the bridge's 10 ms clocks (its microphone frames drive the decision), and
   a session's figures differ from another's by up to a tick for that reason alone.
3. Ambient continuity, after the bed first appears: gaps = 20 ms windows (no overlap)
   where the 300 Hz amplitude is below 1/4 of the bed's unducked level (-12 dB; ducking
   under a reply is -6 dB), their number and the longest run; dips = windows below half
   the median of their 3 neighbours on each side (a click, a short dropout). Discontinuities
   = jumps in the bed's position: the noise part is located in the loop by correlation
   every 20 ms (40 ms stretches, 1.4-4 kHz, where no tone lies); a jump is a stretch found
   elsewhere than continuous playback puts it (> 0.5 ms, confirmed by the next stretch). A
   skip (bed audio lost, e.g. ``clear_queue()``) is a jump forward; an insert
   (concealment, silence, the jitter buffer slowing down) a jump back. The listener's
   WebRTC inbound-rtp counters (concealed samples, time-stretching, jitter-buffer delay)
   are read too, to tell the receiving jitter buffer's doing from the sender's. At each
   barge-in: the jumps within [-0.1, +1.5] s and the deepest dip.
4. Worker CPU seconds per minute of conversation (``/proc/<pid>/stat`` utime+stime over the
   turns; 60 = one full core), the share of it on real-time (SCHED_FIFO/RR) threads
   (``/proc/<pid>/task``), and peak RSS (``VmHWM``), per session; underruns from the
   worker's counters (``SIGUSR1`` dumps them at info level) and its ``audio underrun``
   warnings. Also what the server, this process and everything else used meanwhile; CPU
   per thread group (our Python, our audio thread, the SDK's runtimes, WebRTC); and the
   calls a host could hold at HOST_LOAD of its cores at that CPU per call. The CPU ratio
   is also given within each round (paired: the sessions of one round run back to back,
   so the machine's drift between rounds, which moves every design, drops out).
5. Density: 1, 2, 4, 6, 8 rooms at once (1, 2, 4 with --quick), one worker process (ours)
   and one user each; every user holds a conversation (0.5 s utterance, a 0.8 s answer,
   0.6-0.9 s pause) for ~20 s (10 s; one room alone runs 28 s to get ~10 turns). Per
   level: reply latency (user turn answered -> heard, as in 1), underruns, bed gaps and
   discontinuities, listeners' jitter buffers, worker CPU, and what the livekit-server,
   this bench process (all users and stand-ins live here), other processes and the whole
   machine used, plus this process's event-loop lag. The observers (this process and the
   server) are counted apart: the calls per host the workers alone imply are printed. A level "breaks" on underruns, gaps,
   failed or unheard turns, or a latency median > 2x the one-room median; the ramp stops
   after two broken levels in a row.
6. Startup (ours, ``STARTUP_CHECK=1``, ``NOTIFY_SOCKET`` bound here): process start
   (``WorkerProcess.started_at``) -> the key-check session ready at the stand-in, -> the
   agent seen joining by a participant already in the room, -> ``READY=1`` received (joined
   AND key proven), -> first audio heard by that participant.

Priority: the worker raises its audio thread to SCHED_RR 12 (its LiveKit media threads, 10) when it may. By
default (``--bench-priority rt``) this process and the livekit-server it starts run at
SCHED_RR 1, so on a saturated machine the listeners, the stand-ins and the SFU, which would
not share a worker's host in production, are not what starves first, while the worker's
audio thread still preempts them; workers always start at normal policy.
``--bench-priority normal`` runs everything at normal policy.

Every timing figure is a median with [min-max] and n; comparisons are ratios of medians
measured in the same run. The machine is shared: the header shows the CPU count and load
average, and every scenario records the whole machine's busy share (``/proc/stat``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from harness import (
    ASSEMBLYAI_KEY,
    Heard,
    LiveKitServer,
    RoomUser,
    WorkerProcess,
    find_server_binary,
    tone,
    tone_amplitude,
    worker_env,
    write_wav,
)
from harness import (
    SAMPLE_RATE as SR,
)
from standin import StandIn, StandInOptions

BED_HZ, REPLY_HZ, ANSWER_HZ, USER_HZ = 300.0, 1000.0, 800.0, 450.0
NOISE_BAND = (1400.0, 4000.0)
BED_SECONDS = 3.0
REPLY_ON, REPLY_OFF = 0.10, 0.05  # reply tones have amplitude 0.5
GAP_FRACTION = 0.25  # a bed window below this fraction of the bed's level is a gap
LATE_GAP_MS = 80  # the late API's second reply chunk comes this late
WIN, HOP = 480, 240  # 20 ms windows, 10 ms hop (reply onset / silence)
DESIGNS = {
    "ours": {},
    "minimal": {},  # bench/minimal_bridge.py, not the worker: see MinimalBridge
    "naive": {"OUTPUT_QUEUE_MS": "1000", "BARGE_IN_CLEAR_QUEUE": "1"},
    "ours-normal": {"AUDIO_PRIORITY": "normal"},  # what real-time scheduling costs (full runs only)
    "ours-no-bed": {"AMBIENT_SOUND": "none"},  # what playing the bed costs (full runs only)
    "ours-b100": {"OUTPUT_BATCH_MS": "100"},  # batches of 100 ms, as before 400 (on request only)
    "ours-tokio2": {"TOKIO_WORKER_THREADS": "2"},  # the SDK's runtime as before it got one thread (on request only)
}
NO_BED = ("minimal", "ours-no-bed")  # designs whose track carries no bed: no bed figures
QUICK_DESIGNS = ("ours", "minimal", "naive")
ON_REQUEST = ("ours-b100", "ours-tokio2")  # only when --designs names them
HOST_LOAD = 0.8  # a host is "full" at this share of its cores busy (audio needs headroom)
BASELINE = "minimal"  # every figure of ours is also given as a ratio to this design's
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- measuring processes and the machine ---------------------------------------------------


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a process (all its threads), seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def proc_status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def thread_cpu(pid: int) -> dict[int, tuple[str, int, float]]:
    """Per thread of a process: (name, scheduling policy, CPU seconds)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                st = f.read()
        except OSError:
            continue
        name = st[st.index("(") + 1:st.rindex(")")]
        fields = st.rsplit(")", 1)[1].split()
        out[int(tid)] = (name, int(fields[38]), (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def realtime_share(before: dict, after: dict) -> dict[str, Any]:
    """CPU used between two thread_cpu() snapshots, and the part of it on SCHED_FIFO/RR threads."""
    total = rt = 0.0
    names: dict[str, int] = {}
    for tid, (name, policy, cpu) in after.items():
        used = cpu - before.get(tid, (name, policy, 0.0))[2]
        total += used
        if policy in (1, 2):
            rt += used
            names[name] = names.get(name, 0) + 1
    return {"rt_fraction": rt / total if total > 0 else None, "rt_threads": names}


# Threads of a worker, grouped by what they are (comm names; Python names its writer
# thread "mixer-writer", every other Python thread is "python").
THREAD_GROUPS = (
    ("python: event loop and other Python threads", ("python",)),
    ("mixer-writer: our audio thread", ("mixer-writer",)),
    ("tokio-rt-worker: the SDK's Rust runtime", ("tokio-rt-worker",)),
    ("livekit-audio: the SDK's capture runtime", ("livekit-audio",)),
    ("AudioSourceCapt: the native 10 ms output clock", ("AudioSourceCapt",)),
    ("WebRTC encode/transport (AudioEncoderQue, SyntheticAudioD, network, worker, ...)", None),
)


def thread_groups(before: dict, after: dict, seconds: float) -> dict[str, float]:
    """Cores used per thread group between two thread_cpu() snapshots; also every thread
    name on its own under "by_name" (threads that came and went in between are missed)."""
    groups = {label: 0.0 for label, _ in THREAD_GROUPS}
    by_name: dict[str, float] = {}
    for tid, (name, policy, cpu) in after.items():
        used = (cpu - before.get(tid, (name, policy, 0.0))[2]) / seconds
        by_name[name] = by_name.get(name, 0.0) + used
        label = next((lb for lb, names in THREAD_GROUPS if names is not None and name in names),
                     THREAD_GROUPS[-1][0])
        groups[label] += used
    out: dict[str, Any] = {k: round(v, 4) for k, v in groups.items()}
    out["by_name"] = {k: round(v, 4) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1]) if v >= 0.0005}
    return out


class MinimalBridge(WorkerProcess):
    """``bench/minimal_bridge.py`` as a process, configured and logged like the worker."""

    def start(self, *args: str) -> "MinimalBridge":
        WorkerProcess.started.append(self)
        self.workdir.mkdir(parents=True, exist_ok=True)
        base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV") if k in os.environ}
        out = open(self.output_path, "ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "minimal_bridge.py"), *args],
                                     env={**base, **self.env}, cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        return self


class BenchPriority:
    """Optionally run this process's threads (and the livekit-server it starts) at SCHED_RR
    6: above every normal thread and above a worker's event-loop thread (SCHED_RR 5 in its
    default AUDIO_PRIORITY=realtime), so the listeners, the stand-ins and the SFU are not
    the first things a busy machine starves, and below the worker's audio and media threads
    (SCHED_RR 12 and 10), which they never delay. Applied before the LiveKit FFI starts (its
    threads inherit it); workers are always started at normal policy."""

    RT_PRIORITY = 6

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.active = False
        self.note = "normal (SCHED_OTHER)"

    def apply(self) -> None:
        if self.mode != "rt":
            return
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(self.RT_PRIORITY))
            self.active = True
            self.note = (f"SCHED_RR {self.RT_PRIORITY}, and so does the livekit-server it starts (infrastructure that "
                         "shares the machine with the workers only here): above normal threads and the workers' event "
                         "loops (SCHED_RR 5), below their audio and media threads (SCHED_RR 12 and 10)")
        except (OSError, AttributeError) as e:
            self.note = f"normal (SCHED_RR refused: {e})"
            print(f"warning: cannot run the bench at real-time priority ({e}); its listeners may be "
                  "starved by the workers' real-time threads on a busy machine", file=sys.stderr)

    @contextlib.contextmanager
    def normal(self):
        """Around a fork: the child must not inherit our real-time policy."""
        if not self.active:
            yield
            return
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        try:
            yield
        finally:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(self.RT_PRIORITY))


async def inbound_stats(user: RoomUser, identity: str = "voice-agent") -> dict[str, float] | None:
    """The listener's WebRTC inbound-rtp counters for the agent's track (jitter buffer)."""
    p = user.room.remote_participants.get(identity) if user.room else None
    if p is None:
        return None
    for pub in p.track_publications.values():
        if pub.track is None:
            continue
        try:
            for st in await asyncio.wait_for(pub.track.get_stats(), 3):
                if st.WhichOneof("stats") == "inbound_rtp":
                    i, r = st.inbound_rtp.inbound, st.inbound_rtp.received
                    return {"samples": i.total_samples_received, "concealed": i.concealed_samples,
                            "silent_concealed": i.silent_concealed_samples, "concealments": i.concealment_events,
                            "inserted": i.inserted_samples_for_deceleration,
                            "removed": i.removed_samples_for_acceleration, "jb_delay_s": i.jitter_buffer_delay,
                            "jb_emitted": i.jitter_buffer_emitted_count, "lost": r.packets_lost,
                            "packets": r.packets_received}
        except Exception:  # noqa: BLE001 - stats are a diagnosis, never fatal
            return None
    return None


def inbound_delta(a: dict | None, b: dict | None, seconds: float) -> dict[str, float] | None:
    """Jitter-buffer activity between two snapshots, in ms of audio (rate from the sample count)."""
    if not a or not b or seconds <= 0:
        return None
    d = {k: b[k] - a[k] for k in a}
    rate = d["samples"] / seconds if d["samples"] > 0 else 48000.0
    rate = 48000.0 if abs(rate - 48000) < abs(rate - 24000) else 24000.0

    def ms(v: float) -> float:
        return round(v / rate * 1000, 1)

    return {"concealed_ms": ms(d["concealed"]), "silent_concealed_ms": ms(d["silent_concealed"]),
            "concealment_events": d["concealments"], "stretched_ms": ms(d["inserted"]),
            "compressed_ms": ms(d["removed"]), "packets_lost": d["lost"], "packets": d["packets"],
            "jb_delay_ms": round(d["jb_delay_s"] / d["jb_emitted"] * 1000, 1) if d["jb_emitted"] else None}


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


class MachineMeter:
    """Whole-machine CPU use between start and stop, from /proc/stat (all cores)."""

    def __init__(self) -> None:
        self.t0, self.s0 = time.monotonic(), self._read()

    @staticmethod
    def _read() -> list[int]:
        try:
            with open("/proc/stat") as f:
                return [int(v) for v in f.readline().split()[1:]]
        except OSError:
            return []

    def stop(self) -> dict[str, float]:
        s1 = self._read()
        if not self.s0 or not s1:
            return {}
        d = [b - a for a, b in zip(self.s0, s1)]
        total = sum(d[:8]) or 1
        idle = d[3] + d[4]
        steal = d[7] if len(d) > 7 else 0
        ncpu = os.cpu_count() or 1
        return {"busy_cores": round((total - idle - steal) / total * ncpu, 2),
                "steal_cores": round(steal / total * ncpu, 2)}


class LoopLag:
    """Oversleep of a 10 ms sleep in this process's event loop (the listeners' clock)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task | None = None

    def start(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.01)
            self.samples.append((time.monotonic() - t - 0.01) * 1000)

    async def stop(self) -> dict[str, float]:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        s = sorted(self.samples) or [0.0]
        return {"p50_ms": round(s[len(s) // 2], 1), "p99_ms": round(s[min(len(s) - 1, int(len(s) * 0.99))], 1),
                "max_ms": round(s[-1], 1)}


def stats(values: list[float]) -> dict[str, Any]:
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return {"n": 0}
    return {"n": len(v), "median": statistics.median(v), "min": min(v), "max": max(v)}


def git_describe() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=5, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "worker.py", "bridge.py", "mixer.py",
                                "sounds.py", "control.py", "tools.py"], cwd=REPO, capture_output=True, text=True,
                               timeout=5, check=False).stdout.rstrip()
        return rev + (" + uncommitted changes to " + ", ".join(sorted({ln[3:] for ln in dirty.splitlines()}))
                      if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


# --- the bed and what the listener heard -------------------------------------------------------


def make_bed(seed: int) -> np.ndarray:
    """3 s: a 300 Hz tone (gaps) plus periodic noise in 1.4-4 kHz (position in the loop)."""
    n = int(BED_SECONDS * SR)
    rng = np.random.default_rng(seed)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    spec[(f < NOISE_BAND[0]) | (f > NOISE_BAND[1])] = 0
    noise = np.fft.irfft(spec, n)
    noise *= 0.15 / noise.std()
    x = 0.3 * np.sin(2 * np.pi * BED_HZ * np.arange(n) / SR) + noise
    return np.clip(x, -0.99, 0.99)


def worker_loop_of(bed: np.ndarray) -> np.ndarray:
    """The loop the worker plays: files are made seamless at load (sounds.py)."""
    x = (bed * 32767).astype(np.int16).astype(np.float32) / 32768
    try:
        import sounds

        return np.asarray(sounds.make_seamless_loop(x, int(0.25 * SR)), dtype=np.float64)
    except (ImportError, AttributeError, TypeError, ValueError):  # track the raw file (worse at the seam)
        return x.astype(np.float64)


def bandpass(x: np.ndarray, lo: float, hi: float, periodic: bool = False) -> np.ndarray:
    n = len(x)
    size = n if periodic else 1 << max(1, (n - 1).bit_length())
    spec = np.fft.rfft(x, size)
    f = np.fft.rfftfreq(size, 1 / SR)
    spec[(f < lo) | (f > hi)] = 0
    return np.fft.irfft(spec, size)[:n]


class Capture:
    """A snapshot of one ``Heard``: the samples and, per sample, when it arrived here."""

    def __init__(self, heard: Heard) -> None:
        chunks = list(heard.chunks)
        self.t = np.array([t for t, _ in chunks], dtype=np.float64)
        lens = np.array([len(c) for _, c in chunks], dtype=np.int64)
        self.ends = np.cumsum(lens)
        self.x = (np.concatenate([c for _, c in chunks]).astype(np.float32) / 32768) if chunks \
            else np.zeros(0, np.float32)

    def time_of(self, idx: np.ndarray | int) -> np.ndarray:
        i = np.searchsorted(self.ends, idx, side="right")
        return self.t[np.minimum(i, len(self.t) - 1)]

    def tone_track(self, freq: float, win: int = WIN, hop: int = HOP) -> tuple[np.ndarray, np.ndarray]:
        """(time, amplitude) per window, as ``Heard.timeline`` computes it (Hann, one DFT bin)."""
        if len(self.x) < win:
            return np.zeros(0), np.zeros(0)
        frames = np.lib.stride_tricks.sliding_window_view(self.x, win)[::hop]
        w = np.hanning(win)
        ph = 2 * np.pi * freq * np.arange(win) / SR
        re_, im_ = frames @ (w * np.cos(ph)).astype(np.float32), frames @ (w * np.sin(ph)).astype(np.float32)
        amp = 2 * np.hypot(re_, im_) / w.sum()
        times = self.time_of(np.arange(len(frames)) * hop + win - 1)
        return times, amp


class BedTracker:
    """Where in the loop each 40 ms stretch of heard bed comes from (every 20 ms)."""

    N, STEP, SEARCH = 960, 480, 48
    Q_LOCAL, Q_GLOBAL, JUMP = 0.35, 0.5, 12  # correlation thresholds; jumps > 12 samples (0.5 ms)

    def __init__(self, loop: np.ndarray) -> None:
        self.L = len(loop)
        rb = bandpass(loop, *NOISE_BAND, periodic=True)
        self.rb = np.concatenate([rb, rb[: self.N + 2 * self.SEARCH + 8]])
        self.R = np.fft.rfft(rb)

    def _q(self, seg: np.ndarray, pos: int) -> float:
        r = self.rb[pos:pos + self.N]
        d = math.sqrt(float(seg @ seg) * float(r @ r))
        return float(seg @ r) / d if d > 0 else 0.0

    def _local(self, seg: np.ndarray, pred: int) -> tuple[int, float]:
        start = (pred - self.SEARCH) % self.L
        c = np.correlate(self.rb[start:start + self.N + 2 * self.SEARCH], seg, "valid")
        pos = (start + int(np.argmax(c))) % self.L
        return pos, self._q(seg, pos)

    def _global(self, seg: np.ndarray) -> tuple[int, float]:
        c = np.fft.irfft(np.conj(np.fft.rfft(seg, self.L)) * self.R, self.L)
        pos = int(np.argmax(c))
        return pos, self._q(seg, pos)

    def _wrap(self, d: int) -> int:
        return (d + self.L // 2) % self.L - self.L // 2

    def track(self, cap: Capture, t_from: float, t_to: float) -> dict[str, Any]:
        """Jumps (time, ms; > 0 = bed skipped ahead, < 0 = something else inserted) between
        t_from and t_to. A jump counts once the next located stretch confirms the new track,
        so one false lock is not two jumps."""
        xb = bandpass(cap.x.astype(np.float64), *NOISE_BAND)
        idx = np.arange(0, max(0, len(xb) - self.N + 1), self.STEP)
        times = cap.time_of(idx + self.N // 2) if len(idx) else np.zeros(0)
        sel = idx[(times >= t_from) & (times <= t_to)]
        jumps: list[dict[str, float]] = []
        tracked = 0
        prev: tuple[int, int] | None = None  # (sample index, loop position) of the current track
        pending: tuple[int, int, int] | None = None  # (sample index, position, delta) of a jump to confirm
        for i in (int(v) for v in sel):
            seg = xb[i:i + self.N]
            if float(seg @ seg) < 1e-9:
                continue
            pos = None
            for anchor in ([pending[:2]] if pending else []) + ([prev] if prev else []):
                p, q = self._local(seg, (anchor[1] + i - anchor[0]) % self.L)
                if q >= self.Q_LOCAL:
                    pos = p
                    break
            if pos is None:
                p, q = self._global(seg)
                if q >= self.Q_GLOBAL:
                    pos = p
            if pos is None:
                continue
            tracked += 1
            if prev is None:
                prev = (i, pos)
                continue
            if pending is not None:
                pi, ppos, pdelta = pending
                pending = None
                if abs(self._wrap(pos - (ppos + i - pi))) <= self.JUMP:  # confirmed
                    jumps.append({"t": float(cap.time_of(pi + self.N // 2)), "ms": pdelta * 1000 / SR})
                    prev = (i, pos)
                    continue
            delta = self._wrap(pos - (prev[1] + i - prev[0]))
            if abs(delta) > self.JUMP:
                pending = (i, pos, delta)
            else:
                prev = (i, pos)
        return {"jumps": jumps, "coverage": tracked / max(1, len(sel))}


@dataclass
class BedAnalysis:
    level: float
    gaps: int
    dips: int
    times: np.ndarray
    local: np.ndarray
    windows: int
    longest_gap_ms: float
    jumps: list[dict[str, float]]
    coverage: float

    def at(self, t0: float, t1: float) -> dict[str, Any]:
        js = [j for j in self.jumps if t0 <= j["t"] <= t1]
        sel = (self.times >= t0) & (self.times <= t1)
        return {"skip_ms": sum(j["ms"] for j in js if j["ms"] > 0),
                "insert_ms": -sum(j["ms"] for j in js if j["ms"] < 0), "jumps": len(js),
                "bed_min_local": float(self.local[sel].min()) if sel.any() else None}

    def summary(self) -> dict[str, Any]:
        return {"level": round(self.level, 4), "gap_windows": self.gaps, "dip_windows": self.dips,
                "windows": self.windows,
                "longest_gap_ms": self.longest_gap_ms, "discontinuities": len(self.jumps),
                "skipped_ms": round(sum(j["ms"] for j in self.jumps if j["ms"] > 0), 1),
                "inserted_ms": round(-sum(j["ms"] for j in self.jumps if j["ms"] < 0), 1),
                "tracked_fraction": round(self.coverage, 3)}


def local_level(a: np.ndarray, k: int = 3) -> np.ndarray:
    """Each window's amplitude over the median of its k neighbours on each side: a dip
    (silence, a click, a phase jump within the window) shows; slow ducking ramps do not."""
    if len(a) < 2 * k + 1:
        return np.ones_like(a)
    pad = np.pad(a, k, mode="edge")
    nb = np.lib.stride_tricks.sliding_window_view(pad, 2 * k + 1)
    ref = np.median(np.concatenate([nb[:, :k], nb[:, k + 1:]], axis=1), axis=1)
    return np.where(ref > 1e-6, a / np.maximum(ref, 1e-6), 1.0)


def analyse_bed(cap: Capture, tracker: BedTracker, t_from: float, t_to: float) -> BedAnalysis:
    bt, ba = cap.tone_track(BED_HZ, WIN, WIN)  # non-overlapping 20 ms windows, as the tests use
    _, r1 = cap.tone_track(REPLY_HZ, WIN, WIN)
    _, r2 = cap.tone_track(ANSWER_HZ, WIN, WIN)
    # The bed's own (unducked) level: the 90th percentile of windows without a reply tone.
    quiet = (r1 < 0.02) & (r2 < 0.02)
    level = float(np.percentile(ba[quiet] if quiet.any() else ba, 90)) if len(ba) else 0.0
    first = np.nonzero(ba > 0.5 * level)[0]
    start = max(t_from, float(bt[first[0]]) + 0.5) if len(first) else t_to
    sel = (bt >= start) & (bt <= t_to)
    below = (ba < GAP_FRACTION * level) & sel
    longest = run = 0
    for b in below[sel]:
        run = run + 1 if b else 0
        longest = max(longest, run)
    local = local_level(ba)
    tr = tracker.track(cap, start, t_to)
    return BedAnalysis(level, int(below.sum()), int(((local < 0.5) & sel).sum()), bt[sel], local[sel],
                       int(sel.sum()), longest * 20.0, tr["jumps"], tr["coverage"])


def onset(times: np.ndarray, amp: np.ndarray, t0: float, t1: float, thr: float = REPLY_ON) -> float | None:
    """Time of the first window in [t0, t1] above thr."""
    sel = np.nonzero((times >= t0) & (times <= t1) & (amp > thr))[0]
    return float(times[sel[0]]) if len(sel) else None


def holes_ms(times: np.ndarray, amp: np.ndarray, t_onset: float, duration_s: float) -> float:
    """Silence inside a reply heard from t_onset: 10 ms steps (20 ms windows) below the
    onset threshold before the reply's last audible window (its audio lasts duration_s)."""
    # A hole lasts at most the API's lateness (LATE_GAP_MS) plus a cushion: the window ends
    # well before the next reply, which the bench triggers after this one is done + settle.
    sel = np.nonzero((times >= t_onset) & (times <= t_onset + duration_s + 0.25))[0]
    if not len(sel):
        return 0.0
    above = sel[amp[sel] > REPLY_ON]
    inside = sel[(sel >= above[0]) & (sel <= above[-1])] if len(above) else sel[:0]
    return float(np.sum(amp[inside] <= REPLY_ON)) * HOP * 1000 / SR


def gone(times: np.ndarray, amp: np.ndarray, t0: float, t1: float, thr: float = REPLY_OFF) -> float | None:
    """Time of the first window after t0 from which amp stays below thr until t1."""
    sel = np.nonzero((times > t0) & (times <= t1))[0]
    if not len(sel):
        return None
    above = sel[amp[sel] > thr]
    if not len(above):
        return float(times[sel[0]])
    k = above[-1] + 1
    return float(times[k]) if k <= sel[-1] else None


# --- worker logs -----------------------------------------------------------------------------


COUNTERS_RX = re.compile(r"counters mixer=\{[^}]*?'underruns': (\d+), 'underrun_ms': ([\d.]+)")
WARN_RX = re.compile(r"^\d\d:\d\d:\d\d (WARNING|ERROR|CRITICAL)\s+\S+: (.*)$", re.MULTILINE)


async def counters(worker: WorkerProcess, timeout: float = 2.0) -> dict[str, float] | None:
    """Ask the worker for its counters (SIGUSR1) and read the underrun totals."""
    before = len(COUNTERS_RX.findall(worker.output()))
    worker.signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = COUNTERS_RX.findall(worker.output())
        if len(found) > before:
            return {"underruns": int(found[-1][0]), "underrun_ms": float(found[-1][1])}
        await asyncio.sleep(0.05)
    return None


def call_figures(text: str) -> dict[str, Any] | None:
    """The worker's own figures of the session: its call-end line (metrics.py; text format,
    key=value), logged when the SIGTERM ends the call."""
    found = re.findall(r"call ended event=call_ended (.*)", text)
    if not found:
        return None
    out: dict[str, Any] = {}
    for key, value in re.findall(r"(\w+)=(\S+)", found[-1]):
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def warnings_in(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for level, msg in WARN_RX.findall(text):
        key = level + ": " + re.sub(r"\d+(\.\d+)?", "N", msg.split(" [")[0])[:110]
        out[key] = out.get(key, 0) + 1
    return out


def queue_ms_of(worker: WorkerProcess) -> int | None:
    m = re.search(r"audio: \d+ ms frames, (\d+) ms output queue, audio thread scheduling (.+)", worker.output())
    return int(m.group(1)) if m else None


def scheduling_of(worker: WorkerProcess) -> str:
    m = re.search(r"audio thread scheduling (\S+(?: -?\d+)?)", worker.output())
    return m.group(1) if m else "?"


# --- helpers ---------------------------------------------------------------------------------


async def in_room(worker: WorkerProcess, timeout: float = 60) -> None:
    """Until the worker logged that it is in its room (STARTUP_CHECK=0: nothing else to wait for)."""
    await worker.wait_for_output(r"ready: in room", timeout)


async def wait(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(interval)


async def wait_hearing(heard: Heard, freq: float, since: float, timeout: float) -> float:
    """Until the last 20 ms heard (after ``since``) carry ``freq``; returns when."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tail = [c for t, c in heard.chunks[-4:] if t >= since]
        if tail:
            x = np.concatenate(tail)[-WIN:].astype(np.float32) / 32768
            if len(x) == WIN and tone_amplitude(x, freq) > REPLY_ON:
                return time.monotonic()
        await asyncio.sleep(0.02)
    raise TimeoutError(f"the listener never heard {freq:.0f} Hz")


class Bench:
    def __init__(self, args: argparse.Namespace, priority: BenchPriority) -> None:
        self.args = args
        self.priority = priority
        self.rnd = random.Random(args.seed)
        self.tmp = Path(tempfile.mkdtemp(prefix="e2e-bench-"))
        self.server: LiveKitServer | None = None
        self.workers: list[WorkerProcess] = []
        self.bed = make_bed(args.seed)
        self.bed_path = write_wav(self.tmp / "bed.wav", (self.bed * 32767).astype(np.int16))
        self.tracker = BedTracker(worker_loop_of(self.bed))
        self.t_start = time.monotonic()
        self._rooms = 0
        wanted = args.designs.split(",") if args.designs else \
            (QUICK_DESIGNS if args.quick else [d for d in DESIGNS if d not in ON_REQUEST])
        self.designs = [d for d in DESIGNS if d in wanted]
        self.n_late = 1 if args.quick else 3

    def progress(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t_start:5.1f}s] {msg}", file=sys.stderr, flush=True)

    def room(self, prefix: str) -> str:
        self._rooms += 1
        return f"{prefix}-{self._rooms}"

    def env(self, standin: StandIn, room: str, **extra: str) -> dict[str, str]:
        base = {"AMBIENT_SOUND": str(self.bed_path), "AMBIENT_VOLUME": "0.5", "GREETING": "", "LOG_LEVEL": "info",
                "STATE_DIR": ""}
        env = worker_env(self.server, standin.url, room, **{**base, **extra})  # a design's own settings win
        for item in self.args.worker_env:  # --worker-env: every worker, both designs
            key, _, value = item.partition("=")
            if key not in extra:  # the naive design's own settings win
                env[key] = value
        return env

    def start_worker(self, env: dict[str, str], name: str, design: str = "ours") -> WorkerProcess:
        kind = MinimalBridge if design == "minimal" else WorkerProcess
        with self.priority.normal():
            w = kind(env, self.tmp / name).start()
        self.workers.append(w)
        return w

    async def stop_worker(self, w: WorkerProcess) -> None:
        w.signal(signal.SIGTERM)
        try:
            await w.wait_exit(8)
        except AssertionError:
            w.kill()

    def cleanup(self) -> None:
        for w in self.workers:
            w.kill()
        if self.server is not None:
            self.server.stop()

    # -- scenarios 1-4: one session of one design ---------------------------------------------

    async def session(self, design: str, n_lat: int, n_barge: int, index: int) -> dict[str, Any]:
        room = self.room(f"bench-{design}")
        standin = StandIn(StandInOptions(api_key=ASSEMBLYAI_KEY, seed=self.args.seed + index,
                                         reply_freq_hz=ANSWER_HZ, reply_seconds=0.5, default_min_silence_ms=500,
                                         barge_in_jitter_ms=10))
        await standin.start()
        worker = self.start_worker(self.env(standin, room, **DESIGNS[design]), f"{design}-{index}", design)
        minimal = design == "minimal"
        user = RoomUser(self.server, room)
        out: dict[str, Any] = {"design": design, "room": room, "failures": []}
        try:
            await in_room(worker)
            await user.join()
            heard = await user.wait_heard(timeout=30)
            await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 30, "the session")
            sess = standin.sessions[0]
            queue_ms = 1000 if minimal else queue_ms_of(worker) or int(DESIGNS[design].get("OUTPUT_QUEUE_MS", 100))
            settle = (0.1 if minimal else queue_ms / 1000) + 0.35
            out["queue_ms"], out["scheduling"] = queue_ms, "normal" if minimal else scheduling_of(worker)
            await asyncio.sleep(1.0 + queue_ms / 1000)
            c0 = None if minimal else await counters(worker)
            in0 = await inbound_stats(user)
            th0, srv0, self0 = thread_cpu(worker.proc.pid), proc_cpu_s(self.server.proc.pid), self_cpu_s()
            machine, cpu0, t0 = MachineMeter(), proc_cpu_s(worker.proc.pid), time.monotonic()
            lat_replies, barges = [], []
            for i in range(n_lat):
                try:
                    r = await standin.trigger_reply(seconds=1.0, freq_hz=REPLY_HZ, session=sess)
                    await wait(lambda r=r: r.done_at, 15, "reply done")
                    lat_replies.append(r)
                    await asyncio.sleep(settle + self.rnd.uniform(0.0, 0.4))
                except (TimeoutError, AssertionError, RuntimeError) as e:
                    out["failures"].append(f"latency turn {i}: {e}")
            late_replies = []
            for i in range(self.n_late):
                # A late API: the reply's first chunk is 40 ms, its second comes LATE_GAP_MS late.
                standin.options.first_chunk_ms, standin.options.chunk_gap_ms = 40, (1, LATE_GAP_MS)
                try:
                    r = await standin.trigger_reply(seconds=1.0, freq_hz=REPLY_HZ, session=sess)
                    await wait(lambda r=r: r.done_at, 15, "reply done")
                    late_replies.append(r)
                    await asyncio.sleep(settle + self.rnd.uniform(0.0, 0.4))
                except (TimeoutError, AssertionError, RuntimeError) as e:
                    out["failures"].append(f"late reply {i}: {e}")
                finally:
                    standin.options.first_chunk_ms, standin.options.chunk_gap_ms = None, None
            for i in range(n_barge):
                try:
                    r = await standin.trigger_reply(seconds=4.0, freq_hz=REPLY_HZ, session=sess)
                    await wait(lambda r=r: r.first_audio_at, 10, "reply audio")
                    await wait_hearing(heard, REPLY_HZ, r.first_audio_at, 5)
                    await asyncio.sleep(self.rnd.uniform(0.4, 1.0))
                    user.say(tone(USER_HZ, 0.6, amplitude=0.6))
                    await wait(lambda r=r: r.interrupted_at or r.done_at, 5, "the interruption")
                    if r.interrupted_at is None:
                        raise TimeoutError("the reply was not interrupted")
                    cut = r.interrupted_at
                    await wait(lambda cut=cut: any(a.kind == "turn" and a.started_at and a.started_at > cut
                                                   and a.done_at for a in sess.replies), 10,
                               "the answer to the barge-in")
                    barges.append(r)
                    await asyncio.sleep(settle + self.rnd.uniform(0.0, 0.3))
                except (TimeoutError, AssertionError, RuntimeError) as e:
                    out["failures"].append(f"barge-in {i}: {e}")
            t1, cpu1 = time.monotonic(), proc_cpu_s(worker.proc.pid)
            out["machine"] = machine.stop()
            th1, srv1, self1 = thread_cpu(worker.proc.pid), proc_cpu_s(self.server.proc.pid), self_cpu_s()
            out["threads"] = realtime_share(th0, th1)
            out["thread_groups"] = thread_groups(th0, th1, t1 - t0)
            out["server_cores"] = (srv1 - srv0) / (t1 - t0) if srv0 is not None and srv1 is not None else None
            out["bench_cores"] = (self1 - self0) / (t1 - t0)
            out["listener"] = inbound_delta(in0, await inbound_stats(user), t1 - t0)
            c1 = None if minimal else await counters(worker)
            out["peak_rss_mb"] = (proc_status_kb(worker.proc.pid, "VmHWM") or 0) / 1024
            out["cpu_s_per_min"] = (cpu1 - cpu0) / (t1 - t0) * 60 if cpu0 is not None and cpu1 is not None else None
            out["conversation_s"] = t1 - t0
            if out["cpu_s_per_min"] is not None and out["machine"] and out["server_cores"] is not None:
                out["other_cores"] = round(out["machine"]["busy_cores"] - out["cpu_s_per_min"] / 60
                                           - out["server_cores"] - out["bench_cores"], 2)
            out["underruns"] = (c1["underruns"] - c0["underruns"]) if c0 and c1 else None
            out["underrun_ms"] = round(c1["underrun_ms"] - c0["underrun_ms"], 1) if c0 and c1 else None
            out["underruns_total"] = c1["underruns"] if c1 else None
            cap = Capture(heard)
        finally:
            await self.stop_worker(worker)
            await user.leave()
            await standin.stop()
        out["warnings"] = warnings_in(worker.output())
        out["underrun_warnings"] = worker.output().count("audio underrun")
        out["worker_figures"] = None if minimal else call_figures(worker.output())
        # -- analysis --
        rt, ra = cap.tone_track(REPLY_HZ)
        out["latency_ms"] = []
        for r in lat_replies:
            t = onset(rt, ra, r.first_audio_at, r.first_audio_at + 3.0)
            out["latency_ms"].append(None if t is None else (t - r.first_audio_at) * 1000)
        out["late"] = []
        for r in late_replies:
            t = onset(rt, ra, r.first_audio_at, r.first_audio_at + 3.0)
            out["late"].append({"latency_ms": None if t is None else (t - r.first_audio_at) * 1000,
                                "holes_ms": None if t is None else holes_ms(rt, ra, t, r.duration_s)})
        bed = analyse_bed(cap, self.tracker, t0, t1 - 0.2)
        out["bed"] = bed.summary()
        out["barge_ins"] = []
        for k, r in enumerate(barges):
            cut = r.interrupted_at
            nxt = min([b.first_audio_at for b in barges[k + 1:]] + [cut + 2.5])
            g = gone(rt, ra, cut, nxt)
            before = onset(rt, ra, cut - 0.5, cut)
            out["barge_ins"].append({"t": cut - t0, "to_silence_ms": None if g is None else (g - cut) * 1000,
                                     "reply_heard_before": before is not None, **bed.at(cut - 0.1, cut + 1.5)})
        out["bed_jumps"] = [{"t": round(j["t"] - t0, 3), "ms": round(j["ms"], 1)} for j in bed.jumps]
        return out

    async def scenarios(self, turns: int, rounds: int) -> list[dict[str, Any]]:
        per = max(1, math.ceil(turns / rounds))
        sessions = []
        index = 0
        designs = self.designs
        for rnd_i in range(rounds):
            order = designs if rnd_i % 2 == 0 else designs[::-1]
            for design in order:
                index += 1
                self.progress(f"session {index}/{len(designs) * rounds}: {design}, {per} replies + {per} barge-ins")
                try:
                    sessions.append({**await self.session(design, per, per, index), "round": rnd_i})
                except Exception as e:  # noqa: BLE001 - report and go on
                    self.progress(f"session failed: {type(e).__name__}: {e}")
                    sessions.append({"design": design, "round": rnd_i, "error": f"{type(e).__name__}: {e}"})
        return sessions

    # -- scenario 5: density -------------------------------------------------------------------

    async def density_level(self, n: int, seconds: float) -> dict[str, Any]:
        rooms = []
        out: dict[str, Any] = {"rooms": n}
        try:
            for k in range(n):
                room = self.room(f"bench-density{n}")
                s = StandIn(StandInOptions(api_key=ASSEMBLYAI_KEY, seed=self.args.seed + 100 + k,
                                           reply_freq_hz=REPLY_HZ, reply_seconds=0.8, default_min_silence_ms=500))
                await s.start()
                w = self.start_worker(self.env(s, room), f"density{n}-{k}")
                rooms.append({"standin": s, "worker": w, "user": RoomUser(self.server, room), "failures": 0})
            t_spawn = time.monotonic()
            # Users join once every worker is in its room, so the listeners' jitter buffers do
            # not start out sized by the start-up storm of N Python processes.
            await asyncio.gather(*(in_room(r["worker"]) for r in rooms))
            out["workers_in_room_s"] = time.monotonic() - t_spawn
            await asyncio.gather(*(r["user"].join() for r in rooms))
            for r in rooms:
                r["heard"] = await r["user"].wait_heard(timeout=60)
                s = r["standin"]
                await s.wait_for(lambda s=s: s.sessions and s.sessions[0].ready_at, 60, "a session")
                r["session"] = s.sessions[0]
            out["all_ready_s"] = time.monotonic() - t_spawn
            queue_ms = queue_ms_of(rooms[0]["worker"]) or 100
            settle = queue_ms / 1000 + 0.2
            await asyncio.sleep(2.0)
            c0 = [await counters(r["worker"]) for r in rooms]
            in0 = [await inbound_stats(r["user"]) for r in rooms]
            th0 = [thread_cpu(r["worker"].proc.pid) for r in rooms]
            lag = LoopLag().start()
            machine, self0, t0 = MachineMeter(), self_cpu_s(), time.monotonic()
            srv0 = proc_cpu_s(self.server.proc.pid)
            cpu0 = [proc_cpu_s(r["worker"].proc.pid) for r in rooms]
            deadline = t0 + seconds

            async def converse(r: dict[str, Any], rnd: random.Random) -> None:
                await asyncio.sleep(rnd.uniform(0, 1.5))
                sess = r["session"]
                while time.monotonic() < deadline:
                    n_before = len(sess.replies)
                    spoken = r["user"].say(tone(USER_HZ, 0.5, amplitude=0.6))
                    try:
                        await wait(lambda n=n_before, t=spoken: any(
                            a.kind == "turn" and a.done_at and a.started_at > t - 0.05 for a in sess.replies[n:]),
                                   10, "the answer")
                    except TimeoutError:
                        r["failures"] += 1
                    await asyncio.sleep(settle + rnd.uniform(0.3, 0.6))

            tasks = [asyncio.create_task(converse(r, random.Random(self.rnd.random()))) for r in rooms]
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            t1 = time.monotonic()
            cpu1 = [proc_cpu_s(r["worker"].proc.pid) for r in rooms]
            srv1 = proc_cpu_s(self.server.proc.pid)
            self1 = self_cpu_s()
            out["machine"] = machine.stop()
            out["loop_lag"] = await lag.stop()
            th1 = [thread_cpu(r["worker"].proc.pid) for r in rooms]
            in1 = [await inbound_stats(r["user"]) for r in rooms]
            await asyncio.wait(tasks, timeout=6)
            for t in tasks:
                t.cancel()
            c1 = [await counters(r["worker"]) for r in rooms]
            span = t1 - t0
            out["seconds"] = span
            out["bench_cores"] = (self1 - self0) / span
            out["server_cores"] = (srv1 - srv0) / span if srv0 is not None and srv1 is not None else None
            out["worker_cpu_s_per_min"] = [(b - a) / span * 60 if a is not None and b is not None else None
                                           for a, b in zip(cpu0, cpu1)]
            out["peak_rss_mb"] = [(proc_status_kb(r["worker"].proc.pid, "VmHWM") or 0) / 1024 for r in rooms]
            out["underruns"] = [(b["underruns"] - a["underruns"]) if a and b else None for a, b in zip(c0, c1)]
            out["underrun_ms"] = [round(b["underrun_ms"] - a["underrun_ms"], 1) if a and b else None
                                  for a, b in zip(c0, c1)]
            out["startup_underruns"] = [a["underruns"] if a else None for a in c0]  # before the window
            out["startup_underrun_ms"] = [a["underrun_ms"] if a else None for a in c0]
            out["failures"] = sum(r["failures"] for r in rooms)
            out["threads"] = [realtime_share(a, b) for a, b in zip(th0, th1)]
            out["listener"] = [inbound_delta(a, b, span) for a, b in zip(in0, in1)]
            known = [v for v in out["worker_cpu_s_per_min"] if v is not None]
            out["other_cores"] = round(out["machine"].get("busy_cores", 0) - sum(known) / 60
                                       - (out["server_cores"] or 0) - out["bench_cores"], 2)
            caps = [Capture(r["heard"]) for r in rooms]
        finally:
            await asyncio.gather(*(self.stop_worker(r["worker"]) for r in rooms), return_exceptions=True)
            for r in rooms:
                await r["user"].leave()
                await r["standin"].stop()
        out["latency_ms"], out["per_room"] = [], []
        for r, cap in zip(rooms, caps):
            rt, ra = cap.tone_track(REPLY_HZ)
            lats = []
            for a in r["session"].replies:
                if a.kind == "turn" and a.first_audio_at and t0 <= a.first_audio_at <= t1 - 0.3:
                    t = onset(rt, ra, a.first_audio_at, a.first_audio_at + 3.0)
                    lats.append(None if t is None else (t - a.first_audio_at) * 1000)
            out["latency_ms"].extend(lats)
            bed = analyse_bed(cap, self.tracker, t0, t1 - 0.2)
            w = r["worker"]
            out["per_room"].append({"latency_ms": lats, "bed": bed.summary(), "warnings": warnings_in(w.output()),
                                    "underrun_warnings": w.output().count("audio underrun")})
        return out

    async def density(self, levels: list[int], seconds: float) -> list[dict[str, Any]]:
        """Ramp up; stop after two broken levels in a row (the break is then confirmed)."""
        res: list[dict[str, Any]] = []
        broken_in_a_row = 0
        for n in levels:
            # One room alone gets at least ~10 turns (about 2.6 s each) unless --quick.
            secs = seconds if self.args.quick or n > 1 else max(seconds, 28.0)
            self.progress(f"density: {n} room(s) for {secs:.0f} s")
            try:
                res.append(await self.density_level(n, secs))
            except Exception as e:  # noqa: BLE001 - report and stop the ramp
                self.progress(f"density level {n} failed: {type(e).__name__}: {e}")
                res.append({"rooms": n, "error": f"{type(e).__name__}: {e}"})
                break  # a level that cannot even start ends the ramp
            base = next((stats(lv["latency_ms"]).get("median") for lv in res if "latency_ms" in lv
                         and stats(lv["latency_ms"]).get("n")), None)
            broken_in_a_row = broken_in_a_row + 1 if density_reasons(res[-1], base) else 0
            if broken_in_a_row >= 2 and n != levels[-1]:
                self.progress("two broken levels in a row: ramp stopped")
                res.append({"rooms": None, "stopped": True})
                break
            await asyncio.sleep(1.0)
        return res

    # -- scenario 6: startup -------------------------------------------------------------------

    async def startup(self, runs: int) -> list[dict[str, Any]]:
        standin = StandIn(StandInOptions(api_key=ASSEMBLYAI_KEY, seed=self.args.seed))
        await standin.start()
        try:
            return [await self.startup_once(standin, i) for i in range(runs)]
        finally:
            await standin.stop()

    async def startup_once(self, standin: StandIn, i: int) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        room = self.room("bench-startup")
        sock_path = self.tmp / f"notify-{i}.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        sock.setblocking(False)
        messages: list[tuple[float, str]] = []  # (arrival, datagram): READY=1 is timestamped as it lands

        def on_readable() -> None:
            while True:
                try:
                    messages.append((time.monotonic(), sock.recv(4096).decode(errors="replace")))
                except OSError:  # BlockingIOError: drained
                    return

        def ready() -> float | None:
            return next((t for t, m in messages if m.startswith("READY=1")), None)

        loop.add_reader(sock.fileno(), on_readable)
        observer = RoomUser(self.server, room, "observer")
        joined: list[float] = []

        def all_there() -> bool:
            heard = observer.heard.get("voice-agent")
            return bool(ready() and joined and heard is not None and heard.chunks)

        worker = None
        try:
            await observer.join(publish=False)
            observer.room.on("participant_connected", lambda p: joined.append(time.monotonic())
                             if p.identity == "voice-agent" else None)
            n_sessions = len(standin.sessions)
            worker = self.start_worker(self.env(standin, room, STARTUP_CHECK="1", NOTIFY_SOCKET=str(sock_path)),
                                       f"startup-{i}")
            await wait(all_there, 40, "READY=1, the join and audio")
            s0 = worker.started_at
            key = standin.sessions[n_sessions] if len(standin.sessions) > n_sessions else None
            return {"joined_s": joined[0] - s0, "ready_s": ready() - s0,
                    "key_session_ready_s": (key.ready_at - s0) if key and key.ready_at else None,
                    "first_audio_s": observer.heard["voice-agent"].chunks[0][0] - s0}
        except (TimeoutError, AssertionError, RuntimeError, OSError) as e:
            return {"error": f"{type(e).__name__}: {e}"}
        finally:
            loop.remove_reader(sock.fileno())
            sock.close()
            if worker is not None:
                await self.stop_worker(worker)
            await observer.leave()

    async def run(self) -> dict[str, Any]:
        a = self.args
        quick = a.quick
        turns = a.turns if a.turns is not None else (4 if quick else 12)
        rounds = a.rounds if a.rounds is not None else (1 if quick else 2)
        levels = [int(v) for v in (a.levels or ("1,2,4" if quick else "1,2,4,6,8")).split(",")]
        level_s = a.level_seconds if a.level_seconds is not None else (10.0 if quick else 20.0)
        startups = a.startups if a.startups is not None else (3 if quick else 10)
        res: dict[str, Any] = {
            "seed": a.seed, "quick": quick, "turns": turns, "rounds": rounds, "levels": levels,
            "level_seconds": level_s, "startups": startups, "cpus": os.cpu_count(), "load_start": loadavg(),
            "host": platform.node(), "python": platform.python_version(),
            "media_ip": os.environ.get("VOICE_AGENT_TEST_IP"), "logs": str(self.tmp),
            "bench_priority": self.priority.note, "worker_env": a.worker_env, "designs": self.designs,
        }
        with self.priority.normal():
            res["worker_rev"] = git_describe()
        binary = find_server_binary()
        if binary is None:
            raise SystemExit("livekit-server not found: run ./scripts/setup --server (or ./scripts/bench)")
        self.server = LiveKitServer(binary, self.tmp / "livekit")
        self.server.start()  # inherits our policy: infrastructure, not on a worker host in production
        machine = MachineMeter()
        t0 = time.monotonic()
        try:
            if "scenarios" not in a.skip:
                self.progress(f"1-4/6 {' vs '.join(self.designs)}: {turns} replies and {turns} barge-ins per design, "
                              f"{rounds} round(s)")
                res["sessions"] = await self.scenarios(turns, rounds)
            if "density" not in a.skip:
                self.progress(f"5/6 density: {levels} rooms, {level_s:.0f} s each")
                res["density"] = await self.density(levels, level_s)
            if "startup" not in a.skip:
                self.progress(f"6/6 startup x{startups}")
                res["startup"] = await self.startup(startups)
        finally:
            self.cleanup()
        res["machine"] = machine.stop()
        res["load_end"] = loadavg()
        res["elapsed_s"] = time.monotonic() - t0
        return res


# --- the report ------------------------------------------------------------------------------


def density_reasons(lv: dict[str, Any], base: float | None) -> list[str]:
    """Why a density level counts as broken (empty: it held)."""
    if "error" in lv:
        return [lv["error"]]
    lat = stats(lv["latency_ms"])
    und = sum(u or 0 for u in lv["underruns"])
    gaps = sum(r["bed"]["gap_windows"] for r in lv["per_room"])
    unheard = sum(v is None for v in lv["latency_ms"])
    reasons = []
    if und:
        reasons.append(f"{und} underruns")
    if gaps:
        reasons.append(f"{gaps} gap windows")
    if lv["failures"]:
        reasons.append(f"{lv['failures']} failed turns")
    if unheard:
        reasons.append(f"{unheard} replies not heard")
    if base and lat.get("n") and lat["median"] > 2 * base:
        reasons.append(f"latency {lat['median'] / base:.1f}x")
    return reasons


def fmt(s: dict[str, Any], unit: str = "", digits: int = 0) -> str:
    if not s or not s.get("n"):
        return "n/a"
    f = f"{{:.{digits}f}}"
    return f"{f.format(s['median'])}{unit} [{f.format(s['min'])}–{f.format(s['max'])}] n={s['n']}"


def ratio(a: dict[str, Any], b: dict[str, Any]) -> str:
    if not a.get("n") or not b.get("n"):
        return "n/a"
    if a["median"] == 0:
        return "—" if b["median"] == 0 else "∞"
    return f"{b['median'] / a['median']:.2f}"


def _sum(values: list[Any]) -> float:
    return sum(v for v in values if v is not None)


def listener_text(items: list[dict[str, Any] | None]) -> str:
    ok = [i for i in items if i]
    if not ok:
        return "n/a"
    jb = [i["jb_delay_ms"] for i in ok if i["jb_delay_ms"] is not None]
    return (f"concealed {_sum([i['concealed_ms'] for i in ok]):.0f} ms in "
            f"{_sum([i['concealment_events'] for i in ok]):.0f} events, stretched "
            f"+{_sum([i['stretched_ms'] for i in ok]):.0f}/-{_sum([i['compressed_ms'] for i in ok]):.0f} ms, "
            f"lost {_sum([i['packets_lost'] for i in ok]):.0f} pkts"
            + (f", jitter buffer {min(jb):.0f}-{max(jb):.0f} ms" if jb else ""))


def report(res: dict[str, Any]) -> str:
    lines: list[str] = []
    add = lines.append
    m = res.get("machine", {})
    add(f"e2e bench: {res['cpus']} CPUs; load average {res['load_start']} at start, {res['load_end']} at end; "
        f"whole machine busy {m.get('busy_cores', '?')} cores on average (steal {m.get('steal_cores', '?')}) "
        f"over {res['elapsed_s']:.0f} s")
    add(f"worker: {res.get('worker_rev', '?')}; Python {res['python']}; seed {res['seed']}"
        + ("; --quick" if res["quick"] else ""))
    add(f"media on {res['media_ip']} (own network namespace)" if res["media_ip"] else
        "WARNING: VOICE_AGENT_TEST_IP unset: WebRTC media used this host's addresses (run ./scripts/bench)")
    add(f"bench process: {res['bench_priority']}; worker logs in {res['logs']}")
    if res.get("worker_env"):
        add(f"extra worker environment (--worker-env): {' '.join(res['worker_env'])}")
    sessions = [s for s in res.get("sessions", []) if "error" not in s]
    if res.get("sessions") is not None:
        add("")
        designs = [d for d in res.get("designs", DESIGNS) if d in DESIGNS]
        by = {d: [s for s in sessions if s["design"] == d] for d in designs}
        q = {d: "/".join(str(v) for v in sorted({s.get("queue_ms") for s in by[d]})) for d in designs}
        sch = ", ".join(sorted({s.get("scheduling", "?") for s in by.get("ours", [])}))
        add(f"1-4. ours = the worker's defaults (output queue {q.get('ours', '?')} ms, as it logged it); minimal = "
            "bench/minimal_bridge.py (reply chunks captured straight into a 1000 ms AudioSource queue, clear_queue() on "
            "barge-in, no mixer, no bed); naive = the worker with OUTPUT_QUEUE_MS=1000 + BARGE_IN_CLEAR_QUEUE=1")
        add(f"     {' + '.join(f'{len(by[d])} {d}' for d in designs)} sessions, order alternating per round; one room, "
            f"one bridge process, one user each; ours' audio thread: {sch}. Medians [min-max] n.")
        fig: dict[str, dict[str, dict[str, Any]]] = {}
        for d in designs:
            ss = by[d]
            fig.setdefault("lat", {})[d] = stats([v for s in ss for v in s["latency_ms"]])
            fig.setdefault("barge", {})[d] = stats([b["to_silence_ms"] for s in ss for b in s["barge_ins"]])
            fig.setdefault("cpu", {})[d] = stats([s["cpu_s_per_min"] for s in ss])
            fig.setdefault("cores", {})[d] = stats([s["cpu_s_per_min"] / 60 for s in ss if s["cpu_s_per_min"] is not None])
            fig.setdefault("rss", {})[d] = stats([s["peak_rss_mb"] for s in ss])
            fig.setdefault("late_lat", {})[d] = stats([x["latency_ms"] for s in ss for x in s.get("late", [])])
            fig.setdefault("late_holes", {})[d] = stats([x["holes_ms"] for s in ss for x in s.get("late", [])])
            bed_ss = [] if d in NO_BED else ss
            fig.setdefault("skip", {})[d] = stats([b["skip_ms"] for s in bed_ss for b in s["barge_ins"]])
            fig.setdefault("dip", {})[d] = stats([b["bed_min_local"] * 100 for s in bed_ss for b in s["barge_ins"]
                                                  if b.get("bed_min_local") is not None])
        w0, w1 = 50, 27
        ratios = []
        if "ours" in designs and BASELINE in designs:
            ratios.append(("ours", BASELINE))
        if "ours" in designs and "naive" in designs:
            ratios.append(("naive", "ours"))
        if "ours" in designs and "ours-normal" in designs:
            ratios.append(("ours-normal", "ours"))
        if "ours-no-bed" in designs and BASELINE in designs:
            ratios.append(("ours-no-bed", BASELINE))
        if "ours-b100" in designs and BASELINE in designs:
            ratios.append(("ours-b100", BASELINE))
        if "ours-tokio2" in designs and "ours" in designs:
            ratios.append(("ours-tokio2", "ours"))
        add(f"   {'figure':<{w0}} " + " ".join(f"{d:<{w1}}" for d in designs) + " "
            + " ".join(f"{a}/{b:<9}" for a, b in ratios))

        def row(label: str, key: str, unit: str, digits: int = 0) -> None:
            cells = " ".join(f"{fmt(fig[key][d], unit, digits):<{w1}}" for d in designs)
            add(f"   {label:<{w0}} {cells} " + " ".join(f"{ratio(fig[key][b], fig[key][a]):<{len(a) + len(b) + 10}}"
                                                      for a, b in ratios))

        def line(label: str, f: Callable[[str], str], bed: bool = False) -> None:
            add(f"   {label:<{w0}} " + " ".join(f"{'no bed' if bed and d in NO_BED else f(d):<{w1}}" for d in designs))

        def bed_sum(d: str, key: str) -> float:
            return _sum([s["bed"][key] for s in by[d]])

        row("1 reply latency: first chunk sent -> heard", "lat", " ms")
        row(f"1b late API (2nd chunk {LATE_GAP_MS} ms late): latency", "late_lat", " ms")
        row("1b ... silence inside the reply (10 ms steps)", "late_holes", " ms")
        row("2 barge-in (stand-in interrupts) -> reply silent", "barge", " ms")

        def own(d: str, key: str) -> str:
            got = [s["worker_figures"][key] for s in by[d] if isinstance((s.get("worker_figures") or {}).get(key), float)]
            return fmt(stats(got), " ms", 0) if got else "n/a"

        # The worker's /metrics figures, from its call-end line (p50 of all of a session's
        # replies and barge-ins), measured from its own receipt of the API's event to the audio
        # leaving its track: the listener's figures above add the network, WebRTC and detection.
        line("1 ours' own: reply received -> left our track, p50", lambda d: own(d, "reply_latency_p50_ms"))
        line("2 ours' own: API's interruption -> silent at track, p50", lambda d: own(d, "barge_in_p50_ms"))
        line("3 bed gaps: 20 ms windows < -12 dB of bed level",
             lambda d: f"{bed_sum(d, 'gap_windows'):.0f} of {bed_sum(d, 'windows'):.0f}, longest "
                       f"{max([s['bed']['longest_gap_ms'] for s in by[d]] or [0]):.0f} ms", bed=True)
        line("3 bed dips: windows < 50% of their neighbours",
             lambda d: f"{bed_sum(d, 'dip_windows'):.0f} of {bed_sum(d, 'windows'):.0f}", bed=True)
        line("3 bed discontinuities (position jumps > 0.5 ms)",
             lambda d: f"{bed_sum(d, 'discontinuities'):.0f}: skip {bed_sum(d, 'skipped_ms'):.0f} ms, "
                       f"insert {bed_sum(d, 'inserted_ms'):.0f} ms", bed=True)
        line("  bed located (share of 20 ms steps, worst session)",
             lambda d: f"{min([s['bed']['tracked_fraction'] for s in by[d]] or [0]) * 100:.1f}%", bed=True)
        row("3 bed skipped at each barge-in", "skip", " ms")
        line("  barge-ins with a bed jump > 5 ms",
             lambda d: f"{sum(b['skip_ms'] + b['insert_ms'] > 5 for s in by[d] for b in s['barge_ins'])}"
                       f" of {sum(len(s['barge_ins']) for s in by[d])}", bed=True)
        row("  deepest bed dip within 1.5 s of a barge-in", "dip", "%")

        def listened(d: str) -> list[dict[str, Any]]:
            return [s["listener"] for s in by[d] if s.get("listener")]

        line("  listener (WebRTC inbound): concealed",
             lambda d: f"{_sum([i['concealed_ms'] for i in listened(d)]):.0f} ms in "
                       f"{_sum([i['concealment_events'] for i in listened(d)]):.0f} events")
        line("  listener: time-stretched +slower/-faster",
             lambda d: f"+{_sum([i['stretched_ms'] for i in listened(d)]):.0f}/-"
                       f"{_sum([i['compressed_ms'] for i in listened(d)]):.0f} ms")
        line("  listener: mean jitter-buffer delay per session",
             lambda d: ", ".join(f"{s['listener']['jb_delay_ms']:.0f}" for s in by[d]
                                 if s.get("listener") and s["listener"]["jb_delay_ms"] is not None) + " ms")
        row("4 worker CPU per minute of conversation", "cpu", " s", 2)
        row("4 ... the same in cores (whole process)", "cores", "", 3)

        def paired(a: str, b: str) -> str:
            """a's CPU over b's within each round (sessions run back to back): the machine's
            drift from round to round, which moves both, drops out."""
            of = {d: {s["round"]: s["cpu_s_per_min"] for s in by[d] if s.get("cpu_s_per_min") and "round" in s}
                  for d in (a, b)}
            r = stats([of[a][k] / of[b][k] for k in of[a] if k in of[b]])
            return f"{a}/{b} {fmt(r, '', 2)}" if r.get("n") else f"{a}/{b} n/a"

        if ratios:
            add(f"   {'4 ... ratio within each round (paired)':<{w0}} "
                + "; ".join(paired(a, b) for a, b in ratios))
        row("4 worker peak RSS (VmHWM)", "rss", " MB")
        line(f"4 implied calls per {res['cpus']}-core host ({HOST_LOAD:.0%} busy)",
             lambda d: f"{res['cpus'] * HOST_LOAD / fig['cores'][d]['median']:.0f}" if fig["cores"][d].get("n") else "n/a")
        line("4 underruns (worker counters, during turns)",
             lambda d: "n/a (no counters)" if d == BASELINE else
             f"{_sum([s['underruns'] for s in by[d]]):.0f} ({_sum([s['underrun_ms'] for s in by[d]]):.0f}"
             f" ms); {sum(s['underrun_warnings'] for s in by[d])} log warnings")
        line("  worker CPU on real-time threads",
             lambda d: ", ".join(f"{s['threads']['rt_fraction'] * 100:.0f}%" for s in by[d]
                                 if s.get("threads", {}).get("rt_fraction") is not None) or "n/a")
        line("  machine busy / other processes (cores)",
             lambda d: ", ".join(f"{s['machine'].get('busy_cores', '?')}/{max(0.0, s.get('other_cores') or 0):.2f}"
                                 for s in by[d]))
        add("")
        add("   4 worker CPU per thread group, cores (median over sessions; /proc/<pid>/task/*/stat over the turns)")
        for label, _ in THREAD_GROUPS:
            vals = {d: stats([s["thread_groups"][label] for s in by[d] if s.get("thread_groups")]) for d in designs}
            cells = " ".join(f"{fmt(vals[d], '', 3):<{w1}}" for d in designs)
            add(f"   {label[:w0]:<{w0}} {cells} "
                + " ".join(f"{ratio(vals[b], vals[a]):<{len(a) + len(b) + 10}}" for a, b in ratios))
        for d in designs:
            names: dict[str, list[float]] = {}
            for s in by[d]:
                for k, v in s.get("thread_groups", {}).get("by_name", {}).items():
                    names.setdefault(k, []).append(v)
            if names:
                add(f"   {d} by thread name: " + ", ".join(f"{k} {statistics.median(v):.3f}"
                                                           for k, v in sorted(names.items(), key=lambda kv: -statistics.median(kv[1]))))
        rt_names: dict[str, int] = {}
        for s in sessions:
            for k, v in s.get("threads", {}).get("rt_threads", {}).items():
                rt_names[k] = max(rt_names.get(k, 0), v)
        if rt_names:
            add("   worker threads at real-time priority: "
                + ", ".join(f"{k}" + (f" x{v}" if v > 1 else "") for k, v in sorted(rt_names.items())))
        for d in designs:
            fails = [f for s in by[d] for f in s["failures"]]
            missing = sum(v is None for s in by[d] for v in s["latency_ms"]) + \
                sum(b["to_silence_ms"] is None for s in by[d] for b in s["barge_ins"])
            if fails or missing:
                add(f"   {d}: {len(fails)} failed turns {fails[:3]}; {missing} without a detectable onset/silence")
        for s in res.get("sessions", []):
            if "error" in s:
                add(f"   a {s['design']} session failed: {s['error']}")
        warns: dict[str, int] = {}
        for s in sessions:
            for k, v in s["warnings"].items():
                warns[f"{s['design']}: {k}"] = warns.get(f"{s['design']}: {k}", 0) + v
        for k, v in sorted(warns.items()):
            add(f"   worker log, {k} (x{v})")
    if res.get("density") is not None:
        add("")
        add("5. density: N rooms at once, one worker process (ours) and one talking user each; CPU columns in cores")
        add(f"   {'rooms':>5} {'reply latency':<27} {'underruns':>11} {'(start-up)':>11} {'gaps':>5} {'jumps':>5} "
            f"{'worker s/min each':<21} {'RT%':>4} {'server':>6} {'bench':>5} {'other':>5} {'busy':>5} "
            f"{'lag p99':>8}  verdict")
        base = None
        first_break = None
        levels = [lv for lv in res["density"] if lv.get("rooms")]
        for lv in levels:
            if "error" in lv:
                add(f"   {lv['rooms']:>5} failed: {lv['error']}")
                first_break = first_break or lv["rooms"]
                continue
            lat = stats(lv["latency_ms"])
            if base is None and lat.get("n"):
                base = lat["median"]
            reasons = density_reasons(lv, base)
            if reasons and first_break is None:
                first_break = lv["rooms"]
            und = f"{_sum(lv['underruns']):.0f} ({_sum(lv['underrun_ms']):.0f}ms)"
            und0 = f"{_sum(lv.get('startup_underruns', [])):.0f} ({_sum(lv.get('startup_underrun_ms', [])):.0f}ms)"
            gaps = sum(r["bed"]["gap_windows"] for r in lv["per_room"])
            jumps = sum(r["bed"]["discontinuities"] for r in lv["per_room"])
            rt = [t["rt_fraction"] for t in lv.get("threads", []) if t.get("rt_fraction") is not None]
            m = lv.get("machine", {})
            add(f"   {lv['rooms']:>5} {fmt(lat, ' ms'):<27} {und:>11} {und0:>11} {gaps:>5} {jumps:>5} "
                f"{fmt(stats(lv['worker_cpu_s_per_min']), '', 1):<21} "
                f"{(statistics.median(rt) * 100 if rt else 0):>4.0f} {lv['server_cores'] or 0:>6.2f} "
                f"{lv['bench_cores']:>5.2f} {max(0.0, lv.get('other_cores', 0)):>5.2f} {m.get('busy_cores', 0):>5.2f} "
                f"{lv['loop_lag']['p99_ms']:>6.0f}ms  {'; '.join(reasons) or 'ok'}")
        for lv in levels:
            if "error" not in lv:
                add(f"   {lv['rooms']:>5} rooms, listeners: {listener_text(lv.get('listener', []))}; "
                    f"workers in their rooms {lv['workers_in_room_s']:.1f} s after spawn, sessions ready "
                    f"{lv['all_ready_s']:.1f} s")
        add("   underruns: the worker's counters during the measured window; (start-up): before it, while N workers "
            "joined and N users arrived at once (not part of the verdict)")
        if any(lv.get("stopped") for lv in res["density"]):
            add("   (ramp stopped after two broken levels in a row)")
        if first_break is not None:
            add(f"   breaks at {first_break} rooms (first level with underruns, bed gaps, failed or unheard turns, "
                "or a latency median > 2x the one-room median)")
        elif levels:
            add(f"   no break up to {levels[-1]['rooms']} rooms")
        one = next((lv for lv in levels if "error" not in lv and lv["rooms"] == 1), None)
        if one and stats(one["worker_cpu_s_per_min"]).get("n"):
            per = stats(one["worker_cpu_s_per_min"])["median"]
            add(f"   arithmetic, not measured: one worker used {per:.1f} CPU s per minute ({per / 60:.3f} cores), so "
                f"{res['cpus']} cores with nothing else running would hold at most ~{res['cpus'] * 60 / per:.0f} "
                f"rooms before the CPU runs out, ~{res['cpus'] * HOST_LOAD * 60 / per:.0f} at {HOST_LOAD:.0%} busy")
        # Observers counted apart: what the workers alone used at the highest level that held.
        held = [lv for lv in levels if "error" not in lv and not density_reasons(lv, base)]
        if held:
            top = held[-1]
            workers = sum(v for v in top["worker_cpu_s_per_min"] if v is not None) / 60
            observers = top["bench_cores"] + (top["server_cores"] or 0)
            add(f"   measured, observers counted apart: at {top['rooms']} rooms (the most that held) the workers used "
                f"{workers:.2f} cores ({workers / top['rooms']:.3f} per call) while the users, listeners and stand-ins "
                f"(bench) and the livekit-server used {observers:.2f}; without them {res['cpus']} cores at "
                f"{HOST_LOAD:.0%} would hold ~{res['cpus'] * HOST_LOAD / (workers / top['rooms']):.0f} calls")
        bound = [lv["rooms"] for lv in levels if "error" not in lv
                 and (lv["bench_cores"] > 0.8 or lv["loop_lag"]["p99_ms"] > 20)]
        if bound:
            add(f"   caution: at {bound} rooms this bench process (users, listeners, stand-ins) used > 0.8 cores or "
                "its event loop lagged > 20 ms (p99): what it timed there is an upper bound")
        busy = [lv["rooms"] for lv in levels if "error" not in lv
                and lv.get("machine", {}).get("busy_cores", 0) > 0.9 * (res["cpus"] or 1)]
        if busy:
            add(f"   the machine was saturated (> 90% of all cores busy) at {busy} rooms")
        warns = {}
        for lv in levels:
            for r in lv.get("per_room", []):
                for k, v in r["warnings"].items():
                    key = f"{lv['rooms']} rooms (whole level, start-up included): {k}"
                    warns[key] = warns.get(key, 0) + v
        for k, v in warns.items():
            add(f"   worker log, {k} (x{v})")
    if res.get("startup") is not None:
        add("")
        ok = [r for r in res["startup"] if "error" not in r]
        add(f"6. startup (ours, STARTUP_CHECK=1): process start -> ... ({len(ok)} of {len(res['startup'])} runs)")
        for key, label in (("key_session_ready_s", "key-check session ready at the stand-in"),
                           ("joined_s", "agent seen joining by a participant"),
                           ("ready_s", "READY=1 received (joined and key proven)"),
                           ("first_audio_s", "first audio heard by that participant")):
            add(f"   {label:<50} {fmt(stats([r[key] * 1000 for r in ok if r.get(key) is not None]), ' ms')}")
        for r in res["startup"]:
            if "error" in r:
                add(f"   failed: {r['error']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run (under ~3 min): fewer turns, 1-4 rooms")
    ap.add_argument("--turns", type=int, default=None,
                    help="replies and barge-ins per design (default 12; 4 with --quick)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="sessions per design, alternating the order (default 2; 1 with --quick)")
    ap.add_argument("--levels", default=None, help="density levels, e.g. 1,2,4,6,8 (default; 1,2,4 with --quick)")
    ap.add_argument("--level-seconds", type=float, default=None, help="seconds per density level (default 20; 10)")
    ap.add_argument("--startups", type=int, default=None, help="startup runs (default 10; 3 with --quick)")
    ap.add_argument("--skip", action="append", default=[], choices=["scenarios", "density", "startup"])
    ap.add_argument("--bench-priority", choices=["rt", "normal"], default="rt",
                    help="rt (default, when allowed): this process and its livekit-server at SCHED_RR 1, above normal "
                         "threads and below the worker's audio thread, so a busy machine does not starve the "
                         "listeners first")
    ap.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for every worker (repeatable), e.g. OUTPUT_QUEUE_MS=40; the naive "
                         "design keeps its own OUTPUT_QUEUE_MS and BARGE_IN_CLEAR_QUEUE")
    ap.add_argument("--designs", default=None,
                    help=f"designs to compare in scenarios 1-4, of {','.join(DESIGNS)} (default: all; "
                         f"{','.join(QUICK_DESIGNS)} with --quick)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", metavar="PATH", help="write the raw numbers here")
    args = ap.parse_args()
    if any("=" not in item for item in args.worker_env):
        ap.error("--worker-env takes KEY=VALUE")
    if not os.environ.get("VOICE_AGENT_TEST_IP"):
        print("warning: VOICE_AGENT_TEST_IP is unset: WebRTC media will use this host's addresses; "
              "./scripts/bench runs this in its own network namespace", file=sys.stderr)
    priority = BenchPriority(args.bench_priority)
    priority.apply()  # before the LiveKit FFI starts its threads
    bench = Bench(args, priority)
    try:
        res = asyncio.run(bench.run())
    except KeyboardInterrupt:
        bench.cleanup()
        raise
    print(report(res), flush=True)
    save_results(args.json, res)


def save_results(path: str | None, res: dict[str, Any]) -> None:
    """The raw numbers as JSON at ``path`` (none: not kept), for bench/RESULTS.md and later reruns."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump(res, f, indent=1, default=float)
        print(f"raw numbers: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
    # Skip the interpreter's teardown of the LiveKit native library: it can abort on the way
    # out ("panic in a function that cannot unwind"), after the results, with exit 134.
    import exits

    exits.exit_now(0)
