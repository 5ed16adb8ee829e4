#!/usr/bin/env python3
"""Barge-in at the source: how often the reply gets one more 10 ms block out, and whether a
re-render ever leaves the track silent, with the writer's direct calls into the SDK
(``mixer._DirectSource``: the default) against the SDK's public calls (the baseline).

    python bench/barge_in_bench.py [--n N] [--seed S] [--json PATH]

No LiveKit server: the mixer's own track is read back through an ``rtc.AudioStream``, as
in ``mixer_bench.py``. Each round: a bed (noise), a reply (a 1 kHz tone at 0.3) pushed,
then interrupted 0.4 s later at a random phase of the source's 10 ms clock. Figures, per
design, in the same run:

1. one more whole reply block: the share of barge-ins after which at least one 10 ms
   block handed to the track after the interrupt still carries the reply at > 2/3 of its
   level (the writer missed the tick right after the barge-in; the 2 ms fade's block is
   not counted). Its median cost is a tick: 10 ms more reply.
2. the same rounds with a thread that spins on the GIL (whole switch intervals): 10 ms
   blocks of hard silence heard (a tick that found the source's queue empty: this SDK
   then sends silence), and the writer's own counters (races: a tick between its check
   and the clear; misses: a re-render that waited for a tick).

3. At the source, ours against **minimal** (``bench/minimal_bridge.py``'s output path:
   each reply chunk captured straight into an ``rtc.AudioSource`` with the SDK's default
   1000 ms queue, in order, ``clear_queue()`` on barge-in, no bed), fed alike: each reply's
   first 300 ms at once, then 40-120 ms chunks in real time (the stand-in's pacing), and
   interrupted 0.5-0.9 s after it was first pushed. Reply start = first push -> the first
   sample of the reply out of the source; barge-in = interrupt -> the last sample of the
   reply out (the end of ours' 2 ms fade). Both read back through the same tap and found
   the same way: a 5 ms window, moved in 0.5 ms steps, whose 1 kHz amplitude is above half
   the reply's level (start), or the first from which it stays below a tenth of it (silence,
   as ``e2e_bench.py`` has it; the bed's noise stays far below). This is
   our own part of the end-to-end figures (``e2e_bench.py`` 1 and 2), without Opus, the
   network and the listener's jitter buffer, which every design shares.

Run it quiet: the machine is shared, and the figures are shares of rounds, not times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np

import exits
from mixer import SAMPLE_RATE, Mixer, MixerSettings
from mixer_bench import Tap

RATE = SAMPLE_RATE
REPLY_HZ = 1000.0
REPLY_AMP = 0.3


def tone_amp(chunk: np.ndarray, hz: float = REPLY_HZ) -> float:
    t = np.arange(len(chunk)) / RATE
    return float(2 * abs(np.dot(chunk, np.exp(-2j * np.pi * hz * t))) / len(chunk))


async def rounds(n: int, direct: bool, spin: bool, seed: int) -> dict[str, Any]:
    stop = threading.Event()

    def spinner() -> None:
        x = 0
        while not stop.is_set():
            for i in range(20000):
                x += i

    mixer = Mixer(MixerSettings(ambient_fade_in_ms=0, duck_db=0.0), direct_calls=direct)
    mixer.start()
    if direct and mixer._direct is None:
        raise SystemExit("the writer's direct calls are not available with this SDK")
    bed = (np.random.default_rng(7).standard_normal(RATE) * 0.02).astype(np.float32)
    mixer.set_bed("noise", bed, volume=1.0, fade_ms=0)
    tap = Tap(mixer.source)  # mixer_bench's reader of what leaves the source, on its own thread
    pcm = (REPLY_AMP * np.sin(2 * np.pi * REPLY_HZ * np.arange(RATE * 2) / RATE) * 32767).astype("<i2").tobytes()
    rnd = random.Random(seed)
    cuts = []
    if spin:
        threading.Thread(target=spinner, daemon=True).start()
    try:
        await asyncio.sleep(0.5)
        for i in range(n):
            mixer.push_reply(f"r{i}", pcm)
            await asyncio.sleep(0.4 + rnd.uniform(0, 0.01))
            cuts.append(time.monotonic())
            mixer.interrupt(f"r{i}")
            await asyncio.sleep(0.25)
    finally:
        stop.set()
        tap.stop()
        await mixer.aclose()
    heard = [(t, chunk.astype(np.float32) / 32767) for t, chunk in zip(tap.arrivals, tap.chunks)]
    extra = []
    for c in cuts:
        after = [tone_amp(x) for t, x in heard if t > c + 0.0007][:4]
        full = 0
        for a in after:
            if a <= REPLY_AMP * 2 / 3:
                break
            full += 1
        extra.append(full)
    since = heard[0][0] + 0.45 if heard else 0.0
    silent = sum(1 for t, x in heard if t >= since and not np.any(x))
    return {"n": n, "one_more_block": float(np.mean(np.array(extra) >= 1)) if extra else None,
            "silent_blocks": silent, "races": mixer.races, "misses": mixer.misses, "flushes": mixer.flushes,
            "underruns": mixer.core.counters.underruns}


class MinimalOutput:
    """minimal_bridge.py's output path: chunks captured in order into a default AudioSource
    (1000 ms queue) by one task, ``clear_queue()`` on barge-in, later chunks of an
    interrupted reply dropped."""

    def __init__(self) -> None:
        from livekit import rtc

        self._rtc = rtc
        self.source = rtc.AudioSource(RATE, 1)
        self._chunks: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._cut: set[str] = set()
        self._task = asyncio.create_task(self._feed())

    async def _feed(self) -> None:
        while True:
            rid, pcm = await self._chunks.get()
            if rid not in self._cut:
                await self.source.capture_frame(self._rtc.AudioFrame(pcm, RATE, 1, len(pcm) // 2))

    def push_reply(self, rid: str, pcm: bytes) -> None:
        self._chunks.put_nowait((rid, pcm))

    def interrupt(self, rid: str) -> None:
        self._cut.add(rid)
        self.source.clear_queue()

    async def aclose(self) -> None:
        self._task.cancel()


def windows_amp(x: np.ndarray, start: int, step: int = 12, win: int = 120) -> tuple[np.ndarray, np.ndarray]:
    """1 kHz amplitude of ``win``-sample windows of ``x`` from ``start``, every ``step``."""
    frames = np.lib.stride_tricks.sliding_window_view(x[start:], win)[::step]
    t = np.arange(win) / RATE
    amp = 2 * np.abs(frames @ np.exp(-2j * np.pi * REPLY_HZ * t)) / win
    return start + np.arange(len(frames)) * step, amp


async def at_source(design: str, n: int, seed: int) -> dict[str, Any]:
    """Figure 3: reply start and barge-in at the source, one design."""
    if design == "ours":
        out: Any = Mixer(MixerSettings(ambient_fade_in_ms=0, duck_db=0.0))
        out.start()
        bed = (np.random.default_rng(7).standard_normal(RATE) * 0.02).astype(np.float32)
        out.set_bed("noise", bed, volume=1.0, fade_ms=0)
    else:
        out = MinimalOutput()
    tap = Tap(out.source)
    pcm = (REPLY_AMP * np.sin(2 * np.pi * REPLY_HZ * np.arange(RATE * 2) / RATE) * 32767).astype("<i2").tobytes()
    rnd = random.Random(seed)
    turns = []
    try:
        await asyncio.sleep(0.5)
        for i in range(n):
            await asyncio.sleep(rnd.uniform(0.3, 0.6))
            rid, t_push, sent = f"r{i}", time.monotonic(), int(0.3 * RATE) * 2
            out.push_reply(rid, pcm[:sent])
            cut = rnd.uniform(0.5, 0.9)
            while time.monotonic() - t_push < cut:
                k = rnd.randint(40, 120) * RATE // 1000 * 2
                out.push_reply(rid, pcm[sent:sent + k])
                sent += k
                due = min(t_push + cut, t_push + sent / 2 / RATE - 0.3)
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            await asyncio.sleep(max(0.0, t_push + cut - time.monotonic()))
            t_cut = time.monotonic()
            out.interrupt(rid)
            turns.append((t_push, t_cut))
        await asyncio.sleep(0.4)  # the last one's silence, read back
    finally:
        obs = tap.stop()
        await out.aclose()
    x = obs.data.astype(np.float32) / 32767
    start_ms, barge_ms = [], []
    for t_push, t_cut in turns:
        s0 = obs.sample_at(t_push - 0.02)
        idx, amp = windows_amp(x[:obs.sample_at(t_push + 1.0)], s0)
        loud = np.flatnonzero(amp > REPLY_AMP / 2)
        if len(loud):
            start_ms.append((obs.time_of(int(idx[loud[0]])) - t_push) * 1000)
        s1 = obs.sample_at(t_cut - 0.005)
        idx, amp = windows_amp(x[:obs.sample_at(t_cut + 0.3)], s1)
        above = np.flatnonzero(amp >= REPLY_AMP * 0.1)
        k = above[-1] + 1 if len(above) else 0
        if k < len(idx):
            barge_ms.append((obs.time_of(int(idx[k])) - t_cut) * 1000)
    return {"n": n, "reply_start_ms": start_ms, "barge_in_ms": barge_ms}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"n": args.n, "seed": args.seed, "load_start": os.getloadavg()[0]}
    for spin in (False, True):
        for direct in (True, False):
            key = f"{'direct' if direct else 'public'}{'-spin' if spin else ''}"
            print(f"[{key}] {args.n} barge-ins...", file=sys.stderr, flush=True)
            out[key] = await rounds(args.n, direct, spin, args.seed)
    half = max(1, args.n // 2)
    for design in ("ours", "minimal"):
        out[f"source-{design}"] = {"reply_start_ms": [], "barge_in_ms": []}
    for r, order in enumerate((("ours", "minimal"), ("minimal", "ours"))):  # alternate: drift hits both alike
        for design in order:
            print(f"[source-{design}] {half} replies and barge-ins...", file=sys.stderr, flush=True)
            res = await at_source(design, half, args.seed + r)
            for key in ("reply_start_ms", "barge_in_ms"):
                out[f"source-{design}"][key] += res[key]
    out["load_end"] = os.getloadavg()[0]
    return out


def table(res: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v * 100:.0f}%"

    def counters(x: dict[str, Any]) -> str:
        return f"{x['races']} / {x['misses']} / {x['underruns']}"

    rows = [("1 one more whole reply block after a barge-in", pct(res["direct"]["one_more_block"]),
             pct(res["public"]["one_more_block"])),
            ("  races / misses / underruns (the writer's counters)", counters(res["direct"]), counters(res["public"])),
            ("2 with a GIL-spinning thread: silent 10 ms blocks heard", str(res["direct-spin"]["silent_blocks"]),
             str(res["public-spin"]["silent_blocks"])),
            ("  races / misses / underruns", counters(res["direct-spin"]), counters(res["public-spin"]))]
    lines = [f"barge-in bench: {res['n']} barge-ins per design and condition; load average "
             f"{res['load_start']:.2f} at start, {res['load_end']:.2f} at end",
             f"   {'figure':<58} {'direct (ours)':<16} public calls"]
    lines += [f"   {a:<58} {b:<16} {c}" for a, b, c in rows]
    lines.append("   (no share of extra blocks in 2: the spinning thread delays the observer's timestamps too)")
    if "source-ours" in res:
        def med(v: list[float]) -> str:
            if not v:
                return "n/a"
            q = np.percentile(v, [50, 10, 90])
            return f"{q[0]:.1f} ms [p10 {q[1]:.1f}, p90 {q[2]:.1f}] n={len(v)}"

        def diff(key: str) -> str:
            a, b = res["source-ours"][key], res["source-minimal"][key]
            if not a or not b:
                return "n/a"
            return f"{np.median(a) - np.median(b):+.1f} ms"

        lines.append(f"   {'3 at the source, ours vs minimal':<58} {'ours':<34} {'minimal':<34} ours - minimal")
        for label, key in (("  reply start: first push -> first reply sample out", "reply_start_ms"),
                           ("  barge-in: interrupt -> last reply sample out", "barge_in_ms")):
            ours, minimal = med(res["source-ours"][key]), med(res["source-minimal"][key])
            lines.append(f"   {label:<58} {ours:<34} {minimal:<34} {diff(key)}")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=60, help="barge-ins per design and condition (default 60)")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    res = asyncio.run(main(args))
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    exits.exit_now(0)
